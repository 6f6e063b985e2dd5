"""Helpers of the fault-injection suite: run the real CLI in a subprocess, assert a clean failure (non-zero
exit, one `error:` line, no traceback) and compare a user's files byte for byte before and after."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Result:
    rc: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


def z2all(*args: str, cwd: str | os.PathLike | None = None, timeout: float = 300, env: dict | None = None,
          input: str | None = None) -> Result:
    """Run `python -m z2all ARGS` and capture everything. Progress bars are off (Z2ALL_NO_PROGRESS)."""
    e = {**os.environ, "Z2ALL_NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    e.pop("Z2ALL_DEBUG", None)
    p = subprocess.run([sys.executable, "-m", "z2all", *map(str, args)], cwd=cwd, env=e, capture_output=True,
                       text=True, timeout=timeout, input=input)
    return Result(p.returncode, p.stdout, p.stderr)


def assert_clean_failure(res: Result, *patterns: str) -> str:
    """A non-zero exit, no traceback, and exactly one `error:` line on stderr that contains every pattern
    (case-insensitive). Returns that line."""
    assert res.rc != 0, f"expected a failure, got exit 0:\n{res.text[-2000:]}"
    assert "Traceback" not in res.text, f"traceback shown:\n{res.text[-3000:]}"
    lines = [ln for ln in res.err.splitlines() if "error:" in ln]
    assert len(lines) == 1, f"expected one error line, got:\n{res.err[-2000:]}"
    for pat in patterns:
        assert pat.lower() in lines[0].lower(), f"{pat!r} not in: {lines[0]}"
    return lines[0]


def snapshot(root: str | os.PathLike) -> dict[str, str]:
    """relative path -> sha256 of every file under root (symlinks as their target text). A `.z2all-lock`
    is left out: a killed z2all leaves its (unlocked) lock file, and the next z2all in that directory takes
    it over and removes it, which is not a change to anyone's files."""
    root = Path(root)
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.name == ".z2all-lock":
            continue
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out
