"""Ground-floor helpers used by every stage: user errors, rank-aware printing, seeding, device and dtype
choice, child processes that leave Ctrl-C to their parent, and progress bars that stay quiet in CI logs.

Imports nothing from the rest of the package; torch is imported lazily so data/tokenizer stages that
never touch a model do not pay for it.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Iterable, Sequence
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
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {name!r} is not a device torch knows; use auto, cpu, cuda or cuda:N") from None
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


class children_ignore_sigint:
    """`with children_ignore_sigint(): start processes`: processes started inside begin with SIGINT ignored
    (an ignored disposition survives exec, and Python then installs no handler). Ctrl-C reaches the whole
    process group; this process gets it and stops its children itself (a pool's terminate, a closed pipe),
    where a child would otherwise print a KeyboardInterrupt traceback of its own. Main thread only (a no-op
    elsewhere, where signal handlers cannot be set)."""

    def __enter__(self):
        import signal
        import threading

        self.old = None
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        return self

    def __exit__(self, *exc):
        import signal

        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)
        return False


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
