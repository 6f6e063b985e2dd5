"""The engine under `data convert` and `data tokenize`: an ordered parallel map with bounded memory, and the
versioned state file a resumable run commits.

    for tag, result in ordered_map(work, jobs, workers=4, initializer=init, initargs=(...)):
        apply(tag, result)      # in job order, whatever order the workers finish in

`jobs` yields `(tag, payload)`. A payload goes to `work` in a spawned worker process (or in-process with
workers=1, after `initializer(*initargs)` ran here); `payload=None` marks a job that needs no work (an
end-of-file marker, a count the parent made): it comes out as `(tag, None)` in its place. At most
2 x workers + 1 jobs are in flight, so the parent never holds more than that many payloads and results.
The parent alone applies results and commits state, so the output never depends on timing.

If the job iterator raises (a truncated archive, an unreadable file), every job submitted before it is
still yielded, then the exception propagates: a caller can commit what is complete before reporting it.

State: `read_state(path)` / `write_state(path, state)` read and atomically replace a JSON state file; the
caller keeps a "version" (or a signature) in it and starts fresh when it does not match.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from z2all.io import atomic_write_text
from z2all.utils import UserError


class Ready:
    """An already computed result with AsyncResult's get(): inline work (workers=1) and markers travel
    through the same in-order queue as pool results."""

    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


def ordered_map(fn: Callable, jobs: Iterable[tuple[Any, Any]], *, workers: int = 1,
                initializer: Callable | None = None, initargs: tuple = (),
                submitted: Callable[[Any], None] | None = None) -> Iterator[tuple[Any, Any]]:
    """Yield (tag, fn(payload)) for every (tag, payload) of `jobs`, in order; see the module docstring.
    `submitted(tag)` runs after each job is queued (progress bars)."""
    pool = None
    if workers > 1:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(workers, initializer, initargs)
    elif initializer is not None:
        initializer(*initargs)
    limit = 2 * workers + 1
    inflight: deque = deque()
    it = iter(jobs)
    error: BaseException | None = None
    try:
        while True:
            while error is None and len(inflight) < limit:
                try:
                    tag, payload = next(it)
                except StopIteration:
                    break
                except Exception as e:  # reported after the jobs before it
                    error = e
                    break
                if payload is None:
                    inflight.append((tag, None))
                else:
                    inflight.append((tag, pool.apply_async(fn, (payload,)) if pool else Ready(fn(payload))))
                if submitted is not None:
                    submitted(tag)
            if not inflight:
                break
            tag, res = inflight.popleft()
            yield tag, (None if res is None else res.get())
        if error is not None:
            raise error
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


def read_state(path: str | Path, *, corrupt_ok: bool = False) -> dict | None:
    """The committed state at `path`, or None when there is none. A file that is not a JSON object is a
    UserError naming it (or None with corrupt_ok: the caller then starts over)."""
    path = Path(path)
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
        return state
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as e:
        if corrupt_ok:
            return None
        raise UserError(f"{path} is corrupt ({e}); rerun with --overwrite to start over (only the files the "
                        f"run wrote are removed)") from None


def write_state(path: str | Path, state: dict) -> None:
    """Commit `state` atomically: a reader (or a resume after SIGKILL) sees the old or the new one."""
    atomic_write_text(path, json.dumps(state, ensure_ascii=False) + "\n")
