"""`z2all serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching engine,
with a chat page at `/`.

    z2all serve --ckpt runs/demo/checkpoints/step-369              # http://127.0.0.1:8000
    z2all serve --ckpt hf/z2all-1b --host 0.0.0.0 --api-key SECRET  # reachable from the network
    curl localhost:8000/v1/chat/completions -d '{"model": "...", "messages": [{"role": "user", "content": "Hi"}]}'

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, GET / (the page).
`stream: true` answers with server-sent events in OpenAI's chunk format, ending with `data: [DONE]`.

Where OpenAI and llama.cpp's server differ or are silent, the choices here:
- `max_tokens` absent: chat runs to the end of the context (OpenAI's chat), completions stop at 16
  (OpenAI's legacy default); `max_completion_tokens` is read as `max_tokens`. A prompt plus an explicit
  `max_tokens` past the context is a 400 naming both numbers (OpenAI), not silently clipped (llama.cpp).
- `n` > 1, several prompts per completion, `logprobs`, `echo`, tools: a 400 saying so (not supported).
- `model` may be omitted (llama.cpp); a name other than ours is a 404 (OpenAI's model_not_found).
- Extras from llama.cpp: `top_k`, `ignore_eos`. Unknown fields are ignored (llama.cpp), not refused.
- A base model (a tokenizer without <|im_start|>/<|im_end|>) takes chat requests as a plain transcript
  ("User: ...\\nAssistant:"), stopped at the next "\\nUser:"; /v1/completions is its natural route.
- Errors are OpenAI-shaped, {"error": {"message", "type", "param", "code"}}: 400 bad JSON or values, 401 a
  missing or wrong API key, 404 unknown model or route, 413 a body over --max-body, 429 the queue is full
  (past --max-queue waiting requests; below it requests wait, they are not refused), 500 a failed step.
- A client that disconnects (streaming or not) cancels its request; the engine frees its slot before the
  next step.
- Streaming sends each token as it comes (OpenAI, llama.cpp). `--stream-interval S` sends the tokens after
  the first in chunks at most every S seconds. Each token otherwise wakes the HTTP side once: with the
  engine process (the default) a pipe message that the engine pays for (worker.py), with `--engine thread`
  a thread hand-off (the GIL passes between the engine thread and the loop). A single demo-model stream
  gains a few percent from S = 2-5 ms (docs/performance.md, "Serving"); a larger model's step dwarfs it.
- Binding: 127.0.0.1 unless --host says otherwise; with --api-key every /v1 route wants
  `Authorization: Bearer KEY` (compared in constant time). /health and the page stay open; the page asks
  for the key when the API answers 401.
"""

# no `from __future__ import annotations`: FastAPI reads the route signatures at runtime, and the
# `Request` they name is imported inside create_app

import asyncio
import collections
import hmac
import json
import math
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from z2all.config import opt
from z2all.serve.engine import BASE_CHAT_STOPS, Engine, Event, QueueFull, SamplingParams, render_chat
from z2all.serve.worker import EngineGone
from z2all.utils import UserError, human_bytes

STATIC = Path(__file__).parent / "static"
ROLES = ("system", "developer", "user", "assistant", "tool")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or {401: "authentication_error", 404: "invalid_request_error",
                              429: "rate_limit_error", 500: "server_error", 503: "server_error"}.get(
                                  status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------- request parsing (no FastAPI here)

def _number(body: dict, key: str, default, lo: float, hi: float, *, integer: bool = False, lo_open=False):
    v = body.get(key, default)
    if v is None:
        return default
    ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok_type or (not integer and not math.isfinite(v)):
        raise ApiError(400, f"'{key}' must be {'an integer' if integer else 'a number'}, got {v!r}", key)
    if (v <= lo if lo_open else v < lo) or v > hi:
        rng = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise ApiError(400, f"'{key}' must be in {rng}, got {v}", key)
    return v


def parse_params(body: dict, chat: bool) -> tuple[SamplingParams, int | None]:
    """Sampling settings of a request (OpenAI names) -> (params with max_tokens possibly None → caller
    fills it, the explicit max_tokens or None). Every bad value is a 400 naming the field."""
    n = body.get("n", 1)
    if n is not None and n != 1:
        if isinstance(n, int) and not isinstance(n, bool) and n > 1:
            raise ApiError(400, f"'n' = {n} is not supported: this server returns one choice per request; send "
                                f"{n} requests (with different seeds) instead", "n")
        raise ApiError(400, f"'n' must be 1, got {n!r}", "n")
    # what we do not implement is accepted only in its "off" spelling; anything else is a 400, not a silent
    # null (type-exact: in Python True == 1 and False == 0, and `logprobs: 0` asks for the chosen token's)
    for key, offs in (("logprobs", (None, False)), ("top_logprobs", (None, 0)), ("echo", (None, False)),
                      ("suffix", (None, "")), ("tools", (None, [])), ("functions", (None, [])), ("best_of", (None, 1))):
        v = body.get(key)
        if not any(v is None if off is None else (type(v) is type(off) and v == off) for off in offs):
            raise ApiError(400, f"'{key}' = {json.dumps(v)[:40]} is not supported by this server", key)
    mt = body.get("max_tokens")
    if mt is None and chat:
        mt = body.get("max_completion_tokens")
        key = "max_completion_tokens"
    else:
        key = "max_tokens"
    if mt is not None and (isinstance(mt, bool) or not isinstance(mt, int) or mt <= 0):
        raise ApiError(400, f"'{key}' must be a positive integer, got {mt!r}", key)
    stop = body.get("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise ApiError(400, f"'stop' must be a string or a list of strings, got {stop!r}", "stop")
    if len(stops) > 16 or any(not s for s in stops):
        raise ApiError(400, "'stop' takes up to 16 non-empty strings", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, f"'seed' must be an integer, got {seed!r}", "seed")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise ApiError(400, f"'ignore_eos' must be true or false, got {ignore_eos!r}", "ignore_eos")
    params = SamplingParams(
        max_tokens=0,
        temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
        top_p=float(_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)),
        top_k=int(_number(body, "top_k", 0, 0, 1 << 30, integer=True)),
        stop=stops, seed=seed if seed is None else seed % (2 ** 63), ignore_eos=ignore_eos)
    return params, mt


def parse_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if msgs is None:
        raise ApiError(400, "'messages' is required: a list of {\"role\", \"content\"} objects", "messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"'{where}' must be an object with 'role' and 'content'", where)
        role = m.get("role")
        if role not in ROLES:
            raise ApiError(400, f"'{where}.role' must be one of {', '.join(ROLES)}, got {role!r}", f"{where}.role")
        content = m.get("content")
        if content is None:
            content = ""
        if isinstance(content, list):  # content parts: text only
            parts = []
            for p in content:
                if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                    raise ApiError(400, f"'{where}.content' parts must be {{\"type\": \"text\", \"text\": ...}} "
                                        f"(this model reads text only)", f"{where}.content")
                parts.append(p["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise ApiError(400, f"'{where}.content' must be a string, got {type(content).__name__}",
                           f"{where}.content")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def parse_prompt(body: dict, tok) -> list[int]:
    p = body.get("prompt")
    if p is None:
        raise ApiError(400, "'prompt' is required (a string)", "prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        p = p[0]
    if isinstance(p, str):
        ids = tok(p, add_special_tokens=True, split_special_tokens=True)["input_ids"] if p else []
    elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        ids = list(p)
        if any(t < 0 or t >= len(tok) for t in ids):
            raise ApiError(400, f"'prompt' holds token ids outside the vocabulary of {len(tok)}", "prompt")
    elif isinstance(p, list):
        raise ApiError(400, "several prompts in one request are not supported; send one request per prompt",
                       "prompt")
    else:
        raise ApiError(400, f"'prompt' must be a string, got {type(p).__name__}", "prompt")
    if not ids:
        raise ApiError(400, "'prompt' is empty (it encodes to no tokens)", "prompt")
    return ids


# ---------------------------------------------------------------------- the app

class Service:
    """What the routes share: the engine, the tokenizer, the model's name and the limits."""

    def __init__(self, engine: Engine, tok, name: str, chatml: bool, api_key: str = "", max_body: int = 1 << 22,
                 stream_interval: float = 0.0):
        self.engine, self.tok, self.name, self.chatml = engine, tok, name, chatml
        self.api_key, self.max_body, self.stream_interval = api_key, max_body, stream_interval
        self.created = int(time.time())

    def fill_max_tokens(self, params: SamplingParams, explicit: int | None, n_prompt: int, chat: bool) -> None:
        ctx = self.engine.slot_len
        room = ctx - n_prompt
        if room < 1:
            raise ApiError(400, f"this model's maximum context length is {ctx} tokens, but the prompt has "
                                f"{n_prompt}; shorten the prompt (or the conversation)",
                           "messages" if chat else "prompt", "context_length_exceeded")
        if explicit is None:
            params.max_tokens = room if chat else min(16, room)
        elif explicit > room:
            raise ApiError(400, f"this model's maximum context length is {ctx} tokens; you requested "
                                f"{n_prompt + explicit} ({n_prompt} in the prompt, {explicit} for the completion); "
                                f"lower max_tokens to {room} or shorten the prompt", "max_tokens",
                           "context_length_exceeded")
        else:
            params.max_tokens = explicit


def create_app(svc: Service):
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="z2all", docs_url=None, redoc_url=None, openapi_url=None)

    def error_response(e: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        msg = {404: f"no route {request.method} {request.url.path}; see /v1/models, /v1/chat/completions, "
                    f"/v1/completions, /health",
               405: f"method {request.method} not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return error_response(ApiError(e.status_code, msg, code=None))

    def check_auth(request: Request) -> None:
        if not svc.api_key:
            return
        got = request.headers.get("authorization", "")
        scheme, _, key = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), svc.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' (the --api-key the "
                                "server was started with)", code="invalid_api_key")

    async def read_json(request: Request) -> dict:
        check_auth(request)
        declared = request.headers.get("content-length")
        too_big = ApiError(413, f"request body is over the server's limit of {human_bytes(svc.max_body)} "
                                f"(--max-body)", code="request_too_large")
        if declared and declared.isdigit() and int(declared) > svc.max_body:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > svc.max_body:
                raise too_big
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except ValueError as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None
        except RecursionError:
            raise ApiError(400, "the request body is not valid JSON for this server (nested too deeply)") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise ApiError(400, f"'model' must be a string, got {json.dumps(model)[:40]}", "model")
        if model is not None and model != svc.name:
            raise ApiError(404, f"the model '{model}' does not exist; this server serves '{svc.name}' (GET /v1/models)",
                           "model", "model_not_found")
        return body

    @app.get("/health")
    async def health():
        gone = getattr(svc.engine, "gone", None)  # worker.EngineProcess whose child has exited
        if gone:
            return JSONResponse({"status": "error", "model": svc.name, "error": gone}, status_code=503)
        cpus = getattr(svc.engine, "cpus", None)  # the engine process's CPUs when pinned (split_cpus)
        return {"status": "ok", "model": svc.name, "engine_cpus": cpus[1] if cpus else None, **svc.engine.stats()}

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [{"id": svc.name, "object": "model", "created": svc.created,
                                            "owned_by": "z2all", "context_length": svc.engine.slot_len}]}

    async def run_request(request: Request, body: dict, chat: bool):
        params, explicit = parse_params(body, chat)
        with svc.engine.tok_lock:
            try:
                if chat:
                    ids = render_chat(svc.tok, parse_messages(body), svc.chatml)
                else:
                    ids = parse_prompt(body, svc.tok)
            except (TypeError, UnicodeError) as e:  # a lone surrogate ("\ud800") is valid JSON, not Unicode text
                where = "messages" if chat else "prompt"
                raise ApiError(400, f"'{where}' holds text that is not valid Unicode (a lone surrogate?): "
                                    f"{str(e)[:80]}", where) from None
        if chat and not svc.chatml:
            params.stop = params.stop + BASE_CHAT_STOPS
        svc.fill_max_tokens(params, explicit, len(ids), chat)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, f"'stream' must be true or false, got {stream!r}", "stream")
        opts = body.get("stream_options") or {}
        include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
        queue = _Inbox(asyncio.get_running_loop(), svc.stream_interval)
        try:
            req = svc.engine.submit(ids, params, queue.put)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}; retry later", code="queue_full") from None
        except EngineGone as e:
            raise ApiError(503, str(e), code="engine_unavailable") from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if stream:
            return StreamingResponse(_sse(svc, req, queue, rid, created, chat, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        parts = []
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(queue.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        svc.engine.cancel(req)
                        return JSONResponse({}, status_code=499)
                    continue
                parts.append(ev.text)
                if ev.final:
                    break
        finally:
            svc.engine.cancel(req)  # a no-op when it finished; frees the slot when the handler was cancelled
        if ev.finish_reason == "error":
            raise ApiError(500, f"generation failed: {ev.error}", code="server_error")
        text = "".join(parts)
        usage = {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
                 "total_tokens": ev.prompt_tokens + ev.completion_tokens}
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": ev.finish_reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": ev.finish_reason}
            obj = "text_completion"
        return {"id": rid, "object": obj, "created": created, "model": svc.name, "choices": [choice],
                "usage": usage, "system_fingerprint": None}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await run_request(request, await read_json(request), chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run_request(request, await read_json(request), chat=False)

    return app


class _Inbox:
    """One request's events, from the engine thread to its handler on the event loop. Waking the loop is a
    thread hand-off (a self-pipe write, then the GIL passes to the loop and back to the engine), paid per
    token when every event wakes it. With `interval` > 0 the first and the final event wake the loop at
    once and the others at most once per interval, while the handler also polls every interval: a fast
    stream's tokens then reach the client in chunks of about `interval` seconds (--stream-interval).
    interval 0 wakes the loop for every event."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float):
        self.loop, self.interval = loop, interval
        self.loop_thread = threading.get_ident()  # made by the handler, on the loop's thread
        self.items: collections.deque[Event] = collections.deque()
        self.lock = threading.Lock()
        self.ready = asyncio.Event()
        self.last = -math.inf

    def put(self, ev: Event) -> None:
        """The engine's callback: from the engine thread (Engine) or on the loop (worker.EngineProcess)."""
        with self.lock:
            self.items.append(ev)
            now = time.monotonic()
            wake = ev.final or now - self.last >= self.interval
            if wake:
                self.last = now
        if wake:
            if threading.get_ident() == self.loop_thread:  # worker.EngineProcess delivers on the loop itself
                self.ready.set()
            else:
                self.loop.call_soon_threadsafe(self.ready.set)

    def empty(self) -> bool:
        return not self.items

    def get_nowait(self) -> Event:
        with self.lock:
            return self.items.popleft()

    async def get(self) -> Event:
        while True:
            with self.lock:
                if self.items:
                    return self.items.popleft()
                self.ready.clear()
            if self.interval > 0:
                try:
                    await asyncio.wait_for(self.ready.wait(), self.interval)
                except asyncio.TimeoutError:
                    pass
            else:
                await self.ready.wait()


async def _sse(svc: Service, req, queue: _Inbox, rid: str, created: int, chat: bool, include_usage: bool):
    """The OpenAI stream: one `data: {chunk}` per text delta, a last chunk with finish_reason, the usage
    chunk when asked (stream_options.include_usage), then `data: [DONE]`. When the client goes away
    Starlette cancels this generator; `finally` cancels the request, freeing its slot."""
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta_or_text, finish=None, usage=None, choices=True):
        if not choices:
            body = {"id": rid, "object": obj, "created": created, "model": svc.name, "choices": [], "usage": usage}
        elif chat:
            body = {"id": rid, "object": obj, "created": created, "model": svc.name,
                    "choices": [{"index": 0, "delta": delta_or_text, "logprobs": None, "finish_reason": finish}]}
        else:
            body = {"id": rid, "object": obj, "created": created, "model": svc.name,
                    "choices": [{"index": 0, "text": delta_or_text, "logprobs": None, "finish_reason": finish}]}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        if chat:
            yield chunk({"role": "assistant", "content": ""})
        while True:
            ev = await queue.get()
            text = ev.text
            # under load several deltas wait in the queue: send them as one chunk (fewer writes; OpenAI's
            # chunks carry any number of tokens too)
            while not ev.final and not queue.empty():
                ev = queue.get_nowait()
                text += ev.text
            if text:
                yield chunk({"content": text} if chat else text)
            if ev.final:
                break
        if ev.finish_reason == "error":
            err = ApiError(500, f"generation failed: {ev.error}", code="server_error")
            yield f"data: {json.dumps(err.body())}\n\n"
        else:
            yield chunk({} if chat else "", finish=ev.finish_reason)
            if include_usage:
                yield chunk(None, usage={"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
                                         "total_tokens": ev.prompt_tokens + ev.completion_tokens}, choices=False)
        yield "data: [DONE]\n\n"
    finally:
        svc.engine.cancel(req)


# ---------------------------------------------------------------------- the command

@dataclass
class Config:
    ckpt: str = opt("", "checkpoint directory, a training run directory (its latest checkpoint) or a Hugging Face "
                    "Llama directory (`z2all export hf`)")
    tokenizer: str = opt("", "tokenizer directory (default: <ckpt>/tokenizer/ or the HF directory itself)")
    host: str = opt("127.0.0.1", "address to bind; 0.0.0.0 makes the server reachable from the network (then "
                    "set --api-key)")
    port: int = opt(8000, "TCP port")
    api_key: str = opt("", "require 'Authorization: Bearer KEY' on every /v1 route (empty: no key)")
    model_name: str = opt("", "the model id clients send and /v1/models lists (default: from the checkpoint path)")
    max_batch: int = opt(8, "KV-cache slots: requests decoded together in one forward pass; more wait in the queue")
    max_tokens_in_cache: int = opt(0, "total KV-cache positions over all slots (0 = max-batch x the context); "
                                   "each slot gets this / max-batch, which bounds prompt + max_tokens")
    context: int = opt(0, "positions per request, prompt + completion (0 = the model's max_seq_len)")
    prefill_chunk: int = opt(128, "prompt tokens prefilled per scheduler step, so a long prompt stalls the "
                             "decoding requests for at most one chunk")
    max_queue: int = opt(64, "requests that may wait for a slot; past this the server answers 429")
    max_body: int = opt(4 << 20, "largest request body in bytes; larger bodies get 413")
    sequential: bool = opt(False, "serve one request at a time (the reference for continuous batching; the same "
                           "as --max-batch 1)")
    decode: str = opt("fast", "decode step: fast (fused projections) or plain (the model's forward, the reference)",
                      choices=("fast", "plain"))
    device: str = opt("auto", "auto (cuda when available, else cpu), cpu, cuda, cuda:1, ...")
    dtype: str = opt("auto", "compute dtype: auto = bf16/fp16 on GPU, fp32 on CPU",
                     choices=("auto", "fp32", "bf16", "fp16"))
    threads: int = opt(0, "CPU threads for torch (0 = torch's default)")
    stream_interval: float = opt(0.0, "seconds: a stream's tokens after the first are sent in chunks at most this "
                                 "often (fewer wake-ups of the HTTP side per token); 0 = every token as it comes")
    decode_threads: int = opt(0, "CPU threads for prefill and decode steps; 0 = auto: 1 for a model under 64 MB of "
                              "weights (per-op threading costs more than it saves there), --threads otherwise")
    batched_matmul: str = opt("auto", "with --decode-kernels torch: the matrix "
                              "multiplies of batched decode steps and prompt prefills: onednn (packed weights, "
                              "AVX-512 on any x86 CPU), blas (torch.mm: MKL), auto = onednn on an x86 CPU in fp32, "
                              "else blas", choices=("auto", "onednn", "blas"))
    decode_kernels: str = opt("auto", "a decode step's RMSNorm, its RoPE, cache write and attention, and its matrix "
                              "multiplies: c (the compiled z2all.model._decodec), torch (the reference ops), auto "
                              "= c for an fp32 model on the CPU when it is built",
                              choices=("auto", "c", "torch"))
    engine: str = opt("process", "where the model runs: process (a process of its own, so decoding and the HTTP side "
                      "run on two cores) or thread (a thread of the server process; they share one GIL)",
                      choices=("process", "thread"))
    pin_cpus: bool = opt(True, "with --engine process: the engine on CPUs of its own (its decode threads' worth), the "
                         "HTTP side on the others, when there are more CPUs than decode threads")


def build(cfg: Config) -> tuple[Service, object]:
    """The engine and the app for a config (the command, the benchmark and tests use it)."""
    if cfg.threads < 0:
        raise UserError(f"--threads must be >= 0, got {cfg.threads}")
    if not 0 <= cfg.stream_interval <= 1:
        raise UserError(f"--stream-interval must be in 0..1 seconds, got {cfg.stream_interval}")
    if cfg.engine not in ("process", "thread"):
        raise UserError(f"--engine must be process or thread, got {cfg.engine!r}")
    if not 0 <= cfg.port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {cfg.port}")
    if cfg.max_body < 1024:
        raise UserError(f"--max-body must be >= 1024 bytes, got {cfg.max_body}")
    for name, value, lo in (("--max-batch", cfg.max_batch, 1), ("--prefill-chunk", cfg.prefill_chunk, 1),
                            ("--max-queue", cfg.max_queue, 0)):
        if value < lo:
            raise UserError(f"{name} must be >= {lo}, got {value}")
    if cfg.context < 0 or cfg.max_tokens_in_cache < 0:
        raise UserError("--context and --max-tokens-in-cache must be >= 0 (0 = from the model)")
    max_batch = 1 if cfg.sequential else cfg.max_batch
    engine_kw = dict(max_batch=max_batch, max_tokens_in_cache=cfg.max_tokens_in_cache, context=cfg.context,
                     prefill_chunk=cfg.prefill_chunk, decode=cfg.decode, decode_threads=cfg.decode_threads,
                     batched_matmul=cfg.batched_matmul, kernels=cfg.decode_kernels)
    if cfg.engine == "process":
        from z2all.serve.engine import load_meta
        from z2all.serve.worker import EngineProcess, EngineSpec

        meta = load_meta(cfg.ckpt, cfg.tokenizer)
        if meta.note:
            print(meta.note, file=sys.stderr, flush=True)
        spec = EngineSpec(str(meta.path), meta.kind, str(meta.tok_dir), cfg.device, cfg.dtype, cfg.threads,
                          cfg.pin_cpus, engine_kw, cfg.stream_interval)
        engine = EngineProcess(spec, max_queue=cfg.max_queue)
        tok, name, chatml = meta.tok, meta.name, meta.chatml
    else:
        import torch

        from z2all.serve.engine import load

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        loaded = load(cfg.ckpt, cfg.tokenizer, cfg.device, cfg.dtype)
        engine = Engine(loaded.model, loaded.tok, max_queue=cfg.max_queue, eos_ids=loaded.eos_ids,
                        vocab_limit=loaded.vocab_limit, **engine_kw)
        tok, name, chatml = loaded.tok, loaded.name, loaded.chatml
    svc = Service(engine, tok, cfg.model_name or name, chatml, cfg.api_key, cfg.max_body, cfg.stream_interval)
    return svc, create_app(svc)


def _listen(host: str, port: int):
    """The server's listening socket, bound before the model loads: what uvicorn would only log after the
    load (a port in use, an address this machine does not have, a privileged port) is refused at once in
    one line, and --port 0 gets its real port for the start-up line (uvicorn serves on this socket)."""
    import errno
    import socket

    if not 0 <= port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"--host {host}: cannot resolve it ({e.strerror}); use an address such as 127.0.0.1") from None
    fam, kind, proto, _, addr = infos[0]
    s = socket.socket(fam, kind, proto)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(addr)
        s.listen(2048)
    except OSError as e:
        s.close()
        why = {errno.EADDRINUSE: "is already in use (another server?); choose another --port",
               errno.EADDRNOTAVAIL: "is not an address of this machine; use 127.0.0.1 or 0.0.0.0",
               errno.EACCES: "needs privileges (ports below 1024); use a port >= 1024"}.get(
                   e.errno, f"cannot be bound ({e.strerror})")
        raise UserError(f"--host {host} --port {port}: {host}:{port} {why}") from None
    return s


def _where(eng) -> str:
    """Where the model runs, for the start-up line."""
    cpus = getattr(eng, "cpus", None)
    if not hasattr(eng, "proc"):
        return "model in a thread of this process"
    if cpus is None:
        return f"model in process {eng.proc.pid}"
    on = ",".join(map(str, cpus[1]))
    return f"model in process {eng.proc.pid} on CPU {on}, HTTP on CPU {','.join(map(str, cpus[0]))}"


def run(cfg: Config) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise UserError(f"z2all serve needs {e.name}: pip install 'llm-zero2all[serve]' (fastapi, uvicorn)") from None
    sock = _listen(cfg.host, cfg.port)
    try:
        svc, app = build(cfg)
    except BaseException:
        sock.close()
        raise
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    where = f"http://{host}:{sock.getsockname()[1]}"
    eng = svc.engine
    print(f"serving '{svc.name}' on {where}  (chat page: {where}/, OpenAI API: {where}/v1)\n"
          f"  {eng.max_batch} slot(s) x {eng.slot_len} positions, KV cache {human_bytes(eng.cache_bytes)}, "
          f"{'one request at a time' if eng.max_batch == 1 else 'continuous batching'}, "
          f"{'chat (ChatML)' if svc.chatml else 'base model (chat as a plain transcript)'}, {_where(eng)}",
          file=sys.stderr, flush=True)
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_key:
        print(f"note: --host {cfg.host} makes the server reachable from other machines, without an API key; "
              f"add --api-key KEY to require one", file=sys.stderr, flush=True)
    try:
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown: a normal stop
            pass
        if not server.started:
            raise UserError("the HTTP server did not start; its error is printed above")
    finally:
        sock.close()
        eng.close()
    return 0
