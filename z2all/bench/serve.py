"""`z2all bench serve`: `z2all serve` under N concurrent streaming clients on loopback, continuous batching
against one request at a time (`--sequential`), the same model and prompts in one run.

    z2all bench serve                                   # the demo-sized model (tiny preset, random weights)
    z2all bench serve --ckpt runs/demo --clients 1,4,8,16 --requests 2 --max-tokens 64

Each mode's server process starts (127.0.0.1, a free port, --threads) and takes one warm-up request;
then for each N in --clients, the modes one after the other (alternating, so both see the same load): N
clients (bare asyncio connections, streaming /v1/completions, greedy, ignore_eos so every request yields
exactly --max-tokens tokens) each send --requests requests one after another, each with its own prompt
of about --prompt-tokens tokens from the demo corpus. Reported per (mode, N):
aggregate generated tokens/s (all tokens / wall time of the level), time to first token p50/p99, the gap
between streamed chunks (inter-token latency) p50/p99; per mode the server's peak RSS (VmHWM summed over its
processes) and KV cache. The last rows are the single-stream comparison, measured right after the N=1 rows:
one request to the server (batched mode) and `z2all generate`'s path (model/generate.py, decode="fast" as
the CLI, in this process, batch 1, the same prompt and token count) twice: returning token ids only, and
streaming its text as the command does for one prompt (to /dev/null); alternating three times, best of each.

Without --ckpt the model is the `tiny` preset (the demo's model, ~5M parameters at vocab 4096) with random
weights and a BPE trained on the embedded demo corpus in a second: throughput does not depend on the
weights. The clients run in this process and share the machine's cores with the server, as real clients
on the same host would, but not the engine's: where a server pins its engine process to CPUs of its own
(`serve --pin-cpus`), the clients (and the single-stream generate() rows) run on the other CPUs, as the
server's HTTP side does, so the load generator does not preempt the engine it measures.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from z2all.bench import machine_name, markdown_table
from z2all.config import opt
from z2all.utils import UserError

LAUNCH = ("import sys; from z2all import cli\n"
          "cli.STAGES.setdefault('serve', cli.Command('serve', 'z2all.serve.api'))\n"
          "sys.exit(cli.main(['serve'] + sys.argv[1:]))\n")


@dataclass
class Config:
    ckpt: str = opt("", "checkpoint to serve (default: a random `tiny` model with a demo-corpus BPE, built in a "
                    "temp dir)")
    clients: list[int] = opt(help="concurrent streaming clients per level", factory=lambda: [1, 4, 8, 16])
    requests: int = opt(2, "requests each client sends, one after another")
    max_tokens: int = opt(64, "tokens generated per request (ignore_eos: exactly this many)")
    prompt_tokens: int = opt(32, "about this many prompt tokens per request")
    modes: list[str] = opt(help="batched (continuous batching) and/or sequential (one request at a time)",
                           factory=lambda: ["batched", "sequential"])
    threads: int = opt(2, "torch threads of the server and of the generate() reference")
    stream_interval: float = opt(0.0, "the servers' --stream-interval (seconds between streamed chunks; 0 = every "
                                 "token)")
    engine: str = opt("process", "the servers' --engine: process (the model in a process of its own) or thread",
                      choices=("process", "thread"))
    decode_threads: int = opt(0, "the servers' --decode-threads (0 = auto: 1 for a small model on the CPU)")
    batched_matmul: str = opt("auto", "the servers' and the engine-alone rows' --batched-matmul (auto, onednn, "
                              "blas)", choices=("auto", "onednn", "blas"))
    timeout: float = opt(600.0, "seconds any one level may take before the benchmark gives up")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_tokenizer(root: Path, pattern: str = "z2all") -> tuple[Path, int]:
    """A 4,096-token byte-level BPE with our specials and the named split pattern, trained on the embedded demo
    corpus in about a second: (its directory root/tokenizer, its vocabulary size). Shared with `z2all bench
    llamacpp --preset` (which asks for llama-bpe, a pattern llama.cpp knows)."""
    import gzip

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from z2all.tokenizer import hf
    from z2all.tokenizer.pretokenize import named_pattern

    texts = []
    with gzip.open(Path(__file__).resolve().parents[1] / "data" / "demo" / "code_python.jsonl.gz", "rt") as f:
        texts += [json.loads(line)["content"] for _, line in zip(range(400), f)]
    with gzip.open(Path(__file__).resolve().parents[1] / "data" / "demo" / "zh_wiki.jsonl.gz", "rt") as f:
        texts += [json.loads(line)["text"] for _, line in zip(range(400), f)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = hf.byte_level_parts(named_pattern(pattern))
    specials = hf.special_tokens([])
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=4096 - 64, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    info = hf.add_specials(tok, specials)
    return hf.save_dir(tok, root / "tokenizer", specials, model_max_length=256), info["vocab_size"]


def _demo_model(root: Path) -> Path:
    """A tiny-preset model (random weights) + demo_tokenizer's BPE, saved as a checkpoint under root."""
    import torch

    from z2all.model.config import model_preset
    from z2all.model.llama import Z2all, save_model

    tok_dir, vocab_size = demo_tokenizer(root)
    torch.manual_seed(0)
    model = Z2all(model_preset("tiny", vocab_size=vocab_size))
    d = save_model(model, root / "step-000000")
    os.replace(tok_dir, d / "tokenizer")
    return d


def _prompts(tok, n: int, length: int) -> list[str]:
    """n different prompts of about `length` tokens, cut from the demo corpus."""
    import gzip

    with gzip.open(Path(__file__).resolve().parents[1] / "data" / "demo" / "zh_wiki.jsonl.gz", "rt") as f:
        text = " ".join(json.loads(line)["text"] for _, line in zip(range(200), f))
    ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
    if len(ids) < length * 2:
        ids = ids * (length * 2 // max(1, len(ids)) + 1)
    out = []
    for i in range(n):
        a = (i * 97) % (len(ids) - length)
        out.append(tok.decode(ids[a:a + length]))
    return out


class _Server:
    def __init__(self, ckpt: Path, threads: int, *args: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile(mode="w+")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen([sys.executable, "-c", LAUNCH, "--ckpt", str(ckpt), "--port", str(self.port),
                                      "--threads", str(threads), *args], stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        end = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise UserError(f"the server did not start: {self.log.read()[-1500:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    self.health = json.loads(r.read())
                    break
            except OSError:
                if time.monotonic() > end:
                    self.stop()
                    raise UserError("the server did not answer /health in 180 s") from None
                time.sleep(0.2)

    def peak_rss(self) -> int:
        """The sum of each server process's peak RSS (VmHWM): the HTTP process, its engine process
        (--engine process) and multiprocessing's resource tracker. Peaks of different processes need not
        coincide, so this is an upper bound of the tree's peak."""
        total, todo = 0, [self.proc.pid]
        while todo:
            pid = todo.pop()
            try:
                with open(f"/proc/{pid}/status") as f:
                    total += next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), 0)
                for tid in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{tid}/children") as f:
                        todo += [int(c) for c in f.read().split()]
            except OSError:  # a process that has just exited
                continue
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


async def _one(port: int, model: str, prompt: str, max_tokens: int) -> dict:
    """One streaming request over a bare asyncio connection (HTTP/1.1 written by hand, SSE lines read as
    they come): a client light enough not to take the cores it measures from the server."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}).encode()
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    status = (await reader.readline()).split()
    if len(status) < 2 or status[1] != b"200":
        rest = await reader.read(600)
        writer.close()
        raise UserError(f"the server answered {b' '.join(status[1:]).decode()}: {rest[-300:]!r}")
    times, tokens = [], 0
    while line := await reader.readline():
        if not line.startswith(b"data: {"):
            continue  # headers, chunk sizes, blank lines, [DONE]
        if line.startswith(b'data: {"id"') and b'"usage":{' in line.replace(b" ", b""):
            tokens = json.loads(line[6:])["usage"]["completion_tokens"]
        elif b'"text":""' not in line.replace(b" ", b""):
            times.append(time.perf_counter())
    wall = time.perf_counter() - t0
    writer.close()
    return {"ttft": times[0] - t0 if times else float("nan"), "gaps": [b - a for a, b in zip(times, times[1:])],
            "tokens": tokens, "wall": wall}


async def _level(port: int, model: str, prompts: list[str], n: int, requests: int, max_tokens: int, timeout: float):
    async def client_loop(k):
        out = []
        for j in range(requests):
            out.append(await _one(port, model, prompts[(k * requests + j) % len(prompts)], max_tokens))
        return out

    t0 = time.perf_counter()
    res = await asyncio.wait_for(asyncio.gather(*(client_loop(k) for k in range(n))), timeout)
    wall = time.perf_counter() - t0
    return [r for rs in res for r in rs], wall


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(x for x in xs if x == x)
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def _single_stream(srv: _Server, ckpt: Path, prompt: str, max_tokens: int, threads: int, batched_matmul: str = "auto",
                   rounds: int = 3):
    """The single-stream comparison: one streaming request to the server, then `z2all generate`'s path
    (model/generate.py generate(), decode="fast" as the CLI, in this process, batch 1) on the same prompt and
    token count twice: returning token ids only, and as the `z2all generate` command runs it for one prompt
    (its streamer decodes the text after every token and writes it, here to /dev/null, flushed); alternating
    `rounds` times so background load hits all alike. Returns the best tokens/s of each (server: tokens / the
    request's wall time from connect to the end of its stream, measured in the client's coroutine, not the
    event loop's start-up; generate: tokens / the call's wall time; all include the prefill)."""
    import torch

    from z2all.model.generate import _Streamer, generate
    from z2all.serve.engine import load

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        L = load(str(ckpt), device="cpu")
        ids = L.tok(prompt, add_special_tokens=True)["input_ids"]
        generate(L.model, [ids], 8, decode="fast", batched_matmul=batched_matmul)  # warm-up
        best_srv = best_gen = best_cli = 0.0
        with open(os.devnull, "w", encoding="utf-8") as sink:
            for _ in range(rounds):
                r = asyncio.run(_one(srv.port, srv.health["model"], prompt, max_tokens))
                best_srv = max(best_srv, r["tokens"] / r["wall"])
                t = time.perf_counter()
                out = generate(L.model, [ids], max_tokens, eos_id=None, decode="fast",
                               batched_matmul=batched_matmul)
                best_gen = max(best_gen, len(out[0]) / (time.perf_counter() - t))
                t = time.perf_counter()
                streamer = _Streamer(L.tok, [], stream=sink)
                out = generate(L.model, [ids], max_tokens, eos_id=None, decode="fast", on_token=streamer,
                               batched_matmul=batched_matmul)
                streamer.finish()
                best_cli = max(best_cli, len(out[0]) / (time.perf_counter() - t))
        return best_srv, best_gen, best_cli
    finally:
        torch.set_num_threads(old)


def _engine_alone(ckpt: Path, prompts: list[str], clients: list[int], max_tokens: int, threads: int,
                  batched_matmul: str = "auto", rounds: int = 3) -> dict[int, float]:
    """The ceiling of continuous batching on this machine: the serving engine in this process, without HTTP,
    SSE or clients (the servers are stopped by then). For each n in `clients`, n requests (the levels'
    prompts, greedy, ignore_eos, max_tokens each) submitted at once; aggregate tokens/s from the first submit
    to the last final event; the levels alternate `rounds` times, best of each."""
    import threading

    from z2all.model.generate import num_threads
    from z2all.serve.engine import Engine, SamplingParams, load

    L = load(str(ckpt), device="cpu")
    ids = [L.tok(p, add_special_tokens=True)["input_ids"] for p in prompts]
    with num_threads(threads):
        eng = Engine(L.model, L.tok, max_batch=max(clients), eos_ids=L.eos_ids, vocab_limit=L.vocab_limit,
                     batched_matmul=batched_matmul)
        try:
            def level(n: int) -> float:
                done, left, lock = threading.Event(), [n], threading.Lock()

                def emit(ev):
                    if ev.final:
                        with lock:
                            left[0] -= 1
                            if not left[0]:
                                done.set()

                params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
                t = time.perf_counter()
                for i in range(n):
                    eng.submit(ids[i % len(ids)], params, emit)
                done.wait()
                return n * max_tokens / (time.perf_counter() - t)

            level(max(clients))  # warm-up
            best: dict[int, float] = {}
            for _ in range(rounds):
                for n in clients:
                    best[n] = max(best.get(n, 0.0), level(n))
            return best
        finally:
            eng.close()


def run(cfg: Config) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UserError("z2all bench serve needs the serve extra: pip install 'llm-zero2all[serve]'") from None
    clients = [int(c) for c in cfg.clients]
    if not clients or min(clients) < 1 or cfg.requests < 1 or cfg.max_tokens < 1 or cfg.prompt_tokens < 1:
        raise UserError("--clients, --requests, --max-tokens and --prompt-tokens must be >= 1")
    bad = [m for m in cfg.modes if m not in ("batched", "sequential")]
    if bad or not cfg.modes:
        raise UserError(f"--modes takes batched and/or sequential, got {', '.join(cfg.modes) or 'nothing'}")
    tmp = tempfile.TemporaryDirectory(prefix="z2all-bench-serve-")
    try:
        from z2all.model.generate import load_tokenizer
        from z2all.model.hf_compat import default_tokenizer_dir
        from z2all.model.llama import resolve_checkpoint

        if cfg.ckpt:
            ckpt, kind, _ = resolve_checkpoint(cfg.ckpt)
        else:
            ckpt, kind = _demo_model(Path(tmp.name)), "z2all"
        tok = load_tokenizer(default_tokenizer_dir(ckpt, kind))
        prompts = _prompts(tok, max(clients) * cfg.requests, cfg.prompt_tokens)
        rows, notes = [], []
        results: dict[tuple[str, int], float] = {}
        servers: dict[str, _Server] = {}
        ref = None
        try:
            # every mode's server runs from the start (an idle one sleeps on its scheduler's condition) and the
            # levels alternate between them, so each pair of rows saw the same load on a shared machine
            for mode in cfg.modes:
                args = ["--sequential"] if mode == "sequential" else ["--max-batch", str(max(clients))]
                args += ["--stream-interval", str(cfg.stream_interval), "--engine", cfg.engine,
                         "--decode-threads", str(cfg.decode_threads), "--batched-matmul", cfg.batched_matmul]
                servers[mode] = _Server(ckpt, cfg.threads, *args)
                asyncio.run(_level(servers[mode].port, servers[mode].health["model"], prompts[:1], 1, 1, 8,
                                   cfg.timeout))  # warm-up
            engine_cpus = {c for srv in servers.values() for c in srv.health.get("engine_cpus") or []}
            own_cpus = os.sched_getaffinity(0)
            if engine_cpus and own_cpus - engine_cpus:
                from z2all.serve.worker import pin_process

                pin_process(sorted(own_cpus - engine_cpus))
                notes.append(f"clients on CPU {','.join(map(str, sorted(own_cpus - engine_cpus)))}, the servers' "
                             f"engines on CPU {','.join(map(str, sorted(engine_cpus)))}")
            for n in clients:
                for mode, srv in servers.items():
                    res, wall = asyncio.run(_level(srv.port, srv.health["model"], prompts, n, cfg.requests,
                                                   cfg.max_tokens, cfg.timeout))
                    toks = sum(r["tokens"] for r in res)
                    ttft = [r["ttft"] for r in res]
                    gaps = [g for r in res for g in r["gaps"]]
                    results[(mode, n)] = toks / wall
                    rows.append([mode, n, len(res), toks, f"{wall:.2f}", f"{toks / wall:,.0f}",
                                 f"{_pct(ttft, 50) * 1e3:.0f}", f"{_pct(ttft, 99) * 1e3:.0f}",
                                 f"{_pct(gaps, 50) * 1e3:.1f}", f"{_pct(gaps, 99) * 1e3:.1f}"])
                    print(f"  {mode:<10} N={n:<3} {toks / wall:8.0f} tokens/s", file=sys.stderr, flush=True)
                if ref is None:  # next to the single-stream rows
                    mode = "batched" if "batched" in servers else cfg.modes[0]
                    ref = (mode, *_single_stream(servers[mode], ckpt, prompts[0], cfg.max_tokens, cfg.threads,
                                                   cfg.batched_matmul))
            if engine_cpus and own_cpus - engine_cpus:
                pin_process(sorted(own_cpus))  # the engine-alone rows may use every CPU
            for mode, srv in servers.items():
                notes.append(f"{mode}: server peak RSS {srv.peak_rss() / 2**20:.0f} MB (sum over its processes)")
        finally:
            for srv in servers.values():
                srv.stop()
        alone = _engine_alone(ckpt, prompts, clients, cfg.max_tokens, cfg.threads, cfg.batched_matmul)
        rows.sort(key=lambda r: (cfg.modes.index(r[0]), r[1]))
        rows.append([f"{ref[0]}, one request (best of 3, alternating with the next row)", 1, 3,
                     3 * cfg.max_tokens, "", f"{ref[1]:,.0f}", "", "", "", ""])
        rows.append(["generate(), in-process, token ids only (best of 3)", 1, 3, 3 * cfg.max_tokens, "",
                     f"{ref[2]:,.0f}", "", "", "", ""])
        rows.append(["`z2all generate` command's path, in-process, streaming its text (best of 3)", 1, 3,
                     3 * cfg.max_tokens, "", f"{ref[3]:,.0f}", "", "", "", ""])
        for n, rate in alone.items():
            rows.append(["engine alone, in this process: no HTTP, no clients (best of 3)", n, n, n * cfg.max_tokens,
                         "", f"{rate:,.0f}", "", "", "", ""])
    finally:
        tmp.cleanup()
    print(f"\n### z2all bench serve ({machine_name()}, server --threads {cfg.threads}, --batched-matmul "
          f"{cfg.batched_matmul})\n")
    print(f"model: {ckpt if cfg.ckpt else 'tiny preset, random weights, demo BPE (vocab 4096)'}; "
          f"{cfg.requests} request(s) per client, ~{cfg.prompt_tokens} prompt tokens, {cfg.max_tokens} generated "
          f"tokens each (greedy, ignore_eos), streaming over loopback\n")
    print(markdown_table(["mode", "clients", "requests", "gen tokens", "wall s", "tokens/s", "TTFT p50 ms",
                          "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms"], rows))
    print()
    for line in notes:
        print(f"- {line}")
    for n in clients:
        if ("batched", n) in results and ("sequential", n) in results:
            ratio = results[("batched", n)] / results[("sequential", n)]
            print(f"- {n} concurrent streams: continuous batching {ratio:.2f}x the tokens/s of one at a time")
    top = max(clients)
    if top > 1 and 1 in alone:
        print(f"- the engine alone (no HTTP): {top} streams {alone[top] / alone[1]:.2f}x the tokens/s of one: what "
              f"continuous batching can gain on this machine before any HTTP, SSE or client cost")
    print(f"- single stream through the server ({ref[0]}): {ref[1] / ref[3]:.2f}x the tokens/s of the `z2all generate` "
          f"command's path (it streams its text too), {ref[1] / ref[2]:.2f}x generate() returning token ids only "
          f"(best of 3 requests vs best of 3 in-process calls, alternating; the server's include HTTP, SSE and "
          f"detokenization; all include the prefill)")
    return 0

