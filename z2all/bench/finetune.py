"""`z2all bench finetune`: what fine-tuning costs, on one machine: full SFT vs LoRA SFT, and DPO with a live
reference model vs precomputed reference log-probs (vs LoRA, whose reference is the base without adapters).

    z2all bench finetune                                   # tiny model, CPU: ~2-3 minutes on 2 cores
    z2all bench finetune --dim 256 --n-layers 8 --steps 40 --device cuda --out runs/bench-ft

Setup (in a temp dir, or --work): the synthetic task set (`z2all data synth`), a BPE tokenizer with our
ChatML template trained on it, the chat data (`z2all data chat`), preference pairs built from it
(`data/prefs.synthetic_pairs`: the exact answer vs a plausible wrong or over-long one) and a random "base"
checkpoint of the given shape. Each row is one `z2all sft` / `z2all dpo` run of --steps steps in its own
process (so its peak RSS is its own), reporting: trainable parameters, tokens/s (median of the logged
steps after the first; real tokens: both sides of each pair for DPO), peak memory (peak RSS on CPU, peak
allocated on CUDA), checkpoint size (weights + optimizer state of the last checkpoint) and wall time.

Also the functions the demo's chat part prints with (from checkpoints, no training):
- `preference_eval(policy, prefs_dir, reference=None)`: held-out pairs where the policy gives the chosen
  answer the higher log-prob (and the mean log-prob margin); with a reference, DPO's reward accuracy and
  margin beta * (policy - reference) too.
- `exact_match_eval(ckpt, records)`: greedy answers to held-out synthetic prompts, exact match per task.
- `run_child(module, overrides)`: one training command in a fresh process, with its own peak RSS, wall and
  CPU time, and `checkpoint_cost(ckpt)` (the bench's rows and the demo's full SFT, LoRA SFT and DPO runs).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from z2all.config import opt
from z2all.utils import UserError, human_bytes, markdown_table, print0


@dataclass
class Config:
    dim: int = opt(64, "model width of the random base checkpoint")
    n_layers: int = opt(4, "transformer blocks")
    n_heads: int = opt(4, "attention heads")
    seq_len: int = opt(128, "SFT row length and the longest preference pair")
    steps: int = opt(30, "optimizer steps per row")
    batch_size: int = opt(8, "SFT rows / DPO pairs per step")
    n: int = opt(1500, "synthetic records (SFT examples; as many preference pairs)")
    lora_rank: int = opt(8, "LoRA rank of the LoRA rows")
    lora_targets: str = opt("all", "LoRA targets of the LoRA rows")
    device: str = opt("cpu", "device of the runs (cpu, cuda)")
    threads: int = opt(0, "CPU threads per run (0 = torch's default)")
    work: str = opt("", "keep the data, checkpoints and runs here (default: a temp dir, removed)")
    out: str = opt("", "also write report.md and results.json here (new, empty or an earlier --out)")


# ---------------------------------------------------------------- evaluation from checkpoints

@torch.no_grad()
def _pair_logps(model, data, split: str, batch_size: int = 16) -> np.ndarray:
    from z2all.train.dpo import PairBatches, reference_logps

    b = PairBatches(data, split, batch_size=batch_size, shuffle=False)
    out = np.zeros((b.n, 2))
    dev = next(model.parameters()).device
    for i in range(0, b.n, batch_size):
        batch = b.collate(list(range(i, min(i + batch_size, b.n))))
        c, r = reference_logps(model, batch, dev)
        out[batch.pairs, 0], out[batch.pairs, 1] = c.double().cpu().numpy(), r.double().cpu().numpy()
    return out


def preference_eval(policy: str | os.PathLike, prefs_dir: str | os.PathLike, reference=None, split: str = "val",
                    beta: float = 0.1) -> dict:
    """{"pairs", "logp_acc", "logp_margin"} (+ "reward_acc", "reward_margin" with a reference checkpoint)."""
    from z2all.data.prefs import PrefData
    from z2all.model.hf_compat import load_checkpoint

    data = PrefData(prefs_dir, split)
    if not len(data):
        raise UserError(f"{prefs_dir}: the {split} split has no pairs")
    model = load_checkpoint(policy, option="policy")[0].float().eval()
    lp = _pair_logps(model, data, split)
    d = lp[:, 0] - lp[:, 1]
    res = {"pairs": len(data), "logp_acc": float((d > 0).mean()), "logp_margin": float(d.mean())}
    if reference is not None:
        ref = _pair_logps(load_checkpoint(reference, option="reference")[0].float().eval(), data, split)
        r = beta * (d - (ref[:, 0] - ref[:, 1]))
        res.update(reward_acc=float((r > 0).mean()), reward_margin=float(r.mean()))
    return res


def exact_match_eval(ckpt: str | os.PathLike, records: list[dict], tokenizer=None, max_new_tokens: int = 32) -> dict:
    """Greedy answers to the records' prompts (sft.answer_records): {"all": acc, task: acc, ...} with
    synthetic.exact_match."""
    from z2all.data import synthetic
    from z2all.train.sft import answer_records

    preds = [text for text, _ in answer_records(ckpt, records, tokenizer, max_new_tokens)]
    return {task: s["accuracy"] for task, s in synthetic.score(records, preds).items()}


# ---------------------------------------------------------------- the benchmark

def _child() -> None:
    """python -c 'from z2all.bench.finetune import _child; _child()' MODULE OVERRIDES_JSON RESULT:
    module.run(load_config(module.Config, None, overrides)), then {"rc", "peak_rss"} into RESULT."""
    from z2all.config import load_config
    from z2all.io import atomic_write_json
    from z2all.utils import peak_rss_bytes

    module, overrides, result = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    mod = __import__(module, fromlist=["run", "Config"])
    try:
        rc = mod.run(load_config(mod.Config, None, overrides))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        rc = 2
    atomic_write_json(result, {"rc": rc, "peak_rss": peak_rss_bytes()})
    sys.exit(rc)


def run_child(module: str, overrides: dict | list[str], threads: int = 0, quiet: bool = False) -> dict:
    """Run `module.run(Config from overrides)` (e.g. "z2all.train.sft"; overrides as load_config takes them: a
    dict or "--section.key=value" strings) in a fresh Python process. Its output goes to ours, or with quiet
    is captured and only its stderr's tail returned ("stderr"). Returns {"rc", "peak_rss": the child's own
    peak RSS (VmHWM, bytes), "wall_s": wall time incl. its ~2-5 s of start-up and imports, "cpu_s": its user
    + system CPU seconds}. threads > 0 pins the child's OpenMP/MKL pools too (torch.set_num_threads alone
    leaves the inter-op pool at the default)."""
    import resource

    env = {**os.environ, "Z2ALL_NO_PROGRESS": "1"}
    if threads > 0:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with tempfile.TemporaryDirectory(prefix="z2all-child-") as tmp:
        result = Path(tmp) / "result.json"
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        sys.stdout.flush()
        proc = subprocess.run([sys.executable, "-c", "from z2all.bench.finetune import _child; _child()",
                               module, json.dumps(overrides), str(result)], env=env, capture_output=quiet, text=True)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        res = json.loads(result.read_text()) if result.is_file() else {"rc": proc.returncode, "peak_rss": 0}
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"rc": proc.returncode or res["rc"], "peak_rss": res["peak_rss"], "wall_s": wall, "cpu_s": cpu,
            "stderr": (proc.stderr or "").strip()[-500:]}


def checkpoint_cost(ckpt: Path) -> dict:
    """{"trainable": parameters the checkpoint stores (a LoRA checkpoint stores only its adapters),
    "ckpt_bytes": its weights + optimizer state on disk}."""
    from z2all.model.llama import read_safetensors

    trainable = sum(t.numel() for t in read_safetensors(ckpt / "model.safetensors").values())
    size = sum((ckpt / f).stat().st_size for f in ("model.safetensors", "optimizer.pt") if (ckpt / f).is_file())
    return {"trainable": trainable, "ckpt_bytes": size}


def _prepare(cfg: Config, work: Path) -> dict[str, Path]:
    from z2all.data import chat, prefs, synthetic
    from z2all.model.config import model_preset
    from z2all.model.llama import Z2all, save_model
    from z2all.tokenizer.train import Config as TokConfig
    from z2all.tokenizer.train import train_tokenizer

    p = {k: work / k for k in ("synth", "tok", "chat", "prefs", "base")}
    synthetic.run(synthetic.Config(out=str(p["synth"]), n=cfg.n, seed=0))
    recs = [json.loads(x) for x in (p["synth"] / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    texts = work / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": "\n".join(m["content"] for m in r["messages"])}, ensure_ascii=False)
                             + "\n" for r in recs), encoding="utf-8")
    train_tokenizer(TokConfig(inputs=[str(texts)], out_dir=str(p["tok"]), vocab_size=512, workers=1))
    chat.run(chat.Config(inputs=[str(p["synth"] / "train.jsonl")], tokenizer=str(p["tok"]), out=str(p["chat"]),
                         val_fraction=0.05, max_len=cfg.seq_len))
    pairs = work / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in prefs.synthetic_pairs(recs)),
                     encoding="utf-8")
    prefs.run(prefs.Config(inputs=[str(pairs)], tokenizer=str(p["tok"]), out=str(p["prefs"]), val_fraction=0.05,
                           max_len=cfg.seq_len))
    vocab = json.loads((p["chat"] / "meta.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    model = Z2all(model_preset("tiny", vocab_size=vocab, dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                               n_kv_heads=cfg.n_heads, max_seq_len=cfg.seq_len))
    save_model(model, p["base"])
    shutil.copytree(p["tok"], p["base"] / "tokenizer")
    return p


def _rows(cfg: Config) -> list[tuple[str, str, list[str]]]:
    lora = [f"--lora.rank={cfg.lora_rank}", f"--lora.targets={cfg.lora_targets}"]
    return [("SFT, full", "z2all.train.sft", []),
            (f"SFT, LoRA r{cfg.lora_rank}", "z2all.train.sft", lora),
            ("DPO, full, live reference (frozen copy)", "z2all.train.dpo", ["--dpo.reference=live"]),
            ("DPO, full, precomputed reference", "z2all.train.dpo", ["--dpo.reference=precomputed"]),
            (f"DPO, LoRA r{cfg.lora_rank}, base as reference", "z2all.train.dpo", lora)]


def _run_row(cfg: Config, p: dict[str, Path], module: str, extra: list[str], out: Path) -> dict:
    from z2all.train import checkpoint as ckpt_mod

    data = p["chat"] if module.endswith("sft") else p["prefs"]
    args = [f"--init={p['base']}", f"--data.dir={data}", f"--out_dir={out}", f"--train.max_steps={cfg.steps}",
            f"--data.batch_size={cfg.batch_size}", "--train.log_every=1", "--eval.every=0", "--eval.max_batches=1",
            "--metrics.tensorboard=false", f"--device={cfg.device}", f"--threads={cfg.threads}", "--ckpt.keep_last=1",
            *(["--data.seq_len=" + str(cfg.seq_len), "--eval.samples=0"] if module.endswith("sft") else []), *extra]
    res = run_child(module, args, quiet=True)
    if res["rc"] != 0:
        raise UserError(f"bench finetune: {module} {' '.join(extra)} failed: {res['stderr']}")
    peak, wall = res["peak_rss"], res["wall_s"]
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    tps = statistics.median(r["tokens_per_s"] for r in train[1:]) if len(train) > 1 else train[0]["tokens_per_s"]
    cost = checkpoint_cost(ckpt_mod.latest_checkpoint(out))
    if cfg.device.startswith("cuda"):
        peak = max(r.get("peak_mem_bytes", 0) for r in train)
    return {"tokens_per_s": tps, "peak_mem": peak, **cost, "wall_s": wall,
            "loss_first": train[0]["loss"], "loss_last": train[-1]["loss"]}


def run(cfg: Config) -> int:
    for name in ("dim", "n_layers", "n_heads", "seq_len", "steps", "batch_size", "n", "lora_rank"):
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')}={getattr(cfg, name)}: must be positive")
    out = None
    if cfg.out:
        from z2all.io import claim_output_dir

        out = claim_output_dir(cfg.out, "bench finetune", option="--out")
    tmp = None
    if cfg.work:
        work = Path(cfg.work)
        work.mkdir(parents=True, exist_ok=True)
        if any(work.iterdir()):
            raise UserError(f"--work {work} is not empty; give a new or empty directory")
    else:
        work = Path(tmp := tempfile.mkdtemp(prefix="z2all-bench-ft-"))
    try:
        print0(f"bench finetune: preparing data and a random base (dim {cfg.dim}, {cfg.n_layers} layers) in {work}")
        p = _prepare(cfg, work)
        results = []
        for label, module, extra in _rows(cfg):
            r = _run_row(cfg, p, module, extra, work / f"run{len(results)}")
            results.append({"row": label, **r})
            print0(f"  {label}: {r['tokens_per_s']:,.0f} tok/s, peak {human_bytes(r['peak_mem'])}, "
                   f"checkpoint {human_bytes(r['ckpt_bytes'])}, {r['wall_s']:.1f} s")
        mem = "peak allocated" if cfg.device.startswith("cuda") else "peak RSS"
        table = markdown_table(
            ["run", "trainable params", "tokens/s", mem, "checkpoint (weights + optimizer)", "wall s",
             "loss first -> last"],
            [[r["row"], f"{r['trainable']:,}", f"{r['tokens_per_s']:,.0f}", human_bytes(r["peak_mem"]),
              human_bytes(r["ckpt_bytes"]), f"{r['wall_s']:.1f}", f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}"]
             for r in results])
        note = (f"{cfg.steps} steps of {cfg.batch_size} rows/pairs, dim {cfg.dim} x {cfg.n_layers} layers, device "
                f"{cfg.device}; each run in its own process (wall time includes its start-up and, for the "
                f"precomputed reference, the one pass over all pairs)")
        print0(table + "\n" + note)
        if out is not None:
            from z2all.io import atomic_write_json, atomic_write_text

            atomic_write_text(out / "report.md", table + "\n\n" + note + "\n")
            atomic_write_json(out / "results.json", {"config": cfg.__dict__, "rows": results})
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0
