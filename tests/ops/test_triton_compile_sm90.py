"""Every Triton kernel compiles for an H100 (sm_90) through Triton's own compiler and ptxas, without a GPU:
the interpreter that runs the CPU tests skips the real compiler (type unification of loop-carried values,
constexpr branches, dot shapes, register/shared-memory limits), so this is the CPU-side guard for the GPU
path. For each kernel's default configs (bf16 at head dims 64 and 128, and the fp32 config; every config of
the atomic-dQ backward) it also checks the shared memory the compiled kernel needs against the H100's 227 KiB
per block. The attention kernels are built twice: plain, and with SEGMENTS (packed rows, segment ids).

Slow (~4-8 min on 2 cores: ptxas on flash-attention kernels takes seconds each), so marked `slow`. Runs in a
subprocess because Triton fixes interpreted-vs-compiled when the kernels are imported, and conftest.py
switches the interpreter on for this process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent('''
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from z2all.ops.triton import attention as A, cross_entropy as CE, rmsnorm, rope, swiglu

    TARGET = GPUTarget("cuda", 90, 32)
    SMEM = 232448  # H100 max dynamic shared memory per block (227 KiB)

    def build(kernel, sig, consts, cfg=None, num_warps=4, num_stages=3):
        fn = kernel.fn if hasattr(kernel, "configs") else kernel  # Autotuner -> JITFunction
        if cfg is not None:
            consts = {**consts, **cfg.kwargs}
            num_warps, num_stages = cfg.num_warps, cfg.num_stages
        full = {n: sig.get(n, "constexpr" if n in consts else "i32") for n in fn.arg_names}
        k = triton.compile(ASTSource(fn, full, consts), target=TARGET,
                           options={"num_warps": num_warps, "num_stages": num_stages})
        assert k.metadata.shared <= SMEM, (fn.__name__, consts, k.metadata.shared)
        print(fn.__name__, consts.get("BLOCK_M", ""), consts.get("BLOCK_N", ""), k.metadata.shared, flush=True)

    P = lambda dt: "*" + dt
    build(swiglu._swiglu_fwd, {n: P("bf16") for n in ("a_ptr", "b_ptr", "c_ptr")}, {"BLOCK": swiglu.BLOCK})
    build(swiglu._swiglu_bwd, {n: P("bf16") for n in ("a_ptr", "b_ptr", "dc_ptr", "da_ptr", "db_ptr")},
          {"BLOCK": swiglu.BLOCK})
    build(rmsnorm._rmsnorm_fwd, {"x_ptr": P("bf16"), "w_ptr": P("fp32"), "y_ptr": P("fp32"), "rstd_ptr": "*fp32",
                                 "eps": "fp32"}, {"BLOCK_C": 2048}, num_warps=8)
    build(rmsnorm._rmsnorm_bwd, {"x_ptr": P("bf16"), "w_ptr": P("bf16"), "dy_ptr": P("bf16"), "rstd_ptr": "*fp32",
                                 "dx_ptr": P("bf16"), "dw_part_ptr": "*fp32"}, {"BLOCK_C": 2048}, num_warps=8)
    for sign in (1, -1):
        build(rope._rope_kernel, {"x_ptr": P("bf16"), "y_ptr": P("bf16"), "cos_ptr": "*fp32", "sin_ptr": "*fp32"},
              {"SIGN": sign, "BLOCK_H": 32, "BLOCK_HALF": 64})
    for wg in (True, False):
        build(CE._ce_kernel, {"z_ptr": P("bf16"), "y_ptr": "*i64", "loss_ptr": "*fp32", "n_valid_ptr": "*fp32",
                              "ignore_index": "i32"}, {"WRITE_GRAD": wg, "BLOCK_V": CE.BLOCK_V}, num_warps=8)
    fl = {"qk_scale": "fp32", "sm_scale": "fp32"}
    cases = [("bf16", 64, A._FWD_16[0], A._DKDV_16[0], A._DQ_16[0]),
             ("bf16", 128, A._FWD_16[0], A._DKDV_16[0], A._DQ_16[0]),
             ("fp32", 64, A._FWD_32[0], A._DKDV_32[0], A._DQ_32[0])]
    seg = {"SEG": "*i32", "BOUNDS": "*i32"}
    for dt, D, cf, ckv, cq in cases:
        build(A._attn_bwd_delta, {"O": P(dt), "DO": P(dt), "DELTA": "*fp32"},
              {"HEAD_DIM": D, "BLOCK_D": D, "BLOCK_M": 64})
        # plain and packed rows (SEGMENTS: the varlen variant, segment ids as int32 pointers)
        for segments in (False, True):
            common = {"HEAD_DIM": D, "CAUSAL": True, "BLOCK_D": D, "PREC": "ieee" if dt == "fp32" else "tf32",
                      "SEGMENTS": segments}
            sg = seg if segments else {n: "*fp32" for n in seg}  # the plain path passes L as a dummy
            build(A._attn_fwd, {**{n: P(dt) for n in "QKVO"}, "L": "*fp32", **sg, **fl}, common, cf)
            build(A._attn_bwd_dkdv, {**{n: P(dt) for n in ("Q", "K", "V", "DO", "DK", "DV")}, "L": "*fp32",
                                     "DELTA": "*fp32", **sg, **fl}, common, ckv)
            build(A._attn_bwd_dq, {**{n: P(dt) for n in ("Q", "K", "V", "DO", "DQ")}, "L": "*fp32",
                                   "DELTA": "*fp32", **sg, **fl}, common, cq)
            # the atomic-dQ backward (ops.attention_bwd=atomic): every config of its search space
            for ca in (A._ATOMIC_16 if dt == "bf16" else A._ATOMIC_32):
                build(A._attn_bwd_atomic, {**{n: P(dt) for n in ("Q", "K", "V", "DO", "DK", "DV")},
                                           "L": "*fp32", "DELTA": "*fp32", "DQ": "*fp32", **sg, **fl}, common, ca)
    for segments in (False, True):  # non-causal
        sg = seg if segments else {n: "*fp32" for n in seg}
        build(A._attn_fwd, {**{n: P("bf16") for n in "QKVO"}, "L": "*fp32", **sg, **fl},
              {"HEAD_DIM": 64, "CAUSAL": False, "BLOCK_D": 64, "PREC": "tf32", "SEGMENTS": segments}, A._FWD_16[0])
    print("OK")
''')


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["Z2ALL_TRITON_AUTOTUNE"] = "1"
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("OK"), proc.stdout[-3000:] + proc.stderr[-3000:]
