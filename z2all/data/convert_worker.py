"""The worker side of `z2all data convert`: parse, map, clean, filter, hash and serialise one batch.

convert.py runs `work` through pipeline.ordered_map, in-process with --workers 1 and in spawned processes
otherwise. A spawned worker imports this module (and what it imports) before its first batch, so its import
chain stays light: orjson, regex, the readers, sources and the cleaner; no numpy (~0.1 s of CPU per worker
when it was imported here) and no torch. numpy comes in only with --clean.near-dedup (MinHash, in `init`).
tests/data/test_data_convert.py checks that importing this module does not import numpy.
"""

from __future__ import annotations

from array import array

from z2all.data.clean import CleanConfig, Cleaner
from z2all.data.readers import BadLine, parse_json_line, read_lines
from z2all.data.schema import record_text
from z2all.data.sources import Source, serialise

_W: dict = {}


def init(sources: list[Source], clean: CleanConfig, txt: bool, max_examples: int) -> None:
    """Per-process setup (the pool's initializer): the sources by unit index, one Cleaner, the options."""
    minhash = None
    if clean.near_dedup:
        from z2all.data.dedup import MinHash

        minhash = MinHash(clean.minhash_perms, clean.minhash_bands)
    _W.update(sources=sources, cleaner=Cleaner(clean), txt=txt, max_examples=max_examples, minhash=minhash)


def _note(table: dict, reason: str, i: int, detail: str = "") -> None:
    """Count `reason` for the batch's item i; keep (i, detail) as an example (the parent, which knows the
    batch's first item index, makes it file:line + detail)."""
    entry = table.setdefault(reason, [0, []])
    entry[0] += 1
    if len(entry[1]) < _W["max_examples"]:
        entry[1].append((i, detail))


def work(task: tuple) -> tuple:
    """One batch ("batch", unit, first item, kind, items, path) -> ("batch", unit, first, n_items, docs,
    skipped, repaired, kind). docs is the kept documents column by column: (bodies [bytes], texts [bytes] or
    None without --txt, content hashes array('Q'), MinHash band keys [[int]] or None without near dedup).
    Columns, not a tuple per document: the parent unpickles a spawned worker's result, and a 4 MB batch of
    ~3,000 tuples took 2.1 ms to load against 0.2 ms for the columns (~30 ms of the parent's serial share
    per 96 MB). skipped and repaired map reason -> [count, [(item in the batch, detail)]]. kind "range":
    items is a readers.LineRange of the file, read here (first may then be readers.FOLLOWS: the parent
    numbers it); the kind returned is the items' ("lines" or "records")."""
    _, u, first, kind, items, path = task
    if kind == "range":
        items, kind = read_lines(path, items.start, items.end), "lines"
    src: Source = _W["sources"][u]
    cleaner, txt, minhash = _W["cleaner"], _W["txt"], _W["minhash"]
    bodies: list[bytes] = []
    texts: list[bytes] | None = [] if txt else None
    hashes = array("Q")
    nears: list[list[int]] | None = [] if minhash is not None else None
    skipped, repaired = {}, {}
    for i, item in enumerate(items):
        if kind == "lines":
            try:
                raw, fixed = parse_json_line(item)
            except BadLine as e:
                _note(skipped, e.reason, i, f" ({e})" if str(e) else "")
                continue
            if fixed:
                _note(repaired, "invalid UTF-8 replaced", i)
        else:
            raw = item
        rec = src.to_record(raw)
        if isinstance(rec, str):
            detail = ""
            if rec.startswith("missing field") and isinstance(raw, dict):  # says which field was meant
                detail = f" (it has: {', '.join(list(map(str, raw))[:8])})"
            _note(skipped, rec, i, detail)
            continue
        cleaned = cleaner(rec, src.kind)
        if isinstance(cleaned, str):
            _note(skipped, cleaned, i)
            continue
        rec, h = cleaned
        try:  # without its -1 ids: the writer puts the real ones in front (sources.PLACEHOLDER)
            body = serialise(rec)
        except TypeError as e:  # lone surrogates in code, which is never cleaned
            _note(skipped, "unencodable text", i, f" ({e})")
            continue
        bodies.append(body)
        hashes.append(h)
        if texts is not None:
            texts.append(record_text(rec).encode("utf-8"))
        if nears is not None:
            nears.append(minhash.band_keys(rec["content"]))
    return "batch", u, first, len(items), (bodies, texts, hashes, nears), skipped, repaired, kind
