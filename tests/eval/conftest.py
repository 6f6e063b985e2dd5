"""Fixtures of tests/eval: one tiny checkpoint (random init, real BPE tokenizer) per session."""

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
