"""SwiGLU gate, `silu(a) * b`, as one pointwise Triton kernel forward and one backward.

Math (s = sigmoid(a), computed in fp32, stored in the input dtype):

    c  = a * s * b
    da = dc * b * s * (1 + a * (1 - s))        d silu(a)/da = s + a s (1 - s)
    db = dc * a * s

The backward recomputes s from a (saving it would cost one more activation-sized tensor per layer; the
recompute is free next to the memory traffic). Both kernels read/write each element once, so they are
bandwidth bound: the forward moves 3 tensors, the backward 5, versus eager PyTorch's silu + mul (+ their
backward) that round-trips the intermediate silu(a) through memory.

Inputs are made contiguous deliberately (the MLP's gate/up projections are contiguous already; a
non-contiguous caller pays one copy rather than every kernel paying strided addressing).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from z2all.ops.triton import INTERPRET, check_device

BLOCK = 1024 if not INTERPRET else 256


@triton.jit
def _swiglu_fwd(a_ptr, b_ptr, c_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    c = a * tl.sigmoid(a) * b
    tl.store(c_ptr + offs, c.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(a_ptr, b_ptr, dc_ptr, da_ptr, db_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dc = tl.load(dc_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    silu = a * s
    da = dc * b * (s + silu * (1.0 - s))
    db = dc * silu
    tl.store(da_ptr + offs, da.to(da_ptr.dtype.element_ty), mask=mask)
    tl.store(db_ptr + offs, db.to(db_ptr.dtype.element_ty), mask=mask)


def _launch_grid(n: int):
    return (triton.cdiv(n, BLOCK),)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = a.contiguous(), b.contiguous()
        c = torch.empty_like(a)
        n = a.numel()
        if n:
            _swiglu_fwd[_launch_grid(n)](a, b, c, n, BLOCK=BLOCK, num_warps=4)
        ctx.save_for_backward(a, b)
        return c

    @staticmethod
    def backward(ctx, dc: torch.Tensor):
        a, b = ctx.saved_tensors
        dc = dc.contiguous()
        da, db = torch.empty_like(a), torch.empty_like(b)
        n = a.numel()
        if n:
            _swiglu_bwd[_launch_grid(n)](a, b, dc, da, db, n, BLOCK=BLOCK, num_warps=4)
        return da, db


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b; a and b of the same shape and dtype (see reference.swiglu)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"swiglu: a and b must match, got {tuple(a.shape)} {a.dtype} and {tuple(b.shape)} {b.dtype}")
    check_device(a, b)
    return _SwiGLU.apply(a, b)
