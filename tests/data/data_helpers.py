"""Shared fixtures for the data tests: real documents from ../shared/corpora written in each raw corpus
format, and a small byte-level BPE built with `tokenizers` (until the project's tokenizer lands)."""

from __future__ import annotations

import bz2
import gzip
import json
from pathlib import Path

import orjson
import zstandard

COMPRESSORS = {
    "": lambda b: b,
    ".gz": gzip.compress,
    ".bz2": bz2.compress,
    ".zst": lambda b: zstandard.ZstdCompressor().compress(b),
}


def real_docs(shared: Path, name: str, n: int) -> list[dict]:
    """The first n documents of ../shared/corpora/<name>.jsonl.gz. (Not imported from the root conftest:
    `from conftest import` resolves to whichever conftest module pytest loaded first, e.g. tests/tokenizer's
    when both directories are collected in one run.)"""
    out = []
    with gzip.open(shared / f"{name}.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            out.append(json.loads(line))
            if len(out) >= n:
                break
    return out


def write_bytes(path: Path, data: bytes) -> Path:
    comp = next((c for c in COMPRESSORS if c and path.name.endswith(c)), "")
    path.write_bytes(COMPRESSORS[comp](data))
    return path


def jsonl_bytes(rows: list[dict]) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in rows)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    return write_bytes(path, jsonl_bytes(rows))


def write_json_array(path: Path, rows: list[dict]) -> Path:
    return write_bytes(path, json.dumps(rows, ensure_ascii=False, indent=1).encode("utf-8"))


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=max(1, len(rows) // 3))
    return path


def _raw(source: str, i: int, t: str, x: str) -> dict:
    """One raw row of `source` with title t and text x, in that corpus's own field names."""
    rows = {
        "baike2018qa": {"qid": f"q{i}", "category": "科技", "title": t, "desc": x[:40], "answer": x},
        "news2016zh": {"news_id": str(i), "keywords": "k", "desc": x[:30], "title": t, "source": "s",
                       "time": "2016", "content": x},
        "webtext2019zh": {"qid": i, "title": t, "desc": x[:20], "topic": "生活", "star": 3, "content": x,
                          "answer_id": i * 7, "answerer_tags": "tag"},
        "wikipedia_zh": {"id": str(i), "title": t, "text": x},
        "wikipedia_en": {"id": str(i), "url": f"https://example.org/{i}", "title": t, "text": x},
        "github_python": {"repo_name": "cpython", "path": t, "copies": "1", "size": str(len(x)), "content": x,
                          "license": "psf-2.0"},
        "zhihu_kol": {"INSTRUCTION": t, "RESPONSE": x, "SOURCE": "zhihu", "METADATA": "{}"},
        "wudao": {"id": i, "uniqueKey": f"u{i}", "titleUkey": f"t{i}", "dataType": "百科", "title": t,
                  "content": x},
    }
    return rows[source]


def raw_rows(source: str, docs: list[dict]) -> list[dict]:
    """Real documents as raw rows of a known corpus."""
    return [_raw(source, i, d["title"], d["text"]) for i, d in enumerate(docs)]


def make_tokenizer(tmp: Path, texts: list[str], vocab_size: int = 400) -> Path:
    """A byte-level BPE with <|endoftext|> as a special token, saved as tmp/tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tmp.mkdir(parents=True, exist_ok=True)
    tok.save(str(tmp / "tokenizer.json"))
    return tmp


def read_records(out: Path, source: str) -> list[dict]:
    recs = []
    for p in sorted((out / source).glob("part-*.jsonl*")):
        data = p.read_bytes()
        if p.name.endswith(".zst"):
            data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
        recs += [orjson.loads(line) for line in data.splitlines()]
    return recs
