"""Fault injection for `z2all sft`, through the real CLI in subprocesses: every bad input is one error line
naming the option and nothing is created; an output directory that is not an SFT run (a user's files, a
`z2all train` run, one holding the inputs) or an earlier SFT run without --resume is refused with its files
byte-identical; a damaged --init checkpoint is named. (Kill-and-resume: tests/train/test_train_sft.py.)"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from rel_helpers import Result, assert_clean_failure, snapshot

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from sft_helpers import TINY_SFT, make_sft_inputs  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def sft(*args: str) -> Result:
    import os

    env = {**os.environ, "Z2ALL_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    env.pop("Z2ALL_DEBUG", None)
    p = subprocess.run([sys.executable, "-m", "z2all", "sft", *map(str, args)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    return Result(p.returncode, p.stdout, p.stderr)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_sft_inputs(tmp_path_factory.mktemp("rel_sft"))


def base_args(inputs, out, **over) -> list[str]:
    opts = {"--init": inputs["base"], "--data.dir": inputs["chat"], "--out_dir": out}
    given = {**dict(a.split("=", 1) for a in TINY_SFT), "--train.max_steps": 2, "--eval.samples": 0, **opts, **over}
    return [f"{k}={v}" for k, v in given.items() if v is not None]


@pytest.mark.slow  # 11 CLI processes: ~1-3 min on 2 busy cores
def test_bad_inputs_are_one_line_and_create_nothing(inputs, tmp_path):
    tok_data = tmp_path / "tokens"
    tok_data.mkdir()
    (tok_data / "meta.json").write_text('{"format": "z2all-tokens", "vocab_size": 384}')
    (tmp_path / "file.txt").write_text("x")
    other_tok = tmp_path / "other_tok"
    shutil.copytree(inputs["tok"], other_tok)
    text = (other_tok / "tokenizer.json").read_text()
    (other_tok / "tokenizer.json").write_text(text.replace('"<|pad|>"', '"<|pa|>"'))
    cases = [
        ({"--init": None}, ("--init",)),
        ({"--init": tmp_path / "nowhere"}, ("--init", "no such directory")),
        ({"--init": tmp_path / "file.txt"}, ("--init", "is a file")),
        ({"--init": inputs["chat"]}, ("--init", "not a checkpoint")),
        ({"--data.dir": tmp_path / "empty"}, ("--data.dir", "meta.json")),
        ({"--data.dir": tok_data}, ("not a `z2all data chat` directory",)),
        ({"--tokenizer": other_tok}, ("--tokenizer", "not the one")),
        ({"--tokenizer": inputs["synth"]}, ("--tokenizer", "tokenizer.json")),
        ({"--data.seq_len": 4096}, ("--data.seq_len=4096", "max_seq_len")),
        ({"--train.epochs": 0}, ("--train.epochs=0",)),
        ({"--optim.lr": "nan"}, ("lr",)),
    ]
    for i, (over, patterns) in enumerate(cases):
        out = tmp_path / f"out{i}"
        res = sft(*base_args(inputs, out, **over))
        assert_clean_failure(res, *patterns)
        assert not out.exists(), f"{over}: created {out}"


@pytest.mark.slow  # 6 CLI processes
def test_output_dirs_that_are_not_this_run_are_refused_untouched(inputs, tmp_path):
    users = tmp_path / "users"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    train_run = tmp_path / "train_run"
    train_run.mkdir()
    (train_run / ".z2all-owner.json").write_text('{"command": "train"}')
    (train_run / "metrics.jsonl").write_text("")
    earlier = tmp_path / "earlier"
    assert sft(*base_args(inputs, earlier)).rc == 0
    cases = [(users, ("not empty",)), (train_run, ("z2all train",)), (earlier, ("--resume",)),
             (inputs["chat"].parent, ("contains the input",))]
    for out, patterns in cases:
        before = snapshot(out)
        assert_clean_failure(sft(*base_args(inputs, out)), "--out_dir", *patterns)
        assert snapshot(out) == before, f"{out} changed"
    assert sft(*base_args(inputs, earlier), "--resume=true").rc == 0  # the same run continues fine


def test_damaged_init_checkpoint_is_named(inputs, tmp_path):
    init = tmp_path / "init"
    shutil.copytree(inputs["base"], init)
    weights = init / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    res = sft(*base_args(inputs, tmp_path / "out", **{"--init": init}))
    assert_clean_failure(res, "model.safetensors", "corrupt or truncated")
    assert not (tmp_path / "out").exists()
