"""Evaluation tasks built from the corpora we ship or convert, so every run has numbers before anyone
brings a benchmark file: held-out documents per domain (for bits per byte), and a deterministic
"which continuation?" multiple-choice set made from them.

Held-out documents are exactly the validation split of `z2all data tokenize`: the tokens directory's
meta.json names the shards, the seed and the val fraction, and `is_val(gid)` picks the same documents
the training loop never trained on. The domain of a document is its `data_src` (wikipedia_zh, ...).

"Which continuation?": per domain, a document's first `ctx_bytes` bytes at most, cut back to a place
no usual BPE merges across (a letter or digit, then a space, newline or punctuation: `_is_boundary`),
are the context; the true next `span_bytes` bytes are the right choice, and the spans at the same place of
`n_choices - 1` other documents of the same domain are the distractors (`per_doc` > 1: further items
later in each document, distractors from the same place of the others). Choices are scored as exact
continuations (no delimiter); chance is 1 / n_choices. The set depends only on the documents and `seed`.
"""

from __future__ import annotations

import json
import random
import unicodedata
from pathlib import Path

from z2all.eval.formats import Item
from z2all.utils import UserError


def _cut(text: str, start: int, nbytes: int) -> int:
    """The character index after start at which the UTF-8 bytes from start reach nbytes (never
    splitting a character)."""
    n, i = 0, start
    while i < len(text):
        n += len(text[i].encode("utf-8"))
        if n > nbytes:
            break
        i += 1
    return i


def _is_boundary(text: str, c: int) -> bool:
    """Whether a cut before text[c] falls between two pre-tokens of the usual byte-level BPE split patterns
    (GPT-2's and Llama 3's, which ours follows): a letter or digit, then neither (a space, a newline,
    punctuation). A letter run always ends there, and the next pre-token starts at text[c] (Llama 3's
    pattern glues one punctuation mark to the letters *after* it, so "after punctuation" is no boundary). No
    BPE merge straddles such a cut, so context + true span tokenize exactly as context and span apart.
    A cut inside a word lets the true pair (and only it) merge across the cut, and lm-eval's boundary rule
    (continuation = encode(context + span) minus encode(context)) then scores the true span on fewer tokens:
    with byte-budget cuts a random-init demo model picked it 24-39% (acc) and 59-61% (acc_mi) of the time,
    chance 25%."""
    if not 0 < c < len(text):
        return False
    return unicodedata.category(text[c - 1])[0] in "LN" and unicodedata.category(text[c])[0] not in "LN"


def _cut_back(text: str, lo: int, c: int) -> int | None:
    """The last boundary in (lo, c], or None."""
    while c > lo:
        if _is_boundary(text, c):
            return c
        c -= 1
    return None


def heldout_docs(tokens_dir: str | Path, max_docs: int = 0, option: str = "--heldout") -> dict[str, list[str]]:
    """{data_src: [text, ...]} of the validation documents of a `z2all data tokenize` output, in shard
    order (max_docs > 0: at most that many per domain). `option` names the input in error messages."""
    import orjson

    from z2all.data.schema import record_text
    from z2all.data.tokenize import is_val

    tokens_dir = Path(tokens_dir)
    meta_file = tokens_dir / "meta.json"
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        shards, seed, frac = meta["shards"], int(meta["seed"]), float(meta["val_fraction"])
    except FileNotFoundError:
        raise UserError(f"{option} {tokens_dir}: no meta.json; give the --out of `z2all data tokenize`") from None
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{meta_file}: not a tokenize meta.json ({e})") from None
    if frac <= 0:
        raise UserError(f"{meta_file}: val_fraction is 0, so no document was held out")
    out: dict[str, list[str]] = {}
    for shard in shards:
        p = Path(shard)
        if not p.is_file():
            raise UserError(f"{meta_file} lists the shard {p}, which is missing; were the shards moved?")
        with open(p, "rb") as f:
            for line in f:
                try:
                    rec = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if not is_val(rec.get("gid", 0), seed, frac):
                    continue
                text = record_text(rec)
                dom = str(rec.get("data_src") or "unknown")
                docs = out.setdefault(dom, [])
                if text and (not max_docs or len(docs) < max_docs):
                    docs.append(text)
    if not out:
        raise UserError(f"{tokens_dir}: the shards hold no held-out document")
    return out


def continuation_items(docs: list[str], n_choices: int = 4, ctx_bytes: int = 400, span_bytes: int = 48,
                       seed: int = 0, max_items: int = 0, where: str = "corpus", per_doc: int = 1) -> list[Item]:
    """The "which continuation?" items of one domain (see the module docstring). Documents too short for
    context + span are left out; fewer than n_choices usable spans give no items.

    per_doc > 1: up to that many items per document, one after another (each context is the ctx_bytes
    before its span, so items of one document never overlap); the distractors of a document's k-th item
    are the k-th spans of other documents (k +- 1 or 2 when fewer than n_choices - 1 documents are that
    long). Items are ordered offset-major (every document's first item, then every second one, ...) so
    `max_items` spreads over the documents. per_doc=1 gives one item per document."""
    spans = []  # (offset index, document, context, true span)
    for i, text in enumerate(docs):
        start = 0
        for j in range(per_doc):
            c = _cut_back(text, start, _cut(text, start, ctx_bytes))  # the context ends at a pre-token boundary
            if c is None:
                break
            e = _cut(text, c, span_bytes)
            if not (c < len(text) and text[c:e].strip() and len(text[start:c].encode("utf-8")) >= ctx_bytes // 2):
                break
            spans.append((j, i, text[start:c], text[c:e]))
            start = e
    spans.sort(key=lambda s: (s[0], s[1]))
    if len(spans) < n_choices or len({s[1] for s in spans}) < 2:
        return []
    rng = random.Random(seed)
    items = []
    for j, i, ctx, true in spans:
        # distractors from the same place of other documents (or the places next to it when few documents are
        # that long): a document's start reads unlike its middle, and a random-init model, which prefers spans
        # of fewer tokens, picked the true early span 38% of the time (chance 25%) when distractors came from
        # anywhere in the other documents
        for near in (0, 1, 2):
            others = [s[3] for s in spans if abs(s[0] - j) <= near and s[1] != i and s[3] != true]
            if len(set(others)) >= n_choices - 1:
                break
        else:
            continue
        distract = rng.sample(sorted(set(others)), n_choices - 1)
        gold = rng.randrange(n_choices)
        choices = distract[:gold] + [true] + distract[gold:]
        at = f", item {j + 1}" if per_doc > 1 else ""
        items.append(Item(ctx, list(choices), list(choices), gold, f"{where}: document {i + 1}{at}"))
        if max_items and len(items) >= max_items:
            break
    return items
