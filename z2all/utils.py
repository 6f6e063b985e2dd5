"""Ground-floor helpers used by every stage: user errors, rank-aware printing and logging, seeding,
device and dtype choice, run directories, and progress bars that stay quiet in CI logs.

Imports nothing from the rest of the package; torch is imported lazily so data/tokenizer stages that
never touch a model do not pay for it.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


class UserError(Exception):
    """The one user-facing error type: bad input, a bad option or config key, an artifact that is missing,
    corrupt or not ours. The CLI prints the message as one line without a traceback and exits with 2, so
    the message must name the file or option and say what to do."""


# ---------------------------------------------------------------- ranks and printing

def rank() -> int:
    """Global rank under torchrun (RANK), else 0."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def print0(*args: Any, **kwargs: Any) -> None:
    """print() on rank 0 only (every rank prints with `force=True`), flushed so logs interleave sanely."""
    force = kwargs.pop("force", False)
    if force or is_main():
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def get_logger(name: str = "z2all") -> logging.Logger:
    """A logger that writes on rank 0 (warnings and up on other ranks), with the rank in each line."""
    log = logging.getLogger(name)
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        tag = f"[rank {rank()}] " if world_size() > 1 else ""
        h.setFormatter(logging.Formatter(f"%(asctime)s {tag}%(levelname)s %(message)s", "%H:%M:%S"))
        log.addHandler(h)
        log.setLevel(logging.INFO if is_main() else logging.WARNING)
        log.propagate = False
    return log


# ---------------------------------------------------------------- seeding, devices, dtypes

def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    import torch

    torch.manual_seed(seed)


def pick_device(name: str = "auto") -> torch.device:  # noqa: F821
    """'auto' -> cuda:LOCAL_RANK when CUDA is there, else cpu; any torch device string otherwise."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank() % torch.cuda.device_count())
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' asked for but CUDA is not available; use --device=cpu")
    return dev


def pick_dtype(name: str, device: torch.device) -> torch.dtype:  # noqa: F821
    """'auto' -> bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU; or 'fp32'/'bf16'/'fp16'."""
    import torch

    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in table:
        raise UserError(f"unknown dtype '{name}'; use one of auto, {', '.join(table)}")
    return table[name]


# ---------------------------------------------------------------- run directories

def make_run_dir(base: str | os.PathLike, name: str | None = None) -> Path:
    """`base/name`, or `base/<YYYYmmdd-HHMMSS>` when no name is given; created if missing."""
    path = Path(base) / (name or time.strftime("%Y%m%d-%H%M%S"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


def peak_rss_bytes() -> int:
    """Peak resident set size of this process: VmHWM from /proc. `getrusage().ru_maxrss` is not used
    because Linux keeps it across execve, so a freshly spawned child would report its parent's peak
    whenever that was higher than its own."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------- progress bars

def quiet_progress() -> bool:
    """Bars are drawn only on an interactive terminal, on rank 0, and not when Z2ALL_NO_PROGRESS is set;
    in CI logs (no TTY) they would print thousands of carriage-return lines."""
    if os.environ.get("Z2ALL_NO_PROGRESS") or not is_main():
        return True
    return not sys.stderr.isatty()


def progress(iterable: Iterable | None = None, *, total: float | None = None, desc: str = "",
             unit: str = "it", unit_scale: bool = False, **kwargs: Any):
    """A tqdm bar, silent off a terminal (see `quiet_progress`); stages print their own one-line summary
    when they finish so logs still show the work was done."""
    from tqdm import tqdm  # not tqdm.auto: its notebook check imports asyncio (+40-80 ms per stage), and a
    # notebook's stderr is no TTY, so the bar would be off there anyway

    quiet = quiet_progress()
    return tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=unit_scale, disable=quiet,
                dynamic_ncols=True, mininterval=0.5, **kwargs)


# ---------------------------------------------------------------- tables

def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
    out = [line(headers), "| " + " | ".join("-" * w for w in widths) + " |"]
    out += [line(r) for r in cells]
    return "\n".join(out)
