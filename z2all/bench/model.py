"""`z2all bench model`: our Z2all vs transformers' LlamaForCausalLM, same weights (via to_hf), same config,
dtype and inputs, side by side in one run:

- training step (forward + backward + AdamW step) tokens/s;
- generation tokens/s with a KV cache: our `generate` (preallocated cache) vs `LlamaForCausalLM.generate`
  (greedy, both forced to produce exactly `gen_new_tokens` tokens).

    z2all bench model                                    # tiny preset, fp32, CPU: ~1-2 minutes on 2 cores
    z2all bench model --preset 125m --seq-len 512 --device cuda --dtype bf16

Both sides alternate round by round and each reports its best round (best-of-N: background load on a
shared machine only ever adds time, and alternating exposes both sides to it alike). Attention is SDPA
on both sides (ours: the default `sdpa` op).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from z2all.bench import machine_name, markdown_table
from z2all.config import opt
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(cfg: Config) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    threads = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: Config) -> int:
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
    print0(f"## z2all bench model: ours vs transformers {_hf_version()} LlamaForCausalLM\n")
    print0(f"machine: {machine_name()}, {torch.get_num_threads()} torch threads, device {device}, {cfg.dtype}")
    print0(f"model: preset {cfg.preset} ({n_params / 1e6:.1f}M params, dim {mcfg.dim}, {mcfg.n_layers} layers, "
           f"{mcfg.n_heads}/{mcfg.n_kv_heads} heads, vocab {V}); same weights on both sides\n")
    rows = [
        [f"train step (fwd+bwd+AdamW), batch {cfg.batch_size} x seq {cfg.seq_len}", train_tps["ours"],
         train_tps["hf"], f"{train_tps['ours'] / train_tps['hf']:.2f}x"],
        [f"generate, KV cache, greedy: {cfg.gen_batch} x ({cfg.gen_prompt_len} prompt + {n_new} new)",
         gen_tps["ours"], gen_tps["hf"], f"{gen_tps['ours'] / gen_tps['hf']:.2f}x"],
    ]
    print0(markdown_table(["workload", "ours tokens/s", "transformers tokens/s", "ours / transformers"], rows))
    print0(f"\nloss on the same batch: ours {loss_ours:.5f}, transformers {loss_hf:.5f}; "
           f"greedy tokens identical: {same}/{cfg.gen_batch * n_new}; best of {cfg.train_rounds} training "
           f"and {cfg.gen_rounds} generation rounds, alternating")
    return 0


def _hf_version() -> str:
    import transformers

    return transformers.__version__
