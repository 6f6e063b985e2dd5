"""Fault injection for `z2all eval`, through the real CLI in subprocesses: bad rows are skipped and
counted by file:line while the rest is scored; bad options and missing inputs fail with one line; an
output directory we did not write is refused and left byte-identical. One test per fault class."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rel_helpers import Result, assert_clean_failure, snapshot

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
from eval_helpers import demo_docs, make_ckpt, write_jsonl  # noqa: E402


def zeval(*args, cwd=None) -> Result:
    """`z2all eval ARGS` through the real CLI."""
    env = {**os.environ, "Z2ALL_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # tiny models
    env.pop("Z2ALL_DEBUG", None)
    p = subprocess.run([sys.executable, "-m", "z2all", "eval", *map(str, args)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=600)
    return Result(p.returncode, p.stdout, p.stderr)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel_eval")
    return make_ckpt(root, seed=0), make_ckpt(root, seed=1)


def test_bad_rows_are_skipped_counted_and_the_rest_scored(models, tmp_path):
    a, b = models
    long_ctx = demo_docs(n=1, chars=3000)[0]
    task = write_jsonl(tmp_path / "mc.jsonl", [
        {"context": "The sky is", "choices": ["blue", "green"], "answer": 0},
        "{broken json",
        {"context": "Pick", "choices": ["x", "y"], "answer": "Q"},
        {"context": long_ctx, "choices": ["a", "b"], "answer": 1},
        {"context": "One plus one is", "choices": ["two", "three"], "answer": "two"}])
    text = tmp_path / "zh.txt"
    text.write_text(demo_docs(n=1, chars=500)[0], encoding="utf-8")
    out = tmp_path / "res"
    res = zeval("--ckpt", a, "--ckpt", b, "--tasks", f"jsonl={task}", "--texts", f"zh={text}",
                "--truncate", "skip", "--out", out)
    assert res.rc == 0, res.text[-3000:]
    assert "| 2 / 5" in res.out and f"{task}:2" in res.out  # 2 scored of 5 rows; the first skip is named
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert list(results["models"]) == [str(a), str(b)]  # one comparison: a row per model
    r = results["models"][str(a)]["tasks"]["jsonl/mc"]
    assert (r["n"], r["total"], r["skipped"]) == (2, 5, 3)
    assert [s.split(": ")[0] for s in r["skipped_rows"]] == [f"{task}:2", f"{task}:3", f"{task}:4"]
    assert "answer 'Q'" in r["skipped_rows"][1] and "window" in r["skipped_rows"][2]
    assert results["models"][str(b)]["bpb"]["zh"]["bpb"] > 0
    md = (out / "results.md").read_text(encoding="utf-8")
    assert "### jsonl/mc" in md and "zh bpb" in md and md.count(str(a)) == 2


def test_bad_options_and_inputs_fail_with_one_line(models, tmp_path):
    a, _ = models
    task = write_jsonl(tmp_path / "t.jsonl", [{"context": "c", "choices": ["x", "y"], "answer": 0}])
    assert_clean_failure(zeval("--ckpt", tmp_path / "nope", "--tasks", f"jsonl={task}"), "nope", "not a directory")
    assert_clean_failure(zeval("--ckpt", a, "--tasks", f"squad={task}"), "unknown format 'squad'")
    assert_clean_failure(zeval("--ckpt", a), "nothing to evaluate")
    assert_clean_failure(zeval("--ckpt", a, "--tasks", f"mmlu={tmp_path / 'missing.csv'}"), "missing.csv",
                         "not found")
    assert_clean_failure(zeval("--ckpt", a, "--texts", "zh"), "NAME=PATH")


def test_output_we_did_not_write_is_refused_untouched(models, tmp_path):
    a, _ = models
    task = write_jsonl(tmp_path / "t.jsonl", [{"context": "c", "choices": ["x", "y"], "answer": 0}])
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "results.json").write_text("my own notes\n")
    before = snapshot(theirs)
    assert_clean_failure(zeval("--ckpt", a, "--tasks", f"jsonl={task}", "--out", theirs), str(theirs),
                         "not empty")
    assert snapshot(theirs) == before
    # the default output <ckpt>/eval/ holding a user's file is refused the same way, before any scoring
    (a / "eval").mkdir(exist_ok=True)
    (a / "eval" / "mine.txt").write_text("x")
    assert_clean_failure(zeval("--ckpt", a, "--tasks", f"jsonl={task}"), "eval", "not empty")
    (a / "eval" / "mine.txt").unlink()
    # an empty one is claimed, and marked as ours
    res = zeval("--ckpt", a, "--tasks", f"jsonl={task}")
    assert res.rc == 0, res.text[-2000:]
    assert json.loads((a / "eval" / "results.json").read_text())["models"][str(a)]["tasks"]["jsonl/t"]["n"] == 1
