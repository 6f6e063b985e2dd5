"""`z2all bench eval` end to end on a handful of items (slow: it builds a tokenizer, a model, an HF export
and lm-eval's HFLM): both sides score the same items, agree on every choice, and the report is written."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_bench_eval_runs_and_agrees(tmp_path, capsys):
    pytest.importorskip("lm_eval.models.huggingface",
                        reason="lm-eval with its hf backend is not installed (pip install 'llm-zero2all[lmeval]')")
    from z2all.bench.evaluate import Config, run

    assert run(Config(items=6, rounds=1, batch_size=8, threads=1, out=str(tmp_path / "b"))) == 0
    out = capsys.readouterr().out
    assert "same choice on 6/6 items" in out and "| lm-eval hf" in out
    report = (tmp_path / "b" / "report.md").read_text(encoding="utf-8")
    diff = float(report.split("max |log-likelihood difference| ")[1].split(";")[0])
    assert diff < 1e-4
