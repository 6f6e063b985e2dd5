"""RMSNorm, `y = w * cast(x * rstd)` with `rstd = 1 / sqrt(mean(x^2) + eps)`, as Triton kernels.

Matches reference.rms_norm exactly in where it rounds: the statistics and the normalisation are fp32, the
normalised row is cast to x's dtype (as Hugging Face Llama does), then multiplied by the weight in the
promoted dtype of (x, w) (an fp32 weight with bf16 activations gives an fp32 output, like the reference).

Forward: one program per row; the whole row (C <= 64k) sits in registers as one block of next_pow2(C),
so x is read once. rstd [N] (fp32) is saved for the backward; x is saved, not y.

Backward, with xhat = x * rstd and n = cast(xhat) (the rounding is treated as identity in the gradient):

    g   = dy * w                                          (per element, fp32)
    dx  = rstd * (g - xhat * mean(g * xhat))              (d/dx of x * rstd(x); mean over the row)
    dw  = sum over rows of dy * n

dw is a reduction over all N rows: each program walks a contiguous stripe of rows, accumulates its own
fp32 partial dw[C] in registers, and writes it to partial[program]; the partials ([P, C], P ~ 4 x SMs)
are summed by one torch.sum. No atomics, so the result is deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from z2all.ops.triton import check_device


@triton.jit
def _rmsnorm_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, C, eps, stride_x, stride_y, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / C + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    n = (xf * rstd).to(x.dtype)  # the reference casts the normalised row back to x's dtype before w
    y = w.to(tl.float32) * n.to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rmsnorm_bwd(x_ptr, w_ptr, dy_ptr, rstd_ptr, dx_ptr, dw_part_ptr, N, C, rows_per_prog,
                 stride_x, stride_dy, stride_dx, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_C,), dtype=tl.float32)
    row0 = pid.to(tl.int64) * rows_per_prog  # int64 loop bounds -> int64 row offsets (N * C may pass 2^31)
    row_end = tl.minimum(row0 + rows_per_prog, N)
    for row in range(row0, row_end):
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        xf = x.to(tl.float32)
        dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        xhat = xf * rstd
        g = dy * w
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / C))
        tl.store(dx_ptr + row * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += dy * xhat.to(x.dtype).to(tl.float32)
    tl.store(dw_part_ptr + pid * C + cols, dw, mask=mask)


def _num_warps(block_c: int) -> int:
    return min(max(block_c // 256, 1), 16)


def _n_programs(n_rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_rows, 4 * sms))
    return max(1, min(n_rows, 4))


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        shape = x.shape
        C = shape[-1]
        x2 = x.reshape(-1, C)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        N = x2.shape[0]
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
        y = torch.empty((N, C), dtype=out_dtype, device=x.device)
        rstd = torch.empty(N, dtype=torch.float32, device=x.device)
        block_c = triton.next_power_of_2(C)
        if N:
            _rmsnorm_fwd[(N,)](x2, weight, y, rstd, C, eps, x2.stride(0), y.stride(0),
                               BLOCK_C=block_c, num_warps=_num_warps(block_c))
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        N, C = x2.shape
        dy2 = dy.reshape(-1, C)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = torch.empty_like(x2)
        P = _n_programs(N, x2.device)
        dw_part = torch.empty((P, C), dtype=torch.float32, device=x2.device)
        block_c = triton.next_power_of_2(C)
        if N:
            _rmsnorm_bwd[(P,)](x2, weight, dy2, rstd, dx, dw_part, N, C, triton.cdiv(N, P),
                               x2.stride(0), dy2.stride(0), dx.stride(0),
                               BLOCK_C=block_c, num_warps=_num_warps(block_c))
            dw = dw_part.sum(0).to(weight.dtype)
        else:
            dw = torch.zeros_like(weight)
        return dx.view(ctx.shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm over the last dim of x[..., C] with weight[C] (see reference.rms_norm)."""
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not match x[..., {x.shape[-1]}]")
    check_device(x, weight)
    return _RMSNorm.apply(x, weight, float(eps))
