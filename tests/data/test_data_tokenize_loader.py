"""`z2all data tokenize` round-trips to the original text with one eos per document and never turns a
literal "<|endoftext|>" into the special id; the loader is deterministic, rank-disjoint, invariant to
(world, accum) reshaping, and reads windows across file boundaries."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import corpora_dir, make_tokenizer, raw_rows, read_records, real_docs, write_jsonl

from z2all.data import convert, tokenize
from z2all.data.loader import FeistelPermutation, TokenLoader
from z2all.data.schema import record_text
from z2all.utils import UserError

EOS = "<|endoftext|>"


@pytest.fixture(scope="session")
def shared_corpora():
    """../shared/corpora, or None: the data helpers then read the embedded demo corpus (no skip)."""
    return corpora_dir()


@pytest.fixture(scope="module")
def corpus(shared_corpora, tmp_path_factory):
    """A converted two-source corpus (one doc carries a literal <|endoftext|>) and a small BPE."""
    d = tmp_path_factory.mktemp("tok")
    zh = real_docs(shared_corpora, "zh_fortunes", 200)
    zh[7] = dict(zh[7], text=zh[7]["text"] + f"\n\nliteral {EOS} inside a document")
    code = real_docs(shared_corpora, "code_cpython_stdlib", 12)
    convert.run(convert.Config(inputs=[f"wikipedia_zh={write_jsonl(d / 'zh.jsonl', raw_rows('wikipedia_zh', zh))}",
                                       f"github_python={write_jsonl(d / 'py.jsonl', raw_rows('github_python', code))}"],
                               out=str(d / "conv"), shard_mb=0.1, batch_mb=0.05))
    texts = [x["text"] for x in zh[:100] + code[:4]]
    tok = make_tokenizer(d / "tokenizer", texts, vocab_size=400)
    return d, tok


def tokenize_to(corpus, name, **kw):
    d, tok = corpus
    out = d / name
    cfg = tokenize.Config(shards=str(d / "conv"), tokenizer=str(tok), out=str(out), **kw)
    assert tokenize.run(cfg) == 0
    return out, json.loads((out / "meta.json").read_text())


def read_split(out, meta, split):
    return np.concatenate([np.fromfile(out / f, dtype=meta["dtype"]) for f in meta[f"{split}_files"]])


def test_round_trip_split_and_special_token_safety(corpus):
    from tokenizers import Tokenizer

    out, meta = tokenize_to(corpus, "t1", workers=1, val_fraction=0.1, file_mb=0.02)
    d, tok_dir = corpus
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    eos = tok.token_to_id(EOS)
    assert meta["dtype"] == "uint16" and meta["eos_id"] == eos and meta["vocab_size"] == tok.get_vocab_size()
    assert len(meta["train_files"]) > 1  # rolled at file_mb
    recs = read_records(d / "conv", "wikipedia_zh") + read_records(d / "conv", "github_python")
    val_ids = {r["gid"] for r in recs if tokenize.is_val(r["gid"], 0, 0.1)}
    assert abs(len(val_ids) / len(recs) - 0.1) < 0.07  # ~210 documents: 3.3 sigma of a 10% draw
    for split, want in (("train", [r for r in recs if r["gid"] not in val_ids]),
                        ("val", [r for r in recs if r["gid"] in val_ids])):
        ids = read_split(out, meta, split)
        assert len(ids) == meta[f"{split}_tokens"]
        assert int((ids == eos).sum()) == len(want) == meta["documents"][split]  # exactly one eos per doc
        docs = np.split(ids, np.flatnonzero(ids == eos) + 1)[:-1]
        assert [tok.decode(list(map(int, x[:-1])), skip_special_tokens=False) for x in docs] == \
            [record_text(r) for r in want]
    assert any(EOS in record_text(r) for r in recs)  # the literal text survived as ordinary tokens


def test_val_split_takes_the_asked_fraction_by_gid():
    n = 20_000
    for frac in (0.01, 0.1, 0.5):
        share = sum(tokenize.is_val(g, 0, frac) for g in range(n)) / n
        assert abs(share - frac) < 4 * (frac * (1 - frac) / n) ** 0.5 + 1e-9, (frac, share)
    assert not any(tokenize.is_val(g, 0, 0.0) for g in range(1000))
    a = [tokenize.is_val(g, 0, 0.1) for g in range(1000)]
    assert a == [tokenize.is_val(g, 0, 0.1) for g in range(1000)]  # deterministic
    assert a != [tokenize.is_val(g, 1, 0.1) for g in range(1000)]  # the seed reshuffles it


def test_workers_give_identical_files_and_uint32(corpus, tmp_path):
    out1, m1 = tokenize_to(corpus, "w1", workers=1, batch_mb=0.02)
    out2, m2 = tokenize_to(corpus, "w2", workers=2, batch_mb=0.02)
    for split in ("train", "val"):
        assert np.array_equal(read_split(out1, m1, split), read_split(out2, m2, split))
    assert tokenize.dtype_for(70000) == np.dtype("<u4") and tokenize.dtype_for(65535) == np.dtype("<u2")


KILLER = """
import os, signal, sys
from z2all.data import tokenize
n, where, shards, tok, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
calls = {"commit": 0, "close": 0}
orig_write, orig_close = tokenize.atomic_write_text, tokenize._BinWriter._close
def write(path, text):
    if path.name == tokenize.STATE:
        calls["commit"] += 1
        if where == "before_commit" and calls["commit"] == n:
            os.kill(os.getpid(), signal.SIGKILL)  # a block written to the open files, not committed
    if where == "before_meta" and path.name == "meta.json":
        os.kill(os.getpid(), signal.SIGKILL)  # every file renamed into place, no meta.json yet
    orig_write(path, text)
def close(self):
    orig_close(self)
    calls["close"] += 1
    if where == "after_roll" and calls["close"] == n:
        os.kill(os.getpid(), signal.SIGKILL)  # a finished file renamed, the commit not yet made
tokenize.atomic_write_text, tokenize._BinWriter._close = write, close
sys.exit(tokenize.run(tokenize.Config(shards=shards, tokenizer=tok, out=out, workers=1, val_fraction=0.1,
                                      batch_mb=0.01, file_mb=0.01)))
"""


@pytest.fixture(scope="module")
def uninterrupted(corpus):
    return tokenize_to(corpus, "uninterrupted", workers=1, val_fraction=0.1, file_mb=0.01)


@pytest.mark.parametrize("where", ["before_commit", "after_roll", "before_meta"])
def test_tokenize_sigkill_and_resume(corpus, uninterrupted, tmp_path, where):
    d, tok = corpus
    out = d / f"killed-{where}"
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "PYTHONPATH": str(Path(tokenize.__file__).resolve().parents[2])}
    args = [sys.executable, str(script), "4", where, str(d / "conv"), str(tok), str(out)]
    p = subprocess.run(args, env=env, capture_output=True)
    assert p.returncode == -signal.SIGKILL, p.stderr.decode()[-2000:]
    assert not (out / "meta.json").exists()
    state = json.loads((out / tokenize.STATE).read_text())
    committed = [f for w in state["writers"].values() for f in w["files"]]
    assert committed  # finished files survive the kill ...
    finished = {f: (out / f).stat().st_mtime_ns for f in committed}
    # the rerun (other workers and batch size: they do not change the output) keeps and skips what is done
    _, meta = tokenize_to(corpus, out.name, workers=2, val_fraction=0.1, batch_mb=0.03, file_mb=0.01)
    assert all((out / f).stat().st_mtime_ns == t for f, t in finished.items())  # ... and are not redone
    ref, ref_meta = uninterrupted
    assert len(meta["train_files"]) > 2
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == \
        sorted(p.name for p in ref.iterdir() if not p.name.startswith("."))
    for f in meta["train_files"] + meta["val_files"]:
        assert (out / f).read_bytes() == (ref / f).read_bytes(), f
    assert {**meta, "tokenizer_dir": 0} == {**ref_meta, "tokenizer_dir": 0}
    assert (out / "meta.json").read_bytes() == (ref / "meta.json").read_bytes()
    assert not list(out.glob(".*.tmp"))
    mtime = (out / "meta.json").stat().st_mtime_ns
    tokenize_to(corpus, out.name, workers=1, val_fraction=0.1, file_mb=0.01)  # finished: nothing to do
    assert (out / "meta.json").stat().st_mtime_ns == mtime


def test_tokenize_user_errors(corpus, tmp_path):
    d, tok = corpus
    with pytest.raises(UserError, match="tokenizer.json"):
        tokenize.run(tokenize.Config(shards=str(d / "conv"), tokenizer=str(tmp_path), out=str(tmp_path / "o")))
    with pytest.raises(UserError, match="convert"):
        tokenize.run(tokenize.Config(shards=str(tmp_path / "none"), tokenizer=str(tok), out=str(tmp_path / "o")))


def test_rerun_with_other_settings_never_deletes_a_users_token_files(corpus, tmp_path):
    """Only the files the earlier run's state lists are removed; a token-file name no state lists is not
    ours: the run refuses, naming it, before it deletes anything."""
    out, meta = tokenize_to(corpus, "rerun", workers=1, val_fraction=0.1)
    mine = {out / "train-00007.bin": b"mine", out / "val-00003.bin": b"mine too"}
    for p, data in mine.items():
        p.write_bytes(data)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UserError, match=r"holds train-00007\.bin, val-00003\.bin.*nothing was changed") as e:
        tokenize_to(corpus, "rerun", workers=1, val_fraction=0.3)
    assert "\n" not in str(e.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    for p in mine:
        p.rename(tmp_path / p.name)
    _, meta = tokenize_to(corpus, "rerun", workers=1, val_fraction=0.3)
    ref, ref_meta = tokenize_to(corpus, "rerun-ref", workers=1, val_fraction=0.3)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())
    assert {**meta, "tokenizer_dir": 0} == {**ref_meta, "tokenizer_dir": 0}


def test_an_empty_train_split_fails_and_leaves_no_output(corpus):
    d, tok = corpus
    out = d / "all-val"
    with pytest.raises(UserError, match="train split is empty.*lower --val-fraction or add data") as e:
        tokenize.run(tokenize.Config(shards=str(d / "conv" / "github_python"), tokenizer=str(tok), out=str(out),
                                     workers=1, val_fraction=0.99))
    assert "\n" not in str(e.value)
    assert not out.exists()  # made by this run: handed back


# ---------------------------------------------------------------- loader

@pytest.fixture
def token_dir(tmp_path):
    """Two train files of consecutive ids (so a window's content tells where it starts) and one val file."""
    ids = np.arange(5000, dtype=np.uint16)
    ids[:3001].tofile(tmp_path / "train-00000.bin")
    ids[3001:].tofile(tmp_path / "train-00001.bin")
    np.arange(1000, 1400, dtype=np.uint16).tofile(tmp_path / "val-00000.bin")
    meta = {"dtype": "uint16", "vocab_size": 6000, "eos_id": 0, "train_tokens": 5000, "val_tokens": 400,
            "train_files": ["train-00000.bin", "train-00001.bin"], "val_files": ["val-00000.bin"],
            "tokenizer_dir": "", "documents": {}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    return tmp_path


def test_batches_are_shifted_windows_across_files(token_dir):
    L = TokenLoader(token_dir, "train", batch_size=4, seq_len=16, seed=3)
    assert L.n_windows == (5000 - 1) // 16
    for step in range(60):
        x, y = L.get_batch(step)
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, 16)
        assert torch.equal(y, x + 1)  # consecutive ids: y is x shifted by one, even across the file boundary
        assert all(int(r[0]) % 16 == 0 for r in x)  # windows start at multiples of seq_len


def test_determinism_and_epoch_coverage(token_dir):
    a = TokenLoader(token_dir, "train", batch_size=4, seq_len=16, seed=1)
    b = TokenLoader(token_dir, "train", batch_size=4, seq_len=16, seed=1)
    c = TokenLoader(token_dir, "train", batch_size=4, seq_len=16, seed=2)
    assert torch.equal(a.get_batch(17)[0], b.get_batch(17)[0])
    assert not torch.equal(a.get_batch(17)[0], c.get_batch(17)[0])
    n = a.n_windows
    epoch0 = [w for s in range((n + 3) // 4) for w in a.window_indices(s)][:n]
    assert sorted(epoch0) == list(range(n))  # a permutation: every window once per epoch
    assert epoch0 != list(range(n))
    one = TokenLoader(token_dir, "train", batch_size=1, seq_len=16, seed=1)
    epoch1 = [one.window_indices(s)[0] for s in range(n, 2 * n)]  # the next epoch: reshuffled
    assert sorted(epoch1) == list(range(n)) and epoch1 != epoch0
    assert [one.window_indices(s)[0] for s in range(n)] == epoch0


def test_ranks_disjoint_and_world_accum_reshape(token_dir):
    kw = dict(batch_size=3, seq_len=16, seed=5)
    r0 = TokenLoader(token_dir, "train", rank=0, world_size=2, **kw)
    r1 = TokenLoader(token_dir, "train", rank=1, world_size=2, **kw)
    single = TokenLoader(token_dir, "train", grad_accum=2, **kw)
    seen0, seen1 = set(), set()
    steps = r0.n_windows // 6  # within the first epoch
    for step in range(steps):
        w0, w1 = r0.window_indices(step), r1.window_indices(step)
        seen0 |= set(w0)
        seen1 |= set(w1)
        assert set(w0) | set(w1) == set(single.window_indices(step, 0)) | set(single.window_indices(step, 1))
    assert not seen0 & seen1 and len(seen0) == len(seen1) == steps * 3
    # resume: a fresh loader at step k gives what the running one gives, nothing replayed
    assert torch.equal(TokenLoader(token_dir, "train", rank=1, world_size=2, **kw).get_batch(steps)[0],
                       r1.get_batch(steps)[0])


def test_eval_batches_and_errors(token_dir):
    L = TokenLoader(token_dir, "val", batch_size=8, seq_len=16)
    batches = list(L.eval_batches(100))
    assert sum(len(x) for x, _ in batches) == L.n_windows == 399 // 16
    assert int(batches[0][0][0, 0]) == 1000 and int(batches[0][0][1, 0]) == 1016
    assert [torch.equal(a[0], b[0]) for a, b in zip(batches, L.eval_batches(2))] == [True, True]
    with pytest.raises(UserError, match="too few"):
        TokenLoader(token_dir, "val", seq_len=400)
    with pytest.raises(UserError, match="meta.json"):
        TokenLoader(token_dir / "nope")


def test_feistel_is_a_bijection_for_awkward_sizes():
    for n in (1, 2, 3, 7, 64, 1000, 4097):
        p = FeistelPermutation(n, key=123)
        assert sorted(p(i) for i in range(n)) == list(range(n))


def test_loader_reads_tokenize_output(corpus):
    out, meta = tokenize_to(corpus, "t3", workers=1, val_fraction=0.2)
    L = TokenLoader(out, "train", batch_size=2, seq_len=32)
    x, y = L.get_batch(0)
    assert torch.equal(x[:, 1:], y[:, :-1]) and int(x.max()) < meta["vocab_size"]


def test_tiktoken_and_tokenizers_encoders_write_identical_files(corpus):
    """--encoder picks the encoding library; the token files must not depend on it (a literal
    <|endoftext|> inside a document included)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from z2all.tokenizer import hf
    from z2all.tokenizer.pretokenize import split_pattern
    from z2all.tokenizer.tiktoken_compat import to_tiktoken

    d, plain = corpus
    with pytest.raises(UserError, match="does not convert to tiktoken exactly"):  # GPT-2-style ByteLevel only
        tokenize_to(corpus, "enc_refused", workers=1, encoder="tiktoken")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = hf.byte_level_parts(split_pattern())  # what `tokenizer train` writes
    tok.train_from_iterator(real_docs(corpora_dir(), "zh_fortunes", 100)[0]["text"].split("\n") * 3,
                            trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.add_specials(tok, hf.special_tokens([]))  # after the merges, as `tokenizer train` does
    (d / "tok_split").mkdir(exist_ok=True)
    tok.save(str(d / "tok_split" / "tokenizer.json"))
    enc, why = to_tiktoken(d / "tok_split")
    assert enc is not None, why
    ours = (d, d / "tok_split")
    a, meta_a = tokenize_to(ours, "enc_tok", workers=1, encoder="tokenizers")
    b, meta_b = tokenize_to(ours, "enc_tik", workers=2, encoder="tiktoken")
    for split in ("train", "val"):
        np.testing.assert_array_equal(read_split(a, meta_a, split), read_split(b, meta_b, split))
    assert meta_a["train_tokens"] == meta_b["train_tokens"]
