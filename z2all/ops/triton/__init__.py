"""Hand-written Triton kernels for the model's hot ops, one file per op:

    rmsnorm.py        rms_norm(x, weight, eps)                      row kernel, weight grad reduced over rows
    rope.py           rope(q, k, cos, sin)                          rotate-half rotary embedding of q and k
    swiglu.py         swiglu(a, b)                                  silu(a) * b, pointwise
    cross_entropy.py  linear_cross_entropy(h, weight, targets)      LM head + CE chunked over tokens
    attention.py      attention(q, k, v, causal, key_padding_mask)  FlashAttention-2 style fwd + bwd

Each public function has exactly the signature of its twin in `z2all.ops.reference` and is selected through
`z2all.ops.OpsConfig`. This module holds what the five share: the device check, the interpreter flag and
the autotune-config helper.

On a machine without CUDA the kernels still run through Triton's interpreter (`TRITON_INTERPRET=1`, set by
tests/conftest.py before Triton is imported): slow, fp32/fp16 only (it mishandles bf16), but exact enough
to test every kernel's maths on CPU. Triton reads the flag when a kernel is *decorated*, so it has to be in
the environment before this package is imported.
"""

from __future__ import annotations

import os
import re

import torch
import triton

# Triton decides interpreted-vs-compiled at @triton.jit time, i.e. when our modules are imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Triton 3.6's interpreter turns a runtime int argument into a 1-element array and calls int() on it in
# `range(...)`, which numpy 2.x refuses ("only 0-dimensional arrays can be converted to Python scalars"): every
# kernel with a loop bound or a program-id expression fails there. 3.7 fixed it (checked with 3.6, 3.7, 3.8
# and 3.9 on numpy 2.4). Compiled GPU runs are unaffected: every kernel compiles for sm_90 with 3.6 too.
MIN_INTERPRETER_VERSION = (3, 7)


def _version(v: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as "3.7.0", "3.10.1+git" or "3.7rc1"."""
    m = re.match(r"(\d+)\.(\d+)", v)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def check_device(*tensors: torch.Tensor) -> None:
    """Fail early and clearly when a Triton op would be launched on CPU tensors without the interpreter
    (otherwise Triton dies deep inside with a pointer error), or with an interpreter too old to run them."""
    for t in tensors:
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and INTERPRET:
            if _version(triton.__version__) < MIN_INTERPRETER_VERSION:
                raise RuntimeError(
                    f"Triton {triton.__version__}'s interpreter cannot run these kernels on CPU (it fails on "
                    "numpy 2.x); install triton>=3.7 for CPU runs (pip install 'triton>=3.7'), or use the "
                    "torch implementation (--model.ops.preset=naive)")
            continue
        raise RuntimeError(
            f"Triton kernels need CUDA tensors, got a tensor on {t.device}. Use the torch implementation "
            "(e.g. --model.ops.preset=naive, or ops.<op>=torch / attention=sdpa), or set TRITON_INTERPRET=1 "
            "before importing z2all.ops.triton to run the kernels (slowly) in Triton's interpreter.")


# Z2ALL_TRITON_AUTOTUNE=0 keeps only the first (default) GPU config of each kernel: no search, so the first
# call of a new shape costs one compile instead of several (the GPU tests use it; benchmarks should not).
AUTOTUNE = os.environ.get("Z2ALL_TRITON_AUTOTUNE", "1") not in ("", "0")


def autotune_configs(gpu: list[triton.Config], cpu: triton.Config,
                     fp32: list[triton.Config] = ()) -> list[triton.Config]:
    """The GPU search space (its first entry is the default when autotuning is off) plus any fp32-only
    configs (an early_config_prune picks between them by dtype), or the single config the interpreter runs
    (autotuning there would just run every config at numpy speed)."""
    if INTERPRET:
        return [cpu]
    return list(fp32) + (gpu if AUTOTUNE else gpu[:1])


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 inputs keep full precision ('ieee'; the default would be TF32 on
    Ampere+, a 1e-3 relative error that the fp32 tests would catch), 16-bit inputs use the tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"
