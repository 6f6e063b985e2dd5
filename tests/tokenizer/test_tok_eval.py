"""`z2all tokenizer eval`: the per-domain table for ours, its HF BpeTrainer twin and the reference
tokenizers (when ../shared/reference_tokenizers exists)."""

from __future__ import annotations

import json

import pytest

from z2all import cli
from z2all.tokenizer.evaluate import Config, default_references, evaluate
from z2all.tokenizer.train import Config as TrainConfig
from z2all.tokenizer.train import train_tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory, demo_docs):
    d = tmp_path_factory.mktemp("eval")
    corpora = d / "corpora"
    corpora.mkdir()
    for dom, docs in demo_docs(40_000).items():
        docs = [t[:4000] for t in docs]
        (corpora / f"{dom}_demo.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    train_tokenizer(TrainConfig(inputs=[str(corpora)], out_dir=str(d / "ours"), vocab_size=640, workers=1))
    return d, corpora


def test_eval_table_ours_twin_and_references(setup):
    d, corpora = setup
    headers, rows = evaluate(Config(tokenizers=[str(d / "ours")], corpora=str(corpora), max_chars=20_000))
    assert headers[:4] == ["tokenizer", "vocab", "zh bytes/tok", "zh chars/tok"] and headers[-1] == "round trip"
    names = [r[0] for r in rows]
    assert names[0] == "ours (z2all)" and names[1].startswith("HF BpeTrainer twin")
    ours, twin = rows[0], rows[1]
    assert ours[1] == twin[1] == 640
    all_col = headers.index("all bytes/tok")
    assert abs(ours[all_col] / twin[all_col] - 1) < 0.01  # same merges -> same compression
    assert ours[-1] == "ok" and twin[-1] == "ok"
    zh = headers.index("zh bytes/tok")
    assert 1.0 < ours[zh] < 6.0  # Chinese: ~3 bytes per character, at least one token per chunk
    if (default_references() / "gpt2.tiktoken").exists():
        assert {"gpt2 (tiktoken)", "cl100k_base (tiktoken)", "o200k_base (tiktoken)"} <= set(names)


def test_eval_cli_prints_markdown(setup, capsys):
    d, corpora = setup
    rc = cli.main(["tokenizer", "eval", str(d / "ours"), "--corpora", str(corpora), "--baseline", "false",
                   "--references", str(d / "none"), "--max-chars", "5000"])
    out = capsys.readouterr().out
    assert rc == 0 and "| ours (z2all)" in out and "HF BpeTrainer" not in out
    assert cli.main(["tokenizer", "eval", str(d / "nothing-here")]) == 2
