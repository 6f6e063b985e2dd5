"""`z2all bench data`: the generated input is real, unique text of the asked size that our converter keeps
whole; the seed-style peer writes unified records; the full benchmark runs end to end at a tiny size (slow: it
spawns several processes)."""

from __future__ import annotations

import orjson
import pytest

from z2all.bench import data as bench
from z2all.data import clean, convert


def test_build_input_and_bare_loop(shared_corpora, tmp_path, capsys):
    docs = bench._source_texts(str(shared_corpora))
    assert docs and all(d["text"] for d in docs)
    path = tmp_path / "in.jsonl"
    n = bench.build_input(docs[:50], path, 200_000)
    assert 200_000 <= path.stat().st_size < 200_000 + 200_000
    rows = [orjson.loads(x) for x in path.read_bytes().splitlines()]
    assert len(rows) == n > 50 and len({r["text"] for r in rows}) == n  # repeats vary: dedup keeps them
    assert bench.bare_loop(str(path), str(tmp_path / "bare.jsonl")) == n
    assert [orjson.loads(x) for x in (tmp_path / "bare.jsonl").read_bytes().splitlines()] == rows
    assert bench.seed_convert(str(path), str(tmp_path / "seed.jsonl")) == n  # the peer writes unified records
    seed = [orjson.loads(x) for x in (tmp_path / "seed.jsonl").read_bytes().splitlines()]
    assert [(r["gid"], r["content"], r["others"]) for r in seed] == [(i, r["text"], {"id": r["id"]})
                                                                   for i, r in enumerate(rows)]
    cfg = convert.Config(inputs=[f"wikipedia_zh={path}"], out=str(tmp_path / "out"))
    cfg.clean.min_chars = 1
    convert.run(cfg)
    state = orjson.loads((tmp_path / "out" / ".convert_state.json").read_bytes())
    skipped = state["sources"]["wikipedia_zh"]["skipped"]
    assert state["sources"]["wikipedia_zh"]["documents"] + sum(skipped.values()) == n
    assert set(skipped) <= {"duplicate"}  # only the corpora's own repeated documents


@pytest.mark.slow
def test_bench_runs_end_to_end(shared_corpora, tmp_path, capsys):
    cfg = bench.Config(size_mb=2, corpora=str(shared_corpora), work_dir=str(tmp_path), vocab_size=512,
                       tokenize_mb=0.2, near_dedup=True)
    assert bench.run(cfg) == 0
    out = capsys.readouterr().out
    for row in ("stdlib converter", "bare orjson", "ours: convert", "1/4 input", "cleaning off", "2 workers", "MinHash",
                "tokens/s", "data tokenize --workers", "tokenizers encode", "tiktoken encode", "cores", "CPU s",
                "CPU vs stdlib", "--workers 2 vs --workers 1", "pure-Python loop"):
        assert row in out
    assert "cleaner (--clean.impl auto)" in out
    assert ("(python cleaner)" in out) == (clean._cleanc is not None)  # both cleaners side by side when built
    table = [line.split("|") for line in out.splitlines() if line.startswith("| ours: convert, clean+dedup, 1 worker")]
    assert table and float(table[0][4]) > 0  # the CPU column holds this run's seconds
    # the same --work-dir again (it says "new, empty or an earlier `bench data` one"): every input is rewritten
    # and every output redone; an earlier conversion of the rewritten tokenize input used to be refused
    cfg.near_dedup = False
    assert bench.run(cfg) == 0
    assert "tiktoken encode" in capsys.readouterr().out
