"""`z2all bench tokenizer`: training time, memory and bytes/token of our trainer vs HF's BpeTrainer vs
sentencepiece (and rustbpe when installed), at the same vocabulary size on the same text, at several sizes;
plus our trainer under a memory budget that binds, and encode throughput of our transformers wrapper vs
raw `tokenizers`.

    z2all bench tokenizer                          # sizes 1,3,9 MB of ../shared/corpora, vocab 8192, 3 repeats
    z2all bench tokenizer --sizes-mb 1,4 --vocab-size 4096 --repeats 5 --out runs/bench-tok

Text: documents of ../shared/corpora (the embedded demo corpus when that is absent) taken round-robin over
zh_*, en_*, code_* files until each size is reached; every 10th document is held out for bytes/token.

What is measured, per run (every trainer runs in a fresh spawned process, `_run_tree`):
- "train s": the child's clock around the training call alone (read the text, count, merge, write the
  tokenizer directory). It starts after the interpreter has started and the trainer's modules are imported.
- "process s": the parent's clock from spawning the child to receiving its result: interpreter start,
  imports, training, and the hand-back. The difference is fixed cost, the same for every trainer.
- "CPU s": user+sys during the training call, of the child, its threads and its (reaped) worker processes.
- memory: the parent samples the child's whole process tree (the child and every descendant, e.g. our
  forked counting workers) every 20 ms: "tree RSS" is the peak of the sum of their RSS (pages shared by a
  fork are counted once per process, so an upper bound), "tree PSS" the peak of the sum of their PSS
  (shared pages split between the sharers; sampled every 100 ms because reading it costs ~1 ms).
  A peak shorter than the sampling interval can be missed.
Repeats are interleaved: round r runs every trainer once, the starting trainer rotating from round to
round, so background load on a shared machine falls on all of them alike; times are reported as best and
median over the rounds, memory as the largest peak over them, bytes/token from the first round (training
is deterministic).

`--out DIR` also writes DIR/report.md (what was printed) and DIR/config.json (the resolved config, the
machine, package versions and every round's raw numbers); DIR must be new, empty or an earlier --out of
this command.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import resource
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from z2all.bench import machine_name, markdown_table
from z2all.config import opt, save_config
from z2all.tokenizer import bpe
from z2all.tokenizer.evaluate import DOMAINS, corpus_files, default_corpora, domain_of
from z2all.tokenizer.train import Config as TrainConfig
from z2all.tokenizer.train import read_texts, train_tokenizer
from z2all.utils import UserError, print0

MB = 2**20
SAMPLE_S = 0.02  # tree RSS sampling interval
PSS_EVERY = 5  # tree PSS every 5th sample


@dataclass
class Config:
    sizes_mb: list[float] = opt(factory=lambda: [1.0, 3.0, 9.0], help="training text sizes in MB of characters")
    vocab_size: int = opt(8192, "vocabulary size for every trainer")
    corpora: str = opt("", "zh_*/en_*/code_* corpus directory (default ../shared/corpora, else the demo corpus)")
    workers: int = opt(2, "our counting workers and the other trainers' threads")
    repeats: int = opt(3, "interleaved rounds per size (each runs every trainer once); best and median reported")
    bind_fraction: float = opt(0.25, "the binding run's word capacity as a fraction of the largest size's "
                               "distinct words")
    heldout_mb: float = opt(0.6, "held-out MB of characters for bytes/token (split over the domains)")
    backends: list[str] = opt(factory=lambda: ["z2all", "hf", "spm", "rustbpe"],
                              help="trainers to run (rustbpe only when installed)")
    out: str = opt("", "also write report.md and config.json (resolved config + raw numbers) to this directory")

    def validate(self) -> None:
        if self.repeats < 1:
            raise UserError(f"--repeats {self.repeats}: give at least 1")
        if not self.sizes_mb or any(s <= 0 for s in self.sizes_mb):
            raise UserError(f"--sizes-mb {self.sizes_mb}: give positive sizes, e.g. --sizes-mb 1,3,9")
        bad = [b for b in self.backends if b not in ("z2all", "hf", "spm", "rustbpe")]
        if bad:
            raise UserError(f"--backends: unknown {', '.join(bad)}; choose from z2all, hf, spm, rustbpe")


# ---------------------------------------------------------------- one trainer in a fresh process tree

_HAVE_CHILDREN_FILES = os.path.exists(f"/proc/self/task/{os.getpid()}/children")


def _tree(pid: int) -> list[int]:
    """`pid` and all its descendants, from /proc/<pid>/task/<tid>/children (cheap: psutil's
    children(recursive=True) scans every process on the machine, ~25 ms a call; it is the fallback for
    kernels built without those files)."""
    if not _HAVE_CHILDREN_FILES:
        import psutil

        try:
            return [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            return [pid]
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
        except OSError:  # exited meanwhile
            pass
    return out


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _tree_child(conn, fn, args):
    try:
        result, err = fn(*args), None
    except BaseException as e:  # report, do not hang the parent
        result, err = None, f"{type(e).__name__}: {e}"
    conn.send((result, err))
    conn.close()


def _run_tree(fn, *args) -> tuple[dict, float, int, int]:
    """Run `fn(*args)` (module-level, returns a dict) in a fresh spawned process while sampling its process
    tree; returns (result, process wall seconds, tree peak RSS bytes, tree peak PSS bytes)."""
    have_proc = os.path.exists(f"/proc/{os.getpid()}/task")
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_tree_child, args=(child, fn, args))
    t0 = time.perf_counter()
    proc.start()
    child.close()
    peak_rss = peak_pss = 0
    tick = 0
    while not parent.poll(SAMPLE_S):
        if not proc.is_alive() and not parent.poll(0.1):
            raise RuntimeError(f"{fn.__name__}: the child process died (exit code {proc.exitcode})")
        if have_proc:
            pids = _tree(proc.pid)
            peak_rss = max(peak_rss, sum(_rss(p) for p in pids))
            if tick % PSS_EVERY == 0:
                peak_pss = max(peak_pss, sum(_pss(p) for p in pids))
            tick += 1
    result, err = parent.recv()
    wall = time.perf_counter() - t0
    proc.join()
    if err:
        raise RuntimeError(f"{fn.__name__} failed in the child process: {err}")
    # a run shorter than one interval still has the child's own peak
    peak_rss = max(peak_rss, result.get("self_peak_rss", 0))
    return result, wall, peak_rss, peak_pss


def _cpu_seconds() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime  # all threads and reaped workers


def _train_child(cfg_dict: dict) -> dict:
    """Runs in the fresh process: import what the backend needs, then time the training call alone."""
    import tokenizers  # noqa: F401  (every backend writes tokenizer.json through it)

    if cfg_dict["backend"] == "spm":
        import sentencepiece  # noqa: F401
    from z2all.utils import peak_rss_bytes

    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    s = train_tokenizer(TrainConfig(**cfg_dict))
    s["train_seconds"] = time.perf_counter() - t0
    s["cpu"] = _cpu_seconds() - cpu0
    s["self_peak_rss"] = peak_rss_bytes()
    return s


def _rustbpe_child(text_path: str, vocab_size: int, pattern: str) -> dict:
    import rustbpe  # optional; only when installed

    from z2all.utils import peak_rss_bytes

    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    texts = [json.loads(line)["text"] for line in open(text_path, encoding="utf-8")]
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(texts), vocab_size, pattern=pattern)
    return {"train_seconds": time.perf_counter() - t0, "cpu": _cpu_seconds() - cpu0,
            "self_peak_rss": peak_rss_bytes()}


def _bytes_per_token(tok_dir: Path, held: list[str]) -> float:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    nt = sum(len(e.ids) for e in tok.encode_batch(held, add_special_tokens=False))
    return sum(len(t.encode("utf-8")) for t in held) / max(1, nt)


def _docs(corpora: Path) -> dict[str, list[list[str]]]:
    """domain -> one doc list per file."""
    out: dict[str, list[list[str]]] = {d: [] for d in DOMAINS}
    for f in corpus_files(corpora):
        out[domain_of(f)].append([t for t in read_texts(f) if t])
    return out


def _split(docs: dict[str, list[list[str]]], heldout_chars: int) -> tuple[list[str], list[str]]:
    """(training docs round-robin over every file, held-out docs: every 10th doc, capped per file)."""
    train, held = [], []
    streams = []
    for files in docs.values():
        cap = heldout_chars // len(DOMAINS) // max(1, len(files))
        for f in files:
            keep, n = [], 0
            for i, t in enumerate(f):
                if i % 10 != 9:
                    keep.append(t)
                elif n < cap:
                    held.append(t[: cap - n])
                    n += len(held[-1])
            streams.append(iter(keep))
    while streams:  # interleave the files so every size mixes zh, en and code
        alive = []
        for s in streams:
            t = next(s, None)
            if t is not None:
                train.append(t)
                alive.append(s)
        streams = alive
    return train, held


def _encode_throughput(tok_dir: Path, held: list[str]) -> tuple[float, float]:
    """(MB/s through raw tokenizers.encode_batch, MB/s through our transformers wrapper), best of 5
    alternating rounds (single rounds on 2 shared cores scatter by +-20%: the two use the same Rust threads)."""
    from tokenizers import Tokenizer

    from z2all.tokenizer import hf

    raw = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    raw.encode_special_tokens = True  # the wrapper's default policy, so both do the same work
    wrapped = hf.load(tok_dir, trust_remote_code=True)
    size = sum(len(t.encode("utf-8")) for t in held) / MB
    best_raw = best_wrap = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a = [e.ids for e in raw.encode_batch(held, add_special_tokens=False)]
        best_raw = min(best_raw, time.perf_counter() - t0)
        t0 = time.perf_counter()
        b = wrapped(held, verbose=False)["input_ids"]  # no "longer than model_max_length" warning: not a model input
        best_wrap = min(best_wrap, time.perf_counter() - t0)
    if a != b:
        raise RuntimeError("the wrapper and raw tokenizers disagree on the held-out text")
    return size / best_raw, size / best_wrap


def _write_text(path: Path, docs: list[str], want: int) -> int:
    """The first `want` characters of `docs` as jsonl; returns the characters written."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for t in docs:
            t = t[: want - n]
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
            n += len(t)
            if n >= want:
                break
    return n


def _versions() -> dict:
    import importlib.metadata

    out = {}
    for pkg in ("tokenizers", "sentencepiece", "transformers", "rustbpe"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


HEADERS = ["text", "trainer", "train s best", "train s median", "process s median", "CPU s median",
           "tree RSS MB", "tree PSS MB", "bytes/token", "notes"]


def _summary_row(label: str, name: str, runs: list[dict], bpt: float | None, note: str) -> tuple[list, dict]:
    agg = {"train_best": min(r["train_s"] for r in runs),
           "train_median": statistics.median(r["train_s"] for r in runs),
           "process_median": statistics.median(r["process_s"] for r in runs),
           "cpu_median": statistics.median(r["cpu_s"] for r in runs),
           "tree_rss": max(r["tree_rss"] for r in runs), "tree_pss": max(r["tree_pss"] for r in runs), "bpt": bpt}
    row = [label, name, round(agg["train_best"], 2), round(agg["train_median"], 2), round(agg["process_median"], 2),
           round(agg["cpu_median"], 2), round(agg["tree_rss"] / MB), round(agg["tree_pss"] / MB) or "-",
           "-" if bpt is None else round(bpt, 4), note]
    return row, agg


def run(cfg: Config) -> int:
    corpora = Path(cfg.corpora) if cfg.corpora else default_corpora()
    out_dir = None
    if cfg.out:  # claim it before the long run, not after
        from z2all.io import claim_output_dir

        out_dir = claim_output_dir(cfg.out, "bench tokenizer", protect=[corpora])
    train_docs, held = _split(_docs(corpora), int(cfg.heldout_mb * MB))
    total = sum(map(len, train_docs))
    lines: list[str] = []

    def emit(text: str) -> None:
        print0(text)
        lines.append(text)

    emit(f"# z2all bench tokenizer\n\nmachine: {machine_name()}\ncorpora: {corpora} ({total / MB:.1f} MB of "
         f"training text available; {sum(map(len, held)) / MB:.2f} MB held out); vocab {cfg.vocab_size}; "
         f"{cfg.workers} workers/threads; {cfg.repeats} interleaved rounds per size\n")
    backends = list(dict.fromkeys(cfg.backends))
    if "rustbpe" in backends:
        try:
            import rustbpe  # noqa: F401
        except ImportError:
            backends.remove("rustbpe")
            emit("rustbpe: not installed, skipped (pip install rustbpe to add its row)\n")
    tmp = Path(tempfile.mkdtemp(prefix="z2all-bench-tok-"))
    rows: list[list] = []
    rounds: list[dict] = []
    aggs: dict[tuple[float, str], dict] = {}
    largest_unique = 0
    enc_dir: Path | None = None
    labels: dict[float, str] = {}
    try:
        for size_mb in cfg.sizes_mb:
            text_path = tmp / f"train-{size_mb:g}MB.jsonl"
            n = _write_text(text_path, train_docs, int(size_mb * MB))
            label = labels[size_mb] = f"{n / MB:.1f} MB"
            runs: dict[str, list[dict]] = {b: [] for b in backends}
            bpt: dict[str, float] = {}
            notes: dict[str, str] = {}
            failed: dict[str, str] = {}
            for r in range(cfg.repeats):
                k = r % len(backends)
                for b in backends[k:] + backends[:k]:  # the starting trainer rotates round by round
                    if b in failed:
                        continue
                    out = tmp / f"tok-{size_mb:g}-{b}-{r}"
                    try:
                        if b == "rustbpe":
                            from z2all.tokenizer.pretokenize import split_pattern

                            s, wall, rss, pss = _run_tree(_rustbpe_child, str(text_path), cfg.vocab_size,
                                                          split_pattern())
                        else:
                            tc = dict(inputs=[str(text_path)], out_dir=str(out), backend=b,
                                      vocab_size=cfg.vocab_size, workers=cfg.workers)
                            s, wall, rss, pss = _run_tree(_train_child, tc)
                    except RuntimeError as e:
                        failed[b] = str(e)
                        continue
                    rec = {"size_mb": size_mb, "chars": n, "backend": b, "round": r, "train_s": s["train_seconds"],
                           "process_s": wall, "cpu_s": s["cpu"], "tree_rss": rss, "tree_pss": pss}
                    if b == "z2all":
                        c = s["counting"]
                        rec.update(unique_kept=c["unique_kept"], count_s=s["count_seconds"],
                                   merge_s=s["merge_seconds"])
                        largest_unique = max(largest_unique, c["unique_kept"])
                        notes.setdefault(b, f"{c['unique_kept']:,} words, count {s['count_seconds']:.1f}s + "
                                            f"merge {s['merge_seconds']:.1f}s")
                    if b != "rustbpe" and b not in bpt:  # deterministic: the first round's tokenizer serves
                        bpt[b] = _bytes_per_token(out, held)
                        rec["bytes_per_token"] = bpt[b]
                    if b == "z2all" and r == 0:
                        if enc_dir is not None:
                            shutil.rmtree(enc_dir, ignore_errors=True)
                        enc_dir = out  # the largest size's tokenizer, for the encode throughput
                    elif out.exists():
                        shutil.rmtree(out, ignore_errors=True)
                    runs[b].append(rec)
                    rounds.append(rec)
            for b in backends:
                if b in failed:
                    rows.append([label, b, "failed", "-", "-", "-", "-", "-", "-", failed[b][:80]])
                    continue
                note = notes.get(b, "not converted: no bytes/token" if b == "rustbpe" else "")
                row, aggs[(size_mb, b)] = _summary_row(label, b, runs[b], bpt.get(b), note)
                rows.append(row)
            z, h = aggs.get((size_mb, "z2all")), aggs.get((size_mb, "hf"))
            if z and h:
                keys = ("train_best", "train_median", "process_median", "cpu_median", "tree_rss", "tree_pss")
                rows.append([label, "ours / hf", *(round(z[k] / h[k], 2) if h[k] else "-" for k in keys),
                             round(z["bpt"] / h["bpt"], 4), "ratios"])
        # ours again on the largest size, with a budget that binds (one round: the point is memory)
        if "z2all" in backends and largest_unique:
            size_mb = cfg.sizes_mb[-1]
            cap = max(bpe.MIN_WORDS, int(largest_unique * cfg.bind_fraction))
            budget = bpe.BASE_BYTES + cfg.workers * bpe.WORKER_BYTES + cap * bpe.BYTES_PER_WORD
            out = tmp / "tok-bound"
            tc = dict(inputs=[str(tmp / f"train-{size_mb:g}MB.jsonl")], out_dir=str(out), backend="z2all",
                      vocab_size=cfg.vocab_size, workers=cfg.workers, memory_budget=str(budget))
            s, wall, rss, pss = _run_tree(_train_child, tc)
            b_bpt = _bytes_per_token(out, held)
            c = s["counting"]
            rec = {"size_mb": size_mb, "backend": "z2all", "budget": budget, "round": 0, "train_s": s["train_seconds"],
                   "process_s": wall, "cpu_s": s["cpu"], "tree_rss": rss, "tree_pss": pss, "bytes_per_token": b_bpt,
                   "prunes": c["prunes"], "error_bound": c["error_bound"]}
            rounds.append(rec)
            kept = ("kept" if rss <= budget else
                    "kept by PSS (the RSS sum counts forked pages twice)" if pss and pss <= budget else "EXCEEDED")
            free = aggs[(size_mb, "z2all")]["bpt"]
            row, _ = _summary_row(labels[size_mb], f"z2all, budget {budget / MB:.0f} MB (1 round)", [rec], b_bpt,
                                  f"budget {kept}; cap {cap:,} words: {c['prunes']} prunes, error bound "
                                  f"{c['error_bound']}; bytes/token {(b_bpt / free - 1) * 100:+.2f}% vs unbounded")
            rows.append(row)
        emit(markdown_table(HEADERS, rows))
        # encode throughput of the wrapper vs raw tokenizers, on our largest tokenizer
        if enc_dir is not None:
            raw_mbs, wrap_mbs = _encode_throughput(enc_dir, held)
            emit("\n" + markdown_table(["encoder", "MB/s", "vs raw"], [
                ["tokenizers.Tokenizer.encode_batch (raw)", round(raw_mbs, 2), 1.0],
                ["Z2allTokenizer (transformers) __call__", round(wrap_mbs, 2), round(wrap_mbs / raw_mbs, 3)]]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    emit(f"\ntrain s: the child process's clock around the training call only (read the text, count, merge, "
         f"write the tokenizer directory), started after interpreter start-up and imports; process s: the "
         f"parent's clock from spawning that process to its result, start-up and imports included. Best and "
         f"median over {cfg.repeats} interleaved rounds (the first trainer rotates). CPU s: user+sys during "
         f"the training call, of the process, its threads and its workers (less sensitive to other jobs on a "
         f"shared machine than wall time). Tree RSS / PSS: the largest peak over the rounds of the sum over "
         f"the trainer's whole process tree (ours: the parent and its {cfg.workers} counting workers), sampled "
         f"every {SAMPLE_S * 1000:.0f} / {SAMPLE_S * PSS_EVERY * 1000:.0f} ms; RSS counts pages a fork shares "
         f"once per process (an upper bound), PSS splits them between the sharers.")
    if out_dir is not None:
        from z2all.io import atomic_write_text

        atomic_write_text(out_dir / "report.md", "\n".join(lines) + "\n")
        save_config(cfg, out_dir / "config.json", command="z2all bench tokenizer", machine=machine_name(),
                    corpora=str(corpora), versions=_versions(), table={"headers": HEADERS, "rows": rows},
                    rounds=rounds)
        print0(f"\nwrote {out_dir / 'report.md'} and {out_dir / 'config.json'}")
    return 0
