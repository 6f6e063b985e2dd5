"""z2all/io.py: atomic writes, output-directory ownership, fingerprints and checksums."""

from __future__ import annotations

import json
import os
from array import array

import pytest

from z2all.io import (
    OWNER_FILE,
    atomic_dir,
    atomic_write_text,
    claim_output_dir,
    fingerprint,
    read_owner,
    remove_listed,
    verify_checksums,
    write_checksums,
)
from z2all.utils import UserError


def test_atomic_write_leaves_old_content_on_error(tmp_path):
    f = tmp_path / "a.txt"
    atomic_write_text(f, "old")

    class Boom(Exception):
        pass

    from z2all.io import atomic_open
    with pytest.raises(Boom):
        with atomic_open(f) as fh:
            fh.write("new, half")
            raise Boom
    assert f.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # no temp file left


def test_claim_new_empty_and_own(tmp_path):
    out = claim_output_dir(tmp_path / "new" / "dir", "export hf")
    assert read_owner(out) == "export hf"
    (out / "x").write_text("ours")
    assert claim_output_dir(out, "export hf") == out  # an earlier run of the same command
    empty = tmp_path / "empty"
    empty.mkdir()
    assert read_owner(claim_output_dir(empty, "train")) == "train"


def test_claim_refuses_foreign_dirs_and_changes_nothing(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(UserError, match="not empty.*config.json.*nothing was changed"):
        claim_output_dir(run, "export hf")
    assert sorted(p.name for p in run.iterdir()) == before
    other = claim_output_dir(tmp_path / "tok", "tokenizer train")
    with pytest.raises(UserError, match="output of `z2all tokenizer train`"):
        claim_output_dir(other, "export hf")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        claim_output_dir(f, "train")
    with pytest.raises(UserError, match="is empty"):
        claim_output_dir("", "train", option="--out_dir")


def test_claim_protects_inputs_and_accepts_legacy(tmp_path):
    out = claim_output_dir(tmp_path / "run", "train")
    ckpt = out / "checkpoints" / "step-1"
    ckpt.mkdir(parents=True)
    with pytest.raises(UserError, match="contains the input"):
        claim_output_dir(out, "train", protect=[ckpt])
    with pytest.raises(UserError, match="contains the input"):
        claim_output_dir(tmp_path, "export hf", protect=[ckpt])
    old = tmp_path / "old"
    old.mkdir()
    (old / "meta.json").write_text("{}")
    claim_output_dir(old, "data tokenize", legacy=lambda p: (p / "meta.json").is_file())
    assert read_owner(old) == "data tokenize"
    assert (old / OWNER_FILE).is_file()


def test_remove_listed_only_removes_names(tmp_path):
    (tmp_path / "a").write_text("1")
    (tmp_path / "b").write_text("2")
    (tmp_path / "sub").mkdir()
    assert remove_listed(tmp_path, ["a", "sub", "missing"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    with pytest.raises(ValueError):
        remove_listed(tmp_path, ["../x"])


def test_fingerprint_sees_replacement_truncation_and_append(tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_bytes(b"x" * 300_000)
    fp = fingerprint(f)
    assert fingerprint(f) == fp
    st = os.stat(f)
    f.write_bytes(b"x" * 299_999 + b"y")  # same size, same mtime, different tail
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert fingerprint(f) != fp
    f.write_bytes(b"x" * 100)
    assert fingerprint(f)["size"] == 100


def test_checksums_name_the_bad_file(tmp_path):
    d = tmp_path / "ckpt"
    with atomic_dir(d) as tmp:
        (tmp / "model.safetensors").write_bytes(b"w" * 1000)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "t.json").write_text("{}")
        write_checksums(tmp)
    assert verify_checksums(d)
    assert json.loads((d / "checksums.json").read_text())["sha256"].keys() == {"model.safetensors", "sub/t.json"}
    with open(d / "model.safetensors", "r+b") as f:
        f.truncate(500)
    with pytest.raises(UserError, match="model.safetensors is corrupt or truncated"):
        verify_checksums(d)
    assert verify_checksums(d, only=["sub/t.json"])
    (d / "sub" / "t.json").unlink()
    with pytest.raises(UserError, match="t.json is missing"):
        verify_checksums(d, only=["sub/t.json"])
    assert verify_checksums(tmp_path) is False  # nothing to verify


def test_atomic_dir_error_keeps_old(tmp_path):
    d = tmp_path / "exp"
    with atomic_dir(d) as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(OSError):
        with atomic_dir(d) as tmp:
            (tmp / "v").write_text("2")
            raise OSError(28, "No space left on device")
    assert (d / "v").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["exp"]


def test_atomic_dir_replaces_only_what_it_wrote(tmp_path):
    """A directory atomic_dir made is replaced whole only while it holds nothing else: a file added at the
    top or in a subdirectory is named and the replace refused, before the body runs and again before the
    swap; an older z2all's directory (no manifest) is judged by its checksums or by the caller's names."""
    from z2all.io import MANIFEST_FILE, check_replaceable

    d = tmp_path / "exp"
    with atomic_dir(d) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w").write_text("1")
    assert json.loads((d / MANIFEST_FILE).read_text())["files"] == ["sub/w"]
    with atomic_dir(d) as tmp:  # nothing foreign: replaced
        (tmp / "w").write_text("2")
    assert sorted(p.name for p in d.iterdir()) == [MANIFEST_FILE, "w"]
    (d / "notes.txt").write_text("mine")
    ran = []
    with pytest.raises(UserError, match="notes.txt.*nothing was changed"):
        with atomic_dir(d) as tmp:
            ran.append(1)
    assert not ran and (d / "notes.txt").read_text() == "mine" and (d / "w").read_text() == "2"
    (d / "notes.txt").unlink()
    (d / ".gitattributes").write_text("*.safetensors filter=lfs")  # a user's dot file is not ours either
    with pytest.raises(UserError, match=r"\.gitattributes"):
        with atomic_dir(d) as tmp:
            pass
    (d / ".gitattributes").unlink()
    with pytest.raises(UserError, match="deep/x"):
        with atomic_dir(d) as tmp:
            (tmp / "w").write_text("3")
            (d / "deep").mkdir()
            (d / "deep" / "x").write_text("added meanwhile")
    assert (d / "w").read_text() == "2" and (d / "deep" / "x").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]
    import shutil

    shutil.rmtree(d / "deep")
    link = tmp_path / "link"  # an output given as a link: the directory it points to is replaced
    link.symlink_to(d)
    with atomic_dir(link) as tmp:
        (tmp / "w").write_text("4")
    assert link.is_symlink() and (d / "w").read_text() == "4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp", "link"]
    link.unlink()
    old = tmp_path / "old"  # an older z2all's output: no manifest
    old.mkdir()
    (old / "meta.json").write_text("{}")
    with pytest.raises(UserError, match="no record of writing"):
        check_replaceable(old)
    check_replaceable(old, ours=["meta.json"])
    write_checksums(old)
    check_replaceable(old)
    (old / "extra").write_text("x")
    with pytest.raises(UserError, match="extra"):
        check_replaceable(old)


def test_dir_lock_refuses_a_second_process_and_leaves_nothing_behind(tmp_path, lock_holder):
    """Another process holding the directory: refused naming its command and pid, nothing created; the
    same process may nest; on exit the lock file goes, and a directory the lock created goes if empty; a
    killed holder's lock is gone with it (flock)."""
    from z2all.io import LOCK_FILE, dir_lock

    d = tmp_path / "out"
    p = lock_holder(d, "train")
    with pytest.raises(UserError, match=rf"--out_dir .*out is being written by `z2all train` \(pid {p.pid}\)"):
        with dir_lock(d, "sft", "--out_dir"):
            pass
    p.kill()  # SIGKILL: no cleanup code runs, the kernel drops the lock
    p.wait()
    assert (d / LOCK_FILE).exists()  # left by the killed holder, but not locked
    with dir_lock(d, "sft") as got:
        assert got == d and f"pid {os.getpid()}" in (d / LOCK_FILE).read_text()
        with dir_lock(d, "sft"):  # nested in one process
            pass
        (d / "result").write_text("x")
    assert sorted(p.name for p in d.iterdir()) == ["result"]
    fresh = tmp_path / "new" / "dir"
    with dir_lock(fresh, "train"):
        assert fresh.is_dir()
    assert not fresh.exists()  # created by the lock and left empty: removed


def test_written_files_and_dirs_get_umask_modes_not_tempfile_modes(tmp_path):
    """mkstemp/mkdtemp make 0600/0700; a user's other tools must read what we write like any other file."""
    from z2all.io import DIR_MODE, FILE_MODE, atomic_path

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_path(tmp_path / "b.bin") as p:
            p.write_bytes(b"y")
        with atomic_dir(tmp_path / "d") as d:
            (d / "f").write_text("z")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == FILE_MODE
    assert (tmp_path / "b.bin").stat().st_mode & 0o777 == FILE_MODE
    assert (tmp_path / "d").stat().st_mode & 0o777 == DIR_MODE


def test_start_writeback_keeps_the_bytes_and_never_raises(tmp_path):
    """A shard of more than 8 MB hands its bytes to the kernel as it grows: the file and its sha256 are what
    was written; on a pipe (where sync_file_range fails) the call is a no-op, not an error."""
    import hashlib

    from z2all.data.shards import ShardWriter
    from z2all.io import start_writeback

    bodies = [b'"content":"%08d' % i + b"x" * 4000 + b'"}\n' for i in range(2500)]  # ~10 MB: crosses 8 MB
    w = ShardWriter(tmp_path / "src", 0)
    w.write(0, bodies[:1200], None, array("Q", range(1200)), None)
    assert w.file.written_back == 0 or w.file.written_back >= 8 << 20
    w.write(1200, bodies[1200:], None, array("Q", range(1200, 2500)), None)
    assert w.file.written_back >= 8 << 20
    info = w.finish()
    data = (tmp_path / "src" / info["file"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == info["sha256"] and info["count"] == 2500
    assert data.count(b"\n") == 2500 and data.startswith(b'{"gid":0,"id":0,"content":"00000000x')
    r, wfd = os.pipe()
    try:
        start_writeback(wfd, 0, 10)
    finally:
        os.close(r)
        os.close(wfd)
