"""Exact resume: a run killed with SIGKILL (no chance to clean up) and resumed with --resume logs the same
loss at every step, and ends with the same weights, as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch
from train_helpers import REPO, TINY, cli_env, load_weights, run_inproc, train_losses, write_token_dir

from z2all.train import checkpoint as ckpt


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, capsys):
    tokens = write_token_dir(tmp_path / "tok")
    steps = 160  # long enough that the kill (polled every 20 ms) lands mid-run on a fast machine
    common = ["train", *TINY, f"--data.dir={tokens}", f"--train.max_steps={steps}", "--train.log_every=1",
              "--ckpt.every=10", "--ckpt.keep_last=1", "--eval.every=80"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    assert run_inproc([*common, f"--out_dir={ref}"]) == 0

    proc = subprocess.Popen([sys.executable, "-m", "z2all", *common, f"--out_dir={killed}"], cwd=REPO, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = killed / "checkpoints" / "step-000020"
    deadline = time.time() + 180
    while time.time() < deadline and not target.is_dir() and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed; lengthen it"
    at = ckpt.read_state(ckpt.latest_checkpoint(killed))["next_step"]
    assert 20 <= at < steps

    assert run_inproc([*common, f"--out_dir={killed}", "--resume=true"]) == 0
    assert f"resumed from {killed / 'checkpoints'}" in capsys.readouterr().out
    # the steps the killed run logged after its last checkpoint were dropped on resume: one record per step
    logged = [json.loads(x)["step"] for x in (killed / "metrics.jsonl").read_text().splitlines()
              if '"kind": "train"' in x]
    assert logged == list(range(1, steps + 1))
    want, got = train_losses(ref), train_losses(killed)
    assert sorted(got) == sorted(want) == list(range(1, steps + 1))
    assert [got[s] for s in range(1, steps + 1)] == [want[s] for s in range(1, steps + 1)]  # bit for bit
    a, b = load_weights(ckpt.latest_checkpoint(ref)), load_weights(ckpt.latest_checkpoint(killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
