"""Every file and directory a command writes goes through here: atomic writes, output-directory ownership,
and input fingerprints. The rules they enforce are the project's promise to its users:

- A file is written to a temp file in the same directory, fsynced and renamed over the target, so a reader
  (or a resume after SIGKILL) sees either the old or the complete new content.
- A command writes only into a directory that is new, empty, or that it made itself earlier. It marks the
  directories it makes with `OWNER_FILE` (`.z2all-owner.json`, naming the command); a directory that holds
  anything else is refused with a message, never cleared. An output directory may also never contain one
  of the command's inputs (`protect`), so that replacing an output cannot delete what it was made from.
- An input is identified by path, size, mtime and a fingerprint of its first and last 64 KiB, so a
  resume notices an input that was replaced or truncated in the meantime (`fingerprint`). Whole-file
  checksums (`sha256_file`) are for artifacts we wrote and can afford to hash (shards, checkpoints).

    from z2all.io import claim_output_dir, atomic_write_text
    out = claim_output_dir("runs/x", "train", protect=[cfg.data.dir])   # raises UserError if not ours
    atomic_write_text(out / "config.json", text)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO

from z2all.utils import UserError

OWNER_FILE = ".z2all-owner.json"
# mkstemp/mkdtemp create 0600 files and 0700 directories; what we rename into place gets the modes a plain
# open()/mkdir() would give under the process umask (read once: os.umask can only be read by setting it)
_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE, DIR_MODE = 0o666 & ~_UMASK, 0o777 & ~_UMASK
_FINGERPRINT_SPAN = 64 * 1024


# ---------------------------------------------------------------- atomic files

@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, fsync: bool = True) -> Iterator[IO]:
    """Open a temp file next to `path`; on a clean exit fsync it and rename it over `path`, on an error
    remove it. `mode` is "w" (text, UTF-8) or "wb"."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open mode must be 'w' or 'wb', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


_SYNC_FILE_RANGE: list = []  # [libc's sync_file_range or None], resolved on first use (ctypes stays out of start-up)


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing [offset, offset + nbytes) of a file to disk now, without waiting
    (sync_file_range's SYNC_FILE_RANGE_WRITE on Linux; nothing elsewhere or when it fails). Why: a file
    written fast and fsynced once at the end waits there for all of it; started batch by batch, the final
    fsync of a 93 MB shard took 8 ms instead of ~30 (ext4 on this machine's virtual disk: I/O wait, not
    CPU). The fsync stays: this only moves the writing earlier."""
    if not _SYNC_FILE_RANGE:
        fn = None
        if sys.platform.startswith("linux"):
            import ctypes

            try:
                fn = ctypes.CDLL(None, use_errno=True).sync_file_range
                fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            except (OSError, AttributeError):
                fn = None
        _SYNC_FILE_RANGE.append(fn)
    if _SYNC_FILE_RANGE[0] is not None:
        _SYNC_FILE_RANGE[0](fd, offset, nbytes, 2)  # 2 = SYNC_FILE_RANGE_WRITE


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file (UTF-8) so readers see either the old or the new content, never half of it."""
    with atomic_open(path, "w") as f:
        f.write(text)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """A temp file path next to `path` for writers that want a file name, not a file object (e.g.
    safetensors' save_file); on a clean exit it is fsynced and renamed over `path`, on an error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, FILE_MODE)
    os.close(fd)
    try:
        yield Path(tmp)
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike, obj, *, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=str) + "\n")


MANIFEST_FILE = ".z2all-files.json"  # what atomic_dir swapped in: the files a later replace may remove
LOCK_FILE = ".z2all-lock"  # held (flock) by the process writing the directory: dir_lock


def _written_files(d: Path) -> set[str] | None:
    """The files (relative paths) an earlier atomic_dir put in `d`: its manifest, else (written by an older
    z2all) its checksum file's list; None when `d` has neither."""
    for name, key in ((MANIFEST_FILE, "files"), (CHECKSUM_FILE, "sha256")):
        try:
            listed = json.loads((d / name).read_text(encoding="utf-8"))[key]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(listed, (list, dict)):
            return {str(n) for n in listed} | {CHECKSUM_FILE}
    return None


def unlisted_files(directory: str | os.PathLike, ours: Iterable[str] = ()) -> list[str]:
    """Files (relative paths, sorted) in `directory` that the command which made it did not write: not in
    its record (MANIFEST_FILE, else for an older z2all its checksum file's list, else `ours`, the command's
    own file names); with no record at all, every file. Our bookkeeping files (OWNER_FILE, MANIFEST_FILE,
    LOCK_FILE) are ours wherever they lie (a copied tokenizer dir carries its owner file); a user's dot files
    (.gitattributes, .env) are not."""
    d = Path(directory)
    known = _written_files(d)
    if known is None and ours:
        known = set(ours)
    mine = {OWNER_FILE, MANIFEST_FILE, LOCK_FILE}
    out = []
    for p in d.rglob("*"):
        if (p.is_dir() and not p.is_symlink()) or p.name in mine:
            continue
        rel = p.relative_to(d).as_posix()
        if known is None or rel not in known:
            out.append(rel)
    return sorted(out)


def check_replaceable(final: str | os.PathLike, option: str = "--out", ours: Iterable[str] = ()) -> None:
    """Raise a UserError naming them when directory `final` holds files that the command which made it did
    not write (unlisted_files: a user's notes, another command's results such as `z2all eval`'s eval/),
    since replacing `final` whole (atomic_dir) would delete them."""
    d = Path(final)
    if not d.is_dir():
        return
    foreign = unlisted_files(d, ours)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f", ... ({len(foreign)} files)" if len(foreign) > 3 else "")
        recorded = _written_files(d) is not None or bool(tuple(ours))
        what = "this command did not write" if recorded else "that z2all has no record of writing"
        raise UserError(f"{option} {d} holds files {what} ({shown}); replacing the directory would delete them. "
                        f"Move them out or choose another directory (nothing was changed)")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, option: str = "--out", ours: Iterable[str] = ()) -> Iterator[Path]:
    """Build a directory in a temp dir beside `final`, then swap it into place: `final` is at every moment
    either absent, the old complete directory, or the new complete one. The caller must already own
    `final` (see `claim_output_dir`); the old directory is removed only after the new one is in place, and
    only when it holds nothing but what an earlier atomic_dir put there (check_replaceable, checked on entry
    and again before the swap; each swap records its files in MANIFEST_FILE; `ours`: check_replaceable).
    On an error (disk full included) the temp dir is removed and `final` is untouched."""
    final, ours = Path(final), tuple(ours)
    if final.is_symlink():  # replace what the link points to, not the link (the link stays a link)
        final = final.resolve()
    check_replaceable(final, option, ours)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    tmp.chmod(DIR_MODE)
    try:
        yield tmp
        atomic_write_json(tmp / MANIFEST_FILE, {"files": sorted(
            p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if not p.is_dir() and p.name != MANIFEST_FILE)})
        check_replaceable(final, option, ours)  # a file added while the new directory was built
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- output directories

def _inside(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def read_owner(path: str | os.PathLike) -> str | None:
    """The command that made directory `path` (from its owner file), or None."""
    f = Path(path) / OWNER_FILE
    try:
        return json.loads(f.read_text(encoding="utf-8")).get("command")
    except (OSError, ValueError, AttributeError):
        return None


def claim_output_dir(path: str | os.PathLike, command: str, *, option: str = "--out",
                     protect: Iterable[str | os.PathLike | None] = (),
                     legacy: Callable[[Path], bool] | None = None) -> Path:
    """Make sure `path` may be written by `command` (e.g. "export hf") and return it, created and marked.

    Accepted: a path that does not exist yet, an empty directory, or a directory whose owner file names
    the same command (an earlier run of it, which the command may resume or replace). `legacy(path)` may
    accept a directory an older z2all wrote before owner files existed; it gets marked. Everything else is
    refused with a UserError naming the directory, what is in it and what to do; nothing is removed.
    `protect` lists the command's inputs: none may lie inside `path` (or be `path`)."""
    out = Path(path)
    if not str(path):
        raise UserError(f"{option} is empty; give a directory to write to")
    for p in protect:
        if p and Path(p).exists() and _inside(Path(p), out):
            raise UserError(f"{option} {out} contains the input {p}; writing there could destroy it. "
                            f"Choose an output directory outside the inputs")
    if out.exists() and not out.is_dir():
        raise UserError(f"{option} {out} is a file, not a directory; choose a directory path")
    if out.is_dir():
        owner = read_owner(out)
        entries = [e.name for e in out.iterdir() if e.name not in (OWNER_FILE, LOCK_FILE)]
        if owner is not None and owner != command:
            raise UserError(f"{option} {out} holds the output of `z2all {owner}`, not of `z2all {command}`; "
                            f"choose another directory")
        if owner is None and entries and not (legacy is not None and legacy(out)):
            shown = ", ".join(sorted(entries)[:3]) + (", ..." if len(entries) > 3 else "")
            raise UserError(f"{option} {out} is not empty ({shown}) and was not written by `z2all {command}`; "
                            f"choose a new or empty directory (nothing was changed)")
        if owner == command:
            return out
    out.mkdir(parents=True, exist_ok=True)
    from z2all import __version__

    atomic_write_json(out / OWNER_FILE, {"command": command, "z2all_version": __version__})
    return out


class NewOutput:
    """Taken before `claim_output_dir(path, ...)`: whether `path` is new or empty (our lock file aside), and
    which directories the claim will create. `undo()` hands such a directory back as it was found (our owner
    file removed, the created directories removed while empty) once the run's own files are gone. A
    resumable command calls undo() itself when it ends with nothing worth keeping; claimed_output_dir does
    it on any exception."""

    def __init__(self, path: str | os.PathLike):
        self.out = Path(path)
        self.fresh = not self.out.exists() or (self.out.is_dir()
                                               and not any(e.name != LOCK_FILE for e in self.out.iterdir()))
        self.made: list[Path] = []  # deepest first
        d = self.out
        while not d.exists() and d != d.parent:
            self.made.append(d)
            d = d.parent

    def undo(self) -> None:
        """Remove the claim of a directory that was new or empty (call after removing the run's files)."""
        if not self.fresh:
            return
        (self.out / OWNER_FILE).unlink(missing_ok=True)
        for d in self.made:  # a directory that existed (empty) stays, as it was found
            try:
                d.rmdir()
            except OSError:  # not empty: something else lives there now
                break


@contextlib.contextmanager
def claimed_output_dir(path: str | os.PathLike, command: str, **claim) -> Iterator[Path]:
    """`claim_output_dir` for a command that may still fail before writing anything useful: if the claim
    created the directory (or found it empty) and the body raises, the claim is undone (NewOutput.undo), so
    a failed first run leaves no trace."""
    new = NewOutput(path)
    out = claim_output_dir(path, command, **claim)
    try:
        yield out
    except BaseException:
        new.undo()
        raise


_HELD: dict[str, int] = {}  # directories this process holds dir_lock on -> nesting depth


@contextlib.contextmanager
def dir_lock(path: str | os.PathLike, command: str, option: str = "--out") -> Iterator[Path]:
    """Hold directory `path` for `command` while the body writes it: a second z2all process that asks for
    the same directory meanwhile is refused in one line naming the first (its command and pid), instead of
    the two interleaving checkpoints, metrics or shards. The lock is flock(2) on LOCK_FILE inside the
    directory (created if missing; removed on exit, with the directories this call created while they are
    empty): the kernel drops it when the process dies, so a killed run never leaves a stale lock. Nested use
    on the same directory in one process is allowed. Local filesystems only: flock over NFS may not lock."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock (the claim rules still hold)
        yield Path(path)
        return
    d = Path(path)
    if not str(path) or (d.exists() and not d.is_dir()):  # the command's claim says what is wrong with it
        yield d
        return
    key = str(d.resolve())
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield d
        finally:
            _HELD[key] -= 1
        return
    new = NewOutput(d)
    d.mkdir(parents=True, exist_ok=True)
    lock = d / LOCK_FILE
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
            finally:
                os.close(fd)
            raise UserError(f"{option} {d} is being written by {holder}; wait for it to finish or choose another "
                            f"directory (nothing was changed)") from None
        try:  # the file may have been removed by its previous holder after we opened it: lock the new one
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"`z2all {command}` (pid {os.getpid()})".encode())
    _HELD[key] = 1
    try:
        yield d
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            lock.unlink()  # while still held: a process that opened the old file retries on the new one
        os.close(fd)
        for made in new.made:  # while empty: a failed first run leaves no directory behind
            try:
                made.rmdir()
            except OSError:
                break


def inside(child: str | os.PathLike, parent: str | os.PathLike) -> bool:
    """Whether `child` is `parent` or lies below it (after resolving links)."""
    return _inside(Path(child), Path(parent))


def remove_listed(directory: str | os.PathLike, names: Iterable[str]) -> int:
    """Remove exactly the files (or our directories) `names` inside `directory`; returns how many existed.
    Used by --overwrite: a command deletes only what its own manifest says it wrote."""
    d, n = Path(directory), 0
    for name in names:
        p = d / name
        if not _inside(p, d) or p.resolve() == d.resolve():
            raise ValueError(f"refusing to remove {p}: not inside {d}")
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
            n += 1
        elif p.exists() or p.is_symlink():
            p.unlink()
            n += 1
    return n


# ---------------------------------------------------------------- input identity

def fingerprint(path: str | os.PathLike) -> dict:
    """A cheap identity of a file: size, mtime (ns) and the sha256 of its first and last 64 KiB.
    Equal fingerprints mean "same file" for resume purposes; a replaced, truncated or appended file
    changes it (an in-place edit in the middle of a large file that keeps size and mtime would not)."""
    p = Path(path)
    st = p.stat()
    h = hashlib.sha256()
    with open(p, "rb") as f:
        h.update(f.read(_FINGERPRINT_SPAN))
        if st.st_size > _FINGERPRINT_SPAN:
            f.seek(max(_FINGERPRINT_SPAN, st.st_size - _FINGERPRINT_SPAN))
            h.update(f.read(_FINGERPRINT_SPAN))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "head_tail_sha256": h.hexdigest()[:32]}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- checksums of a directory we wrote

CHECKSUM_FILE = "checksums.json"


def write_checksums(directory: str | os.PathLike) -> dict[str, str]:
    """Hash every regular file under `directory` (recursively, relative paths) into CHECKSUM_FILE, so a
    reader can tell an intact artifact (a checkpoint, an export) from a truncated or corrupted one.
    Call it last, on the temp directory, before `atomic_dir` swaps it in."""
    d = Path(directory)
    sums = {p.relative_to(d).as_posix(): sha256_file(p) for p in sorted(d.rglob("*"))
            if p.is_file() and p.name != CHECKSUM_FILE and not p.name.startswith(".")}
    atomic_write_json(d / CHECKSUM_FILE, {"sha256": sums})
    return sums


def verify_checksums(directory: str | os.PathLike, only: Iterable[str] | None = None) -> bool:
    """Check the files listed in `directory`/CHECKSUM_FILE (or just `only` of them). Returns False when the
    directory has no checksum file (written by an older z2all: nothing to check); raises UserError naming
    the first missing, truncated or altered file."""
    d = Path(directory)
    try:
        sums = json.loads((d / CHECKSUM_FILE).read_text(encoding="utf-8"))["sha256"]
    except FileNotFoundError:
        return False
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{d / CHECKSUM_FILE} is unreadable ({e}); the directory cannot be verified") from None
    names = sums if only is None else [n for n in only if n in sums]
    for name in names:
        p = d / name
        if not p.is_file():
            raise UserError(f"{p} is missing (listed in {d / CHECKSUM_FILE})")
        if sha256_file(p) != sums[name]:
            raise UserError(f"{p} is corrupt or truncated (its sha256 differs from {d / CHECKSUM_FILE})")
    return True
