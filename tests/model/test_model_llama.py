"""The Z2all model on its own: causality, KV-cache decoding == full recomputation (incl. batched prompts of
different lengths), the loss path, the op switch, init, and the save/load round trip."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from model_helpers import small_config

from z2all.model.generate import generate
from z2all.model.llama import CONFIG_FILE, WEIGHTS_FILE, Z2all, load_model, save_model
from z2all.ops import OpsConfig


def make(seed=0, **kw) -> Z2all:
    torch.manual_seed(seed)
    m = Z2all(small_config(**kw))
    with torch.no_grad():  # non-trivial norm weights, so a mapping or norm bug cannot hide behind 1.0
        for name, p in m.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
    return m.eval()


@pytest.mark.parametrize("attention", ["naive", "sdpa"])
def test_future_tokens_never_change_past_logits(attention):
    m = make()
    m.set_ops(OpsConfig(attention=attention))
    x = torch.randint(0, 97, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        a, _ = m(x)
        b, _ = m(y)
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:], atol=1e-3)


def _greedy_full_recompute(m, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = m(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_kv_cache_logits_equal_full_forward():
    m = make()
    x = torch.randint(0, 97, (2, 15))
    with torch.no_grad():
        full, _ = m(x)
        cache = m.new_kv_cache(2, 15)
        pre, _ = m(x[:, :9], kv_cache=cache, start_pos=0)
        steps = [m(x[:, t:t + 1], kv_cache=cache, start_pos=t)[0] for t in range(9, 15)]
    assert torch.allclose(torch.cat([pre, *steps], 1), full, atol=1e-5)


@pytest.mark.parametrize("attention", ["naive", "sdpa"])
def test_generation_equals_full_recompute_token_for_token(attention):
    m = make(seed=1)
    m.set_ops(OpsConfig(attention=attention))
    prompt = torch.randint(0, 97, (7,)).tolist()
    assert generate(m, [prompt], 16) == [_greedy_full_recompute(m, prompt, 16)]


def test_batched_prompts_of_different_lengths():
    m = make(seed=2)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (5, 11, 1)]
    batched = generate(m, prompts, 10)
    for p, out in zip(prompts, batched):
        assert out == _greedy_full_recompute(m, p, 10)
    # the left-padded forward gives every real position the logits it has alone
    B, P = len(prompts), 11
    idx = torch.zeros(B, P, dtype=torch.long)
    mask = torch.zeros(B, P, dtype=torch.bool)
    for b, p in enumerate(prompts):
        idx[b, P - len(p):] = torch.tensor(p)
        mask[b, P - len(p):] = True
    with torch.no_grad():
        padded, _ = m(idx, key_padding_mask=mask)
        for b, p in enumerate(prompts):
            alone, _ = m(torch.tensor([p]))
            assert torch.allclose(padded[b, P - len(p):], alone[0], atol=1e-5)


def test_generate_stops_at_eos_and_should_stop():
    m = make(seed=3)
    prompt = [5, 6, 7]
    ref = _greedy_full_recompute(m, prompt, 10)
    assert generate(m, [prompt], 10, eos_id=ref[3]) == [ref[:ref.index(ref[3])]]
    assert generate(m, [prompt], 10, should_stop=lambda row, new: len(new) == 4) == [ref[:4]]
    streamed = []
    generate(m, [prompt, [1, 2]], 5, on_token=lambda row, t: streamed.append((row, t)))
    assert [t for r, t in streamed if r == 0] == ref[:5]


def test_loss_is_cross_entropy_of_the_logits_with_ignore_index():
    m = make(seed=4)
    x = torch.randint(0, 97, (3, 10))
    y = torch.randint(0, 97, (3, 10))
    y[0, :4] = -100
    with torch.no_grad():
        logits, none = m(x)
        out, loss = m(x, y)
    assert none is None and out is None
    want = F.cross_entropy(logits.reshape(-1, 97), y.reshape(-1), ignore_index=-100)
    assert torch.allclose(loss, want, atol=1e-6)


@pytest.mark.parametrize("tie", [False, True])
def test_backward_reaches_every_parameter(tie):
    m = make(seed=5, tie_embeddings=tie).train()
    x = torch.randint(0, 97, (2, 12))
    _, loss = m(x, torch.roll(x, -1, 1))
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert (m.output.weight is m.tok_embeddings.weight) == tie


def test_set_ops_switches_every_module():
    m = make(seed=6)
    x = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        a, _ = m(x)
        m.set_ops(OpsConfig(preset="naive"))
        b, _ = m(x)
    assert dict(m.ops.names)["attention"] == "naive"
    assert all(blk.attention.ops is m.ops and blk.ffn_norm.ops is m.ops for blk in m.layers)
    assert torch.allclose(a, b, atol=1e-5)


def test_init_std_and_scaled_residual_init():
    torch.manual_seed(0)
    m = Z2all(small_config(dim=256, n_heads=4, n_kv_heads=4, ffn_dim=512, n_layers=8, init_std=0.02))
    res = 0.02 / math.sqrt(16)
    assert abs(m.layers[0].attention.wq.weight.std().item() - 0.02) < 1e-3
    assert abs(m.layers[3].attention.wo.weight.std().item() - res) < 3e-4
    assert abs(m.layers[7].feed_forward.w2.weight.std().item() - res) < 3e-4
    assert torch.equal(m.norm.weight, torch.ones(256))


def test_dropout_only_in_training():
    m = make(seed=7, dropout=0.5)
    x = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        assert torch.equal(m(x)[0], m(x)[0])
        m.train()
        assert not torch.equal(m(x)[0], m(x)[0])


@pytest.mark.parametrize("tie,dtype", [(False, torch.float32), (True, torch.float32), (False, torch.bfloat16)])
def test_save_load_round_trip(tmp_path, tie, dtype):
    m = make(seed=8, tie_embeddings=tie).to(dtype)
    save_model(m, tmp_path / "ck")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])  # no temp files
    back = load_model(tmp_path / "ck")
    assert back.cfg == m.cfg
    sd, sd2 = m.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) and sd2[k].dtype == dtype for k in sd)
    assert (back.output.weight is back.tok_embeddings.weight) == tie
    x = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        assert torch.equal(m(x)[0], back.eval()(x)[0])
    # overwriting in place works and keeps the directory clean
    save_model(back, tmp_path / "ck")
    assert len(list((tmp_path / "ck").iterdir())) == 2


def test_load_model_errors_name_the_path(tmp_path):
    from z2all.utils import UserError

    with pytest.raises(UserError, match="model_config.json"):
        load_model(tmp_path)


def test_resolve_checkpoint_accepts_runs_and_says_which(tmp_path):
    import json

    from z2all.model.llama import resolve_checkpoint
    from z2all.utils import UserError

    m = make()
    run = tmp_path / "run"
    for step in (5, 10):
        save_model(m, run / "checkpoints" / f"step-{step:06d}")
    (run / "checkpoints" / ".tmp-step-000020-1").mkdir()  # an interrupted save is never picked
    # no index.json: the highest step; a damaged one falls back the same way; a valid one is followed
    assert resolve_checkpoint(run)[0].name == "step-000010"
    (run / "checkpoints" / "index.json").write_text("{broken")
    assert resolve_checkpoint(run / "checkpoints")[0].name == "step-000010"
    (run / "checkpoints" / "index.json").write_text(json.dumps({"latest": "step-000005"}))
    path, kind, note = resolve_checkpoint(run)
    assert path.name == "step-000005" and kind == "z2all" and "latest checkpoint" in note
    ck = run / "checkpoints" / "step-000010"
    assert resolve_checkpoint(ck) == (ck, "z2all", None)
    with pytest.raises(UserError, match="no such directory"):
        resolve_checkpoint(tmp_path / "nope")


def test_corrupt_weights_and_config_are_named(tmp_path):
    from z2all.io import write_checksums
    from z2all.utils import UserError

    ck = save_model(make(), tmp_path / "ck")
    w = ck / WEIGHTS_FILE
    good = w.read_bytes()
    w.write_bytes(good[:-10])
    with pytest.raises(UserError, match=f"{w}.*corrupt or truncated"):
        load_model(ck)
    w.write_bytes(good)
    write_checksums(ck)
    w.write_bytes(good[:-4] + b"\0\0\0\1")  # same size, altered bytes: only the checksum can tell
    with pytest.raises(UserError, match=f"{w}.*sha256"):
        load_model(ck)
    (ck / CONFIG_FILE).write_bytes(b"\xff\xfe")
    with pytest.raises(UserError, match=CONFIG_FILE):
        load_model(ck)
