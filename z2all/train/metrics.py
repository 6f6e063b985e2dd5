"""Throughput accounting and metric sinks: MFU against a table of dense bf16 peaks, peak memory, and a
writer that sends every record to `metrics.jsonl` (always) and TensorBoard (when installed).

MFU = achieved model FLOP/s / (peak FLOP/s of one device * number of devices), where achieved =
`model.flops_per_token(seq_len)` (6N + 12·L·H·Q·T, the PaLM accounting: attention's quadratic term
counted, activation recomputation not) times tokens/s. On CPU there is no meaningful peak: MFU is None
("n/a" in the log). Override the table with `metrics.peak_tflops` for a device it does not know.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

# Dense (no 2:4 sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' datasheets. Matched by
# substring of torch.cuda.get_device_name(), most specific first.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H800", 989.0),
    ("H200", 989.0),
    ("H20", 148.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("A30", 165.0),
    ("A10", 125.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
    ("MI300X", 1307.0),
    ("MI250X", 383.0),
]


def device_peak_flops(device: torch.device, override_tflops: float = 0.0) -> float | None:
    """Peak dense bf16 FLOP/s of one device, or None when unknown (CPU, an unlisted GPU)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float | None, n_devices: int = 1) -> float | None:
    """Model FLOPs utilisation in [0, 1], or None without a known peak."""
    if not peak_flops:
        return None
    return flops_per_token * tokens_per_s / (peak_flops * n_devices)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated accelerator memory on CUDA; peak RSS of the process on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def fmt_mfu(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _scalar(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class MetricsWriter:
    """Appends one JSON object per line to `<run>/metrics.jsonl` (flushed per record, so a killed run keeps
    everything logged so far) and mirrors scalars to TensorBoard when `tensorboard` is importable: a
    top-level number as `<kind>/<key>`, a dict of numbers (a metric per domain) as `<key>/<domain>`.
    Only rank 0 creates one."""

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except Exception:  # tensorboard is optional; its absence is not an error
                self._tb = None

    def log(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()
        if self._tb is not None and "step" in record:
            kind = record.get("kind", "train")
            for k, v in record.items():
                if k in ("step", "kind"):
                    continue
                if _scalar(v):
                    self._tb.add_scalar(f"{kind}/{k}", v, record["step"])
                elif isinstance(v, dict):  # a family per domain ({"bpb": {"zh": 1.2}}): one TB section "bpb"
                    for sub, x in v.items():
                        if _scalar(x):
                            self._tb.add_scalar(f"{k}/{sub}", x, record["step"])

    def close(self) -> None:
        """Called from the trainer's `finally`: it must not mask the error in flight (a full disk, say), so
        TensorBoard's own flush errors are swallowed (every record is already in metrics.jsonl)."""
        self._f.close()
        if self._tb is not None:
            try:
                self._tb.close()
            except Exception:  # noqa: S110 - optional sink; metrics.jsonl holds everything
                pass
            self._tb = None


def truncate_metrics(run_dir: str | os.PathLike, after_step: int) -> int:
    """On resume: drop records logged after the checkpoint's step (the killed run's steps are redone), so
    the file reads as one uninterrupted run. Returns how many records were dropped. Atomic rewrite."""
    from z2all.io import atomic_write_text

    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by SIGKILL mid-write
            dropped += 1
            continue
        if rec.get("step", -1) > after_step:
            dropped += 1
        else:
            kept.append(line)
    atomic_write_text(path, "".join(x + "\n" for x in kept))
    return dropped


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
