"""Fault classes that belong to the CLI entry itself: operating-system errors, internal errors and Ctrl-C
become one line and a non-zero exit; --debug shows the traceback."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import pytest
from rel_helpers import assert_clean_failure, z2all

from z2all import cli
from z2all.utils import UserError


def _fake(monkeypatch, exc):
    class Config:
        pass

    def run(cfg):
        raise exc

    monkeypatch.setattr(cli, "parse_config", lambda prog, cmd, rest: Config())
    monkeypatch.setattr(cli, "_load_command", lambda cmd: (Config, run))


@pytest.mark.parametrize("exc, rc, words", [
    (OSError(errno.ENOSPC, "No space left on device", "/data/x.bin"), 1, ["disk full", "/data/x.bin"]),
    (PermissionError(errno.EACCES, "Permission denied", "/root/x"), 1, ["permission denied", "/root/x"]),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "out/f"), 1, ["not a directory", "out/f"]),
    (UserError("--top_p must be in (0, 1]"), 2, ["--top_p"]),
    (RuntimeError("boom"), 1, ["internal error", "RuntimeError: boom", "--debug"]),
])
def test_errors_become_one_line(monkeypatch, capsys, exc, rc, words):
    _fake(monkeypatch, exc)
    assert cli.main(["plot"]) == rc
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w.lower() in err.lower()
    _fake(monkeypatch, exc)
    with pytest.raises(type(exc)):
        cli.main(["plot", "--debug"])


def test_real_os_error_from_a_command(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("I am a file")
    res = z2all("plot", str(tmp_path / "nope"))
    assert_clean_failure(res)
    assert blocker.read_text() == "I am a file"


def test_sigint_during_startup_exits_quietly(tmp_path):
    """Ctrl-C while the command's modules import (torch takes a second) prints one line, no traceback."""
    env = {**os.environ, "Z2ALL_NO_PROGRESS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "z2all", "generate", "--ckpt", str(tmp_path), "--prompt", "x"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(0.4)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode != 0
    assert "Traceback" not in out + err, err
