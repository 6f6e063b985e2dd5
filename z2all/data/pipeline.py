"""The engine under `data convert` and `data tokenize`: an ordered parallel map with bounded memory, and the
versioned state file a resumable run commits.

    for tag, result in ordered_map(work, jobs, workers=4, initializer=init, initargs=(...)):
        apply(tag, result)      # in job order, whatever order the workers finish in

`jobs` yields `(tag, payload)`. workers=1 runs every job here (after `initializer(*initargs)`). workers=N:
- helps=False (data tokenize): N spawned processes run the jobs; this one only collects and applies.
- helps=True (data convert): this process is one of the N. It spawns N-1 and, whenever the oldest job's
  result is not ready yet, takes the next job and runs it itself instead of waiting (at most HELP_AHEAD
  such results ahead of the queue). Why: converting, the parent's own share (reading, deduplicating,
  numbering, writing) leaves it idle most of the time, and every spawned process costs an interpreter
  start and a pickle round trip per batch; on 2 cores the parent's help is the second worker (measured in
  docs/performance.md, "Conversion with several workers").
A spawned process leaves each result in a file of a private spool directory (/dev/shm when present) and
sends back only its path: the pool's result thread would otherwise read megabytes in pipe-sized pieces,
taking the GIL for each, while this process holds it running jobs itself. `payload=None` marks a job that
needs no work (an end-of-file marker, a count the parent made): it comes out as `(tag, None)` in its place.
At most 2 x spawned + 1 jobs are queued to the spawned processes (plus HELP_AHEAD results made here), so
memory stays bounded. With helps, once the jobs run out this process also takes over queued jobs no spawned
process has started, from the last one back, instead of waiting for them: the tail of a 96 MB conversion on
2 cores had it idle ~45 ms for the other process's last jobs. The parent alone applies results and commits
state, so the output never depends on timing.

If the job iterator raises (a truncated archive, an unreadable file), every job submitted before it is
still yielded, then the exception propagates: a caller can commit what is complete before reporting it. A
job that fails raises at its turn, whichever process ran it. The spool directory is removed however the map
ends.

State: `read_state(path)` / `write_state(path, state)` read and atomically replace a JSON state file; the
caller keeps a "version" (or a signature) in it and starts fresh when it does not match.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from z2all.io import atomic_write_text
from z2all.utils import UserError, children_ignore_sigint


class Ready:
    """An already computed result (or the exception computing it raised) with AsyncResult's get() and
    ready(): work done here travels through the same in-order queue as pool results."""

    def __init__(self, value=None, error: BaseException | None = None):
        self.value, self.error = value, error

    @classmethod
    def run(cls, fn: Callable, payload) -> Ready:
        try:
            return cls(fn(payload))
        except Exception as e:  # raised by get(), at the job's turn
            return cls(error=e)

    def ready(self) -> bool:
        return True

    def get(self):
        if self.error is not None:
            raise self.error
        return self.value


def _to_file(fn: Callable, payload, directory: str, name: str) -> str:
    """Run fn in a spawned process and leave its pickled result in a file: the pipe back to the parent then
    carries a path, not megabytes (see _FileResult)."""
    import pickle

    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        pickle.dump(fn(payload), f, protocol=pickle.HIGHEST_PROTOCOL)
    return path


class _FileResult:
    """A spawned process's result, read from the file _to_file wrote (then deleted). Why not the pipe: the
    pool's result thread reads a message in pipe-sized chunks, re-taking the GIL for each, and while this
    process runs jobs itself (it holds the GIL for milliseconds at a time) a 4 MB result took up to a few
    hundred ms to cross, with the spawned process blocked on its write meanwhile."""

    def __init__(self, res):
        self.res = res

    def ready(self) -> bool:
        return self.res.ready()

    def get(self):
        import pickle

        path = self.res.get()
        try:
            with open(path, "rb") as f:
                return pickle.load(f)
        finally:
            os.unlink(path)


# results this process may hold beyond the spawned processes' queue (done here while it waits)
HELP_AHEAD = 4


def fork_is_safe() -> bool:
    """Whether worker processes may be forked from this one instead of spawned: on Linux, and only while no
    torch is loaded here (its OpenMP and allocator state does not survive a fork; `z2all demo` converts in a
    process that has imported it). Why fork at all: a spawned process starts an interpreter and re-imports
    the worker's modules before its first job (88 ms measured on 2 cores, ~12% of a 96 MB conversion on the
    second core), a forked one starts in ~4 ms with everything imported. Threads here at the fork (tqdm's
    monitor) do not matter: the children run only the job function, which takes none of their locks."""
    import sys

    return sys.platform.startswith("linux") and "torch" not in sys.modules


def ordered_map(fn: Callable, jobs: Iterable[tuple[Any, Any]], *, workers: int = 1, helps: bool = False,
                initializer: Callable | None = None, initargs: tuple = (),
                submitted: Callable[[Any], None] | None = None, start: str = "spawn") -> Iterator[tuple[Any, Any]]:
    """Yield (tag, fn(payload)) for every (tag, payload) of `jobs`, in order; see the module docstring.
    helps: this process counts as one of `workers` and runs jobs while it waits (else all `workers` are
    spawned and it only collects). `submitted(tag)` runs after each job is queued or run here (progress).
    start: how worker processes start, "spawn" or "fork" (a caller that checked fork_is_safe())."""
    pool = None
    spawned = workers - 1 if helps else workers
    if initializer is not None and (workers == 1 or helps):
        initializer(*initargs)  # this process runs jobs too
    if workers > 1:
        import multiprocessing as mp

        # results come back through files here (_FileResult): /dev/shm when there is one (memory, never disk)
        spool = tempfile.mkdtemp(prefix="z2all-results-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        names = itertools.count()
        with children_ignore_sigint():  # Ctrl-C stops this process, whose `finally` terminates the pool
            pool = mp.get_context(start).Pool(spawned, initializer, initargs)
    # jobs queued to the spawned processes (all jobs in flight with workers=1), and all jobs in flight. With
    # helps this process refills the queue only between its own jobs, so the spare one matters: with 2 x
    # spawned the spawned process of a 96 MB conversion sat idle up to 10 ms at a time waiting for work
    limit = 2 * spawned + 1 if pool is not None else 1
    cap = limit + (HELP_AHEAD if helps else 0)
    inflight: deque = deque()  # (tag, result, payload of a pool job or None)
    queued = 0  # pool jobs in `inflight`
    it = iter(jobs)
    error: BaseException | None = None
    exhausted = False

    def take():
        """The next job, or None at the end (or once the iterator raised: `error`)."""
        nonlocal error, exhausted
        if exhausted:
            return None
        try:
            return next(it)
        except StopIteration:
            exhausted = True
            return None
        except Exception as e:  # reported after the jobs before it
            error, exhausted = e, True
            return None

    def add(job, here: bool) -> None:
        nonlocal queued
        tag, payload = job
        if payload is None:
            res = None
        elif here:
            res = Ready.run(fn, payload)
        else:
            res = _FileResult(pool.apply_async(_to_file, (fn, payload, spool, f"{next(names)}.pkl")))
            queued += 1
        inflight.append((tag, res, payload if isinstance(res, _FileResult) else None))
        if submitted is not None:
            submitted(tag)

    def take_over() -> bool:
        """No jobs left and the oldest result still computing: run here the last queued job no spawned
        process has started, rather than wait for it (its spawned twin, if it ever runs, is never read; the
        pool is terminated at the end). Pool processes take jobs in submission order, so of the pending
        pool jobs at most the first `spawned` have started."""
        nonlocal queued
        pending = [i for i, (_, res, _) in enumerate(inflight) if isinstance(res, _FileResult) and not res.ready()]
        if len(pending) <= spawned:
            return False
        i = pending[-1]
        tag, _, payload = inflight[i]
        inflight[i] = (tag, Ready.run(fn, payload), None)
        queued -= 1
        return True

    try:
        while True:
            while queued < limit and len(inflight) < cap and (job := take()) is not None:
                add(job, pool is None)
            if not inflight:
                break
            head = inflight[0][1]
            # help instead of waiting: the oldest result is still being computed by a spawned process
            if helps and head is not None and not head.ready():
                if len(inflight) < cap and (job := take()) is not None:
                    add(job, True)
                    continue
                if exhausted and take_over():
                    continue
            tag, res, _ = inflight.popleft()
            if isinstance(res, _FileResult):
                queued -= 1
            yield tag, (None if res is None else res.get())
        if error is not None:
            raise error
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
            shutil.rmtree(spool, ignore_errors=True)  # our own temp directory: results never collected


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
