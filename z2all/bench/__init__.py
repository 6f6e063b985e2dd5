"""`z2all bench ...`: side-by-side measurements printed as markdown tables (ours vs the peers, same input,
same machine). Shared helpers: the machine's name, `markdown_table` (from utils), and running a function in a fresh
process to measure its wall time and peak RSS without the parent's memory in the number.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import time
from collections.abc import Callable
from typing import Any

from z2all.utils import markdown_table, peak_rss_bytes  # noqa: F401  (markdown_table re-exported for benches)


def machine_name() -> str:
    """e.g. 'x86_64, 2 cores, 23 GB RAM, Python 3.11.7, torch 2.13.0+cpu' (+ the GPU when there is one)."""
    import psutil

    parts = [platform.machine(), f"{os.cpu_count()} cores", f"{psutil.virtual_memory().total / 2**30:.0f} GB RAM",
             f"Python {platform.python_version()}"]
    try:
        import torch

        parts.append(f"torch {torch.__version__}")
        if torch.cuda.is_available():
            parts.append(torch.cuda.get_device_name())
    except ImportError:  # pragma: no cover
        pass
    return ", ".join(parts)


def _child(conn, fn, args, kwargs):
    t0 = time.perf_counter()
    try:
        result = fn(*args, **kwargs)
        err = None
    except BaseException as e:  # report, do not hang the parent
        result, err = None, f"{type(e).__name__}: {e}"
    wall = time.perf_counter() - t0
    rss = peak_rss_bytes()
    conn.send((result, wall, rss, err))
    conn.close()


def run_isolated(fn: Callable, *args: Any, **kwargs: Any) -> tuple[Any, float, int]:
    """Run `fn(*args, **kwargs)` in a fresh spawned process; returns (result, wall seconds, peak RSS bytes).
    `fn` must be importable (a module-level function) and its result picklable. The RSS is the child's
    own peak, including its interpreter and imports (~100-300 MB with torch)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(child, fn, args, kwargs))
    p.start()
    child.close()
    result, wall, rss, err = parent.recv()
    p.join()
    if err:
        raise RuntimeError(f"{getattr(fn, '__name__', fn)} failed in the child process: {err}")
    return result, wall, rss
