"""The serving engine in a process of its own (`z2all serve`'s default; `--engine thread` keeps it in the
server's process): the decode loop and the HTTP side no longer share one GIL.

Why: in one process, every token's HTTP work (waking the event loop, formatting the SSE chunk, Starlette's
send, the socket write) runs Python on the loop thread while the engine thread needs the same GIL between
its ~80 tensor ops per step; the two take turns instead of running on two cores. Split, the engine's
process computes while the server's formats and writes: with the demo-sized model on 2 cores, 8 streams
+12% and 16 streams +22% tokens/s against `--engine thread`, for ~270 MB more RSS (docs/performance.md,
"Serving").

    engine = EngineProcess(EngineSpec(path, kind, tok_dir, ...))  # spawns the child, waits until it is ready
    req = engine.submit(ids, params, emit)                     # on the event loop; emit(Event) on the loop
    engine.cancel(req); engine.stats(); engine.close()

The same interface as engine.Engine (submit/cancel/stats/close, slot_len, max_batch, cache_bytes), so
api.py takes either. Protocol over one multiprocessing Pipe (pickled tuples):
  parent -> child: ("submit", rid, prompt_ids, SamplingParams) | ("cancel", rid) | ("close",)
  child -> parent: ("ready", info) or ("error", message) once at start; then after every scheduler
                   iteration that emitted anything, one message: (events, stats), where events is a list of
                   (rid, text, final, finish_reason, prompt_tokens, completion_tokens, error).
One message per step, not per token: at 8 streams that is one wake-up of the event loop for 8 tokens.
With `stream_interval` > 0 (`--stream-interval`) the child holds a step's events back while none is a
request's first or final event and its last message is under that many seconds old: each message wakes
the sleeping HTTP process, and on this 2-core VM the pipe write that does it costs the engine ~9-17 us
(docs/performance.md, "Serving"), ~6% of a demo-model token.

Admission control stays exact without asking the child: the parent counts its requests that have not
received their final event; `outstanding - max_batch >= max_queue` is the child's own `waiting - free >=
max_queue` (the child may have freed a slot a moment earlier, so the parent errs toward 429).

CPUs: with more CPUs than the engine's decode threads, the engine takes the last ones and the HTTP side the
rest (split_cpus, `--pin-cpus`; why: split_cpus).

Lifetime: the child ignores SIGINT (Ctrl-C stops the server, which closes the child); it exits when the
pipe closes, so a killed server never leaves it behind (it is also a daemon process). If the child dies
(killed, out of memory), every open request ends with finish_reason "error", /health answers 503, and new
requests get 503.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from z2all.serve.engine import Event, QueueFull, SamplingParams
from z2all.utils import UserError, children_ignore_sigint


class EngineGone(Exception):
    """The engine process has exited; the server answers 503."""


@dataclass
class EngineSpec:
    """What the child needs to load the model and build its Engine."""
    path: str            # the resolved checkpoint directory (load_meta's path)
    kind: str            # "z2all" | "hf"
    tokenizer: str       # the tokenizer directory
    device: str = "auto"
    dtype: str = "auto"
    threads: int = 0     # torch intra-op threads of the child (0 = torch's default)
    pin_cpus: bool = True  # the engine on CPUs of its own, the HTTP side on the rest (split_cpus)
    engine: dict = field(default_factory=dict)  # Engine keyword arguments (max_batch, context, ...)
    stream_interval: float = 0.0  # seconds: hold back events that are not a request's first or final (module doc)


def _child(conn, spec: EngineSpec) -> None:
    """The engine process: load, report ready (or one error line), then serve the pipe until it closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # (already ignored from its start: children_ignore_sigint)
    try:
        import torch

        from z2all.model.generate import decode_threads
        from z2all.serve.engine import Engine, load_meta, load_model

        if spec.threads:
            torch.set_num_threads(spec.threads)
        meta = load_meta(spec.path, spec.tokenizer)
        model, vocab_limit = load_model(meta, spec.device, spec.dtype)
        kw = dict(spec.engine)
        cpus = None
        if spec.pin_cpus:
            cpus = split_cpus(decode_threads(model, kw.get("decode_threads", 0)))
            if cpus is not None:
                pin_process(cpus[1])  # before Engine starts its thread, which inherits it
        send_lock, out_lock = threading.Lock(), threading.Lock()
        outbox: list[tuple] = []
        reqs: dict[int, object] = {}
        engine = None
        interval = spec.stream_interval
        urgent = [False]  # the outbox holds a request's first or final event: send it at this step's end
        sent: set[int] = set()  # requests with an event sent already (stream_interval > 0)
        last = [-1.0]  # when the last message went (time.monotonic)

        def emit(rid: int, ev: Event) -> None:  # the engine thread, inside an iteration
            with out_lock:
                outbox.append((rid, ev.text, ev.final, ev.finish_reason, ev.prompt_tokens, ev.completion_tokens,
                               ev.error))
                if ev.final:
                    urgent[0] = True
                    sent.discard(rid)
                elif interval > 0 and rid not in sent:
                    urgent[0] = True
                    sent.add(rid)
            if ev.final:
                reqs.pop(rid, None)

        def flush() -> None:  # the engine thread after each iteration (the main thread for a refused submit)
            with out_lock:
                if not outbox:
                    return
                if interval > 0:
                    now = time.monotonic()
                    # held events go with a later step's message: a request that has not finished is still
                    # decoding, so a step (and this call) follows; its final event is urgent
                    if not urgent[0] and now - last[0] < interval:
                        return
                    last[0], urgent[0] = now, False
                batch = outbox[:]
                del outbox[:]
            data = pickle.dumps((batch, engine.stats()), protocol=pickle.HIGHEST_PROTOCOL)
            try:
                with send_lock:
                    conn.send_bytes(data)
            except (BrokenPipeError, OSError):
                pass  # the server is gone; the main thread sees EOF and stops

        # max_queue: the parent does admission control (module docstring); the child never refuses
        engine = Engine(model, meta.tok, max_queue=1 << 30, eos_ids=meta.eos_ids, vocab_limit=vocab_limit,
                        on_step=flush, **kw)
        # one thread computes in this process: set the count once (Engine's per-iteration switch is a no-op)
        torch.set_num_threads(engine.decode_threads)
        with send_lock:
            conn.send(("ready", {"slot_len": engine.slot_len, "max_batch": engine.max_batch,
                                 "cache_bytes": engine.cache_bytes, "decode_threads": engine.decode_threads,
                                 "vocab_limit": vocab_limit, "stats": engine.stats(), "cpus": cpus}))
    except Exception as e:  # noqa: BLE001 - one line for the user (the server raises it); the traceback with --debug
        if not isinstance(e, UserError) and os.environ.get("Z2ALL_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        why = str(e) if isinstance(e, UserError) else f"the engine process failed to start: {type(e).__name__}: {e}"
        try:
            conn.send(("error", why))
        except OSError:  # the server is gone already
            pass
        return
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break
            if msg[0] == "submit":
                _, rid, ids, params = msg
                try:
                    req = engine.submit(ids, params, lambda ev, rid=rid: emit(rid, ev))
                except ValueError as e:  # the server checks these first; never a dead engine for one request
                    emit(rid, Event(final=True, finish_reason="error", error=str(e)))
                    flush()
                    continue
                if not req.done:  # (a request can finish before this line: then emit has dropped it)
                    reqs[rid] = req
            elif msg[0] == "cancel":
                req = reqs.get(msg[1])
                if req is not None:
                    engine.cancel(req)
            elif msg[0] == "close":
                break
    finally:
        engine.close()


class Handle:
    """The parent's side of one request."""
    __slots__ = ("id", "emit", "done")

    def __init__(self, rid: int, emit: Callable[[Event], None]):
        self.id, self.emit, self.done = rid, emit, False


class EngineProcess:
    """engine.Engine's interface over a child process (module docstring). submit/cancel/stats run on the
    server's event loop thread; events are delivered there by a reader on the pipe (no extra thread)."""

    def __init__(self, spec: EngineSpec, max_queue: int = 64, start_timeout: float = 600.0):
        self.max_queue = max_queue
        ctx = mp.get_context("spawn")  # fork is unsafe once torch has started threads in this process
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_child, args=(child, spec), name="z2all-engine", daemon=True)
        with children_ignore_sigint():  # this process stops it on Ctrl-C (close, or the pipe's end)
            self.proc.start()
        child.close()
        end = time.monotonic() + start_timeout
        while not self.conn.poll(0.2):
            if not self.proc.is_alive():
                raise UserError(f"the engine process exited (code {self.proc.exitcode}) before it was ready; "
                                f"its error is printed above")
            if time.monotonic() > end:
                self.proc.kill()
                raise UserError(f"the engine process was not ready in {start_timeout:.0f} s")
        try:
            kind, info = self.conn.recv()
        except (EOFError, OSError):
            raise UserError(f"the engine process exited (code {self.proc.join(5) or self.proc.exitcode}) "
                            f"before it was ready; its error is printed above") from None
        if kind == "error":
            self.proc.join(10)
            raise UserError(info)
        self.slot_len, self.max_batch = info["slot_len"], info["max_batch"]
        self.cache_bytes, self.decode_threads = info["cache_bytes"], info["decode_threads"]
        self._stats = info["stats"]
        self.cpus = info["cpus"]  # (the HTTP side's CPUs, the engine's) or None: not pinned
        if self.cpus is not None:
            pin_process(self.cpus[0])
        self.tok_lock = threading.Lock()  # api.py's tokenizer lock: here only the loop thread encodes
        self.handles: dict[int, Handle] = {}
        self.ids = itertools.count(1)
        self.loop = None
        self.gone: str | None = None

    def _attach(self) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        if self.loop is not loop:
            if self.loop is not None and not self.loop.is_closed():
                self.loop.remove_reader(self.conn.fileno())
            loop.add_reader(self.conn.fileno(), self._readable)
            self.loop = loop

    def submit(self, prompt_ids: list[int], params: SamplingParams, emit: Callable[[Event], None]) -> Handle:
        """Queue a request (on the event loop). Raises QueueFull past max_queue waiting, EngineGone when the
        child has exited."""
        if self.gone:
            raise EngineGone(self.gone)
        if not prompt_ids:
            raise ValueError("empty prompt")
        if len(prompt_ids) + params.max_tokens > self.slot_len:
            raise ValueError("prompt + max_tokens exceed the slot")
        waiting = len(self.handles) - self.max_batch
        if waiting >= self.max_queue:
            raise QueueFull(f"{waiting} requests are waiting (--max-queue {self.max_queue})")
        self._attach()
        h = Handle(next(self.ids), emit)
        self.handles[h.id] = h
        try:
            self.conn.send(("submit", h.id, list(prompt_ids), params))
        except OSError:
            del self.handles[h.id]
            self._lost()
            raise EngineGone(self.gone) from None
        return h

    def cancel(self, h: Handle) -> None:
        if h.done or self.gone:
            return
        try:
            self.conn.send(("cancel", h.id))
        except OSError:
            self._lost()

    def _readable(self) -> None:
        """The pipe has data: every complete message, each event to its request's emit (on the loop)."""
        try:
            while self.conn.poll():
                batch, self._stats = pickle.loads(self.conn.recv_bytes())
                for rid, text, final, reason, pt, ct, err in batch:
                    h = self.handles.get(rid)
                    if h is None:
                        continue
                    if final:
                        h.done = True
                        del self.handles[rid]
                    h.emit(Event(text, final, reason, pt, ct, err))
        except (EOFError, OSError):
            self._lost()

    def _lost(self) -> None:
        """The child is gone: end every open request with an error, answer 503 from now on."""
        if self.gone:
            return
        self.proc.join(1)
        code = self.proc.exitcode
        self.gone = f"the engine process exited (code {code}); restart the server"
        print(f"z2all serve: {self.gone}", file=sys.stderr, flush=True)
        if self.loop is not None and not self.loop.is_closed():
            self.loop.remove_reader(self.conn.fileno())
        for h in list(self.handles.values()):
            h.done = True
            h.emit(Event(final=True, finish_reason="error", error=self.gone))
        self.handles.clear()

    def stats(self) -> dict:
        """The child's counters as of its last message (active, waiting, free_slots, steps, max_rows), and its
        pid (engine_pid)."""
        return {**self._stats, "engine_pid": self.proc.pid}

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(("close",))
            except OSError:
                pass
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(5)
        if self.loop is not None and not self.loop.is_closed():
            try:
                self.loop.remove_reader(self.conn.fileno())
            except (ValueError, OSError):
                pass
        self.conn.close()


def split_cpus(engine_threads: int) -> tuple[list[int], list[int]] | None:
    """(CPUs for the HTTP side, CPUs for the engine): the engine takes the last `engine_threads` of the CPUs
    this process may use, the server the rest; None when there are not more CPUs than engine threads.
    Why pin at all: the engine wakes the server process at every token (a pipe write), and the scheduler
    tends to run the woken process on the waker's CPU, where it preempts the engine; measured with the
    demo-sized model on 2 cores, one stream 1,372-1,554 -> 1,666-1,671 tokens/s and 8 streams 2,706-3,302
    -> 3,249-3,495 (docs/performance.md, "Serving")."""
    cpus = sorted(os.sched_getaffinity(0))
    k = max(1, engine_threads)
    if len(cpus) <= k:
        return None
    return cpus[:-k], cpus[-k:]


def pin_process(cpus: list[int]) -> None:
    """Every thread of this process onto `cpus` (Linux's affinity is per thread; threads started later
    inherit the caller's)."""
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:  # a thread that has just exited
            pass
