"""The split pattern cuts text identically in Python `regex` (training) and Rust `tokenizers` (encoding),
loses nothing, bounds Han pieces, and the byte alphabet order matches HF's."""

from __future__ import annotations

import pytest
import regex
from tokenizers import Regex, pre_tokenizers

from z2all.tokenizer.pretokenize import byte_order, byte_to_id, bytes_to_unicode, pretokenize, split_pattern

TRICKY = [
    "Hello 世界你好呀朋友们，  def foo(x):\n    return 12345 + x\r\n\tこんにちは café 한국어 𠀀𠀁𠀂𠀃𠀄 👍🏽",
    "if x:\n\n        y = 'it''s' + \"we're\"  \n\t\t# 注释：中文注释在代码里\n",
    "e\u0301\u0302 a\u0308\u0308\u0308 z\u200dz   \n\n\n   \u3000全角空格\u3000ＡＢＣ１２３",
    "1234567 3.14159 0x1F 中文2024年10月1日",
]


@pytest.mark.parametrize("han_chunk", [1, 2, 4])
def test_regex_and_rust_split_agree(han_chunk, demo_docs):
    pat = split_pattern(han_chunk)
    split = pre_tokenizers.Split(Regex(pat), behavior="isolated")
    for text in TRICKY + [t for docs in demo_docs(20_000).values() for t in docs]:
        py = regex.findall(pat, text)
        rust = [p for p, _ in split.pre_tokenize_str(text)]
        assert py == rust
        assert "".join(py) == text  # nothing lost


@pytest.mark.parametrize("han_chunk", [1, 3, 4])
def test_han_runs_are_chunked(han_chunk):
    pat = split_pattern(han_chunk)
    text = "中华人民共和国成立于一九四九年，我们都爱它。" * 3
    pieces = pretokenize(text, pat)
    han = [p for p in pieces if regex.fullmatch(r"\p{Han}+", p)]
    assert han and max(len(p) for p in han) == han_chunk
    assert "".join(pieces) == text


def test_code_indentation_digits_and_letters():
    pieces = pretokenize("    return 12345\n\tfoo(x) café")
    assert pieces == ["   ", " return", " ", "123", "45", "\n", "\tfoo", "(x", ")", " café"]
    assert pretokenize("He's here") == ["He", "'s", " here"]


def test_byte_order_matches_hf_byte_level_alphabet():
    m = bytes_to_unicode()
    assert sorted(set(m.values())) == sorted(pre_tokenizers.ByteLevel.alphabet())
    assert [m[b] for b in byte_order()] == sorted(m.values())
    assert [byte_to_id()[b] for b in byte_order()] == list(range(256))
    assert byte_order()[0] == ord("!") and byte_to_id()[0] == 188  # GPT-2's layout
