"""`z2all tokenizer eval`: the per-domain table for ours, its HF BpeTrainer twin (the same merges, so the
same bytes/token exactly) and the reference tokenizers; every row it cannot make is named with the reason,
and eval text the tokenizer trained on is flagged."""

from __future__ import annotations

import json
import shutil
import sys

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
    headers, rows, notes = evaluate(Config(tokenizers=[str(d / "ours")], corpora=str(corpora), max_chars=20_000))
    assert headers[:4] == ["tokenizer", "vocab", "zh bytes/tok", "zh chars/tok"] and headers[-1] == "round trip"
    names = [r[0] for r in rows]
    assert names[0] == "ours (z2all)" and names[1].startswith("HF BpeTrainer twin")
    ours, twin = rows[0], rows[1]
    assert ours[1] == twin[1] == 640
    assert ours[2:-1] == twin[2:-1]  # the same merges: every bytes/token and chars/token exactly equal
    assert ours[-1] == "ok" and twin[-1] == "ok"
    zh = headers.index("zh bytes/tok")
    assert 1.0 < ours[zh] < 6.0  # Chinese: ~3 bytes per character, at least one token per chunk
    # ours trained on the whole files the eval text is held out from: said, not hidden
    assert any(n.startswith("warning: ours was trained on") and "zh_demo.jsonl" in n for n in notes)
    if (default_references() / "gpt2.tiktoken").exists():
        assert {"gpt2 (tiktoken)", "cl100k_base (tiktoken)", "o200k_base (tiktoken)"} <= set(names)
    else:
        assert any(n.startswith("skipped gpt2") for n in notes)


def test_eval_names_every_row_it_skips(setup, tmp_path, monkeypatch):
    d, corpora = setup
    base = dict(tokenizers=[str(d / "ours")], corpora=str(corpora), max_chars=3000, baseline=False)
    refs = tmp_path / "refs"
    refs.mkdir()
    _, rows, notes = evaluate(Config(**base, references=str(refs)))
    assert [r[0] for r in rows] == ["ours (z2all)"]
    assert f"skipped gpt2: no r50k_base.tiktoken or gpt2.tiktoken in {refs}" in notes
    assert any(n.startswith("skipped o200k_base: no o200k_base.tiktoken") for n in notes)
    (refs / "cl100k_base.tiktoken").write_bytes(b"IQ== 0\n")  # not the published file
    notes = evaluate(Config(**base, references=str(refs)))[2]
    assert any(n.startswith("skipped cl100k_base") and "sha256 differs" in n for n in notes)
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # import fails as if not installed
    notes = evaluate(Config(**base, references=str(refs)))[2]
    assert "skipped cl100k_base: tiktoken is not installed (pip install tiktoken)" in notes
    monkeypatch.undo()
    assert evaluate(Config(**base, references="none"))[2] == [n for n in notes if not n.startswith("skipped")]
    # a tokenizer whose training inputs are gone: the twin trains on the eval corpus and the table says so
    moved = tmp_path / "moved"
    shutil.copytree(d / "ours", moved)
    prov = json.loads((moved / "z2all_tokenizer.json").read_text())
    prov["inputs"] = [str(tmp_path / "gone.jsonl")]
    (moved / "z2all_tokenizer.json").write_text(json.dumps(prov))
    _, rows, notes = evaluate(Config(**{**base, "baseline": True, "tokenizers": [str(moved)]}, references="none"))
    assert rows[1][0] == "HF BpeTrainer twin of moved"
    assert any("not a same-data comparison" in n for n in notes)
    assert any(n.startswith("could not check whether moved trained on the eval text") for n in notes)


def test_eval_reads_published_rank_files_without_json(setup, tmp_path):
    src = default_references() / "gpt2.tiktoken"
    if not src.exists():
        pytest.skip("no ../shared/reference_tokenizers")
    d, corpora = setup
    shutil.copy(src, tmp_path / "r50k_base.tiktoken")  # GPT-2's ranks under tiktoken's published name
    _, rows, notes = evaluate(Config(tokenizers=[str(d / "ours")], corpora=str(corpora), max_chars=3000,
                                     baseline=False, references=str(tmp_path)))
    gpt2 = next(r for r in rows if r[0] == "gpt2 (tiktoken)")
    assert gpt2[1] == 50257 and gpt2[-1] == "ok"


def test_eval_cli_prints_markdown(setup, capsys):
    d, corpora = setup
    rc = cli.main(["tokenizer", "eval", str(d / "ours"), "--corpora", str(corpora), "--baseline", "false",
                   "--references", "none", "--max-chars", "5000"])
    out = capsys.readouterr().out
    assert rc == 0 and "| ours (z2all)" in out and "HF BpeTrainer" not in out
    assert "warning: ours was trained on" in out
    assert cli.main(["tokenizer", "eval", str(d / "nothing-here")]) == 2
    assert cli.main(["tokenizer", "eval", str(d / "ours"), "--corpora", str(corpora),
                     "--references", str(d / "no-such-dir")]) == 2
    assert "--references" in capsys.readouterr().err
    for bad in ("0", "-1"):  # was silently taken as 2
        assert cli.main(["tokenizer", "eval", str(d / "ours"), "--corpora", str(corpora), "--holdout-every", bad]) == 2
        assert "--holdout-every must be >= 2" in capsys.readouterr().err
