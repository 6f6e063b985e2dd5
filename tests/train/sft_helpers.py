"""Fixtures for the SFT tests: the synthetic task set rendered with a small ChatML tokenizer (`z2all data chat`),
and a tiny random "pretrained" checkpoint carrying that tokenizer; plus a runner for `z2all sft` in-process
or in a subprocess (optionally under torchrun)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from train_helpers import REPO, cli_env, run_cli

# a tiny model and short rows: steps take milliseconds on one thread
TINY_SFT = ["--data.seq_len=128", "--data.batch_size=4", "--eval.max_batches=2", "--eval.samples=2",
            "--eval.sample_tokens=8", "--metrics.tensorboard=false", "--device=cpu", "--optim.warmup_steps=2",
            "--optim.lr=3e-3", "--optim.min_lr=3e-4", "--threads=1"]


def make_sft_inputs(root: Path, n: int = 400, dim: int = 32, n_layers: int = 2) -> dict[str, Path]:
    """root/{synth,tok,chat,base}: synthetic records, a 384-token BPE with our ChatML template, the chat data
    (10% val) and a random tiny checkpoint with tokenizer/ (what `z2all train` saves)."""
    import torch

    from z2all.data import chat, synthetic
    from z2all.model.config import model_preset
    from z2all.model.llama import Z2all, save_model
    from z2all.tokenizer.train import Config as TokConfig
    from z2all.tokenizer.train import train_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    synthetic.run(synthetic.Config(out=str(root / "synth"), n=n, seed=0))
    texts = root / "texts.jsonl"
    with texts.open("w", encoding="utf-8") as f:
        for line in (root / "synth" / "train.jsonl").read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            f.write(json.dumps({"text": "\n".join(m["content"] for m in rec["messages"])}, ensure_ascii=False) + "\n")
    train_tokenizer(TokConfig(inputs=[str(texts)], out_dir=str(root / "tok"), vocab_size=384, workers=1))
    chat.run(chat.Config(inputs=[str(root / "synth" / "train.jsonl")], tokenizer=str(root / "tok"),
                         out=str(root / "chat"), val_fraction=0.1, max_len=128))
    vocab = json.loads((root / "chat" / "meta.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    model = Z2all(model_preset("tiny", vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=2, n_kv_heads=1,
                               max_seq_len=128))
    save_model(model, root / "base")
    shutil.copytree(root / "tok", root / "base" / "tokenizer")
    return {"synth": root / "synth", "tok": root / "tok", "chat": root / "chat", "base": root / "base"}


def sft_args(inputs: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["sft", f"--init={inputs['base']}", f"--data.dir={inputs['chat']}", f"--out_dir={out}", *TINY_SFT, *extra]


def run_sft_cli(args: list[str], *, nproc: int = 1, timeout: float = 300, check: bool = True,
                popen: bool = False):
    """train_helpers.run_cli (the same handling of a rank that aborts at exit after the run finished), or a
    Popen with its output discarded."""
    if popen:
        cmd = [sys.executable, "-m", "z2all", *args]
        return subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return run_cli(args, nproc=nproc, timeout=timeout, check=check)


def run_sft_inproc(args: list[str]) -> int:
    from z2all import cli

    return cli.main(args)
