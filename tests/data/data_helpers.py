"""Shared fixtures for the data tests: real documents from ../shared/corpora (or, in a clean clone without
it, from the embedded demo corpus z2all/data/demo/) written in each raw corpus format, and a small
byte-level BPE built with `tokenizers`.

A test module that defines `shared_corpora` as `corpora_dir()` overrides the root conftest's fixture (which
skips without ../shared): it gives the directory, or None, and `real_docs(None, ...)` reads the demo corpus.
Z2ALL_TEST_DEMO_CORPUS=1 forces the demo corpus (to check the fallback on a machine that has both)."""

from __future__ import annotations

import bz2
import gzip
import json
import os
from pathlib import Path

import orjson
import zstandard

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "corpora"
DEMO = Path(__file__).resolve().parents[2] / "z2all" / "data" / "demo"

COMPRESSORS = {
    "": lambda b: b,
    ".gz": gzip.compress,
    ".bz2": bz2.compress,
    ".zst": lambda b: zstandard.ZstdCompressor().compress(b),
}


def corpora_dir() -> Path | None:
    return SHARED if SHARED.is_dir() and not os.environ.get("Z2ALL_TEST_DEMO_CORPUS") else None


# shared corpus -> (demo file, first row): demo rows of the same language and kind, disjoint between names
_DEMO_STANDIN = {"zh_fortunes": ("zh_wiki.jsonl.gz", 0), "zh_manpages": ("zh_wiki.jsonl.gz", 400),
                 "zh_debian_reference": ("zh_wiki.jsonl.gz", 500), "en_kjv_bible": ("en_wiki.parquet", 0),
                 "en_python_docs": ("en_wiki.parquet", 150), "code_cpython_stdlib": ("code_python.jsonl.gz", 0)}


def _demo_docs(name: str, n: int) -> list[dict]:
    file, first = _DEMO_STANDIN[name]
    if file.endswith(".parquet"):
        import pyarrow.parquet as pq

        rows = pq.read_table(DEMO / file).to_pylist()
    else:
        with gzip.open(DEMO / file, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
    return [{"title": r.get("title") or r.get("path", ""), "text": r.get("text") or r.get("content", "")}
            for r in rows[first:first + n]]


def real_docs(shared: Path | None, name: str, n: int) -> list[dict]:
    """The first n documents of ../shared/corpora/<name>.jsonl.gz, or of its demo stand-in when `shared`
    is None. (Not imported from the root conftest: `from conftest import` resolves to whichever conftest
    module pytest loaded first, e.g. tests/tokenizer's when both directories are collected in one run.)"""
    if shared is None:
        return _demo_docs(name, n)
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


def assert_damaged_copies_refused(src: Path, tmp: Path, cases, open_split, remedy: str) -> None:
    """For each (file name, change(bytes) -> bytes, words) in `cases`: a copy of data directory `src` with
    that file changed makes `open_split(copy)` raise one UserError line naming the file, `words` and the
    command that rebuilds it (`remedy`)."""
    import shutil

    import pytest

    from z2all.utils import UserError

    for i, (name, change, words) in enumerate(cases):
        bad = tmp / f"bad{i}"
        shutil.copytree(src, bad)
        (bad / name).write_bytes(change((bad / name).read_bytes()))
        with pytest.raises(UserError) as e:
            open_split(bad)
        msg = str(e.value)
        assert str(bad / name) in msg and words in msg and remedy in msg and "\n" not in msg, (name, msg)
