"""Triton flash attention vs reference.attention_naive: output and dq, dk, dv, fp32 and fp16 (+ bf16 on a
GPU), on small odd shapes: sequence lengths that are not multiples of the block (16 in the interpreter), GQA
groups of 1 and 3, head dims 16/32/64, causal with T == S, T < S (bottom-right aligned, KV-cache style) and
T > S (rows that see nothing give 0), non-causal, strided q. Both backward passes: `split` (dK/dV and dQ
kernels) and `atomic` (one kernel, dQ by fp32 atomic adds). On CPU through the interpreter, on a CUDA
machine the compiled kernels (ops_helpers).

Tolerances: fp32 atol = rtol = 1e-4 (online softmax reorders the sums); fp16 atol = rtol = 1e-2 (P and dS
are rounded to fp16 before their matmuls, as in FlashAttention; the reference works in fp32 throughout).
"""

from __future__ import annotations

import pytest
import torch
from ops_helpers import DEV, DTYPES

from z2all.ops import reference as R

pytest.importorskip("triton")
from z2all.ops.triton import attention as A  # noqa: E402

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
BWD = {"split": A.attention, "atomic": A.attention_atomic_dq}


def _run(fn, q, k, v, causal, seed=0):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o = fn(q, k, v, causal=causal)
    g = torch.randn(o.shape, generator=torch.Generator().manual_seed(seed)).to(o.device, o.dtype)
    return (o, *torch.autograd.grad(o, (q, k, v), g))


def _check(B, H, K, T, S, D, causal, dtype, strided_q=False, bwd="split"):
    torch.manual_seed(0)
    if strided_q:
        q = torch.randn(B, T, H, D).to(DEV, dtype).transpose(1, 2)
    else:
        q = torch.randn(B, H, T, D).to(DEV, dtype)
    k, v = torch.randn(B, K, S, D).to(DEV, dtype), torch.randn(B, K, S, D).to(DEV, dtype)
    tol = TOL[dtype]
    ref, ours = _run(R.attention_naive, q, k, v, causal), _run(BWD[bwd], q, k, v, causal)
    for name, r, o in zip(("out", "dq", "dk", "dv"), ref, ours):
        assert o.shape == r.shape and o.dtype == r.dtype, name
        torch.testing.assert_close(o.float(), r.float(), atol=tol, rtol=tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("bwd", list(BWD))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,K,T,S,D,causal", [
    (1, 3, 1, 19, 19, 16, True),    # GQA group 3, T not a multiple of the block
    (2, 2, 2, 21, 37, 32, True),    # T < S: bottom-right causal (prefill after a cache)
    (1, 2, 1, 37, 21, 16, True),    # T > S: the first rows see no key
    (1, 2, 2, 17, 23, 16, False),   # non-causal, MHA
    (1, 3, 3, 19, 19, 64, True),    # head dim 64
    (1, 2, 1, 19, 19, 24, True),    # head dim not a power of two (masked feature lanes)
])
def test_attention_matches_reference(B, H, K, T, S, D, causal, dtype, bwd):
    _check(B, H, K, T, S, D, causal, dtype, bwd=bwd)


@pytest.fixture
def blocks(monkeypatch, request):
    """Run every attention kernel with BLOCK_M x BLOCK_N = request.param (the GPU configs are not square;
    the interpreter default is 16 x 16), so the causal block arithmetic is tested with unequal blocks."""
    import triton

    bm, bn = request.param
    kernels = (A._attn_fwd, A._attn_bwd_dkdv, A._attn_bwd_dq, A._attn_bwd_atomic)
    for kern in kernels:
        monkeypatch.setattr(kern, "configs", [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=1)])
        monkeypatch.setattr(kern, "cache", {})
    yield
    for kern in kernels:
        kern.cache.clear()


@pytest.mark.parametrize("blocks", [(16, 32), (32, 16)], indirect=True)
@pytest.mark.parametrize("T,S", [(37, 37), (21, 50), (45, 23)])
def test_attention_unequal_blocks(blocks, T, S):
    _check(1, 2, 1, T, S, 16, True, torch.float32)
    _check(1, 2, 1, T, S, 16, True, torch.float32, bwd="atomic")


@pytest.mark.parametrize("bwd", list(BWD))
def test_attention_strided_q_and_decode_step(bwd):
    _check(2, 4, 2, 13, 13, 16, True, torch.float32, strided_q=True, bwd=bwd)
    _check(1, 2, 1, 1, 20, 16, True, torch.float32, bwd=bwd)  # one new token against a 20-key cache


def test_attention_key_padding_mask_falls_back_to_sdpa():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, 5, 16, device=DEV), torch.randn(2, 1, 5, 16, device=DEV), torch.randn(2, 1, 5, 16,
                                                                                                     device=DEV)
    mask = torch.tensor([[False, False, True, True, True], [True] * 5], device=DEV)
    out = A.attention(q, k, v, causal=True, key_padding_mask=mask)
    ref = R.attention_naive(q, k, v, causal=True, key_padding_mask=mask)
    # every real query of every row is defined (row 1 has no padding at all); a padding query's output is
    # not (the reference gives 0, SDPA's fallback lets it see key 0; generation discards it)
    real = mask[:, None, :, None].expand_as(out)
    assert real.sum() == 8 * 2 * 16
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)


def test_attention_rejects_bad_shapes():
    with pytest.raises(ValueError, match="H % K"):
        A.attention(torch.zeros(1, 3, 4, 16), torch.zeros(1, 2, 4, 16), torch.zeros(1, 2, 4, 16))


@pytest.mark.gpu
@pytest.mark.parametrize("bwd", list(BWD))
@pytest.mark.parametrize("D,T,S", [(64, 1000, 1000), (128, 256, 1300)])
def test_attention_bf16_gpu(D, T, S, bwd):
    _check(2, 8, 2, T, S, D, True, torch.bfloat16, strided_q=True, bwd=bwd)


@pytest.mark.gpu
def test_attention_fp32_gpu_uses_full_precision_dots():
    _check(1, 4, 4, 300, 300, 64, True, torch.float32)


@pytest.mark.gpu
def test_attention_atomic_dq_survives_autotuning(monkeypatch):
    """The autotuner runs every config on the real arguments, each adding into dQ: reset_to_zero must clear
    dQ before the run that counts (the tests above run one config, so no benchmarking happens there)."""
    import triton

    kern = A._attn_bwd_atomic
    monkeypatch.setattr(kern, "configs", [triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4),
                                          triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4)])
    monkeypatch.setattr(kern, "cache", {})
    _check(1, 4, 2, 200, 200, 64, True, torch.bfloat16, bwd="atomic")
