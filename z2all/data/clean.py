"""Text normalisation, document filters and the content hash that exact dedup keys on.

Prose cleaning (`Cleaner.clean_prose`), in order:
  1. CR/CRLF, NEL, U+2028/2029 -> "\\n"; tabs and exotic spaces (NBSP, U+3000, U+2000-200A ...) -> " ".
  2. drop control (Cc, except "\\n"), format (Cf, except ZWNJ/ZWJ which shape scripts and emoji),
     private-use (Co), surrogate (Cs) and unassigned (Cn) code points. Newlines stay: paragraphs matter.
  3. collapse runs of spaces inside a line to one, drop trailing spaces; leading indentation is kept
     (poems, reStructuredText and Markdown code blocks live in it).
  4. no space between two CJK characters ("中文 中文" -> "中文中文"); "Debian 的" keeps its space.
  5. 3+ newlines -> 2 (at most one blank line between paragraphs).
  6. a run of the same sentence punctuation (!?.,~。！？，、；…～) longer than `max_punct_run` is cut to
     `max_punct_run`; markup characters (= - * # _) are left alone, they draw reST/Markdown headings.
  7. optional NFKC (off by default: it turns Chinese full-width punctuation "，" into ",").
Code (`kind="code"`) is never cleaned: a single changed byte can change what a program means.

Two implementations of steps 1-6 and the final strip, chosen by `--clean.impl` (auto: C when built):
  - `Cleaner.clean_prose_py`, the reference: guarded `str` methods and precompiled regexes, each step a pass
    that most documents skip after a C-speed test (`in`, isascii, isprintable); never a per-character loop.
  - the C extension `z2all.data._cleanc` (_cleanc.c, built by `pip install -e .` through setup.py; optional:
    without a C compiler the install goes on and auto means python): all steps in one scan per document,
    4.6x the Python code's speed on mixed prose, 7.8x on Chinese (docs/performance.md). It takes its
    character classes (_SPACE_LIKE, _NEWLINE_LIKE, _KEEP_FORMAT, _PUNCT, _CJK_RANGES) from this module, and
    hands back to the Python code (returns None) a document that holds a format or unassigned character,
    whose fate `regex`'s \\p{C} decides. NFKC, when on, runs in Python on its output.
    tests/data/test_clean_c.py holds the two to the same output.

Filters: min/max length in characters, and the share of junk block characters (U+2580-259F, "▅█▂").

Exact dedup keys on `content_hash` (SHA-256 of the cleaned content, 64 bits kept). The hash set and
the MinHash near-duplicate keys live in dedup.py (numpy), which a convert worker imports only with
near-dedup on.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from hashlib import sha256 as _sha256

import regex

from z2all.config import opt

try:  # built by `pip install -e .` (setup.py); optional: without a C compiler the Python code does the work
    from z2all.data import _cleanc
except ImportError:
    _cleanc = None

IMPLS = ("auto", "c", "python")
C_MISSING = ("clean.impl=c: the C cleaner z2all.data._cleanc is not built; build it with `pip install -e .` "
             "(or `python setup.py build_ext --inplace`; needs a C compiler), or pass --clean.impl auto")


@dataclass
class CleanConfig:
    clean: bool = opt(True, "normalise prose text (code is never touched)")
    nfkc: bool = opt(False, "apply Unicode NFKC to prose (changes full-width CJK punctuation)")
    max_punct_run: int = opt(3, "cut runs of the same sentence punctuation to this many (0 = keep)")
    min_chars: int = opt(10, "drop documents whose cleaned content is shorter than this")
    max_chars: int = opt(2_000_000, "drop documents whose cleaned content is longer than this")
    max_junk_share: float = opt(0.2, "drop prose whose share of block characters (▅█▂) is above this")
    dedup: bool = opt(True, "drop documents whose cleaned content exactly repeats an earlier one")
    near_dedup: bool = opt(False, "also drop near duplicates (MinHash + LSH; several times slower)")
    minhash_perms: int = opt(128, "MinHash permutations (a multiple of minhash_bands)")
    minhash_bands: int = opt(16, "LSH bands: more bands catch less similar pairs")
    impl: str = opt("auto", "prose cleaner: c (one compiled scan, z2all/data/_cleanc.c), python (the reference, "
                            "5-8x slower), auto (c when built, else python); both give the same text",
                    choices=IMPLS)

    def validate(self) -> None:
        from z2all.utils import UserError

        if self.impl not in IMPLS:
            raise UserError(f"clean.impl must be one of {', '.join(IMPLS)} (got {self.impl!r})")
        if self.impl == "c" and _cleanc is None:
            raise UserError(C_MISSING)
        if self.min_chars < 0 or self.max_chars < self.min_chars:
            raise UserError(f"need 0 <= min_chars <= max_chars (got {self.min_chars}, {self.max_chars})")
        if self.near_dedup and (self.minhash_perms % self.minhash_bands or self.minhash_bands < 1):
            raise UserError(f"minhash_perms ({self.minhash_perms}) must be a multiple of minhash_bands "
                            f"({self.minhash_bands})")


# ---------------------------------------------------------------- patterns
# Measured on ../shared/corpora prose (2 shared cores, MB/s of UTF-8): a lookbehind-first pattern such as
# (?<=[CJK]) +(?=[CJK]) runs at ~13 MB/s because the engine tries every position; starting the pattern
# with the literal it must contain (" (?<=[CJK] ) *(?=[CJK])") lets the C fast search skip to candidates:
# ~45 MB/s (same trick for inner space runs). The drop class uses the `regex` module's \p{C}: the same
# class spelled as code-point ranges for `re` is ~0.5 MB/s.
# Each step is guarded by a C-speed test (`in`, isascii, isprintable) so most documents skip most steps.

_CJK_RANGES = ((0x2E80, 0x2FDF), (0x3001, 0x303F), (0x3040, 0x30FF), (0x3100, 0x312F), (0x31A0, 0x31FF),
               (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0xFF00, 0xFFEF), (0x20000, 0x3134F))
_CJK = "".join(f"{chr(lo)}-{chr(hi)}" for lo, hi in _CJK_RANGES)  # a regex character class body
_NEWLINE_LIKE = "\x85\u2028\u2029"
_SPACE_LIKE = "\t\x0b\x0c\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u202f\u205f\u3000"
_KEEP_FORMAT = "\u200c\u200d"  # ZWNJ, ZWJ: format characters that shape scripts and emoji
_DROP = regex.compile(r"[^\P{C}\n" + _KEEP_FORMAT + "]+")  # control, format, private, surrogate, unassigned
_INNER_SPACES = re.compile(r"  (?<=\S  ) *")  # 2+ spaces after a non-space: indentation is left alone
_CJK_SPACE = re.compile(f" (?<=[{_CJK}] ) *(?=[{_CJK}])")
_NEWLINES = re.compile("\n\n\n+")
_JUNK = re.compile("[\u2580-\u259f]+")
_ASCII_CONTROLS = bytes([*range(10), *range(11, 32), 127])
_PUNCT = "!?.,~。！？，、；…～"
_PUNCT_ASCII = "!?.,~"
if _cleanc is not None:  # the C scan takes its character classes from here
    _cleanc.init(_SPACE_LIKE, _NEWLINE_LIKE, _KEEP_FORMAT, _PUNCT, _CJK_RANGES)


class Cleaner:
    """Applies CleanConfig to one record at a time: (cleaned record, content hash) or a skip reason.

    Prose goes through the C scan when it is built and --clean.impl allows it, else through
    `clean_prose_py`, where every document pays a few C-speed guards and only documents that need a step
    pay for its rewrite. Where the time goes: docs/performance.md ("Cleaning")."""

    def __init__(self, cfg: CleanConfig):
        self.cfg = cfg
        n = cfg.max_punct_run
        if cfg.impl == "c" and _cleanc is None:
            from z2all.utils import UserError

            raise UserError(C_MISSING)
        self.c_clean = _cleanc.clean_prose if _cleanc is not None and cfg.impl != "python" else None
        self.c_run = min(max(n, 0), 2**31 - 1)  # the C int; a run can never be longer than 2**31 anyway
        self.punct = re.compile(f"([{re.escape(_PUNCT)}])\\1{{{n},}}") if cfg.clean and n > 0 else None
        self.punct_repl = "\\1" * n
        self.runs = [(c, c * (n + 1)) for c in _PUNCT]
        self.runs_ascii = [(c, c * (n + 1)) for c in _PUNCT_ASCII]

    def clean_prose(self, s: str) -> str:
        """Steps 1-7 of the module docstring: the C scan when built and chosen, else (and for the rare
        document it leaves to Python: a format or unassigned character) `clean_prose_py`."""
        if self.c_clean is not None:
            out = self.c_clean(s, self.c_run)
            if out is not None:  # NFKC leaves " " and "\n" alone: normalising the stripped text is the same
                return unicodedata.normalize("NFKC", out).strip() if self.cfg.nfkc else out
        return self.clean_prose_py(s)

    def clean_prose_py(self, s: str) -> str:
        """The reference: the same steps as guarded `str` methods and precompiled regexes."""
        if not s:
            return s
        if "\r" in s:
            s = s.replace("\r\n", "\n").replace("\r", "\n")
        ascii_ = s.isascii()
        if ascii_:  # only C0 controls and DEL can be wrong: a bytes.translate deletion is ~2x isprintable
            dirty = len(s.encode("ascii").translate(None, _ASCII_CONTROLS)) != len(s)
        else:  # isprintable is false for controls, format, private, unassigned, and spaces other than " "
            dirty = not s.replace("\n", "").isprintable()
        if dirty:  # rare: the full treatment. `in` + replace per character: ~2x a regex character class
            for c in _NEWLINE_LIKE:
                if c in s:
                    s = s.replace(c, "\n")
            for c in _SPACE_LIKE:
                if c in s:
                    s = s.replace(c, " ")
            if not s.replace("\n", "").isprintable():
                s = _DROP.sub("", s)
        if "  " in s and _INNER_SPACES.search(s):  # most double spaces are indentation: search is ~3x sub
            s = _INNER_SPACES.sub(" ", s)
        if " \n" in s:  # after the collapse a trailing run is one space: one C replace, ~6x re.sub(r" +\n")
            s = s.replace(" \n", "\n")
            if " \n" in s:  # indentation-only lines keep their runs
                s = "\n".join([x.rstrip(" ") for x in s.split("\n")])
        if not ascii_ and " " in s:
            s = _CJK_SPACE.sub("", s)
        if "\n\n\n" in s:  # the literal prefix makes this ~2x a str.replace loop on long runs
            s = _NEWLINES.sub("\n\n", s)
        if self.punct is not None:
            # `c in s` (memchr) first: a run is searched for only when its character occurs at all
            for c, run in self.runs_ascii if ascii_ else self.runs:
                if c in s and run in s:
                    s = self.punct.sub(self.punct_repl, s)
                    break
        if self.cfg.nfkc:
            s = unicodedata.normalize("NFKC", s)
        return s.strip()

    def __call__(self, record: dict, kind: str) -> tuple[dict, int] | str:
        """(cleaned record, content hash) or the reason the record is dropped."""
        cfg = self.cfg
        if kind != "code" and cfg.clean:
            record["content"] = self.clean_prose(record["content"])
            record["title"] = self.clean_prose(record["title"]).replace("\n", " ")
            record["desc"] = self.clean_prose(record["desc"])
        content = record["content"]
        n = len(content)
        if n < cfg.min_chars:
            return f"shorter than {cfg.min_chars} chars"
        if n > cfg.max_chars:
            return f"longer than {cfg.max_chars} chars"
        try:  # the default error handler takes CPython's fast path: ~2x "surrogatepass" on short texts
            data = content.encode()
        except UnicodeEncodeError:  # lone surrogates, only in code (prose cleaning drops them)
            data = content.encode("utf-8", "surrogatepass")
        # U+2580-25BF all encode as E2 96 xx: one byte search tells whether junk can be there at all
        if kind != "code" and cfg.max_junk_share < 1.0 and not content.isascii() and b"\xe2\x96" in data:
            junk = sum(map(len, _JUNK.findall(content)))
            if junk > cfg.max_junk_share * n:
                return f"junk block characters > {cfg.max_junk_share:.0%}"
        return record, content_hash(data)


def content_hash(data: bytes | str) -> int:
    """First 64 bits of the SHA-256 of the UTF-8 text (deterministic across processes, unlike hash()).
    SHA-256 runs on the CPU's SHA extensions: ~1.3 GB/s here against ~0.6 GB/s for blake2b."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    return int.from_bytes(_sha256(data).digest()[:8], "little")
