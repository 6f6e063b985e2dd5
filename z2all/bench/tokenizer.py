"""`z2all bench tokenizer`: training time, peak RSS and bytes/token of our trainer vs HF's BpeTrainer vs
sentencepiece (and rustbpe when installed), at the same vocabulary size on the same text, at three sizes;
plus our trainer under a memory budget that binds, and encode throughput of our transformers wrapper vs
raw `tokenizers`.

    z2all bench tokenizer                          # sizes 1,3,9 MB of ../shared/corpora, vocab 8192
    z2all bench tokenizer --sizes-mb 1,4 --vocab-size 4096

Text: documents of ../shared/corpora (the embedded demo corpus when that is absent) taken round-robin over
zh_*, en_*, code_* files until each size is reached; every 10th document is held out for bytes/token.
Every trainer runs in a fresh process (`bench.run_isolated`): "RSS" is that process's peak (VmHWM); our
trainer's counting workers are separate processes, reported as their peak each ("workers RSS"); the budget
check counts the parent plus every worker.
"""

from __future__ import annotations

import json
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from z2all.bench import machine_name, markdown_table, run_isolated
from z2all.config import opt
from z2all.tokenizer import bpe
from z2all.tokenizer.evaluate import DOMAINS, corpus_files, default_corpora, domain_of
from z2all.tokenizer.train import Config as TrainConfig
from z2all.tokenizer.train import read_texts, train_tokenizer
from z2all.utils import peak_rss_bytes, print0

MB = 2**20


@dataclass
class Config:
    sizes_mb: list[float] = opt(factory=lambda: [1.0, 3.0, 9.0], help="training text sizes in MB of characters")
    vocab_size: int = opt(8192, "vocabulary size for every trainer")
    corpora: str = opt("", "zh_*/en_*/code_* corpus directory (default ../shared/corpora, else the demo corpus)")
    workers: int = opt(2, "our counting workers and the other trainers' threads")
    bind_fraction: float = opt(0.25, "the binding run's word capacity as a fraction of the largest size's "
                               "distinct words")
    heldout_mb: float = opt(0.6, "held-out MB of characters for bytes/token (split over the domains)")
    backends: list[str] = opt(factory=lambda: ["z2all", "hf", "spm", "rustbpe"],
                              help="trainers to run (rustbpe only when installed)")


def _train_child(cfg_dict: dict) -> dict:
    """Runs in a fresh process: train, then report our own and our children's (workers') peak RSS."""
    s = train_tokenizer(TrainConfig(**cfg_dict))
    s["peak_rss"] = peak_rss_bytes()
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    s["workers_rss"] = kids.ru_maxrss * 1024
    s["cpu"] = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime  # all threads and workers
    return s


def _rustbpe_child(text_path: str, vocab_size: int, pattern: str) -> dict:
    import rustbpe  # optional; only when installed

    texts = [json.loads(line)["text"] for line in open(text_path, encoding="utf-8")]
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(texts), vocab_size, pattern=pattern)
    return {"peak_rss": peak_rss_bytes()}


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


def run(cfg: Config) -> int:
    corpora = Path(cfg.corpora) if cfg.corpora else default_corpora()
    train_docs, held = _split(_docs(corpora), int(cfg.heldout_mb * MB))
    total = sum(map(len, train_docs))
    print0(f"# z2all bench tokenizer\n\nmachine: {machine_name()}\ncorpora: {corpora} ({total / MB:.1f} MB of "
           f"training text available; {sum(map(len, held)) / MB:.2f} MB held out); vocab {cfg.vocab_size}; "
           f"{cfg.workers} workers/threads\n")
    try:
        import rustbpe  # noqa: F401

        have_rustbpe = True
    except ImportError:
        have_rustbpe = False
    tmp = Path(tempfile.mkdtemp(prefix="z2all-bench-tok-"))
    rows = []
    results: dict[tuple[float, str], dict] = {}
    largest_unique = 0
    for size_mb in cfg.sizes_mb:
        want = int(size_mb * MB)
        text_path = tmp / f"train-{size_mb:g}MB.jsonl"
        n = 0
        with open(text_path, "w", encoding="utf-8") as f:
            for t in train_docs:
                t = t[: want - n]
                f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
                n += len(t)
                if n >= want:
                    break
        label = f"{n / MB:.1f} MB"
        for backend in cfg.backends:
            if backend == "rustbpe":
                if not have_rustbpe:
                    continue
                from z2all.tokenizer.pretokenize import split_pattern

                try:
                    r, wall, _ = run_isolated(_rustbpe_child, str(text_path), cfg.vocab_size, split_pattern())
                    rows.append([label, "rustbpe", round(wall, 2), "-", round(r["peak_rss"] / MB), "-", "-",
                                 "not converted: no bytes/token"])
                except RuntimeError as e:
                    rows.append([label, "rustbpe", "failed", "-", "-", "-", "-", str(e)[:60]])
                continue
            out = tmp / f"tok-{size_mb:g}-{backend}"
            tc = dict(inputs=[str(text_path)], out_dir=str(out), backend=backend, vocab_size=cfg.vocab_size,
                      workers=cfg.workers)
            try:
                s, wall, _ = run_isolated(_train_child, tc)
            except RuntimeError as e:
                rows.append([label, backend, "failed", "-", "-", "-", "-", str(e)[:60]])
                continue
            rss = s["peak_rss"]
            bpt = _bytes_per_token(out, held)
            results[(size_mb, backend)] = {"bpt": bpt, "wall": wall, "rss": rss, "dir": out, "cpu": s["cpu"]}
            note = ""
            if backend == "z2all":
                c = s["counting"]
                largest_unique = max(largest_unique, c["unique_kept"])
                note = f"{c['unique_kept']:,} words, count {s['count_seconds']:.1f}s + merge {s['merge_seconds']:.1f}s"
            rows.append([label, backend, round(wall, 2), round(s["cpu"], 2), round(rss / MB),
                         round(s["workers_rss"] / MB) if backend == "z2all" else "-", round(bpt, 4), note])
        hf_r, z_r = results.get((size_mb, "hf")), results.get((size_mb, "z2all"))
        if hf_r and z_r:
            rows.append([label, "ours / hf", round(z_r["wall"] / hf_r["wall"], 2), round(z_r["cpu"] / hf_r["cpu"], 2),
                         round(z_r["rss"] / hf_r["rss"], 2), "-", round(z_r["bpt"] / hf_r["bpt"], 4), "ratios"])
    # ours again on the largest size, with a budget that binds
    if "z2all" in cfg.backends and largest_unique:
        size_mb = cfg.sizes_mb[-1]
        cap = max(bpe.MIN_WORDS, int(largest_unique * cfg.bind_fraction))
        budget = bpe.BASE_BYTES + cfg.workers * bpe.WORKER_BYTES + cap * bpe.BYTES_PER_WORD
        out = tmp / "tok-bound"
        tc = dict(inputs=[str(tmp / f"train-{size_mb:g}MB.jsonl")], out_dir=str(out), backend="z2all",
                  vocab_size=cfg.vocab_size, workers=cfg.workers, memory_budget=str(budget))
        s, wall, _ = run_isolated(_train_child, tc)
        rss = s["peak_rss"]
        bpt = _bytes_per_token(out, held)
        c = s["counting"]
        free = results[(size_mb, "z2all")]
        rows.append([f"{size_mb:g} MB", f"z2all, budget {budget / MB:.0f} MB", round(wall, 2), round(s["cpu"], 2),
                     round(rss / MB),
                     round(s["workers_rss"] / MB), round(bpt, 4),
                     f"budget {'kept' if rss + s['workers_rss'] * cfg.workers <= budget else 'EXCEEDED'}; "
                     f"cap {cap:,} words: {c['prunes']} prunes, error bound {c['error_bound']}; bytes/token "
                     f"{(bpt / free['bpt'] - 1) * 100:+.2f}% vs unbounded"])
    print0(markdown_table(["text", "trainer", "wall s", "CPU s", "RSS MB", "workers RSS MB", "bytes/token", "notes"],
                          rows))
    # encode throughput of the wrapper vs raw tokenizers, on our largest tokenizer
    z = [v for (sz, b), v in results.items() if b == "z2all"]
    if z:
        raw_mbs, wrap_mbs = _encode_throughput(z[-1]["dir"], held)
        print0("\n" + markdown_table(["encoder", "MB/s", "vs raw"], [
            ["tokenizers.Tokenizer.encode_batch (raw)", round(raw_mbs, 2), 1.0],
            ["Z2allTokenizer (transformers) __call__", round(wrap_mbs, 2), round(wrap_mbs / raw_mbs, 3)]]))
    shutil.rmtree(tmp, ignore_errors=True)
    print0("\nwall s includes process start; CPU s = user+sys of the process, its threads and its workers (less "
           "sensitive to other jobs on a shared machine than wall time). RSS = peak of the training process.")
    return 0
