"""`z2all bench serve` end to end on a tiny checkpoint (slow: two server processes): the table has a row per
(mode, clients), the single-stream rows (one request; generate() with ids only, and streaming its text as
the command does), the engine-alone rows (no HTTP) and the ratio lines; every request got its tokens; the
clients ran off the engines' CPUs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "serve"))
from serve_helpers import cli_argv, make_ckpt  # noqa: E402

pytestmark = pytest.mark.slow


def test_bench_serve_small(tmp_path):
    pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    ckpt = make_ckpt(tmp_path)
    r = subprocess.run(cli_argv("bench", "serve", "--ckpt", str(ckpt), "--clients", "1,3", "--requests", "1",
                                "--max-tokens", "6", "--prompt-tokens", "8", "--threads", "1"),
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("| ") and ln.split("|")[1].strip() in
            ("batched", "sequential")]
    assert len(rows) == 4
    for row in rows:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert int(cells[3]) == int(cells[2]) * 6  # every request streamed exactly max_tokens tokens
    assert "generate(), in-process, token ids only" in r.stdout
    assert "3 concurrent streams: continuous batching" in r.stdout
    assert "`z2all generate` command's path, in-process, streaming its text" in r.stdout
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("- single stream through the server (batched)"))
    assert "x the tokens/s of the `z2all generate` command's path" in line
    assert "x generate() returning token ids" in line
    assert "peak RSS" in r.stdout
    alone = [ln for ln in r.stdout.splitlines() if ln.startswith("| engine alone, in this process")]
    assert [int(ln.split("|")[2]) for ln in alone] == [1, 3] and all(float(ln.split("|")[6].replace(",", "")) > 0
                                                                  for ln in alone)
    assert "- the engine alone (no HTTP): 3 streams " in r.stdout
    if len(os.sched_getaffinity(0)) > 1:  # the servers pin their engines; the clients keep off those CPUs
        assert "- clients on CPU " in r.stdout and "the servers' engines on CPU " in r.stdout
