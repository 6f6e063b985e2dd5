"""The embedded demo corpus: each file parses in its raw corpus format, has the documented fields, holds
real text in the expected script, stays small, and carries its licence notes."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow.parquet as pq

DEMO = Path(__file__).resolve().parents[2] / "z2all" / "data" / "demo"


def _jsonl(name):
    with gzip.open(DEMO / name, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _han_share(text: str) -> float:
    return sum("\u4e00" <= c <= "\u9fff" for c in text) / max(1, len(text))


def test_demo_is_small_and_has_notice():
    total = sum(p.stat().st_size for p in DEMO.iterdir())
    assert total <= 3 * 1024 * 1024
    notice = (DEMO / "NOTICE.md").read_text()
    for word in ("GPL", "GFDL", "PSF-2.0", "public domain"):
        assert word in notice


def test_zh_wiki_format_and_text():
    docs = _jsonl("zh_wiki.jsonl.gz")
    assert len(docs) > 100
    assert all(set(d) == {"id", "title", "text"} for d in docs)
    assert len({d["id"] for d in docs}) == len(docs)
    text = "".join(d["text"] for d in docs)
    assert _han_share(text) > 0.15 and len(text) > 1_000_000
    assert "Debian" in text and "\n" in text


def test_en_wiki_parquet_format_and_text():
    table = pq.read_table(DEMO / "en_wiki.parquet")
    assert table.column_names == ["id", "url", "title", "text"]
    docs = table.to_pylist()
    assert len(docs) > 100
    text = " ".join(d["text"] for d in docs)
    assert "In the beginning God created the heaven and the earth." in text
    words = text.split()
    assert len(words) > 100_000 and sum(w.isascii() for w in words) / len(words) > 0.99


def test_code_python_format_and_text():
    import ast

    docs = _jsonl("code_python.jsonl.gz")
    assert len(docs) > 50
    for d in docs:
        assert {"repo_name", "path", "copies", "size", "content", "license"} <= set(d)
        assert d["path"].endswith(".py") and int(d["size"]) == len(d["content"].encode("utf-8"))
    parsed = sum(1 for d in docs[:20] if ast.parse(d["content"]))
    assert parsed == 20  # real Python source, indentation intact
