"""Plain PyTorch of every op the model uses: the readable spec that every kernel is tested against.

Shapes (B batch, T query length, S key length, H query heads, K kv heads, D head dim, C hidden, V vocab):

    rms_norm(x[..., C], w[C], eps)            y = w * (x / sqrt(mean(x^2) + eps)), computed in fp32,
                                               normalised x cast back to x.dtype before the weight (as HF)
    rope(q[B,H,T,D], k[B,K,T,D], cos, sin)    rotate-half layout (the Hugging Face Llama layout, so weights
                                               map 1:1 with no permutation): x = [x1, x2] halves of D,
                                               out = [x1*cos - x2*sin, x2*cos + x1*sin];
                                               cos/sin are [T, D/2] or [B, T, D/2] (per-row positions), fp32
    swiglu(a, b)                               silu(a) * b
    attention(q[B,H,T,D], k[B,K,S,D], v)      softmax(q k^T / sqrt(D) + mask) v with GQA (head h reads kv
                                               head h // (H/K)); causal mask aligned bottom-right, i.e.
                                               query i sits at position S - T + i (KV-cache decoding);
                                               optional key_padding_mask[B, S] (True = attend);
                                               optional segment_ids[B, T] (int32, T == S, packed rows):
                                               query i attends key j only when segment_ids[b, i] ==
                                               segment_ids[b, j] (and j <= i when causal), so packed
                                               examples never see each other (block-diagonal causal mask)
    linear_cross_entropy(h[N,C], w[V,C], y[N]) mean over y != ignore_index of -log softmax(h w^T)[y],
                                               logits in fp32; 0 when no target is valid

Two attention references: `attention_naive` materialises the [B,H,T,S] score matrix (the "naive" row of
the original llm-zero2all project's ablation) and `attention_sdpa` calls
`torch.nn.functional.scaled_dot_product_attention`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [B, H, T, D]; cos/sin [T, D/2] or [B, T, D/2] -> broadcast over heads
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def rope_cache(seq_len: int, head_dim: int, theta: float = 10000.0, device=None,
               start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [seq_len, head_dim/2] in fp32 for positions start..start+seq_len-1."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    pos = torch.arange(start, start + seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)
    return freqs.cos(), freqs.sin()


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.silu(a) * b


def _expand_kv(k: torch.Tensor, n_heads: int) -> torch.Tensor:
    rep = n_heads // k.shape[1]
    return k if rep == 1 else k.repeat_interleave(rep, dim=1)


def _mask(T: int, S: int, causal: bool, key_padding_mask: torch.Tensor | None, device,
          segment_ids: torch.Tensor | None = None) -> torch.Tensor | None:
    """Boolean keep-mask broadcastable to [B, H, T, S], or None when everything is attended."""
    keep = None
    if segment_ids is not None:
        if T != S or segment_ids.shape[-1] != T:
            raise ValueError(f"segment_ids [B, T] needs T == S (packed training rows), got T={T}, S={S}, "
                             f"segment_ids {list(segment_ids.shape)}")
        keep = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # [B, 1, T, T]
    if causal:
        i = torch.arange(T, device=device)[:, None] + (S - T)
        j = torch.arange(S, device=device)[None, :]
        tri = (j <= i)[None, None]
        keep = tri if keep is None else keep & tri
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, None, :].bool()
        keep = pad if keep is None else keep & pad
    return keep


def attention_naive(q, k, v, causal: bool = True, key_padding_mask: torch.Tensor | None = None,
                    segment_ids: torch.Tensor | None = None):
    B, H, T, D = q.shape
    S = k.shape[2]
    k, v = _expand_kv(k, H), _expand_kv(v, H)
    scores = (q.float() @ k.float().transpose(-1, -2)) * (1.0 / math.sqrt(D))
    keep = _mask(T, S, causal, key_padding_mask, q.device, segment_ids)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    p = torch.nan_to_num(p)  # a fully masked row (padding query) gives zeros, not NaN
    return (p @ v.float()).to(q.dtype)


def attention_sdpa(q, k, v, causal: bool = True, key_padding_mask: torch.Tensor | None = None,
                   segment_ids: torch.Tensor | None = None):
    H, T, S = q.shape[1], q.shape[2], k.shape[2]
    gqa = k.shape[1] != H
    if key_padding_mask is None and segment_ids is None and (not causal or T == S):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and T > 1, enable_gqa=gqa)
    # packed rows: SDPA with the block-diagonal causal mask (a boolean attn_mask; on GPU this takes the
    # memory-efficient path, O(T^2) mask memory per row -- the Triton kernel skips whole blocks instead)
    keep = _mask(T, S, causal, key_padding_mask, q.device, segment_ids)
    # a row with no key to attend (left padding) would be NaN; let it see key 0 and discard it later
    keep = keep | (~keep.any(-1, keepdim=True))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=gqa)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100) -> torch.Tensor:
    logits = (h @ weight.t()).float()
    valid = targets != ignore_index
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, targets, ignore_index=ignore_index)
