"""The serving engine in-process (serve/engine.py), with each backend (torch's ops with oneDNN's packed
weights or torch.mm, the reference; the C kernels, matmuls included): concurrent greedy requests of mixed
prompt lengths, lengths and stop strings that share decode steps and chunked prefills each return what they
return alone, and the same with every backend, equal to generate()'s plain forward."""

from __future__ import annotations

import os
import threading

import pytest
from serve_helpers import make_ckpt

from z2all.model.generate import _decodec, generate, onednn_linear_ok
from z2all.serve.engine import Engine, SamplingParams, load
from z2all.utils import UserError

# (batched_matmul, kernels)
BACKENDS = [pytest.param(("blas", "torch"), id="blas"),
            pytest.param(("onednn", "torch"), id="onednn", marks=pytest.mark.skipif(
                not onednn_linear_ok(), reason="torch's oneDNN linear ops need an x86 CPU build")),
            pytest.param(("auto", "c"), id="c", marks=pytest.mark.skipif(
                _decodec is None and not os.environ.get("Z2ALL_REQUIRE_C"),
                reason="z2all.model._decodec is not built (pip install -e . builds it with a C compiler)"))]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load(str(make_ckpt(tmp_path_factory.mktemp("engine"))), device="cpu")


def run_all(engine: Engine, jobs: list[tuple[list[int], SamplingParams]]) -> list[tuple[list[int], str]]:
    """Submit every job at once (the scheduler held until all are queued: on a loaded machine it could
    otherwise finish the first before the next arrives); (tokens, finish_reason) of each, in order."""
    done = [threading.Event() for _ in jobs]
    out: list = [None] * len(jobs)
    reqs = []
    with engine.cond:  # reentrant: submit takes it too
        for i, (ids, params) in enumerate(jobs):
            def emit(ev, i=i):
                if ev.final:
                    out[i] = ev.finish_reason
                    done[i].set()
            reqs.append(engine.submit(ids, params, emit))
    for d in done:
        assert d.wait(60)
    return [(list(r.out), reason) for r, reason in zip(reqs, out)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_greedy_together_equals_alone(loaded, backend):
    tok = loaded.tok
    texts = ["def f(x):\n    return", "中文的句子" * 6, "a", "word " * 40, "print(", "数据" * 20]
    jobs = [(tok(t)["input_ids"], SamplingParams(max_tokens=n, temperature=0, stop=s or []))
            for t, n, s in zip(texts, (20, 12, 30, 7, 25, 16), (None, None, [" "], None, None, ["\n"]))]
    eng = Engine(loaded.model, tok, max_batch=4, prefill_chunk=16, eos_ids=loaded.eos_ids,
                 vocab_limit=loaded.vocab_limit, batched_matmul=backend[0], kernels=backend[1])
    try:
        alone = [run_all(eng, [j])[0] for j in jobs]
        steps = eng.steps
        together = run_all(eng, jobs)
        assert eng.max_rows > 1 and eng.steps - steps < sum(len(a[0]) for a in alone)  # steps were shared
    finally:
        eng.close()
    assert together == alone
    assert eng.fast.kernels == backend[1] and backend[0] in ("auto", eng.fast.batched_matmul)
    for (ids, p), (out, _) in zip(jobs, alone):  # == the forward's tokens (a stop string may end it early)
        ref = generate(loaded.model, [ids], p.max_tokens, eos_id=loaded.eos_ids, decode="plain")[0]
        assert ref[:len(out)] == out


def test_engine_refuses_a_bad_batched_matmul(loaded):
    with pytest.raises(UserError, match="--batched-matmul"):
        Engine(loaded.model, loaded.tok, batched_matmul="mkl")


@pytest.mark.parametrize("length,steps,rows", [(5, 1, 3), (10, 3, 1)])
def test_short_prompts_share_an_iterations_prefill_budget(loaded, length, steps, rows):
    """Three requests arriving together, 2 tokens each, --prefill-chunk 16: three 5-token prompts (15 <= 16)
    are all filled in the first iteration and decode their second token in one 3-row step; three 10-token
    prompts are filled one per iteration (a second one would pass the budget), so three 1-row steps."""
    eng = Engine(loaded.model, loaded.tok, max_batch=4, prefill_chunk=16, eos_ids=[], vocab_limit=loaded.vocab_limit)
    try:
        done = [threading.Event() for _ in range(3)]
        with eng.cond:  # hold the scheduler until all three are queued (the lock is reentrant for submit)
            for i in range(3):
                eng.submit(list(range(10 + 7 * i, 10 + 7 * i + length)), SamplingParams(max_tokens=2, temperature=0),
                           lambda ev, i=i: ev.final and done[i].set())
        assert all(d.wait(60) for d in done)
        assert (eng.steps, eng.max_rows) == (steps, rows)
    finally:
        eng.close()
