"""`z2all bench data`: conversion MB/s and peak RSS against a plain stdlib converter and a bare orjson loop,
and tokenization throughput of our pipeline against raw `tokenizers` and tiktoken.

    z2all bench data                       # 1 GB input (a few minutes on 2 cores)
    z2all bench data --size-mb 32 --repeats 3     # quicker; best of 3, rows interleaved
    z2all bench data --corpora DIR         # any dir of *.jsonl.gz with {"title", "text"} lines

    z2all bench data --size-mb 96 --zh --repeats 3  # the issue's case: Chinese prose only

Builds a wikipedia_zh-format jsonl ({id, title, text}) of --size-mb from real prose (../shared/corpora
next to the repository when present, else the embedded demo corpus; code_* files are left out because
code is never cleaned and would flatter the converter; --zh keeps only the zh_* files; documents shuffled
with a fixed seed so that any size mixes every corpus), repeating documents with varying
ids and a copy number appended to the text (so exact dedup keeps them: an honest write load). Then, each
run in a fresh process (bench.run_isolated) so peak RSS is the run's own (its clock starts after the
imports of this module, the converter's and tqdm's, for every row alike), every row --repeats times in
turn (interleaved, best wall kept: the machine's noise hits every row alike). Each row prints its wall
time and its CPU time: user + system seconds of the run's process and every process it started and waited
for (the --workers processes), so on a busy machine the CPU columns still compare; "vs stdlib" is the
throughput ratio to the peer by wall time, "CPU vs stdlib" the same by CPU time:
  - stdlib (the peer, the "vs stdlib" column's 1.0): a plain stdlib converter (what the original
    llm-zero2all scripts and most first scripts do), json.loads -> unified record ->
    json.dumps(ensure_ascii=False) -> write, no cleaning, no dedup;
  - bare: orjson.loads + orjson.dumps + write of every line: the floor any converter pays;
  - ours: `z2all data convert` on the same file, cleaning and dedup on, --workers 1 (so MB/s is per core;
    --clean.impl auto: the compiled cleaner when it is built); the same with --clean.impl python (the
    reference cleaner, a row only when the C one is built) and with --clean.clean false (dedup and filters
    still on) to split the cost between cleaning and the rest; at a quarter of the size (peak RSS must
    not grow with the input); and with --workers N (scaling: its wall-time ratio to --workers 1 is printed
    under the table);
  - near-dedup (optional, --near-dedup): the same quarter-size run with MinHash on, to put a number on it;
  - tokenize: a --tokenize-mb conversion encoded with a BPE trained here by `z2all tokenizer train`
    (--vocab-size): `z2all data tokenize --workers N` end to end, and the peers on the same texts in one
    process, one thread: raw `tokenizers` encode_batch, and tiktoken when the tokenizer converts exactly
    (tokenizer/tiktoken_compat.py).
Prints the tables with the machine named. Numbers on shared machines are noisy: compare ratios.
"""

from __future__ import annotations

import gzip
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import orjson
import tqdm  # noqa: F401  progress() imports it lazily (~15 ms); here it stays out of the timed calls

from z2all.bench import machine_name, markdown_table, run_isolated
from z2all.config import opt
from z2all.data import clean, convert, tokenize  # imported here, outside the timed calls of the child processes
from z2all.io import claim_output_dir
from z2all.utils import UserError, print0

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Config:
    size_mb: float = opt(1024.0, "size of the generated jsonl input in MB")
    corpora: str = opt("", "directory of *.jsonl(.gz) files with title/text fields "
                           "(default: ../shared/corpora next to the repo, else z2all/data/demo)")
    zh: bool = opt(False, "build the input from the zh_* corpus files only (Chinese prose)")
    work_dir: str = opt("", "scratch directory, kept afterwards: new, empty or an earlier `bench data` one (default: "
                            "a temporary one, removed afterwards)")
    vocab_size: int = opt(8192, "vocabulary of the BPE trained (z2all tokenizer train) for the tokenize rows")
    tokenize_mb: float = opt(16.0, "MB of converted text for the tokenize rows (tokenizers encodes ~1 MB/s per "
                                   "core on this text, tiktoken ~5x that)")
    tokenize_workers: int = opt(2, "worker processes for the tokenize row")
    near_dedup: bool = opt(False, "also time the quarter-size conversion with MinHash near-dedup")
    repeats: int = opt(1, "run every row this many times, interleaved, and keep the best wall time")
    workers: int = opt(2, "worker processes of the scaling row (convert --workers N; 1 = no scaling row)")

    def validate(self) -> None:
        if self.size_mb <= 0 or self.tokenize_mb <= 0 or self.repeats < 1 or self.workers < 1:
            raise UserError("size_mb and tokenize_mb must be > 0, repeats and workers >= 1")


def _source_texts(corpora: str, zh: bool = False) -> list[dict]:
    candidates = [Path(corpora)] if corpora else [REPO.parent / "shared" / "corpora", REPO / "z2all" / "data" / "demo"]
    for d in candidates:
        files = sorted(d.glob("*.jsonl.gz")) + sorted(d.glob("*.jsonl")) if d.is_dir() else []
        files = [f for f in files if not f.name.startswith("code")]  # code is never cleaned: it would flatter us
        if zh:
            files = [f for f in files if f.name.startswith("zh")]
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


def seed_convert(src: str, dst: str) -> int:
    """The peer: a plain stdlib converter, what a first script does (json.loads -> the unified record
    -> json.dumps(ensure_ascii=False) -> write), no cleaning, no dedup, one process."""
    import json

    n = 0
    with open(src, encoding="utf-8") as fi, open(dst, "w", encoding="utf-8") as fo:
        for line in fi:
            raw = json.loads(line)
            rec = {"gid": n, "id": n, "data_src": "wikipedia_zh", "category": "wikipedia_zh",
                   "title": raw.get("title", ""), "content": raw["text"], "desc": "",
                   "others": {k: v for k, v in raw.items() if k not in ("title", "text")}}
            fo.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n


def ours(src: str, out: str, near_dedup: bool = False, clean: bool = True, workers: int = 1,
         impl: str = "auto") -> int:
    cfg = convert.Config(inputs=[f"wikipedia_zh={src}"], out=out, workers=workers)
    cfg.clean.near_dedup = near_dedup
    cfg.clean.clean = clean
    cfg.clean.impl = impl
    convert.run(cfg)
    return sum(s["documents"] for s in _state(out)["sources"].values())


def tree_cpu() -> float:
    """User + system CPU seconds of this process and of every child process it has waited for."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def measured(fn, *args):
    """(fn(*args), CPU seconds it took, its worker processes included: the pipeline joins its pool)."""
    before = tree_cpu()
    result = fn(*args)
    return result, tree_cpu() - before


def _spin(n: int) -> float:
    """A fixed pure-Python CPU load (no memory traffic); returns its wall seconds."""
    import time

    t0 = time.perf_counter()
    x = 0
    for i in range(n):
        x ^= i
    return time.perf_counter() - t0


def process_ceiling(workers: int, n: int = 5_000_000) -> float:
    """How much faster this machine runs `workers` copies of one CPU load at once than one copy after
    another: the most --workers N can gain here (2.0 on two free cores; less on a busy machine or on
    vCPUs that share a physical core). Best of 3 of each."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers) as pool:
        pool.map(_spin, [1] * workers)  # started and warm before timing
        one = min(_spin(n) for _ in range(3))
        many = min(max(pool.map(_spin, [n] * workers, chunksize=1)) for _ in range(3))
    return workers * one / many


def _state(out: str) -> dict:
    return orjson.loads((Path(out) / ".convert_state.json").read_bytes())


def tokenize_run(shards: str, tok: str, out: str, workers: int) -> int:
    shutil.rmtree(out, ignore_errors=True)  # best of N: every repeat starts from nothing
    tokenize.run(tokenize.Config(shards=shards, tokenizer=tok, out=out, workers=workers))
    meta = orjson.loads((Path(out) / "meta.json").read_bytes())
    return meta["train_tokens"] + meta["val_tokens"]


def shard_texts(shards: str) -> list[str]:
    """The training texts of a conversion, as data tokenize builds them."""
    from z2all.data.schema import record_text

    texts = []
    for f in sorted(Path(shards).glob("*/part-*.jsonl")):
        with open(f, "rb") as fh:
            texts += [record_text(orjson.loads(line)) for line in fh]
    return texts


def encode_peer(shards: str, tok: str, kind: str) -> tuple[int, float]:
    """(tokens, encode seconds) of `kind` (tokenizers | tiktoken) on the conversion's texts, one thread, in
    batches of 256 texts (reading the texts is not timed)."""
    import os
    import time

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # per core, like one data tokenize worker
    from z2all.tokenizer.tiktoken_compat import make_encoder

    texts = shard_texts(shards)
    encode = make_encoder(tok, kind)
    t0 = time.perf_counter()
    n = 0
    for i in range(0, len(texts), 256):
        n += sum(map(len, encode(texts[i: i + 256])))
    return n + len(texts), time.perf_counter() - t0  # + one eos per document, as data tokenize writes


def train_bpe(shards: Path, out: Path, vocab_size: int) -> Path:
    """`z2all tokenizer train` (our backend) on the conversion, as a user would make it."""
    from z2all.tokenizer.train import Config as TrainConfig
    from z2all.tokenizer.train import train_tokenizer

    train_tokenizer(TrainConfig(inputs=[str(shards)], out_dir=str(out), vocab_size=vocab_size, workers=1))
    return out


def _best(runs: dict, key: str, value) -> None:
    """Keep the run with the least wall time (value = (result, wall, rss))."""
    if key not in runs or value[1] < runs[key][1]:
        runs[key] = value


def run(cfg: Config) -> int:
    cfg.validate()
    docs = _source_texts(cfg.corpora, cfg.zh)
    random.Random(0).shuffle(docs)  # files come one after another: a small input would hold only the first
    if cfg.work_dir:  # a user's directory: only a new, empty or earlier `bench data` one is written to
        work = claim_output_dir(cfg.work_dir, "bench data", option="--work-dir", protect=[cfg.corpora])
    else:
        work = Path(tempfile.mkdtemp(prefix="z2all-bench-data-"))
    try:
        size = int(cfg.size_mb * 2**20)
        big, small = work / "big.jsonl", work / "small.jsonl"
        build_input(docs, big, size)
        build_input(docs, small, size // 4)
        mb_big, mb_small = big.stat().st_size / 2**20, small.stat().st_size / 2**20
        print0(f"bench data: inputs {mb_big:.0f} MB and {mb_small:.0f} MB from {len(docs)} real "
               f"{'Chinese ' if cfg.zh else ''}documents, best of {cfg.repeats}")
        c_built = clean._cleanc is not None
        rows_spec = [  # (label, input, MB, fn, args)
            ("stdlib converter (json, no cleaning)", big, mb_big, seed_convert,
             (str(big), str(work / "seed.jsonl"))),
            ("bare orjson loads+dumps", big, mb_big, bare_loop, (str(big), str(work / "bare.jsonl"))),
            ("ours: convert, cleaning off (dedup on), 1 worker", big, mb_big, ours,
             (str(big), str(work / "out-noclean"), False, False)),
            ("ours: convert, clean+dedup, 1 worker", big, mb_big, ours, (str(big), str(work / "out-big"))),
            *([("ours: convert, clean+dedup (python cleaner), 1 worker", big, mb_big, ours,  # the two cleaners
                (str(big), str(work / "out-py"), False, True, 1, "python"))] if c_built else []),
            ("ours: same, 1/4 input", small, mb_small, ours, (str(small), str(work / "out-small"))),
        ]
        if cfg.workers > 1:
            rows_spec.append((f"ours: convert, clean+dedup, {cfg.workers} workers", big, mb_big, ours,
                              (str(big), str(work / "out-workers"), False, True, cfg.workers)))
        if cfg.near_dedup:
            rows_spec.append(("ours + MinHash near-dedup, 1/4 input", small, mb_small, ours,
                              (str(small), str(work / "out-near"), True)))
        runs: dict = {}
        for _ in range(cfg.repeats):
            for label, _src, _mb, fn, args in rows_spec:
                if fn is ours:
                    shutil.rmtree(args[1], ignore_errors=True)  # a finished output would rerun in no time
                (res, cpu), wall, rss = run_isolated(measured, fn, *args)
                _best(runs, label, ((res, cpu), wall, rss))
        for f in ("seed.jsonl", "bare.jsonl"):
            (work / f).unlink(missing_ok=True)
        (_, c_seed), t_seed, _ = runs[rows_spec[0][0]]
        rows = []
        for label, _src, mb, _fn, _args in rows_spec:
            (_, c), t, rss = runs[label]
            rows.append([label, f"{mb:.0f}", t, c, mb / t, (mb / t) / (mb_big / t_seed), (mb / c) / (mb_big / c_seed),
                         rss / 2**20])
        scaling = ""
        if cfg.workers > 1:
            (_, c1), t1, _ = runs["ours: convert, clean+dedup, 1 worker"]
            (_, cn), tn, _ = runs[f"ours: convert, clean+dedup, {cfg.workers} workers"]
            ceiling = process_ceiling(cfg.workers)
            scaling = (f"\n--workers {cfg.workers} vs --workers 1 (clean+dedup, {mb_big:.0f} MB): {t1 / tn:.2f}x by "
                       f"wall time; CPU of all processes {cn:.2f} s vs {c1:.2f} s ({cn / c1:.2f}x the work). This "
                       f"machine right now runs {cfg.workers} copies of a pure-Python loop {ceiling:.2f}x as fast as "
                       f"one after another: the ceiling for any --workers {cfg.workers}")
        shutil.rmtree(work / "out-big", ignore_errors=True)
        shutil.rmtree(work / "out-py", ignore_errors=True)
        cleaner = ("cleaner (--clean.impl auto): C, z2all.data._cleanc" if c_built else
                   "cleaner (--clean.impl auto): python (the C extension z2all.data._cleanc is not built)")

        tok_in = work / "tok.jsonl"
        build_input(docs, tok_in, int(cfg.tokenize_mb * 2**20))
        shards = work / "out-tok"
        shutil.rmtree(shards, ignore_errors=True)  # an earlier run's (its tok.jsonl was just rewritten)
        ours(str(tok_in), str(shards))
        tok = train_bpe(shards, work / "tok", cfg.vocab_size)
        from z2all.tokenizer.tiktoken_compat import to_tiktoken

        _, why = to_tiktoken(tok)
        text_mb = sum(len(t.encode()) for t in shard_texts(str(shards))) / 2**20
        kinds = ["tokenizers"] + ([] if why else ["tiktoken"])
        truns: dict = {}
        for _ in range(cfg.repeats):
            _best(truns, "ours", run_isolated(tokenize_run, str(shards), str(tok), str(work / "tokens"),
                                              cfg.tokenize_workers))
            for kind in kinds:
                (ntok, t_enc), wall, rss = run_isolated(encode_peer, str(shards), str(tok), kind)
                _best(truns, kind, ((ntok, t_enc), t_enc, rss))
        ntok, t, rss = truns["ours"]
        tok_rows = [[f"ours: data tokenize --workers {cfg.tokenize_workers} (end to end)", ntok, t, ntok / t,
                     text_mb / t, rss / 2**20]]
        for kind in kinds:
            (n, _), t, rss = truns[kind]
            tok_rows.append([f"{kind} encode, 1 process, 1 thread (encoding only)", n, t, n / t, text_mb / t,
                             rss / 2**20])
        table = markdown_table(["step", "input MB", "wall s", "CPU s", "MB/s", "vs stdlib", "CPU vs stdlib",
                                "peak RSS MB (main process)"], rows)
        tok_table = markdown_table([f"tokenize {text_mb:.1f} MB, BPE {cfg.vocab_size} (z2all tokenizer train)",
                                    "tokens", "wall s", "tokens/s", "MB/s", "peak RSS MB"], tok_rows)
        note = f"\ntiktoken: not used, the tokenizer does not convert exactly ({why})" if why else ""
        print0(f"\nmachine: {machine_name()}\n{cleaner}\n\n{table}{scaling}\n\n{tok_table}{note}")
    finally:
        if not cfg.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0
