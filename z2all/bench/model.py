"""`z2all bench model`: our Z2all vs transformers' LlamaForCausalLM, same weights (via to_hf), same config,
dtype and inputs, side by side in one run:

- training step (forward + backward + AdamW step) tokens/s;
- generation tokens/s with a KV cache: our `generate` (preallocated cache) vs `LlamaForCausalLM.generate`
  (greedy, both forced to produce exactly `gen_new_tokens` tokens).

    z2all bench model                                    # tiny preset, fp32, CPU: ~1-2 minutes on 2 cores
    z2all bench model --preset 125m --seq-len 512 --device cuda --dtype bf16

Both sides alternate round by round and each reports its best round (best-of-N: background load on a
shared machine only ever adds time, and alternating exposes both sides to it alike); the medians are
printed under the table. Every timed round is one warm step or one whole `generate` call in this process
(models built, one warm-up round each): no process start, import or model construction is in the clock.
Attention is SDPA on both sides (ours: the default `sdpa` op).

`--out DIR` also writes DIR/report.md (what was printed) and DIR/config.json (the resolved config, the
machine, versions and every round's time); DIR must be new, empty or an earlier --out of this command.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from z2all.bench import machine_name, markdown_table
from z2all.config import opt, save_config
from z2all.utils import pick_device, pick_dtype, print0


@dataclass
class Config:
    preset: str = opt("tiny", "model preset (z2all.model.config.PRESETS)")
    vocab_size: int = opt(8192, "vocabulary size (0 = the preset's)")
    device: str = opt("cpu", "device to run on (the target is set on CPU)")
    dtype: str = opt("fp32", "parameter/compute dtype for both models", choices=("fp32", "bf16", "fp16"))
    batch_size: int = opt(4, "training batch size")
    seq_len: int = opt(256, "training sequence length")
    train_rounds: int = opt(8, "timed training rounds (each: one step of ours, one of transformers)")
    gen_batch: int = opt(1, "prompts generated together")
    gen_prompt_len: int = opt(32, "prompt tokens")
    gen_new_tokens: int = opt(64, "tokens generated per prompt")
    gen_rounds: int = opt(3, "timed generation rounds (each: ours, then transformers)")
    seed: int = opt(0, "random seed for weights and inputs")
    threads: int = opt(0, "torch intra-op threads (0 = torch's default); 1 gives steadier numbers on a shared "
                       "machine, where a busy neighbour stalls every multi-threaded op")
    out: str = opt("", "also write report.md and config.json (resolved config + every round's time) here")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(cfg: Config) -> int:
    from transformers.utils import logging as hf_logging

    out_dir = None
    if cfg.out:  # claim it before the run, not after
        from z2all.io import claim_output_dir

        out_dir = claim_output_dir(cfg.out, "bench model")

    hf_logging.set_verbosity_error()
    threads = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        lines, rounds = _run(cfg)
    finally:
        torch.set_num_threads(threads)
    if out_dir is not None:
        from z2all.io import atomic_write_text

        atomic_write_text(Path(out_dir) / "report.md", "\n".join(lines) + "\n")
        save_config(cfg, Path(out_dir) / "config.json", command="z2all bench model", machine=machine_name(),
                    versions={"torch": torch.__version__, "transformers": _hf_version()}, rounds=rounds)
        print0(f"\nwrote {out_dir}/report.md and {out_dir}/config.json")
    return 0


def _run(cfg: Config) -> tuple[list[str], dict]:
    """Measure and print; returns (the printed lines, every round's seconds per workload and side)."""
    from z2all.model.config import model_preset
    from z2all.model.generate import generate
    from z2all.model.hf_compat import to_hf
    from z2all.model.llama import Z2all

    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    mcfg = model_preset(cfg.preset, **({"vocab_size": cfg.vocab_size} if cfg.vocab_size else {}))
    mcfg.max_seq_len = max(mcfg.max_seq_len, cfg.seq_len, cfg.gen_prompt_len + cfg.gen_new_tokens)
    torch.manual_seed(cfg.seed)
    ours = Z2all(mcfg).to(device=device, dtype=dtype)
    hf = to_hf(ours)
    hf.set_attn_implementation("sdpa")
    V = mcfg.vocab_size

    # ---- training step: the same batch, the same optimizer
    x = torch.randint(0, V, (cfg.batch_size, cfg.seq_len + 1), device=device)
    inp, tgt = x[:, :-1], x[:, 1:].clone()
    # transformers scores position i against labels[i + 1] (labels = inp) and leaves the last position
    # unscored; ignoring our last target makes the two losses the same quantity
    tgt[:, -1] = -100
    ours.train()
    hf.train()
    opts = {"ours": torch.optim.AdamW(ours.parameters(), lr=1e-4), "hf": torch.optim.AdamW(hf.parameters(), lr=1e-4)}

    def step(name: str) -> float:
        t0 = time.perf_counter()
        if name == "ours":
            _, loss = ours(inp, tgt)
        else:
            loss = hf(input_ids=inp, labels=inp).loss
        loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - t0

    with torch.no_grad():  # sanity: the two models compute the same loss on the same batch
        loss_ours = ours(inp, tgt)[1].item()
        loss_hf = hf(input_ids=inp, labels=inp).loss.item()
    times: dict[str, list[float]] = {"ours": [], "hf": []}
    step("ours"), step("hf")  # warm-up (allocator, kernel selection)
    for _ in range(cfg.train_rounds):
        for name in ("ours", "hf"):
            times[name].append(step(name))
    train_tps = {k: cfg.batch_size * cfg.seq_len / min(v) for k, v in times.items()}  # best round

    # ---- generation with a KV cache
    ours.eval()
    hf.eval()
    prompts = torch.randint(0, V, (cfg.gen_batch, cfg.gen_prompt_len), device=device)
    n_new = cfg.gen_new_tokens

    def gen(name: str) -> tuple[float, list[list[int]]]:
        t0 = time.perf_counter()
        if name == "ours":
            out = generate(ours, prompts.tolist(), n_new)
        else:
            with torch.inference_mode():
                ids = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n_new,
                                  min_new_tokens=n_new, do_sample=False, eos_token_id=None, pad_token_id=0)
            out = ids[:, cfg.gen_prompt_len:].tolist()
        _sync(device)
        return time.perf_counter() - t0, out

    gtimes: dict[str, list[float]] = {"ours": [], "hf": []}
    outs = {}
    gen("ours"), gen("hf")  # warm-up
    for _ in range(cfg.gen_rounds):
        for name in ("ours", "hf"):
            dt, outs[name] = gen(name)
            gtimes[name].append(dt)
    gen_tps = {k: cfg.gen_batch * n_new / min(v) for k, v in gtimes.items()}
    same = sum(a == b for ra, rb in zip(outs["ours"], outs["hf"]) for a, b in zip(ra, rb))

    n_params = ours.num_params()
    lines: list[str] = []

    def emit(text: str) -> None:
        print0(text)
        lines.append(text)

    emit(f"## z2all bench model: ours vs transformers {_hf_version()} LlamaForCausalLM\n")
    emit(f"machine: {machine_name()}, {torch.get_num_threads()} torch threads, device {device}, {cfg.dtype}")
    emit(f"model: preset {cfg.preset} ({n_params / 1e6:.1f}M params, dim {mcfg.dim}, {mcfg.n_layers} layers, "
         f"{mcfg.n_heads}/{mcfg.n_kv_heads} heads, vocab {V}); same weights on both sides\n")
    rows = [
        [f"train step (fwd+bwd+AdamW), batch {cfg.batch_size} x seq {cfg.seq_len}", train_tps["ours"],
         train_tps["hf"], f"{train_tps['ours'] / train_tps['hf']:.2f}x"],
        [f"generate, KV cache, greedy: {cfg.gen_batch} x ({cfg.gen_prompt_len} prompt + {n_new} new)",
         gen_tps["ours"], gen_tps["hf"], f"{gen_tps['ours'] / gen_tps['hf']:.2f}x"],
    ]
    emit(markdown_table(["workload", "ours tokens/s", "transformers tokens/s", "ours / transformers"], rows))
    med = lambda ts, n: {k: n / statistics.median(v) for k, v in ts.items()}
    train_med, gen_med = med(times, cfg.batch_size * cfg.seq_len), med(gtimes, cfg.gen_batch * n_new)
    emit(f"\nloss on the same batch: ours {loss_ours:.5f}, transformers {loss_hf:.5f}; "
         f"greedy tokens identical: {same}/{cfg.gen_batch * n_new}; best of {cfg.train_rounds} training "
         f"and {cfg.gen_rounds} generation rounds, alternating; medians (tokens/s): train ours "
         f"{train_med['ours']:,.0f} vs {train_med['hf']:,.0f}, generate ours {gen_med['ours']:,.1f} vs "
         f"{gen_med['hf']:,.1f}; the clock covers warm steps and whole generate calls only")
    return lines, {"train_step_s": times, "generate_s": gtimes, "loss": {"ours": loss_ours, "hf": loss_hf},
                   "greedy_tokens_identical": same}


def _hf_version() -> str:
    import transformers

    return transformers.__version__
