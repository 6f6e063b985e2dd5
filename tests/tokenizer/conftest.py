"""Real text for the tokenizer tests: the first documents of each file of the embedded demo corpus
(z2all/data/demo: zh wiki jsonl.gz, en wiki parquet, python jsonl.gz), read through the trainer's reader."""

from __future__ import annotations

from pathlib import Path

import pytest

from z2all.tokenizer.train import read_texts

DEMO = Path(__file__).resolve().parents[2] / "z2all" / "data" / "demo"
DEMO_FILES = {"zh": "zh_wiki.jsonl.gz", "en": "en_wiki.parquet", "code": "code_python.jsonl.gz"}


@pytest.fixture(scope="session")
def demo_docs():
    """demo_docs(chars) -> {"zh": docs, "en": docs, "code": docs}: each file's first documents until just
    over `chars` characters. Skips the test when the demo corpus is absent."""
    if not DEMO.is_dir():
        pytest.skip("demo corpus not built")

    def take(per_file_chars: int) -> dict[str, list[str]]:
        out = {}
        for dom, name in DEMO_FILES.items():
            docs, n = [], 0
            for t in read_texts(DEMO / name):
                docs.append(t)
                n += len(t)
                if n > per_file_chars:
                    break
            out[dom] = docs
        return out

    return take
