"""Size-rolled shard writer (atomic), per-source manifest, and the tokenizer-training txt export.

Layout of a converted corpus (`z2all data convert --out OUT`):

    OUT/<source>/part-00000.jsonl[.zst]   one unified record per line (schema.FIELDS order), ~shard_mb each
    OUT/<source>/part-00000.txt           with --txt: record_text of each document, a blank line between
    OUT/<source>/manifest.json            shards (count, bytes, sha256, gid range), skipped counts by reason
                                          with the first few file:line examples, inputs
    OUT/<source>/.dedup/part-00000.u64    the shard's content hashes (raw uint64), reloaded on resume
                                          (+ .near.u64: MinHash band keys with --clean.near-dedup)

A shard is written to a hidden temp file and renamed into place only when complete (fsync first), so a
reader or a crash never sees half a shard. The writer gets a batch of records already serialised (in the
workers) with their placeholder ids cut off (`b'"data_src":...}\n'`: sources.PLACEHOLDER, what
sources.to_record's ids serialise to, was there) and puts the real `{"gid":G,"id":I,` in front: numbering costs
one small bytes format per record, and a batch reaches the file (and the sha256) as one joined write.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from array import array
from pathlib import Path

import numpy as np

from z2all.io import atomic_write_bytes, atomic_write_text, start_writeback
from z2all.utils import UserError

MANIFEST = "manifest.json"


def shard_name(index: int, compress: str) -> str:
    return f"part-{index:05d}.jsonl" + (".zst" if compress == "zstd" else "")


class _HashingFile:
    """Counts and sha256-hashes the bytes that reach the disk (the compressed bytes for .zst shards)."""

    def __init__(self, path: Path):
        self.f = open(path, "wb")
        self.sha = hashlib.sha256()
        self.bytes = 0
        self.written_back = 0  # bytes handed to start_writeback

    def write(self, data) -> int:
        self.sha.update(data)
        self.bytes += len(data)
        n = self.f.write(data)
        if self.bytes - self.written_back >= 8 << 20:  # the final fsync then waits for the last few MB only
            self.f.flush()
            start_writeback(self.f.fileno(), self.written_back, self.bytes - self.written_back)
            self.written_back = self.bytes
        return n

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


class ShardWriter:
    """One open shard of one source. `write` appends a batch; `finish` makes it visible and returns its
    manifest entry. Sizes count uncompressed jsonl bytes (what `shard_mb` means)."""

    def __init__(self, out_dir: Path, index: int, *, compress: str = "none", txt: bool = False):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.index = index
        self.name = shard_name(index, compress)
        self.tmp = self.dir / f".{self.name}.tmp"
        self.file = _HashingFile(self.tmp)
        self._zw = None
        if compress == "zstd":
            import zstandard

            self._zw = zstandard.ZstdCompressor(level=3).stream_writer(self.file, closefd=False)
        self.txt_tmp = self.dir / f".part-{index:05d}.txt.tmp" if txt else None
        self.txt_f = open(self.txt_tmp, "wb") if txt else None
        self.txt_bytes = 0
        self.size = 0
        self.count = 0
        self.gid_first: int | None = None
        self.gid_last: int | None = None
        self.hashes = array("Q")
        self.near_keys: list[int] = []

    def write(self, first_gid: int, bodies: list[bytes], texts: list[bytes] | None, hashes: array,
              nears: list[list[int]] | None) -> None:
        """Append a batch as gids first_gid, first_gid+1, ...: each body is one jsonl line with its leading
        PLACEHOLDER cut off (sources.serialise); texts (for the .txt twin, or None), content hashes
        (array('Q')) and MinHash band keys (or None) are the same documents' columns."""
        if not bodies:
            return
        n0, n = self.count, len(bodies)
        # the parent's serial share of a --workers N run: list comprehensions, no per-record memoryview (a
        # memoryview slice per record cost ~1 us, 75 ms per 96 MB)
        parts: list = [b""] * (2 * n)
        parts[0::2] = [b'{"gid":%d,"id":%d,' % (first_gid + k, n0 + k) for k in range(n)]
        parts[1::2] = bodies
        data = b"".join(parts)
        (self._zw or self.file).write(data)
        self.size += len(data)
        if texts:
            chunk = b"\n\n".join(texts)
            if n0:  # a blank line between documents, none before the first
                chunk = b"\n\n" + chunk
            self.txt_f.write(chunk)
            self.txt_bytes += len(chunk)
        if self.gid_first is None:
            self.gid_first = first_gid
        self.gid_last = first_gid + n - 1
        self.count += n
        self.hashes.extend(hashes)
        for keys in nears or ():
            self.near_keys.extend(keys)

    def finish(self) -> dict:
        """Flush, fsync, rename into place; returns the manifest entry."""
        if self._zw is not None:
            self._zw.close()  # ends the zstd frame; closefd=False leaves our file open
        self.file.close()
        info = {"file": self.name, "count": self.count, "bytes": self.file.bytes, "jsonl_bytes": self.size,
                "sha256": self.file.sha.hexdigest(), "gid_first": self.gid_first, "gid_last": self.gid_last}
        dedup = self.dir / ".dedup"
        dedup.mkdir(exist_ok=True)
        atomic_write_bytes(dedup / f"part-{self.index:05d}.u64", self.hashes.tobytes())
        if self.near_keys:
            atomic_write_bytes(dedup / f"part-{self.index:05d}.near.u64",
                          np.asarray(self.near_keys, dtype=np.uint64).tobytes())
        if self.txt_f is not None:
            self.txt_f.flush()
            os.fsync(self.txt_f.fileno())
            self.txt_f.close()
            txt_name = f"part-{self.index:05d}.txt"
            os.replace(self.txt_tmp, self.dir / txt_name)
            info.update(txt=txt_name, txt_bytes=self.txt_bytes)
        os.replace(self.tmp, self.dir / self.name)
        return info

    def abort(self) -> None:
        for f in (self.file.f, self.txt_f):
            if f is not None and not f.closed:
                f.close()
        for p in (self.tmp, self.txt_tmp):
            if p is not None and p.exists():
                p.unlink()


def load_shard_hashes(out_dir: Path, index: int, kind: str = "") -> np.ndarray:
    """The content hashes (kind "") or MinHash band keys (kind "near") a finished shard saved."""
    path = Path(out_dir) / ".dedup" / f"part-{index:05d}{'.' + kind if kind else ''}.u64"
    return np.fromfile(path, dtype=np.uint64) if path.exists() else np.empty(0, dtype=np.uint64)


_TEMP = re.compile(r"\.part-\d{5}\.(jsonl|jsonl\.zst|txt)\.tmp")  # only ShardWriter makes these hidden names


def remove_stale(out_dir: Path, written: list[str] = ()) -> None:
    """Delete what a killed run left in a source directory: the shard writer's hidden temp files and
    `written`, the files the caller's state says that run wrote but never committed (the shard it had open).
    A visible file is never judged by its name: a user's part-00009.jsonl that no state lists is not ours."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return
    for p in out_dir.iterdir():
        if p.is_file() and _TEMP.fullmatch(p.name):
            p.unlink()
    for name in written:
        p = out_dir / name
        if p.is_file() and not p.is_symlink():
            p.unlink()


def write_manifest(out_dir: Path, manifest: dict) -> None:
    atomic_write_text(Path(out_dir) / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


def read_manifest(out_dir: Path) -> dict:
    return json.loads((Path(out_dir) / MANIFEST).read_text(encoding="utf-8"))


def _checked_manifest(d: Path) -> dict:
    """A source directory's manifest, or a UserError naming it when it is unreadable or not ours."""
    path = d / MANIFEST
    try:
        man = read_manifest(d)
        if not isinstance(man, dict) or not isinstance(man.get("shards"), list) or not all(
                isinstance(sh, dict) and isinstance(sh.get("file"), str) and isinstance(sh.get("count"), int)
                for sh in man["shards"]):
            raise ValueError("no list of shards with file names and counts")
        return man
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path} is corrupt ({e}); run `z2all data convert` again for this source "
                        f"(--overwrite)") from None


def converted_shards(root: str | os.PathLike, option: str = "--shards") -> list[tuple[Path, dict]]:
    """(shard path, its manifest entry) of every shard of a `z2all data convert` output, in gid order.
    `root` is the convert --out directory, one source directory, or one shard listed in its directory's
    manifest. Anything else (a raw jsonl file, a directory without manifests) is refused: its lines are not
    unified records, and tokenizing them would silently produce almost nothing."""
    root = Path(root)
    what = f"{option} {root} is not the output of `z2all data convert`"
    if not root.exists():
        raise UserError(f"{option} {root} not found: give the --out directory of `z2all data convert`")
    if root.is_file():
        if not (root.parent / MANIFEST).is_file():
            raise UserError(f"{what} (no {MANIFEST} beside it); convert it first with `z2all data convert`")
        entries = [sh for sh in _checked_manifest(root.parent)["shards"] if sh["file"] == root.name]
        if not entries:
            raise UserError(f"{what}: {root.parent / MANIFEST} does not list it")
        return [(root, entries[0])]
    dirs = [root] if (root / MANIFEST).is_file() else sorted(
        d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and (d / MANIFEST).is_file())
    if not dirs:
        raise UserError(f"{what} (no {MANIFEST} in it or its sub-directories); run `z2all data convert` first")
    keyed = []
    for d in dirs:
        man = _checked_manifest(d)
        if man.get("complete") is False:  # absent in manifests of an older z2all
            raise UserError(f"{d / MANIFEST} says the conversion of '{d.name}' is unfinished (killed, or stopped "
                            f"at a broken input); rerun the same `z2all data convert` command to finish it")
        shards = man["shards"]
        first = shards[0].get("gid_first", -1) if shards else -1
        keyed.append(((first, d.name), [(d / sh["file"], sh) for sh in shards]))
    out = [x for _, shards in sorted(keyed) for x in shards]
    for p, _ in out:
        if not p.is_file():
            raise UserError(f"{p} is missing (listed in {p.parent / MANIFEST}); run `z2all data convert` "
                            f"again to rewrite it")
    return out


def verify_shard(path: Path, entry: dict) -> None:
    """The shard's sha256 and size against its manifest entry (written at commit): a truncated, edited or
    replaced shard is a UserError naming it. Entries of an older z2all without a sha256 are not checked."""
    want = entry.get("sha256")
    if not want:
        return
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    if h.hexdigest() != want:
        size = path.stat().st_size
        how = (f"{size:,} bytes, the manifest says {entry['bytes']:,}: truncated?" if "bytes" in entry
               and size != entry["bytes"] else "its content changed")
        raise UserError(f"shard {path} does not match {path.parent / MANIFEST} ({how}); run `z2all data "
                        f"convert` again for this source (--overwrite) or restore the file")


def find_shards(root: str | os.PathLike) -> list[Path]:
    """Every shard of a converted corpus in gid order: source directories ordered by their first gid (from
    the manifests; directories without one come after, by name), and within one the manifest's list (else
    `part-*.jsonl[.zst]` sorted). `root` may also be one source directory or one shard file."""
    root = Path(root)
    if root.is_file():
        return [root]
    dirs = [root] if (root / MANIFEST).exists() else [d for d in root.iterdir() if d.is_dir()
                                                       and not d.name.startswith(".")]
    keyed = []
    for d in dirs:
        if (d / MANIFEST).exists():
            shards = _checked_manifest(d)["shards"]
            first = shards[0]["gid_first"] if shards else -1
            keyed.append(((0, first, d.name), [d / s["file"] for s in shards]))
        else:
            files = sorted(p for p in d.glob("part-*.jsonl*") if p.name.endswith((".jsonl", ".jsonl.zst")))
            keyed.append(((1, 0, d.name), files))
    return [p for _, files in sorted(keyed) for p in files]
