"""pipeline.ordered_map, the engine under `data convert` and `data tokenize`: results in job order whoever
computed them (this process helping with helps=True, or only spawned processes; workers spawned or forked),
markers in place, a failing job raising at its turn after every earlier result, a failing job iterator
likewise, the spool directory of result files removed however the map ends, and fork chosen only where
fork_is_safe says so."""

from __future__ import annotations

import errno
import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from z2all.data.pipeline import ordered_map


def _slow_square(x: int) -> tuple[int, int]:
    """Jobs of uneven length, so the spawned process and the parent interleave."""
    time.sleep(0.002 * (x % 5))
    if x == 13:
        raise ValueError("job 13 fails")
    return x * x, os.getpid()


def _disk_full(x: int) -> int:
    if x == 2:
        raise OSError(errno.ENOSPC, "No space left on device", "/dev/shm/x")
    return x


def _jobs(n: int, marker_every: int = 7):
    for i in range(n):
        yield (i, None) if i % marker_every == 3 else (i, i)


def _spools() -> set[str]:
    return set(glob.glob("/dev/shm/z2all-results-*")) | set(glob.glob("/tmp/z2all-results-*"))


@pytest.mark.parametrize("start", ["spawn", "fork"])
@pytest.mark.parametrize("workers,helps", [(1, False), (2, True), (2, False), (3, True)])
def test_in_order_whoever_computes(workers, helps, start):
    before = _spools()
    jobs = [j for j in _jobs(40) if j[0] != 13]
    out = list(ordered_map(_slow_square, iter(jobs), workers=workers, helps=helps, start=start))
    assert [t for t, _ in out] == [t for t, _ in jobs]
    for (_tag, res), (_, payload) in zip(out, jobs):
        assert res is None if payload is None else res[0] == payload * payload
    pids = {r[1] for _, r in out if r is not None}
    if workers == 1:
        assert pids == {os.getpid()}
    else:
        assert pids - {os.getpid()}, "a spawned process computed some jobs"
        if not helps:
            assert os.getpid() not in pids
    assert _spools() == before


def _slow_elsewhere(job: tuple[int, int]) -> tuple[int, int]:
    """Instant in the parent (whose pid the job carries), 0.3 s in a spawned process."""
    x, parent = job
    if os.getpid() != parent:
        time.sleep(0.3)
    if x == 4:
        raise ValueError("job 4 fails")
    return x, os.getpid()


@pytest.mark.parametrize("start", ["spawn", "fork"])
def test_parent_takes_over_queued_jobs_when_the_jobs_run_out(start):
    """Jobs 0-2 go to the spawned process's queue; the parent runs 3 while 0 computes, then, with no jobs
    left, runs 2 and 1 itself instead of waiting 0.3 s more for each. Order holds, a taken-over job that
    fails still raises at its turn, and the spool goes."""
    me, before = os.getpid(), _spools()
    out = list(ordered_map(_slow_elsewhere, ((i, (i, me)) for i in range(4)), workers=2, helps=True, start=start))
    assert [tag for tag, _ in out] == [0, 1, 2, 3] and [r[0] for _, r in out] == [0, 1, 2, 3]
    assert out[0][1][1] != me and [r[1] for _, r in out[1:]] == [me] * 3
    got = []
    with pytest.raises(ValueError, match="job 4 fails"):
        for tag, _ in ordered_map(_slow_elsewhere, ((i, (i, me)) for i in range(6)), workers=2, helps=True,
                                  start=start):
            got.append(tag)
    assert got == [0, 1, 2, 3]
    assert _spools() == before  # the results of the taken-over jobs' twins went with the spool


@pytest.mark.parametrize("workers,start", [(1, "spawn"), (2, "spawn"), (2, "fork")])
def test_failing_job_raises_at_its_turn(workers, start):
    before = _spools()
    got = []
    with pytest.raises(ValueError, match="job 13 fails"):
        for tag, _ in ordered_map(_slow_square, _jobs(30), workers=workers, helps=True, start=start):
            got.append(tag)
    assert got == list(range(13))
    assert _spools() == before


@pytest.mark.parametrize("helps,start", [(True, "spawn"), (False, "spawn"), (True, "fork")])
def test_disk_full_in_a_spawned_process_raises_at_its_turn(helps, start):
    """A job that hits a full disk in a spawned process (its spool file, its own writes) surfaces as that
    OSError at its turn, errno kept for the CLI's "disk full" line; the spool is removed."""
    before = _spools()
    got = []
    with pytest.raises(OSError) as e:
        for tag, _ in ordered_map(_disk_full, ((i, i) for i in range(6)), workers=2, helps=helps, start=start):
            got.append(tag)
    assert e.value.errno == errno.ENOSPC and got == [0, 1]
    assert _spools() == before


def test_failing_iterator_and_early_close():
    before = _spools()

    def jobs():
        yield from ((i, i) for i in range(10))
        raise OSError("truncated input")

    got = []
    with pytest.raises(OSError, match="truncated"):
        for tag, _ in ordered_map(_slow_square, jobs(), workers=2, helps=True):
            got.append(tag)
    assert got == list(range(10))
    it = ordered_map(_slow_square, ((i, i) for i in range(100)), workers=2, helps=True)
    assert next(it)[0] == 0
    it.close()  # a caller that stops early (an error in applying a result)
    assert _spools() == before


CTRL_C_SCRIPT = """
import sys, time
from z2all.data.pipeline import ordered_map
def slow(x):
    time.sleep(0.2)
    return x
if __name__ == "__main__":
    try:
        for tag, _ in ordered_map(slow, ((i, i) for i in range(1000)), workers=2, helps=True, start=sys.argv[1]):
            print(tag, flush=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(130)
"""


@pytest.mark.parametrize("start", ["spawn", "fork"])
def test_ctrl_c_reaches_the_group_but_only_the_parent_speaks(tmp_path, start):
    """Ctrl-C goes to every process of the group; the spawned ones start with SIGINT ignored, so only the
    parent reacts (one line) and its `finally` stops them: no KeyboardInterrupt traceback from a child."""
    script = tmp_path / "ctrl_c.py"
    script.write_text(CTRL_C_SCRIPT)
    repo = Path(__file__).resolve().parents[2]
    p = subprocess.Popen([sys.executable, str(script), start], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)}, start_new_session=True)
    try:
        assert p.stdout.readline().strip() == "0"  # running, the spawned process included
        time.sleep(0.5)
        os.killpg(p.pid, signal.SIGINT)
        out = p.communicate(timeout=30)[0]
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 130 and "interrupted" in out and "Traceback" not in out, out[-2000:]


def test_fork_only_where_safe(monkeypatch):
    """data convert forks its workers on Linux while no torch is loaded here, and spawns them otherwise."""
    from z2all.data import pipeline

    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert pipeline.fork_is_safe()
    monkeypatch.setitem(sys.modules, "torch", object())
    assert not pipeline.fork_is_safe()
    monkeypatch.delitem(sys.modules, "torch")
    monkeypatch.setattr(sys, "platform", "darwin")
    assert not pipeline.fork_is_safe()
