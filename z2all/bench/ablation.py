"""`z2all bench ablation`: the ablation table of the original llm-zero2all project (the one this repository
rewrites) on one GPU, through the training loop's own step.

    z2all bench ablation                      # 1b preset, 2 x 2048 tokens x 16 accumulation (the original's setting)
    z2all bench ablation --short              # 4 accumulation steps, 2 measured iterations: a few minutes
    z2all bench ablation --data_dir data/tokens --preset 125m

Rows: `naive` (every op the PyTorch reference, attention with an explicit masked softmax), `sdpa` (the
references with torch's scaled_dot_product_attention), `use_all` (every op our Triton kernel), `use_all
w/o <op>` (that one op back to its reference: attention to the naive one), and `use_all + compile`
(torch.compile on every block). Columns: s/iter, tokens/s, MFU against the device's dense bf16 peak
(train.metrics.PEAK_BF16_TFLOPS), peak allocated memory, and the loss after the same iterations on the
same batches (the rows must agree to bf16 noise: a kernel that trains differently shows up here).

Each row builds the model from the same seed, uses fused AdamW and bf16 autocast, runs one warm-up
iteration (Triton autotuning, compilation), then `--iters` timed ones with `pretrain.forward_backward`.
Batches come from `--data_dir` token files when given, else seeded random tokens (loss ~ ln V then).

Each row is printed, and appended to `--out` when given, as soon as it is measured (the order of the table:
the references, use_all, the w/o rows, compile last), so a run cut short keeps its rows; at the end `--out`
is replaced by the aligned table.

Without a GPU the Triton kernels cannot run natively: a tiny CPU version of the reference rows runs
instead (MFU n/a) so the command and its table can be checked anywhere; the GPU rows are listed as n/a.
The original project measured (A800, ~1B, 2 x 2048 x 16): naive 9.85 s/iter, 18.41% MFU, 71.3 GB; use_all 3.23 s/iter,
56.06% MFU, 27.9 GB.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass

import torch

from z2all.bench import RowTable, machine_name
from z2all.config import opt
from z2all.ops import OPS, OpsConfig
from z2all.utils import UserError, human_bytes, print0

REFERENCE = {"rmsnorm": "torch", "rope": "torch", "swiglu": "torch", "attention": "naive", "cross_entropy": "torch"}


@dataclass
class Config:
    preset: str = opt("1b", "model preset (on CPU the tiny preset is used whatever this says)")
    batch_size: int = opt(2, "micro-batch size")
    seq_len: int = opt(2048, "sequence length")
    grad_accum: int = opt(16, "micro-batches per iteration")
    iters: int = opt(3, "timed iterations per row (after one warm-up iteration)")
    short: bool = opt(False, "a few minutes: grad_accum 4, 2 timed iterations")
    rows: list[str] = opt(None, "only these rows (names as in the table); default: all", factory=list)
    data_dir: str = opt("", "token files to draw batches from; '' = seeded random tokens")
    vocab_size: int = opt(32000, "vocabulary for random tokens (ignored with --data_dir)")
    lr: float = opt(3e-4, "AdamW learning rate (constant: the loss column compares rows, not schedules)")
    peak_tflops: float = opt(0.0, "dense bf16 peak TFLOP/s of the device; 0 = from the table")
    seed: int = opt(0, "model init and random-batch seed")
    out: str = opt("", "also write the markdown table to this file (row by row as measured)")


def row_specs() -> list[tuple[str, dict, bool]]:
    """(name, per-op implementation, compile) for every row of the original project's table."""
    use_all = {op: "triton" for op in OPS}
    rows = [("naive", dict(REFERENCE), False),
            ("sdpa", {**REFERENCE, "attention": "sdpa"}, False),
            ("use_all", use_all, False)]
    rows += [(f"use_all w/o {op}", {**use_all, op: REFERENCE[op]}, False) for op in OPS]
    rows.append(("use_all + compile", use_all, True))
    return rows


class RandomBatches:
    """`get_batch(step, micro)` like TokenLoader, from a generator seeded by (seed, step, micro)."""

    def __init__(self, vocab: int, batch: int, seq: int, seed: int):
        self.vocab, self.batch, self.seq, self.seed = vocab, batch, seq, seed

    def get_batch(self, step: int, micro: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 1009 + micro)
        t = torch.randint(0, self.vocab, (self.batch, self.seq + 1), generator=g)
        return t[:, :-1], t[:, 1:]


def measure_row(cfg: Config, mcfg, ops: dict, compile_: bool, loader, device: torch.device, peak) -> dict:
    from z2all.model.llama import Z2all
    from z2all.train import distributed as dist_mod
    from z2all.train.metrics import mfu
    from z2all.train.optim import OptimConfig, make_optimizer
    from z2all.train.pretrain import forward_backward

    torch.manual_seed(cfg.seed)
    with device:  # initialise on the device: a 1B model's normal_ init on the CPU takes ~15 s per row
        model = Z2all(mcfg, OpsConfig(**ops))
    if compile_:
        dist_mod.apply_compile(model)
    opt_ = make_optimizer(model, OptimConfig(lr=cfg.lr, warmup_steps=0), device)
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times, loss = [], float("nan")
    for it in range(cfg.iters + 1):
        t0 = time.perf_counter()
        loss_t = forward_backward(model, loader, it, cfg.grad_accum, device, autocast)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt_.step()
        opt_.zero_grad(set_to_none=True)
        loss = float(loss_t)  # synchronises
        if it > 0:  # iteration 0 warms up (autotuning, compilation)
            times.append(time.perf_counter() - t0)
    s_iter = sum(times) / len(times)
    tps = cfg.batch_size * cfg.seq_len * cfg.grad_accum / s_iter
    mem = torch.cuda.max_memory_allocated(device) if cuda else None
    flops = model.flops_per_token(cfg.seq_len)
    del model, opt_
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return {"s_iter": s_iter, "tokens_s": tps, "mfu": mfu(flops, tps, peak), "mem": mem, "loss": loss}


def run(cfg: Config) -> int:
    from z2all.model.config import model_preset
    from z2all.train.metrics import device_peak_flops, fmt_mfu

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cfg.short:
        cfg.grad_accum, cfg.iters = min(cfg.grad_accum, 4), min(cfg.iters, 2)
    specs = row_specs()
    if cfg.rows:
        unknown = sorted(set(cfg.rows) - {n for n, _, _ in specs})
        if unknown:
            raise UserError(f"unknown row(s) {', '.join(unknown)}; rows: {', '.join(n for n, _, _ in specs)}")
        specs = [s for s in specs if s[0] in cfg.rows]
    if not cuda:
        print0("bench ablation: no CUDA GPU here. The table is a GPU measurement (Triton kernels, bf16, MFU); "
               "running a tiny CPU version of the reference rows instead (tiny preset, vocab <= 4096, 2 x 128 "
               "tokens x 2, fp32, MFU n/a). Run it on a GPU for the real table.")
        cfg.preset, cfg.batch_size, cfg.seq_len, cfg.grad_accum, cfg.iters = "tiny", 2, 128, 2, min(cfg.iters, 2)
        cfg.vocab_size = min(cfg.vocab_size, 4096)
    vocab = cfg.vocab_size
    if cfg.data_dir:
        from z2all.data.loader import TokenLoader

        loader = TokenLoader(cfg.data_dir, "train", cfg.batch_size, cfg.seq_len, seed=cfg.seed,
                             grad_accum=cfg.grad_accum)
        vocab = int(loader.meta["vocab_size"])
    else:
        loader = RandomBatches(vocab, cfg.batch_size, cfg.seq_len, cfg.seed)
    max_len = max(cfg.seq_len, model_preset(cfg.preset).max_seq_len)
    mcfg = model_preset(cfg.preset, vocab_size=vocab, max_seq_len=max_len)
    peak = device_peak_flops(device, cfg.peak_tflops)
    print0(f"bench ablation: {cfg.preset} ({mcfg.n_layers} layers, dim {mcfg.dim}, vocab {vocab}), "
           f"{cfg.grad_accum} grad accum steps * {cfg.batch_size} batch size * {cfg.seq_len} max seq len, "
           f"{cfg.iters} timed iterations; {machine_name()}")
    where = "bf16 autocast, fused AdamW" if cuda else "fp32, CPU fallback"
    table = RowTable(f"## z2all bench ablation ({cfg.preset}, {cfg.grad_accum} x {cfg.batch_size} x {cfg.seq_len} "
                     f"tokens per iteration, mean of {cfg.iters} iterations, {where}; {machine_name()})",
                     ["row", "s/iter", "tokens/s", "MFU", "peak memory", "loss", "speed vs first"], cfg.out)
    base = None
    for name, ops, compile_ in specs:
        needs_gpu = compile_ or any(v == "triton" for v in ops.values())
        if needs_gpu and not cuda:
            table.row([name, "n/a (GPU)", "", "", "", "", ""])
            continue
        r = measure_row(cfg, mcfg, ops, compile_, loader, device, peak)
        if base is None:
            base = r["s_iter"]
        table.row([name, f"{r['s_iter']:.3f}", f"{r['tokens_s']:,.0f}", fmt_mfu(r["mfu"]),
                   human_bytes(r["mem"]) if r["mem"] is not None else "n/a",
                   f"{r['loss']:.4f}", f"{base / r['s_iter']:.2f}x"])
    table.finish()
    return 0
