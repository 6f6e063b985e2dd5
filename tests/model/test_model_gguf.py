"""GGUF export: the file read back with gguf.GGUFReader holds every tensor with our values (q/k rows in
llama.cpp's interleaved RoPE order), the vocabulary, merges, token types, ids, metadata and chat template;
q8_0 is about a quarter of f32 and dequantises close to ours; --out follows the never-overwrite rule.
The llama.cpp round trip (logits, greedy tokens, tokenizer ids) is test_model_gguf_llamacpp.py (slow)."""

from __future__ import annotations

import json
import shutil

import gguf  # a test dependency (pyproject [test]); the export itself needs it only when it runs
import numpy as np
import pytest
import torch
from model_helpers import demo_texts

from z2all.model import gguf as ours
from z2all.model.config import ModelConfig
from z2all.model.llama import Z2all, save_model
from z2all.tokenizer.pretokenize import named_pattern
from z2all.utils import UserError


def make_tokenizer(path, pattern: str = "z2all", vocab_size: int = 384):
    """A byte-level BPE with our special tokens, chat template and the named split pattern, trained on a
    few KB of the demo corpus (tokenizers' trainer: the same merges as ours, in a fraction of a second)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from z2all.tokenizer import hf

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = hf.byte_level_parts(named_pattern(pattern))
    specials = hf.special_tokens([])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(demo_texts(), trainer)
    hf.add_specials(tok, specials)
    hf.save_dir(tok, path, specials, model_max_length=256)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    tok = make_tokenizer(root / "tok")
    tj = json.loads((tok / "tokenizer.json").read_text())
    n_tok = len(tj["model"]["vocab"]) + len(tj["added_tokens"])
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=n_tok + 64,  # 64 padding rows
                      ffn_dim=96, max_seq_len=128, rope_theta=5000.0)
    torch.manual_seed(0)
    model = Z2all(cfg).eval()
    d = save_model(model, root / "step-000001")
    shutil.copytree(tok, d / "tokenizer")
    return d, model


def _read(path):
    r = gguf.GGUFReader(str(path))
    fields = {}
    for name, f in r.fields.items():
        fields[name] = f.contents()
    return r, fields


def test_f32_holds_every_tensor_vocab_and_metadata(ckpt, tmp_path):
    d, model = ckpt
    out = tmp_path / "m.gguf"
    assert ours.run(ours.Config(ckpt=str(d), out=str(out))) == 0
    r, f = _read(out)
    cfg = model.cfg
    assert f["general.architecture"] == "llama"
    assert f["llama.context_length"] == cfg.max_seq_len and f["llama.embedding_length"] == cfg.dim
    assert f["llama.block_count"] == cfg.n_layers and f["llama.feed_forward_length"] == cfg.ffn_hidden
    assert f["llama.attention.head_count"] == cfg.n_heads and f["llama.attention.head_count_kv"] == cfg.n_kv_heads
    assert f["llama.rope.freq_base"] == pytest.approx(cfg.rope_theta)
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.norm_eps)
    assert f["llama.rope.dimension_count"] == cfg.head_dim

    tj = json.loads((d / "tokenizer" / "tokenizer.json").read_text())
    tokens = f["tokenizer.ggml.tokens"]
    assert len(tokens) == cfg.vocab_size
    for s, i in tj["model"]["vocab"].items():
        assert tokens[i] == s
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    assert f["tokenizer.ggml.merges"] == merges
    added = {t["content"]: t["id"] for t in tj["added_tokens"]}
    types = f["tokenizer.ggml.token_type"]
    assert all(types[i] == gguf.TokenType.CONTROL for i in added.values())
    assert types[len(tj["model"]["vocab"]) + len(added)] == gguf.TokenType.UNUSED  # padding rows
    assert f["tokenizer.ggml.bos_token_id"] == added["<|endoftext|>"] == f["tokenizer.ggml.eos_token_id"]
    assert f["tokenizer.ggml.eot_token_id"] == added["<|im_end|>"]
    assert f["tokenizer.ggml.add_bos_token"] is False
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "qwen2"  # closest, with a warning
    assert "<|im_start|>" in f["tokenizer.chat_template"]

    by_name = {t.name: t for t in r.tensors}
    sd = model.state_dict()
    assert set(by_name) == {ours.gguf_name(k) for k in sd}
    for key, t in sd.items():
        want = t.numpy()
        if key.endswith("attention.wq.weight"):
            want = ours.rotate_half_to_interleaved(want, cfg.n_heads)
        elif key.endswith("attention.wk.weight"):
            want = ours.rotate_half_to_interleaved(want, cfg.n_kv_heads)
        got = np.asarray(by_name[ours.gguf_name(key)].data).reshape(want.shape)
        np.testing.assert_array_equal(got, want, err_msg=key)
    side = json.loads(ours.sidecar(out).read_text())
    assert side["command"] == "export gguf" and side["config"]["dtype"] == "f32"


def test_interleaving_turns_rotate_half_into_pairwise_rope():
    """The permutation is what makes llama.cpp's adjacent-pair RoPE equal our rotate-half RoPE."""
    from z2all.ops.reference import rope_cache

    torch.manual_seed(0)
    h, d, t = 2, 8, 5
    w = torch.randn(h * d, 16)
    x = torch.randn(t, 16)
    cos, sin = rope_cache(t, d, 10000.0)  # [T, D/2]
    q = (x @ w.T).view(t, h, d)
    q1, q2 = q[..., : d // 2], q[..., d // 2:]
    c, s = cos[:, None], sin[:, None]
    ref = torch.cat([q1 * c - q2 * s, q2 * c + q1 * s], -1)  # rotate-half, as ops/reference.py
    wi = torch.from_numpy(ours.rotate_half_to_interleaved(w.numpy(), h))
    qi = (x @ wi.T).view(t, h, d)
    a, b = qi[..., 0::2], qi[..., 1::2]
    rot = torch.stack([a * c - b * s, a * s + b * c], -1).reshape(t, h, d)
    back = torch.cat([rot[..., 0::2], rot[..., 1::2]], -1)  # interleaved -> halves, to compare
    torch.testing.assert_close(back, ref)


def test_q8_0_and_f16_sizes_and_values(ckpt, tmp_path):
    d, model = ckpt
    sizes = {}
    for dt in ("f32", "f16", "q8_0"):
        out = tmp_path / f"m-{dt}.gguf"
        ours.run(ours.Config(ckpt=str(d), out=str(out), dtype=dt))
        r, _ = _read(out)
        sizes[dt] = sum(int(t.n_bytes) for t in r.tensors)
        if dt == "q8_0":
            t = next(t for t in r.tensors if t.name == "blk.0.ffn_down.weight")
            assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
            deq = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(
                model.layers[0].feed_forward.w2.weight.shape)
            w = model.layers[0].feed_forward.w2.weight.detach().numpy()
            assert np.abs(deq - w).max() <= np.abs(w).max() / 127 + 1e-6
            norm = next(t for t in r.tensors if t.name == "blk.0.attn_norm.weight")
            assert norm.tensor_type == gguf.GGMLQuantizationType.F32
    assert sizes["f16"] / sizes["f32"] == pytest.approx(0.5, abs=0.01)
    assert 0.25 <= sizes["q8_0"] / sizes["f32"] <= 0.3  # 34 bytes per 32 weights = 0.266, norms f32


def test_out_is_never_a_foreign_file(ckpt, tmp_path):
    d, _ = ckpt
    foreign = tmp_path / "notes.gguf"
    foreign.write_bytes(b"user data")
    with pytest.raises(UserError, match="not written by `z2all export gguf`"):
        ours.run(ours.Config(ckpt=str(d), out=str(foreign)))
    assert foreign.read_bytes() == b"user data"
    with pytest.raises(UserError, match="inside the input"):
        ours.run(ours.Config(ckpt=str(d), out=str(d / "m.gguf")))
    with pytest.raises(UserError, match="names a directory"):  # not a file named "newdir"
        ours.run(ours.Config(ckpt=str(d), out=str(tmp_path / "newdir") + "/"))
    mine = tmp_path / "m.gguf"
    ours.run(ours.Config(ckpt=str(d), out=str(mine)))
    ours.run(ours.Config(ckpt=str(d), out=str(mine), dtype="f16"))  # an earlier export is replaced
    assert json.loads(ours.sidecar(mine).read_text())["config"]["dtype"] == "f16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "m.gguf.z2all.json", "notes.gguf"]


def test_llama_cpp_pattern_exports_exactly(tmp_path):
    tok = make_tokenizer(tmp_path / "tok", pattern="llama-bpe")
    voc = ours.read_vocab(tok, 512)
    assert voc.pre == "llama-bpe" and voc.warning is None
    voc = ours.read_vocab(make_tokenizer(tmp_path / "tok2"), 512)
    assert voc.pre == "qwen2" and "Chinese" in voc.warning


def test_tokenizer_train_pattern_option_reaches_the_gguf(tmp_path):
    """`z2all tokenizer train --pattern qwen2` (our trainer) records the pattern; the export then names the
    matching llama.cpp pre-tokenizer without a warning."""
    from z2all.tokenizer import train

    text = tmp_path / "t.txt"
    text.write_text("\n".join(demo_texts(6000)), encoding="utf-8")
    out = tmp_path / "tok"
    train.run(train.Config(inputs=[str(text)], out_dir=str(out), vocab_size=384, pattern="qwen2", workers=1))
    tj = json.loads((out / "tokenizer.json").read_text())
    assert ours._split_pattern(tj) == named_pattern("qwen2")
    voc = ours.read_vocab(out, 384)
    assert voc.pre == "qwen2" and voc.warning is None


def test_hf_directory_exports_directly(ckpt, tmp_path):
    """Any Llama directory our import accepts exports to GGUF: ours -> export hf -> export gguf gives the
    same tensors as ours -> export gguf."""
    from z2all.model.hf_compat import export_hf

    d, _ = ckpt
    hf_dir = export_hf(d, tmp_path / "hf")
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    ours.run(ours.Config(ckpt=str(d), out=str(a)))
    ours.run(ours.Config(ckpt=str(hf_dir), out=str(b)))
    ra, rb = gguf.GGUFReader(str(a)), gguf.GGUFReader(str(b))
    ta = {t.name: np.asarray(t.data) for t in ra.tensors}
    tb = {t.name: np.asarray(t.data) for t in rb.tensors}
    assert ta.keys() == tb.keys()
    for k in ta:
        np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)
    assert _read(a)[1]["tokenizer.ggml.tokens"] == _read(b)[1]["tokenizer.ggml.tokens"]


def test_f16_refuses_weights_out_of_its_range_and_q8_0_names_what_stays_f16(tmp_path, capsys):
    """An f16 export of weights beyond float16's range (65504) is refused naming the tensor, for GGUF and for
    `export hf --dtype fp16` (they became inf, and both said "exported"); q8_0 keeps a matrix whose rows are
    not a multiple of its 32-value blocks in f16 and now says so (it printed "q8_0" and nothing else)."""
    from z2all.model import hf_compat

    tok = make_tokenizer(tmp_path / "tok")
    tj = json.loads((tok / "tokenizer.json").read_text())
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=128,
                      vocab_size=len(tj["model"]["vocab"]) + len(tj["added_tokens"]))
    torch.manual_seed(0)
    model = Z2all(cfg).eval()
    d = save_model(model, tmp_path / "step-000001")
    shutil.copytree(tok, d / "tokenizer")
    out = tmp_path / "m.gguf"
    ours.run(ours.Config(ckpt=str(d), out=str(out), dtype="q8_0"))
    said = capsys.readouterr().out
    assert "note: 2 of " in said and "are f16, not q8_0" in said and "blk.0.ffn_down.weight" in said, said
    r, _ = _read(out)
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.F16  # rows of 48
    assert types["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.Q8_0  # rows of 64
    assert json.loads(ours.sidecar(out).read_text())["f16_in_q8_0"] == ["blk.0.ffn_down.weight",
                                                                         "blk.1.ffn_down.weight"]
    with torch.no_grad():
        model.layers[1].attention.wo.weight[0, 0] = 1e6
    big = save_model(model, tmp_path / "big")
    shutil.copytree(tok, big / "tokenizer")
    with pytest.raises(UserError, match=r"layers\.1\.attention\.wo\.weight holds values up to 1e\+06, beyond float16"):
        ours.run(ours.Config(ckpt=str(big), out=str(tmp_path / "big.gguf"), dtype="f16"))
    with pytest.raises(UserError, match="beyond float16's range"):
        hf_compat.run(hf_compat.Config(ckpt=str(big), out=str(tmp_path / "hf"), dtype="fp16"))
    assert not (tmp_path / "big.gguf").exists() and not (tmp_path / "hf").exists()
    assert hf_compat.run(hf_compat.Config(ckpt=str(big), out=str(tmp_path / "hf"), dtype="bf16")) == 0
