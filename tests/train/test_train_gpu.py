"""On a CUDA GPU (skipped elsewhere): short bf16 runs with fused AdamW report MFU (from the device's peak
table, metrics.PEAK_BF16_TFLOPS: no override) and peak memory; a run with every Triton kernel
(`preset=use_all`, both attention backwards) trains, and resumed from its checkpoint logs the same losses
as an uninterrupted run; activation checkpointing leaves the losses unchanged."""

from __future__ import annotations

import json

import pytest
from train_helpers import TINY, run_inproc, train_losses, write_token_dir

pytestmark = pytest.mark.gpu


def _gpu_args(tmp_path, name, *extra):
    tokens = tmp_path / "tok"
    if not tokens.is_dir():
        write_token_dir(tokens)
    args = [a for a in TINY if not a.startswith("--device")]
    return [*args, "--device=cuda", f"--data.dir={tokens}", f"--out_dir={tmp_path / name}", "--train.log_every=1",
            "--eval.every=0", "--train.max_steps=6", "--optim.fused=true", *extra]


def _train_records(run_dir):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def _peak_known():
    import torch

    from z2all.train.metrics import device_peak_flops

    if device_peak_flops(torch.device("cuda")) is None:
        pytest.fail(f"{torch.cuda.get_device_name()} is not in z2all.train.metrics.PEAK_BF16_TFLOPS: add its dense "
                    "bf16 peak so MFU is reported")


def test_bf16_run_reports_mfu_and_memory(tmp_path):
    _peak_known()
    assert run_inproc(_gpu_args(tmp_path, "a")) == 0
    train = _train_records(tmp_path / "a")
    assert train and all(r["mfu"] is not None and 0 < r["mfu"] < 1 and r["peak_mem_bytes"] > 0 for r in train)


@pytest.mark.parametrize("bwd", ["split", "atomic"])
def test_use_all_trains_and_resumes(tmp_path, bwd):
    """Every Triton kernel, bf16 autocast, fused AdamW: 8 steps in one go vs 4 + resume + 4 (same schedule:
    decay_steps pins it). The losses fall, MFU comes from the peak table, and the resumed steps match."""
    _peak_known()
    common = ["--model.ops.preset=use_all", f"--model.ops.attention_bwd={bwd}", "--optim.decay_steps=8",
              "--optim.warmup_steps=2", "--ckpt.every=4"]
    assert run_inproc(_gpu_args(tmp_path, "full", *common, "--train.max_steps=8")) == 0
    assert run_inproc(_gpu_args(tmp_path, "cut", *common, "--train.max_steps=4")) == 0
    assert run_inproc(_gpu_args(tmp_path, "cut", *common, "--train.max_steps=8", "--resume=true")) == 0
    full, cut = train_losses(tmp_path / "full"), train_losses(tmp_path / "cut")
    assert sorted(full) == sorted(cut) == list(range(1, 9))
    # split is deterministic; atomic dQ adds in a varying order, so its steps after 1 may differ in low bits
    tol = 1e-6 if bwd == "split" else 1e-3
    assert [cut[s] for s in range(1, 9)] == pytest.approx([full[s] for s in range(1, 9)], rel=tol)
    assert full[8] < full[1]
    recs = _train_records(tmp_path / "full")
    assert all(r["mfu"] is not None and 0 < r["mfu"] < 1 for r in recs)


def test_activation_checkpointing_same_losses(tmp_path):
    assert run_inproc(_gpu_args(tmp_path, "a", "--dtype=fp32")) == 0
    assert run_inproc(_gpu_args(tmp_path, "b", "--dtype=fp32", "--train.activation_checkpointing=true")) == 0
    assert train_losses(tmp_path / "b") == pytest.approx(train_losses(tmp_path / "a"), rel=1e-5)
