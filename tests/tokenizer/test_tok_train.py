"""`z2all tokenizer train`: every input kind, the output-directory contract others rely on, all three
backends, the memory budget binding, and bad input turned into messages that say what to change."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import zstandard

from z2all import cli
from z2all.data import readers
from z2all.data.schema import make_record, record_text
from z2all.tokenizer import bpe, hf
from z2all.tokenizer.train import Config, ReadStats, expand_inputs, iter_texts, read_texts, train_tokenizer
from z2all.utils import UserError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, demo_docs) -> Path:
    """A directory with every input kind: txt, unified-record jsonl.gz, plain jsonl.zst, nested dir."""
    d = tmp_path_factory.mktemp("corpus")
    docs = demo_docs(40_000)
    (d / "en.txt").write_text("\n".join(docs["en"]), encoding="utf-8")
    with gzip.open(d / "zh.jsonl.gz", "wt", encoding="utf-8") as f:
        for t in docs["zh"]:
            f.write(json.dumps(make_record(data_src="wikipedia_zh", category="wikipedia_zh", title="T",
                                           content=t), ensure_ascii=False) + "\n")
    (d / "sub").mkdir()
    raw = "".join(json.dumps({"body": t}) + "\n" for t in docs["code"]).encode()
    (d / "sub" / "code.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    (d / "manifest.json.lock").write_text("not an input")
    return d


def test_reader_handles_every_kind(corpus):
    files = expand_inputs([str(corpus)])
    assert sorted(f.name for f in files) == ["code.jsonl.zst", "en.txt", "zh.jsonl.gz"]
    st = ReadStats()
    texts = list(iter_texts(files, "body", st))
    zh_first = next(read_texts(corpus / "zh.jsonl.gz"))
    rec = json.loads(gzip.open(corpus / "zh.jsonl.gz", "rt").readline())
    assert zh_first == record_text(rec) and zh_first.startswith("T\n")  # unified records -> record_text
    assert st.files == 3 and st.no_text == 0 and st.bad_lines == 0
    assert any("def " in t for t in texts)  # the custom text field of the .zst file
    capped = list(iter_texts(files, "body", ReadStats(), max_chars=1000))
    assert sum(map(len, capped)) == 1000


def test_reader_keeps_txt_exact_and_counts_bad_records(tmp_path, monkeypatch):
    txt = "para one\n\n\n    indented\r\n\ttab\n\n"
    (tmp_path / "a.txt").write_text(txt, encoding="utf-8", newline="")
    assert "".join(read_texts(tmp_path / "a.txt")) == txt.rstrip("\n")  # blank lines and CRLF kept
    # a file longer than one block: blocks are cut at line ends and concatenate back to the file
    monkeypatch.setattr(readers, "_MAX_TXT_CHARS", 20)
    long = "".join(f"line {i}\n" + ("\n" if i % 3 == 0 else "") for i in range(40))
    (tmp_path / "long.txt").write_text(long, encoding="utf-8")
    blocks = list(read_texts(tmp_path / "long.txt"))
    assert len(blocks) > 5 and "".join(blocks) == long.rstrip("\n")
    (tmp_path / "notes.log").write_text("named directly: read as text")
    assert list(read_texts(tmp_path / "notes.log")) == ["named directly: read as text"]
    (tmp_path / "arr.json").write_text(json.dumps([{"text": "first"}, {"content": "second"}, {"x": 1}]))
    st = ReadStats()
    assert list(read_texts(tmp_path / "arr.json", stats=st)) == ["first", "second"] and st.no_text == 1
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "ok"}\n\n{broken\n{"text": "bad \xff utf8"}\n')
    st = ReadStats()
    assert list(read_texts(tmp_path / "b.jsonl", stats=st)) == ["ok", "bad \ufffd utf8"]
    assert st.bad_lines == 1 and st.first_bad == f"{tmp_path / 'b.jsonl'}:3" and st.utf8_replaced == 1


def test_parquet_inputs_read_only_their_text_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from z2all.tokenizer.train import _parquet_columns

    wide = pa.table({"text": ["alpha", None, "gamma"], "body": [None, "beta", None],
                     "embedding": [[0.5] * 256] * 3, "meta": ["x", "y", "z"]})
    pq.write_table(wide, tmp_path / "wide.parquet")
    assert _parquet_columns(tmp_path / "wide.parquet", "body") == ["body", "text"]
    # per row the first candidate with a string wins, as for json lines
    assert list(read_texts(tmp_path / "wide.parquet", "body")) == ["alpha", "beta", "gamma"]
    rec = make_record(gid=0, id=1, data_src="wiki", title="Title", content="Body text.", others={"url": "u"})
    pq.write_table(pa.Table.from_pylist([rec]), tmp_path / "unified.parquet")
    assert set(_parquet_columns(tmp_path / "unified.parquet", "text")) == {"data_src", "category", "title",
                                                                          "desc", "content"}
    assert list(read_texts(tmp_path / "unified.parquet")) == [record_text(rec)]
    pq.write_table(pa.table({"other": ["x"]}), tmp_path / "none.parquet")
    st = ReadStats()
    assert list(read_texts(tmp_path / "none.parquet", stats=st)) == [] and st.no_text == 1


def test_train_writes_the_contract_directory(corpus, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    out = tmp_path / "tok"
    rc = cli.main(["tokenizer", "train", str(corpus), "--out-dir", str(out), "--vocab-size", "1000",
                   "--text-field", "body", "--workers", "2", "--special-tokens", "<|tool|>,<|fim|>"])
    assert rc == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenization_z2all.py",
                 hf.PROVENANCE):
        assert (out / name).is_file(), name
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.get_vocab_size() == 1024  # 1000 rounded up to a multiple of 64
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>", "<|tool|>", "<|fim|>"]
    ids = [tok.token_to_id(t) for t in specials]
    base = tok.get_vocab_size(with_added_tokens=False)
    assert ids == list(range(base, base + 6))
    added = {t.content: t.special for t in tok.get_added_tokens_decoder().values()}
    assert added["<|endoftext|>"] and all(added[t] for t in specials)
    assert sum(1 for t in added if t.startswith("<|reserved_")) == 1024 - base - 6
    prov = json.loads((out / hf.PROVENANCE).read_text())
    assert prov["config"]["backend"] == "z2all" and prov["summary"]["counting"]["words_total"] > 0
    assert prov["summary"]["counting"]["error_bound"] == 0  # 2 GB holds this corpus exactly
    at = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert at.eos_token == "<|endoftext|>" and at.pad_token == "<|pad|>" and at.eos_token_id == ids[0]
    text = "中文 text\n    code = 1"
    assert at.decode(at(text)["input_ids"]) == text


def test_budget_that_binds_prunes_and_reports(corpus, tmp_path):
    budget = bpe.BASE_BYTES + bpe.WORKER_BYTES + 5000 * bpe.BYTES_PER_WORD
    s = train_tokenizer(Config(inputs=[str(corpus)], out_dir=str(tmp_path / "t"), vocab_size=512, workers=1,
                               memory_budget=str(budget), text_field="body"))
    c = s["counting"]
    assert c["capacity"] == 5000 and c["prunes"] > 0 and c["error_bound"] >= 1 and c["unique_kept"] <= 5000
    assert s["vocab"]["vocab_size"] == 512


@pytest.mark.parametrize("backend,vocab", [("hf", 640), ("spm", 2048)])
def test_other_backends_write_the_same_format(corpus, tmp_path, backend, vocab, demo_docs):
    from transformers import AutoTokenizer

    out = tmp_path / backend
    s = train_tokenizer(Config(inputs=[str(corpus)], out_dir=str(out), vocab_size=vocab, backend=backend,
                               text_field="body"))
    assert s["vocab"]["vocab_size"] == vocab
    at = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert at.convert_tokens_to_ids("<|endoftext|>") == s["vocab"]["specials"]["<|endoftext|>"]
    text = "def f(x):\n    return x  # 注释，中文"
    ids = at(text)["input_ids"]
    assert at.decode(ids) == text and max(ids) < vocab
    if backend == "spm":  # the converted tokenizer.json encodes exactly like sentencepiece itself
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(out / "spm.model"))
        lines = [ln for t in demo_docs(20_000)["zh"] + demo_docs(20_000)["code"] for ln in t.split("\n") if ln]
        assert lines and all(sp.encode(ln) == at(ln)["input_ids"] for ln in lines[:300])


def test_bad_input_says_what_to_change(corpus, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(UserError, match="no text found"):
        train_tokenizer(Config(inputs=[str(empty)], out_dir=str(tmp_path / "o")))
    with pytest.raises(UserError, match="--vocab-size 100 is too small.*use --vocab-size 320"):
        train_tokenizer(Config(inputs=[str(corpus)], vocab_size=100, out_dir=str(tmp_path / "o")))
    with pytest.raises(UserError, match="--memory-budget 64MB is too small.*use --memory-budget"):
        train_tokenizer(Config(inputs=[str(corpus)], memory_budget="64MB", workers=1, out_dir=str(tmp_path / "o")))
    with pytest.raises(UserError, match="too small for the spm backend.*use --vocab-size"):
        train_tokenizer(Config(inputs=[str(corpus)], vocab_size=640, backend="spm", text_field="body",
                               out_dir=str(tmp_path / "o")))
    with pytest.raises(UserError, match="write a size like"):
        train_tokenizer(Config(inputs=[str(corpus)], memory_budget="lots"))
    bad_gz = tmp_path / "broken.jsonl.gz"
    bad_gz.write_bytes(b"\x1f\x8b\x08\x00" + b"this is not gzip data at all")  # gzip magic, then garbage
    with pytest.raises(UserError, match="broken.jsonl.gz.*corrupt.*repair the file.*or leave it out"):
        train_tokenizer(Config(inputs=[str(bad_gz)], out_dir=str(tmp_path / "o")))
    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "hello"}\n' * 5000)[:-20])
    with pytest.raises(UserError, match="cut.jsonl.zst: truncated"):
        train_tokenizer(Config(inputs=[str(cut)], out_dir=str(tmp_path / "o")))
    with pytest.raises(UserError, match="no such file"):
        train_tokenizer(Config(inputs=[str(tmp_path / "missing.txt")]))
    nofield = tmp_path / "x.jsonl"
    nofield.write_text('{"body": "hello"}\n{not json\n')
    with pytest.raises(UserError, match="had no 'text' field; set --text-field"):
        train_tokenizer(Config(inputs=[str(nofield)], out_dir=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()  # a failed run leaves no claimed directory behind
    # through the CLI: exit status 2 and the message, no traceback
    assert cli.main(["tokenizer", "train", str(corpus), "--vocab-size", "10"]) == 2
    assert "too small" in capsys.readouterr().err


def test_converted_corpus_dir_is_read_once(tmp_path):
    """Pointing the tokenizer at a `data convert --txt` output reads each document once (its shards), not
    the txt copies nor the manifests and convert.json."""
    from z2all.data import convert

    demo = Path(convert.__file__).parent / "demo" / "zh_wiki.jsonl.gz"
    out = tmp_path / "conv"
    convert.run(convert.Config(inputs=[f"wikipedia_zh={demo}"], out=str(out), txt=True, workers=1))
    files = expand_inputs([str(out)])
    assert files and all(f.name.endswith(".jsonl") for f in files)
    stats = ReadStats()
    texts = list(iter_texts(files, stats=stats))
    manifest = json.loads((out / "wikipedia_zh" / "manifest.json").read_text())
    assert len(texts) == sum(s["count"] for s in manifest["shards"])
    assert stats.no_text == 0
    assert expand_inputs([str(out / "wikipedia_zh")]) == files  # one source directory works the same way


def test_invalid_utf8_is_shown_and_recorded(tmp_path, capsys):
    """Bytes that are not UTF-8 are trained on as U+FFFD: the run says how many and where, and the
    provenance file keeps the count (it used to be counted and dropped)."""
    good = tmp_path / "good.txt"
    good.write_text("plain text to learn from\n" * 30, encoding="utf-8")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café crème, déjà vu\n".encode("latin-1") * 20)  # 4 invalid bytes a line
    out = tmp_path / "tok"
    assert cli.main(["tokenizer", "train", f"{good},{bad}", "--out-dir", str(out), "--vocab-size", "320",
                     "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert f"note: 80 invalid UTF-8 sequence(s) in {bad} were read as U+FFFD" in err
    read = json.loads((out / hf.PROVENANCE).read_text())["summary"]["read"]
    assert (read["utf8_replaced"], read["utf8_files"], read["utf8_first"]) == (80, 1, str(bad))
    assert cli.main(["tokenizer", "train", str(good), "--out-dir", str(out), "--vocab-size", "320",
                     "--workers", "1"]) == 0
    assert "UTF-8" not in capsys.readouterr().err  # clean input: no note


@pytest.mark.parametrize("backend, special, words, not_words", [
    ("z2all", " ", ["--special-tokens ' '", "visible characters"], []),
    ("spm", "\t", ["--special-tokens '\\t'", "visible characters"], []),
    # a single character is one of the 256 byte tokens: refused up front, without blaming the corpus
    ("z2all", "a", ["--special-tokens 'a'", "256 byte tokens", "<|a|>"], ["often", "--backend z2all"]),
    ("hf", "é", ["--special-tokens 'é'", "256 byte tokens"], ["often", "--backend"]),
    ("spm", "<0x41>", ["--special-tokens '<0x41>'", "every spm vocabulary"], []),
    # learned from this corpus: the advice fits the backend in use (z2all was told to "use --backend z2all")
    ("z2all", "hello", ["--special-tokens 'hello'", "z2all backend learned", "<|hello|>"], ["--backend z2all"]),
    ("spm", "hello", ["--special-tokens 'hello'", "spm backend learned", "--backend z2all or hf"], []),
])
def test_special_tokens_that_cannot_get_an_id_say_why(tmp_path, capsys, backend, special, words, not_words):
    corpus = tmp_path / "in.txt"
    # varied enough for spm to make 320 pieces, with "hello" frequent enough for every backend to learn it
    names = [a + b + c for a in "bdfgkmpst" for b in "aeiou" for c in "lnrx"]
    corpus.write_text("".join(f"hello {w}, hello there\n" for w in names) * 3, encoding="utf-8")
    out = tmp_path / "tok"
    assert cli.main(["tokenizer", "train", str(corpus), "--out-dir", str(out), "--backend", backend,
                     "--vocab-size", "320", "--workers", "1", "--special-tokens", special]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert all(w in err for w in words) and not any(w in err for w in not_words), err
    assert not out.exists()
    with pytest.raises(UserError, match="--special-tokens ''"):  # an empty item from a config file
        Config(inputs=[str(corpus)], special_tokens=["<|tool|>", ""]).check()
