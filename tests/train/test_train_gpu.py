"""On a CUDA GPU (skipped elsewhere): a short bf16 run with fused AdamW reports MFU and peak memory, and
resumes; activation checkpointing leaves the losses unchanged."""

from __future__ import annotations

import pytest
from train_helpers import TINY, run_inproc, train_losses, write_token_dir

pytestmark = pytest.mark.gpu


def _gpu_args(tmp_path, name, *extra):
    tokens = write_token_dir(tmp_path / "tok")
    args = [a for a in TINY if not a.startswith("--device")]
    return [*args, "--device=cuda", f"--data.dir={tokens}", f"--out_dir={tmp_path / name}", "--train.log_every=1",
            "--eval.every=0", "--train.max_steps=6", "--metrics.peak_tflops=100", *extra]


def test_bf16_run_reports_mfu_and_memory(tmp_path):
    import json

    assert run_inproc(_gpu_args(tmp_path, "a")) == 0
    recs = [json.loads(x) for x in (tmp_path / "a/metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    assert all(r["mfu"] is not None and r["mfu"] > 0 and r["peak_mem_bytes"] > 0 for r in train)


def test_activation_checkpointing_same_losses(tmp_path):
    assert run_inproc(_gpu_args(tmp_path, "a", "--dtype=fp32")) == 0
    assert run_inproc(_gpu_args(tmp_path, "b", "--dtype=fp32", "--train.activation_checkpointing=true")) == 0
    assert train_losses(tmp_path / "b") == pytest.approx(train_losses(tmp_path / "a"), rel=1e-5)
