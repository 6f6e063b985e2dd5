"""Exact resume: a run killed with SIGKILL (no chance to clean up) and resumed with --resume logs the same
loss at every step, and ends with the same weights, as an uninterrupted run. A resume onto another seed or a
tokenizer retrained in place is refused in one line; retention on resume keeps a checkpoint holding files
training did not write (`z2all eval`'s eval/)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from train_helpers import REPO, TINY, cli_env, load_weights, run_inproc, train_losses, write_token_dir

from z2all.io import write_checksums
from z2all.train import checkpoint as ckpt
from z2all.utils import UserError


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


def _word_tokenizer(tok_dir, prefix: str, vocab: int = 96) -> None:
    """A word-level tokenizer.json of `vocab` ids ("<prefix>0".. ): two prefixes = a tokenizer retrained in place."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"{prefix}{i}": i for i in range(vocab)}, unk_token=f"{prefix}0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(tok_dir / "tokenizer.json"))


def test_resume_refuses_another_seed_or_tokenizer_and_keeps_a_checkpoint_holding_others_files(tmp_path, capsys):
    tokens = write_token_dir(tmp_path / "tok")
    _word_tokenizer(tmp_path / "tokenizer", "w")
    meta = json.loads((tokens / "meta.json").read_text())
    (tokens / "meta.json").write_text(json.dumps({**meta, "tokenizer_dir": str(tmp_path / "tokenizer")}))
    run = tmp_path / "run"
    common = ["train", *TINY, f"--data.dir={tokens}", f"--out_dir={run}", "--train.log_every=1", "--eval.every=0",
              "--ckpt.every=2", "--ckpt.keep_last=1", "--optim.decay_steps=12"]
    assert run_inproc([*common, "--train.max_steps=2"]) == 0
    step2 = run / "checkpoints" / "step-000002"
    assert ckpt.read_state(step2)["seed"] == 1337 and ckpt.read_state(step2)["tokenizer_sha256"]
    metrics = (run / "metrics.jsonl").read_text()

    # the data order would change mid-run: refused by name, with the run's value, nothing written
    with pytest.raises(UserError, match=r"--seed=1337, now --seed=999.*resume with --seed=1337.*--out_dir"):
        run_inproc([*common, "--train.max_steps=4", "--resume=true", "--seed=999"])
    # the tokenizer retrained in place: the token files are unchanged, their ids would mean other text
    _word_tokenizer(tmp_path / "tokenizer", "v")
    with pytest.raises(UserError, match=r"tokenizer .* is not the one .*step-000002.*sha256"):
        run_inproc([*common, "--train.max_steps=4", "--resume=true"])
    assert (run / "metrics.jsonl").read_text() == metrics and ckpt.list_checkpoints(run) == [step2]
    # a checkpoint of a run that recorded no tokenizer hash (an older z2all) is not refused for it
    state = ckpt.read_state(step2)
    del state["tokenizer_sha256"]
    (step2 / "state.json").write_text(json.dumps(state))
    write_checksums(step2)

    # `z2all eval --ckpt RUN` wrote into step-2, and a note of the user's: retention keeps that checkpoint
    # (saying which file), while the options that may change on a resume (length, intervals) are accepted
    (step2 / "eval").mkdir()
    (step2 / "eval" / "results.json").write_text('{"mine": 1}')
    capsys.readouterr()
    assert run_inproc([*common, "--train.max_steps=8", "--ckpt.every=3", "--eval.every=4", "--resume=true"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "at step 2" in out
    kept = [ln for ln in out.splitlines() if ln.startswith("note: kept the old checkpoint")]
    assert len(kept) == 1 and str(step2) in kept[0] and "eval/results.json" in kept[0], out
    assert (step2 / "eval" / "results.json").read_text() == '{"mine": 1}'
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-000002", "step-000008"]
    # the kept checkpoint is older: a later resume continues from the newest one
    assert run_inproc([*common, "--train.max_steps=10", "--resume=true"]) == 0
    assert "at step 8" in capsys.readouterr().out
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-000002", "step-000010"]


def test_a_val_split_under_one_window_is_said_not_silent(tmp_path, capsys):
    """A val split shorter than seq_len + 1 tokens cannot give one window: the run trains without a val loss
    and without a best checkpoint, and now says so (it was silent)."""
    tokens = write_token_dir(tmp_path / "tok", n_val=10)
    assert run_inproc([*TINY, f"--data.dir={tokens}", f"--out_dir={tmp_path / 'run'}", "--train.max_steps=2",
                       "--eval.every=1", "--ckpt.every=2"]) == 0
    out = capsys.readouterr().out
    assert "note: the val split of" in out and "has 10 tokens, under one window of --data.seq_len 16 + 1" in out
