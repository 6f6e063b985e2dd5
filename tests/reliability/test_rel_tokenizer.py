"""Fault classes of `z2all tokenizer train` through the real CLI: corpora no backend can learn from (empty,
whitespace only, too small for the vocabulary asked, special-token strings only) and settings that cannot
work give one line saying what to change (sentencepiece's RuntimeErrors included); an --out-dir that is
not ours, or that holds an input, is refused and left byte-identical."""

from __future__ import annotations

import json

import pytest
from rel_helpers import assert_clean_failure, snapshot, z2all

from z2all.io import OWNER_FILE

TEXT = "def add(a, b):\n    return a + b\n\n# 注释：两数相加\nprint(add(1, 2))\n" * 40


@pytest.mark.parametrize("backend, content, vocab, words", [
    ("spm", "   \n\t\n  \n", 512, ["only whitespace"]),
    ("z2all", "   \n\t\n  \n", 512, ["only whitespace"]),
    ("hf", "", 512, ["no text found"]),
    ("z2all", "", 512, ["no text found"]),
    ("spm", "<|endoftext|><|im_start|>\n<|im_end|>\n" * 3, 8000, ["--vocab-size 8000", "too large", "spm"]),
    ("spm", TEXT, 64000, ["--vocab-size 64000", "too large", "spm"]),
    ("hf", TEXT, 200, ["--vocab-size 200 is too small", "use --vocab-size 320"]),
    ("z2all", TEXT, 260, ["--vocab-size 260 is too small"]),
    ("z2all", TEXT, 320, ["--workers must be >= 0"]),  # --workers -3 (below), was taken as 1
])
def test_corpus_or_vocab_that_cannot_work_says_what_to_change(tmp_path, backend, content, vocab, words):
    (tmp_path / "in.txt").write_text(content, encoding="utf-8")
    workers = "-3" if "--workers must be >= 0" in words else "1"
    res = z2all("tokenizer", "train", tmp_path / "in.txt", "--out-dir", tmp_path / "tok", "--backend", backend,
                "--vocab-size", vocab, "--workers", workers)
    line = assert_clean_failure(res, *words)
    assert "internal error" not in line and "RuntimeError" not in line
    assert not (tmp_path / "tok").exists()  # the claim is undone: no empty marked directory left


def test_out_dir_not_ours_is_refused_and_ours_is_replaced(tmp_path):
    (tmp_path / "in.txt").write_text(TEXT, encoding="utf-8")
    train = ("tokenizer", "train", tmp_path / "in.txt", "--vocab-size", "320", "--workers", "1", "--out-dir")
    # someone's directory, and a directory holding the input: refused, byte-identical
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "tokenizer.json").write_text('{"not": "ours"}')
    (mine / "notes.txt").write_text("keep me")
    before = snapshot(mine)
    assert_clean_failure(z2all(*train, mine), "--out-dir", "not empty")
    assert snapshot(mine) == before
    before = snapshot(tmp_path)
    assert_clean_failure(z2all(*train, tmp_path), "--out-dir", "contains the input")
    assert snapshot(tmp_path) == before
    res = z2all("tokenizer", "train", tmp_path, "--vocab-size", "320", "--out-dir", tmp_path / "new")
    assert_clean_failure(res, "--out-dir", "inside the input directory")
    assert snapshot(tmp_path) == before
    # our own output is replaced whole; an older z2all's tokenizer dir (no owner file) is accepted
    out = tmp_path / "tok"
    for _ in range(2):
        res = z2all(*train, out)
        assert res.rc == 0, res.text
    assert json.loads((out / OWNER_FILE).read_text())["command"] == "tokenizer train"
    (out / OWNER_FILE).unlink()
    res = z2all(*train, out)
    assert res.rc == 0, res.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "mine", "tok"]  # no temp dirs left
