"""`z2all bench ...`: side-by-side measurements printed as markdown tables (ours vs the peers, same input,
same machine). Shared helpers: the machine's name, `markdown_table` (from utils), `RowTable` (a table printed
and written row by row as it is measured, so a run cut short keeps its rows), and running a function in a
fresh process to measure its wall time and peak RSS without the parent's memory in the number.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import time
from collections.abc import Callable
from typing import Any

from z2all.utils import markdown_table, peak_rss_bytes  # noqa: F401  (markdown_table re-exported for benches)


def _md_row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


class RowTable:
    """A markdown table that is printed, and appended to `out` (flushed), one row at a time as each row is
    measured: a benchmark killed by a timeout (the GPU check caps every stage) keeps every row it finished.
    `finish()` prints the notes and replaces `out` atomically with the column-aligned table.

    `out` is truncated when the table starts, as the finished file would replace it anyway."""

    def __init__(self, title: str, headers: list[str], out: str = ""):
        self.title, self.headers, self.rows, self.out = title, list(headers), [], out
        self._file = None
        if out:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            self._file = open(out, "w", encoding="utf-8")  # noqa: SIM115 (closed by finish)
        for line in (title, "", _md_row(self.headers), _md_row("---" for _ in self.headers)):
            self._emit(line)

    def _emit(self, line: str) -> None:
        print(line, flush=True)
        if self._file is not None:
            self._file.write(line + "\n")
            self._file.flush()

    def row(self, cells: list) -> None:
        self.rows.append(list(cells))
        self._emit(_md_row(cells))

    def finish(self, notes: list[str] = ()) -> str:
        """Print the notes; write the whole table (aligned) + notes to `out`; return that text."""
        for line in ("", *notes):
            self._emit(line)
        text = "\n".join([self.title, "", markdown_table(self.headers, self.rows), "", *notes])
        if self._file is not None:
            from z2all.io import atomic_write_text

            self._file.close()
            self._file = None
            atomic_write_text(self.out, text + "\n")
        return text


def total_ram_bytes() -> int | None:
    """Physical memory: psutil when installed, else /proc/meminfo, else sysconf; None when none answers.
    (GPU images often lack psutil, and the GPU check must not die on the machine's name.)"""
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def machine_name() -> str:
    """e.g. 'x86_64, 2 cores, 23 GB RAM, Python 3.11.7, torch 2.13.0+cpu' (+ the GPU when there is one)."""
    ram = total_ram_bytes()
    parts = [platform.machine(), f"{os.cpu_count()} cores", f"{ram / 2**30:.0f} GB RAM" if ram else "RAM unknown",
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
