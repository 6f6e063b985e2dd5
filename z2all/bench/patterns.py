"""`z2all bench patterns`: which split pattern should `z2all tokenizer train` use by default? Trains our
BPE once per pattern (ours with Han runs chunked, Llama 3's `llama-bpe`, Qwen2's `qwen2`; the last two
export to llama.cpp with identical tokenization) on the same text, vocabulary and `--memory-budget`, and
reports held-out bytes/token per domain (zh / en / code) and the peak memory of the trainer's process tree.

    z2all bench patterns                                  # all of ../shared/corpora, vocab 32768, 512MB budget
    z2all bench patterns --size-mb 8 --vocab-size 8192 --out runs/bench-patterns

Text and held-out split as in `bench tokenizer` (round-robin over the zh_*, en_*, code_* files, every 10th
document held out). Each trainer runs in a fresh spawned process whose whole tree (parent + counting
workers) is sampled for RSS and PSS (bench/tokenizer.py `_run_tree`); "train s" is the training call alone.
"words kept/capacity" and "prunes" show whether the memory budget bound: under a binding budget the word
table is pruned (lossy counting; "max undercount" bounds the error of any kept count) and bytes/token pays.
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

from z2all.bench import machine_name
from z2all.bench.tokenizer import MB, _bytes_per_token, _docs, _run_tree, _split, _train_child, _write_text
from z2all.config import opt, save_config
from z2all.io import atomic_write_text, claim_output_dir
from z2all.tokenizer.evaluate import DOMAINS, default_corpora
from z2all.tokenizer.pretokenize import PATTERN_NAMES
from z2all.utils import UserError, markdown_table, print0


@dataclass
class Config:
    size_mb: float = opt(0.0, "training text in MB of characters (0 = every document of the corpora)")
    vocab_size: int = opt(32768, "vocabulary size for every pattern")
    memory_budget: str = opt("512MB", "the same --memory-budget for every pattern")
    workers: int = opt(2, "counting workers")
    patterns: list[str] = opt(factory=lambda: list(PATTERN_NAMES), help="split patterns to compare")
    corpora: str = opt("", "zh_*/en_*/code_* corpus directory (default ../shared/corpora, else the demo corpus)")
    heldout_mb: float = opt(1.0, "held-out MB of characters for bytes/token (split over the domains)")
    out: str = opt("", "also write report.md and config.json to this directory")

    def validate(self) -> None:
        bad = [p for p in self.patterns if p not in PATTERN_NAMES]
        if bad or not self.patterns:
            raise UserError(f"--patterns: unknown {', '.join(bad) or '(none given)'}; choose from "
                            f"{', '.join(PATTERN_NAMES)}")
        if self.size_mb < 0 or self.heldout_mb <= 0:
            raise UserError("--size-mb must be >= 0 and --heldout-mb > 0")


def run(cfg: Config) -> int:
    cfg.validate()
    out = claim_output_dir(cfg.out, "bench patterns") if cfg.out else None
    corpora = Path(cfg.corpora) if cfg.corpora else default_corpora()
    train_docs, held = _split(_docs(corpora), int(cfg.heldout_mb * MB))
    held_by = _held_by_domain(corpora, cfg)
    rows, raw = [], []
    with tempfile.TemporaryDirectory(prefix="z2all-bench-patterns-") as tmp:
        text = Path(tmp) / "train.jsonl"
        chars = _write_text(text, train_docs, int(cfg.size_mb * MB) if cfg.size_mb else 1 << 62)
        print0(f"bench patterns: {chars / MB:.1f} M characters of {corpora}, vocab {cfg.vocab_size}, "
               f"budget {cfg.memory_budget}, {cfg.workers} workers; held-out {sum(map(len, held)) / MB:.2f} M chars")
        for name in cfg.patterns:
            tok_dir = Path(tmp) / f"tok-{name}"
            s, wall, rss, pss = _run_tree(_train_child, {
                "inputs": [str(text)], "out_dir": str(tok_dir), "backend": "z2all", "vocab_size": cfg.vocab_size,
                "memory_budget": cfg.memory_budget, "workers": cfg.workers, "pattern": name})
            bpt = {d: _bytes_per_token(tok_dir, held_by[d]) for d in DOMAINS}
            counting = s.get("counting", {})
            row = [name, f"{s['train_seconds']:.1f}", f"{rss / MB:.0f}", f"{pss / MB:.0f}",
                   *(f"{bpt[d]:.3f}" for d in DOMAINS), f"{statistics.fmean(bpt.values()):.3f}",
                   f"{counting.get('unique_kept', 0):,}/{counting.get('capacity', 0):,}",
                   f"{counting.get('prunes', 0)} (max undercount {counting.get('error_bound', 0)})"]
            rows.append(row)
            raw.append({"pattern": name, "train_seconds": s["train_seconds"], "process_seconds": wall,
                        "tree_rss": rss, "tree_pss": pss, "bytes_per_token": bpt, "counting": counting})
            print0(f"  {name}: {row}")
    table = markdown_table(["pattern", "train s", "tree RSS MB", "tree PSS MB",
                            *(f"{d} B/tok" for d in DOMAINS), "mean B/tok", "words kept/capacity", "prunes"],
                           rows)
    report = f"### z2all bench patterns ({machine_name()})\n\n{table}\n"
    print0("\n" + report)
    if out is not None:
        atomic_write_text(out / "report.md", report)
        save_config(cfg, out / "config.json", machine=machine_name(), raw=raw)
    return 0


def _held_by_domain(corpora: Path, cfg: Config) -> dict[str, list[str]]:
    """The held-out documents of each domain separately (same rule as `_split`: every 10th document)."""
    out = {}
    for d, files in _docs(corpora).items():
        _, held = _split({d: files, **{o: [] for o in DOMAINS if o != d}}, int(cfg.heldout_mb * MB))
        out[d] = held
    return out
