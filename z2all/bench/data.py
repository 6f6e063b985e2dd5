"""`z2all bench data`: conversion MB/s and peak RSS against a bare orjson loop, and tokenization tokens/s.

    z2all bench data                       # 1 GB input (a few minutes on 2 cores)
    z2all bench data --size-mb 200         # quicker
    z2all bench data --corpora DIR         # any dir of *.jsonl.gz with {"title", "text"} lines

Builds a wikipedia_zh-format jsonl ({id, title, text}) of --size-mb from real prose (../shared/corpora
next to the repository when present, else the embedded demo corpus; code_* files are left out because
code is never cleaned and would flatter the converter), repeating documents with varying
ids and a copy number appended to the text (so exact dedup keeps them: an honest write load). Then, each
run in a fresh process (bench.run_isolated) so peak RSS is the run's own:
  - bare: orjson.loads + orjson.dumps + write of every line: the floor any converter pays;
  - ours: `z2all data convert` on the same file, cleaning and dedup on, --workers 1 (so MB/s is per core),
    at the full size and at a quarter of it (peak RSS must not grow with the input), and the quarter
    with --clean.clean false (dedup and filters still on) to split the cost between cleaning and the rest;
  - near-dedup (optional, --near-dedup): the same quarter-size run with MinHash on, to put a number on it;
  - tokenize: a --tokenize-mb conversion through `z2all data tokenize --workers 2` with a byte-level BPE
    trained here on a sample (tokenizers, --vocab-size).
Prints one markdown table with the machine named. Numbers on shared machines are noisy.
"""

from __future__ import annotations

import gzip
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import orjson

from z2all.bench import machine_name, markdown_table, run_isolated
from z2all.config import opt
from z2all.utils import UserError, print0

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Config:
    size_mb: float = opt(1024.0, "size of the generated jsonl input in MB")
    corpora: str = opt("", "directory of *.jsonl(.gz) files with title/text fields "
                           "(default: ../shared/corpora next to the repo, else z2all/data/demo)")
    work_dir: str = opt("", "scratch directory (default: a temporary one, removed afterwards)")
    vocab_size: int = opt(8192, "vocabulary of the BPE trained for the tokenize row")
    tokenize_mb: float = opt(16.0, "MB of converted text for the tokenize row (HF BPE encodes at ~0.5-2 MB/s "
                                   "per core on long documents)")
    tokenize_workers: int = opt(2, "worker processes for the tokenize row")
    near_dedup: bool = opt(False, "also time the quarter-size conversion with MinHash near-dedup")


def _source_texts(corpora: str) -> list[dict]:
    candidates = [Path(corpora)] if corpora else [REPO.parent / "shared" / "corpora", REPO / "z2all" / "data" / "demo"]
    for d in candidates:
        files = sorted(d.glob("*.jsonl.gz")) + sorted(d.glob("*.jsonl")) if d.is_dir() else []
        files = [f for f in files if not f.name.startswith("code")]  # code is never cleaned: it would flatter us
        docs = []
        for f in files:
            opener = gzip.open if f.suffix == ".gz" else open
            with opener(f, "rb") as fh:
                for line in fh:
                    r = orjson.loads(line)
                    if r.get("text"):
                        docs.append({"title": r.get("title", ""), "text": r["text"]})
        if docs:
            return docs
    raise UserError(f"no *.jsonl(.gz) documents with a 'text' field found in {', '.join(map(str, candidates))}; "
                    f"give --corpora")


def build_input(docs: list[dict], path: Path, size_bytes: int) -> int:
    """Write wikipedia_zh-format lines until size_bytes; returns the number of lines."""
    n = 0
    written = 0
    with open(path, "wb") as f:
        while written < size_bytes:
            copy, i = divmod(n, len(docs))
            d = docs[i]
            text = d["text"] if copy == 0 else f"{d['text']}\n\n({copy})"
            line = orjson.dumps({"id": str(n), "title": d["title"], "text": text}) + b"\n"
            f.write(line)
            written += len(line)
            n += 1
    return n


def bare_loop(src: str, dst: str) -> int:
    """The floor: parse and re-serialise every line, nothing else."""
    n = 0
    loads, dumps = orjson.loads, orjson.dumps
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        for line in fi:
            fo.write(dumps(loads(line)) + b"\n")
            n += 1
    return n


def ours(src: str, out: str, near_dedup: bool = False, clean: bool = True) -> int:
    from z2all.data import convert

    cfg = convert.Config(inputs=[f"wikipedia_zh={src}"], out=out, workers=1)
    cfg.clean.near_dedup = near_dedup
    cfg.clean.clean = clean
    convert.run(cfg)
    return sum(s["documents"] for s in _state(out)["sources"].values())


def _state(out: str) -> dict:
    return orjson.loads((Path(out) / ".convert_state.json").read_bytes())


def tokenize_run(shards: str, tok: str, out: str, workers: int) -> int:
    import json

    from z2all.data import tokenize

    tokenize.run(tokenize.Config(shards=shards, tokenizer=tok, out=out, workers=workers))
    meta = json.loads((Path(out) / "meta.json").read_text())
    return meta["train_tokens"] + meta["val_tokens"]


def train_bpe(docs: list[dict], out: Path, vocab_size: int) -> Path:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # Han characters split one by one: with GPT-2's pattern alone a run of Han text is one "word" and HF's
    # BPE slows to ~80 k tokens/s on this corpus (the project's own tokenizer has a CJK-aware pattern)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("[\u3400-\u9fff]"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((d["text"] for d in docs[::3]), trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    return out


def run(cfg: Config) -> int:
    docs = _source_texts(cfg.corpora)
    work = Path(cfg.work_dir) if cfg.work_dir else Path(tempfile.mkdtemp(prefix="z2all-bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        size = int(cfg.size_mb * 2**20)
        big, small = work / "big.jsonl", work / "small.jsonl"
        build_input(docs, big, size)
        build_input(docs, small, size // 4)
        mb_big, mb_small = big.stat().st_size / 2**20, small.stat().st_size / 2**20
        print0(f"bench data: inputs {mb_big:.0f} MB and {mb_small:.0f} MB from {len(docs)} real documents")
        rows = []
        _, t_bare, rss_bare = run_isolated(bare_loop, str(big), str(work / "bare.jsonl"))
        (work / "bare.jsonl").unlink()
        rows.append(["bare orjson loads+dumps", f"{mb_big:.0f}", t_bare, mb_big / t_bare, 1.0, rss_bare / 2**20])
        for label, src, mb in (("ours: convert, clean+dedup, 1 worker", big, mb_big),
                               ("ours: same, 1/4 input", small, mb_small)):
            out = work / f"out-{src.stem}"
            _, t, rss = run_isolated(ours, str(src), str(out))
            rows.append([label, f"{mb:.0f}", t, mb / t, (mb / t) / (mb_big / t_bare), rss / 2**20])
            if src is big:
                shutil.rmtree(out)
        _, t, rss = run_isolated(ours, str(small), str(work / "out-noclean"), False, False)
        rows.append(["ours: same, 1/4 input, cleaning off", f"{mb_small:.0f}", t, mb_small / t,
                     (mb_small / t) / (mb_big / t_bare), rss / 2**20])
        if cfg.near_dedup:
            _, t, rss = run_isolated(ours, str(small), str(work / "out-near"), True)
            rows.append(["ours + MinHash near-dedup, 1/4 input", f"{mb_small:.0f}", t, mb_small / t,
                         (mb_small / t) / (mb_big / t_bare), rss / 2**20])
        tok = train_bpe(docs, work / "tok", cfg.vocab_size)
        tok_in = work / "tok.jsonl"
        build_input(docs, tok_in, int(cfg.tokenize_mb * 2**20))
        ours(str(tok_in), str(work / "out-tok"))
        ntok, t, rss = run_isolated(tokenize_run, str(work / "out-tok"), str(tok), str(work / "tokens"),
                                    cfg.tokenize_workers)
        table = markdown_table(["step", "input MB", "wall s", "MB/s", "vs bare", "peak RSS MB"], rows)
        tok_table = markdown_table(["tokenize (workers)", "tokens", "wall s", "tokens/s", "peak RSS MB (parent)"],
                                   [[f"BPE {cfg.vocab_size} ({cfg.tokenize_workers})", ntok, t, ntok / t,
                                     rss / 2**20]])
        print0(f"\nmachine: {machine_name()}\n\n{table}\n\n{tok_table}")
    finally:
        if not cfg.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0
