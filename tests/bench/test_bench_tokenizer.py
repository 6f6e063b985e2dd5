"""`z2all bench tokenizer`: the memory it reports covers the trainer's whole process tree (a forked worker's
memory counts), repeats are interleaved and reported as best and median, and `--out` writes the report
and the resolved config. Numbers are not asserted beyond what is exact (bytes/token of HF's twin)."""

from __future__ import annotations

import json
import os
import time

from z2all.bench.tokenizer import MB, _run_tree
from z2all.cli import main
from z2all.tokenizer.evaluate import DEMO_DIR


def _fork_hog(mb: int) -> dict:
    """A parent that forks one child holding `mb` MB of written (resident) memory for a while."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        hog = bytearray(b"x") * (mb * MB)
        time.sleep(0.6)
        os._exit(0 if hog else 1)
    os.waitpid(pid, 0)
    return {"self_peak_rss": 0}


def test_tree_memory_counts_forked_children():
    _, wall, rss, pss = _run_tree(_fork_hog, 64)
    assert wall > 0.5
    assert rss >= 64 * MB  # the child's 64 MB, which the parent's own peak (VmHWM) would not show
    assert pss >= 48 * MB


def test_bench_tokenizer_rounds_table_and_out(tmp_path, capsys):
    out = tmp_path / "report"
    args = ["bench", "tokenizer", "--corpora", str(DEMO_DIR), "--sizes-mb", "0.05", "--repeats", "2",
            "--backends", "z2all,hf", "--vocab-size", "512", "--heldout-mb", "0.02", "--out", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "train s best" in text and "train s median" in text and "tree PSS MB" in text
    saved = json.loads((out / "config.json").read_text())
    assert saved["command"] == "z2all bench tokenizer" and saved["config"]["repeats"] == 2
    rounds = [r for r in saved["rounds"] if "budget" not in r]
    assert sorted((r["backend"], r["round"]) for r in rounds) == [("hf", 0), ("hf", 1), ("z2all", 0), ("z2all", 1)]
    assert [r["backend"] for r in rounds] == ["z2all", "hf", "hf", "z2all"]  # the first trainer rotates
    assert all(r["process_s"] > r["train_s"] > 0 and r["tree_rss"] > 0 for r in rounds)
    ratio = next(r for r in saved["table"]["rows"] if r[1] == "ours / hf")
    assert ratio[saved["table"]["headers"].index("bytes/token")] == 1.0  # the same merges as HF
    assert (out / "report.md").read_text().startswith("# z2all bench tokenizer")
    assert main(args[:-1] + [str(DEMO_DIR)]) == 2  # --out never writes into a directory it did not make
