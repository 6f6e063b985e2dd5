"""Streaming readers for raw corpora: constant memory whatever the file size.

Formats (`FORMATS`): `jsonl` (one JSON object per line), `json` (a JSON array streamed item by item with
ijson's C backend, a single object, or jsonl that happens to be named `.json`, as baike2018qa is), `parquet`
(pyarrow `iter_batches` with column projection), `txt` (plain text; a document is a blank-line separated
block, a line, or the whole file). A directory input expands to the files under it (WuDao style: one JSON
array per file). Compression (gzip, zstd, bz2) is recognised by the file's magic bytes, so a gzip file
named `.jsonl` reads as what it is; the suffix (`.gz`, `.zst`/`.zstd`, `.bz2`) only names the format
underneath. A UTF-8 byte order mark at the start of a text file is dropped.

`parse_json_line` is the one place a raw JSON line becomes an object (with invalid UTF-8 repaired and
counted); the converter and the tokenizer trainer both use it.

Byte ranges (`InputReader(..., ranges=True)`): a plain (uncompressed) jsonl file, or jsonl named `.json`, is
batched as `LineRange(start, end)` (byte offsets aligned to line starts) instead of lists of lines, so that a
worker process reads and splits its own lines (`read_lines`) and the parent neither reads, holds nor pickles
them: it finds each cut with a small pread. Batches after the first carry FOLLOWS instead of their
first item's index, and the caller numbers them in order from the line counts the workers return, so item
numbers (file:line, resume positions) stay exact; the batches are exactly the ones `readlines(hint)` makes,
so the output does not depend on the mode. A resume counts the lines before its start (reading them once).

Decompression goes through one small raw stream (`_Decompressing`) over zlib/bz2/zstandard decompressor
objects instead of gzip.open & co: it checks at end of file that the last frame was complete, because a
truncated `.zst` otherwise reads as a silently shorter file. `InputReader.position()` is the number of bytes
of the file on disk consumed so far (progress bars count those).

Bounds: jsonl batches hold `batch_bytes` of raw lines (default 4 MB); arrays hold at most `batch_items`
decoded items; parquet holds one record batch of 1,024 rows; txt blocks are cut at 1 M characters.
"""

from __future__ import annotations

import bz2
import codecs
import io
import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from z2all.utils import UserError

FORMATS = ("jsonl", "json", "parquet", "txt")
TXT_MODES = ("paragraph", "line", "file")
COMPRESSIONS = (".gz", ".zst", ".zstd", ".bz2")
_EXT_FORMAT = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".txt": "txt",
               ".text": "txt"}
_MAX_TXT_CHARS = 1_000_000
_CHUNK = 1 << 20  # buffered reader size
_IN_CHUNK = 64 << 10  # compressed bytes fed to a decompressor at a time


class ReadError(UserError):
    """The file itself is broken (truncated archive, unreadable parquet): the message names the file."""


class MalformedJSON(Exception):
    """A JSON array/object stopped parsing at item `index`; the rest of that file cannot be read."""

    def __init__(self, index: int, msg: str):
        super().__init__(msg)
        self.index = index


# ---------------------------------------------------------------- invalid UTF-8: replaced and counted

_UTF8_ERRORS = [0]


def _count_and_replace(err: UnicodeDecodeError):
    _UTF8_ERRORS[0] += 1
    return "\ufffd", err.end


codecs.register_error("z2all_replace", _count_and_replace)


def utf8_errors() -> int:
    """Invalid UTF-8 sequences replaced by U+FFFD in this process so far (callers diff two readings)."""
    return _UTF8_ERRORS[0]


def decode_utf8(data: bytes) -> str:
    """Decode UTF-8, replacing (and counting, see `utf8_errors`) invalid sequences."""
    return data.decode("utf-8", "z2all_replace")


class BadLine(ValueError):
    """A jsonl line that holds no JSON value: `reason` is "blank line" or "malformed JSON", str() the detail."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail)
        self.reason = reason


def parse_json_line(line: bytes | memoryview) -> tuple[Any, bool]:
    """One raw jsonl line (bytes, or a memoryview from `read_lines`) -> (value, repaired). The fast path is
    orjson on the raw bytes; a line it rejects is retried after replacing invalid UTF-8 (repaired=True when
    that made it parse: the replacements are counted in `utf8_errors`). Raises BadLine for a blank line or
    malformed JSON."""
    try:
        return orjson.loads(line), False
    except orjson.JSONDecodeError:
        pass
    line = bytes(line)
    if not line.strip():
        raise BadLine("blank line")
    before = utf8_errors()
    text = decode_utf8(line)
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as e:
        # valid JSON that orjson refuses: a lone surrogate escape ("\ud800"), which json.dumps writes. The
        # record is kept with U+FFFD in its place (repaired), not dropped as malformed
        try:
            value = _without_lone_surrogates(json.loads(text))
        except (ValueError, RecursionError):
            raise BadLine("malformed JSON", str(e)) from None
        return value, True
    return value, utf8_errors() > before


def _without_lone_surrogates(v):
    """`v` (a parsed JSON value) with each lone surrogate in its strings replaced by U+FFFD (a proper pair
    becomes its character): text that UTF-8 can hold."""
    if isinstance(v, str):
        return v.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(v, list):
        return [_without_lone_surrogates(x) for x in v]
    if isinstance(v, dict):
        return {_without_lone_surrogates(k): _without_lone_surrogates(x) for k, x in v.items()}
    return v


# ---------------------------------------------------------------- compression

_MAGIC = ((b"\x1f\x8b", ".gz"), (b"\x28\xb5\x2f\xfd", ".zst"), (b"BZh", ".bz2"))
BOM = b"\xef\xbb\xbf"


def compression_of(path: str | os.PathLike) -> str:
    """'' or one of COMPRESSIONS, from the file name."""
    suffix = Path(path).suffix.lower()
    return suffix if suffix in COMPRESSIONS else ""


def sniff_compression(path: str | os.PathLike) -> str:
    """'' or ".gz"/".zst"/".bz2", from the file's first bytes (what the file is, whatever its name).
    bz2's "BZh" is also followed by the block-size digit 1-9, which plain text rarely is."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return compression_of(path)
    for magic, kind in _MAGIC:
        if head.startswith(magic) and (kind != ".bz2" or head[3:4].isdigit()):
            return kind
    return ""


def _decompressor(kind: str):
    if kind == ".gz":
        return zlib.decompressobj(wbits=47)  # 32 + 15: gzip or zlib header, auto-detected
    if kind == ".bz2":
        return bz2.BZ2Decompressor()
    import zstandard

    return zstandard.ZstdDecompressor().decompressobj()


class _Decompressing(io.RawIOBase):
    """Raw byte stream of a compressed file; concatenated members/frames are read through; a file that
    ends inside a member raises ReadError naming it. Compressed input is fed 64 KB at a time so one
    decompressed piece stays small (~64 KB x the compression ratio)."""

    def __init__(self, raw, kind: str, name: str):
        self._raw, self._kind, self._name = raw, kind, name
        self._d = _decompressor(kind)
        self._buf = memoryview(b"")
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not len(self._buf) and not self._done:
            if self._d.eof:  # a member/frame ended: the next one starts in its leftover bytes or the file
                data = self._d.unused_data
                self._d = _decompressor(self._kind)
                if not data:
                    data = self._raw.read(_IN_CHUNK)
                    if not data:
                        self._done = True
                        break
            else:
                data = self._raw.read(_IN_CHUNK)
                if not data:
                    raise ReadError(f"{self._name}: truncated or corrupt {self._kind} file (it ends in the middle "
                                    f"of a compressed block); re-download it or drop it from the inputs")
            try:
                self._buf = memoryview(self._d.decompress(data))
            except Exception as e:  # zlib.error, OSError, EOFError, zstd.ZstdError
                raise ReadError(f"{self._name}: corrupt {self._kind} data ({e})") from None
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]  # a view: no copy of the rest
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def open_bytes(path: str | os.PathLike) -> tuple[io.BufferedReader, Any]:
    """(buffered decompressed byte stream, the raw file on disk — its tell() is the progress)."""
    path = Path(path)
    try:
        raw = open(path, "rb")
    except OSError as e:
        raise ReadError(f"{path}: cannot open ({e.strerror})") from None
    kind = sniff_compression(path)
    if not kind:
        return io.BufferedReader(raw, buffer_size=_CHUNK), raw
    return io.BufferedReader(_Decompressing(raw, kind, str(path)), buffer_size=_CHUNK), raw


# ---------------------------------------------------------------- formats

def detect_format(path: str | os.PathLike) -> str:
    """Format from the suffix under any compression suffix; UserError listing FORMATS when unknown."""
    p = Path(path)
    name = p.name[: -len(compression_of(p))] if compression_of(p) else p.name
    fmt = _EXT_FORMAT.get(Path(name).suffix.lower())
    if fmt is None:
        raise UserError(f"{path}: unknown input format '{Path(name).suffix or name}'; supported formats: "
                        f"{', '.join(FORMATS)} (suffixes {', '.join(_EXT_FORMAT)}; compressed with "
                        f"{', '.join(COMPRESSIONS)}); or name the format with --format")
    return fmt


def expand_inputs(path: str | os.PathLike) -> list[Path]:
    """A file -> [file]; a directory -> its files (recursive, sorted, hidden files skipped)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not any(part.startswith(".")
                                                                         for part in f.relative_to(p).parts))
        if not files:
            raise UserError(f"{p}: the input directory holds no files")
        return files
    raise UserError(f"{p}: no such input file or directory")


class _Utf8Repair(io.RawIOBase):
    """Bytes in, valid UTF-8 out (bad sequences -> U+FFFD, counted): ijson would stop at the first one."""

    def __init__(self, inner):
        self._inner = inner
        self._dec = codecs.getincrementaldecoder("utf-8")("z2all_replace")
        self._buf = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not len(self._buf):
            data = self._inner.read(_IN_CHUNK)
            self._buf = memoryview(self._dec.decode(data, final=not data).encode("utf-8"))
            if not data:
                break
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


class LineRange(NamedTuple):
    """Bytes [start, end) of a plain jsonl file, aligned to line starts."""
    start: int
    end: int


# the first item index of a LineRange batch that starts where the previous batch of its file ended
FOLLOWS = -1


def read_lines(path: str | os.PathLike, start: int, end: int) -> list[memoryview]:
    """The lines of bytes [start, end) of a file (what one `LineRange` names), each with its newline, as
    views into one buffer: one read, no copy per line."""
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        data = f.read(end - start)
        while len(data) < end - start:  # a raw read may return less; the file did not shrink (fingerprinted)
            more = f.read(end - start - len(data))
            if not more:
                raise ReadError(f"{path}: the file ended at byte {start + len(data):,} inside a batch that ends "
                                f"at {end:,} (it changed while being read)")
            data += more
    mv = memoryview(data)
    lines, pos, n, find = [], 0, len(data), data.find
    while pos < n:
        nl = find(b"\n", pos)
        stop = n if nl < 0 else nl + 1
        lines.append(mv[pos:stop])
        pos = stop
    return lines


def _line_end(fd: int, at: int, size: int) -> int:
    """The offset just past the first newline at or after byte `at` of a file of `size` bytes (or `size`).
    Small preads: a buffered readline after a seek read a whole 1 MB buffer (~1 ms) to find one line end."""
    while at < size:
        chunk = os.pread(fd, 1 << 16, at)
        if not chunk:
            break
        i = chunk.find(b"\n")
        if i >= 0:
            return at + i + 1
        at += len(chunk)
    return size


def where(path, kind: str, index: int) -> str:
    """Human location of item `index` (0-based): file:line for jsonl, file:item N otherwise."""
    return f"{path}:{index + 1}" if kind == "lines" else f"{path}:item {index + 1}"


class InputReader:
    """One input file as batches of items. `kind` is "lines" (raw jsonl lines as bytes, parsed by the
    worker so parsing runs in parallel; with `ranges=True` on a plain file each batch is one `LineRange`
    instead of a list) or "records" (dicts already decoded).

        r = InputReader("baike_qa.json.gz")
        for first_index, items in r.batches(): ...
    """

    def __init__(self, path: str | os.PathLike, fmt: str | None = None, *, columns: list[str] | None = None,
                 txt_mode: str = "paragraph", ranges: bool = False):
        self.path = Path(path)
        self.fmt = fmt or detect_format(self.path)
        if self.fmt not in FORMATS:
            raise UserError(f"--format '{self.fmt}' is not supported; use one of {', '.join(FORMATS)}")
        if txt_mode not in TXT_MODES:
            raise UserError(f"txt mode '{txt_mode}' is not one of {', '.join(TXT_MODES)}")
        self.columns, self.txt_mode = columns, txt_mode
        self.ranges = ranges and not sniff_compression(self.path)  # LineRange batches: see the module docstring
        self.size = self.path.stat().st_size
        self._raw = None
        self._pos_estimate = 0
        self.kind = "lines" if self.fmt == "jsonl" else "records"
        if self.fmt == "parquet" and (sniff_compression(self.path) or compression_of(self.path)):
            raise UserError(f"{self.path}: parquet compresses internally; decompress the file first")

    def position(self) -> int:
        """Bytes of the on-disk file consumed so far."""
        if self._raw is not None and not self._raw.closed:
            return self._raw.tell()
        return self._pos_estimate

    def where(self, index: int) -> str:
        return where(self.path, self.kind, index)

    def batches(self, start: int = 0, batch_bytes: int = 4 << 20, batch_items: int = 2048
                ) -> Iterator[tuple[int, list]]:
        """Yield (index of the first item, items), skipping the first `start` items (resume)."""
        if self.fmt == "parquet":
            yield from self._parquet(start, batch_items)
            return
        f, self._raw = open_bytes(self.path)
        try:
            if f.peek(3)[:3] == BOM:  # Windows editors write one; it would spoil the first line or the array
                f.read(3)
            if self.fmt == "jsonl" and self.ranges:
                yield from self._ranges(f, start, batch_bytes, f.tell())
            elif self.fmt == "jsonl":
                yield from self._lines(f, start, batch_bytes)
            elif self.fmt == "txt":
                yield from self._group(self._txt(f), start, batch_items)
            else:
                yield from self._json(f, start, batch_bytes, batch_items)
        finally:
            self._pos_estimate = self.size
            f.close()

    # -- jsonl: raw lines; the hint makes readlines() stop after ~batch_bytes (C speed)
    def _lines(self, f, start: int, batch_bytes: int, first: list[bytes] | None = None):
        index = 0
        pending = first or []
        while True:
            lines = pending or f.readlines(batch_bytes)
            pending = []
            if not lines:
                return
            if index + len(lines) <= start:
                index += len(lines)
                continue
            if index < start:
                lines = lines[start - index:]
                index = start
            yield index, lines
            index += len(lines)

    @staticmethod
    def _ranges(f, start: int, batch_bytes: int, pos: int, index: int = 0):
        """LineRange batches from byte `pos` on (the first line there is item `index`), skipping items before
        `index + start`. A batch is the lines `f.readlines(batch_bytes)` would return (it stops after the line
        that takes the total past the hint), so both modes cut the same batches. The first batch yielded
        carries its first item's index; every later one is FOLLOWS: only the worker that reads its lines
        counts them, and the caller numbers batches in order (the previous first + its count). So this
        process reads only the line end at each cut (a small pread) instead of every batch: in the
        parent of `data convert --workers N` that read was ~1.5 ms per 4 MB of serial work."""
        start += index
        first = start
        while index < start:  # resume: count the lines of the batches before the resume point
            import numpy as np  # here: the workers import this module and never cut ranges

            data = f.read(batch_bytes + 1)
            if not data:
                return
            if not data.endswith(b"\n"):
                data += f.readline()
            # NumPy's compare-and-count: 0.19 ms per 4 MB against bytes.count's 1.05 (a byte loop)
            n = int(np.count_nonzero(np.frombuffer(data, np.uint8) == 10)) + (not data.endswith(b"\n"))
            if index + n > start:
                off = 0
                for _ in range(start - index):  # resume inside this batch: skip to line `start`
                    off = data.index(b"\n", off) + 1
                yield start, LineRange(pos + off, pos + len(data))
                first, pos = FOLLOWS, pos + len(data)
                break
            index += n
            pos += len(data)
        fd = f.fileno()
        size = os.fstat(fd).st_size
        while pos < size:
            end = _line_end(fd, pos + batch_bytes, size)
            yield first, LineRange(pos, end)
            first, pos = FOLLOWS, end
            f.seek(pos)  # no read: position() (progress) reports the raw file's offset

    def _json(self, f, start: int, batch_bytes: int, batch_items: int):
        head = f.peek(64).lstrip()[:1]
        if head == b"{":
            first = f.readline()
            try:
                orjson.loads(first)
                jsonl = True
            except orjson.JSONDecodeError:
                jsonl = False
            if jsonl:  # jsonl named .json (baike2018qa, news2016zh ship like this)
                self.kind = "lines"
                if self.ranges:  # the first line is a batch of its own, as in _lines
                    pos = f.tell()
                    if start == 0:
                        yield 0, LineRange(pos - len(first), pos)
                    yield from self._ranges(f, max(0, start - 1), batch_bytes, pos, index=1)
                else:
                    yield from self._lines(f, start, batch_bytes, first=[first])
                return
            f = io.BufferedReader(_Utf8Repair(_Prepend(first, f)), buffer_size=_CHUNK)
            prefix = ""
        else:
            f = io.BufferedReader(_Utf8Repair(f), buffer_size=_CHUNK)
            prefix = "item"
        import ijson

        it = ijson.items(f, prefix, use_float=True)
        yield from self._group(_guard(it), start, batch_items)

    def _txt(self, f) -> Iterator[dict]:
        mode = self.txt_mode
        if mode == "line":
            for line in f:
                yield {"text": decode_utf8(line).rstrip("\r\n")}
            return
        block: list[str] = []
        size = 0
        for line in f:
            s = decode_utf8(line)
            if mode == "paragraph" and not s.strip():
                if block:
                    yield {"text": "".join(block).rstrip("\n")}
                block, size = [], 0
                continue
            block.append(s)
            size += len(s)
            if size >= _MAX_TXT_CHARS:
                # a "file" block cut for size keeps its newlines, so the blocks concatenate back to the file
                # (the tokenizer counts them); a paragraph ends at a blank line either way
                text = "".join(block)
                yield {"text": text if mode == "file" else text.rstrip("\n")}
                block, size = [], 0
        if block:
            yield {"text": "".join(block).rstrip("\n")}

    @staticmethod
    def _group(items: Iterator, start: int, batch_items: int):
        batch: list = []
        first = start
        try:
            for i, item in enumerate(items):
                if i < start:
                    continue
                if not batch:
                    first = i
                batch.append(item)
                if len(batch) >= batch_items:
                    yield first, batch
                    batch = []
        except MalformedJSON:
            if batch:  # the items before the bad spot are good: hand them over first
                yield first, batch
            raise
        if batch:
            yield first, batch

    def _parquet(self, start: int, batch_items: int):
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(self.path)
        except Exception as e:  # pyarrow.ArrowInvalid and friends
            raise ReadError(f"{self.path}: not a readable parquet file ({e})") from None
        names = pf.schema_arrow.names
        columns = None
        if self.columns is not None:
            missing = [c for c in self.columns if c not in names]
            if missing:
                raise UserError(f"{self.path}: parquet columns {missing} not found; the file has {names}")
            columns = self.columns
        total = max(1, pf.metadata.num_rows)
        index = 0
        try:
            for rb in pf.iter_batches(batch_size=min(batch_items, 1024), columns=columns):
                n = rb.num_rows
                if index + n > start:
                    rows = rb.to_pylist()
                    skip = max(0, start - index)
                    yield index + skip, rows[skip:]
                index += n
                self._pos_estimate = int(self.size * index / total)
        except OSError as e:
            raise ReadError(f"{self.path}: parquet read failed after row {index} ({e})") from None


class _Prepend(io.RawIOBase):
    """A stream that first returns `head`, then the rest of `f` (we consumed one line to sniff jsonl)."""

    def __init__(self, head: bytes, f):
        self._head, self._f = head, f

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self._head:
            n = min(len(b), len(self._head))
            b[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._f.read(len(b))
        b[: len(data)] = data
        return len(data)


def _guard(it: Iterator) -> Iterator:
    """ijson errors -> MalformedJSON carrying the item index (ReadError from the stream passes through)."""
    import ijson

    i = 0
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except ijson.JSONError as e:
            raise MalformedJSON(i, f"invalid JSON after item {i}: {e}") from None
        yield item
        i += 1
