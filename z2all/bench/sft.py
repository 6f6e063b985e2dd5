"""`z2all bench sft`: packed vs padded SFT batches on the same examples: rows, the share of padding, and
training throughput (forward + backward + AdamW) in real (non-padding) tokens per second.

    z2all bench sft                                   # synthetic tasks, our tokenizer, tiny model, CPU: ~1 min
    z2all bench sft --chat data/chat --seq-len 1024 --batch-size 8 --device cuda --dtype bf16

Input: `--chat DIR` (a `z2all data chat` directory), else a throwaway one built in a temp dir: `--synth-n`
synthetic examples (z2all data synth) rendered with a 1,024-token BPE trained on them. The first `--examples`
train examples, in file order, are batched both ways with `--batch-size` rows per step:
  pack  examples packed into rows of --seq-len (segment ids: each attends only to itself; positions restart)
  pad   one example per row, padded to the longest row of its batch
Each timed round is one pass over those examples (every step: forward, backward, AdamW step), alternating
pack and pad; each reports its best round (background load only ever adds time). The loss summed over every
target token is the same work in both modes (the same examples, the same targets); only the padding differs.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from z2all.bench import machine_name, markdown_table
from z2all.config import opt
from z2all.utils import UserError, pick_device, pick_dtype, print0


@dataclass
class Config:
    chat: str = opt("", "chat data directory (z2all data chat); default: a synthetic one built in a temp dir")
    synth_n: int = opt(3000, "without --chat: synthetic examples generated")
    examples: int = opt(512, "train examples batched both ways")
    seq_len: int = opt(256, "packed row length (longer examples are cut to it)")
    batch_size: int = opt(8, "rows per step")
    preset: str = opt("tiny", "model preset (vocabulary from the chat data)")
    attention: str = opt("sdpa", "attention implementation (the packed path uses its segment_ids)",
                         choices=("sdpa", "naive", "triton"))
    device: str = opt("cpu", "device to run on")
    dtype: str = opt("fp32", "autocast dtype", choices=("fp32", "bf16", "fp16"))
    rounds: int = opt(3, "timed rounds per mode (alternating)")
    threads: int = opt(1, "torch intra-op threads (0 = torch's default)")
    seed: int = opt(0, "seed for the weights")


def _synthetic_chat(root: Path, n: int) -> Path:
    import json

    from z2all.data import chat, synthetic
    from z2all.tokenizer.train import Config as TokConfig
    from z2all.tokenizer.train import train_tokenizer

    synthetic.run(synthetic.Config(out=str(root / "synth"), n=n, seed=0))
    texts = root / "texts.jsonl"
    with texts.open("w", encoding="utf-8") as f:
        for line in (root / "synth" / "train.jsonl").read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            f.write(json.dumps({"text": "\n".join(m["content"] for m in rec["messages"])}, ensure_ascii=False) + "\n")
    train_tokenizer(TokConfig(inputs=[str(texts)], out_dir=str(root / "tok"), vocab_size=1024, workers=1))
    chat.run(chat.Config(inputs=[str(root / "synth" / "train.jsonl")], tokenizer=str(root / "tok"),
                         out=str(root / "chat"), val_fraction=0.0, max_len=0))
    return root / "chat"


def _batches(chat_dir: Path, cfg: Config, mode: str):
    from z2all.data.sft_loader import SFTBatches

    b = SFTBatches(chat_dir, "train", seq_len=cfg.seq_len, batch_size=cfg.batch_size, mode=mode, shuffle=False)
    b.examples = b.examples[:cfg.examples]
    b.lengths = b.lengths[:cfg.examples]
    rows = b.epoch_rows(0)
    return b, [b.collate(rows[i:i + cfg.batch_size]) for i in range(0, len(rows), cfg.batch_size)]


def run(cfg: Config) -> int:
    import json

    from z2all.data.sft_loader import sft_loss
    from z2all.model.config import model_preset
    from z2all.model.llama import Z2all
    from z2all.ops import OpsConfig

    for key in ("examples", "seq_len", "batch_size", "rounds", "synth_n"):
        if getattr(cfg, key) <= 0:
            raise UserError(f"--{key.replace('_', '-')}={getattr(cfg, key)}: must be positive")
    old_threads = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    amp = pick_dtype(cfg.dtype, device)
    try:
        with tempfile.TemporaryDirectory(prefix="z2all-bench-sft-") as tmp:
            chat_dir = Path(cfg.chat) if cfg.chat else _synthetic_chat(Path(tmp), cfg.synth_n)
            vocab = int(json.loads((chat_dir / "meta.json").read_text(encoding="utf-8"))["vocab_size"])
            modes = {m: _batches(chat_dir, cfg, m) for m in ("pack", "pad")}
        torch.manual_seed(cfg.seed)
        model = Z2all(model_preset(cfg.preset, vocab_size=vocab, max_seq_len=max(256, cfg.seq_len)),
                      OpsConfig(attention=cfg.attention)).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        autocast = torch.autocast(device.type, dtype=amp, enabled=amp != torch.float32)

        def one_pass(batches) -> tuple[float, float]:
            t0 = time.perf_counter()
            total = 0.0
            for b in batches:
                with autocast:
                    loss = sft_loss(model, b, device)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                total += float(loss.detach()) * int((b.y != -100).sum())
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0, total

        for m in modes:  # warm-up (allocator, kernels)
            one_pass(modes[m][1][:2])
        times: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(cfg.rounds):
            for m in modes:
                times[m].append(one_pass(modes[m][1])[0])
    finally:
        torch.set_num_threads(old_threads)

    rows, tps = [], {}
    for m, (b, batches) in modes.items():
        real = sum(b.lengths)
        positions = sum(x.x.numel() for x in batches)
        best = min(times[m])
        tps[m] = real / best
        rows.append([m, len(b.examples), len(b.epoch_rows(0)), len(batches), f"{positions:,}",
                     f"{1 - real / positions:.1%}", f"{best:.2f}", f"{tps[m]:,.0f}"])
    print0(f"z2all bench sft: {cfg.examples} examples of {chat_dir if cfg.chat else 'synthetic chat data'}, "
           f"{cfg.preset} model, {cfg.attention} attention, batch {cfg.batch_size} rows, seq_len {cfg.seq_len}, "
           f"{device} {str(amp).removeprefix('torch.')}, {cfg.threads or torch.get_num_threads()} threads; "
           f"{machine_name()}")
    print0(markdown_table(["batching", "examples", "rows", "steps", "positions computed", "padding",
                           "best pass s", "real tokens/s"], rows))
    print0(f"packed / padded throughput: {tps['pack'] / tps['pad']:.2f}x (real tokens per second)")
    return 0
