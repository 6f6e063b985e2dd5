"""`z2all tokenizer train`: train a byte-level BPE tokenizer in bounded memory and write a tokenizer directory.

    z2all tokenizer train data/shards --out-dir runs/tok --vocab-size 32000 --memory-budget 2GB
    z2all tokenizer train corpus.txt,more/ --backend hf                # HF tokenizers' BpeTrainer
    z2all tokenizer train corpus.txt --backend spm                     # sentencepiece BPE, byte_fallback

Inputs are streamed (never loaded whole) by z2all/data/readers.py: .txt (~1 M-character blocks, the
text as written but for the file's final newlines), .jsonl / .json (lines or an array) and .parquet rows
(text columns only), each optionally .gz / .zst / .bz2; directories are searched recursively for those. A
unified record from `z2all data convert` becomes text through `record_text`; any other record gives its
`--text-field`, then "text", then "content". Bad JSON lines and records without text are skipped and counted.

Backends write the same directory (see hf.py): `z2all` (ours, bpe.py: parallel lossy word counting under
`--memory-budget`, then the incremental merge loop), `hf` (tokenizers.BpeTrainer with the same split
pattern and byte-level alphabet), `spm` (sentencepiece BPE with byte_fallback, converted to a
tokenizer.json with a Metaspace pre-tokenizer; no split pattern).

`vocab_size` is the total including the special tokens, rounded up to a multiple of 64; if the corpus runs
out of pairs first, `<|reserved_N|>` tokens fill up to the next multiple of 64. Training is one pass and is
not resumable: a run either writes a complete directory (built in a temp dir and swapped in) or nothing
new. `--out-dir` is claimed through z2all.io: new, empty, an earlier `tokenizer train` output (owner file)
or an older z2all's tokenizer directory; anything else, or a directory holding an input, is refused.
Corpora that cannot make a tokenizer (empty, whitespace only, too small for spm's --vocab-size) are
UserErrors that say what to change; sentencepiece's own errors never escape as tracebacks. So are
--special-tokens that cannot get an id of their own: empty or whitespace-only ones, and names the vocabulary
already has (a byte token, a spm byte piece, or a token learned from the corpus). Invalid UTF-8 is read as
U+FFFD, not refused: the count is printed and recorded under summary.read in z2all_tokenizer.json.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import io
import re
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from z2all.config import opt, save_config
from z2all.data import readers
from z2all.data.schema import FIELDS, record_text
from z2all.data.shards import MANIFEST, find_shards
from z2all.io import MANIFEST_FILE, OWNER_FILE, atomic_dir, atomic_write_bytes, claimed_output_dir, inside
from z2all.tokenizer import bpe, hf
from z2all.tokenizer.pretokenize import (
    DEFAULT_HAN_CHUNK,
    DEFAULT_PATTERN,
    PATTERN_NAMES,
    bytes_to_unicode,
    named_pattern,
    pretokenize,
)
from z2all.utils import UserError, human_bytes, print0, progress


@dataclass
class Config:
    inputs: list[str] = opt(factory=list, help="text inputs: files or directories (comma separated), .txt/.jsonl/"
                            ".parquet, optionally .gz/.zst/.bz2", positional=True)
    out_dir: str = opt("runs/tokenizer", "where the tokenizer directory is written")
    backend: str = opt("z2all", "trainer: z2all (ours), hf (tokenizers BpeTrainer), spm (sentencepiece BPE)",
                       choices=("z2all", "hf", "spm"))
    vocab_size: int = opt(32000, "total vocabulary including special tokens; rounded up to a multiple of 64")
    memory_budget: str = opt("2GB", "z2all backend: RAM for counting and merging, e.g. 2GB, 512MB; the word "
                             "table is pruned (lossy counting) to fit")
    workers: int = opt(0, "z2all backend: word-counting processes (0 = all cores)")
    pattern: str = opt(DEFAULT_PATTERN, "split pattern: llama-bpe (Llama 3's: whole letter and Han runs, digits "
                       "in 3s), qwen2 (Qwen2's: single digits) or z2all (Han runs cut into pieces of at most "
                       "--han-chunk characters); llama-bpe and qwen2 export to llama.cpp (GGUF) with identical "
                       "tokenization. `z2all bench patterns` compares them", choices=PATTERN_NAMES)
    han_chunk: int = opt(DEFAULT_HAN_CHUNK, "with --pattern z2all: Han runs are cut into pieces of at most this many "
                         "characters (see pretokenize.py)")
    min_frequency: int = opt(2, "a pair must occur at least this often to be merged (z2all and hf)")
    special_tokens: list[str] = opt(factory=list, help="extra special tokens after <|endoftext|>, <|im_start|>, "
                                    "<|im_end|>, <|pad|>")
    text_field: str = opt("text", "jsonl/parquet field with the text when the record is not a unified record")
    max_chars: int = opt(0, "stop reading after this many characters of text (0 = read everything)")
    model_max_length: int = opt(4096, "model_max_length written to tokenizer_config.json")

    def check(self) -> None:
        """Settings that cannot work, as UserErrors saying what to change (checked when training starts)."""
        specials = hf.special_tokens(self.special_tokens)
        need = 256 + len(specials) + 1
        if self.vocab_size < need:
            raise UserError(f"--vocab-size {self.vocab_size} is too small: 256 byte tokens + {len(specials)} special "
                            f"tokens + at least one merge need {need}; use --vocab-size {_round64(need)} or more")
        if self.han_chunk < 1:
            raise UserError(f"--han-chunk must be >= 1 (got {self.han_chunk})")
        if self.workers < 0:
            raise UserError(f"--workers must be >= 0 (0 = all cores), got {self.workers}")
        parse_bytes(self.memory_budget)
        for t in self.special_tokens:
            _check_special(t, self.backend)


# sentencepiece's vocabulary always holds <unk> and the 256 byte-fallback pieces <0x00>..<0xFF>
_SPM_FIXED = re.compile(r"<unk>|<0x[0-9A-F]{2}>")


def _check_special(t: str, backend: str) -> None:
    """A --special-tokens entry that cannot work whatever the corpus, as a UserError (before any reading)."""
    if not t.strip():
        # an empty one used to be dropped without a word (hf.special_tokens), a whitespace one was kept and then
        # matched the spaces of any text encoded with specials on (chat templates)
        raise UserError(f"--special-tokens {t!r}: a special token must have visible characters (an empty or "
                        "whitespace-only one would match the spaces of ordinary text); give names like <|tool|>, "
                        "comma separated, with no empty items")
    # a special token is an added token named `t` in tokenizer.json, whose names share one namespace with the
    # vocabulary's: these names are in every vocabulary of the backend, so the special could never get an id
    if backend in ("z2all", "hf") and len(t) == 1 and t in bytes_to_unicode().values():
        raise UserError(f"--special-tokens {t!r}: a single character of the byte-level alphabet is the name of one "
                        f"of the 256 byte tokens every {backend} vocabulary has; use a name like <|{t}|> instead")
    if backend == "spm" and _SPM_FIXED.fullmatch(t):
        raise UserError(f"--special-tokens {t!r} is the name of a piece every spm vocabulary has (<unk> and the "
                        f"byte pieces <0x00>..<0xFF>); use another name, like <|tool|>")


def _learned_special_error(cfg: Config, t: str) -> UserError:
    """The trained vocabulary already has an ordinary token named `t` (a merge or piece this backend learned
    from the corpus), so `t` cannot also be a special token: say why and what to change, for this backend."""
    head = (f"--special-tokens {t!r}: the {cfg.backend} backend learned an ordinary token of that name from this "
            f"corpus, and a special token cannot share a name with a vocabulary entry")
    pattern = named_pattern(cfg.pattern, cfg.han_chunk)
    if cfg.backend == "spm":
        # spm learns from whole lines (no split pattern), so any string frequent in the text (any character of
        # it, even) can become a piece; the byte-level backends never merge across the pieces the split pattern
        # cuts, so a name the pattern cuts can never be one of their tokens
        fix = "remove it from the corpus, " if len(t) > 1 else ""
        if len(pretokenize(t, pattern)) > 1:
            return UserError(f"{head}; {fix}leave it out of --special-tokens, or use --backend z2all or hf, whose "
                             f"split pattern keeps it from becoming one token")
        return UserError(f"{head}; {fix}leave it out of --special-tokens, or use a name like <|{t}|> with --backend "
                         f"z2all or hf, whose split pattern keeps such a name from becoming one token")
    return UserError(f"{head}; leave it out of --special-tokens, or use a name that --pattern {cfg.pattern} cuts "
                     f"into pieces, like <|{t}|> (the built-in specials are named so for that reason)")


def _round64(n: int) -> int:
    return -(-n // 64) * 64


def parse_bytes(text: str | int) -> int:
    """'2GB', '512MB', '1.5g', '1000000' -> bytes (binary units: 1 GB = 2**30)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", str(text).lower())
    if not m:
        raise UserError(f"--memory-budget {text!r}: write a size like 2GB, 512MB or 1500000000")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


# ------------------------------------------------------------------ streaming input (through data/readers.py)

@dataclass
class ReadStats:
    files: int = 0
    docs: int = 0
    chars: int = 0
    bad_lines: int = 0
    no_text: int = 0
    blank_docs: int = 0
    utf8_replaced: int = 0  # invalid UTF-8 sequences read as U+FFFD
    utf8_files: int = 0  # files holding them
    utf8_first: str = ""  # the first such file
    first_bad: str = ""


def input_format(path: Path) -> str | None:
    """The reader format of a file name (readers.FORMATS), or None when it is not a known text input."""
    try:
        return readers.detect_format(path)
    except UserError:
        return None


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files named directly (any name; unknown kinds read as text) plus the known kinds under directories."""
    if not inputs:
        raise UserError("no inputs given: pass text files or directories, e.g. `z2all tokenizer train data/`")
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir() and _is_converted(p):
            # a `z2all data convert` output: its shards once each, not the --txt copies or the JSON metadata
            files.extend(find_shards(p))
        elif p.is_dir():
            found = [f for f in readers.expand_inputs(p) if input_format(f)]
            if not found:
                raise UserError(f"{p}: no .txt/.jsonl/.json/.parquet files (optionally .gz/.zst/.bz2) in this "
                                "directory; point at the files or the directory that holds them")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"{p}: no such file or directory; check the input path")
    return files


def _is_converted(d: Path) -> bool:
    """A converted corpus root (convert.json) or one of its source directories (manifest.json)."""
    return (d / "convert.json").is_file() or (d / MANIFEST).is_file()


def _is_unified(keys) -> bool:
    """Whether a record's keys (or a parquet file's columns) are those of `z2all data convert` output."""
    return "content" in keys and "data_src" in keys and all(k in FIELDS for k in keys)


def _text_keys(text_field: str) -> tuple[str, ...]:
    """Where the text of any other record is looked for, in order."""
    return tuple(dict.fromkeys((text_field, "text", "content")))


def _record_to_text(rec, text_field: str) -> str | None:
    if not isinstance(rec, dict):
        return None
    if _is_unified(rec):
        return record_text(rec)
    for key in _text_keys(text_field):
        v = rec.get(key)
        if isinstance(v, str):
            return v
    return None


def _parquet_columns(path: Path, text_field: str) -> list[str] | None:
    """The columns `_record_to_text` can read from a parquet file, so a wide file (embeddings, metadata)
    is not decoded whole: a unified record's text fields, else the candidate text columns present (all of
    them: a row whose first candidate is null falls back to the next, as for json). None = read every
    column (an unreadable file: the reader reports it; no candidate: every row counts as having no text)."""
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except Exception:  # pyarrow.ArrowInvalid and friends: InputReader names the damage
        return None
    if _is_unified(names):
        return [n for n in ("data_src", "category", "title", "desc", "content") if n in names]
    return [k for k in _text_keys(text_field) if k in names] or None


def read_texts(path: Path, text_field: str = "text", stats: ReadStats | None = None) -> Iterator[str]:
    """The documents of one file, streamed by `readers.InputReader`: a jsonl/json record's text (see
    `_record_to_text`), a parquet row's (only its text columns are read), or ~1 M-character blocks of a
    txt file (txt_mode "file": blank lines and CRLF kept, blocks cut at line ends and concatenating back to
    the file but for its final newlines; a file of no known format reads as txt).
    Bad JSON lines and records without text are skipped and counted in `stats`; a damaged file is a
    UserError."""
    stats = stats if stats is not None else ReadStats()
    fmt = input_format(path) or "txt"
    columns = _parquet_columns(path, text_field) if fmt == "parquet" else None
    reader = readers.InputReader(path, fmt, columns=columns, txt_mode="file")
    utf8_before = readers.utf8_errors()
    try:
        # txt items are 1 M-character blocks and arrays are decoded dicts: a few per batch bound the memory
        for first, items in reader.batches(batch_bytes=1 << 20, batch_items=4 if reader.fmt == "txt" else 256):
            for i, item in enumerate(items):
                if reader.kind == "lines":
                    try:  # invalid UTF-8 inside an otherwise good line is replaced (and counted)
                        item, _ = readers.parse_json_line(item)
                    except readers.BadLine as e:
                        if e.reason != "blank line":
                            stats.bad_lines += 1
                            stats.first_bad = stats.first_bad or reader.where(first + i)
                        continue
                text = _record_to_text(item, text_field)
                if text is None:
                    stats.no_text += 1
                    stats.first_bad = stats.first_bad or f"{reader.where(first + i)} (no '{text_field}' field)"
                    continue
                yield text
    except readers.MalformedJSON as e:  # a broken JSON array: the items before it were read
        stats.bad_lines += 1
        stats.first_bad = stats.first_bad or f"{path}: {e}"
    except readers.ReadError as e:
        raise UserError(f"{e} (tokenizer input: repair the file or its permissions, or leave it out)") from None
    finally:
        replaced = readers.utf8_errors() - utf8_before
        if replaced:
            stats.utf8_replaced += replaced
            stats.utf8_files += 1
            stats.utf8_first = stats.utf8_first or str(path)


def iter_texts(files: list[Path], text_field: str = "text", stats: ReadStats | None = None,
               max_chars: int = 0) -> Iterator[str]:
    """Every document (or txt block) of `files`, in order, streamed; counts go into `stats`."""
    stats = stats if stats is not None else ReadStats()
    for path in files:
        stats.files += 1
        for text in read_texts(path, text_field, stats):
            if not text:
                continue
            if max_chars and stats.chars + len(text) > max_chars:
                text = text[: max_chars - stats.chars]
            stats.docs += 1
            stats.chars += len(text)
            stats.blank_docs += text.isspace()
            yield text
            if max_chars and stats.chars >= max_chars:
                return


# ------------------------------------------------------------------ backends

def _drain(counts: dict[str, int]):
    """(utf-8 word, count) pairs, emptying the table as the trainer copies it (word order does not matter:
    ties break on token ids), so its key strings are freed while the trainer's words are built."""
    while counts:
        w, c = counts.popitem()
        yield w.encode("utf-8"), c


def _z2all_capacity(cfg: Config) -> tuple[int, int, int]:
    """(budget bytes, workers, word capacity) of the z2all backend, or a UserError when the budget is too
    small (checked before the output directory is claimed)."""
    budget = parse_bytes(cfg.memory_budget)
    workers = cfg.workers or bpe.default_workers()
    capacity = bpe.capacity_for_budget(budget, workers)
    min_cap = bpe.MIN_WORDS
    if capacity < min_cap:
        need = bpe.BASE_BYTES + workers * bpe.WORKER_BYTES + min_cap * bpe.BYTES_PER_WORD
        raise UserError(f"--memory-budget {cfg.memory_budget} is too small: with {workers} worker(s) it leaves room "
                        f"for {capacity} words, and the byte alphabet plus a usable word table need {min_cap}; use "
                        f"--memory-budget {human_bytes(need).replace(' ', '')} or more (or fewer --workers)")
    return budget, workers, capacity


def _train_z2all(cfg: Config, texts, pattern: str, vocab_target: int, summary: dict):
    budget, workers, capacity = _z2all_capacity(cfg)
    bar = progress(desc="counting words", unit="word", unit_scale=True)
    t0 = time.perf_counter()
    counts, cstats = bpe.count_words(texts, pattern, capacity, workers, progress=bar.update)
    bar.close()
    t_count = time.perf_counter() - t0
    if cstats.docs == 0:
        return None
    bar = progress(total=max(0, vocab_target - 256), desc="merging", unit="tok")
    result = bpe.train(_drain(counts), vocab_target, cfg.min_frequency, progress=bar.update)
    bar.close()
    summary.update(count_seconds=round(t_count, 3), merge_seconds=round(time.perf_counter() - t0 - t_count, 3),
                   counting=dataclasses.asdict(cstats), budget_bytes=budget, merges=len(result.merges))
    return hf.tokenizer_from_bpe(result.vocab, result.merges, pattern)


def train_hf(cfg: Config, texts, pattern: str, vocab_target: int, summary: dict):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = hf.byte_level_parts(pattern)
    trainer = trainers.BpeTrainer(vocab_size=vocab_target, min_frequency=cfg.min_frequency, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    seen = [0]

    def counted():
        for t in texts:
            seen[0] += 1
            yield t

    tok.train_from_iterator(counted(), trainer)
    return tok if seen[0] else None


def _spm_error(cfg: Config, msg: str) -> UserError:
    """sentencepiece's RuntimeError (a C++ check that failed) as a UserError saying what to change."""
    m = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg)
    if m:  # spm needs every character covering 99.95% of the text in the vocabulary
        return UserError(f"--vocab-size {cfg.vocab_size} is too small for the spm backend: this corpus needs "
                         f"{m.group(2)} single characters; use --vocab-size {_round64(int(m.group(2)) + 600)} or more")
    m = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg)
    if m:
        most = (int(m.group(2)) + len(hf.special_tokens(cfg.special_tokens))) // 64 * 64
        need = _round64(256 + len(hf.special_tokens(cfg.special_tokens)) + 1)
        fix = (f"use --vocab-size {most} or less, or give more text" if most >= need else
               "give more text (or use --backend z2all or hf, which pad a small vocabulary with reserved tokens)")
        return UserError(f"--vocab-size {cfg.vocab_size} is too large for this corpus with the spm backend: "
                         f"sentencepiece can make only {m.group(2)} pieces from it; {fix}")
    first = re.sub(r"^[A-Z_]+: \S+\(\d+\) ", "", msg.strip().splitlines()[0] if msg.strip() else "")
    return UserError(f"sentencepiece (--backend spm) failed on this corpus: {first[:200]}; check --vocab-size "
                     f"against the amount of text, or use --backend z2all")


def _train_spm(cfg: Config, texts, vocab_target: int, summary: dict):
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    seen, yielded = [0], [0]

    def lines():
        for t in texts:
            seen[0] += 1
            for line in t.split("\n"):
                if line.strip():
                    yielded[0] += 1
                    yield line

    model = io.BytesIO()
    # byte_fallback keeps it lossless like byte-level BPE; identity normalisation and no dummy prefix keep
    # the text as is; spm's own limits (max_sentence_length 16 KB) skip longer lines
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines(), model_writer=model, model_type="bpe", vocab_size=vocab_target,
            byte_fallback=True, character_coverage=0.9995, split_digits=True, add_dummy_prefix=False,
            remove_extra_whitespaces=False, normalization_rule_name="identity", max_sentence_length=16384,
            allow_whitespace_only_pieces=True,
            num_threads=max(1, cfg.workers or bpe.default_workers()), minloglevel=2, unk_id=0, bos_id=-1,
            eos_id=-1, pad_id=-1)
    except RuntimeError as e:
        if not seen[0] or not yielded[0]:
            return None  # no text, or only blank lines: the caller says which
        raise _spm_error(cfg, str(e)) from None
    if not seen[0]:
        return None
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    vocab = {p: i for i, p in enumerate(pieces)}
    # sentencepiece's BPE encoder repeatedly joins the adjacent pair whose concatenation is the best-scored
    # piece (pieces are listed best first). The same rule as ranked merges: every split (a, b) of a piece
    # into two pieces is a merge, ranked by the piece's id, then by the ids of a and b.
    merges = []
    for i, p in enumerate(pieces):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or len(p) < 2:
            continue
        for k in range(1, len(p)):
            a, b = vocab.get(p[:k]), vocab.get(p[k:])
            if a is not None and b is not None:
                merges.append((i, a, b, pieces[a], pieces[b]))
    merges.sort()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for _, _, _, a, b in merges], unk_token=pieces[0],
                               byte_fallback=True, fuse_unk=True))
    # split=False: a whole line is one BPE word, so whitespace-only pieces ("▁▁▁▁") can form as in spm
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    summary["spm_pieces"] = len(pieces)
    summary["spm_model"] = model.getvalue()  # written next to tokenizer.json as spm.model
    return tok


TRAIN_COMMAND = "tokenizer train"
OUR_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", hf.CLASS_FILE.name,
             hf.PROVENANCE, "spm.model"}


def _legacy_tokenizer_dir(d: Path) -> bool:
    """A tokenizer directory an older z2all wrote (before owner files): our two files plus our class file or
    provenance, and nothing that is not ours (so replacing it removes nothing a user put there)."""
    names = {e.name for e in d.iterdir()}
    return ({"tokenizer.json", "tokenizer_config.json"} <= names and bool(names & {hf.CLASS_FILE.name, hf.PROVENANCE})
            and names - {MANIFEST_FILE} <= OUR_FILES)


def train_tokenizer(cfg: Config) -> dict:
    """Train and write `cfg.out_dir`; returns a summary dict (also stored in the provenance file).
    The directory is claimed first (new, empty, an earlier `tokenizer train` output, or an older z2all's
    tokenizer directory; never one holding an input) and built in a temp dir swapped in at the end, so it
    is either the old directory or the complete new one."""
    cfg.check()
    files = expand_inputs(cfg.inputs)
    if cfg.backend == "z2all":
        _z2all_capacity(cfg)
    specials = hf.special_tokens(cfg.special_tokens)
    total = _round64(cfg.vocab_size)
    vocab_target = total - len(specials)
    pattern = named_pattern(cfg.pattern, cfg.han_chunk)
    out = Path(cfg.out_dir)
    for item in cfg.inputs:  # the output inside an input directory would be read back as input next time
        if Path(item).is_dir() and inside(out, item):
            raise UserError(f"--out-dir {out} lies inside the input directory {item}; a later run would read the "
                            f"tokenizer files as text. Choose an --out-dir outside the inputs")
    with claimed_output_dir(out, TRAIN_COMMAND, option="--out-dir", protect=files, legacy=_legacy_tokenizer_dir):
        return _train_into(cfg, out, files, specials, vocab_target, pattern)


def _train_into(cfg: Config, out: Path, files: list[Path], specials: list[str], vocab_target: int,
                pattern: str) -> dict:
    rstats = ReadStats()
    texts = iter_texts(files, cfg.text_field, rstats, cfg.max_chars)
    summary: dict = {"backend": cfg.backend, "pattern_name": cfg.pattern, "pattern": pattern}
    t0 = time.perf_counter()
    if cfg.backend == "z2all":
        tok = _train_z2all(cfg, texts, pattern, vocab_target, summary)
    elif cfg.backend == "hf":
        tok = train_hf(cfg, texts, pattern, vocab_target, summary)
    else:
        summary["pattern"] = summary["pattern_name"] = None
        tok = _train_spm(cfg, texts, vocab_target, summary)
    seconds = time.perf_counter() - t0
    if rstats.docs and rstats.blank_docs == rstats.docs:
        raise UserError(f"only whitespace in {', '.join(cfg.inputs)} ({rstats.chars} characters): nothing to learn "
                        "a vocabulary from; give files with text in them")
    if tok is None or rstats.docs == 0:
        hint = ""
        if rstats.no_text:
            hint = f" ({rstats.no_text} records had no '{cfg.text_field}' field; set --text-field)"
        elif rstats.bad_lines:
            hint = f" ({rstats.bad_lines} lines were not valid JSON, first: {rstats.first_bad})"
        raise UserError(f"no text found in {', '.join(cfg.inputs)}{hint}: give files with text in them")
    # the names no corpus can avoid were refused by cfg.check(); what is left was learned from this corpus
    for t in specials:
        if tok.token_to_id(t) is not None:
            raise _learned_special_error(cfg, t)
    info = hf.add_specials(tok, specials, pad_to=64)
    summary.update(seconds=round(seconds, 3), read=dataclasses.asdict(rstats), vocab=info,
                   requested_vocab_size=cfg.vocab_size)
    spm_model = summary.pop("spm_model", None)
    # versions from package metadata: importing transformers here would pull in torch (~300 MB of RSS)
    versions = {"python": sys.version.split()[0]}
    for pkg in ("tokenizers", "transformers", "sentencepiece", "regex"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    with atomic_dir(out, "--out-dir", OUR_FILES) as tmp:
        shutil.copy2(out / OWNER_FILE, tmp / OWNER_FILE)
        hf.save_dir(tok, tmp, specials, cfg.model_max_length)
        if spm_model is not None:
            atomic_write_bytes(tmp / "spm.model", spm_model)
        save_config(cfg, tmp / hf.PROVENANCE, summary=summary, inputs=[str(f) for f in files], versions=versions)
    return summary


def run(cfg: Config) -> int:
    s = train_tokenizer(cfg)
    r = s["read"]
    print0(f"tokenizer ({s['backend']}) -> {cfg.out_dir}: vocab {s['vocab']['vocab_size']} "
           f"(base {s['vocab']['base_vocab']}, specials {len(s['vocab']['specials'])}, reserved "
           f"{s['vocab']['reserved']}) from {r['docs']:,} docs / {r['chars']:,} chars in {s['seconds']:.1f}s")
    if r["bad_lines"] or r["no_text"]:
        print0(f"  skipped {r['bad_lines']} bad JSON lines and {r['no_text']} records without text "
               f"(first: {r['first_bad']})")
    if r["utf8_replaced"]:  # not an error (as in `data convert`), but the vocabulary learned U+FFFD from them
        where = r["utf8_first"] if r["utf8_files"] == 1 else f"{r['utf8_files']} files (first: {r['utf8_first']})"
        print0(f"  note: {r['utf8_replaced']:,} invalid UTF-8 sequence(s) in {where} were read as U+FFFD and "
               f"trained on; re-encode the input as UTF-8 if it is in another encoding", file=sys.stderr)
    if s["vocab"]["vocab_size"] < _round64(cfg.vocab_size):
        print0(f"  note: the corpus ran out of pairs to merge ({s['vocab']['base_vocab']} base tokens): the vocabulary "
               f"is {s['vocab']['vocab_size']}, not the --vocab-size {_round64(cfg.vocab_size)} asked for; give more "
               f"text or a smaller --vocab-size", file=sys.stderr)
    if "counting" in s:
        c = s["counting"]
        print0(f"  counting {s['count_seconds']:.1f}s with {c['workers']} worker(s): {c['words_total']:,} words, "
               f"{c['unique_kept']:,} distinct kept (capacity {c['capacity']:,} under {cfg.memory_budget}); "
               f"{c['prunes']} prunes, error bound {c['error_bound']} (max undercount of any word); "
               f"merging {s['merge_seconds']:.1f}s")
    return 0
