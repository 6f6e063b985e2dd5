"""The PyTorch reference ops against independent formulations: attention (naive vs SDPA vs a float64
per-head loop, with GQA, a KV-cache offset and a padding mask), RoPE vs complex-number rotation, RMSNorm vs
transformers' LlamaRMSNorm, the LM-head cross-entropy vs F.cross_entropy on full logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from z2all.ops import reference as ref


def loop_attention(q, k, v, key_padding_mask=None):
    """float64, one (batch, head) at a time, explicit positions: query i of T sits at S - T + i."""
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    out = torch.zeros(B, H, T, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            kh = h // (H // K)
            for i in range(T):
                keys = [j for j in range(S) if j <= S - T + i
                        and (key_padding_mask is None or key_padding_mask[b, j])]
                if not keys:
                    continue
                s = torch.stack([q[b, h, i].double() @ k[b, kh, j].double() for j in keys]) / math.sqrt(D)
                p = s.softmax(0)
                out[b, h, i] = sum(p[n] * v[b, kh, j].double() for n, j in enumerate(keys))
    return out


@pytest.mark.parametrize("H,K,T,S", [(4, 4, 7, 7), (6, 2, 9, 9), (6, 3, 5, 12), (4, 1, 1, 10)])
@pytest.mark.parametrize("impl", [ref.attention_naive, ref.attention_sdpa])
def test_attention_matches_a_float64_loop(impl, H, K, T, S):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, H, T, 8), torch.randn(2, K, S, 8), torch.randn(2, K, S, 8)
    got = impl(q, k, v, causal=True)
    assert got.shape == (2, H, T, 8) and got.dtype == q.dtype
    assert torch.allclose(got.double(), loop_attention(q, k, v), atol=1e-5)


@pytest.mark.parametrize("T,S", [(10, 10), (1, 10), (3, 10)])
def test_attention_with_left_padding(T, S):
    torch.manual_seed(1)
    H, K, D = 6, 2, 8
    q, k, v = torch.randn(3, H, T, D), torch.randn(3, K, S, D), torch.randn(3, K, S, D)
    mask = torch.ones(3, S, dtype=torch.bool)
    mask[0, :4] = False
    mask[2, :9] = False
    want = loop_attention(q, k, v, mask)
    for impl in (ref.attention_naive, ref.attention_sdpa):
        got = impl(q, k, v, causal=True, key_padding_mask=mask)
        assert torch.isfinite(got).all()  # a fully padded query row gives numbers (discarded), never NaN
        # compare the query rows that have at least one visible key
        for b in range(3):
            for i in range(T):
                if mask[b, : S - T + i + 1].any():
                    assert torch.allclose(got[b, :, i].double(), want[b, :, i], atol=1e-5), (impl, b, i)


def test_attention_gradients_agree():
    torch.manual_seed(2)
    qkv = [torch.randn(2, 6, 9, 8, requires_grad=True), torch.randn(2, 2, 9, 8, requires_grad=True),
           torch.randn(2, 2, 9, 8, requires_grad=True)]
    grads = []
    for impl in (ref.attention_naive, ref.attention_sdpa):
        out = impl(*qkv)
        g = torch.autograd.grad((out * torch.linspace(-1, 1, 8)).sum(), qkv)
        grads.append(g)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5)


def complex_rope(x, positions, theta):
    """RoPE as complex multiplication: pair (x[i], x[i + D/2]) is z_i = x_i + j x_{i+D/2}, rotated by
    e^{j pos theta^(-2i/D)} (rotate-half layout). positions [T] or [B, T]."""
    D = x.shape[-1]
    freqs = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    angles = positions.double()[..., None] * freqs  # [T, D/2] or [B, T, D/2]
    if angles.dim() == 3:
        angles = angles[:, None]
    z = torch.complex(x[..., : D // 2].double(), x[..., D // 2:].double()) * torch.polar(
        torch.ones_like(angles), angles)
    return torch.cat([z.real, z.imag], -1)


def test_rope_matches_complex_rotation():
    torch.manual_seed(3)
    q, k = torch.randn(2, 6, 11, 16), torch.randn(2, 2, 11, 16)
    cos, sin = ref.rope_cache(11, 16, theta=500.0, start=4)
    rq, rk = ref.rope(q, k, cos, sin)
    pos = torch.arange(4, 15)
    assert torch.allclose(rq.double(), complex_rope(q, pos, 500.0), atol=1e-5)
    assert torch.allclose(rk.double(), complex_rope(k, pos, 500.0), atol=1e-5)
    # per-row positions (left padding): cos/sin [B, T, D/2] gathered from one table
    rows = torch.tensor([[0] * 3 + list(range(8)), list(range(5, 16))])
    cos, sin = ref.rope_cache(20, 16, theta=500.0)
    rq, _ = ref.rope(q, k, cos[rows], sin[rows])
    assert torch.allclose(rq.double(), complex_rope(q, rows, 500.0), atol=1e-5)
    # a rotation keeps each pair's norm; bf16 in, bf16 out
    assert ref.rope(q.bfloat16(), k.bfloat16(), cos[:11], sin[:11])[0].dtype == torch.bfloat16


def test_rope_cache_matches_transformers():
    pytest.importorskip("transformers")  # a GPU image may lack it (scripts/gpu_check.sh runs tests/ops there)
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=500.0, max_position_embeddings=32)
    hf_cos, hf_sin = LlamaRotaryEmbedding(cfg)(torch.zeros(1, 32, 16), torch.arange(32)[None])
    cos, sin = ref.rope_cache(32, 16, theta=500.0)
    assert torch.allclose(hf_cos[0], torch.cat([cos, cos], -1), atol=1e-6)
    assert torch.allclose(hf_sin[0], torch.cat([sin, sin], -1), atol=1e-6)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-6), (torch.bfloat16, 0)])
def test_rms_norm_matches_transformers(dtype, atol):
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(4)
    hf = LlamaRMSNorm(37, eps=1e-5)
    with torch.no_grad():
        hf.weight.normal_(1.0, 0.3)
    hf = hf.to(dtype)
    x = (torch.randn(3, 5, 37) * 4).to(dtype)
    got = ref.rms_norm(x, hf.weight, 1e-5)
    assert got.dtype == dtype
    assert torch.allclose(got.float(), hf(x).float(), atol=atol)


def test_swiglu():
    a, b = torch.randn(4, 9), torch.randn(4, 9)
    assert torch.allclose(ref.swiglu(a, b), a * torch.sigmoid(a) * b, atol=1e-6)


def test_linear_cross_entropy():
    torch.manual_seed(5)
    h = torch.randn(12, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    y = torch.randint(0, 50, (12,))
    y[::3] = -100
    loss = ref.linear_cross_entropy(h, w, y)
    want = F.cross_entropy((h @ w.t()).double(), y, ignore_index=-100)
    assert torch.allclose(loss.double(), want, atol=1e-5)
    # every target ignored: 0, and backward still works (a batch of pure padding must not crash training)
    zero = ref.linear_cross_entropy(h, w, torch.full((12,), -100))
    zero.backward()
    assert zero.item() == 0.0 and h.grad is not None and h.grad.abs().sum() == 0
