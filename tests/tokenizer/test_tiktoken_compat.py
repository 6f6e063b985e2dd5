"""tiktoken_compat: our trained tokenizer.json converts to a tiktoken.Encoding that gives exactly the ids of
`tokenizers` (random mixed zh/en/code/emoji/whitespace strings, real corpus text), and the conversion refuses,
with a reason, whatever it cannot reproduce exactly (ids out of merges order, a pattern tiktoken rejects or
reads differently, non-special added tokens)."""

from __future__ import annotations

import copy
import gzip
import json

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from z2all.tokenizer import tiktoken_compat as tc
from z2all.tokenizer.train import Config, train_tokenizer
from z2all.utils import UserError

pytest.importorskip("tiktoken")

DEMO = tc.Path(__file__).resolve().parents[2] / "z2all" / "data" / "demo"


@pytest.fixture(scope="module", params=["z2all", "hf"])
def tok_dir(request, tmp_path_factory):
    if not DEMO.is_dir():
        pytest.skip("demo corpus not built")
    out = tmp_path_factory.mktemp(f"tok-{request.param}")
    train_tokenizer(Config(inputs=[str(DEMO)], out_dir=str(out), backend=request.param, vocab_size=1024,
                           workers=1, max_chars=600_000))
    return out


@pytest.fixture(scope="module")
def encoders(tok_dir):
    return tc.make_encoder(tok_dir, "tiktoken"), tc.make_encoder(tok_dir, "tokenizers")


_FRAGMENTS = ["中文", "分词", "，", "。", "“引号”", "的", "Hello", " world", "It's", " we'LL", "'re", "3.14", "2024",
              "1234567", "def f(x):\n", "    return", "\t", "\n\n", "\r\n", "  ", " ", "\u3000", "\xa0", "\u2028",
              "\x85", "👨\u200d👩\u200d👧", "🎉", "café", "Привет", "こんにちは", "한국어", "١٢٣", "<|endoftext|>",
              "==>", "#", "x**2", "\x00", "é"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(_FRAGMENTS),
                          st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=6)),
                max_size=30).map("".join))
def test_tiktoken_encodes_exactly_like_tokenizers(encoders, s):
    fast, ref = encoders
    assert fast([s]) == ref([s])


def test_tiktoken_matches_on_corpus_text(encoders, shared_corpora):
    fast, ref = encoders
    texts = []
    for f in sorted(shared_corpora.glob("*.jsonl.gz")):
        with gzip.open(f, "rb") as fh:
            texts += [orjson.loads(line)["text"] for _, line in zip(range(20), fh)]
    assert fast(texts) == ref(texts)


def test_threads_and_auto_give_the_same_ids(tok_dir, encoders):
    texts = ["中文 and English\n" * 3, "def f():\n    pass\n", ""]
    assert tc.make_encoder(tok_dir, "tiktoken", threads=2)(texts) == encoders[1](texts)
    assert tc.make_encoder(tok_dir, "auto")(texts) == encoders[1](texts)


def _json(tok_dir) -> dict:
    return json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))


def _set_pattern(d: dict, pattern: str) -> dict:
    d = copy.deepcopy(d)
    d["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = pattern
    return d


def test_conversion_refuses_what_it_cannot_reproduce(tok_dir, monkeypatch):
    d = _json(tok_dir)
    enc, why = tc.to_tiktoken(d)
    assert enc is not None and why == ""
    # a pattern tiktoken's regex dialect rejects (\X: grapheme clusters, fine for Oniguruma)
    enc, why = tc.to_tiktoken(_set_pattern(d, r"\X|\s+"))
    assert enc is None and "rejects the split pattern" in why
    # ids that do not follow the merges order: tiktoken would merge in another order
    swapped = copy.deepcopy(d)
    vocab, merges = swapped["model"]["vocab"], swapped["model"]["merges"]
    a, b = ("".join(m) if isinstance(m, list) else m.replace(" ", "", 1) for m in merges[-2:])
    vocab[a], vocab[b] = vocab[b], vocab[a]
    enc, why = tc.to_tiktoken(swapped)
    assert enc is None and "merges order" in why
    # an added token tokenizers would match inside text
    plain = copy.deepcopy(d)
    plain["added_tokens"][0]["special"] = False
    assert "not special" in tc.to_tiktoken(plain)[1]
    nfkc = dict(d, normalizer={"type": "NFKC"})
    assert "normalizer" in tc.to_tiktoken(nfkc)[1]
    # a pattern both accept but read differently is caught by the probe text
    real = tc._tokenizers_encoder
    monkeypatch.setattr(tc, "_tokenizers_encoder", lambda t: lambda texts: [[0] + ids for ids in real(t)(texts)])
    enc, why = tc.to_tiktoken(d)
    assert enc is None and "probe" in why


def test_make_encoder_refuses_or_falls_back(tok_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text(json.dumps(_set_pattern(_json(tok_dir), r"\X|\s+")), encoding="utf-8")
    with pytest.raises(UserError, match="does not convert to tiktoken exactly.*rejects the split pattern"):
        tc.make_encoder(bad, "tiktoken")
    texts = ["abc 中文"]
    assert tc.make_encoder(bad, "auto")(texts) == tc.make_encoder(bad, "tokenizers")(texts)
    with pytest.raises(UserError, match="one of auto"):
        tc.make_encoder(tok_dir, "fast")
    with pytest.raises(UserError, match="not found"):
        tc.make_encoder(tmp_path / "missing", "auto")
