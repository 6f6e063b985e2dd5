"""Packing without cross-contamination: the reference attention's segment_ids path equals attention run per
example; a packed batch gives the same loss and parameter gradients as its examples run one by one (fp32,
tiny model, RoPE positions restarting per example); targets exist only on assistant tokens; padding rows
are the simple baseline with the same targets; the row stream is a pure function of (step, micro) and does
not depend on the process/accumulation split."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sft_helpers import make_sft_inputs

from z2all.data.chat import ChatData
from z2all.data.sft_loader import IGNORE, SFTBatches, pack_rows, sft_loss
from z2all.model.config import model_preset
from z2all.model.llama import Z2all
from z2all.ops import OpsConfig
from z2all.ops.reference import attention_naive, attention_sdpa


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_sft_inputs(tmp_path_factory.mktemp("sft_pack"))


@pytest.mark.parametrize("fn", [attention_naive, attention_sdpa])
def test_segment_attention_equals_per_example(fn):
    torch.manual_seed(0)
    B, H, K, T, D = 2, 4, 2, 12, 8
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, K, T, D), torch.randn(B, K, T, D)
    seg = torch.tensor([[0] * 5 + [1] * 4 + [2] * 3, [7] * 12], dtype=torch.int32)
    y = fn(q, k, v, causal=True, segment_ids=seg)
    for a, b in ((0, 5), (5, 9), (9, 12)):
        alone = fn(q[:1, :, a:b], k[:1, :, a:b], v[:1, :, a:b], causal=True)
        torch.testing.assert_close(y[:1, :, a:b], alone, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(y[1:], fn(q[1:], k[1:], v[1:], causal=True), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "naive"])
def test_packed_batch_equals_examples_one_by_one(inputs, attention):
    torch.manual_seed(0)
    batches = SFTBatches(inputs["chat"], "train", seq_len=128, batch_size=3, mode="pack", seed=1)
    batch = batches.get_batch(0, 0)
    rows = [batches.row(g) for g in range(3)]
    assert any(len(r) > 1 for r in rows), "the fixture should pack several examples per row"
    vocab = int(batches.examples[0][0].max()) + 1
    model = Z2all(model_preset("tiny", vocab_size=max(vocab, 384), dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                               max_seq_len=128), OpsConfig(attention=attention))  # fp32

    loss = sft_loss(model, batch, "cpu")
    loss.backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    # one by one: the same token terms, summed per example, over the same token count
    total, count = 0.0, 0
    for r in rows:
        for e in r:
            ids, mask = batches.examples[e]
            x = torch.from_numpy(ids)[None]
            y = torch.from_numpy(np.where(mask[1:], ids[1:], IGNORE))
            y = torch.cat([y, torch.tensor([IGNORE])])[None]
            n = int((y != IGNORE).sum())
            _, mean = model(x, y)
            total = total + mean * n
            count += n
    alone = total / count
    alone.backward()
    assert count == int((batch.y != IGNORE).sum())
    torch.testing.assert_close(loss, alone, atol=1e-6, rtol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(packed[n], p.grad, atol=1e-6, rtol=1e-4, msg=n)


def test_targets_only_on_assistant_tokens_and_positions_restart(inputs):
    data = ChatData(inputs["chat"], "train")
    batches = SFTBatches(inputs["chat"], "train", seq_len=128, batch_size=2, mode="pack", seed=0)
    b = batches.get_batch(0, 0)
    for i, r in enumerate(batches.row(g) for g in range(2)):
        o = 0
        for s, e in enumerate(r):
            ids, mask = data.example(e)  # the loader keeps the data order: example e is data.example(e)
            n = len(ids)
            assert b.x[i, o:o + n].tolist() == ids.tolist()
            assert b.positions[i, o:o + n].tolist() == list(range(n))
            assert set(b.segment_ids[i, o:o + n].tolist()) == {s}
            want = [int(t) if m else IGNORE for t, m in zip(ids[1:], mask[1:])] + [IGNORE]
            assert b.y[i, o:o + n].tolist() == want
            o += n
        assert (b.y[i, o:] == IGNORE).all()  # padding tail: no target
        assert set(b.segment_ids[i, o:].tolist()) <= {len(r)}

    # the trained targets are exactly the assistant answers plus <|im_end|>: decode one example's targets
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(inputs["tok"] / "tokenizer.json"))
    ids, mask = data.example(0)
    trained = tok.decode([int(t) for t, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert trained.endswith("<|im_end|>") and "user" not in trained and "<|im_start|>" not in trained


def test_padding_rows_carry_the_same_targets(inputs):
    pack = SFTBatches(inputs["chat"], "train", seq_len=128, batch_size=4, mode="pack", seed=0)
    pad = SFTBatches(inputs["chat"], "train", seq_len=128, batch_size=4, mode="pad", seed=0)
    b = pad.get_batch(0, 0)
    assert b.positions is None and b.segment_ids is None
    assert b.x.shape[1] == max(pad.lengths[pad.row(g)[0]] for g in range(4))
    # the same examples in both modes over an epoch, each trained once
    assert sorted(e for r in pack.epoch_rows(0) for e in r) == sorted(e for r in pad.epoch_rows(0) for e in r)
    assert pad.padding_share() > pack.padding_share()
    n_pack = sum(int((pack.collate(pack.epoch_rows(0)[i:i + 4]).y != IGNORE).sum())
                 for i in range(0, len(pack.epoch_rows(0)), 4))
    n_pad = sum(int((pad.collate(pad.epoch_rows(0)[i:i + 4]).y != IGNORE).sum())
                for i in range(0, len(pad.epoch_rows(0)), 4))
    assert n_pack == n_pad


def test_row_stream_is_independent_of_the_split(inputs):
    one = SFTBatches(inputs["chat"], "train", seq_len=128, batch_size=2, mode="pack", seed=3, grad_accum=2)
    ranks = [SFTBatches(inputs["chat"], "train", seq_len=128, batch_size=2, mode="pack", seed=3, rank=r,
                        world_size=2) for r in range(2)]
    for step in (0, 5, 80):  # 80: past the first epoch
        for m in range(2):
            a, b = one.get_batch(step, m), ranks[m].get_batch(step, 0)
            assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.segment_ids, b.segment_ids)
    assert one.epoch_rows(0) != one.epoch_rows(1)  # reshuffled per epoch
    assert pack_rows([3, 3, 3, 6], [0, 1, 2, 3], 8) == [[0, 1], [2], [3]]  # first-come, no look-ahead


def test_bench_sft_prints_packed_vs_padded(inputs, capsys):
    from z2all.bench import sft as bench_sft

    cfg = bench_sft.Config(chat=str(inputs["chat"]), examples=24, seq_len=128, batch_size=4, rounds=1)
    assert bench_sft.run(cfg) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.splitlines() if line.startswith(("| pack", "| pad"))}
    assert rows["pack"][0] == rows["pad"][0] == "24"
    assert int(rows["pack"][1]) < int(rows["pad"][1]) == 24  # fewer rows when packed
    assert float(rows["pack"][4].rstrip("%")) < float(rows["pad"][4].rstrip("%"))
    assert "packed / padded throughput" in out
