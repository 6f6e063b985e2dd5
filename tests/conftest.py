"""Test-wide setup: Triton runs through its interpreter when there is no GPU, `gpu` tests skip cleanly
without CUDA, and `shared_corpora` points at ../shared/corpora (tests that need it skip when it is absent).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

try:
    import torch

    HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    HAS_CUDA = False

# must happen before anything imports triton: on CPU the kernels run in the interpreter (fp32/fp16 only)
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("Z2ALL_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_corpora() -> Path:
    path = SHARED / "corpora"
    if not path.is_dir():
        pytest.skip("../shared/corpora is not present")
    return path


@pytest.fixture
def lock_holder():
    """start(path, command) -> a child process holding z2all.io.dir_lock(path, command), started and holding
    when it returns; killed (SIGKILL: no cleanup runs, the kernel drops the lock) when the test ends."""
    procs = []

    def start(path, command):
        code = ("import sys, time; from z2all.io import dir_lock\n"
                "with dir_lock(sys.argv[1], sys.argv[2]):\n    print('held', flush=True); time.sleep(120)\n")
        p = subprocess.Popen([sys.executable, "-c", code, str(path), command], stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout.readline().strip() == "held"
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()
