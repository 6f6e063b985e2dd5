"""Fault classes of the data stage (`z2all data convert`, `z2all data tokenize`), each driven through the
real CLI in a subprocess: a user's files are never deleted or changed, a resume never mixes two versions of
an input, and an empty, mostly skipped, damaged or foreign input is one clear error line, not exit 0."""

from __future__ import annotations

import bz2
import gzip
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import zstandard
from rel_helpers import assert_clean_failure, snapshot, z2all

REPO = Path(__file__).resolve().parents[2]
WORDS = ("river stone light garden window letter market winter music paper forest engine bridge "
         "silver morning harbor lantern orchard canvas meadow").split()


def docs(n: int, seed: int = 0, tag: str = "") -> list[dict]:
    """n distinct wikipedia_zh-style rows of ~200 characters of plain words."""
    rng = random.Random(seed)
    return [{"id": str(i), "title": f"{tag}title {i}",
             "text": f"{tag}document {i}: " + " ".join(rng.choice(WORDS) for _ in range(30))} for i in range(n)]


def jsonl(rows: list[dict]) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in rows)


def records(out: Path, source: str) -> list[dict]:
    return [orjson.loads(x) for p in sorted((out / source).glob("part-*.jsonl")) for x in p.read_bytes().splitlines()]


def convert(*args, cwd=None):
    return z2all("data", "convert", *map(str, args), cwd=cwd)


def make_tokenizer(d: Path, texts: list[str]) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    d.mkdir(parents=True)
    tok.save(str(d / "tokenizer.json"))
    return d


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A finished conversion (two sources, several shards) and a tokenizer; tests copy what they damage."""
    d = tmp_path_factory.mktemp("conv")
    (d / "zh.jsonl").write_bytes(jsonl(docs(300)))
    (d / "en.jsonl").write_bytes(jsonl(docs(100, seed=1, tag="en ")))
    res = convert("--inputs", f"wikipedia_zh={d / 'zh.jsonl'},wikipedia_en={d / 'en.jsonl'}", "--out", d / "conv",
                  "--shard-mb", "0.02", "--batch-mb", "0.005")
    assert res.rc == 0, res.text
    tok = make_tokenizer(d / "tok", [r["text"] for r in docs(300)])
    return d / "conv", tok


def copy_tree(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------- nothing a user owns is deleted

def test_overwrite_removes_only_what_convert_wrote(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_bytes(jsonl(docs(50)))
    b.write_bytes(jsonl(docs(20, seed=2, tag="b ")))
    out = tmp_path / "out"
    assert convert("--inputs", f"wikipedia_zh={a},wikipedia_en={b}", "--out", out, "--txt").rc == 0
    (out / "wikipedia_zh" / "notes.md").write_text("my notes, not convert's")
    (out / "wikipedia_en" / "keep").mkdir()
    (out / "wikipedia_en" / "keep" / "part-00007.jsonl").write_text("mine too")
    (out / "README").write_text("mine")
    user = {k: v for k, v in snapshot(out).items() if k.endswith(("notes.md", "keep/part-00007.jsonl", "README"))}
    res = convert("--inputs", f"wikipedia_zh={b}", "--out", out, "--overwrite")
    assert res.rc == 0, res.text
    after = snapshot(out)
    assert {k: after.get(k) for k in user} == user  # byte-identical, still there
    assert not list((out / "wikipedia_en").glob("part-*")) and not (out / "wikipedia_en" / "manifest.json").exists()
    assert len(records(out, "wikipedia_zh")) == 20


@pytest.mark.parametrize("case", ["convert_into_foreign_dir", "tokenize_into_foreign_dir",
                                  "tokenize_into_convert_output", "convert_input_inside_out"])
def test_claim_refuses_what_is_not_ours(converted, tmp_path, case):
    conv, tok = converted
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    raw = tmp_path / "raw.jsonl"
    raw.write_bytes(jsonl(docs(20)))
    if case == "convert_into_foreign_dir":
        args, target, words = ("data", "convert", "--inputs", f"wikipedia_zh={raw}", "--out", foreign), foreign, \
            ["not empty", "thesis.tex"]
    elif case == "tokenize_into_foreign_dir":
        args, target, words = ("data", "tokenize", "--shards", conv, "--tokenizer", tok, "--out", foreign), \
            foreign, ["not empty"]
    elif case == "tokenize_into_convert_output":
        conv = copy_tree(conv, tmp_path / "conv")
        args, target, words = ("data", "tokenize", "--shards", conv / "wikipedia_zh", "--tokenizer", tok, "--out",
                               conv), conv, ["contains the input"]
    else:
        (foreign / "raw.jsonl").write_bytes(raw.read_bytes())
        (foreign / "thesis.tex").unlink()
        args, target, words = ("data", "convert", "--inputs", f"wikipedia_zh={foreign / 'raw.jsonl'}", "--out",
                               foreign), foreign, ["contains the input"]
    before = snapshot(target)
    assert_clean_failure(z2all(*args), *words)
    assert snapshot(target) == before


# ---------------------------------------------------------------- a resume never mixes inputs

KILL_AT_SECOND_SHARD = """
import os, signal, sys
import z2all.data.shards as shards
orig, n = shards.ShardWriter.finish, [0]
def finish(self):
    info = orig(self)
    n[0] += 1
    if n[0] == 2:  # the first shard committed, the second renamed into place: then the process dies
        os.kill(os.getpid(), signal.SIGKILL)
    return info
shards.ShardWriter.finish = finish
from z2all.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("when", ["after_kill", "after_finish"])
def test_replaced_input_is_refused_then_overwrite_recovers(tmp_path, when):
    src = tmp_path / "zh.jsonl"
    src.write_bytes(jsonl(docs(300)))
    out = tmp_path / "out"
    args = ["data", "convert", "--inputs", f"wikipedia_zh={src}", "--out", str(out), "--shard-mb", "0.01",
            "--batch-mb", "0.005"]
    if when == "after_kill":
        env = {**os.environ, "PYTHONPATH": str(REPO), "Z2ALL_NO_PROGRESS": "1"}
        p = subprocess.run([sys.executable, "-c", KILL_AT_SECOND_SHARD, *args], env=env, capture_output=True)
        assert p.returncode == -9, p.stderr.decode()[-2000:]
    else:
        assert z2all(*args).rc == 0
    src.write_bytes(jsonl(docs(120, seed=5, tag="new ")))  # the user replaces the file in place
    before = snapshot(out)
    assert_clean_failure(z2all(*args), str(src), "changed", "--overwrite")
    assert snapshot(out) == before
    res = z2all(*args, "--overwrite")  # the documented recovery: a clean conversion of the new file
    assert res.rc == 0, res.text
    recs = records(out, "wikipedia_zh")
    assert len(recs) == 120 and all(r["content"].startswith("new ") for r in recs)
    assert [r["gid"] for r in recs] == list(range(120))


# ---------------------------------------------------------------- damaged artifacts: one line naming the file

@pytest.mark.parametrize("damage", ["truncated_shard", "edited_line", "missing_shard", "manifest_not_json",
                                    "tokenizer_not_json", "unfinished_conversion"])
def test_damaged_convert_output_is_refused_by_tokenize(converted, tmp_path, damage):
    conv, tok = converted
    conv = copy_tree(conv, tmp_path / "conv")
    tok = copy_tree(tok, tmp_path / "tok")
    shard = conv / "wikipedia_zh" / "part-00001.jsonl"
    name = shard.name
    if damage == "truncated_shard":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif damage == "edited_line":
        lines = shard.read_bytes().splitlines(keepends=True)
        lines[3] = b"this is not json\n"
        shard.write_bytes(b"".join(lines))
    elif damage == "missing_shard":
        shard.unlink()
    elif damage == "unfinished_conversion":  # what a killed or failed convert leaves
        man = json.loads((conv / "wikipedia_en" / "manifest.json").read_text())
        (conv / "wikipedia_en" / "manifest.json").write_text(json.dumps({**man, "complete": False}))
        name = "unfinished"
    elif damage == "tokenizer_not_json":
        (tok / "tokenizer.json").write_text("{ not json")
        name = "tokenizer.json"
    else:
        (conv / "wikipedia_zh" / "manifest.json").write_text('{"source": "wikipedia_zh", "shards": [')
        name = "manifest.json"
    before = snapshot(conv)
    out = tmp_path / "tokens"
    assert_clean_failure(z2all("data", "tokenize", "--shards", conv, "--tokenizer", tok, "--out", out), name)
    assert snapshot(conv) == before
    assert not out.exists() or not [p for p in out.iterdir() if p.name.endswith((".bin", "meta.json"))]


@pytest.mark.parametrize("damage", ["state_not_json", "committed_shard_missing", "committed_shard_cut"])
def test_damaged_convert_output_is_refused_by_a_rerun(converted, tmp_path, damage):
    conv, _ = converted
    conv = copy_tree(conv, tmp_path / "conv")
    spec = json.loads((conv / "convert.json").read_text())["inputs"]
    shard = conv / "wikipedia_zh" / "part-00001.jsonl"
    if damage == "state_not_json":
        (conv / ".convert_state.json").write_text("{ half a state")
        name = ".convert_state.json"
    elif damage == "committed_shard_missing":
        shard.unlink()
        name = str(shard)
    else:
        shard.write_bytes(shard.read_bytes()[:100])
        name = str(shard)
    (conv / "wikipedia_zh" / "mine.txt").write_text("not convert's")
    before = snapshot(conv)
    args = ("--inputs", ",".join(f"{x['source']}={x['path']}" for x in spec), "--out", conv, "--shard-mb", "0.02",
            "--batch-mb", "0.005")
    assert_clean_failure(convert(*args), name, "--overwrite")
    assert snapshot(conv) == before
    res = convert(*args, "--overwrite")  # the recovery the message names
    assert res.rc == 0, res.text
    assert len(records(conv, "wikipedia_zh")) == 300 and len(records(conv, "wikipedia_en")) == 100
    assert (conv / "wikipedia_zh" / "mine.txt").read_text() == "not convert's"


def test_edited_shard_line_of_an_unchecked_shard_names_the_line(converted, tmp_path):
    """An old manifest without sha256 (older z2all): the line count and the bad line still catch damage."""
    conv, tok = converted
    conv = copy_tree(conv, tmp_path / "conv")
    man_path = conv / "wikipedia_zh" / "manifest.json"
    man = json.loads(man_path.read_text())
    for sh in man["shards"]:
        sh.pop("sha256")
    man_path.write_text(json.dumps(man))
    shard = conv / "wikipedia_zh" / "part-00001.jsonl"
    lines = shard.read_bytes().splitlines(keepends=True)
    lines[3] = b"[1, 2]\n"
    shard.write_bytes(b"".join(lines))
    res = z2all("data", "tokenize", "--shards", conv, "--tokenizer", tok, "--out", tmp_path / "t", "--workers", "1")
    assert_clean_failure(res, f"{shard}:4")


def test_tokenize_refuses_what_is_not_a_convert_output(converted, tmp_path):
    _, tok = converted
    raw = tmp_path / "raw.jsonl"
    raw.write_bytes(jsonl(docs(40)))
    d = tmp_path / "rawdir"
    d.mkdir()
    (d / "part-00000.jsonl").write_bytes(raw.read_bytes())
    for shards in (raw, d):
        out = tmp_path / f"tok-{shards.name}"
        res = z2all("data", "tokenize", "--shards", shards, "--tokenizer", tok, "--out", out)
        assert_clean_failure(res, str(shards), "not the output of `z2all data convert`")
        assert not out.exists()


# ---------------------------------------------------------------- input formats that used to lose data

def test_utf8_bom_is_accepted(tmp_path):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "a.jsonl").write_bytes(bom + jsonl(docs(10)))
    (tmp_path / "b.json").write_bytes(bom + json.dumps(docs(7, seed=3, tag="arr ")).encode())
    res = convert("--inputs", f"wikipedia_zh={tmp_path / 'a.jsonl'},wikipedia_zh={tmp_path / 'b.json'}",
                  "--out", tmp_path / "out")
    assert res.rc == 0, res.text
    man = json.loads((tmp_path / "out" / "wikipedia_zh" / "manifest.json").read_text())
    assert man["documents"] == 17 and man["skipped"] == {}


def test_compression_is_detected_by_content_not_name(tmp_path):
    rows = docs(30)
    comp = {"gz.jsonl": gzip.compress, "zst.jsonl": zstandard.ZstdCompressor().compress, "bz2.json": bz2.compress}
    for i, (name, f) in enumerate(comp.items()):
        (tmp_path / name).write_bytes(f(jsonl(rows[i * 10:(i + 1) * 10])))
    res = convert("--inputs", ",".join(f"wikipedia_zh={tmp_path / n}" for n in comp), "--out", tmp_path / "out")
    assert res.rc == 0, res.text
    assert [r["content"] for r in records(tmp_path / "out", "wikipedia_zh")] == [r["text"] for r in rows]


# ---------------------------------------------------------------- no silent empty or wrong output

def _parquet_without_text(path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"id": str(i), "body": r["text"]} for i, r in enumerate(docs(20))]), path)
    return path


@pytest.mark.parametrize("case", ["wrong_text_field", "parquet_without_text_column", "empty_file",
                                  "mostly_malformed"])
def test_empty_or_mostly_skipped_output_fails_with_the_reason(tmp_path, case):
    good = jsonl(docs(20))
    extra = []
    if case == "wrong_text_field":
        path = tmp_path / "a.jsonl"
        path.write_bytes(good)
        spec, extra = f"mycorpus={path}", ["--text-field", "body"]
        words = ["missing field 'body'", "it has: id, title, text", "--text-field"]
    elif case == "parquet_without_text_column":
        spec, words = f"wikipedia_en={_parquet_without_text(tmp_path / 'a.parquet')}", ["missing field 'text'"]
    elif case == "empty_file":
        (tmp_path / "a.jsonl").write_bytes(b"")
        spec, words = f"wikipedia_zh={tmp_path / 'a.jsonl'}", ["no records"]
    else:
        path = tmp_path / "a.jsonl"
        path.write_bytes(good[:2000] + b"\n".join(b"<html>%d</html>" % i for i in range(40)) + b"\n")
        spec, words = f"wikipedia_zh={path}", ["malformed JSON", "--max-skipped-fraction"]
    user = snapshot(tmp_path)
    res = convert("--inputs", spec, "--out", tmp_path / "out", *extra)
    assert_clean_failure(res, *words)
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("out/")} == user
    if case == "mostly_malformed":  # a deliberate threshold accepts it
        res = convert("--inputs", spec, "--out", tmp_path / "out", "--max-skipped-fraction", "0.9")
        assert res.rc == 0, res.text


def test_empty_input_path_is_an_error(tmp_path):
    (tmp_path / "stray.jsonl").write_bytes(jsonl(docs(5)))
    before = snapshot(tmp_path)
    assert_clean_failure(convert("--inputs", "wikipedia_zh=", "--out", "out", cwd=tmp_path), "empty path")
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- SIGKILL anywhere, then resume

KILL_AT = """
import os, signal, sys
stage, k = sys.argv[1], int(sys.argv[2])
n = [0]
def tick():
    n[0] += 1
    if n[0] == k:
        os.kill(os.getpid(), signal.SIGKILL)
if stage == "convert":  # inside a shard, or right after one is renamed and before its commit
    import z2all.data.shards as shards
    write, finish = shards.ShardWriter.write, shards.ShardWriter.finish
    def w(self, *a):
        write(self, *a)
        tick()
    def f(self):
        info = finish(self)
        tick()
        return info
    shards.ShardWriter.write, shards.ShardWriter.finish = w, f
else:  # after a block reached the open token files, before or after its commit
    import z2all.data.tokenize as tokenize
    commit = tokenize.atomic_write_text
    def c(path, text):
        tick()
        commit(path, text)
        tick()
    tokenize.atomic_write_text = c
from z2all.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("stage", ["convert", "tokenize"])
def test_sigkill_at_random_points_then_resume_matches_an_uninterrupted_run(converted, tmp_path, stage):
    conv, tok = converted
    src = tmp_path / "zh.jsonl"
    src.write_bytes(jsonl(docs(200, seed=9)))

    def args(out):
        if stage == "convert":
            return ["data", "convert", "--inputs", f"wikipedia_zh={src}", "--out", str(out), "--shard-mb", "0.01",
                    "--batch-mb", "0.003", "--txt"]
        return ["data", "tokenize", "--shards", str(conv), "--tokenizer", str(tok), "--out", str(out),
                "--workers", "1", "--batch-mb", "0.005", "--file-mb", "0.01", "--val-fraction", "0.2"]

    ref = tmp_path / "ref"
    assert z2all(*args(ref)).rc == 0
    env = {**os.environ, "PYTHONPATH": str(REPO), "Z2ALL_NO_PROGRESS": "1"}
    rng = random.Random(1234)
    out = tmp_path / "out"
    kills = 0
    for k in sorted(rng.sample(range(1, 25), 3)):  # kill, resume with another kill later, ...
        p = subprocess.run([sys.executable, "-c", KILL_AT, stage, str(k), *args(out)], env=env, capture_output=True)
        assert p.returncode in (0, -9), p.stderr.decode()[-2000:]
        kills += p.returncode == -9
    assert kills >= 2
    res = z2all(*args(out))
    assert res.rc == 0, res.text
    ours = {k: v for k, v in snapshot(out).items() if not k.startswith(".")}
    theirs = {k: v for k, v in snapshot(ref).items() if not k.startswith(".")}
    if stage == "tokenize":  # meta.json names the tokenizer directory (the same here) and nothing of the run
        assert ours == theirs
    else:  # stats.md, convert.json and the manifests name --out; the shards and txt files must be identical
        assert {k: v for k, v in ours.items() if "part-" in k} == {k: v for k, v in theirs.items() if "part-" in k}
        man = json.loads((out / "wikipedia_zh" / "manifest.json").read_text())
        assert man["complete"] and man["documents"] == 200


def test_a_conversion_made_with_other_batches_resumes_only_with_them(tmp_path):
    """--batch-mb decides where shards roll, so a run begun with another value (4 MB, the default before 2)
    is refused in one line naming the option and both values; its files are untouched; with that value
    given it is complete and nothing is rewritten."""
    raw = tmp_path / "raw.jsonl"
    raw.write_bytes(jsonl(docs(30)))
    out = tmp_path / "conv"
    first = z2all("data", "convert", "--inputs", f"wikipedia_zh={raw}", "--out", out, "--batch-mb", "4")
    assert first.rc == 0, first.err
    before = snapshot(out)
    assert_clean_failure(z2all("data", "convert", "--inputs", f"wikipedia_zh={raw}", "--out", out),
                         "--batch_mb 4.0 -> 2.0", "give that run's values")
    assert snapshot(out) == before
    again = z2all("data", "convert", "--inputs", f"wikipedia_zh={raw}", "--out", out, "--batch-mb", "4")
    assert again.rc == 0 and "nothing to do" in again.text
    assert snapshot(out) == before
