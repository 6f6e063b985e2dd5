"""The document-aware (segment ids / varlen) Triton flash attention vs reference.attention_naive with the same
segment_ids: output and dq, dk, dv, fp32 and fp16 (+ bf16 on a GPU), both backward passes (split and atomic
dQ), on small odd shapes: GQA, several segments per row including length-1 segments, rows with different
segmentations, ids reused in two runs, long examples (the unmasked in-segment path), causal and non-causal,
unequal block shapes; plus: blocks outside a query block's segments are never read (poisoned with NaN), the
segment-bounds helper against brute force, the argument checks, a tiny model on packed rows (triton ==
naive, loss and gradients) and the `bench kernels --ops=attention_varlen` rows on CPU. On CPU through the
interpreter, on a CUDA machine the compiled kernels (ops_helpers).

Tolerances as tests/ops/test_triton_attention.py: fp32 1e-4, fp16 1e-2.
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


def _segments(lengths: list[int], ids: list[int] | None = None) -> list[int]:
    ids = ids if ids is not None else list(range(len(lengths)))
    return [i for i, n in zip(ids, lengths) for _ in range(n)]


# rows of segment ids, T = their length: packed examples of odd lengths, length-1 examples, a padding tail
SEGS = {
    "gqa3-len1": [_segments([5, 1, 1, 19, 1, 10])],                          # T = 37
    "two-rows": [_segments([12, 3, 30]), _segments([1, 44])],               # T = 45, rows differ
    "ids-any": [_segments([4, 9, 1, 15], ids=[7, -3, 0, 2**30])],           # T = 29, unsorted ids
    "one-seg": [_segments([19])],                                           # T = 19: == plain causal
    "reused-id": [_segments([6, 10, 8, 9], ids=[1, 2, 1, 3])],              # T = 33: id 1 in two runs
    # long examples: blocks inside every row's segment take the unmasked path (in both directions)
    "long": [_segments([3, 70, 1, 6]), _segments([20, 5, 40, 15], ids=[1, 2, 1, 0])],  # T = 80, id 1 twice
}


def _run(fn, q, k, v, causal, seg, seed=0):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o = fn(q, k, v, causal=causal, segment_ids=seg)
    g = torch.randn(o.shape, generator=torch.Generator().manual_seed(seed)).to(o.device, o.dtype)
    return (o, *torch.autograd.grad(o, (q, k, v), g))


def _check(H, K, D, rows, causal, dtype, bwd="split"):
    torch.manual_seed(0)
    seg = torch.tensor(rows, dtype=torch.int32, device=DEV)
    B, T = seg.shape
    q = torch.randn(B, T, H, D).to(DEV, dtype).transpose(1, 2)  # strided, as the model passes it
    k, v = torch.randn(B, K, T, D).to(DEV, dtype), torch.randn(B, K, T, D).to(DEV, dtype)
    tol = TOL[dtype]
    ref, ours = _run(R.attention_naive, q, k, v, causal, seg), _run(BWD[bwd], q, k, v, causal, seg)
    for name, r, o in zip(("out", "dq", "dk", "dv"), ref, ours):
        assert o.shape == r.shape and o.dtype == r.dtype, name
        torch.testing.assert_close(o.float(), r.float(), atol=tol, rtol=tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("bwd", list(BWD))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,K,D,segs,causal", [
    (3, 1, 16, "gqa3-len1", True),
    (2, 2, 32, "two-rows", True),
    (2, 1, 24, "ids-any", False),    # non-causal: whole segments, head dim not a power of two
    (2, 1, 16, "reused-id", True),
    (4, 2, 16, "long", True),
])
def test_varlen_matches_reference(H, K, D, segs, causal, dtype, bwd):
    _check(H, K, D, SEGS[segs], causal, dtype, bwd)


@pytest.mark.parametrize("bwd", list(BWD))
def test_varlen_one_segment_is_plain_attention(bwd):
    _check(2, 1, 64, SEGS["one-seg"], True, torch.float32, bwd)
    _check(2, 2, 16, SEGS["reused-id"], False, torch.float32, bwd)
    _check(2, 1, 16, SEGS["long"], False, torch.float32, bwd)


@pytest.fixture
def blocks(monkeypatch, request):
    """Every attention kernel with BLOCK_M x BLOCK_N = request.param (GPU configs are not square)."""
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
def test_varlen_unequal_blocks(blocks):
    rows = [_segments([17, 1, 20, 12, 1]), _segments([33, 18])]  # T = 51
    for bwd in BWD:
        _check(2, 1, 16, rows, True, torch.float32, bwd)
    _check(2, 1, 16, rows, False, torch.float32)


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # the interpreter's max over the poisoned rows
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("bwd", list(BWD))
def test_varlen_skips_blocks_of_other_segments(bwd, causal):
    """Two 32-position examples (two 16-blocks each): the second example's query blocks must not read the
    first's key blocks and vice versa for dK/dV, so NaN there cannot reach its outputs and gradients (a
    visited block, even fully masked, would turn NaN into NaN through P V or dS K)."""
    torch.manual_seed(0)
    H, K, T, D = 2, 1, 64, 16
    seg = torch.tensor([_segments([32, 32])], dtype=torch.int32, device=DEV)
    q, k, v = (torch.randn(1, n, T, D, device=DEV) for n in (H, K, K))
    fn = BWD[bwd]
    ref = _run(R.attention_naive, q, k, v, causal, seg)
    poisoned = []
    for t in (q, k, v):
        t = t.clone()
        t[:, :, :32] = float("nan")
        poisoned.append(t)
    o, dq, dk, dv = _run(fn, *poisoned, causal, seg)
    for name, r, x in zip(("out", "dq", "dk", "dv"), ref, (o, dq, dk, dv)):
        torch.testing.assert_close(x[:, :, 32:], r[:, :, 32:], atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_segment_bounds_match_brute_force():
    g = torch.Generator().manual_seed(0)
    seg = torch.randint(-2, 4, (3, 40), generator=g, dtype=torch.int32)  # ids reused in many runs
    seg[1] = torch.tensor(_segments([1, 7, 1, 1, 30]), dtype=torch.int32)
    bounds = A._segment_bounds(seg)
    assert bounds.dtype == torch.int32 and bounds.shape == (3, 4, 40)
    for b in range(seg.shape[0]):
        row = seg[b].tolist()
        for i, s in enumerate(row):
            where = [j for j, t in enumerate(row) if t == s]
            start = i
            while start and row[start - 1] == s:
                start -= 1
            end = i + 1
            while end < len(row) and row[end] == s:
                end += 1
            assert bounds[b, :, i].tolist() == [where[0], where[-1] + 1, start, end], (b, i)


def test_varlen_argument_checks():
    q, kv = torch.zeros(1, 2, 8, 16), torch.zeros(1, 1, 8, 16)
    with pytest.raises(ValueError, match="T == S"):
        A.attention(q, torch.zeros(1, 1, 9, 16), torch.zeros(1, 1, 9, 16), segment_ids=torch.zeros(1, 8))
    with pytest.raises(ValueError, match="T == S"):
        A.attention(q, kv, kv, segment_ids=torch.zeros(1, 7, dtype=torch.int32))
    with pytest.raises(ValueError, match="integers"):
        A.attention(q, kv, kv, segment_ids=torch.zeros(1, 8))


def test_varlen_with_padding_mask_falls_back_to_sdpa():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 6, 16, device=DEV), torch.randn(1, 1, 6, 16, device=DEV), torch.randn(1, 1, 6, 16,
                                                                                                     device=DEV)
    seg = torch.tensor([[0, 0, 1, 1, 1, 1]], dtype=torch.int32, device=DEV)
    mask = torch.ones(1, 6, dtype=torch.bool, device=DEV)
    out = A.attention(q, k, v, key_padding_mask=mask, segment_ids=seg)
    torch.testing.assert_close(out, R.attention_naive(q, k, v, segment_ids=seg), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("bwd", list(BWD))
def test_varlen_bf16_gpu(bwd):
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(2):  # packed rows of 1000 positions, examples of 1..300 tokens
        lengths, left = [], 1000
        while left:
            n = min(left, int(torch.randint(1, 300, (1,), generator=g)))
            lengths.append(n)
            left -= n
        rows.append(_segments(lengths))
    _check(8, 2, 64, rows, True, torch.bfloat16, bwd)


def test_bench_kernels_varlen_rows_on_cpu(tmp_path):
    """`bench kernels --ops=attention_varlen` at a tiny shape: eager and SDPA (block mask) measured, the Triton
    rows (varlen split/atomic and the segment-blind causal baseline) say they need a GPU."""
    from z2all.bench.kernels import Config, run

    out = tmp_path / "k.md"
    cfg = Config(ops="attention_varlen", size="cpu", batch=1, seq=32, dim=32, n_heads=2, n_kv_heads=1, doc_len=5,
                 device="cpu", warmup=0, iters=1, compile=False, out=str(out))
    assert run(cfg) == 0
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in out.read_text().splitlines()
            if ln.startswith("| attention varlen")]
    assert [r[1] for r in rows] == ["eager", "triton", "triton-atomic", "sdpa", "triton-causal"]
    by = {r[1]: r for r in rows}
    assert float(by["eager"][2]) > 0 and float(by["sdpa"][7]) > 0
    assert all("needs a GPU" in by[n][8] for n in ("triton", "triton-atomic", "triton-causal"))


@pytest.mark.parametrize("bwd", list(BWD))
def test_model_packed_rows_triton_equals_naive(bwd):
    """A tiny model on packed rows (positions restarting, segment ids): attention=triton gives the loss and
    parameter gradients of attention=naive, with either backward (what `z2all sft` trains)."""
    from z2all.model.config import model_preset
    from z2all.model.llama import Z2all
    from z2all.ops import OpsConfig

    torch.manual_seed(0)
    cfg = model_preset("tiny", vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    T, rows = 36, [[7, 1, 25, 3], [36]]  # example lengths per row: four examples (one of length 1), one
    seg = torch.tensor([_segments(r) for r in rows], dtype=torch.int32, device=DEV)
    pos = torch.tensor([[p for n in r for p in range(n)] for r in rows], device=DEV)
    x = torch.randint(0, 96, (2, T), device=DEV)
    y = torch.randint(0, 96, (2, T), device=DEV)
    results = []
    for ops in (OpsConfig(attention="naive"), OpsConfig(attention="triton", attention_bwd=bwd)):
        torch.manual_seed(1)
        model = Z2all(cfg, ops).to(DEV)
        _, loss = model(x, y, positions=pos, segment_ids=seg)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (ref_loss, ref_grads), (loss, grads) = results
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
