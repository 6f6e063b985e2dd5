"""`z2all eval` through the CLI in-process (`cli.main`) on the tiny checkpoint: a training run directory as
--ckpt scores its latest checkpoint as the other commands do; a run that fails before writing results
leaves no output directory behind; bad inputs (a --texts file that is not UTF-8, task rows with fields of
the wrong JSON type) end in one line naming the file, or are skipped and counted, never a traceback."""

from __future__ import annotations

import json
import random
import shutil

import pytest
from eval_helpers import demo_docs, write_jsonl

from z2all.cli import main
from z2all.io import OWNER_FILE


def _eval(capsys, *args) -> tuple[int, str, str]:
    rc = main(["eval", *map(str, args), "--device", "cpu", "--continuation", "false"])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _one_line_error(err: str, *needles: str) -> None:
    """stderr is one error line, after at most the note naming a run directory's latest checkpoint."""
    lines = err.strip().splitlines()
    line = lines[-1]
    assert all(x.startswith("--ckpt ") for x in lines[:-1]) and "Traceback" not in err, err
    assert "internal error" not in line, err
    assert line.startswith("z2all eval: error:") and all(n in line for n in needles), err


@pytest.fixture
def zh_text(tmp_path):
    p = tmp_path / "zh.txt"
    p.write_text(demo_docs(n=1, chars=400)[0], encoding="utf-8")
    return p


@pytest.fixture
def run_dir(ckpt, tmp_path):
    """A `z2all train` run directory: its own config.json (a training config, not a Hugging Face one, which
    is what made eval misread it), metrics.jsonl, and two checkpoints of which index.json names the later."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for step in ("step-000001", "step-000002"):
        shutil.copytree(ckpt, run / "checkpoints" / step, ignore=shutil.ignore_patterns("eval"))
    (run / "checkpoints" / "index.json").write_text(json.dumps({"latest": "step-000002"}), encoding="utf-8")
    (run / "config.json").write_text(json.dumps({"config": {"data": {"seq_len": 64}}}), encoding="utf-8")
    (run / "metrics.jsonl").write_text('{"step": 2, "loss": 5.0}\n', encoding="utf-8")
    return run


def test_run_directory_scores_its_latest_checkpoint(run_dir, zh_text, capsys):
    rc, out, err = _eval(capsys, "--ckpt", run_dir, "--texts", f"zh={zh_text}")
    latest = run_dir / "checkpoints" / "step-000002"
    assert rc == 0, err
    assert f"--ckpt {run_dir}: using its latest checkpoint {latest}" in err  # the note generate / export print
    results = json.loads((latest / "eval" / "results.json").read_text(encoding="utf-8"))
    assert list(results["models"]) == [str(latest)] and results["models"][str(latest)]["bpb"]["zh"]["bpb"] > 0
    assert str(latest) in out
    assert not (run_dir / "eval").exists() and not (run_dir / "checkpoints" / "step-000001" / "eval").exists()


def test_failure_before_results_leaves_no_output_dir(run_dir, ckpt, zh_text, tmp_path, capsys):
    # --out: the window check fails after the claim, before any result
    out = tmp_path / "new" / "res"
    rc, _, err = _eval(capsys, "--ckpt", run_dir, "--texts", f"zh={zh_text}", "--window", "100000", "--out", out)
    assert rc == 2
    _one_line_error(err, "--window 100000")
    assert not (tmp_path / "new").exists()
    # the default <ckpt>/eval: the first checkpoint's claim is undone when the second's is refused
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        shutil.copytree(ckpt, d, ignore=shutil.ignore_patterns("eval"))
    (b / "eval").mkdir()
    (b / "eval" / "mine.txt").write_text("x", encoding="utf-8")
    rc, _, err = _eval(capsys, "--ckpt", a, "--ckpt", b, "--texts", f"zh={zh_text}")
    assert rc == 2
    _one_line_error(err, str(b / "eval"), "not empty")
    assert not (a / "eval").exists() and sorted(p.name for p in (b / "eval").iterdir()) == ["mine.txt"]
    # and a failed first run does not block the next one
    rc, _, err = _eval(capsys, "--ckpt", a, "--texts", f"zh={zh_text}")
    assert rc == 0, err
    assert {p.name for p in (a / "eval").iterdir()} == {OWNER_FILE, "results.json", "results.md"}


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_texts_file_not_utf8_is_one_line(ckpt, tmp_path, capsys, suffix):
    bad = tmp_path / f"code{suffix}"
    bad.write_bytes(b'{"text": "ok"}\n' + random.Random(0).randbytes(3000))
    out = tmp_path / "res"
    rc, _, err = _eval(capsys, "--ckpt", ckpt, "--texts", f"code={bad}", "--out", out)
    assert rc == 2
    _one_line_error(err, f"--texts code={bad}", "not UTF-8")
    assert not out.exists()
    if suffix == ".txt":
        return
    # a record whose content is not a string is named by file:line too
    rec = write_jsonl(tmp_path / "rec.jsonl", [{"content": "fine"}, {"content": 5}])
    rc, _, err = _eval(capsys, "--ckpt", ckpt, "--texts", f"code={rec}", "--out", out)
    assert rc == 2
    _one_line_error(err, f"{rec}:2", "content")


def test_hellaswag_rows_of_the_wrong_type_are_skipped_and_counted(ckpt, tmp_path, capsys):
    good = {"activity_label": "Cooking", "ctx_a": "She cuts the onion.", "ctx_b": "then",
            "endings": ["she fries it.", "the car drives off.", "he swims.", "it snows."], "label": 0}
    task = write_jsonl(tmp_path / "hs.jsonl", [good, {"activity_label": "a", "ctx_a": "x", "ctx_b": "y",
                                                      "endings": [1, 2], "label": 0},
                                               {**good, "ctx_b": None}, {**good, "label": "1"}])
    out = tmp_path / "res"
    rc, stdout, err = _eval(capsys, "--ckpt", ckpt, "--tasks", f"hellaswag={task}", "--out", out)
    assert rc == 0, err
    assert "| 2 / 4" in stdout and f"hellaswag/hs: skipped 2 row(s), e.g. {task}:2: endings" in stdout
    r = json.loads((out / "results.json").read_text(encoding="utf-8"))["models"][str(ckpt)]["tasks"]["hellaswag/hs"]
    assert (r["n"], r["total"], r["skipped"]) == (2, 4, 2)
    assert [s.split(": ")[0] for s in r["skipped_rows"]] == [f"{task}:2", f"{task}:3"]
    assert "ctx_b must be a string, got null" in r["skipped_rows"][1]
