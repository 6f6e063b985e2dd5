"""`z2all bench llamacpp`: single-stream decode speed of our generate() against llama.cpp running the same
weights exported to GGUF (f32, f16, q8_0): batch 1, the same prompt, the same number of greedy tokens, the
same thread budget, side by side in one run; plus our serving engine's aggregate tokens/s at --streams
concurrent streams (continuous batching, in this process, no HTTP) against llama.cpp's single stream. Needs
llama-cpp-python (pip install 'llm-zero2all[llamacpp]'; it builds from source, ~6 min on 2 cores).

    z2all bench llamacpp --ckpt runs/demo/train                 # 128 new tokens, 2 threads, best of 3
    z2all bench llamacpp --preset 125m --dtypes f32             # a random-weight 125m-preset model
    z2all bench llamacpp --ckpt runs/demo/train --threads 1 --new-tokens 256

--preset builds the named model preset (model/config.py) with random weights (seed 0) and a 4,096-token BPE
trained on the demo corpus in a second (bench/serve.py demo_tokenizer; the GGUF pads the vocabulary to the
preset's rows): decode speed does not depend on the weights' values, and both sides run the same weights.

What each number counts: "tokens/s" = new tokens / wall seconds of one generation call, prompt prefill
included (the prompt is short: a few tokens, --prompt), model building, loading and GGUF export excluded; best of
--repeats rounds, the rows alternating within each round so background load hits every row alike. Our rows
name the threads their decode steps ran on: the auto rule (model/generate.py decode_threads) runs a model
under 64 MB on one thread and a larger one on --threads; the "forced" row runs the other choice. The engine
row counts all streams' tokens over the wall time from submitting them together to the last one finishing
(their prefills included). "same greedy tokens" compares each row's tokens with ours (plain forward, f32;
the engine row: its worst stream). With --threads above 1, "llama.cpp f32-1" is llama.cpp on 1 thread, the
count our small-model rows decode on. llama.cpp's generation runs past end-of-text as ours does (no stop), so
every row produces exactly --new-tokens tokens.
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from z2all.bench import machine_name
from z2all.config import opt
from z2all.utils import UserError, markdown_table, print0


@dataclass
class Config:
    ckpt: str = opt("", "checkpoint, run directory (latest checkpoint) or HF Llama directory")
    preset: str = opt("", "instead of --ckpt: a model preset (e.g. 125m) with random weights and the demo BPE")
    prompt: str = opt("The LORD said unto", "the prompt every row continues")
    new_tokens: int = opt(128, "greedy tokens per generation")
    threads: int = opt(2, "CPU threads for torch and for llama.cpp")
    repeats: int = opt(3, "interleaved rounds; the best of each row is reported")
    dtypes: list[str] = opt(factory=lambda: ["f32", "f16", "q8_0"], help="GGUF types to run in llama.cpp")
    streams: int = opt(8, "concurrent streams of the engine row (continuous batching, in-process); 0 = no row")


def _ours(model, ids: list[int], n: int, decode: str, threads: int = 0) -> tuple[list[int], float]:
    from z2all.model.generate import generate

    t0 = time.perf_counter()
    out = generate(model, [ids], n, decode=decode, threads=threads)[0]
    return out, time.perf_counter() - t0


def _engine(engine, ids: list[int], n: int, streams: int) -> tuple[list[list[int]], float]:
    """`streams` greedy requests of n tokens submitted together; (each one's tokens, wall seconds)."""
    from z2all.serve.engine import SamplingParams

    left = threading.Semaphore(0)
    t0 = time.perf_counter()
    reqs = [engine.submit(ids, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True),
                          lambda ev: ev.final and left.release()) for _ in range(streams)]
    for _ in reqs:
        if not left.acquire(timeout=600):
            raise UserError("the engine row did not finish in 600 s")
    secs = time.perf_counter() - t0
    return [r.out for r in reqs], secs


def _cpp(llm, ids: list[int], n: int) -> tuple[list[int], float]:
    llm.reset()
    out = []
    t0 = time.perf_counter()
    for t in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        out.append(int(t))
        if len(out) == n:
            break
    return out, time.perf_counter() - t0


def _model(cfg: Config, tmp: Path):
    """(model in fp32 eval mode, tokenizer directory, a name for the title)."""
    import torch

    if cfg.preset:
        from z2all.bench.serve import demo_tokenizer
        from z2all.model.config import model_preset
        from z2all.model.llama import Z2all

        mcfg = model_preset(cfg.preset)  # a bad name is a UserError listing the presets
        tok_dir, n_tok = demo_tokenizer(tmp, "llama-bpe")
        torch.manual_seed(0)
        model = Z2all(model_preset(cfg.preset, vocab_size=max(mcfg.vocab_size, n_tok)))
        return model.float().eval(), tok_dir, f"preset {cfg.preset} (random weights, demo BPE)"
    from z2all.model.hf_compat import default_tokenizer_dir, load_checkpoint

    model, directory, kind, note = load_checkpoint(cfg.ckpt)
    if note:
        print0(note)
    return model.float().eval(), default_tokenizer_dir(directory, kind), str(directory)


def run(cfg: Config) -> int:
    if not cfg.ckpt and not cfg.preset:
        raise UserError("give --ckpt (a checkpoint, run directory or HF Llama directory) or --preset NAME")
    if cfg.ckpt and cfg.preset:
        raise UserError("give --ckpt or --preset, not both")
    if cfg.new_tokens < 1 or cfg.repeats < 1 or cfg.threads < 1 or cfg.streams < 0:
        raise UserError("--new-tokens, --repeats and --threads must be >= 1 (--streams >= 0)")
    try:
        import llama_cpp
    except ImportError:
        raise UserError("llama-cpp-python is not installed: pip install 'llm-zero2all[llamacpp]' (builds from "
                        "source, ~6 min on 2 cores)") from None
    import torch
    from tokenizers import Tokenizer

    from z2all.model.generate import decode_threads, load_tokenizer
    from z2all.model.gguf import write_gguf
    from z2all.serve.engine import Engine

    torch.set_num_threads(cfg.threads)
    with tempfile.TemporaryDirectory(prefix="z2all-bench-llamacpp-") as tmp:
        model, tok_dir, source = _model(cfg, Path(tmp))
        tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
        ids = tok.encode(cfg.prompt, add_special_tokens=False).ids
        auto = decode_threads(model)
        plain = f"generate() in-process, plain forward ({auto} thr)"
        fast = f"generate() in-process, fast decode ({auto} thr)"
        rows: dict[str, list[float]] = {plain: [], fast: []}
        # the other thread choice, forced, so the auto rule's pick can be checked on the machine at hand
        alt = cfg.threads if auto == 1 else 1
        forced = f"generate() in-process, fast decode ({alt} thr, forced)"
        if alt != auto:
            rows[forced] = []
        engine = None
        eng = f"z2all engine, {cfg.streams} streams aggregate (in-process, {auto} thr)"
        if cfg.streams:
            engine = Engine(model, load_tokenizer(tok_dir), max_batch=cfg.streams,
                            context=len(ids) + cfg.new_tokens + 8, prefill_chunk=512)
            rows[eng] = []
        tokens: dict[str, list[int]] = {}
        llms, warning = {}, None
        for dt in cfg.dtypes:
            path = Path(tmp) / f"m-{dt}.gguf"
            info = write_gguf(model, tok_dir, path, dt, "bench")
            llms[dt] = llama_cpp.Llama(model_path=str(path), n_ctx=len(ids) + cfg.new_tokens + 8,
                                       n_threads=cfg.threads, n_threads_batch=cfg.threads, n_batch=512,
                                       verbose=False, seed=0)
            rows[f"llama.cpp {dt} ({info['file_bytes'] / 1e6:.1f} MB)"] = []
            warning = info["warning"]
            if dt == "f32" and cfg.threads > 1:  # the same thread count as our 1-thread rows
                llms["f32-1"] = llama_cpp.Llama(model_path=str(path), n_ctx=len(ids) + cfg.new_tokens + 8,
                                                n_threads=1, n_threads_batch=1, n_batch=512, verbose=False, seed=0)
                rows["llama.cpp f32-1 (1 thr)"] = []
        if warning:
            print0(f"note: {warning}")
        try:
            with torch.inference_mode():
                # warm-up, not counted: first calls build FastDecode's copies, pack the LM head, fault in pages
                _ours(model, ids, 8, "fast")
                _ours(model, ids, 8, "plain")
                if engine is not None:
                    _engine(engine, ids, 8, cfg.streams)
                for llm in llms.values():
                    _cpp(llm, ids, 8)
                for k in range(cfg.repeats):
                    for name in rows:
                        if name == eng:
                            outs, s = _engine(engine, ids, cfg.new_tokens, cfg.streams)
                            out, s = min(outs, key=lambda o: sum(a == b for a, b in zip(o, tokens[plain]))), s
                            s /= cfg.streams  # seconds per stream's worth of tokens: tokens/s = aggregate
                        elif name in (plain, fast, forced):
                            out, s = _ours(model, ids, cfg.new_tokens, "plain" if name == plain else "fast",
                                           alt if name == forced else 0)
                        else:
                            out, s = _cpp(llms[name.split()[1]], ids, cfg.new_tokens)
                        rows[name].append(s)
                        tokens.setdefault(name, out)
                    print(f"  round {k + 1}/{cfg.repeats} (best so far, tokens/s): " + "; ".join(
                        f"{name} {cfg.new_tokens / min(s):,.0f}" for name, s in rows.items()),
                        file=sys.stderr, flush=True)
        finally:
            if engine is not None:
                engine.close()
    ref = tokens[plain]
    cpp32 = next((min(s) for name, s in rows.items() if name.startswith("llama.cpp f32 ")), None)
    table = []
    for name, secs in rows.items():
        best = min(secs)
        same = sum(a == b for a, b in zip(tokens[name], ref))
        table.append([name, f"{cfg.new_tokens / best:,.0f}", f"{cpp32 / best:.2f}x" if cpp32 else "",
                      f"{same}/{cfg.new_tokens}"])
    n_params = sum(p.numel() for p in model.parameters())
    print0(f"\n### z2all bench llamacpp ({machine_name()}, {cfg.threads} threads; {source}, "
           f"{n_params / 1e6:.2f}M parameters; {len(ids)} prompt + {cfg.new_tokens} greedy tokens, "
           f"best of {cfg.repeats})\n")
    print0(markdown_table(["row", "tokens/s", "vs llama.cpp f32", "same greedy tokens as ours (plain)"], table))
    return 0
