"""tiktoken as an exact, faster encoder for our byte-level BPE `tokenizer.json` (and the encoder factory that
`data tokenize --encoder auto|tokenizers|tiktoken` uses).

    from z2all.tokenizer.tiktoken_compat import make_encoder, to_tiktoken
    encode = make_encoder("runs/tokenizer", "auto")      # callable(list[str]) -> list[list[int]]
    enc, reason = to_tiktoken("runs/tokenizer")          # tiktoken.Encoding, or None and why not

What converts: a `tokenizers` BPE model over GPT-2's byte alphabet (no normalizer, no dropout, no
subword prefix/suffix, no byte fallback) behind `Split(pattern, isolated)` + `ByteLevel(use_regex=False)`,
i.e. what `z2all tokenizer train` writes with any backend but spm. tiktoken ranks a token by its id and
merges the adjacent pair whose concatenation has the lowest rank; `tokenizers` merges the adjacent pair
that comes first in the merges list. The two agree when ids follow the merges order, so the conversion
refuses (returns None and the reason) unless:
  - the 256 single bytes and exactly one merge result per other token make up the vocabulary, every
    merge result's id is above its parts' ids and the ids grow with the merges order;
  - every token, encoded on its own by `tokenizers`' BPE model, gives itself back (tiktoken looks a whole
    piece up in the vocabulary first, `tokenizers` runs the merges: they agree on whole-token pieces);
  - every added token is special (with `encode_special_tokens` they are plain text on both sides);
  - the split pattern compiles in tiktoken's dialect (Rust fancy-regex) and a built-in probe text
    (Chinese, English, code, emoji, digits, contractions, odd whitespace) encodes to the same ids as
    `tokenizers` (Oniguruma): a pattern that compiles but cuts differently is refused, never used.
tests/tokenizer/test_tiktoken_compat.py checks equality on random mixed strings (hypothesis) and on
../shared/corpora text.

Specials: both encoders run "ordinary" (special-token text such as "<|endoftext|>" inside a document is
encoded as text); the caller appends the real separator id, as data/tokenize.py does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from z2all.tokenizer.pretokenize import bytes_to_unicode
from z2all.utils import UserError

KINDS = ("auto", "tokenizers", "tiktoken")

# Everything the split pattern and BPE care about, in one string: if tiktoken's regex dialect cut any of
# it differently from Oniguruma the ids would differ here and the conversion is refused.
PROBE = ("中文分词测试：深度学习模型（LLM）在2024年取得了突破。他说：“我们走吧！”\n\n"
         "Hello, world! It's 3.14159 o'clock; we'LL see   you\tthere.\r\n"
         "def f(x):\n    return x ** 2  # 注释 comment\n\n\n\t\tpass\n"
         "emoji 👨\u200d👩\u200d👧 🎉✓ café naïve Ωμέγα Привет こんにちは 한국어 ١٢٣ 1234567\u3000全角\xa0nbsp "
         "a\u2028b\x85c <|endoftext|> end  \n  ")


def _load_json(tokenizer: str | os.PathLike | dict) -> dict:
    if isinstance(tokenizer, dict):
        return tokenizer
    path = Path(tokenizer)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{path} not found: give a directory made by `z2all tokenizer train`")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e}); retrain or restore the tokenizer") from None


def _split_pattern(pre: dict | None) -> tuple[str | None, str]:
    """The Split regex of a Sequence[Split(Regex, Isolated), ByteLevel(use_regex=False)] pre-tokenizer."""
    if not pre or pre.get("type") != "Sequence" or len(pre.get("pretokenizers", [])) != 2:
        return None, f"pre-tokenizer is not Split + ByteLevel ({(pre or {}).get('type')})"
    split, byte_level = pre["pretokenizers"]
    if split.get("type") != "Split" or "Regex" not in split.get("pattern", {}):
        return None, "first pre-tokenizer is not a regex Split"
    if split.get("behavior") != "Isolated" or split.get("invert"):
        return None, f"Split behaviour {split.get('behavior')} (invert {split.get('invert')}) is not Isolated"
    if byte_level.get("type") != "ByteLevel" or byte_level.get("use_regex") or byte_level.get("add_prefix_space"):
        return None, "second pre-tokenizer is not ByteLevel(add_prefix_space=False, use_regex=False)"
    return split["pattern"]["Regex"], ""


def _merge_parts(m) -> tuple[str, str]:
    return tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1])


def to_tiktoken(tokenizer: str | os.PathLike | dict, name: str = "z2all", probe: str = PROBE):
    """(tiktoken.Encoding, "") when `tokenizer` (a directory, a tokenizer.json path or its parsed dict)
    converts exactly, else (None, the reason)."""
    try:
        import tiktoken
    except ImportError:
        return None, "tiktoken is not installed (pip install tiktoken)"
    d = _load_json(tokenizer)
    model = d.get("model") or {}
    if model.get("type") != "BPE":
        return None, f"model type {model.get('type')} is not BPE"
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            return None, f"BPE {key}={model[key]!r} has no tiktoken equivalent"
    if model.get("byte_fallback"):
        return None, "byte_fallback BPE is not byte-level"
    if d.get("normalizer"):
        return None, f"normalizer {d['normalizer'].get('type')} has no tiktoken equivalent"
    pattern, why = _split_pattern(d.get("pre_tokenizer"))
    if pattern is None:
        return None, why
    u2b = {u: b for b, u in bytes_to_unicode().items()}
    ranks: dict[bytes, int] = {}
    for tok, i in model["vocab"].items():
        try:
            b = bytes(u2b[c] for c in tok)
        except KeyError:
            return None, f"token {tok!r} is not in the byte-level alphabet"
        if b in ranks:
            return None, f"two tokens spell the bytes {b!r}"
        ranks[b] = i
    if any(bytes([b]) not in ranks for b in range(256)):
        return None, "the vocabulary lacks some of the 256 single bytes"
    made: set[bytes] = set()
    last = -1
    for k, m in enumerate(model.get("merges", [])):
        a, b = _merge_parts(m)
        try:
            pa, pb = bytes(u2b[c] for c in a), bytes(u2b[c] for c in b)
        except KeyError:
            return None, f"merge {k} ({a!r}, {b!r}) is not in the byte-level alphabet"
        t = pa + pb
        if pa not in ranks or pb not in ranks or t not in ranks:
            return None, f"merge {k} ({a!r}, {b!r}) uses or makes a token missing from the vocabulary"
        if t in made:
            return None, f"merge {k} makes {t!r} a second time"
        rt = ranks[t]
        if rt <= last or rt <= ranks[pa] or rt <= ranks[pb]:
            return None, f"merge {k} ({a!r}, {b!r}) -> id {rt}: ids do not follow the merges order"
        last = rt
        made.add(t)
    extra = [t for t in ranks if len(t) > 1 and t not in made]
    if extra:
        return None, f"{len(extra)} token(s) (e.g. {extra[0]!r}) are no merge's result"
    hf = _hf_tokenizer(d)
    for tok, i in model["vocab"].items():  # the merges of `tokenizers` itself, on each token alone (Rust)
        got = hf.model.tokenize(tok)
        if len(got) != 1 or got[0].id != i:
            return None, f"token {tok!r} does not encode to itself through the merges"
    specials = {}
    for at in d.get("added_tokens", []):
        if not at.get("special"):
            return None, f"added token {at['content']!r} is not special (tokenizers would match it in text)"
        specials[at["content"]] = at["id"]
    try:
        enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
    except Exception as e:  # tiktoken raises ValueError for a pattern its regex dialect rejects
        return None, f"tiktoken rejects the split pattern: {e}"
    if probe:
        ref = _tokenizers_encoder(hf)([probe])[0]
        got = enc.encode_ordinary(probe)
        if got != ref:
            at = next((i for i, (x, y) in enumerate(zip(got, ref)) if x != y), min(len(got), len(ref)))
            return None, (f"tiktoken cuts the probe text differently from tokenizers (first difference at token "
                          f"{at}): the split pattern means something else in tiktoken's regex dialect")
    return enc, ""


def _hf_tokenizer(tokenizer):
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if isinstance(tokenizer, dict):
        return Tokenizer.from_str(json.dumps(tokenizer))
    path = Path(tokenizer)
    return Tokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path))


def _tokenizers_encoder(tokenizer) -> Callable[[list[str]], list[list[int]]]:
    tok = _hf_tokenizer(tokenizer)
    tok.encode_special_tokens = True  # special-token text in a document is text (data/tokenize.py)
    batch = getattr(tok, "encode_batch_fast", tok.encode_batch)

    def encode(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in batch(texts, add_special_tokens=False)]

    return encode


def make_encoder(tokenizer_dir: str | os.PathLike, kind: str = "auto",
                 threads: int = 1) -> Callable[[list[str]], list[list[int]]]:
    """callable(list of texts) -> list of id lists, no special tokens added, special-token text as text.

    kind: "tokenizers" (Rust tokenizers), "tiktoken" (refused with the reason when the tokenizer does not
    convert exactly), "auto" (tiktoken when it converts, else tokenizers). `threads` > 1 lets tiktoken
    encode a batch on that many threads (tokenizers follows TOKENIZERS_PARALLELISM)."""
    if kind not in KINDS:
        raise UserError(f"encoder '{kind}' is not one of {', '.join(KINDS)}")
    if kind != "tokenizers":
        enc, why = to_tiktoken(tokenizer_dir)
        if enc is not None:
            if threads > 1:
                return lambda texts: enc.encode_ordinary_batch(texts, num_threads=threads)
            ordinary = enc.encode_ordinary
            return lambda texts: [ordinary(t) for t in texts]
        if kind == "tiktoken":
            raise UserError(f"--encoder tiktoken: {tokenizer_dir} does not convert to tiktoken exactly ({why}); "
                            f"use --encoder tokenizers or auto")
    return _tokenizers_encoder(tokenizer_dir)
