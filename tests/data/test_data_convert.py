"""`z2all data convert` end to end on real text: several sources into one output, gid uniqueness and
determinism across workers, manifests that match the files, every bad-input case, truncated archives,
SIGKILL-and-resume, reruns."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from data_helpers import (
    COMPRESSORS,
    corpora_dir,
    jsonl_bytes,
    raw_rows,
    read_records,
    real_docs,
    write_bytes,
    write_json_array,
    write_jsonl,
    write_parquet,
)

from z2all.cli import main as cli_main
from z2all.data import convert
from z2all.data.schema import record_text
from z2all.utils import UserError


@pytest.fixture(scope="session")
def shared_corpora():
    """../shared/corpora, or None: the data helpers then read the embedded demo corpus (no skip)."""
    return corpora_dir()


@pytest.fixture(scope="module")
def docs(shared_corpora):
    return {"zh": real_docs(shared_corpora, "zh_fortunes", 300), "en": real_docs(shared_corpora, "en_kjv_bible", 60),
            "code": real_docs(shared_corpora, "code_cpython_stdlib", 30),
            "man": real_docs(shared_corpora, "zh_manpages", 30)}


@pytest.fixture(scope="module")
def inputs(docs, tmp_path_factory):
    d = tmp_path_factory.mktemp("raw")
    wudao = d / "wudao"
    wudao.mkdir()
    write_json_array(wudao / "a.json", raw_rows("wudao", docs["man"][:15]))
    write_json_array(wudao / "b.json.zst", raw_rows("wudao", docs["man"][15:]))
    return {
        "wikipedia_zh": write_jsonl(d / "zh_wiki.jsonl.gz", raw_rows("wikipedia_zh", docs["zh"])),
        "wikipedia_en": write_parquet(d / "en_wiki.parquet", raw_rows("wikipedia_en", docs["en"])),
        "github_python": write_jsonl(d / "code.jsonl.gz", raw_rows("github_python", docs["code"])),
        "baike2018qa": write_jsonl(d / "baike_qa.json.bz2", raw_rows("baike2018qa", docs["zh"][:50])),
        "wudao": wudao,
    }


def cfg_for(inputs: dict, out: Path, **kw) -> convert.Config:
    cfg = convert.Config(inputs=[f"{k}={v}" for k, v in inputs.items()], out=str(out), **kw)
    cfg.clean.min_chars = 1
    return cfg


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("part-*")) if ".dedup" not in str(p)}


def test_multi_source_one_output(inputs, docs, tmp_path):
    out = tmp_path / "out"
    assert convert.run(cfg_for(inputs, out, txt=True, shard_mb=0.05, batch_mb=0.02)) == 0
    gids, total = [], 0
    for src in inputs:
        man = json.loads((out / src / "manifest.json").read_text())
        recs = read_records(out, src)
        assert man["documents"] == len(recs) and man["complete"]
        assert all(r["data_src"] == src for r in recs)
        for sh in man["shards"]:  # manifest entries match the files
            data = (out / src / sh["file"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == sh["sha256"] and len(data) == sh["bytes"]
            lines = [orjson.loads(x) for x in data.splitlines()]
            assert [r["id"] for r in lines] == list(range(sh["count"]))
            assert (lines[0]["gid"], lines[-1]["gid"]) == (sh["gid_first"], sh["gid_last"])
            txt = (out / src / sh["txt"]).read_bytes().decode()
            assert txt == "\n\n".join(record_text(r) for r in lines)
        gids += [r["gid"] for r in recs]
        total += len(recs)
    assert sorted(gids) == list(range(total))  # unique, contiguous over the whole output
    assert len(list((out / "wikipedia_zh").glob("part-*.jsonl"))) > 1  # rolled
    code = read_records(out, "github_python")
    expected = list(dict.fromkeys(d["text"] for d in docs["code"]))  # two stdlib files are identical: dedup
    assert [r["content"] for r in code] == expected  # byte for byte
    baike = read_records(out, "baike2018qa")
    assert baike == []  # every baike doc repeats a wikipedia_zh text: exact dedup across sources
    man = json.loads((out / "baike2018qa" / "manifest.json").read_text())
    assert man["skipped"] == {"duplicate": 50}
    wudao = json.loads((out / "wudao" / "manifest.json").read_text())
    assert wudao["documents"] + sum(wudao["skipped"].values()) == 30, wudao["skipped"]
    assert "wikipedia_zh" in (out / "stats.md").read_text()


def test_workers_and_reruns_give_identical_output(inputs, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    convert.run(cfg_for(inputs, a, shard_mb=0.03, batch_mb=0.05))
    convert.run(cfg_for(inputs, b, shard_mb=0.03, batch_mb=0.05, workers=2))
    assert shard_bytes(a) == shard_bytes(b) and len(shard_bytes(a)) > 4
    before = {p: p.stat().st_mtime_ns for p in a.rglob("part-*")}
    convert.run(cfg_for(inputs, a, shard_mb=0.03, batch_mb=0.05))  # complete: nothing is rewritten
    assert before == {p: p.stat().st_mtime_ns for p in a.rglob("part-*")}
    with pytest.raises(UserError, match="other inputs"):
        convert.run(cfg_for({"wikipedia_zh": inputs["wikipedia_zh"]}, a))
    with pytest.raises(UserError, match=r"other settings \(that run / this one: --txt False -> True; give that"):
        convert.run(cfg_for(inputs, a, shard_mb=0.03, batch_mb=0.05, txt=True))
    again = cfg_for(inputs, a, shard_mb=0.03, batch_mb=0.05)
    again.clean.impl = "python"  # the same bytes either way: not a different setting
    convert.run(again)
    assert before == {p: p.stat().st_mtime_ns for p in a.rglob("part-*")}
    convert.run(cfg_for({"wikipedia_zh": inputs["wikipedia_zh"]}, a, overwrite=True))
    assert not (a / "wudao").exists() and (a / "wikipedia_zh" / "part-00000.jsonl").exists()


def test_zstd_shards(inputs, tmp_path):
    out = tmp_path / "z"
    convert.run(cfg_for({"wikipedia_zh": inputs["wikipedia_zh"]}, out, compress="zstd"))
    shard = out / "wikipedia_zh" / "part-00000.jsonl.zst"
    man = json.loads((out / "wikipedia_zh" / "manifest.json").read_text())
    assert hashlib.sha256(shard.read_bytes()).hexdigest() == man["shards"][0]["sha256"]
    assert len(read_records(out, "wikipedia_zh")) == man["documents"] > 200


def test_bad_input_is_skipped_and_counted(docs, tmp_path):
    rows = raw_rows("wikipedia_zh", docs["zh"][:20])
    lines = [orjson.dumps(r) for r in rows]
    lines[3] = b'{"id": "3", "title": "broken", "text": "no end'  # malformed JSON
    lines[5] = lines[5].replace("礼".encode(), b"\xff", 1) if "礼".encode() in lines[5] else lines[5][:-2] + b'\xff"}'
    lines[7] = orjson.dumps({"id": "7", "title": "no text field"})
    lines[9] = b"   "
    lines[11] = orjson.dumps(rows[0])  # exact duplicate of line 1
    lines[13] = orjson.dumps({**rows[13], "text": "▅█▂▅█▂▅█▂▅█▂ 字"})
    lines[15] = b"[1, 2]"
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    convert.run(convert.Config(inputs=[str(path)], source="wikipedia_zh", out=str(out)))
    man = json.loads((out / "wikipedia_zh" / "manifest.json").read_text())
    sk = man["skipped"]
    assert sk["malformed JSON"] == 1 and sk["missing field 'text'"] == 1 and sk["blank line"] == 1
    assert sk["duplicate"] == 1 and sk["not a JSON object"] == 1 and sum(v for k, v in sk.items()
                                                                         if k.startswith("junk")) == 1
    assert man["repaired"] == {"invalid UTF-8 replaced": 1}
    assert man["examples"]["malformed JSON"][0].startswith(f"{path}:4 ")
    assert man["examples"]["missing field 'text'"] == [f"{path}:8 (it has: id, title)"]
    assert man["examples"]["invalid UTF-8 replaced"] == [f"{path}:6"]
    recs = read_records(out, "wikipedia_zh")
    assert len(recs) == 20 - 6 and "\ufffd" in recs[4]["content"]


def test_byte_ranges_and_lines_give_identical_output(docs, tmp_path):
    """A plain jsonl (read as byte ranges by the workers) and the same file gzipped (read as lines by the
    parent) convert to the same shards and manifests, with 1 or 2 workers, bad lines included."""
    rows = raw_rows("wikipedia_zh", docs["zh"][:120])
    lines = [orjson.dumps(r) for r in rows]
    lines[3] = b'{"id": "3", "title": "broken", "text": "no end'
    lines[5] = lines[5][:-2] + b'\xff"}'
    lines[9] = b"   "
    lines[100] = b'{"id": "100", "title": "broken too"'  # many batches on: numbered from the workers' counts
    data = b"\xef\xbb\xbf" + b"\n".join(lines)  # a BOM, and no newline after the last line
    plain, packed = tmp_path / "in.jsonl", tmp_path / "in.jsonl.gz"
    plain.write_bytes(data)
    write_bytes(packed, data)
    outs = {}
    for path, workers in ((plain, 1), (plain, 2), (packed, 1)):
        out = tmp_path / f"out-{path.name}-{workers}"
        cfg = cfg_for({"wikipedia_zh": path}, out, shard_mb=0.02, batch_mb=0.005, workers=workers)
        convert.run(cfg)
        man = json.loads((out / "wikipedia_zh" / "manifest.json").read_text())
        for k in ("inputs",):
            man.pop(k)
        outs[(path.suffix, workers)] = (shard_bytes(out), json.dumps(man).replace(str(path), "IN"))
    first = outs[(".jsonl", 1)]
    assert len(first[0]) > 4 and '"malformed JSON": 2' in first[1] and "IN:6" in first[1] and "IN:101 " in first[1]
    for key, o in outs.items():
        assert o[0] == first[0], key
        assert o[1] == first[1], key


def test_worker_module_imports_no_numpy():
    """A spawned convert worker imports convert_worker and what it imports: no numpy (its import and the
    OpenBLAS thread it starts cost every worker), no torch."""
    code = "import sys, z2all.data.convert_worker; print(sorted({'numpy', 'torch'} & set(sys.modules)))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert p.stdout.strip() == "[]"


def test_bad_json_array_and_utf8_in_arrays(docs, tmp_path):
    rows = raw_rows("wudao", docs["man"][:6])
    rows[5]["title"] = "坏标题"
    raw = orjson.dumps(rows).replace("坏".encode(), b"\xff\xfe")  # two invalid bytes
    good = tmp_path / "a.json"
    good.write_bytes(raw)
    broken = tmp_path / "b.json"
    broken.write_bytes(orjson.dumps(rows[:3])[:-1] + b', {"content": oops}]')
    out = tmp_path / "out"
    convert.run(convert.Config(inputs=[f"wudao={good}", f"wudao={broken}"], out=str(out)))
    man = json.loads((out / "wudao" / "manifest.json").read_text())
    assert man["repaired"] == {"invalid UTF-8 replaced": 2}
    assert man["skipped"] == {"malformed JSON array (rest of file dropped)": 1, "duplicate": 3}
    assert man["examples"]["malformed JSON array (rest of file dropped)"][0].startswith(f"{broken}:item 4")
    assert man["documents"] == 6 and man["inputs"][1]["status"] == "done"
    assert read_records(out, "wudao")[5]["title"] == "\ufffd\ufffd标题"


def test_truncated_archive_keeps_written_shards_and_resumes(docs, tmp_path):
    rows = raw_rows("wikipedia_zh", docs["zh"])
    good = write_jsonl(tmp_path / "a.jsonl.gz", rows[:150])
    data = COMPRESSORS[".gz"](jsonl_bytes(rows[150:]))
    cut = tmp_path / "b.jsonl.gz"
    cut.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    cfg = convert.Config(inputs=[f"wikipedia_zh={good}", f"wikipedia_zh={cut}"], out=str(out), shard_mb=0.02,
                         batch_mb=0.01)
    with pytest.raises(UserError, match="(?s)b.jsonl.gz: truncated.*complete shard"):
        convert.run(cfg)
    man = json.loads((out / "wikipedia_zh" / "manifest.json").read_text())
    assert man["shards"] and not man["complete"]
    for sh in man["shards"]:
        assert hashlib.sha256((out / "wikipedia_zh" / sh["file"]).read_bytes()).hexdigest() == sh["sha256"]
    assert man["inputs"][0]["status"] == "done" and man["inputs"][1]["status"].startswith("error")
    assert not list((out / "wikipedia_zh").glob(".*.tmp"))
    cut.write_bytes(data)  # the user re-downloads the file and reruns the same command
    convert.run(cfg)
    ref = tmp_path / "ref"
    convert.run(convert.Config(inputs=[f"wikipedia_zh={good}", f"wikipedia_zh={cut}"], out=str(ref), shard_mb=0.02,
                               batch_mb=0.01))
    assert shard_bytes(out) == shard_bytes(ref)


KILLER = """
import os, signal, sys
import z2all.data.shards as shards
from z2all.data import convert
n_finish, where = int(sys.argv[1]), sys.argv[2]
orig_finish, orig_write = shards.ShardWriter.finish, shards.ShardWriter.write
calls = {"finish": 0}
def finish(self):
    calls["finish"] += 1
    info = orig_finish(self)
    if where == "after_finish" and calls["finish"] == n_finish:
        os.kill(os.getpid(), signal.SIGKILL)  # shard renamed, state not yet committed
    return info
def write(self, *a, **k):
    orig_write(self, *a, **k)
    if where == "mid_shard" and calls["finish"] == n_finish and self.count >= 5:
        os.kill(os.getpid(), signal.SIGKILL)  # half a shard in its temp file
shards.ShardWriter.finish, shards.ShardWriter.write = finish, write
convert.ShardWriter = shards.ShardWriter
sys.exit(convert.run(convert.Config(inputs=sys.argv[3].split(","), out=sys.argv[4], shard_mb=0.03, batch_mb=0.02,
                                    txt=True)))
"""


@pytest.mark.parametrize("where", ["after_finish", "mid_shard", "mid_shard_plain"])
def test_sigkill_and_resume(inputs, docs, tmp_path, where):
    ins = ",".join(f"{k}={inputs[k]}" for k in ("wikipedia_zh", "wudao", "github_python"))
    if where.endswith("_plain"):  # a plain jsonl: batches are byte ranges, resumed from a line inside one
        where = where[: -len("_plain")]
        plain = write_jsonl(tmp_path / "zh.jsonl", raw_rows("wikipedia_zh", docs["zh"]))
        ins = ",".join([f"wikipedia_zh={plain}", *ins.split(",")[1:]])
    out = tmp_path / "killed"
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "PYTHONPATH": str(Path(convert.__file__).resolve().parents[2])}
    p = subprocess.run([sys.executable, str(script), "3", where, ins, str(out)], env=env, capture_output=True)
    assert p.returncode == -9, p.stderr.decode()[-2000:]
    assert not (json.loads((out / ".convert_state.json").read_text())["done"])
    written = {k: v for k, v in shard_bytes(out).items()}
    assert written  # shards already written survive the kill
    p = subprocess.run([sys.executable, str(script), "0", "none", ins, str(out)], env=env, capture_output=True)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    ref = tmp_path / "ref"
    convert.run(convert.Config(inputs=ins.split(","), out=str(ref), shard_mb=0.03, batch_mb=0.02, txt=True))
    assert shard_bytes(out) == shard_bytes(ref)
    assert not list(out.rglob(".*.tmp"))
    for src in ("wikipedia_zh", "wudao", "github_python"):
        assert (json.loads((out / src / "manifest.json").read_text())["skipped"]
                == json.loads((ref / src / "manifest.json").read_text())["skipped"])


def test_near_dedup_drops_edited_copy(docs, tmp_path):
    base = [d for d in docs["en"] if len(d["text"]) > 2000][:5]
    rows = raw_rows("wikipedia_en", base)
    edited = dict(rows[2], id="x", text=rows[2]["text"].replace("the", "teh", 2))
    path = write_jsonl(tmp_path / "en.jsonl", rows + [edited])
    out = tmp_path / "out"
    cfg = convert.Config(inputs=[f"wikipedia_en={path}"], out=str(out))
    cfg.clean.near_dedup = True
    convert.run(cfg)
    man = json.loads((out / "wikipedia_en" / "manifest.json").read_text())
    assert man["documents"] == 5 and man["skipped"] == {"near duplicate": 1}


def test_cli_entry_and_user_errors(inputs, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = cli_main(["data", "convert", "--inputs", f"wikipedia_zh={inputs['wikipedia_zh']},"
                   f"github_python={inputs['github_python']}", "--out", str(out), "--txt", "--clean.min_chars=1"])
    assert rc == 0 and "| total" in capsys.readouterr().out
    assert (out / "github_python" / "part-00000.txt").exists()
    assert cli_main(["data", "convert", "--inputs", str(inputs["wikipedia_zh"]), "--out", str(tmp_path / "x")]) == 2
    assert "has no source" in capsys.readouterr().err
    assert cli_main(["data", "convert", "--inputs", f"nope={inputs['wikipedia_zh']}", "--out",
                     str(tmp_path / "y")]) == 2
    assert "unknown source 'nope'" in capsys.readouterr().err


def test_adding_a_source_continues_gids_and_dedup(docs, tmp_path):
    zh = write_jsonl(tmp_path / "zh.jsonl", raw_rows("wikipedia_zh", docs["zh"][:80]))
    en_rows = raw_rows("wikipedia_en", docs["en"][:30]) + [dict(raw_rows("wikipedia_en", docs["zh"][5:6])[0], id="dup")]
    en = write_jsonl(tmp_path / "en.jsonl", en_rows)
    kw = dict(shard_mb=0.02, batch_mb=0.01, txt=True)
    out, ref = tmp_path / "out", tmp_path / "ref"
    convert.run(cfg_for({"wikipedia_zh": zh}, out, **kw))
    convert.run(cfg_for({"wikipedia_en": en}, out, **kw))  # a new source into the same output
    convert.run(cfg_for({"wikipedia_zh": zh, "wikipedia_en": en}, ref, **kw))  # both in one run
    assert shard_bytes(out) == shard_bytes(ref) and len(shard_bytes(out)) > 4
    man = json.loads((out / "wikipedia_en" / "manifest.json").read_text())
    assert man["skipped"] == {"duplicate": 1} and man["complete"]  # deduplicated against wikipedia_zh
    before = {p: p.stat().st_mtime_ns for p in out.rglob("part-*")}
    convert.run(cfg_for({"wikipedia_en": en}, out, **kw))  # the same addition again: nothing to do
    convert.run(cfg_for({"wikipedia_zh": zh, "wikipedia_en": en}, out, **kw))  # or the whole list
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("part-*")}
    code = write_jsonl(tmp_path / "py.jsonl", raw_rows("github_python", docs["code"][:5]))
    with pytest.raises(UserError, match="other settings|other inputs"):  # other cleaning: not addable
        convert.run(cfg_for({"github_python": code}, out, **{**kw, "shard_mb": 0.5}))
    with pytest.raises(UserError, match="other inputs"):  # an existing source with other files
        convert.run(cfg_for({"wikipedia_zh": code}, out, **kw))


def test_user_files_named_like_shards_survive_adding_a_source_and_overwrite(docs, tmp_path):
    """Cleanup goes by the state's record of what convert wrote, never by a file's name: a user's
    part-00009.jsonl / part-00003.txt in a source directory outlive an added source and --overwrite."""
    zh = write_jsonl(tmp_path / "zh.jsonl", raw_rows("wikipedia_zh", docs["zh"][:20]))
    code = write_jsonl(tmp_path / "py.jsonl", raw_rows("github_python", docs["code"][:5]))
    out = tmp_path / "out"
    convert.run(cfg_for({"wikipedia_zh": zh}, out, txt=True))
    mine = {out / "wikipedia_zh" / "part-00009.jsonl": b'{"mine": 1}\n', out / "wikipedia_zh" / "part-00003.txt": b"x"}
    for p, data in mine.items():
        p.write_bytes(data)
    assert convert.run(cfg_for({"wikipedia_zh": zh, "github_python": code}, out, txt=True)) == 0  # adds a source
    assert (out / "github_python" / "part-00000.jsonl").is_file()
    assert all(p.read_bytes() == data for p, data in mine.items())
    other = write_jsonl(tmp_path / "zh2.jsonl", raw_rows("wikipedia_zh", docs["zh"][20:40]))
    assert convert.run(cfg_for({"wikipedia_zh": other}, out, txt=True, overwrite=True)) == 0  # other inputs
    assert all(p.read_bytes() == data for p, data in mine.items())
    assert not (out / "github_python").exists()  # what the replaced conversion wrote is gone


def test_a_user_file_where_the_next_shard_goes_is_refused_then_the_run_continues(docs, tmp_path):
    zh = write_jsonl(tmp_path / "zh.jsonl", raw_rows("wikipedia_zh", docs["zh"][:20]))
    code = write_jsonl(tmp_path / "py.jsonl", raw_rows("github_python", docs["code"][:5]))
    out, ref = tmp_path / "out", tmp_path / "ref"
    convert.run(cfg_for({"wikipedia_zh": zh}, out))
    (out / "github_python").mkdir()
    theirs = out / "github_python" / "part-00000.jsonl"
    theirs.write_bytes(b"not ours\n")
    with pytest.raises(UserError, match=r"github_python/part-00000\.jsonl is in the way.*move it out") as e:
        convert.run(cfg_for({"github_python": code}, out))
    assert "\n" not in str(e.value) and theirs.read_bytes() == b"not ours\n"
    theirs.rename(tmp_path / "moved.jsonl")
    assert convert.run(cfg_for({"github_python": code}, out)) == 0  # the same command continues
    convert.run(cfg_for({"wikipedia_zh": zh, "github_python": code}, ref))
    assert shard_bytes(out) == shard_bytes(ref)
