"""`z2all demo` (also `make demo`): the whole pipeline on the embedded demo corpus, on CPU, in minutes.

    z2all demo                                  # everything under runs/demo/, ~5-10 min on 2 cores
    z2all demo --out_dir /tmp/d --max_steps 24 --batch_size 8 --vocab_size 1024   # a CI-sized run

Stages (each is the real command's `run(Config)`; they meet only through the artifacts on disk):
  1. data convert     z2all/data/demo/{zh_wiki.jsonl.gz, en_wiki.parquet, code_python.jsonl.gz} ->
                      <out>/converted/<source>/part-*.jsonl (+ .txt for the tokenizer)
  2. tokenizer train  our byte-level BPE on the .txt files -> <out>/tokenizer/
  3. data tokenize    -> <out>/tokens/{train,val}-*.bin + meta.json
  4. baseline         the unigram cross-entropy of the val split under the train split's token frequencies:
                      what a model that ignores context scores; the trained model must be well under it
  5. train            the `tiny` preset on CPU (settings of configs/demo_cpu.toml) -> <out>/train/; the
                      step count is fitted to --time_budget_s from a 4-step speed measurement, so the
                      LR schedule completes (anneals) within the budget on any machine
  6. samples          a few generations from the final checkpoint
  7. export           a Hugging Face LlamaForCausalLM directory -> <out>/hf/, loaded back with
                      transformers.AutoModelForCausalLM and generating the same greedy tokens as ours

A rerun reuses finished stages (their artifacts exist) and resumes training; `--fresh` starts over.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from z2all.config import opt
from z2all.io import claim_output_dir, remove_listed
from z2all.utils import UserError, print0

DEMO_DIR = Path(__file__).resolve().parent / "data" / "demo"
DEMO_INPUTS = ("wikipedia_zh=zh_wiki.jsonl.gz", "wikipedia_en=en_wiki.parquet", "github_python=code_python.jsonl.gz")
STAGE_DIRS = ("converted", "tokenizer", "tokens", "train", "hf")
PROMPTS = ("The LORD said unto", "def __init__(self", "中国的")


@dataclass
class Config:
    out_dir: str = opt("runs/demo", "where every artifact of the demo goes")
    vocab_size: int = opt(4096, "tokenizer vocabulary (rounded up to a multiple of 64)")
    max_steps: int = opt(400, "training steps (batch_size x 128 tokens each); the LR decays over them")
    time_budget_s: float = opt(300.0, "stop training after this many seconds, saving (0 = run all max_steps)")
    batch_size: int = opt(16, "sequences of 128 tokens per step")
    eval_every: int = opt(100, "validation loss and samples every this many steps")
    workers: int = opt(1, "worker processes for conversion, tokenizer training and tokenization")
    threads: int = opt(0, "torch CPU threads for training (0 = measure 1 vs torch's default and take the faster)")
    fresh: bool = opt(False, "delete the demo's own stage directories in out_dir first instead of reusing "
                             "finished stages (nothing else in out_dir is touched)")


def _stage(n: int, title: str) -> float:
    print0(f"\n=== [{n}/7] {title}")
    return time.perf_counter()


def _done(t0: float, what: str) -> None:
    print0(f"--- {what} ({time.perf_counter() - t0:.1f} s)")


def token_files(tok_dir: Path, split: str) -> list[np.ndarray]:
    meta = json.loads((tok_dir / "meta.json").read_text(encoding="utf-8"))
    return [np.memmap(tok_dir / name, dtype=np.dtype(meta["dtype"]).newbyteorder("<"), mode="r")
            for name in meta[f"{split}_files"] if (tok_dir / name).stat().st_size]


def unigram_baseline(tok_dir: str | Path) -> float:
    """Cross-entropy (nats/token) of the val tokens under the train split's unigram distribution with
    add-one smoothing: the loss of the best model that ignores context (up to train/val shift)."""
    tok_dir = Path(tok_dir)
    vocab = int(json.loads((tok_dir / "meta.json").read_text(encoding="utf-8"))["vocab_size"])
    counts = np.ones(vocab, dtype=np.float64)
    for arr in token_files(tok_dir, "train"):
        counts += np.bincount(arr, minlength=vocab)[:vocab]
    logp = np.log(counts / counts.sum())
    total, n = 0.0, 0
    for arr in token_files(tok_dir, "val"):
        c = np.bincount(arr, minlength=vocab)[:vocab]
        total -= float(c @ logp)
        n += int(c.sum())
    if n == 0:
        raise UserError(f"{tok_dir} has no validation tokens; the baseline needs some")
    return total / n


def train_config(cfg: Config, tokens: Path, run_dir: Path):
    """The training run of the demo: configs/demo_cpu.toml's settings, with the demo's length and paths."""
    from z2all.config import load_config
    from z2all.train.pretrain import Config as TrainConfig

    return load_config(TrainConfig, None, {
        "out_dir": str(run_dir), "device": "cpu", "resume": True, "threads": cfg.threads,
        "data.dir": str(tokens), "data.batch_size": cfg.batch_size, "data.seq_len": 128, "data.grad_accum": 1,
        "model.preset": "tiny",
        "optim.lr": 2e-3, "optim.min_lr": 2e-4, "optim.warmup_steps": min(30, max(1, cfg.max_steps // 10)),
        "train.max_steps": cfg.max_steps, "train.time_budget_s": cfg.time_budget_s,
        "train.log_every": max(1, min(20, cfg.max_steps // 10)),
        "eval.every": cfg.eval_every, "eval.max_batches": 10, "eval.samples": 2, "eval.sample_tokens": 32,
        "eval.prompts": list(PROMPTS[:2]), "ckpt.every": cfg.eval_every, "ckpt.keep_last": 2,
    })


def run(cfg: Config) -> int:
    from z2all.data import convert, tokenize
    from z2all.tokenizer import train as tok_train
    from z2all.train import checkpoint, pretrain

    t_all = time.perf_counter()
    # an older demo dir (before owner files) is recognised by its stage directories
    out = claim_output_dir(cfg.out_dir, "demo", option="--out_dir",
                           legacy=lambda p: (p / "converted").is_dir() and (p / "tokens").is_dir())
    if cfg.fresh:  # only the stage directories the demo itself makes; anything else in out_dir stays
        removed = remove_listed(out, STAGE_DIRS)
        print0(f"--fresh: removed {removed} stage directories of an earlier demo in {out}")
    converted, tok_dir, tokens, run_dir, hf_dir = (out / n for n in STAGE_DIRS)
    print0(f"z2all demo: the whole pipeline on the embedded corpus ({DEMO_DIR}) -> {out}")

    t0 = _stage(1, "data convert: raw corpora -> unified jsonl shards (+ txt)")
    convert.run(convert.Config(inputs=[f"{s.split('=')[0]}={DEMO_DIR / s.split('=')[1]}" for s in DEMO_INPUTS],
                               out=str(converted), txt=True, workers=cfg.workers))
    _done(t0, f"shards in {converted}")

    t0 = _stage(2, "tokenizer train: byte-level BPE (our backend) on the txt files")
    if (tok_dir / "tokenizer.json").is_file():
        print0(f"{tok_dir} exists: reused")
    else:
        txts = sorted(str(p) for p in converted.glob("*/part-*.txt"))
        if not txts:
            raise UserError(f"no txt files under {converted}: the convert stage did not write them")
        tok_train.run(tok_train.Config(inputs=txts, out_dir=str(tok_dir), vocab_size=cfg.vocab_size,
                                       workers=cfg.workers, memory_budget="512MB"))
    _done(t0, f"tokenizer in {tok_dir}")

    t0 = _stage(3, "data tokenize: shards -> train/val token files")
    if (tokens / "meta.json").is_file():
        print0(f"{tokens} exists: reused")
    else:
        tokenize.run(tokenize.Config(shards=str(converted), tokenizer=str(tok_dir), out=str(tokens),
                                     val_fraction=0.05, workers=cfg.workers))
    meta = json.loads((tokens / "meta.json").read_text(encoding="utf-8"))
    _done(t0, f"{meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens in {tokens}")

    t0 = _stage(4, "baseline: unigram cross-entropy of the val split")
    baseline = unigram_baseline(tokens)
    print0(f"unigram baseline: {baseline:.3f} nats/token (ppl {math.exp(baseline):.0f}); uniform over the "
           f"vocabulary would be {math.log(meta['vocab_size']):.3f}")
    _done(t0, "baseline computed")

    t0 = _stage(5, f"train: tiny model on CPU, at most {cfg.max_steps} steps and about {cfg.time_budget_s:g} s")
    tcfg = train_config(cfg, tokens, run_dir)
    if checkpoint.latest_checkpoint(run_dir) is not None:  # a rerun: continue the same schedule
        prev = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))["config"]
        tcfg.train.max_steps, tcfg.optim.warmup_steps = prev["train"]["max_steps"], prev["optim"]["warmup_steps"]
        print0(f"{run_dir} has checkpoints: resuming its run of {tcfg.train.max_steps} steps")
    elif cfg.time_budget_s > 0:
        _fit_to_budget(cfg, tcfg, int(meta["vocab_size"]))
    status = pretrain.run(tcfg)
    if status:
        return status
    final = checkpoint.latest_checkpoint(run_dir)
    state = checkpoint.read_state(final)
    val = state.get("val_loss")
    _done(t0, f"checkpoint {final}")

    t0 = _stage(6, "samples from the final checkpoint (temperature 0.8, top-k 40)")
    ours = _samples(final)
    _done(t0, "sampled")

    t0 = _stage(7, "export: Hugging Face LlamaForCausalLM, loaded back with transformers")
    from z2all.model.hf_compat import export_hf

    export_hf(final, hf_dir, "auto")
    match = _hf_roundtrip(hf_dir, ours)
    _done(t0, f"exported to {hf_dir}")

    print0(f"\n=== z2all demo finished in {time.perf_counter() - t_all:.0f} s")
    if val is not None:
        verdict = "well under" if val < baseline - 0.5 else ("under" if val < baseline else "NOT under")
        print0(f"val loss {val:.3f} vs unigram baseline {baseline:.3f} nats/token: {verdict} the baseline "
               f"({baseline - val:+.3f})")
    print0(f"transformers greedy tokens {'match' if match else 'DO NOT match'} ours")
    rows = [("converted shards", converted), ("tokenizer", tok_dir), ("token files", tokens),
            ("training run (metrics.jsonl, checkpoints/)", run_dir), ("final checkpoint", final),
            ("Hugging Face model", hf_dir)]
    for what, where in rows:
        print0(f"  {what:<44} {where}")
    print0(f"next: z2all plot {run_dir}  ·  z2all generate --ckpt {final} --prompt 'The '")
    return 0 if match else 1


def _seconds_per_step(tcfg, vocab: int, threads: int, give_up_after: float = float("inf")) -> float:
    """Seconds per training step of the demo's model on random tokens with `threads` torch threads (0 =
    torch's default): the mean of 2 steps after a warm-up one; inf as soon as a step exceeds give_up_after."""
    import torch

    from z2all.model.llama import Z2all
    from z2all.train.pretrain import resolve_model_config

    old = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        model = Z2all(resolve_model_config(tcfg.model, vocab, tcfg.data.seq_len), tcfg.model.ops)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randint(0, vocab, (tcfg.data.batch_size, tcfg.data.seq_len + 1))
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            model(x[:, :-1], x[:, 1:])[1].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
            if times[-1] > give_up_after:
                return float("inf")
    finally:
        torch.set_num_threads(old)
    return sum(times[1:]) / 2


def _fit_to_budget(cfg: Config, tcfg, vocab: int) -> None:
    """Pick the thread count (1 vs torch's default: on a busy machine spinning OpenMP threads can make the
    default many times slower) and the step count that fits the time budget, so the cosine schedule ends
    annealed inside it. The budget itself stays as a guard (x1.5) in case the machine slows down."""
    import torch

    if cfg.threads > 0 or torch.get_num_threads() == 1:
        threads, per_step = cfg.threads, _seconds_per_step(tcfg, vocab, cfg.threads)
    else:
        one = _seconds_per_step(tcfg, vocab, 1)
        default = _seconds_per_step(tcfg, vocab, 0, give_up_after=1.5 * one)
        threads, per_step = (1, one) if one <= default else (0, default)
        print0(f"speed: {one:.2f} s/step with 1 thread, "
               f"{'gave up' if default == float('inf') else f'{default:.2f} s/step'} with {torch.get_num_threads()}"
               f" threads: using {threads or torch.get_num_threads()}")
    steps = max(10, min(cfg.max_steps, int(cfg.time_budget_s / per_step)))
    print0(f"training {steps} steps ({per_step:.2f} s/step) to fit about {cfg.time_budget_s:g} s")
    tcfg.threads = threads
    tcfg.train.max_steps = steps
    tcfg.train.time_budget_s = 1.5 * cfg.time_budget_s
    tcfg.optim.warmup_steps = min(tcfg.optim.warmup_steps, max(1, steps // 10))


def _samples(ckpt: Path) -> list[list[int]]:
    """Print sampled continuations (temperature 0.8, top-k 40, seeded) of the demo prompts; return the
    greedy continuations (prompt + new tokens), which the transformers round trip must reproduce."""
    import torch
    from tokenizers import Tokenizer

    from z2all.model.generate import generate
    from z2all.model.llama import load_model

    model = load_model(ckpt).eval()
    tok = Tokenizer.from_file(str(ckpt / "tokenizer" / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    prompts = [tok.encode(p, add_special_tokens=False).ids for p in PROMPTS]
    with torch.no_grad():
        sampled = generate(model, prompts, max_new_tokens=48, temperature=0.8, top_k=40, eos_id=eos,
                           generator=torch.Generator().manual_seed(0))
        greedy = generate(model, prompts, max_new_tokens=24, temperature=0.0, eos_id=eos)
    for p, o in zip(PROMPTS, sampled):
        print0(f"  {json.dumps(p + tok.decode(o), ensure_ascii=False)}")
    return [list(p) + list(o) for p, o in zip(prompts, greedy)]


def _hf_roundtrip(hf_dir: Path, ours: list[list[int]]) -> bool:
    """Load the export with plain transformers (no remote code) and check its greedy continuation of the
    first prompt equals ours."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    prompt_ids = tok(PROMPTS[0], add_special_tokens=False)["input_ids"]
    n_new = len(ours[0]) - len(prompt_ids)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n_new, do_sample=False,
                             min_new_tokens=n_new, pad_token_id=tok.pad_token_id or 0)
    theirs = out[0].tolist()
    print0(f"transformers: {type(model).__name__} + {type(tok).__name__} from {hf_dir}: "
           f"{json.dumps(tok.decode(theirs[len(prompt_ids):]), ensure_ascii=False)}")
    return theirs == ours[0]
