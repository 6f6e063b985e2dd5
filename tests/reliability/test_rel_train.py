"""Fault classes of `z2all train` (and `z2all plot`), driven through the real CLI in subprocesses with a ~30k
parameter model and a handful of steps: a user's directory is never written into, damaged or mismatched
inputs are refused by name, a corrupt latest checkpoint is skipped on resume (and the run continues exactly),
a full disk during a checkpoint save keeps the earlier checkpoints, bad option values name the option."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from rel_helpers import assert_clean_failure, snapshot, z2all

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from train_helpers import TINY, train_losses, write_token_dir  # noqa: E402

from z2all.io import verify_checksums  # noqa: E402
from z2all.utils import UserError  # noqa: E402

ENV = {"OMP_NUM_THREADS": "1"}
STEPS = ["--train.log_every=1", "--eval.every=0", "--ckpt.every=2", "--ckpt.keep_last=2", "--optim.decay_steps=8"]


def train(tokens: Path, out: Path, *extra: str, max_steps: int = 4):
    return z2all("train", *TINY, *STEPS, f"--data.dir={tokens}", f"--out_dir={out}", f"--train.max_steps={max_steps}",
                 *extra, env=ENV)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A token dir and a finished 4-step run with checkpoints at steps 2 and 4 (copy it before changing it)."""
    root = tmp_path_factory.mktemp("trained")
    tokens = write_token_dir(root / "tok")
    res = train(tokens, root / "run")
    assert res.rc == 0, res.text[-3000:]
    return tokens, root / "run"


def _copy_run(trained, tmp_path) -> tuple[Path, Path]:
    tokens, run = trained
    shutil.copytree(run, tmp_path / "run", symlinks=True)
    return tokens, tmp_path / "run"


def test_user_directories_are_never_written(trained, tmp_path):
    tokens, run = _copy_run(trained, tmp_path)
    # a directory of someone else's files
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    (foreign / "metrics.jsonl").write_text("not ours\n")
    before = snapshot(foreign)
    assert_clean_failure(train(tokens, foreign), "--out_dir", "not empty", "notes.txt")
    assert snapshot(foreign) == before
    # an out_dir that holds the token files
    assert_clean_failure(train(tokens, tokens.parent), "contains the input")
    # a fresh start over an earlier run: refused, not mixed in (nothing written, not even a marker)
    before = snapshot(run)
    assert_clean_failure(train(tokens, run), "already holds a training run", "--resume")
    assert snapshot(run) == before
    # plot never replaces a PNG it did not write, and its --out_dir must be a directory
    (run / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\nmy own figure")
    before = snapshot(run)
    assert_clean_failure(z2all("plot", run), "loss.png", "not written by `z2all plot`")
    assert_clean_failure(z2all("plot", run, "--out_dir", run / "metrics.jsonl"), "--out_dir", "is a file")
    assert snapshot(run) == before


def test_damaged_or_changed_token_files_are_refused_by_name(trained, tmp_path):
    tokens0, run = _copy_run(trained, tmp_path)
    tokens = tmp_path / "tok"
    shutil.copytree(tokens0, tokens)
    train_bin, meta = tokens / "train-00000.bin", tokens / "meta.json"
    data = train_bin.read_bytes()
    out = tmp_path / "fresh"

    train_bin.write_bytes(data[: len(data) // 3 // 2 * 2])  # truncated to a third, whole tokens
    assert_clean_failure(train(tokens, out), str(train_bin), "meta.json says")
    train_bin.write_bytes(data[:-1])  # half a token
    assert_clean_failure(train(tokens, out), str(train_bin), "not a whole number")
    train_bin.write_bytes(data)
    good_meta = meta.read_text()
    meta.write_text(good_meta[: len(good_meta) // 2])
    assert_clean_failure(train(tokens, out), str(meta), "corrupt")
    meta.unlink()
    assert_clean_failure(train(tokens, out), str(meta), "not found")
    assert not out.exists()  # refused before anything was written

    # same size, same count, different tokens: a resume would silently continue on other data
    meta.write_text(good_meta)
    train_bin.write_bytes(data[2:] + data[:2])
    before = snapshot(run)
    assert_clean_failure(train(tokens, run, "--resume", max_steps=6), "not the data", "train-00000.bin")
    assert snapshot(run) == before


def test_corrupt_latest_checkpoint_resume_falls_back_and_continues(trained, tmp_path):
    tokens, run = _copy_run(trained, tmp_path)
    ref = train_losses(run)
    opt = run / "checkpoints/step-000004/optimizer.pt"
    opt.write_bytes(opt.read_bytes()[: opt.stat().st_size // 3])
    res = train(tokens, run, "--resume", max_steps=6)
    assert res.rc == 0, res.text[-3000:]
    warn = [ln for ln in res.err.splitlines() if ln.startswith("warning:")]
    assert len(warn) == 1 and str(opt) in warn[0] and "step-000002" in warn[0], res.err
    assert "resumed from" in res.out and "at step 2" in res.out
    ckpts = run / "checkpoints"
    assert (ckpts / "step-000004.corrupt").is_dir()  # set aside for inspection, out of retention
    assert verify_checksums(ckpts / "step-000006") and verify_checksums(ckpts / "step-000004")
    got = train_losses(run)
    assert sorted(got) == list(range(1, 7))
    assert [got[s] for s in (1, 2, 3, 4)] == [ref[s] for s in (1, 2, 3, 4)]  # steps 3-4 redone exactly

    # nothing intact at all: one clear line, nothing changed
    for model in ckpts.glob("step-*/model.safetensors"):
        model.write_bytes(model.read_bytes()[:100])
    before = snapshot(run)
    assert_clean_failure(train(tokens, run, "--resume", max_steps=8), "no intact checkpoint", "model.safetensors")
    assert snapshot(run) == before


def _mount_tmpfs(path: Path, size: str) -> str | None:
    """Mount a tmpfs of `size` at path; None on success, else why not."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "mounting a small tmpfs needs root"
    if shutil.which("mount") is None:
        return "no mount command"
    path.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True)
    return None if p.returncode == 0 else f"cannot mount a tmpfs here: {p.stderr.strip()}"


def test_disk_full_during_checkpoint_save_keeps_earlier_checkpoints(trained, tmp_path):
    tokens, run = trained
    ckpt_bytes = sum(f.stat().st_size for f in (run / "checkpoints/step-000002").rglob("*") if f.is_file())
    disk = tmp_path / "disk"
    why = _mount_tmpfs(disk, f"{int(ckpt_bytes * 1.6) // 4096 * 4096}")  # room for one checkpoint, not two
    if why:
        pytest.skip(why)
    try:
        out = disk / "run"
        res = train(tokens, out)
        line = assert_clean_failure(res, "disk full")
        assert res.rc == 1, line
        ckpts = out / "checkpoints"
        assert [p.name for p in ckpts.iterdir() if p.name.startswith("step-")] == ["step-000002"]
        assert verify_checksums(ckpts / "step-000002")
        assert not [p.name for p in ckpts.iterdir() if p.name.startswith(".")], "temp dir left behind"
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_bad_option_values_name_the_option(trained, tmp_path):
    tokens, _ = trained
    out = tmp_path / "out"
    assert_clean_failure(train(tokens, out, "--optim.lr=nan"), "--optim.lr=nan", "finite")
    assert_clean_failure(train(tokens, out, "--optim.beta2=1.5"), "--optim.beta2")
    from z2all.train.optim import OptimConfig, validate_optim  # in-process: a third subprocess costs ~3 s

    with pytest.raises(UserError, match=r"--optim.lr=3e\+38: must be a finite number in \[0, 1e3\]"):
        validate_optim(OptimConfig(lr=3e38))  # AdamW's step size overflowed: an internal error at step 1
    assert not out.exists()


def test_resume_with_another_model_shape_is_refused(trained, tmp_path):
    tokens, run = _copy_run(trained, tmp_path)
    before = snapshot(run)
    assert_clean_failure(train(tokens, run, "--resume", "--model.dim=64", max_steps=6),
                         "step-000004", "dim=32", "dim=64", "--model.dim=32")
    assert snapshot(run) == before
    assert json.loads((run / "checkpoints/index.json").read_text())["latest"] == "step-000004"
