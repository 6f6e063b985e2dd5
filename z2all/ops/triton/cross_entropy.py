"""Fused LM head + cross-entropy, chunked over tokens: `mean_i -log softmax(h_i W^T)[y_i]` without ever
holding the full [N, V] logits.

Why: at seq 2048 x batch 8 and vocab 64k, the eager path holds the logits (16k x 64k in bf16 = 2 GiB), their
fp32 upcast (4 GiB) and softmax's saved output and gradient (4 GiB each): the largest activation of the
whole model. Here only one chunk of logits exists at a time, and it is turned into its own gradient in place.

Forward (which also computes the input gradients, as the loss is a scalar at the end of the graph):

    for each chunk of rows h_c [n, C]:
        z   = h_c W^T                      [n, V] in h's dtype (cuBLAS, fp32 accumulation)
        kernel, one program per row (fp32):
            lse_i  = log sum_v exp(z_iv)                        online max/sum over V in blocks
            loss_i = lse_i - z_i,y_i    (0 when y_i == ignore_index)
            z_iv  <- (softmax(z_i)_v - [v == y_i]) / n_valid    written over z: dLoss/dz (0 rows if ignored)
        grad_h[c]  = z W                   [n, C]
        grad_W    += z^T h_c               [V, C], fp32 accumulator
    loss = sum_i loss_i / max(n_valid, 1)      (0, with zero gradients, when no target is valid)

Backward only multiplies the saved grad_h / grad_W by the incoming scalar gradient. n_valid stays a device
tensor (no host sync). When no input needs a gradient (evaluation) the kernel skips the gradient pass.

Memory: one chunk of logits (CHUNK_BYTES, 256 MiB by default: 2048 rows at vocab 64k in bf16) + grad_h
[N, C] + grad_W in fp32 [V, C] (plus one [V, C] temporary per chunk when W is 16-bit) instead of several
[N, V] tensors. The chunk size is also a matmul-efficiency trade-off: >= 1k rows keeps the GEMMs on the
tensor cores' roofline.

Under autocast the inputs are cast to the autocast dtype first (as autocast would cast the eager matmul), so
the gradient of an fp32 master weight flows back through that cast. Targets must be in [0, V) or
ignore_index; an out-of-range target is not checked on the device (that would need a host sync).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from z2all.ops.triton import INTERPRET, check_device

CHUNK_BYTES = 256 * 2**20  # bytes of one chunk of logits; tests lower it to exercise several chunks
BLOCK_V = 4096 if not INTERPRET else 64


@triton.jit
def _ce_kernel(z_ptr, y_ptr, loss_ptr, n_valid_ptr, V, stride_z, ignore_index,
               WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    cols = tl.arange(0, BLOCK_V)
    # pass 1: per-lane online max / sum of exp. A finite sentinel (not -inf) keeps never-valid tail lanes
    # from producing inf - inf = NaN; their contribution vanishes when the lanes are combined.
    m = tl.full((BLOCK_V,), -1e30, dtype=tl.float32)
    s = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        v = v0 + cols
        z = tl.load(z_row + v, mask=v < V, other=0.0).to(tl.float32)
        z = tl.where(v < V, z, -1e30)  # (not other=-1e30: that would overflow a 16-bit load)
        m_new = tl.maximum(m, z)
        s = s * tl.exp(m - m_new) + tl.exp(z - m_new)
        m = m_new
    m_row = tl.max(m, axis=0)
    lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), axis=0))

    y = tl.load(y_ptr + row).to(tl.int64)
    valid = y != ignore_index
    y_safe = tl.where(valid, y, 0)
    z_y = tl.load(z_row + y_safe).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - z_y, 0.0))

    if WRITE_GRAD:
        n_valid = tl.load(n_valid_ptr)
        scale = tl.where(valid, 1.0 / n_valid, 0.0)
        for v0 in range(0, V, BLOCK_V):
            v = v0 + cols
            mask = v < V
            z = tl.load(z_row + v, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(z - lse) * scale
            g = tl.where(v == y, g - scale, g)
            tl.store(z_row + v, g.to(z_ptr.dtype.element_ty), mask=mask)


def _chunk_rows(N: int, V: int, elt: int) -> int:
    rows = max(16, CHUNK_BYTES // max(1, V * elt))
    rows = 1 << (rows.bit_length() - 1)  # a power of two: stable GEMM shapes from chunk to chunk
    return max(1, min(N, rows))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int):
        N, C = h.shape
        V = weight.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        write_grad = need_h or need_w
        h = h.contiguous()
        targets = targets.contiguous()
        n_valid = (targets != ignore_index).sum().clamp_(min=1).to(torch.float32)
        loss_rows = torch.empty(N, dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros((V, C), dtype=torch.float32, device=h.device) if need_w else None
        rows = _chunk_rows(N, V, h.element_size())
        for s in range(0, N, rows):
            e = min(N, s + rows)
            hc = h[s:e]
            z = hc @ weight.t()  # [n, V]
            _ce_kernel[(e - s,)](z, targets[s:e], loss_rows[s:e], n_valid, V, z.stride(0), ignore_index,
                                 WRITE_GRAD=write_grad, BLOCK_V=BLOCK_V, num_warps=8 if not INTERPRET else 1)
            if need_h:
                torch.mm(z, weight, out=grad_h[s:e])
            if need_w:
                if weight.dtype == torch.float32:
                    grad_w.addmm_(z.t(), hc)
                else:
                    grad_w.add_(z.t() @ hc)  # fp32 accumulation across chunks of a 16-bit product
            del z
        loss = loss_rows.sum() / n_valid
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, dloss: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * dloss.to(grad_h.dtype) if ctx.needs_input_grad[0] else None
        dw = grad_w * dloss.to(grad_w.dtype) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of softmax(h[N,C] weight[V,C]^T) against targets[N], skipping ignore_index
    (see reference.linear_cross_entropy); a 0-dim fp32 tensor."""
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1] or targets.shape != (h.shape[0],):
        raise ValueError(f"linear_cross_entropy: want h[N,C], weight[V,C], targets[N]; got {tuple(h.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(targets.shape)}")
    check_device(h, weight, targets)
    if torch.is_autocast_enabled(h.device.type):
        dt = torch.get_autocast_dtype(h.device.type)
        h, weight = h.to(dt), weight.to(dt)
    if h.dtype != weight.dtype:
        raise ValueError(f"linear_cross_entropy: h is {h.dtype} but weight is {weight.dtype}")
    return _LinearCrossEntropy.apply(h, weight, targets, int(ignore_index))
