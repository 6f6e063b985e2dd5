"""Fault injection for `z2all data prefs`, `z2all dpo` and LoRA exports, through the real CLI in subprocesses:
bad options and inputs are one error line naming the option or file, nothing created; output directories that
are not ours keep their files byte-identical; a LoRA checkpoint whose base is gone or changed is named in one
line by `export hf` and `generate`. (Kill-and-resume: tests/train/test_train_dpo.py.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from rel_helpers import Result, assert_clean_failure, snapshot

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from sft_helpers import make_sft_inputs  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TINY = ["--data.batch_size=2", "--eval.max_batches=1", "--metrics.tensorboard=false", "--device=cpu", "--threads=1",
        "--train.max_steps=2"]


def cli(*args: str) -> Result:
    env = {**os.environ, "Z2ALL_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    env.pop("Z2ALL_DEBUG", None)
    p = subprocess.run([sys.executable, "-m", "z2all", *map(str, args)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    return Result(p.returncode, p.stdout, p.stderr)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from z2all.data import prefs

    root = tmp_path_factory.mktemp("rel_dpo")
    got = make_sft_inputs(root, n=60)
    recs = [json.loads(x) for x in (got["synth"] / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    f = root / "pairs.jsonl"
    f.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in prefs.synthetic_pairs(recs)[:20]),
                 encoding="utf-8")
    got["pairs"] = f
    prefs.run(prefs.Config(inputs=[str(f)], tokenizer=str(got["tok"]), out=str(root / "prefs"), val_fraction=0.2,
                           max_len=128))
    got["prefs"] = root / "prefs"
    return got


def test_bad_inputs_and_options_are_one_line(inputs, tmp_path):
    out = tmp_path / "o"
    cases = [
        (["data", "prefs", "--inputs", tmp_path / "missing.jsonl", "--tokenizer", inputs["tok"], "--out", out],
         ["missing.jsonl"]),
        (["data", "prefs", "--inputs", inputs["pairs"], "--tokenizer", tmp_path, "--out", out], ["tokenizer"]),
        (["data", "prefs", "--inputs", inputs["pairs"], "--tokenizer", inputs["tok"], "--out", out,
          "--val-fraction", "1.5"], ["--val-fraction"]),
        (["dpo", f"--init={inputs['base']}", f"--data.dir={tmp_path / 'nope'}", f"--out_dir={out}", *TINY],
         ["nope", "z2all data prefs"]),
        (["dpo", f"--init={tmp_path / 'noinit'}", f"--data.dir={inputs['prefs']}", f"--out_dir={out}", *TINY],
         ["--init"]),
        (["dpo", f"--init={inputs['base']}", f"--data.dir={inputs['prefs']}", f"--out_dir={out}", "--dpo.beta=-1",
          *TINY], ["--dpo.beta=-1"]),
        (["dpo", f"--init={inputs['base']}", f"--data.dir={inputs['prefs']}", f"--out_dir={out}", "--lora.rank=2",
          "--lora.targets=bogus", *TINY], ["--lora.targets", "bogus"]),
    ]
    for args, pats in cases:
        assert_clean_failure(cli(*args), *pats)
        assert not out.exists(), args


def test_foreign_output_dirs_are_refused_byte_identical(inputs, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    before = snapshot(mine)
    assert_clean_failure(cli("data", "prefs", "--inputs", inputs["pairs"], "--tokenizer", inputs["tok"], "--out",
                             mine), str(mine))
    assert_clean_failure(cli("dpo", f"--init={inputs['base']}", f"--data.dir={inputs['prefs']}", f"--out_dir={mine}",
                             *TINY), str(mine))
    # the preference data itself as --out_dir (an input inside the output)
    data_before = snapshot(inputs["prefs"])
    assert_clean_failure(cli("dpo", f"--init={inputs['base']}", f"--data.dir={inputs['prefs']}",
                             f"--out_dir={inputs['prefs']}", *TINY))
    assert snapshot(mine) == before and snapshot(inputs["prefs"]) == data_before


def test_lora_checkpoint_with_its_base_gone_or_changed(inputs, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(inputs["base"], base)
    run = tmp_path / "run"
    res = cli("dpo", f"--init={base}", f"--data.dir={inputs['prefs']}", f"--out_dir={run}", "--lora.rank=2", *TINY)
    assert res.rc == 0, res.text[-2000:]
    ck = sorted((run / "checkpoints").glob("step-*"))[-1]
    res = cli("export", "hf", "--ckpt", ck, "--out", tmp_path / "adapter", "--merge-lora=false")
    assert_clean_failure(res, "--adapter")
    (base / "model.safetensors").write_bytes((base / "model.safetensors").read_bytes()[:-8] + b"\0" * 8)
    assert_clean_failure(cli("export", "hf", "--ckpt", ck, "--out", tmp_path / "hf"), "has changed")
    shutil.rmtree(base)
    assert_clean_failure(cli("export", "hf", "--ckpt", ck, "--out", tmp_path / "hf"), "is gone")
    assert_clean_failure(cli("export", "hf", "--ckpt", ck, "--out", tmp_path / "ad", "--adapter"), "is gone")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "ad").exists()
