"""`z2all bench patterns` trains one tokenizer per split pattern on the same text and reports bytes/token
per domain and tree memory; --out writes the report and the raw numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from z2all.bench import patterns
from z2all.utils import UserError

DEMO = Path(__file__).resolve().parents[2] / "z2all" / "data" / "demo"


def test_one_row_per_pattern_with_raw_numbers(tmp_path, capsys):
    out = tmp_path / "report"
    cfg = patterns.Config(size_mb=0.3, vocab_size=512, memory_budget="256MB", workers=1, heldout_mb=0.05,
                          patterns=["z2all", "qwen2"], out=str(out))
    assert patterns.run(cfg) == 0
    text = capsys.readouterr().out
    assert "| z2all " in text and "| qwen2 " in text and "llama-bpe" not in text.split("###")[-1]
    raw = json.loads((out / "config.json").read_text())["raw"]
    assert [r["pattern"] for r in raw] == ["z2all", "qwen2"]
    for r in raw:
        assert set(r["bytes_per_token"]) == {"zh", "en", "code"}
        assert all(1.0 < v < 8.0 for v in r["bytes_per_token"].values())
        assert r["tree_rss"] > 0
    assert (out / "report.md").read_text().startswith("### z2all bench patterns")


def test_unknown_pattern_is_refused():
    with pytest.raises(UserError, match="--patterns: unknown gpt5"):
        patterns.Config(patterns=["gpt5"]).validate()


def test_foreign_out_is_refused_before_any_training(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.md").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        patterns.run(patterns.Config(size_mb=0.1, vocab_size=512, out=str(out)))
    assert [p.name for p in out.iterdir()] == ["notes.md"] and (out / "notes.md").read_text() == "keep me"


def test_bench_llamacpp_bad_arguments_are_one_line(tmp_path):
    from z2all.bench import llamacpp

    with pytest.raises(UserError, match="--ckpt"):
        llamacpp.run(llamacpp.Config())
    with pytest.raises(UserError, match=">= 1"):
        llamacpp.run(llamacpp.Config(ckpt=str(tmp_path), new_tokens=0))
