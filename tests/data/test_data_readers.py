"""Readers: every format and compression on real text, constant-memory batching, resume offsets, and each
broken-file case (truncated archives, malformed arrays, invalid UTF-8, unknown formats)."""

from __future__ import annotations

import orjson
import pytest
from data_helpers import (
    COMPRESSORS,
    corpora_dir,
    jsonl_bytes,
    raw_rows,
    real_docs,
    write_bytes,
    write_json_array,
    write_jsonl,
    write_parquet,
)

from z2all.data.readers import (
    FOLLOWS,
    BadLine,
    InputReader,
    LineRange,
    MalformedJSON,
    ReadError,
    detect_format,
    expand_inputs,
    parse_json_line,
    read_lines,
    sniff_compression,
    utf8_errors,
)
from z2all.utils import UserError


@pytest.fixture(scope="session")
def shared_corpora():
    """../shared/corpora, or None: the data helpers then read the embedded demo corpus (no skip)."""
    return corpora_dir()


@pytest.fixture(scope="module")
def rows(shared_corpora):
    return raw_rows("wikipedia_zh", real_docs(shared_corpora, "zh_fortunes", 60)
                    + real_docs(shared_corpora, "en_kjv_bible", 20))


def read_all(path, fmt=None, **kw):
    r = InputReader(path, fmt, **kw)
    items = []
    for first, batch in r.batches(batch_bytes=kw.pop("batch_bytes", 4096), batch_items=7):
        assert first == len(items)
        items += batch
    assert r.position() == r.size
    return r, [orjson.loads(i) if isinstance(i, bytes) else i for i in items]


@pytest.mark.parametrize("comp", list(COMPRESSORS))
@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_json_formats_and_compressions_roundtrip(tmp_path, rows, fmt, comp):
    path = tmp_path / f"x.{fmt}{comp}"
    (write_jsonl if fmt == "jsonl" else write_json_array)(path, rows)
    assert detect_format(path) == fmt
    r, items = read_all(path)
    assert items == rows
    assert r.kind == ("lines" if fmt == "jsonl" else "records")


def test_jsonl_named_json_and_single_object(tmp_path, rows):
    # baike2018qa ships jsonl in files named .json: sniffed from the first line
    r, items = read_all(write_jsonl(tmp_path / "baike_qa.json", rows))
    assert items == rows and r.kind == "lines"
    pretty = tmp_path / "one.json"
    pretty.write_text(orjson.dumps(rows[0], option=orjson.OPT_INDENT_2).decode())
    assert read_all(pretty)[1] == [rows[0]]


def test_parquet_with_projection(tmp_path, rows):
    path = write_parquet(tmp_path / "x.parquet", rows)
    assert read_all(path)[1] == rows
    _, items = read_all(path, columns=["title", "text"])
    assert items == [{"title": r["title"], "text": r["text"]} for r in rows]
    with pytest.raises(UserError, match="nope"):
        read_all(path, columns=["nope"])
    (tmp_path / "x.parquet.gz").write_bytes(b"")
    with pytest.raises(UserError, match="parquet compresses internally"):
        InputReader(tmp_path / "x.parquet.gz", "parquet")


@pytest.mark.parametrize("mode", ["paragraph", "line", "file"])
def test_txt_modes(tmp_path, rows, mode):
    text = "\n\n".join(r["text"].replace("\n\n", "\n") for r in rows[:10])
    path = write_bytes(tmp_path / "x.txt.gz", text.encode())
    _, items = read_all(path, txt_mode=mode)
    got = [i["text"] for i in items]
    if mode == "paragraph":
        assert got == [r["text"].replace("\n\n", "\n") for r in rows[:10]]
    elif mode == "line":
        assert got == text.split("\n")
    else:
        assert got == [text]


def test_directory_of_json_arrays_expands_sorted(tmp_path, rows):
    d = tmp_path / "wudao"
    d.mkdir()
    write_json_array(d / "part-2.json", rows[:5])
    write_json_array(d / "part-1.json", rows[5:9])
    (d / ".hidden").write_text("x")
    assert [p.name for p in expand_inputs(d)] == ["part-1.json", "part-2.json"]
    with pytest.raises(UserError, match="no such input"):
        expand_inputs(tmp_path / "missing")


def test_resume_start_skips_items(tmp_path, rows):
    for path in (write_jsonl(tmp_path / "a.jsonl.zst", rows), write_json_array(tmp_path / "a.json.gz", rows),
                 write_parquet(tmp_path / "a.parquet", rows)):
        r = InputReader(path)
        got = []
        for first, batch in r.batches(start=33, batch_bytes=2048, batch_items=5):
            assert first == 33 + len(got)
            got += [orjson.loads(b) if isinstance(b, bytes) else b for b in batch]
        assert got == rows[33:]


@pytest.mark.parametrize("comp", [".gz", ".zst", ".bz2"])
def test_truncated_archive_is_an_error_naming_the_file(tmp_path, rows, comp):
    data = COMPRESSORS[comp](jsonl_bytes(rows * 4))
    path = tmp_path / f"cut.jsonl{comp}"
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ReadError, match=f"cut.jsonl\\{comp}.*truncated"):
        read_all(path)


def test_concatenated_members_read_through(tmp_path, rows):
    path = tmp_path / "multi.jsonl.gz"
    import gzip

    path.write_bytes(gzip.compress(jsonl_bytes(rows[:10])) + gzip.compress(jsonl_bytes(rows[10:])))
    assert read_all(path)[1] == rows


def test_malformed_array_reports_item_after_good_items(tmp_path, rows):
    good = orjson.dumps(rows[:12]).decode()
    path = tmp_path / "bad.json"
    path.write_text(good[:-1] + ', {"title": "x", "text": oops}, {"text": "y"}]')
    r = InputReader(path)
    got = []
    with pytest.raises(MalformedJSON) as e:
        for _, batch in r.batches(batch_items=5):
            got += batch
    assert got == rows[:12] and e.value.index == 12


def test_invalid_utf8_in_array_is_replaced_and_counted(tmp_path, rows):
    raw = orjson.dumps(rows[:3]).replace("礼".encode(), b"\xff\xfe", 1)
    assert b"\xff" in raw
    path = write_bytes(tmp_path / "u.json", raw)
    before = utf8_errors()
    _, items = read_all(path)
    assert utf8_errors() > before
    assert len(items) == 3 and "\ufffd" in items[0]["text"]


def test_unknown_format_lists_supported(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("a,b")
    with pytest.raises(UserError, match="jsonl, json, parquet, txt"):
        detect_format(p)
    with pytest.raises(UserError, match="not supported"):
        InputReader(p, "csv")


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_memory_stays_bounded_whatever_the_file_size(tmp_path, rows, fmt):
    import tracemalloc

    path = tmp_path / f"big.{fmt}.gz"
    many = rows * 60  # ~10 MB of JSON
    (write_json_array if fmt == "json" else write_jsonl)(path, many)
    tracemalloc.start()
    n = 0
    for _, batch in InputReader(path).batches(batch_bytes=64 << 10, batch_items=16):
        n += len(batch)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == len(many)
    assert peak < 4 << 20 < len(jsonl_bytes(many)) // 2  # never the whole file, only a batch or two


@pytest.mark.parametrize("comp", [c for c in COMPRESSORS if c])
def test_compression_by_magic_bytes_and_bom(tmp_path, rows, comp):
    """The content decides: a compressed file under a plain name, a plain file under a compressed name,
    and a UTF-8 byte order mark before the first record are all read whole."""
    data = b"\xef\xbb\xbf" + jsonl_bytes(rows)
    hidden = tmp_path / "plain_name.jsonl"
    hidden.write_bytes(COMPRESSORS[comp](data))
    assert sniff_compression(hidden) == comp
    assert read_all(hidden)[1] == rows
    lying = tmp_path / f"plain.jsonl{comp}"
    lying.write_bytes(data)
    assert sniff_compression(lying) == ""
    assert read_all(lying)[1] == rows
    arr = tmp_path / "arr.json"
    arr.write_bytes(COMPRESSORS[comp](b"\xef\xbb\xbf" + orjson.dumps(rows)))
    assert read_all(arr)[1] == rows


def test_parse_json_line():
    assert parse_json_line(b'{"a": 1}\n') == ({"a": 1}, False)
    before = utf8_errors()
    assert parse_json_line(b'{"a": "x\xffy"}') == ({"a": "x\ufffdy"}, True) and utf8_errors() == before + 1
    # a lone surrogate escape is valid JSON (json.dumps writes it) that orjson refuses: the record is kept,
    # the surrogate becomes U+FFFD and a proper pair its character (it was dropped as "malformed JSON")
    line = b'{"t": "lone \\ud800 here \\ud83d\\ude00", "\\udc00k": ["\\udfff"]}'
    assert parse_json_line(line) == ({"t": "lone \ufffd here \U0001f600", "\ufffdk": ["\ufffd"]}, True)
    for line, reason in ((b"  \n", "blank line"), (b'{"a": ', "malformed JSON")):
        with pytest.raises(BadLine) as e:
            parse_json_line(line)
        assert e.value.reason == reason


def _batches(path, ranges: bool, start: int, batch_bytes: int):
    r = InputReader(path, ranges=ranges)
    out = []
    for first, batch in r.batches(start, batch_bytes=batch_bytes):
        if ranges:
            assert isinstance(batch, LineRange)
            batch = [bytes(x) for x in read_lines(path, batch.start, batch.end)]
            if out:  # a range after the first says FOLLOWS (its caller numbers it) or its own index
                assert first in (FOLLOWS, out[-1][0] + len(out[-1][1]))
                first = out[-1][0] + len(out[-1][1])
        out.append((first, batch))
    assert r.position() == r.size
    return out


@pytest.mark.parametrize("name", ["a.jsonl", "a.json"])
def test_line_ranges_cut_the_batches_lines_cut(tmp_path, rows, name):
    """Byte ranges of a plain jsonl file (and of jsonl named .json) hold exactly the lines, first indices and
    batches of the line reader, for any hint (a line ending exactly on it included), any resume start, a BOM,
    a blank line and a last line without its newline; compressed files keep the line batches."""
    body = jsonl_bytes(rows[:40]) + b"\n" + orjson.dumps(rows[40])  # a blank line; no final newline
    lens = [len(x) for x in body.splitlines(keepends=True)]
    for bom in (b"", b"\xef\xbb\xbf"):
        path = tmp_path / name
        path.write_bytes(bom + body)
        for hint in (1, lens[0] - 1, lens[0], lens[0] + 1, lens[0] + lens[1] - 1, 3000, 1 << 20):
            for start in (0, 1, 2, 17, 41, 42, 50):
                want = _batches(path, False, start, hint)
                assert _batches(path, True, start, hint) == want, (bom, hint, start)
                assert sum(len(b) for _, b in want) == max(0, 42 - start)
    gz = write_bytes(tmp_path / "a.jsonl.gz", body)
    assert all(isinstance(b, list) for _, b in InputReader(gz, ranges=True).batches(0, batch_bytes=2048))
