"""Fault classes of `z2all data chat` and `z2all data synth`, driven through the CLI's `main` in a subprocess:
a user's directory is never touched, a broken tokenizer or damaged input is one clear error line naming the
file, a replaced input restarts instead of mixing two versions, and input with nothing usable is not exit 0."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rel_helpers import Result, assert_clean_failure, snapshot

REPO = Path(__file__).resolve().parents[2]


def z2all(*args) -> Result:
    env = {**os.environ, "Z2ALL_NO_PROGRESS": "1", "PYTHONPATH": str(REPO)}
    env.pop("Z2ALL_DEBUG", None)
    p = subprocess.run([sys.executable, "-m", "z2all", *map(str, args)], env=env, capture_output=True, text=True,
                       timeout=300)
    return Result(p.returncode, p.stdout, p.stderr)


def ok(res: Result) -> Result:
    assert res.rc == 0 and "Traceback" not in res.text, res.text[-3000:]
    return res


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A z2all tokenizer (ChatML template) and a synthetic instruction set made by `data synth`."""
    from z2all.data.synthetic import generate
    from z2all.tokenizer.train import Config, train_tokenizer

    d = tmp_path_factory.mktemp("relchat")
    texts = [m["content"] for r in generate(400) for m in r["messages"]]
    (d / "text.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    train_tokenizer(Config(inputs=[str(d / "text.jsonl")], out_dir=str(d / "tok"), vocab_size=384, workers=1))
    ok(z2all("data", "synth", "--out", d / "synth", "--n", "600", "--seed", "0"))
    return d


def chat(setup, *args) -> Result:
    return z2all("data", "chat", "--tokenizer", setup / "tok", "--val-fraction", "0.1", *args)


def test_user_directories_are_never_touched(setup, tmp_path):
    src = setup / "synth" / "train.jsonl"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    (mine / "train-00000.bin").write_bytes(b"\x00\x01")  # looks like ours, is not
    before = snapshot(mine)
    assert_clean_failure(chat(setup, "--inputs", src, "--out", mine), "not empty", str(mine))
    assert snapshot(mine) == before
    assert_clean_failure(chat(setup, "--inputs", src, "--out", setup / "synth"), "contains the input")
    assert_clean_failure(chat(setup, "--inputs", src, "--out", setup), "contains the input")
    # the output of another command is refused by both commands
    ok(chat(setup, "--inputs", src, "--out", tmp_path / "sft"))
    before = snapshot(tmp_path / "sft")
    assert_clean_failure(z2all("data", "synth", "--out", tmp_path / "sft", "--n", "5"), "data chat")
    assert snapshot(tmp_path / "sft") == before
    assert "nothing to do" in ok(chat(setup, "--inputs", src, "--out", tmp_path / "sft")).out
    assert snapshot(tmp_path / "sft") == before


def test_broken_tokenizer_is_one_line_naming_the_file(setup, tmp_path):
    import shutil

    src = setup / "synth" / "train.jsonl"
    assert_clean_failure(chat(setup, "--inputs", src, "--out", tmp_path / "o1", "--tokenizer", tmp_path / "none"),
                         "tokenizer.json not found")
    tok = tmp_path / "tok"
    shutil.copytree(setup / "tok", tok)
    cfg = json.loads((tok / "tokenizer_config.json").read_text())
    (tok / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "chat_template"}))
    assert_clean_failure(chat(setup, "--inputs", src, "--out", tmp_path / "o2", "--tokenizer", tok),
                         "tokenizer_config.json has no chat_template")
    (tok / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": "{% for m in messages %}"}))
    assert_clean_failure(chat(setup, "--inputs", src, "--out", tmp_path / "o3", "--tokenizer", tok),
                         "not valid Jinja")
    (tok / "tokenizer_config.json").write_text("{broken")
    assert_clean_failure(chat(setup, "--inputs", src, "--out", tmp_path / "o4", "--tokenizer", tok),
                         "tokenizer_config.json is not valid JSON")
    (tok / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tok / "tokenizer.json").write_text('{"model": ')  # cut short: the Rust parser's bare Exception
    for argv in (("data", "chat", "--inputs", src, "--out", tmp_path / "o5", "--tokenizer", tok),
                 ("tokenizer", "eval", tok)):
        line = assert_clean_failure(z2all(*argv), "tokenizer.json is not a readable tokenizer")
        assert "internal error" not in line
    assert not (tmp_path / "o5").exists()


def test_damaged_input_fails_cleanly_and_a_fixed_one_restarts(setup, tmp_path):
    data = (setup / "synth" / "train.jsonl").read_bytes()
    good = tmp_path / "in" / "a.jsonl.gz"
    good.parent.mkdir()
    packed = gzip.compress(data)
    good.write_bytes(packed[: len(packed) * 2 // 3])
    out = tmp_path / "out"
    assert_clean_failure(chat(setup, "--inputs", good, "--out", out, "--batch-mb", "0.01"), str(good), "truncated")
    assert not (out / "meta.json").exists()
    good.write_bytes(packed)  # the user repairs the download: the rerun must not mix the two versions
    ok(chat(setup, "--inputs", good, "--out", out, "--batch-mb", "0.01"))
    ok(chat(setup, "--inputs", setup / "synth" / "train.jsonl", "--out", tmp_path / "ref"))
    for name in sorted(p.name for p in (tmp_path / "ref").iterdir() if p.suffix in (".bin", ".mask", ".idx")):
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    # a replaced input after a finished run: redone from scratch, not "nothing to do"
    rows = data.splitlines()[:50]
    good.write_bytes(gzip.compress(b"\n".join(rows) + b"\n"))
    res = ok(chat(setup, "--inputs", good, "--out", out))
    assert "nothing to do" not in res.out
    meta = json.loads((out / "meta.json").read_text())
    assert meta["train_examples"] + meta["val_examples"] == 50


def test_unusable_input_is_not_exit_0(setup, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "not a conversation"}\n[1]\n{"messages": [{"role": "user", "content": "q"}]}\n')
    assert_clean_failure(chat(setup, "--inputs", bad, "--out", tmp_path / "o1"), "no conversation survived",
                         f"{bad}:1")
    mixed = tmp_path / "mixed.jsonl"
    good = (setup / "synth" / "train.jsonl").read_text().splitlines()[:3]
    mixed.write_text("\n".join(good + ["{oops"] * 5) + "\n")
    assert_clean_failure(chat(setup, "--inputs", mixed, "--out", tmp_path / "o2"), "--max-skipped", f"{mixed}:4")
    ok(chat(setup, "--inputs", mixed, "--out", tmp_path / "o2", "--max-skipped", "0.9"))
    (tmp_path / "empty").mkdir()
    assert_clean_failure(chat(setup, "--inputs", tmp_path / "empty", "--out", tmp_path / "o3"), "holds no files")
    assert_clean_failure(chat(setup, "--out", tmp_path / "o4"), "--inputs is empty")
    assert_clean_failure(chat(setup, "--inputs", bad, "--out", tmp_path / "o5", "--schema", "fields"),
                         "--messages-field")
    assert_clean_failure(z2all("data", "synth", "--out", tmp_path / "s", "--tasks", "poetry"), "--tasks poetry")
