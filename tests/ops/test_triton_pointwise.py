"""Triton SwiGLU, RMSNorm and RoPE vs z2all.ops.reference: forward and every input gradient, fp32 and fp16
(+ bf16 on a GPU), odd shapes (non-power-of-two widths, strided inputs). On CPU they run in Triton's
interpreter (conftest), on a CUDA machine compiled (ops_helpers).

Tolerances: fp32 atol = rtol = 1e-5 (same maths, different summation order); fp16 atol = rtol = 2e-3
(the kernels compute in fp32 and round once; the reference rounds intermediate results to fp16 too, so
the two differ by about one fp16 ulp of the output, 2^-10 relative).
"""

from __future__ import annotations

import pytest
import torch
from ops_helpers import DEV, DTYPES

from z2all.ops import reference as R

pytest.importorskip("triton")
from z2all.ops.triton import rmsnorm as T_rmsnorm  # noqa: E402
from z2all.ops.triton import rope as T_rope  # noqa: E402
from z2all.ops.triton import swiglu as T_swiglu  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _grads(fn, inputs, seed=0):
    """fn(*inputs) forward and d(sum out * g)/d(inputs) for a fixed random g per output."""
    inputs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    gs = [torch.randn(o.shape, generator=gen).to(o.device, o.dtype) for o in outs]
    leaves = [x for x in inputs if x.requires_grad]
    grads = torch.autograd.grad(outs, leaves, gs)
    return outs, grads


def assert_same(ref_fn, our_fn, inputs, dtype):
    tol = TOL[dtype]
    (ro, rg), (oo, og) = _grads(ref_fn, inputs), _grads(our_fn, inputs)
    for i, (r, o) in enumerate(zip(ro, oo)):
        assert o.dtype == r.dtype and o.shape == r.shape
        torch.testing.assert_close(o.float(), r.float(), atol=tol, rtol=tol, msg=lambda m, i=i: f"output {i}: {m}")
    for i, (r, o) in enumerate(zip(rg, og)):
        assert o.dtype == r.dtype and o.shape == r.shape
        torch.testing.assert_close(o.float(), r.float(), atol=tol, rtol=tol, msg=lambda m, i=i: f"grad {i}: {m}")


def _randn(*shape, dtype, scale=1.0):
    return (torch.randn(*shape) * scale).to(DEV, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 37), (2, 5, 129), (1000,)])
def test_swiglu_matches_reference(shape, dtype):
    torch.manual_seed(0)
    a, b = _randn(*shape, dtype=dtype, scale=3.0), _randn(*shape, dtype=dtype)
    assert_same(R.swiglu, T_swiglu.swiglu, [a, b], dtype)


def test_swiglu_strided_input():
    torch.manual_seed(1)
    a = _randn(29, 6, dtype=torch.float32).t()  # [6, 29], not contiguous
    b = _randn(6, 29, dtype=torch.float32)
    assert not a.is_contiguous()
    assert_same(R.swiglu, T_swiglu.swiglu, [a, b], torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 5, 45), (7, 130), (1, 1, 16)])
def test_rmsnorm_matches_reference(shape, dtype):
    torch.manual_seed(0)
    x = _randn(*shape, dtype=dtype, scale=2.0)
    w = _randn(shape[-1], dtype=dtype) + 1.0
    assert_same(lambda x, w: R.rms_norm(x, w, 1e-5), lambda x, w: T_rmsnorm.rms_norm(x, w, 1e-5), [x, w], dtype)


def test_rmsnorm_strided_rows_and_mixed_dtype():
    """x as a column slice of a wider tensor (row stride != C), and an fp32 weight on fp16 activations
    (the output is promoted to fp32, as the reference's `weight * x.to(dtype)`)."""
    torch.manual_seed(2)
    x = _randn(3, 4, 64, dtype=torch.float16)[..., :45]
    w = _randn(45, dtype=torch.float32)
    assert not x.is_contiguous()
    assert_same(lambda x, w: R.rms_norm(x, w, 1e-6), lambda x, w: T_rmsnorm.rms_norm(x, w, 1e-6), [x, w],
                torch.float16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,K,T,D", [(3, 1, 7, 6), (3, 3, 5, 16), (4, 2, 9, 32)])
def test_rope_matches_reference(H, K, T, D, dtype):
    torch.manual_seed(0)
    B = 2
    q = _randn(B, T, H, D, dtype=dtype).transpose(1, 2)  # the model's strided view
    k = _randn(B, K, T, D, dtype=dtype)
    cos, sin = R.rope_cache(T, D, device=DEV, start=3)
    fn_r = lambda q, k: R.rope(q, k, cos, sin)
    fn_o = lambda q, k: T_rope.rope(q, k, cos, sin)
    assert_same(fn_r, fn_o, [q, k], dtype)


def test_rope_per_row_positions():
    """[B, T, D/2] tables (left-padded generation gives each row its own positions)."""
    torch.manual_seed(3)
    B, H, K, T, D = 3, 2, 1, 5, 8
    cos, sin = R.rope_cache(16, D, device=DEV)
    pos = torch.tensor([[0, 1, 2, 3, 4], [0, 0, 0, 1, 2], [5, 6, 7, 8, 9]], device=DEV)
    cos, sin = cos[pos], sin[pos]
    q, k = _randn(B, H, T, D, dtype=torch.float32), _randn(B, K, T, D, dtype=torch.float32)
    assert_same(lambda q, k: R.rope(q, k, cos, sin), lambda q, k: T_rope.rope(q, k, cos, sin), [q, k], torch.float32)


def test_rope_rejects_bad_tables():
    q, k = torch.zeros(1, 2, 4, 8, device=DEV), torch.zeros(1, 1, 4, 8, device=DEV)
    cos, sin = R.rope_cache(5, 8, device=DEV)
    with pytest.raises(ValueError, match=r"\[T, D/2\]"):
        T_rope.rope(q, k, cos, sin)


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["swiglu", "rmsnorm", "rope"])
def test_pointwise_bf16_gpu(op):
    torch.manual_seed(0)
    dt = torch.bfloat16
    if op == "swiglu":
        a, b = _randn(4, 128, 1376, dtype=dt), _randn(4, 128, 1376, dtype=dt)
        assert_same(R.swiglu, T_swiglu.swiglu, [a, b], dt)
    elif op == "rmsnorm":
        x, w = _randn(4, 128, 2048, dtype=dt), _randn(2048, dtype=dt)
        assert_same(lambda x, w: R.rms_norm(x, w, 1e-5), lambda x, w: T_rmsnorm.rms_norm(x, w, 1e-5), [x, w], dt)
    else:
        q, k = _randn(2, 256, 16, 128, dtype=dt).transpose(1, 2), _randn(2, 4, 256, 128, dtype=dt)
        cos, sin = R.rope_cache(256, 128, device=DEV)
        assert_same(lambda q, k: R.rope(q, k, cos, sin), lambda q, k: T_rope.rope(q, k, cos, sin), [q, k], dt)
