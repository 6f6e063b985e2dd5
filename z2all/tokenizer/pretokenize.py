"""The split pattern (pre-tokenization) for mixed Chinese / English / code, and the byte <-> unicode map.

Byte-level BPE never merges across the pieces this pattern cuts a text into, so the pattern decides two
things: which tokens can exist at all, and how many distinct "words" the trainer must count. The same
pattern string is written into `tokenizer.json` (a `Split` pre-tokenizer), so training (Python `regex`)
and encoding (Rust `tokenizers`, Oniguruma) cut text identically; a test checks the two agree.

Three patterns, by name (`z2all tokenizer train --pattern`): `llama-bpe` (Llama 3's, the default),
`qwen2` (Qwen2's: the same with single digits) and `z2all` (ours, below: Han runs in chunks). The first
two are the ones llama.cpp implements, so a GGUF export tokenizes exactly as we do (model/gguf.py); why
llama-bpe is the default is measured in docs/performance.md ("Split patterns").

Our `z2all` pattern, alternative by alternative (first match wins, scanning left to right):

    (?i:'s|'t|'re|'ve|'m|'ll|'d)         English contractions, as in GPT-4's cl100k
    \\p{Han}{1,N}                         Han characters in chunks of at most N (default 4), see below
    [^\\r\\n\\p{L}\\p{N}]?[^\\P{L}\\p{Han}]+   a run of non-Han letters with one optional leading space or
                                         punctuation mark (" the", "(x", " café", " こんにちは")
    \\p{N}{1,3}                           digits in groups of at most three (numbers stay cheap but the
                                         vocabulary does not fill up with years and ids)
     ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*          punctuation / operator runs with an optional leading space and the
                                         newlines that follow ("):\\n", " +=", "，")
    \\s*[\\r\\n]+                          newlines with the indentation before them
    \\s+(?!\\S)                            whitespace, leaving the last space to the next word, so code
                                         indentation "    return" becomes "   " + " return" and " return"
                                         is one token wherever it is indented
    \\s+                                  any other whitespace (tabs, trailing spaces)

Why Han runs are chunked: Chinese has no spaces, so a GPT-style `\\p{L}+` keeps a whole clause of Han
characters as one "word". Nearly every clause is unique, so the word table grows with the corpus (the
reason HF tokenizers needed 288 GB for 20 GB of Chinese). Cutting Han runs greedily into pieces of at
most N characters bounds a word to N Han characters, so the table is bounded by the number of distinct
N-grams that actually recur, and lossy counting (bpe.py) can drop the rare tail. The cost: no token spans
more than N Han characters, and a chunk boundary falls at a fixed offset from the start of the run rather
than at a word boundary, so a word is sometimes split across two chunks. Measured on the shared zh corpora
(5.6 MB of manpages + fortunes + debian reference, HF BpeTrainer, vocab 8192, held-out zh bytes/token):
N=1 3.25, N=2 3.75, N=3 3.82, N=4 3.90, N=6 3.98, whole runs 4.10. N=4 costs ~5% on Chinese against
whole runs and keeps every common 1-4 character word representable; it is the default (`han_chunk`).
Other CJK scripts (kana, Hangul) use spaces or are rarer here and stay in the letter alternative.
"""

from __future__ import annotations

from functools import lru_cache

import regex

DEFAULT_HAN_CHUNK = 4

_PATTERN_TEMPLATE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    r"|\p{Han}{1,HAN}"
    r"|[^\r\n\p{L}\p{N}]?[^\P{L}\p{Han}]+"
    r"|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)


# Patterns of well-known tokenizers that llama.cpp implements as named pre-tokenizers, so a tokenizer
# trained with them exports to GGUF with an exact tokenization match (model/gguf.py). They differ from
# ours only in the letters and digits alternatives: whole letter runs (Han included, so Chinese clauses
# stay one "word" and the trainer's table grows with the corpus) and digit groups of 3 (Llama 3) or 1
# (Qwen2).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
NAMED_PATTERNS = {"llama-bpe": LLAMA3_PATTERN, "qwen2": QWEN2_PATTERN}
LLAMA_CPP_PRE = {"llama-bpe": "llama-bpe", "qwen2": "qwen2"}  # our name -> tokenizer.ggml.pre
PATTERN_NAMES = ("llama-bpe", "qwen2", "z2all")
# The default of `z2all tokenizer train`, chosen by `z2all bench patterns` (docs/performance.md): on 33 MB of
# zh/en/code at vocab 32k, whole Han runs gave 11% more zh bytes/token than 4-character chunks (3% under a
# memory budget that forced pruning), en and code equal, at the same peak memory under the same budget,
# and llama.cpp tokenizes it identically. Chunking remains as `z2all` for corpora whose Chinese word table
# would not fit the budget without heavy pruning.
DEFAULT_PATTERN = "llama-bpe"


def named_pattern(name: str, han_chunk: int = DEFAULT_HAN_CHUNK) -> str:
    """The split regex called `name`: "z2all" (ours, Han runs chunked by `han_chunk`), "llama-bpe"
    (Llama 3's) or "qwen2" (Qwen2's)."""
    if name == "z2all":
        return split_pattern(han_chunk)
    if name not in NAMED_PATTERNS:
        raise ValueError(f"unknown split pattern {name!r}; choose from {', '.join(PATTERN_NAMES)}")
    return NAMED_PATTERNS[name]


def split_pattern(han_chunk: int = DEFAULT_HAN_CHUNK) -> str:
    """The split regex with Han runs chunked into at most `han_chunk` characters (a string both the
    `regex` module and Oniguruma, i.e. `tokenizers`, accept with identical results)."""
    if han_chunk < 1:
        raise ValueError(f"han_chunk must be >= 1, got {han_chunk}")
    return _PATTERN_TEMPLATE.replace("HAN", str(int(han_chunk)))


@lru_cache(maxsize=8)
def compile_pattern(pattern: str) -> regex.Pattern:
    return regex.compile(pattern)


def pretokenize(text: str, pattern: str | None = None) -> list[str]:
    """Cut `text` into the pieces BPE works inside (concatenating them gives `text` back)."""
    return compile_pattern(pattern or split_pattern()).findall(text)


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters: bytes that are printable
    Latin-1 map to themselves, the other 68 (controls, space, 0x7f-0xa0, soft hyphen) to U+0100 upwards in
    byte order. tokenizer.json stores byte-level tokens in this alphabet."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + n)
            n += 1
    return mapping


@lru_cache(maxsize=1)
def byte_order() -> tuple[int, ...]:
    """Byte values in token-id order: id i is byte `byte_order()[i]`. This is the code-point order of the
    mapped characters (the order HF's BpeTrainer assigns its initial alphabet and GPT-2's vocabulary uses:
    '!' is id 0, byte 0x00 is id 188), which makes our tie-breaking on ids match HF's (see bpe.py)."""
    m = bytes_to_unicode()
    return tuple(sorted(range(256), key=lambda b: m[b]))


@lru_cache(maxsize=1)
def byte_to_id() -> tuple[int, ...]:
    """Inverse of `byte_order`: `byte_to_id()[b]` is the token id of byte value b."""
    inv = [0] * 256
    for i, b in enumerate(byte_order()):
        inv[b] = i
    return tuple(inv)


def token_str(data: bytes) -> str:
    """The tokenizer.json spelling of a byte string (each byte through `bytes_to_unicode`). One C-level
    translate (the byte -> character dict is a translate table on latin-1 characters): a vocabulary's 8k
    tokens + 16k merge halves took 80 ms as a per-byte join."""
    return data.decode("latin-1").translate(bytes_to_unicode())
