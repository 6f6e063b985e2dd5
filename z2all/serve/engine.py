"""Continuous batching: one scheduler thread that admits requests into KV-cache slots between decode
steps, so concurrent requests share every forward pass. Shared by `z2all serve` (api.py) and
`z2all bench serve`.

    engine = Engine(model, tok, max_batch=8)        # starts its thread
    req = engine.submit(prompt_ids, SamplingParams(max_tokens=32), emit=callback)
    ...                                             # callback(Event) per text delta, then a final Event
    engine.cancel(req)                              # a disconnected client frees its slot at once

The cache: preallocated slots, not pages. `max_batch` rows of `slot_len` positions each ([max_batch, K,
slot_len, D] per layer, allocated once, so memory is fixed at start: `--max-batch` x `slot_len`, where
slot_len is the model's context, or `--max-tokens-in-cache / --max-batch` when that is smaller). A request
holds one slot from admission to its last token. Pages (vLLM) waste less memory on short requests, but
attention over pages needs a paged-attention kernel or a gather of every page at every step; with plain
PyTorch ops a slot row is one contiguous view, its writes are one index_put, and a decode step over
slots lo..hi reads a slice of the cache without copying. For the small models this project serves on CPU
and single GPUs the per-step cost matters more than the memory, so slots are the better trade.

The scheduler, one loop iteration:
  1. drop cancelled requests (their slot is free for the next admission);
  2. admit waiting requests (FIFO) into free slots; beyond the slots they wait in the queue, beyond
     `max_queue` waiting the server answers 429;
  3. prefill chunks of the admitted requests still in prefill, oldest first, within a budget of
     `prefill_chunk` tokens per iteration (chunked prefill: a long prompt costs the decoding requests at
     most one chunk's forward per step). A request's chunks always start at multiples of prefill_chunk
     of its own prompt, whoever else is waiting; a chunk that does not fit in what is left of the budget
     waits for the next iteration with every request behind it (first come, first filled), except the
     first chunk, which always runs. So several short prompts arriving together (a burst of clients) are
     filled in one iteration instead of one per iteration (with 8 clients of ~33-token prompts, 3 per
     iteration), and with FastDecode in one prefill_many pass whose matrix multiplies take all their rows
     at once (a chunk's numbers do not depend on the others in the pass);
  4. one batched decode step for every request past its prefill: each row at its own position (a key
     padding mask over the slot rows and per-row RoPE positions), sampled with its own settings; finished
     rows (EOS, a stop string, max_tokens) leave at once. The step is model/generate.py's
     FastDecode.step_rows (fused projections; a lone row takes FastDecode.step on its slot, as generate()
     does; with `kernels` "c" each norm, each layer's RoPE, cache write and attention, and every matrix
     multiply is a call into model/_decodec.c; otherwise batched rows and prefill chunks go
     through oneDNN on x86 CPUs, `batched_matmul`) or, with decode="plain", the model's forward (the
     reference; Z2all.rope_for derives the positions from the mask). Prefill chunks and decode steps run on
     generate.decode_threads' count (one thread for a small model on the CPU).

Greedy results do not depend on the company a request keeps: its prefill chunks get the bits they get
alone, and a decode row's masked extra keys add exact zeros. With the C kernels (the default for an fp32
model on the CPU where they are built) every op of a step is row by row, so a row's logits are bitwise what
it gets alone; with torch's ops the batched matrix multiplies can round differently from a batch of one, so
equality is up to fp32 reduction order (the tests check token equality with each backend).

`max_batch=1` is the one-request-at-a-time reference (`z2all serve --sequential`). `z2all serve` runs the
engine in a process of its own by default (worker.py: `on_step` sends each iteration's events to the HTTP
process in one message); `z2all chat`, the tests and the benchmarks use it in-process.
"""

from __future__ import annotations

import collections
import itertools
import os
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from z2all.model.generate import CacheRows, IncrementalText, filter_logits, num_threads
from z2all.utils import UserError


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False  # llama.cpp's option: benchmarks want exactly max_tokens tokens


@dataclass
class Event:
    """What a request's callback receives: text deltas (final False), then one final event."""
    text: str = ""
    final: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


class QueueFull(Exception):
    """Raised by submit when max_queue requests already wait (the server's 429)."""


_ids = itertools.count(1)


class Request:
    def __init__(self, prompt_ids: list[int], params: SamplingParams, emit: Callable[[Event], None],
                 detok: IncrementalText):
        self.id = next(_ids)
        self.prompt = list(prompt_ids)
        self.params = params
        self.emit = emit
        self.slot = -1
        self.filled = 0  # prompt tokens already in the cache
        self.pos = 0     # cache position of the next token to write (decode)
        self.last = None  # the last sampled token, not yet in the cache
        self.cancelled = False
        self.done = False
        self.detok = detok  # the completion's token ids and its text so far (whole characters)
        self.sent = 0    # characters of the text already emitted
        self.generator = None
        if params.temperature > 0:
            self.generator = torch.Generator()
            # no seed: a fresh one from the OS (torch.seed() would reseed the global generator)
            seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            self.generator.manual_seed(seed)

    @property
    def out(self) -> list[int]:
        """The completion's token ids."""
        return self.detok.ids

    @property
    def text(self) -> str:
        return self.detok.text


class _SlotView:
    """The cache protocol Z2all.forward expects (update(layer, start_pos, k, v)), for one request's prefill:
    writes into its slot row and returns the row up to the new end ([1, K, end, D], a view)."""

    def __init__(self, pool: _Pool, slot: int):
        self.pool, self.slot = pool, slot

    def update(self, layer, start_pos, k, v):
        end = start_pos + k.shape[2]
        s = self.slot
        self.pool.k[layer][s:s + 1, :, start_pos:end] = k
        self.pool.v[layer][s:s + 1, :, start_pos:end] = v
        return self.pool.k[layer][s:s + 1, :, :end], self.pool.v[layer][s:s + 1, :, :end]


class _DecodeView:
    """One decode step of B rows, each one token at its own position: writes row b's key/value at
    (slots[b], pos[b]) and returns the rows' keys up to S = max(pos) + 1 (a slice when the slots are
    consecutive, else a gather); keys past a row's own position are masked by the caller."""

    def __init__(self, pool: _Pool, slots: list[int], pos: list[int], device):
        self.pool = pool
        self.slots = torch.tensor(slots, device=device)
        self.pos = torch.tensor(pos, device=device)
        self.S = max(pos) + 1
        lo = slots[0]
        self.range = (lo, lo + len(slots)) if slots == list(range(lo, lo + len(slots))) else None

    def update(self, layer, start_pos, k, v):
        K, V = self.pool.k[layer], self.pool.v[layer]
        K[self.slots, :, self.pos] = k[:, :, 0]
        V[self.slots, :, self.pos] = v[:, :, 0]
        if self.range is not None:
            a, b = self.range
            return K[a:b, :, :self.S], V[a:b, :, :self.S]
        return K[self.slots, :, :self.S], V[self.slots, :, :self.S]


class _Pool:
    def __init__(self, model, n_slots: int, slot_len: int):
        c = model.cfg
        p = model.tok_embeddings.weight
        shape = (n_slots, c.n_kv_heads, slot_len, c.head_dim)
        self.k = [torch.zeros(shape, device=p.device, dtype=p.dtype) for _ in range(c.n_layers)]
        self.v = [torch.zeros(shape, device=p.device, dtype=p.dtype) for _ in range(c.n_layers)]
        self.nbytes = 2 * c.n_layers * torch.Size(shape).numel() * p.element_size()
        self._rows: dict[int, CacheRows] = {}

    def row(self, slot: int) -> CacheRows:
        """Slot `slot` as a one-row KVCache (views [1, K, slot_len, D] per layer, made once per slot)."""
        r = self._rows.get(slot)
        if r is None:
            r = self._rows[slot] = CacheRows([k[slot:slot + 1] for k in self.k], [v[slot:slot + 1] for v in self.v])
        return r


class Engine:
    """The scheduler thread and the slot cache; see the module docstring. Thread-safe submit/cancel."""

    def __init__(self, model, tokenizer, *, max_batch: int = 8, max_tokens_in_cache: int = 0,
                 context: int = 0, prefill_chunk: int = 128, max_queue: int = 64,
                 eos_ids: list[int] | None = None, vocab_limit: int | None = None, decode: str = "fast",
                 decode_threads: int = 0, batched_matmul: str = "auto", kernels: str = "auto",
                 on_step: Callable[[], None] | None = None):
        if max_batch < 1:
            raise UserError(f"--max-batch must be >= 1, got {max_batch}")
        if prefill_chunk < 1:
            raise UserError(f"--prefill-chunk must be >= 1, got {prefill_chunk}")
        if max_queue < 0:
            raise UserError(f"--max-queue must be >= 0, got {max_queue}")
        if decode not in ("fast", "plain"):
            raise UserError(f"--decode must be fast or plain, got {decode!r}")
        if decode_threads < 0:
            raise UserError(f"--decode-threads must be >= 0 (0 = auto), got {decode_threads}")
        from z2all.model.generate import BATCHED_MATMULS, KERNELS

        if batched_matmul not in BATCHED_MATMULS:
            raise UserError(f"--batched-matmul must be one of {', '.join(BATCHED_MATMULS)}, got {batched_matmul!r}")
        if kernels not in KERNELS:
            raise UserError(f"--decode-kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
        from z2all.model.generate import decode_threads as pick_threads

        self.decode = decode
        # prefill chunks and decode steps run on this many threads (1 for a small model on the CPU, see
        # generate.decode_threads)
        self.decode_threads = pick_threads(model, decode_threads)
        self.model = model.eval()
        from z2all.model.generate import FastDecode

        # built once: a server's weights do not change (FastDecode.for_model's per-call key check is ~40 us)
        self.fast = FastDecode.for_model(self.model, batched_matmul, kernels) if decode == "fast" else None
        self.tok = tokenizer
        ctx = context or model.cfg.max_seq_len
        if max_tokens_in_cache:
            if max_tokens_in_cache < max_batch * 2:
                raise UserError(f"--max-tokens-in-cache {max_tokens_in_cache} leaves under 2 positions per slot "
                                f"for --max-batch {max_batch}; raise it or lower --max-batch")
            ctx = min(ctx, max_tokens_in_cache // max_batch)
        self.slot_len = ctx
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.max_queue = max_queue
        self.eos = set(eos_ids or [])
        self.vocab_limit = vocab_limit
        self.device = model.tok_embeddings.weight.device
        from z2all.model.generate import _available_memory
        from z2all.utils import human_bytes

        need = model.kv_cache_bytes(max_batch, ctx)  # refused before it is allocated, in one line
        free = _available_memory(self.device)
        if free is not None and need > 0.9 * free:
            raise UserError(f"--max-batch {max_batch} x {ctx} positions need a {human_bytes(need)} KV cache and "
                            f"{human_bytes(free)} is free; lower --max-batch, --context or --max-tokens-in-cache")
        self.pool = _Pool(model, max_batch, ctx)
        self.cache_bytes = self.pool.nbytes
        self.free = list(range(max_batch))
        self.waiting: collections.deque[Request] = collections.deque()
        self.active: list[Request] = []
        self.cond = threading.Condition()
        # one user of the tokenizer at a time: the server encodes prompts on its event loop while this thread
        # decodes, and a Rust tokenizer borrowed by two threads at once can fail ("Already borrowed")
        self.tok_lock = threading.Lock()
        self.stopping = False
        # called on the scheduler thread after each loop iteration, outside the lock: every event of the
        # iteration has been emitted by then (worker.py sends them to the HTTP process in one message)
        self.on_step = on_step
        self.steps = 0  # decode steps run (for tests and the benchmark)
        self.max_rows = 0  # the most rows one decode step has carried
        self.thread = threading.Thread(target=self._loop, name="z2all-engine", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ the public side

    def submit(self, prompt_ids: list[int], params: SamplingParams, emit: Callable[[Event], None]) -> Request:
        """Queue a request. The caller has checked len(prompt) + max_tokens <= slot_len; raises QueueFull
        when max_queue requests already wait."""
        if not prompt_ids:
            raise ValueError("empty prompt")
        if len(prompt_ids) + params.max_tokens > self.slot_len:
            raise ValueError("prompt + max_tokens exceed the slot")
        req = Request(prompt_ids, params, emit, IncrementalText(self.tok, self.tok_lock))
        with self.cond:
            if len(self.waiting) - len(self.free) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (--max-queue {self.max_queue})")
            self.waiting.append(req)
            self.cond.notify()
        return req

    def cancel(self, req: Request) -> None:
        with self.cond:
            if not req.done:
                req.cancelled = True
                self.cond.notify()

    def stats(self) -> dict:
        with self.cond:
            return {"active": len(self.active), "waiting": len(self.waiting), "free_slots": len(self.free),
                    "steps": self.steps, "max_rows": self.max_rows}

    def close(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout=10)

    # ------------------------------------------------------------------ the scheduler

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        """Leave at once: free the slot, flush held-back text, send the final event. Under self.cond."""
        if req.done:
            return
        req.done = True
        if req in self.active:
            self.active.remove(req)
        if req.slot >= 0:
            self.free.append(req.slot)
            self.free.sort()  # lowest first keeps the active slots packed (a slice, not a gather)
            req.slot = -1
        if reason in ("stop", "length"):
            req.detok.update(final=True)
            tail = _cut(req.text, req.params.stop)[req.sent:]
            if tail:
                req.emit(Event(text=tail))
        req.emit(Event(final=True, finish_reason=reason, prompt_tokens=len(req.prompt),
                       completion_tokens=len(req.out), error=error))

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.stopping and not self.waiting and not self.active:
                    self.cond.wait()
                if self.stopping:
                    for r in list(self.active) + list(self.waiting):
                        self._finish(r, "cancelled")
                    self.waiting.clear()
                    break
                for r in [r for r in self.waiting if r.cancelled]:
                    self.waiting.remove(r)
                    self._finish(r, "cancelled")
                for r in [r for r in self.active if r.cancelled]:
                    self._finish(r, "cancelled")
                while self.waiting and self.free:
                    r = self.waiting.popleft()
                    r.slot = self.free.pop(0)
                    self.active.append(r)
                prefilling, budget = [], self.prefill_chunk
                for r in self.active:
                    if r.filled < len(r.prompt):
                        n = min(len(r.prompt), r.filled + self.prefill_chunk) - r.filled
                        if prefilling and n > budget:
                            break
                        prefilling.append(r)
                        budget -= n
                decoding = sorted((r for r in self.active if r.filled == len(r.prompt) and r.last is not None),
                                  key=lambda r: r.slot)
            try:
                with torch.inference_mode(), num_threads(self.decode_threads):
                    if prefilling:
                        self._prefill(prefilling)
                    if decoding:
                        self._decode(decoding)
            except Exception as e:  # a bug or an out-of-memory: fail these requests, keep serving
                traceback.print_exc()
                with self.cond:
                    for r in prefilling + decoding:
                        self._finish(r, "error", error=f"{type(e).__name__}: {e}")
            if self.on_step is not None:
                self.on_step()
        if self.on_step is not None:
            self.on_step()

    def _prefill(self, reqs: list[Request]) -> None:
        """One chunk of each request in `reqs` (the iteration's budget): one FastDecode.prefill_many pass
        where it prefills, else the forward per request; a request whose prompt is now complete samples its
        first token."""
        chunks = [(r, r.filled, min(len(r.prompt), r.filled + self.prefill_chunk)) for r in reqs]
        if self.fast is not None and self.fast.prefills:
            parts = [(torch.tensor(r.prompt[a:b], dtype=torch.long, device=self.device), a, self.pool.row(r.slot))
                     for r, a, b in chunks]
            logits = self.fast.prefill_many(parts)  # [n, V]: each chunk's last position
        else:
            logits = torch.cat([self.model(torch.tensor([r.prompt[a:b]], dtype=torch.long, device=self.device),
                                           kv_cache=_SlotView(self.pool, r.slot), start_pos=a,
                                           logits_to_keep=1)[0][:, -1] for r, a, b in chunks])
        for j, (r, _, b) in enumerate(chunks):
            r.filled = b
            if b == len(r.prompt):
                r.pos = b
                with self.cond:
                    if not r.done:
                        self._accept(r, self._sample(logits[j:j + 1], [r])[0])

    def _decode(self, rows: list[Request]) -> None:
        fast = self.fast
        if fast is not None and len(rows) == 1:
            # one stream: generate()'s step on the slot's own rows, without the per-row positions, mask and
            # gathers a batch needs (the same math; ~10 fewer small ops and tensors per step)
            r = rows[0]
            tokens = torch.tensor([r.last], dtype=torch.long, device=self.device)
            self._advance(rows, fast.step(tokens, r.pos, self.pool.row(r.slot)))
            return
        slots = [r.slot for r in rows]
        pos = [r.pos for r in rows]
        view = _DecodeView(self.pool, slots, pos, self.device)
        S = view.S
        ar = torch.arange(S, device=self.device)
        mask = ar[None, :] <= view.pos[:, None]  # [B, S]: each row sees its own keys only
        if fast is not None:
            tokens = torch.tensor([r.last for r in rows], dtype=torch.long, device=self.device)
            logits = fast.step_rows(tokens, view.pos, self.pool.k, self.pool.v, view.slots, view.range, mask)
        else:
            idx = torch.tensor([[r.last] for r in rows], dtype=torch.long, device=self.device)
            logits, _ = self.model(idx, kv_cache=view, start_pos=S - 1, key_padding_mask=mask, logits_to_keep=1)
            logits = logits[:, -1]
        self._advance(rows, logits)

    def _advance(self, rows: list[Request], logits: torch.Tensor) -> None:
        """Sample each row's next token from its logits [B, V] and accept it."""
        nxt = self._sample(logits, rows)
        with self.cond:
            self.steps += 1
            self.max_rows = max(self.max_rows, len(rows))
            for r, t in zip(rows, nxt):
                if r.done:
                    continue
                r.pos += 1
                self._accept(r, t)

    def _sample(self, logits: torch.Tensor, rows: list[Request]) -> list[int]:
        if self.vocab_limit is not None and self.vocab_limit < logits.shape[-1]:
            logits = logits[:, :self.vocab_limit]
        out = logits.argmax(-1).tolist()
        for i, r in enumerate(rows):
            p = r.params
            if p.temperature > 0:
                probs = filter_logits(logits[i:i + 1].float() / p.temperature, p.top_k, p.top_p).softmax(-1)
                out[i] = int(torch.multinomial(probs, 1, generator=r.generator))
        return out

    def _accept(self, req: Request, token: int) -> None:
        """A sampled token: finish on EOS, else append, emit the new text, finish on a stop string or the
        length. Under self.cond."""
        if token in self.eos and not req.params.ignore_eos:
            self._finish(req, "stop")
            return
        req.out.append(token)
        req.last = token
        stops = req.params.stop
        delta = req.detok.update()
        text = req.text
        if stops and delta:
            window = text[-(len(delta) + max(len(s) for s in stops)):]
            if any(s in window for s in stops):
                self._finish(req, "stop")
                return
        if len(req.out) >= req.params.max_tokens:
            self._finish(req, "length")
            return
        hold = max((len(s) for s in stops), default=1) - 1  # may be the start of a stop string
        upto = len(text) - hold
        if upto > req.sent:
            req.emit(Event(text=text[req.sent:upto]))
            req.sent = upto


def _cut(text: str, stops: list[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


# ---------------------------------------------------------------------- loading and prompts (serve and chat)

IM_START, IM_END = "<|im_start|>", "<|im_end|>"


@dataclass
class Meta:
    """What the HTTP side needs of a checkpoint without its weights (serve's parent process): the tokenizer,
    the model's name, whether it speaks ChatML, its end-of-turn ids, and where the weights are."""
    tok: object
    tok_dir: object  # Path
    path: object  # Path: the resolved checkpoint directory (a run directory's latest checkpoint)
    kind: str     # "z2all" | "hf"
    note: str | None
    name: str
    chatml: bool  # the tokenizer has <|im_start|>/<|im_end|>: a chat model's ChatML; else a base model
    eos_ids: list[int]


@dataclass
class Loaded:
    model: object
    tok: object
    name: str
    vocab_limit: int | None
    chatml: bool
    eos_ids: list[int]


def load_meta(ckpt: str, tokenizer: str = "", option: str = "--ckpt") -> Meta:
    """The checkpoint resolved and its tokenizer loaded, every problem a UserError naming the option: --ckpt
    may be a checkpoint, a run directory or a Hugging Face Llama directory (llama.resolve_checkpoint)."""
    from pathlib import Path

    from z2all.model.generate import load_tokenizer, stop_ids
    from z2all.model.hf_compat import default_tokenizer_dir
    from z2all.model.llama import resolve_checkpoint

    path, kind, note = resolve_checkpoint(ckpt, option)
    tok_dir = Path(tokenizer) if tokenizer else default_tokenizer_dir(path, kind)
    if not tokenizer and not tok_dir.is_dir():
        raise UserError(f"{option} {path} has no tokenizer/ next to its weights; pass --tokenizer DIR (the "
                        f"tokenizer the model was trained with)")
    tok = load_tokenizer(tok_dir)
    vocab = tok.get_vocab()
    chatml = IM_START in vocab and IM_END in vocab
    eos = stop_ids(tok)
    # runs/<run>/checkpoints/step-N -> "<run>-step-N"; anything else: its directory name
    name = f"{path.parent.parent.name}-{path.name}" if path.parent.name == "checkpoints" else path.name
    return Meta(tok, tok_dir, path, kind, note, name or "z2all", chatml, eos)


def load_model(meta: Meta, device: str = "auto", dtype: str = "auto"):
    """(model in eval mode on its device and dtype, vocab_limit) for a load_meta result."""
    from z2all.model.generate import check_vocab_fits
    from z2all.model.hf_compat import load_hf_dir
    from z2all.model.llama import load_model as load_z2all
    from z2all.utils import pick_device, pick_dtype

    dev = pick_device(device)
    model = load_z2all(meta.path, dev) if meta.kind == "z2all" else load_hf_dir(meta.path, dev)
    model = model.to(pick_dtype(dtype, dev)).eval()
    return model, check_vocab_fits(meta.tok, model.cfg.vocab_size, meta.tok_dir, meta.path)


def load(ckpt: str, tokenizer: str = "", device: str = "auto", dtype: str = "auto", option: str = "--ckpt") -> Loaded:
    """Model + tokenizer for chat and serve (load_meta, then load_model); the note of a run directory's
    latest checkpoint goes to stderr."""
    import sys

    meta = load_meta(ckpt, tokenizer, option)
    if meta.note:
        print(meta.note, file=sys.stderr, flush=True)
    model, vocab_limit = load_model(meta, device, dtype)
    return Loaded(model, meta.tok, meta.name, vocab_limit, meta.chatml, meta.eos_ids)


def encode_text(tok, text: str) -> list[int]:
    """Ids of `text` as plain text: a special token's string inside it (`<|im_end|>`) stays text."""
    if not text:
        return []
    return tok(text, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]


def render_chat(tok, messages: list[dict], chatml: bool) -> list[int]:
    """The prompt ids of a conversation, ending where the assistant's answer starts. ChatML is built
    structurally (the specials are ids we place; message text is encoded as text, so it can never close a
    turn), the same ids as the tokenizer's chat template. A base model (no ChatML tokens) gets a plain
    transcript ("User: ...\nAssistant:"); the server stops it at the next "\nUser:"."""
    ids: list[int] = []
    if chatml:
        start, end = tok.convert_tokens_to_ids(IM_START), tok.convert_tokens_to_ids(IM_END)
        for m in messages:
            ids += [start] + encode_text(tok, f"{m['role']}\n{m['content']}") + [end] + encode_text(tok, "\n")
        return ids + [start] + encode_text(tok, "assistant\n")
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
    return encode_text(tok, text)


BASE_CHAT_STOPS = ["\nUser:", "\nSystem:"]


def wait_idle(engine: Engine, timeout: float = 10.0) -> bool:
    """True once nothing is active or waiting (tests)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        s = engine.stats()
        if not s["active"] and not s["waiting"]:
            return True
        time.sleep(0.01)
    return False
