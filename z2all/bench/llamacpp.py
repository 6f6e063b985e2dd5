"""`z2all bench llamacpp`: single-stream decode speed of our generate() against llama.cpp running the same
weights exported to GGUF (f32, f16, q8_0): batch 1, the same prompt, the same number of greedy tokens, the
same threads, side by side in one run. Needs llama-cpp-python (pip install 'llm-zero2all[llamacpp]'; it
builds from source, ~6 min on 2 cores).

    z2all bench llamacpp --ckpt runs/demo/train                 # 128 new tokens, 2 threads, best of 3
    z2all bench llamacpp --ckpt runs/demo/train --threads 1 --new-tokens 256

What each number counts: "tokens/s" = new tokens / wall seconds of one generation call, prompt prefill
included (the prompt is short: ~10 tokens), model loading and GGUF export excluded; best of --repeats
rounds, the rows alternating within each round so background load hits every row alike. "same greedy
tokens" compares each row's tokens with ours (f32); llama.cpp's generation runs past end-of-text as ours
does (no stop), so both produce exactly --new-tokens tokens.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from z2all.bench import machine_name
from z2all.config import opt
from z2all.utils import UserError, markdown_table, print0


@dataclass
class Config:
    ckpt: str = opt("", "checkpoint, run directory (latest checkpoint) or HF Llama directory")
    prompt: str = opt("The LORD said unto", "the prompt every row continues")
    new_tokens: int = opt(128, "greedy tokens per generation")
    threads: int = opt(2, "CPU threads for torch and for llama.cpp")
    repeats: int = opt(3, "interleaved rounds; the best of each row is reported")
    dtypes: list[str] = opt(factory=lambda: ["f32", "f16", "q8_0"], help="GGUF types to run in llama.cpp")


def _ours(model, ids: list[int], n: int, decode: str) -> tuple[list[int], float]:
    from z2all.model.generate import generate

    t0 = time.perf_counter()
    out = generate(model, [ids], n, decode=decode)[0]
    return out, time.perf_counter() - t0


def _cpp(llm, ids: list[int], n: int) -> tuple[list[int], float]:
    llm.reset()
    out = []
    t0 = time.perf_counter()
    for t in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        out.append(int(t))
        if len(out) == n:
            break
    return out, time.perf_counter() - t0


def run(cfg: Config) -> int:
    if not cfg.ckpt:
        raise UserError("give --ckpt (a checkpoint, run directory or HF Llama directory)")
    if cfg.new_tokens < 1 or cfg.repeats < 1 or cfg.threads < 1:
        raise UserError("--new-tokens, --repeats and --threads must be >= 1")
    try:
        import llama_cpp
    except ImportError:
        raise UserError("llama-cpp-python is not installed: pip install 'llm-zero2all[llamacpp]' (builds from "
                        "source, ~6 min on 2 cores)") from None
    import torch
    from tokenizers import Tokenizer

    from z2all.model.gguf import write_gguf
    from z2all.model.hf_compat import default_tokenizer_dir, load_checkpoint

    torch.set_num_threads(cfg.threads)
    model, directory, kind, note = load_checkpoint(cfg.ckpt)
    if note:
        print0(note)
    model = model.float().eval()
    tok_dir = default_tokenizer_dir(directory, kind)
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    ids = tok.encode(cfg.prompt, add_special_tokens=False).ids
    rows: dict[str, list[float]] = {"z2all generate (plain forward)": [], "z2all generate (fast decode)": []}
    tokens: dict[str, list[int]] = {}
    with tempfile.TemporaryDirectory(prefix="z2all-bench-llamacpp-") as tmp:
        llms, warning = {}, None
        for dt in cfg.dtypes:
            path = Path(tmp) / f"m-{dt}.gguf"
            info = write_gguf(model, tok_dir, path, dt, "bench")
            llms[dt] = llama_cpp.Llama(model_path=str(path), n_ctx=len(ids) + cfg.new_tokens + 8,
                                       n_threads=cfg.threads, n_batch=512, verbose=False, seed=0)
            rows[f"llama.cpp {dt} ({info['file_bytes'] / 1e6:.1f} MB)"] = []
            warning = info["warning"]
        if warning:
            print0(f"note: {warning}")
        with torch.inference_mode():
            for _ in range(cfg.repeats):
                for name in rows:
                    if name.startswith("z2all"):
                        out, s = _ours(model, ids, cfg.new_tokens, "plain" if "plain" in name else "fast")
                    else:
                        out, s = _cpp(llms[name.split()[1]], ids, cfg.new_tokens)
                    rows[name].append(s)
                    tokens.setdefault(name, out)
    ref = tokens["z2all generate (plain forward)"]
    best_ours = min(rows["z2all generate (fast decode)"])
    table = []
    for name, secs in rows.items():
        best = min(secs)
        same = sum(a == b for a, b in zip(tokens[name], ref))
        table.append([name, f"{cfg.new_tokens / best:,.0f}", f"{best_ours / best:.2f}x",
                      f"{same}/{cfg.new_tokens}"])
    n_params = sum(p.numel() for p in model.parameters())
    print0(f"\n### z2all bench llamacpp ({machine_name()}, {cfg.threads} threads; {directory}, "
           f"{n_params / 1e6:.2f}M parameters; {len(ids)} prompt + {cfg.new_tokens} greedy tokens, "
           f"best of {cfg.repeats})\n")
    print0(markdown_table(["row", "tokens/s", "vs ours (fast)", "same greedy tokens as ours"], table))
    return 0
