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
  8. eval             `z2all eval`'s held-out scores of the final checkpoint (`eval.run.demo_report`): bits
                      per byte per domain next to the unigram baseline, and "which continuation?" accuracy
                      (acc, acc_mi) next to chance (1/4) -> <out>/eval/report.{md,json}

With `--chat` (chat models, parts 1 and 2) it goes on from the pretrained checkpoint:
  9. data synth       the synthetic zh/en tasks with exact answers, `--synth_level easy` by default ->
                      <out>/synth/{train,heldout}.jsonl
 10. data chat        rendered with the demo tokenizer's ChatML template -> <out>/chat/
 11. sft              `z2all sft` of the final pretraining checkpoint, packed rows, step count fitted to
                      --sft_time_budget_s like stage 5, in its own process -> <out>/sft/
 12. compare          the base and the SFT model answer the same held-out prompts greedily: exact-match
                      accuracy per task and the share of answers that end with <|im_end|>, then a few chat
                      samples of the SFT model -> <out>/sft/compare.json
 13. data prefs       (--chat_dpo) preference pairs from the synthetic train split (chosen = the exact answer,
                      rejected = a plausible wrong or over-long one) -> <out>/prefs/, and from the held-out
                      records of stage 12 -> <out>/prefs-heldout/
 14. dpo              `z2all dpo` of the SFT checkpoint, live frozen reference, fitted to --dpo_time_budget_s
                      -> <out>/dpo/
 15. compare          held-out preference accuracy and margin before (SFT) and after DPO, exact match after DPO
 16. LoRA SFT         (--chat_lora) `z2all sft --lora.rank` of the same base with the same data and steps as
                      stage 11 -> <out>/sft-lora/; then one table of exact match per task for base, SFT, DPO
                      and LoRA SFT, and full vs LoRA SFT: trainable parameters, peak RSS (each run is a child
                      process: its own VmHWM), wall and CPU seconds, checkpoint size; all in compare.json

Why `--synth_level easy`: the demo's 5M-parameter model, pretrained for ~5 minutes, learns in a few hundred
SFT steps the answer *form* (<|im_end|> in ~100% of answers) and the answer *distribution* of each task, but
not yet to condition on the prompt's content over the standard ranges (two-digit operands, numerals to
99,999, 3-6 of 30 words): there it answers e.g. "1" to every count question. The easy ranges shrink what has
to be told apart (docs/performance.md, "SFT on the synthetic tasks", has the runs).
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
from z2all.io import claim_output_dir, read_owner, remove_listed
from z2all.utils import UserError, print0

DEMO_DIR = Path(__file__).resolve().parent / "data" / "demo"
DEMO_INPUTS = ("wikipedia_zh=zh_wiki.jsonl.gz", "wikipedia_en=en_wiki.parquet", "github_python=code_python.jsonl.gz")
STAGE_DIRS = ("converted", "tokenizer", "tokens", "train", "hf", "eval", "synth", "chat", "sft", "prefs",
              "prefs-heldout", "prefs.jsonl", "prefs-heldout.jsonl", "dpo", "sft-lora")
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
    chat: bool = opt(False, "then the chat part: synthetic tasks -> data chat -> SFT of the pretrained model -> "
                            "held-out exact match of the base vs the SFT model, per task")
    synth_n: int = opt(8000, "--chat: synthetic examples generated (about 5% are held out; repeated prompts "
                             "are dropped)")
    synth_level: str = opt("easy", "--chat: difficulty of the synthetic tasks (`z2all data synth --level`): easy "
                           "is what the demo's 5M model learns in minutes, standard is far beyond it",
                           choices=("easy", "standard"))
    sft_max_steps: int = opt(1000, "--chat: SFT steps at most (8 packed rows of 256 tokens each)")
    sft_time_budget_s: float = opt(240.0, "--chat: fit the SFT step count to about this many seconds "
                                          "(0 = run sft_max_steps)")
    sft_lr: float = opt(3e-3, "--chat: peak learning rate of the full SFT (cosine to a tenth)")
    heldout_per_task: int = opt(40, "--chat: held-out prompts per task in the comparison")
    chat_dpo: bool = opt(True, "--chat: go on with DPO from the SFT checkpoint on synthetic preference pairs")
    dpo_max_steps: int = opt(300, "--chat: DPO steps at most (8 pairs each)")
    dpo_time_budget_s: float = opt(90.0, "--chat: fit the DPO step count to about this many seconds "
                                         "(0 = run dpo_max_steps)")
    dpo_lr: float = opt(1e-4, "--chat: peak learning rate of DPO (cosine to a tenth)")
    dpo_beta: float = opt(0.1, "--chat: DPO beta")
    chat_lora: bool = opt(True, "--chat: also LoRA SFT of the same base (same data and steps) and compare it "
                                "with the full SFT: exact match, trainable parameters, peak RSS, time")
    lora_rank: int = opt(16, "--chat: LoRA rank (adapters on every projection, alpha = rank)")
    lora_lr: float = opt(1e-2, "--chat: peak learning rate of the LoRA SFT (cosine to a tenth)")


_TOTAL = [8]


def _stage(n: int, title: str) -> float:
    print0(f"\n=== [{n}/{_TOTAL[0]}] {title}")
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
    _TOTAL[0] = 12 + 3 * cfg.chat_dpo + cfg.chat_lora if cfg.chat else 8
    if cfg.chat:
        _check_chat_options(cfg)
    # an older demo dir (before owner files) is recognised by its stage directories and nothing else in it;
    # --fresh deletes only from a directory an earlier demo marked (a user's own convert/tokenize/train
    # outputs side by side look the same as an unmarked demo dir, and are theirs)
    d = Path(cfg.out_dir)
    if cfg.fresh and d.is_dir() and read_owner(d) != "demo" and any(e.name in STAGE_DIRS for e in d.iterdir()):
        raise UserError(f"--fresh: {d} was not marked by an earlier `z2all demo` (no .z2all-owner.json naming "
                        f"it), so its stage directories may be someone's own outputs; remove them yourself or "
                        f"choose another --out_dir (nothing was changed)")
    out = claim_output_dir(cfg.out_dir, "demo", option="--out_dir",
                           legacy=lambda p: (p / "converted").is_dir() and (p / "tokens").is_dir()
                           and all(e.name in STAGE_DIRS for e in p.iterdir()))
    if cfg.fresh:  # only the stage directories the demo itself makes; anything else in out_dir stays
        removed = remove_listed(out, STAGE_DIRS)
        print0(f"--fresh: removed {removed} stage directories of an earlier demo in {out}")
    converted, tok_dir, tokens, run_dir, hf_dir = (out / n for n in STAGE_DIRS[:5])
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

    t0 = _stage(8, "eval: bits per byte per domain and 'which continuation?' accuracy on held-out documents")
    report = _eval_stage(final, tokens, out / "eval", cfg.threads)
    _done(t0, f"report in {out / 'eval'}")

    chat_rows = _chat_part(cfg, out, tok_dir, final) if cfg.chat else []

    print0(f"\n=== z2all demo finished in {time.perf_counter() - t_all:.0f} s")
    if val is not None:
        verdict = "well under" if val < baseline - 0.5 else ("under" if val < baseline else "NOT under")
        print0(f"val loss {val:.3f} vs unigram baseline {baseline:.3f} nats/token: {verdict} the baseline "
               f"({baseline - val:+.3f})")
    print0(f"transformers greedy tokens {'match' if match else 'DO NOT match'} ours")
    above = report["above_chance"]["acc_mi"]
    print0("held-out 'which continuation?' acc_mi " + ("above chance in every domain" if above else
           "NOT above chance in every domain (a longer --time_budget_s trains further)") + "; bits/byte "
           + ", ".join(f"{dom} {d['bpb']:.3f} (unigram {d['unigram_bpb']:.3f})" if d["unigram_bpb"] is not None
                       else f"{dom} {d['bpb']:.3f}" for dom, d in report["domains"].items()))
    rows = [("converted shards", converted), ("tokenizer", tok_dir), ("token files", tokens),
            ("training run (metrics.jsonl, checkpoints/)", run_dir), ("final checkpoint", final),
            ("Hugging Face model", hf_dir), ("held-out evaluation", out / "eval" / "report.md"), *chat_rows]
    for what, where in rows:
        print0(f"  {what:<44} {where}")
    print0(f"next: z2all plot {run_dir}  ·  z2all generate --ckpt {final} --prompt 'The '")
    return 0 if match else 1


def _read_json(path: Path) -> dict | None:
    """A stage's JSON record, or None when it is missing or unreadable (an interrupted or edited stage is
    redone, not a crash)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _reusable_synth(synth_dir: Path, cfg: Config) -> bool:
    """True when synth_dir holds the tasks this run asks for (reuse them); False when it holds none (make
    them); a UserError when it holds other ones (--synth_level or --synth_n changed since: the SFT and DPO
    stages after it would mix runs)."""
    meta = _read_json(synth_dir / "synth.json")
    if meta is None:
        return False
    have = (meta.get("level", "standard"), meta.get("n"))
    if have != (cfg.synth_level, cfg.synth_n):
        raise UserError(f"{synth_dir} holds --synth_level {have[0]} --synth_n {have[1]} tasks, not "
                        f"--synth_level {cfg.synth_level} --synth_n {cfg.synth_n}: rerun with those, or with "
                        f"--fresh to start over")
    return True


def _eval_stage(final: Path, tokens: Path, eval_dir: Path, threads: int) -> dict:
    """Stage 8: `demo_report` of the final checkpoint on the held-out documents of the token directory, printed
    and kept in eval_dir/report.{md,json} (reused when it was made for this same checkpoint)."""
    from z2all.eval.run import demo_report
    from z2all.io import atomic_write_json, atomic_write_text

    res_file = eval_dir / "report.json"
    res = _read_json(res_file)
    if res is not None and (eval_dir / "report.md").is_file():
        if res.get("ckpt") == str(final):
            print0((eval_dir / "report.md").read_text(encoding="utf-8") + f"{eval_dir} is of {final}: reused")
            return res
    text, res = demo_report(final, tokens, threads=threads)
    res = {"ckpt": str(final), **res}
    print0(text)
    eval_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(eval_dir / "report.md", text)
    atomic_write_json(res_file, res)
    return res


def _seconds_per_step(tcfg, vocab: int, threads: int, give_up_after: float = float("inf")) -> float:
    """Seconds per training step of the demo's model on random tokens with `threads` torch threads (0 =
    torch's default): the mean of 2 steps after a warm-up one; inf as soon as a step exceeds give_up_after."""
    import torch

    from z2all.model.generate import num_threads
    from z2all.model.llama import Z2all
    from z2all.train.pretrain import resolve_model_config

    with num_threads(threads):
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


# ---------------------------------------------------------------------- the chat part (--chat)

def sft_overrides(cfg: Config, init: Path, chat_dir: Path, sft_dir: Path, threads: int) -> dict:
    """The demo's SFT run as config overrides: packed rows of 256 tokens, 8 per step, lr cfg.sft_lr (a 5M model
    fresh from a few minutes of pretraining takes a high rate), cosine to a tenth of it, resumable."""
    return {
        "init": str(init), "data.dir": str(chat_dir), "out_dir": str(sft_dir), "device": "cpu", "resume": True,
        "threads": threads, "data.packing": "pack", "data.seq_len": 256, "data.batch_size": 8,
        "optim.lr": cfg.sft_lr, "optim.min_lr": cfg.sft_lr / 10,
        "optim.warmup_steps": min(20, max(1, cfg.sft_max_steps // 10)),
        "train.max_steps": cfg.sft_max_steps, "train.log_every": max(1, min(25, cfg.sft_max_steps // 10)),
        "eval.every": 0, "eval.max_batches": 10, "eval.samples": 4, "eval.sample_tokens": 48,
        "ckpt.every": 0, "ckpt.keep_last": 1, "metrics.tensorboard": False,
    }


def sft_config(cfg: Config, init: Path, chat_dir: Path, sft_dir: Path, threads: int):
    """The demo's SFT run (`sft_overrides`) as a `z2all sft` Config."""
    from z2all.config import load_config
    from z2all.train.sft import Config as SFTConfig

    return load_config(SFTConfig, None, sft_overrides(cfg, init, chat_dir, sft_dir, threads))


def dpo_overrides(cfg: Config, init: Path, prefs_dir: Path, dpo_dir: Path, threads: int) -> dict:
    """The demo's DPO run: 8 pairs per step, sigmoid loss with beta cfg.dpo_beta, lr cfg.dpo_lr with cosine
    decay, and a live reference (a frozen copy): the demo's few hundred steps read ~1-2k of the ~4.5k train
    pairs, so precomputing all of them would cost more forward passes than it saves (the 5M model's
    second copy is ~20 MB)."""
    return {
        "init": str(init), "data.dir": str(prefs_dir), "out_dir": str(dpo_dir), "device": "cpu", "resume": True,
        "threads": threads, "data.batch_size": 8, "dpo.beta": cfg.dpo_beta, "dpo.reference": "live",
        "optim.lr": cfg.dpo_lr, "optim.min_lr": cfg.dpo_lr / 10,
        "optim.warmup_steps": min(10, max(1, cfg.dpo_max_steps // 10)), "train.max_steps": cfg.dpo_max_steps,
        "train.log_every": max(1, min(25, cfg.dpo_max_steps // 10)), "eval.every": 0, "eval.max_batches": 10,
        "ckpt.every": 0, "ckpt.keep_last": 1, "metrics.tensorboard": False,
    }


def _timed_steps(step, n: int = 3) -> float:
    """Mean seconds of steps 2..n of `step()` (the first one warms up)."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return sum(times[1:]) / (n - 1)


def _sft_seconds_per_step(scfg, init: Path) -> float:
    """Seconds per SFT step (random packed rows, the real model) with scfg.threads threads."""
    import torch

    from z2all.model.generate import num_threads
    from z2all.model.llama import load_model

    def measure():
        model = load_model(init)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        B, T = scfg.data.batch_size, scfg.data.seq_len
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, model.cfg.vocab_size, (B, T), generator=g)
        seg = (torch.arange(T) // 64).int().expand(B, T)
        pos = (torch.arange(T) % 64).expand(B, T)

        def step():
            model(x, x, positions=pos, segment_ids=seg)[1].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return _timed_steps(step)
    with num_threads(scfg.threads):
        return measure()


def _dpo_seconds_per_step(init: Path, prefs_dir: Path, batch_size: int, threads: int) -> float:
    """Seconds per DPO step on the real pairs: the policy's forward + backward over both sides, plus the
    live reference's forward (timed with the same weights)."""
    import torch

    from z2all.data.prefs import PrefData
    from z2all.model.generate import num_threads
    from z2all.model.llama import load_model
    from z2all.train.dpo import PairBatches, dpo_loss, policy_logps, reference_logps

    def measure():
        model = load_model(init)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-7)
        batches = PairBatches(PrefData(prefs_dir, "train"), "train", batch_size=batch_size)
        it = iter(range(3))

        def step():
            batch = batches.get_batch(next(it), 0)
            rc, rr = reference_logps(model, batch, "cpu")
            pc, pr = policy_logps(model, batch, "cpu")
            dpo_loss(pc, pr, rc, rr, 0.1)[0].mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return _timed_steps(step)
    with num_threads(threads):
        return measure()


def heldout_records(synth_dir: Path, per_task: int) -> list[dict]:
    """The first `per_task` held-out records of every task (heldout.jsonl order: deterministic)."""
    out, seen = [], {}
    for line in (synth_dir / "heldout.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if seen.get(rec["task"], 0) < per_task:
            seen[rec["task"]] = seen.get(rec["task"], 0) + 1
            out.append(rec)
    return out


def compare_table(records: list[dict], base: list[tuple[str, bool]], sft: list[tuple[str, bool]],
                  more: dict[str, list[tuple[str, bool]]] | None = None) -> tuple[str, dict]:
    """Markdown table: rows = tasks (+ all), exact match and <|im_end|> share of base and SFT, then exact
    match of each further model in `more` ({"dpo": answers, "lora": answers}: columns "DPO exact match"...)."""
    from z2all.data.synthetic import exact_match
    from z2all.utils import markdown_table

    more = more or {}
    tasks = list(dict.fromkeys(r["task"] for r in records))
    rows, summary = [], {}
    for task in [*tasks, "all"]:
        idx = [i for i, r in enumerate(records) if task == "all" or r["task"] == task]
        answers = {"base": base, "sft": sft, **more}
        em = {k: sum(exact_match(a[i][0], records[i]["answer"]) for i in idx) / len(idx) for k, a in answers.items()}
        end = {k: sum(a[i][1] for i in idx) / len(idx) for k, a in answers.items()}
        summary[task] = {"n": len(idx), **{f"{k}_em": v for k, v in em.items()},
                         **{f"{k}_end": v for k, v in end.items()}}
        rows.append([task, len(idx), f"{em['base']:.1%}", f"{em['sft']:.1%}", *(f"{em[k]:.1%}" for k in more),
                     f"{end['base']:.0%}", f"{end['sft']:.0%}"])
    names = {"dpo": "DPO", "lora": "LoRA-SFT"}
    return markdown_table(["task", "held-out prompts", "base exact match", "SFT exact match",
                           *(f"{names.get(k, k)} exact match" for k in more),
                           "base ends <|im_end|>", "SFT ends <|im_end|>"], rows), summary


def _train_stage(module: str, overrides: dict, run_dir: Path, threads: int) -> tuple[Path, dict]:
    """Run one fine-tuning command (sft/dpo) in a child process, unless run_dir already holds its final
    checkpoint and cost record (then both are reused); (final checkpoint, cost) where cost = {"peak_rss",
    "wall_s", "cpu_s", "steps", "trainable", "ckpt_bytes"} is also kept in run_dir/cost.json (after a resume:
    the costs of the process that finished the run)."""
    from z2all.bench.finetune import checkpoint_cost, run_child
    from z2all.io import atomic_write_json
    from z2all.train import checkpoint

    cost_file = run_dir / "cost.json"
    last = checkpoint.latest_checkpoint(run_dir) if run_dir.is_dir() else None
    cost = _read_json(cost_file)
    if last is not None and cost is not None:
        if cost.get("steps") == checkpoint.read_state(last).get("step"):
            print0(f"{run_dir} finished ({cost['steps']} steps): reused")
            return last, cost
    res = run_child(module, overrides, threads)
    if res["rc"]:
        raise UserError(f"the {module.rsplit('.', 1)[-1]} run in {run_dir} stopped with status {res['rc']}; rerun "
                        f"`z2all demo --chat` to resume it")
    last = checkpoint.latest_checkpoint(run_dir)
    cost = {"peak_rss": res["peak_rss"], "wall_s": res["wall_s"], "cpu_s": res["cpu_s"],
            "steps": checkpoint.read_state(last).get("step"), **checkpoint_cost(last)}
    atomic_write_json(cost_file, cost)
    return last, cost


def _fit_steps(what: str, budget_s: float, max_steps: int, per_step: float, threads: int) -> int:
    import torch

    steps = max(10, min(max_steps, int(budget_s / per_step)))
    print0(f"{what}: {steps} steps ({per_step:.2f} s/step on {threads or torch.get_num_threads()} threads) to fit "
           f"about {budget_s:g} s")
    return steps


def _resumed_steps(run_dir: Path, overrides: dict) -> bool:
    """A rerun continues the schedule of the run already in run_dir (its step count and warmup)."""
    from z2all.train import checkpoint

    if not run_dir.is_dir() or checkpoint.latest_checkpoint(run_dir) is None:
        return False
    prev = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))["config"]
    overrides["train.max_steps"] = prev["train"]["max_steps"]
    overrides["optim.warmup_steps"] = prev["optim"]["warmup_steps"]
    print0(f"{run_dir} has checkpoints: continuing its run of {prev['train']['max_steps']} steps")
    return True


def _check_chat_options(cfg: Config) -> None:
    """The --chat options, checked before the first stage (a bad one must not surface after pretraining)."""
    checks = [("--synth_n", cfg.synth_n, cfg.synth_n >= 1),
              ("--heldout_per_task", cfg.heldout_per_task, cfg.heldout_per_task >= 1),
              ("--sft_lr", cfg.sft_lr, cfg.sft_lr > 0), ("--dpo_lr", cfg.dpo_lr, cfg.dpo_lr > 0),
              ("--dpo_beta", cfg.dpo_beta, cfg.dpo_beta > 0), ("--lora_lr", cfg.lora_lr, cfg.lora_lr > 0),
              ("--lora_rank", cfg.lora_rank, cfg.lora_rank >= 1 or not cfg.chat_lora)]
    for name, value, ok in checks:
        if not (ok and math.isfinite(value)):
            raise UserError(f"{name}={value}: must be a positive number")


def _chat_part(cfg: Config, out: Path, tok_dir: Path, base_ckpt: Path) -> list[tuple[str, Path]]:
    import torch

    from z2all.data import chat, synthetic
    from z2all.io import atomic_write_json
    from z2all.model.generate import num_threads
    from z2all.train.sft import answer_records
    from z2all.utils import human_bytes, markdown_table

    synth_dir, chat_dir, sft_dir = out / "synth", out / "chat", out / "sft"
    t0 = _stage(9, f"data synth: synthetic zh/en tasks with exact answers (level {cfg.synth_level})")
    if _reusable_synth(synth_dir, cfg):
        print0(f"{synth_dir} exists: reused")
    else:
        synthetic.run(synthetic.Config(out=str(synth_dir), n=cfg.synth_n, seed=0, level=cfg.synth_level))
    _done(t0, f"tasks in {synth_dir}")

    t0 = _stage(10, "data chat: render the conversations with the demo tokenizer's chat template")
    chat.run(chat.Config(inputs=[str(synth_dir / "train.jsonl")], tokenizer=str(tok_dir), out=str(chat_dir),
                         val_fraction=0.02, max_len=256))
    _done(t0, f"chat data in {chat_dir}")

    t0 = _stage(11, "sft: fine-tune the pretrained checkpoint on the chat data (packed rows, own process)")
    threads = 1 if cfg.threads == 0 and torch.get_num_threads() > 1 else cfg.threads
    sft_ov = sft_overrides(cfg, base_ckpt, chat_dir, sft_dir, threads)
    if not _resumed_steps(sft_dir, sft_ov) and cfg.sft_time_budget_s > 0:
        per_step = _sft_seconds_per_step(sft_config(cfg, base_ckpt, chat_dir, sft_dir, threads), base_ckpt)
        steps = _fit_steps("sft", cfg.sft_time_budget_s, cfg.sft_max_steps, per_step, threads)
        sft_ov.update({"train.max_steps": steps, "train.time_budget_s": 1.5 * cfg.sft_time_budget_s,
                       "optim.warmup_steps": min(sft_ov["optim.warmup_steps"], max(1, steps // 10))})
    sft_ckpt, sft_cost = _train_stage("z2all.train.sft", sft_ov, sft_dir, threads)
    _done(t0, f"checkpoint {sft_ckpt}")

    records = heldout_records(synth_dir, cfg.heldout_per_task)
    answers = {}

    def answers_of(name: str, ckpt: Path) -> list[tuple[str, bool]]:
        # the thread count training used: spinning OpenMP threads on a busy machine stall decoding
        with num_threads(threads):
            answers[name] = answer_records(ckpt, records, tok_dir)
        return answers[name]

    t0 = _stage(12, "compare: base vs SFT model on held-out prompts (greedy)")
    answers_of("base", base_ckpt)
    answers_of("sft", sft_ckpt)
    table, summary = compare_table(records, answers["base"], answers["sft"])
    print0(table)
    print0("\nchat samples (SFT model, held-out prompts):")
    shown = {}
    for rec, (a, ended) in zip(records, answers["sft"]):
        key = (rec["task"], rec["lang"])
        if key in shown or len(shown) >= 6:
            continue
        shown[key] = True
        print0(f"  user: {rec['messages'][-2]['content']}\n  assistant: {a}{'' if ended else ' [no <|im_end|>]'}"
               f"   (expected: {rec['answer']})")
    result = {"base": str(base_ckpt), "sft": str(sft_ckpt), "synth_level": cfg.synth_level, "tasks": summary,
              "sft_cost": sft_cost}
    atomic_write_json(sft_dir / "compare.json", result)
    allrow = summary["all"]
    print0(f"held-out exact match: base {allrow['base_em']:.1%} -> SFT {allrow['sft_em']:.1%}; answers ending "
           f"with <|im_end|>: {allrow['base_end']:.0%} -> {allrow['sft_end']:.0%}")
    _done(t0, f"comparison in {sft_dir / 'compare.json'}")
    rows = [("chat data", chat_dir), ("SFT run", sft_dir), ("SFT checkpoint", sft_ckpt)]
    n = 12

    if cfg.chat_dpo:
        dpo_dir = out / "dpo"
        n += 1
        t0 = _stage(n, "data prefs: preference pairs from the synthetic set (chosen = the exact answer, rejected "
                       "= a plausible wrong or over-long one)")
        prefs_dir, held_dir = _prefs_stage(synth_dir, out, tok_dir, records)
        _done(t0, f"train pairs in {prefs_dir}, held-out pairs in {held_dir}")
        n += 1
        t0 = _stage(n, "dpo: align the SFT checkpoint on the train pairs (live frozen reference, own process)")
        dpo_ov = dpo_overrides(cfg, sft_ckpt, prefs_dir, dpo_dir, threads)
        if not _resumed_steps(dpo_dir, dpo_ov) and cfg.dpo_time_budget_s > 0:
            per_step = _dpo_seconds_per_step(sft_ckpt, prefs_dir, dpo_ov["data.batch_size"], threads)
            steps = _fit_steps("dpo", cfg.dpo_time_budget_s, cfg.dpo_max_steps, per_step, threads)
            dpo_ov.update({"train.max_steps": steps, "train.time_budget_s": 1.5 * cfg.dpo_time_budget_s,
                           "optim.warmup_steps": min(dpo_ov["optim.warmup_steps"], max(1, steps // 10))})
        dpo_ckpt, dpo_cost = _train_stage("z2all.train.dpo", dpo_ov, dpo_dir, threads)
        _done(t0, f"checkpoint {dpo_ckpt}")
        n += 1
        t0 = _stage(n, "compare: held-out preference accuracy and margin, exact match after DPO")
        from z2all.bench.finetune import preference_eval

        with num_threads(threads):
            before = preference_eval(sft_ckpt, held_dir, split="train")
            after = preference_eval(dpo_ckpt, held_dir, reference=sft_ckpt, split="train", beta=cfg.dpo_beta)
        answers_of("dpo", dpo_ckpt)
        print0(markdown_table(
            ["held-out pairs", "model", "prefers chosen (log-prob)", "mean log-prob margin",
             f"reward accuracy (beta {cfg.dpo_beta:g})", "mean reward margin"],
            [[before["pairs"], "SFT (= the reference)", f"{before['logp_acc']:.1%}", f"{before['logp_margin']:.2f}",
              "- (ties)", "0"],
             [after["pairs"], "DPO", f"{after['logp_acc']:.1%}", f"{after['logp_margin']:.2f}",
              f"{after['reward_acc']:.1%}", f"{after['reward_margin']:.2f}"]]))
        result["dpo"] = {"ckpt": str(dpo_ckpt), "before": before, "after": after, "cost": dpo_cost,
                         "beta": cfg.dpo_beta}
        rows += [("preference pairs", prefs_dir), ("DPO checkpoint", dpo_ckpt)]
        _done(t0, "DPO compared")

    if cfg.chat_lora:
        lora_dir = out / "sft-lora"
        n += 1
        t0 = _stage(n, f"LoRA SFT: rank {cfg.lora_rank} adapters on every projection of the same base, the same "
                       f"data and steps as the full SFT (own process)")
        lora_ov = sft_overrides(cfg, base_ckpt, chat_dir, lora_dir, threads)
        lora_ov.update({"train.max_steps": sft_cost["steps"], "optim.warmup_steps": sft_ov["optim.warmup_steps"],
                        "optim.lr": cfg.lora_lr, "optim.min_lr": cfg.lora_lr / 10, "lora.rank": cfg.lora_rank,
                        "lora.alpha": float(cfg.lora_rank), "lora.targets": "all"})
        lora_ckpt, lora_cost = _train_stage("z2all.train.sft", lora_ov, lora_dir, threads)
        answers_of("lora", lora_ckpt)
        result["lora"] = {"ckpt": str(lora_ckpt), "rank": cfg.lora_rank, "lr": cfg.lora_lr, "cost": lora_cost}
        rows += [("LoRA SFT checkpoint", lora_ckpt)]
        _done(t0, f"checkpoint {lora_ckpt}")

    if cfg.chat_dpo or cfg.chat_lora:
        more = {k: answers[k] for k in ("dpo", "lora") if k in answers}
        table, summary = compare_table(records, answers["base"], answers["sft"], more)
        result["tasks"] = summary
        print0("\nheld-out exact match per task, every model (greedy):")
        print0(table)
        if cfg.chat_lora:
            em = {k: summary["all"][f"{k}_em"] for k in ("sft", "lora")}
            print0("\nfull SFT vs LoRA SFT (same base, data, steps; each in its own process: peak RSS is the "
                   "child's own VmHWM, time its wall/CPU seconds incl. ~3 s of start-up):")
            print0(markdown_table(
                ["run", "held-out exact match", "trainable params", "peak RSS", "wall s", "CPU s",
                 "checkpoint (weights + optimizer)"],
                [[name, f"{em[k]:.1%}", f"{c['trainable']:,}", human_bytes(c["peak_rss"]), f"{c['wall_s']:.0f}",
                  f"{c['cpu_s']:.0f}", human_bytes(c["ckpt_bytes"])]
                 for name, k, c in (("full SFT", "sft", sft_cost),
                                    (f"LoRA SFT r{cfg.lora_rank}", "lora", result["lora"]["cost"]))]))
        atomic_write_json(sft_dir / "compare.json", result)
        print0(f"results in {sft_dir / 'compare.json'}")
    return rows


def _prefs_stage(synth_dir: Path, out: Path, tok_dir: Path, records: list[dict]) -> tuple[Path, Path]:
    """Pairs from the synthetic train split -> out/prefs (2% val for the DPO run's own eval) and from the
    held-out records of the exact-match table -> out/prefs-heldout (all in its "train" split: prompts no
    training stage saw). Reused when both exist."""
    from z2all.data import prefs
    from z2all.io import atomic_write_text

    prefs_dir, held_dir = out / "prefs", out / "prefs-heldout"
    train = [json.loads(x) for x in (synth_dir / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    for d, recs, val in ((prefs_dir, train, 0.02), (held_dir, records, 0.0)):
        if (d / "meta.json").is_file():
            print0(f"{d} exists: reused")
            continue
        src = out / f"{d.name}.jsonl"
        atomic_write_text(src, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in prefs.synthetic_pairs(recs)))
        prefs.run(prefs.Config(inputs=[str(src)], tokenizer=str(tok_dir), out=str(d), val_fraction=val, max_len=256))
    return prefs_dir, held_dir
