"""Fixtures of tests/eval: one tiny checkpoint (random init, real BPE tokenizer) per session; one torch
thread per test (the models are tiny: on a shared 2-core machine a second spinning OpenMP thread made
the scoring 10x slower, measured)."""

from __future__ import annotations

import pytest
from eval_helpers import make_ckpt


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    return make_ckpt(tmp_path_factory.mktemp("eval_model"))


@pytest.fixture(scope="session")
def lm(ckpt):
    from z2all.eval.score import load_lm

    return load_lm(ckpt)


@pytest.fixture(autouse=True)
def one_thread():
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
