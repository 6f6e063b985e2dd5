"""Triton fused linear cross-entropy vs reference.linear_cross_entropy: loss and the gradients of h and of
the LM-head weight, fp32 and fp16 (+ bf16 on a GPU, ops_helpers), odd shapes (vocab not a multiple of the
kernel's block, several token chunks), ignore_index, no valid target, and evaluation without gradients.

Tolerances: fp32 atol = rtol = 1e-5; fp16 atol = rtol = 5e-3 (the reference also rounds the logits to fp16
before its fp32 softmax; our gradient passes through fp16 dlogits once per chunk, as any fp16 matmul does).
"""

from __future__ import annotations

import pytest
import torch
from ops_helpers import DEV, DTYPES

from z2all.ops import reference as R

pytest.importorskip("triton")
from z2all.ops.triton import cross_entropy as CE  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _run(fn, h, w, y):
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = fn(h, w, y)
    gh, gw = torch.autograd.grad(loss * 1.7, (h, w))  # a non-unit upstream gradient
    return loss, gh, gw


def _check(h, w, y, dtype):
    tol = TOL[dtype]
    ref, ours = _run(R.linear_cross_entropy, h, w, y), _run(CE.linear_cross_entropy, h, w, y)
    assert ours[0].dtype == torch.float32 and ours[0].dim() == 0
    for name, r, o in zip(("loss", "grad h", "grad weight"), ref, ours):
        assert o.dtype == r.dtype, name
        torch.testing.assert_close(o.float(), r.float(), atol=tol, rtol=tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 4 rows at V=100 fp32, so N=13 runs as 4 chunks with a ragged last one."""
    monkeypatch.setattr(CE, "CHUNK_BYTES", 4 * 100 * 4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,C,V", [(13, 24, 100), (5, 40, 257)])
def test_linear_ce_matches_reference(N, C, V, dtype, small_chunks):
    torch.manual_seed(0)
    h = torch.randn(N, C).to(DEV, dtype)
    w = (torch.randn(V, C) * 0.3).to(DEV, dtype)
    y = torch.randint(0, V, (N,), device=DEV)
    y[1] = -100
    y[N - 1] = -100
    _check(h, w, y, dtype)


def test_linear_ce_custom_ignore_index(small_chunks):
    torch.manual_seed(1)
    h, w = torch.randn(9, 16, device=DEV), torch.randn(100, 16, device=DEV)
    y = torch.randint(0, 100, (9,), device=DEV)
    y[::2] = 7  # token 7 is "ignored" (e.g. a pad id)
    f_ref = lambda h, w, y: R.linear_cross_entropy(h, w, y, ignore_index=7)
    f_our = lambda h, w, y: CE.linear_cross_entropy(h, w, y, ignore_index=7)
    ref, ours = _run(f_ref, h, w, y), _run(f_our, h, w, y)
    for r, o in zip(ref, ours):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)


def test_linear_ce_no_valid_target_is_zero():
    h, w = torch.randn(6, 8, device=DEV), torch.randn(50, 8, device=DEV)
    y = torch.full((6,), -100, device=DEV)
    loss, gh, gw = _run(CE.linear_cross_entropy, h, w, y)
    assert loss.item() == 0.0
    assert torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0


def test_linear_ce_without_grad_matches():
    torch.manual_seed(2)
    h, w = torch.randn(11, 12, device=DEV), torch.randn(70, 12, device=DEV)
    y = torch.randint(0, 70, (11,), device=DEV)
    with torch.no_grad():
        torch.testing.assert_close(CE.linear_cross_entropy(h, w, y), R.linear_cross_entropy(h, w, y),
                                   atol=1e-5, rtol=1e-5)


def test_linear_ce_only_weight_grad(small_chunks):
    """h without requires_grad (a frozen trunk): only the weight gets a gradient, and it is still right."""
    torch.manual_seed(3)
    h, w = torch.randn(13, 24, device=DEV), torch.randn(100, 24, device=DEV, requires_grad=True)
    y = torch.randint(0, 100, (13,), device=DEV)
    (g_ours,) = torch.autograd.grad(CE.linear_cross_entropy(h, w, y), (w,))
    (g_ref,) = torch.autograd.grad(R.linear_cross_entropy(h, w, y), (w,))
    torch.testing.assert_close(g_ours, g_ref, atol=1e-5, rtol=1e-5)


def test_linear_ce_under_autocast_feeds_fp32_master_weights(small_chunks):
    """Mixed precision: fp32 h and weight under autocast run in the autocast dtype (fp16 here; bf16 on GPU),
    and the gradients come back in fp32 for the fp32 parameters, as the eager matmul's would."""
    torch.manual_seed(4)
    h, w = torch.randn(13, 24, device=DEV), torch.randn(100, 24, device=DEV) * 0.3
    y = torch.randint(0, 100, (13,), device=DEV)
    res = []
    for fn in (R.linear_cross_entropy, CE.linear_cross_entropy):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast(torch.device(DEV).type, dtype=torch.float16):
            loss = fn(hh, ww, y)
        res.append((loss, *torch.autograd.grad(loss, (hh, ww))))
    for r, o in zip(*res):
        assert o.dtype == r.dtype == torch.float32
        torch.testing.assert_close(o, r, atol=5e-3, rtol=5e-3)


def test_chunk_rows_bounds_logits_memory():
    assert CE._chunk_rows(16384, 65536, 2) == 2048  # 2048 x 64k bf16 = 256 MiB
    assert CE._chunk_rows(10, 65536, 2) == 10
    assert CE._chunk_rows(10**6, 10**7, 4) == 16  # never below 16 rows


def test_linear_ce_shape_errors():
    with pytest.raises(ValueError, match="h\\[N,C\\]"):
        CE.linear_cross_entropy(torch.zeros(3, 4), torch.zeros(5, 3), torch.zeros(3, dtype=torch.long))


@pytest.mark.gpu
def test_linear_ce_bf16_gpu():
    torch.manual_seed(0)
    dt = torch.bfloat16
    h = torch.randn(1000, 256).to(DEV, dt)
    w = (torch.randn(32000, 256) * 0.05).to(DEV, dt)
    y = torch.randint(0, 32000, (1000,), device=DEV)
    y[::7] = -100
    _check(h, w, y, dt)
