"""Adapters map each corpus's raw fields as DESIGN.md says (others keeps the rest); cleaning normalises
prose and never touches code; filters and dedup structures behave."""

from __future__ import annotations

import re

import numpy as np
import pytest
import regex
from data_helpers import raw_rows, real_docs
from hypothesis import given, settings
from hypothesis import strategies as st

from z2all.data.clean import _CJK, CleanConfig, Cleaner, content_hash
from z2all.data.dedup import HashSet64, MinHash
from z2all.data.schema import FIELDS, record_text
from z2all.data.sources import SOURCES, get_source
from z2all.utils import UserError

# source -> (category, title field, content field, desc field) per DESIGN.md
EXPECTED = {
    "baike2018qa": ("科技", "title", "answer", "desc"),
    "news2016zh": ("", "title", "content", "desc"),
    "webtext2019zh": ("生活", "title", "content", "desc"),
    "wikipedia_zh": ("wikipedia_zh", "title", "text", None),
    "wikipedia_en": ("wikipedia_en", "title", "text", None),
    "github_python": ("python_code", "path", "content", None),
    "zhihu_kol": ("zhihu", "INSTRUCTION", "RESPONSE", None),
    "wudao": ("百科", "title", "content", None),
}


def test_every_design_corpus_has_an_adapter():
    assert set(SOURCES) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_adapter_mapping(shared_corpora, name):
    docs = real_docs(shared_corpora, "zh_fortunes", 3)
    raw = raw_rows(name, docs)[1]
    rec = get_source(name).to_record(dict(raw))
    category, title, content, desc = EXPECTED[name]
    assert tuple(rec) == FIELDS
    assert rec["data_src"] == name and rec["category"] == category
    assert rec["title"] == raw[title] and rec["content"] == raw[content]
    assert rec["desc"] == (raw[desc] if desc else "")
    mapped = {title, content, desc, {"baike2018qa": "category", "webtext2019zh": "topic",
                                     "wudao": "dataType"}.get(name)}
    assert rec["others"] == {k: v for k, v in raw.items() if k not in mapped}


def test_missing_and_empty_content_are_reasons():
    src = get_source("baike2018qa")
    assert src.to_record({"title": "t"}) == "missing field 'answer'"
    assert src.to_record({"answer": "  "}) == "empty field 'answer'"
    assert src.to_record([1, 2]) == "not a JSON object"


def test_generic_source():
    src = get_source("forum", text_field="body", title_field="subject", kind="prose")
    rec = src.to_record({"body": "hello", "subject": "hi", "votes": 3})
    assert (rec["category"], rec["title"], rec["content"], rec["others"]) == ("forum", "hi", "hello", {"votes": 3})
    with pytest.raises(UserError, match="--text-field"):
        get_source("forum")
    with pytest.raises(UserError, match="letters, digits"):
        get_source("a/b", text_field="x")
    # --kind code: the training text is the code alone, byte for byte (the path went in front of it when
    # the category was the source's name), and a category that would say otherwise is refused
    from z2all.data.schema import record_text

    code = get_source("mycode", text_field="code", title_field="path", kind="code")
    rec = code.to_record({"path": "pkg/a.py", "code": "import os\r\n"})
    assert rec["category"] == "code" and rec["title"] == "pkg/a.py" and record_text(rec) == "import os\r\n"
    with pytest.raises(UserError, match="--kind code takes its category from the kind"):
        get_source("mycode", text_field="code", kind="code", category="snippets")


@pytest.fixture
def cleaner():
    return Cleaner(CleanConfig())


def test_clean_prose_rules(cleaner):
    c = cleaner.clean_prose
    assert c("a\r\nb\rc") == "a\nb\nc"
    assert c("x\x00y\u200bz\ue000w\U000e0001") == "xyzw"  # control, format, private use, tag char
    assert c("行\u3000中\xa0文\tend") == "行中文 end"  # exotic spaces -> " ", then none between CJK
    assert c("在 Debian 这种 规模") == "在 Debian 这种规模"
    assert c("one   two  \nthree") == "one two\nthree"
    assert c("code:\n    indented  line") == "code:\n    indented line"  # indentation kept
    assert c("p1\n\n\n\n\np2") == "p1\n\np2"
    assert c("真的吗？？？？？？好!!!!!!") == "真的吗？？？好!!!"
    assert c("Title\n=========") == "Title\n========="  # markup runs are not punctuation
    assert c("👨\u200d👩\u200d👧") == "👨\u200d👩\u200d👧"  # ZWJ sequences survive
    assert c("  \n\n  text  \n\n") == "text"


def test_clean_on_real_text_is_idempotent(shared_corpora, cleaner):
    for name in ("zh_manpages", "en_python_docs", "zh_fortunes"):
        for d in real_docs(shared_corpora, name, 40):
            once = cleaner.clean_prose(d["text"])
            assert cleaner.clean_prose(once) == once
            assert "\n" in once or len(once) < 200


def reference_clean(s: str) -> str:
    """The prose rules of clean.py's docstring as plain regex passes, with none of Cleaner's fast paths."""
    s = s.replace("\r\n", "\n").replace("\r", "\n")
    s = re.sub("[\x85\u2028\u2029]", "\n", s)
    s = re.sub("[\t\x0b\x0c\xa0\u1680\u2000-\u200a\u202f\u205f\u3000]", " ", s)
    s = regex.sub(r"[^\P{C}\n\u200c\u200d]", "", s)
    s = re.sub(r"(?<=\S)  +", " ", s)
    s = re.sub(r" +\n", "\n", s)
    s = re.sub(f"(?<=[{_CJK}]) +(?=[{_CJK}])", "", s)
    s = re.sub(r"\n{3,}", "\n\n", s)
    s = re.sub(r"([!?.,~。！？，、；…～])\1{3,}", r"\1\1\1", s)
    return s.strip()


# characters every rule and every fast-path guard of clean_prose cares about
_ALPHABET = list("ab. ,!?~\n\r\t中文。，、！？；…～é") + ["\x00", "\x7f", "\x0c", "\xa0", "\u3000", "\u2002", "\u2028",
                                                      "\x85", "\u200b", "\u200d", "\ue000", "\U000e0001",
                                                      "\U00020001", "\u0378", "  ", "\n\n", "...."]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(_ALPHABET), max_size=40).map("".join))
def test_clean_prose_matches_the_plain_rules_and_is_idempotent(s):
    c = Cleaner(CleanConfig()).clean_prose
    assert c(s) == reference_clean(s)
    assert c(c(s)) == c(s)


def test_clean_prose_matches_the_plain_rules_on_real_text(shared_corpora, cleaner):
    for name in ("zh_manpages", "zh_debian_reference", "en_python_docs"):
        for d in real_docs(shared_corpora, name, 150):
            assert cleaner.clean_prose(d["text"]) == reference_clean(d["text"])


def test_nfkc_is_optional():
    assert Cleaner(CleanConfig()).clean_prose("ＡＢＣ，好") == "ＡＢＣ，好"
    assert Cleaner(CleanConfig(nfkc=True)).clean_prose("ＡＢＣ，好") == "ABC,好"


def test_code_is_never_touched_and_filters(shared_corpora, cleaner):
    code = real_docs(shared_corpora, "code_cpython_stdlib", 5)[3]["text"] + "\r\n\t x  = 1\x0c\n\n\n\n"
    rec = get_source("github_python").to_record({"content": code, "path": "a.py"})
    assert cleaner(rec, "code")[0]["content"] == code
    assert record_text(rec) == code
    prose = get_source("wikipedia_zh")
    assert cleaner(prose.to_record({"text": "短"}), "prose") == "shorter than 10 chars"
    assert Cleaner(CleanConfig(max_chars=20))(prose.to_record({"text": "x" * 21}), "prose") == \
        "longer than 20 chars"
    junk = "正文内容" * 5 + "▅█▂" * 10
    assert cleaner(prose.to_record({"text": junk}), "prose").startswith("junk")
    assert isinstance(cleaner(prose.to_record({"text": "正文内容" * 20 + "█"}), "prose"), tuple)


def test_hashset64_in_order_and_across_merges():
    s = HashSet64(flush=4)
    vals = [content_hash(f"doc {i % 7}") for i in range(20)]
    assert s.add_new(vals) == [True] * 7 + [False] * 13
    assert len(s) == 7 and s.base.size >= 4  # merged into the sorted array at least once
    assert s.add_new([content_hash("doc 3"), content_hash("new")]) == [False, True]
    t = HashSet64()
    t.add_all(s.values())
    assert t.add_new(vals[:7]) == [False] * 7
    assert s.values().dtype == np.uint64 and list(s.values()) == sorted(s.values())


def test_hashset64_equals_a_plain_set():
    """Against a Python set, value by value: repeats inside a call, across calls, and across merges of the
    pending set into the sorted array (flush 50), on random 64-bit values drawn from a small pool."""
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 2**64, size=300, dtype=np.uint64)
    s, ref = HashSet64(flush=50), set()
    for _ in range(40):
        batch = pool[rng.integers(0, len(pool), size=int(rng.integers(0, 40)))].tolist()
        want = []
        for v in batch:
            want.append(v not in ref)
            ref.add(v)
        assert s.add_new(batch) == want
    assert len(s) == len(ref) and set(s.values().tolist()) == ref


def test_minhash_flags_near_duplicates_only(shared_corpora):
    docs = [d["text"] for d in real_docs(shared_corpora, "en_kjv_bible", 6)]
    mh = MinHash()
    base = docs[2]
    edited = base.replace("the", "teh", 3)  # a few small edits
    k0, k1, k2 = mh.band_keys(base), mh.band_keys(edited), mh.band_keys(docs[4])
    assert len(k0) == 16
    assert set(k0) & set(k1)
    assert not set(k0) & set(k2)
    assert mh.band_keys(base) == k0  # deterministic
