"""Rotary position embedding of q and k (rotate-half layout, the Hugging Face Llama one) as Triton kernels.

With x = [x1, x2] the two halves of a head's D features and (cos, sin) the per-position tables [.., D/2]:

    forward:   y1 = x1 cos - x2 sin          y2 = x2 cos + x1 sin          (a rotation by +theta)
    backward:  dx1 = dy1 cos + dy2 sin       dx2 = dy2 cos - dy1 sin       (the transpose: rotation by -theta)

so one kernel does both, with SIGN = +1 / -1 applied to sin. cos/sin are constants (no gradient).

Layout: one program per (batch, position) row; it loads that row's cos/sin once ([D/2] fp32; [T, D/2] tables
are shared across the batch, [B, T, D/2] tables give each sequence its own positions, e.g. left-padded
generation) and rotates every head of q (then k) in blocks of heads, in fp32, storing in the input dtype.
Inputs are read through their strides, so q/k straight from `x.view(B, T, H, D).transpose(1, 2)` need no
copy; outputs are contiguous [B, H, T, D] (what attention wants).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from z2all.ops.triton import check_device


@triton.jit
def _rope_kernel(x_ptr, y_ptr, cos_ptr, sin_ptr, T, NH, HALF,
                 sxb, sxh, sxt, sxd, syb, syh, syt, scb, sct,
                 SIGN: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // T
    t = pid % T
    d = tl.arange(0, BLOCK_HALF)
    dmask = d < HALF
    cos = tl.load(cos_ptr + b * scb + t * sct + d, mask=dmask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + b * scb + t * sct + d, mask=dmask, other=0.0).to(tl.float32) * SIGN
    x_row = x_ptr + b * sxb + t * sxt
    y_row = y_ptr + b * syb + t * syt
    for h0 in range(0, NH, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        m = (h[:, None] < NH) & dmask[None, :]
        xo = h[:, None] * sxh + d[None, :] * sxd
        x1 = tl.load(x_row + xo, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + xo + HALF * sxd, mask=m, other=0.0).to(tl.float32)
        y1 = x1 * cos[None, :] - x2 * sin[None, :]
        y2 = x2 * cos[None, :] + x1 * sin[None, :]
        yo = h[:, None] * syh + d[None, :]
        tl.store(y_row + yo, y1.to(y_ptr.dtype.element_ty), mask=m)
        tl.store(y_row + yo + HALF, y2.to(y_ptr.dtype.element_ty), mask=m)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: int) -> torch.Tensor:
    B, NH, T, D = x.shape
    y = torch.empty((B, NH, T, D), dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return y
    half = D // 2
    block_half = triton.next_power_of_2(half)
    block_h = max(1, min(triton.next_power_of_2(NH), 4096 // block_half))
    scb = cos.stride(0) if cos.dim() == 3 and cos.shape[0] > 1 else 0  # [1, T, D/2] broadcasts too
    sct = cos.stride(-2)
    _rope_kernel[(B * T,)](x, y, cos, sin, T, NH, half,
                           x.stride(0), x.stride(1), x.stride(2), x.stride(3),
                           y.stride(0), y.stride(1), y.stride(2), scb, sct,
                           SIGN=sign, BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=4)
    return y


class _RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(q, cos, sin, 1), _rotate(k, cos, sin, 1)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq = None if dq is None else _rotate(dq, cos, sin, -1)
        dk = None if dk is None else _rotate(dk, cos, sin, -1)
        return dq, dk, None, None


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q[B,H,T,D] and k[B,K,T,D] by cos/sin [T, D/2] or [B, T, D/2]; returns (q, k) (see reference.rope)."""
    B, _, T, D = q.shape
    if D % 2 or k.shape[0] != B or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"rope: q {tuple(q.shape)} and k {tuple(k.shape)} must be [B,H,T,D], [B,K,T,D] with even D")
    want = (T, D // 2) if cos.dim() == 2 else (cos.shape[0] if cos.shape[0] == 1 else B, T, D // 2)
    if tuple(cos.shape) != want or cos.shape != sin.shape:
        raise ValueError(f"rope: cos/sin {tuple(cos.shape)}/{tuple(sin.shape)} must be [T, D/2] or [B, T, D/2] "
                         f"= {want} for q {tuple(q.shape)}")
    check_device(q, k, cos, sin)
    # tables are tiny; fp32 and unit stride on the last dim is what the kernel reads
    cos = cos.detach().float().contiguous()
    sin = sin.detach().float().contiguous()
    return _RoPE.apply(q, k, cos, sin)
