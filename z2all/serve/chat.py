"""`z2all chat`: a multi-turn chat in the terminal, streaming each token as it is produced.

    z2all chat --ckpt runs/sft/checkpoints/step-2000
    z2all chat --ckpt hf/z2all-1b --system "You answer in one sentence." --temperature 0.3

Commands at the prompt: /reset (forget the conversation), /system TEXT (set the system prompt; /system alone
clears it), /params temperature=0.7 top_p=0.9 top_k=40 max_new_tokens=256 repetition_penalty=1.1 (any of
them), /help, /exit (or Ctrl-D). Ctrl-C while the model answers stops that answer (what it said so far stays
in the conversation, as llama.cpp's chat keeps it); Ctrl-C at an empty prompt twice in a row quits.

The conversation goes through the checkpoint's ChatML template (built structurally, so text that contains
<|im_end|> stays text); a base model without ChatML tokens chats as a plain "User: ... / Assistant:"
transcript, stopped at the next "User:". When the conversation plus --max-new-tokens no longer fits the
context, the oldest turns are dropped first (the system prompt stays) and a note says how many.
The answer is sampled by model/generate.py's `generate` (the plain KV-cache path), one request at a time.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass

from z2all.config import opt
from z2all.utils import UserError, seed_everything

HELP = ("commands: /reset  /system TEXT  /params temperature=0.7 top_p=0.9 top_k=0 max_new_tokens=256 "
        "repetition_penalty=1.0  /help  /exit (Ctrl-D)")
PARAMS = {"temperature": float, "top_p": float, "top_k": int, "max_new_tokens": int, "repetition_penalty": float}


@dataclass
class Config:
    ckpt: str = opt("", "checkpoint directory, a training run directory (its latest checkpoint) or a Hugging Face "
                    "Llama directory (`z2all export hf`)")
    tokenizer: str = opt("", "tokenizer directory (default: <ckpt>/tokenizer/ or the HF directory itself)")
    system: str = opt("", "system prompt (change it in the chat with /system TEXT)")
    max_new_tokens: int = opt(0, "longest answer in tokens (0 = half the context, at most 512)")
    temperature: float = opt(0.7, "sampling temperature; 0 = greedy")
    top_p: float = opt(0.9, "nucleus sampling; 1 = off")
    top_k: int = opt(0, "sample from the k most likely tokens only; 0 = off")
    repetition_penalty: float = opt(1.0, "penalise tokens already in the conversation (CTRL); 1 = off")
    context: int = opt(0, "tokens of conversation + answer kept (0 = the model's max_seq_len)")
    seed: int = opt(1234, "random seed for sampling")
    device: str = opt("auto", "auto (cuda when available, else cpu), cpu, cuda, cuda:1, ...")
    dtype: str = opt("auto", "compute dtype: auto = bf16/fp16 on GPU, fp32 on CPU",
                     choices=("auto", "fp32", "bf16", "fp16"))


class Session:
    """The conversation and its settings; `ask(text)` streams one answer to `out`."""

    def __init__(self, loaded, cfg: Config, out=None):
        import torch

        self.L, self.cfg, self.out = loaded, cfg, out or sys.stdout
        self.ctx = cfg.context or loaded.model.cfg.max_seq_len
        self.system = cfg.system
        self.turns: list[dict] = []
        self.params = {k: getattr(cfg, k) for k in PARAMS}
        self.gen = torch.Generator(device=loaded.model.tok_embeddings.weight.device).manual_seed(cfg.seed)

    def say(self, msg: str) -> None:
        self.out.write(msg + "\n")
        self.out.flush()

    def set_params(self, args: str) -> None:
        from z2all.model.generate import check_sampling

        new = dict(self.params)
        try:
            items = shlex.split(args)
        except ValueError as e:  # an unbalanced quote
            raise UserError(f"/params {args}: {e}; write key=value pairs, e.g. /params temperature=0.7") from None
        for item in items:
            key, eq, value = item.partition("=")
            key = key.replace("-", "_")
            if not eq or key not in PARAMS:
                raise UserError(f"/params takes key=value with key one of {', '.join(PARAMS)}; got {item!r}")
            try:
                new[key] = PARAMS[key](value)
            except ValueError:
                what = "an integer" if PARAMS[key] is int else "a number"
                raise UserError(f"/params {key}: {value!r} is not {what}") from None
        try:
            check_sampling(**{k: new[k] for k in ("temperature", "top_k", "top_p", "repetition_penalty",
                                                  "max_new_tokens")})
        except UserError as e:  # its message names the command-line options: name the /params keys instead
            msg = str(e)
            for k in PARAMS:
                msg = msg.replace("--" + k.replace("_", "-"), k)
            raise UserError(f"/params {msg}") from None
        if new["max_new_tokens"] >= self.ctx:
            raise UserError(f"max_new_tokens must be below the context of {self.ctx} tokens")
        self.params = new

    def _messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.turns

    def _fit(self) -> tuple[list[int], int]:
        """Prompt ids that leave max_new_tokens of room, dropping the oldest turns first; (ids, dropped)."""
        from z2all.serve.engine import render_chat

        dropped = 0
        while True:
            ids = render_chat(self.L.tok, self._messages(), self.L.chatml)
            if len(ids) + self.params["max_new_tokens"] <= self.ctx or len(self.turns) <= 1:
                return ids, dropped
            # drop the oldest exchange (a user turn and the answer after it)
            n = 2 if len(self.turns) > 2 and self.turns[1]["role"] == "assistant" else 1
            del self.turns[:n]
            dropped += n

    def ask(self, text: str) -> str:
        from z2all.model.generate import _stop_checker, _Streamer, cut_at_stop, generate
        from z2all.serve.engine import BASE_CHAT_STOPS

        kept = list(self.turns)
        self.turns.append({"role": "user", "content": text})
        ids, dropped = self._fit()
        room = self.ctx - len(ids)
        if room < 1 or (len(ids) + self.params["max_new_tokens"] > self.ctx and room < 16):
            self.turns = kept  # the conversation stays as it was
            self.say(f"[your message does not fit: the prompt is {len(ids)} tokens and the context {self.ctx}; "
                     f"send a shorter one, /reset, or lower max_new_tokens]")
            return ""
        if dropped:
            self.say(f"[the conversation outgrew the context of {self.ctx} tokens: dropped the oldest {dropped} "
                     f"message(s)]")
        stops = [] if self.L.chatml else BASE_CHAT_STOPS
        streamer = _Streamer(self.L.tok, stops, stream=self.out)
        p = self.params
        stopped = False
        try:
            generate(self.L.model, [ids], min(p["max_new_tokens"], room), temperature=p["temperature"],
                     top_k=p["top_k"], top_p=p["top_p"], repetition_penalty=p["repetition_penalty"],
                     eos_id=self.L.eos_ids, should_stop=_stop_checker(self.L.tok, stops) if stops else None,
                     on_token=streamer, generator=self.gen, vocab_limit=self.L.vocab_limit, decode="fast")
        except KeyboardInterrupt:
            stopped = True
        answer = cut_at_stop(self.L.tok.decode(streamer.ids, skip_special_tokens=True), stops)
        if stopped:
            self.out.write(answer[streamer.printed:])  # what was held back (a possible stop string's start)
            self.say(" [stopped]")
        else:
            streamer.finish()
        self.turns.append({"role": "assistant", "content": answer})
        return answer

    def command(self, line: str) -> bool:
        """Handle a /command; False means quit."""
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.turns.clear()
            self.say("[conversation cleared]")
        elif name == "/system":
            self.system = rest
            self.say(f"[system prompt {'set' if rest else 'cleared'}]")
        elif name == "/params":
            if rest:
                self.set_params(rest)
            self.say("[" + " ".join(f"{k}={v}" for k, v in self.params.items()) + "]")
        elif name == "/help":
            self.say(HELP)
        else:
            raise UserError(f"unknown command {name}; {HELP}")
        return True


def run(cfg: Config) -> int:
    from z2all.model.generate import check_sampling
    from z2all.serve.engine import load

    check_sampling(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                   repetition_penalty=cfg.repetition_penalty, max_new_tokens=cfg.max_new_tokens or 1)
    if cfg.context < 0:
        raise UserError(f"--context must be >= 0 (0 = the model's), got {cfg.context}")
    loaded = load(cfg.ckpt, cfg.tokenizer, cfg.device, cfg.dtype)
    if not cfg.max_new_tokens:
        cfg.max_new_tokens = min(512, max(1, (cfg.context or loaded.model.cfg.max_seq_len) // 2))
    seed_everything(cfg.seed)
    s = Session(loaded, cfg)
    if cfg.max_new_tokens >= s.ctx:
        raise UserError(f"--max-new-tokens {cfg.max_new_tokens} leaves no room for the conversation in the context "
                        f"of {s.ctx} tokens; use less")
    kind = "ChatML chat model" if loaded.chatml else "base model: chatting as a plain transcript"
    s.say(f"[{loaded.name}: {kind}, context {s.ctx} tokens]\n{HELP}")
    interrupted = False
    while True:
        try:
            s.out.write("> ")
            s.out.flush()
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            if interrupted:
                s.say("")
                return 0
            interrupted = True
            s.say("\n[Ctrl-C again, /exit or Ctrl-D to quit]")
            continue
        interrupted = False
        if not line:  # EOF (Ctrl-D)
            s.say("")
            return 0
        line = line.rstrip("\n")
        if not line.strip():
            continue
        try:
            if line.startswith("/") and not line.startswith("//"):
                if not s.command(line.strip()):
                    return 0
                continue
            s.ask(line[1:] if line.startswith("//") else line)
        except UserError as e:  # a bad /command: say so and keep chatting
            s.say(f"[{e}]")
