"""`z2all data tokenize`: converted shards + a tokenizer directory -> flat token files for training.

    z2all data tokenize --shards data/converted --tokenizer data/tokenizer --out data/tokens --workers 2

Output (`--out`):
    train-00000.bin, train-00001.bin, ...   raw little-endian token ids, no header; uint16 when the vocab
    val-00000.bin, ...                      has < 65,536 ids, else uint32; files roll at --file-mb
    meta.json                               {"dtype", "vocab_size", "eos_id", "train_tokens", "val_tokens",
                                             "train_files", "val_files", "tokenizer_dir", "documents", ...}
Every document is `record_text(record)` (schema.py) encoded without special tokens, followed by the id of
`<|endoftext|>`. The encoder runs with `encode_special_tokens = True`, so a document that *contains* the text
"<|endoftext|>" is encoded as ordinary text and only our appended id is the real separator.

Validation split: by document, deterministic: a document goes to val when blake2b(seed, gid) falls below
--val-fraction of the hash range, independent of worker count, shard size and order.

Input: only a `z2all data convert` output (the --out directory, one source directory or one listed shard):
every shard must be listed in its directory's manifest.json, and its sha256 and line count must match the
manifest before it is used, so a truncated or edited shard is an error naming it, never fewer documents.
A raw jsonl file or a directory without manifests is refused.

How it runs (pipeline.ordered_map): the parent reads shards as ~8 MB blocks of raw lines and hands them to
--workers processes (each encodes its block single-threaded; with --workers 1 the encoding runs in-process
on all cores). The encoder is tiktoken when the tokenizer converts to it exactly (tokenizer/tiktoken_compat.py
refuses any tokenizer it cannot reproduce id for id), else `tokenizers`' `encode_batch_fast`; the ids are
the same either way (tested), tiktoken is ~4-5x faster; results are written in order, at most 2 x workers + 1
blocks in flight, so memory is bounded and the output does not depend on timing. Files are written under
hidden temp names and renamed when complete, after the commit that lists them; meta.json is written last,
so a directory without meta.json is an unfinished run. After each block the position and files are
committed to .tokenize_state.json; a killed run resumes from there, and a run with other shards, tokenizer
or settings starts over, removing only the token files the earlier run's state (or meta.json) lists and our
own temp files. A token file name that no state lists is not ours: it is never deleted, and a run refuses to
start (naming it) while one is there, since it would read as part of the output or be overwritten. --out is
claimed (z2all.io.claim_output_dir): a new or empty directory or an earlier tokenize output, never a
directory holding other files or the inputs. A run whose train split comes out empty (--val-fraction too
high for the data) fails, removing what it wrote (and the directory, when it made it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from z2all.config import opt
from z2all.data.pipeline import ordered_map, read_state
from z2all.data.readers import InputReader
from z2all.data.schema import record_text
from z2all.data.shards import MANIFEST, converted_shards, verify_shard
from z2all.io import NewOutput, atomic_write_text, claim_output_dir
from z2all.utils import UserError, human_bytes, print0, progress

EOS = "<|endoftext|>"
STATE = ".tokenize_state.json"
STATE_VERSION = 1


@dataclass
class Config:
    shards: str = opt("data/converted", "converted corpus: the convert --out dir, one source dir, or one shard")
    tokenizer: str = opt("data/tokenizer", "tokenizer directory holding tokenizer.json")
    out: str = opt("data/tokens", "output directory for train-*.bin, val-*.bin and meta.json")
    val_fraction: float = opt(0.01, "share of documents that go to the validation split")
    seed: int = opt(0, "salt of the deterministic validation split")
    workers: int = opt(2, "encoding processes (1 = in-process, using the tokenizer's own threads)")
    batch_mb: float = opt(8.0, "raw shard bytes per work block")
    file_mb: float = opt(2048.0, "roll token files at this many MB")
    encoder: str = opt("auto", "auto: tiktoken when the tokenizer converts to it exactly (same ids, ~4-5x "
                       "faster), else tokenizers; or force one", choices=("auto", "tokenizers", "tiktoken"))

    def validate(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"val_fraction must be in [0, 1) (got {self.val_fraction})")
        if self.workers < 1 or self.batch_mb <= 0 or self.file_mb <= 0:
            raise UserError("workers must be >= 1 and batch_mb, file_mb > 0")


def load_tokenizer(tok_dir: str | os.PathLike):
    """`tokenizers.Tokenizer` from `<dir>/tokenizer.json`, special-token text encoded as plain text."""
    from z2all.tokenizer.hf import read_tokenizer_json

    path = Path(tok_dir) / "tokenizer.json"
    tok = read_tokenizer_json(path)
    tok.encode_special_tokens = True
    eos = tok.token_to_id(EOS)
    if eos is None:
        raise UserError(f"{path} has no {EOS} token; train the tokenizer with it as a special token")
    return tok, eos


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size < 65536 else np.uint32).newbyteorder("<")


def is_val(gid: int, seed: int, fraction: float) -> bool:
    if fraction <= 0:
        return False
    h = hashlib.blake2b(f"{seed}:{gid}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") < fraction * 2**64


# ---------------------------------------------------------------- worker side

_W: dict = {}


def _encoder(tok_dir: str, kind: str, threads: int):
    # the one import of a tokenizer-stage module from data/: it reads only the tokenizer.json artifact
    # (the byte-level spelling and merges) to build an exactly equivalent tiktoken encoder
    from z2all.tokenizer.tiktoken_compat import make_encoder

    return make_encoder(tok_dir, kind, threads=threads)


def _init_worker(tok_dir: str, dtype: str, seed: int, val_fraction: float, threads: bool, encoder: str) -> None:
    if not threads:  # one Rust thread per worker process: workers x threads would oversubscribe the cores
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _, eos = load_tokenizer(tok_dir)
    _W.update(encode=_encoder(tok_dir, encoder, (os.cpu_count() or 1) if threads else 1), eos=eos,
              dtype=np.dtype(dtype), seed=seed, frac=val_fraction)


def _encode(texts: list[str]) -> np.ndarray:
    """Concatenated ids of `texts`, each followed by eos."""
    if not texts:
        return np.empty(0, dtype=_W["dtype"])
    eos = _W["eos"]
    flat: list[int] = []
    for ids in _W["encode"](texts):
        flat.extend(ids)
        flat.append(eos)
    return np.asarray(flat, dtype=_W["dtype"])


def _work(task: tuple) -> tuple:
    """Encode one block; `bad` is the 0-based index in the block of the first line that is not a record
    (shards are verified against their manifest first, so that means an old shard edited by hand)."""
    lines, where = task
    train, val, bad = [], [], None
    seed, frac = _W["seed"], _W["frac"]
    for i, line in enumerate(lines):
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            rec = None
        if not isinstance(rec, dict):
            bad = i
            break
        text = record_text(rec)
        if not text:
            continue
        (val if is_val(rec.get("gid", 0), seed, frac) else train).append(text)
    return _encode(train).tobytes(), _encode(val).tobytes(), len(train), len(val), bad, where


# ---------------------------------------------------------------- parent side

class _BinWriter:
    """`<out>/<split>-NNNNN.bin`, rolled at `file_tokens`; each file appears only when complete.
    `files`, `tokens` and `open_tokens` come from a committed state when resuming. A finished file keeps its
    temp name until `publish()`, called after the commit that lists it: a token file in `out` is then always
    one a state lists, and a name no state lists is never taken for ours."""

    def __init__(self, out: Path, split: str, itemsize: int, file_tokens: int, files: list[str] | None = None,
                 tokens: int = 0, open_tokens: int = 0):
        self.out, self.split, self.itemsize, self.file_tokens = out, split, itemsize, file_tokens
        self.files: list[str] = list(files or [])
        self.tokens = tokens  # every token written, the open file's included
        self._f = None
        self._n = 0
        self._pending: list[tuple[Path, Path]] = []  # finished, committed at the next commit, then renamed
        for name in self.files:  # committed by a killed run that did not get to rename it
            if not (out / name).exists() and (out / f".{name}.tmp").exists():
                os.replace(out / f".{name}.tmp", out / name)
        if open_tokens:
            self._reopen(open_tokens)

    def _names(self) -> tuple[str, Path]:
        name = f"{self.split}-{len(self.files):05d}.bin"
        return name, self.out / f".{name}.tmp"

    def _open(self) -> None:
        self._name, self._tmp = self._names()
        self._f = open(self._tmp, "wb")
        self._n = 0

    def _reopen(self, n: int) -> None:
        """Continue the open file of a killed run from its committed `n` tokens."""
        self._name, self._tmp = self._names()
        if not self._tmp.exists() and (self.out / self._name).exists():
            # a z2all before publish() renamed a file before its commit: the state names it open, so it is ours
            os.replace(self.out / self._name, self._tmp)
        if not self._tmp.exists() or self._tmp.stat().st_size < n * self.itemsize:
            raise UserError(f"{self._tmp} is missing or shorter than {STATE} says; delete {self.out} and rerun")
        self._f = open(self._tmp, "r+b")
        self._f.truncate(n * self.itemsize)
        self._f.seek(0, os.SEEK_END)
        self._n = n

    def _close(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self._pending.append((self._tmp, self.out / self._name))
        self.files.append(self._name)
        self._f = None

    def publish(self) -> None:
        """Rename the finished files into place: only once a committed state lists them."""
        for tmp, final in self._pending:
            os.replace(tmp, final)
        self._pending.clear()

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while len(view):
            if self._f is None:
                self._open()
            room = (self.file_tokens - self._n) * self.itemsize
            part = view[:room]
            self._f.write(part)
            n = len(part) // self.itemsize
            self._n += n
            self.tokens += n
            view = view[len(part):]
            if self._n >= self.file_tokens:
                self._close()

    def state(self) -> dict:
        """Make the open file durable and describe it for a commit."""
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())
        return {"files": list(self.files), "tokens": self.tokens, "open_tokens": self._n if self._f else 0}

    def keep(self) -> set[str]:
        """Names in `out` this writer owns (finished files, their temp names and the open temp file)."""
        return _listed({"files": self.files, "open_tokens": self._n if self._f is not None else 0}, self.split)

    def finish(self) -> list[str]:
        if self._f is not None or not self.files:  # an empty split still gets one (empty) file
            if self._f is None:
                self._open()
            self._close()
        return self.files


def _signature(cfg: Config, shards: list[tuple[Path, dict]], vocab: int, dtype: np.dtype) -> dict:
    """Everything that changes the output: a resume must not mix two of them."""
    tok = Path(cfg.tokenizer) / "tokenizer.json"
    return {"version": STATE_VERSION, "shards": [[str(p), p.stat().st_size, e.get("sha256")] for p, e in shards],
            "tokenizer_sha256": hashlib.sha256(tok.read_bytes()).hexdigest(), "vocab_size": vocab,
            "dtype": dtype.name, "val_fraction": cfg.val_fraction, "seed": cfg.seed, "file_mb": cfg.file_mb}


def _listed(writer: dict, split: str) -> set[str]:
    """The names in `out` a writer's committed state says it wrote: its files (under their temp names too,
    when a kill came between the commit and the rename) and the temp file it had open."""
    files = [f for f in writer.get("files") or [] if isinstance(f, str)]
    names = set(files) | {f".{f}.tmp" for f in files}
    if writer.get("open_tokens"):
        names.add(f".{split}-{len(files):05d}.bin.tmp")
    return names


def _written(out: Path, state: dict | None) -> set[str]:
    """Every token file an earlier run says it wrote: from its state, else (unreadable) from its meta.json."""
    if state is not None:
        writers = state.get("writers") if isinstance(state.get("writers"), dict) else {}
        return set().union(*(_listed(w, s) for s, w in writers.items() if isinstance(w, dict)))
    try:
        meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
        return {f for s in ("train", "val") for f in meta.get(f"{s}_files") or [] if isinstance(f, str)}
    except (OSError, ValueError, AttributeError, TypeError):
        return set()


def _check_foreign(out: Path, listed: set[str]) -> None:
    """Refuse (before anything is removed) when `out` holds a token file name that no state lists: a user's
    file, which would read as part of the output, or be overwritten by a later file of that name."""
    foreign = sorted(p.name for p in out.iterdir() if p.is_file() and _BIN.fullmatch(p.name) and p.name not in listed)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f", ... ({len(foreign)} files)" if len(foreign) > 3 else "")
        raise UserError(f"--out {out} holds {shown}, which `z2all data tokenize` did not write (its state does not "
                        f"list them); move them out or choose another --out (nothing was changed)")


def _load_state(out: Path, sig: dict) -> dict | None:
    """The committed state of an earlier run of the same job, else None (and the files the earlier run
    wrote are removed: those its state, or meta.json when the state is unreadable, lists, and its temp files)."""
    path = out / STATE
    state = read_state(path, corrupt_ok=True)
    if state is not None and state.get("signature") == sig:
        return state
    listed = _written(out, state)
    _check_foreign(out, listed)
    for p in [*(out / n for n in sorted(listed)), *_temps(out), out / "meta.json", path]:
        p.unlink(missing_ok=True)
    return None


_BIN = re.compile(r"(train|val)-\d{5}\.bin")
_TMP = re.compile(r"\.(train|val)-\d{5}\.bin\.tmp")  # only _BinWriter makes these hidden names


def _temps(out: Path) -> list[Path]:
    """Our temp files in `out` (a killed run's unfinished token files)."""
    return [p for p in out.iterdir() if p.is_file() and _TMP.fullmatch(p.name)]


def _remove_run(out: Path, writers: dict) -> None:
    """Remove everything this job wrote into `out` (its token files, temp files, meta.json and state)."""
    names = set().union(*(w.keep() for w in writers.values()))
    for p in [*(out / n for n in sorted(names)), *_temps(out), out / "meta.json", out / STATE]:
        p.unlink(missing_ok=True)


def _legacy(out: Path) -> bool:
    """A tokenize output of a z2all from before owner files."""
    return (out / STATE).is_file() or (out / "meta.json").is_file()


def run(cfg: Config) -> int:
    """The command, holding --out (z2all.io.dir_lock): a second process writing it meanwhile is refused."""
    from z2all.io import dir_lock

    with dir_lock(cfg.out, "data tokenize"):
        return _run(cfg)


def _run(cfg: Config) -> int:
    cfg.validate()
    t0 = time.perf_counter()
    listed = converted_shards(cfg.shards)
    if not listed:
        raise UserError(f"--shards {cfg.shards} holds no shards (the conversion wrote no documents)")
    for p, entry in listed:  # before anything is written: a damaged shard would lose documents silently
        verify_shard(p, entry)
    shards = [p for p, _ in listed]
    tok, eos = load_tokenizer(cfg.tokenizer)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    dtype = dtype_for(vocab)
    new = NewOutput(cfg.out)
    out = claim_output_dir(cfg.out, "data tokenize", protect=[cfg.shards, cfg.tokenizer], legacy=_legacy)
    sig = _signature(cfg, listed, vocab, dtype)
    state = _load_state(out, sig)
    if state is not None and state["done"] and (out / "meta.json").exists():
        print0(f"data tokenize: {out} is complete (same shards, tokenizer and settings), nothing to do")
        return 0
    if state is None:
        state = {"signature": sig, "done": False, "shard": 0, "line": 0,
                 "documents": {"train": 0, "val": 0, "bad_lines": 0}, "writers": {}}
    else:
        (out / "meta.json").unlink(missing_ok=True)  # rewritten, identical, at the end
        print0(f"data tokenize: resuming {out} at shard {state['shard'] + 1}/{len(shards)}, line {state['line'] + 1}")
    file_tokens = max(1, int(cfg.file_mb * 2**20) // dtype.itemsize)
    writers = {s: _BinWriter(out, s, dtype.itemsize, file_tokens, **state["writers"].get(s, {}))
               for s in ("train", "val")}
    keep = set().union(*(w.keep() for w in writers.values()))
    _check_foreign(out, keep)
    for p in _temps(out):  # opened after the last commit of a killed run
        if p.name not in keep:
            p.unlink()
    _encoder(str(cfg.tokenizer), cfg.encoder, 1)  # an impossible --encoder tiktoken fails here, before any work
    initargs = (str(cfg.tokenizer), dtype.str, cfg.seed, cfg.val_fraction, cfg.workers == 1, cfg.encoder)
    docs = state["documents"]
    total = sum(p.stat().st_size for p in shards)
    bar = progress(total=total, initial=sum(p.stat().st_size for p in shards[: state["shard"]]), desc="tokenize",
                   unit="B", unit_scale=True)

    def jobs():
        """((shard index, line after the block), (lines, "shard:first line")) for every block left."""
        for si in range(state["shard"], len(shards)):
            shard = shards[si]
            reader = InputReader(shard, "jsonl")
            last = 0
            start = state["line"] if si == state["shard"] else 0
            n_lines = start
            for first, lines in reader.batches(start, batch_bytes=int(cfg.batch_mb * 2**20)):
                n_lines = first + len(lines)
                yield (si, n_lines), (lines, f"{shard}:{first + 1}")
                pos = reader.position()
                bar.update(pos - last)
                last = pos
            bar.update(shard.stat().st_size - last)
            if n_lines != listed[si][1]["count"]:
                raise UserError(f"shard {shard} has {n_lines:,} lines, {shard.parent / MANIFEST} says "
                                f"{listed[si][1]['count']:,} documents; run `z2all data convert` again for "
                                f"this source (--overwrite)")

    results = ordered_map(_work, jobs(), workers=cfg.workers, initializer=_init_worker, initargs=initargs)
    try:
        with contextlib.closing(results):
            for (si, line), (tr, va, ntr, nva, bad, where) in results:
                if bad is not None:
                    path, first = where.rsplit(":", 1)
                    raise UserError(f"{path}:{int(first) + bad}: not a JSON record; the shard was edited or damaged: "
                                    f"run `z2all data convert` again for this source (--overwrite)")
                writers["train"].write(tr)
                writers["val"].write(va)
                docs["train"] += ntr
                docs["val"] += nva
                state.update(shard=si, line=line, writers={s: w.state() for s, w in writers.items()})
                atomic_write_text(out / STATE, json.dumps(state) + "\n")
                for w in writers.values():
                    w.publish()
    finally:
        bar.close()
    files = {s: w.finish() for s, w in writers.items()}
    state.update(writers={s: w.state() for s, w in writers.items()})
    atomic_write_text(out / STATE, json.dumps(state) + "\n")  # lists the last files, then they are renamed
    for w in writers.values():
        w.publish()
    if not docs["train"]:  # a model cannot train on it: a failure, not an output
        _remove_run(out, writers)
        new.undo()
        raise UserError(f"the train split is empty: all {docs['val']:,} documents went to validation "
                        f"(--val-fraction {cfg.val_fraction}); lower --val-fraction or add data (nothing was kept "
                        f"in {out})")
    meta = {
        "dtype": dtype.name, "vocab_size": vocab, "eos_id": eos,
        "train_tokens": writers["train"].tokens, "val_tokens": writers["val"].tokens,
        "train_files": files["train"], "val_files": files["val"],
        "tokenizer_dir": str(Path(cfg.tokenizer).resolve()), "documents": docs,
        "val_fraction": cfg.val_fraction, "seed": cfg.seed,
        "shards": [str(p) for p in shards], "byteorder": "little",
    }
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    state.update(done=True, shard=len(shards), line=0, writers={s: w.state() for s, w in writers.items()})
    atomic_write_text(out / STATE, json.dumps(state) + "\n")
    dt = time.perf_counter() - t0
    ntok = meta["train_tokens"] + meta["val_tokens"]
    print0(f"data tokenize: {docs['train']:,} train / {docs['val']:,} val documents, {ntok:,} tokens "
           f"({human_bytes(total)} of shards, {ntok / max(dt, 1e-9):,.0f} tokens/s, {dt:.1f} s) -> {out}")
    return 0
