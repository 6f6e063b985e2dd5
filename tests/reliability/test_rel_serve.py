"""Fault classes of `z2all serve`, `z2all chat` and `z2all bench serve`, through the real CLI in subprocesses:
each ends in one `error:` line naming the option or file, exit 2, no traceback, and nothing written."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from rel_helpers import Result, assert_clean_failure, snapshot

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "serve"))
from serve_helpers import cli_argv, make_ckpt, need_serve_deps  # noqa: E402

need_serve_deps(client=False)


def run(*args: str, timeout: float = 300) -> Result:
    env = {**os.environ, "Z2ALL_NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("Z2ALL_DEBUG", None)
    p = subprocess.run(cli_argv(*map(str, args)), cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=timeout, input="")
    return Result(p.returncode, p.stdout, p.stderr)


@pytest.fixture
def inproc(monkeypatch, capsys):
    """Variants in this process: cli.main itself (no interpreter start per case)."""
    from z2all import cli

    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO(""))

    def call(*args) -> Result:
        rc = cli.main([str(a) for a in args])
        out, err = capsys.readouterr()
        return Result(rc, out, err)

    return call


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_ckpt(tmp_path_factory.mktemp("relserve"), max_seq_len=64)


def test_wrong_ckpt_paths(tmp_path, inproc):
    """Missing, a file, not a checkpoint: named with --ckpt, for every command (one real process, the
    variants in this one)."""
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    assert_clean_failure(run("serve", "--ckpt", tmp_path / "missing"), "--ckpt", "no such directory")
    for cmd in (["serve"], ["chat"], ["bench", "serve"]):
        for bad, pat in ((tmp_path / "missing", "no such directory"), (tmp_path / "notes.txt", "is a file"),
                         (tmp_path / "empty", "is not a checkpoint")):
            assert_clean_failure(inproc(*cmd, "--ckpt", bad), "--ckpt", pat)
    assert_clean_failure(inproc("serve"), "--ckpt")


def test_bad_options(ckpt, inproc):
    cases = [
        (["serve", "--max-batch", "0"], "--max-batch"),
        (["serve", "--port", "70000"], "--port"),
        (["serve", "--prefill-chunk", "0"], "--prefill-chunk"),
        (["serve", "--max-tokens-in-cache", "1"], "--max-tokens-in-cache"),
        (["serve", "--max-body", "10"], "--max-body"),
        (["chat", "--temperature", "-1"], "--temperature"),
        (["chat", "--max-new-tokens", "64"], "--max-new-tokens"),
        (["bench", "serve", "--clients", "0"], "--clients"),
        (["serve", "--decode-kernels", "asm"], "decode_kernels"),
        (["serve", "--batched-matmul", "mkl"], "batched_matmul"),
        (["bench", "serve", "--batched-matmul", "mkl"], "batched_matmul"),
    ]
    assert_clean_failure(run("serve", "--ckpt", ckpt, "--max-batch", "0"), "--max-batch")
    for args, pat in cases:
        cmd, rest = (args[:2], args[2:]) if args[0] == "bench" else (args[:1], args[1:])
        assert_clean_failure(inproc(*cmd, "--ckpt", ckpt, *rest), pat)


def test_port_in_use(ckpt, inproc):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert_clean_failure(run("serve", "--ckpt", ckpt, "--port", port), "--port", "already in use")
    assert_clean_failure(inproc("serve", "--ckpt", ckpt, "--host", "no-such-host.invalid"), "--host")


def test_damaged_checkpoint(ckpt, tmp_path, inproc):
    """Truncated weights, a corrupt tokenizer, a tokenizer bigger than the model: named, nothing written."""
    bad = tmp_path / "trunc"
    shutil.copytree(ckpt, bad)
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    (bad / "checksums.json").unlink(missing_ok=True)
    before = snapshot(tmp_path)
    assert_clean_failure(run("serve", "--ckpt", bad), "model.safetensors")
    tok = tmp_path / "tok"
    shutil.copytree(ckpt / "tokenizer", tok)
    (tok / "tokenizer.json").write_text("{ not json")
    assert_clean_failure(inproc("chat", "--ckpt", ckpt, "--tokenizer", tok), "tokenizer.json")
    big = tmp_path / "big"
    shutil.copytree(ckpt / "tokenizer", big)
    tj = json.loads((big / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    for i in range(200):  # more tokens than the model has rows
        vocab[f"zzextra{i}"] = len(vocab) + len(tj["added_tokens"]) + 1000
    (big / "tokenizer.json").write_text(json.dumps(tj))
    before = snapshot(tmp_path)
    res = inproc("serve", "--ckpt", ckpt, "--tokenizer", big)
    assert_clean_failure(res, "tokenizer")
    assert snapshot(tmp_path) == before
