"""`z2all data chat`: conversations (OpenAI, ShareGPT, Alpaca or mapped fields) + a tokenizer directory ->
memory-mapped token, loss-mask and example-index files for supervised fine-tuning.

    z2all data chat --inputs sft.jsonl.gz --inputs more.parquet --tokenizer data/tok --out data/chat

Inputs (json array, jsonl or parquet, optionally .gz/.zst/.bz2, or directories of them; `readers.py`), one
conversation per record. `--schema auto` picks per record: `messages` (OpenAI: role system/developer/user/
assistant, content a string or a list of text parts), `conversations` (ShareGPT: `from`/`value`, roles
human/user, gpt/assistant/chatgpt, system; an optional top-level `system`), `instruction`+`output` (Alpaca,
with optional `input` appended after a blank line, optional `system`). `--schema fields` maps your own
names: `--messages-field` (+ `--role-field`, `--content-field`) for a message list, or `--prompt-field`
+ `--response-field` (+ `--system-field`) for one exchange; `--roles from=to` renames roles in every schema.

Rendering: the chat template in the tokenizer's `tokenizer_config.json` (Jinja, rendered as transformers does)
decides the layout; the special strings the template itself writes become real special ids, every message
content is encoded as plain text (so "<|im_end|>" inside a message stays text: no injection). How: the
template is rendered once per role sequence with sentinel contents; the result is cut into special tokens,
template text and content slots; the text between two special tokens is encoded as one string with
special strings split. For our ChatML template the ids equal `Z2allTokenizer.apply_chat_template` and
transformers' `apply_chat_template(..., sanitize_control_tokens=True)` (tested). A template must write each
message content once, in order, verbatim or trimmed (Llama 3 style `| trim`); anything else is refused.

Loss mask: 1 on the tokens of assistant contents and on the special token that closes each assistant turn
(`<|im_end|>` in ChatML), 0 on system and user turns and on the template's own text ("<|im_start|>assistant\\n"
included). A token is trained on when any of its characters belongs to an assistant content: with ChatML
only a content that starts with newlines shares its first token with the template's "\\n"; with a
"role: content" template the space goes into the first word's token, which is then trained.

Output (`--out`, claimed for "data chat"):
    train-00000.bin    token ids, little-endian, no header: uint16 when the vocab has < 65,536 ids, else
                       uint32; a file rolls at --file-mb, always between two examples
    train-00000.mask   uint8, one per token: 1 where the token is a training target (assistant), else 0
    train-00000.idx    uint64 offsets into the .bin: example k is tokens [idx[k], idx[k+1]); n_examples + 1
                       entries, the first 0. An SFT loader packs whole examples and never lets attention or
                       loss cross an offset.
    val-00000.*        the held-out split, same layout
    meta.json          {"format": "z2all-chat-1", "dtype", "byteorder", "vocab_size", "train_files",
                        "val_files" (the .bin names: `TokenLoader` streams them like pretraining tokens),
                        "train_tokens", "val_tokens", "train_examples", "val_examples", "template_sha256",
                        "tokenizer_sha256", "specials", "max_len", "overlong", "stats", ...}
No <|endoftext|> is appended: an example is exactly the template's rendering, and the .idx offsets delimit
examples. `ChatData(dir, split).example(k)` reads one back as (ids, mask); it checks the files on open (each a
whole number of items, tokens and mask equally long, the index ending at that length, the totals meta.json
records) and names a damaged file in one UserError.
Held-out split: by conversation, deterministic: blake2b(seed, messages) below --val-fraction goes to val,
so identical conversations always land in the same split, whatever the order or batch size.

Over-long conversations (> --max-len tokens): `--overlong truncate` keeps the longest prefix of whole
messages that ends with an assistant turn and fits (re-rendered, so it is exactly the template's rendering
of that prefix), `drop` drops them; both counted. Bad records (not JSON, not an object, missing field,
unknown role, non-text content, empty assistant turn, no assistant turn, a role sequence the template
refuses with raise_exception) are skipped and counted by reason with their file:line. The run fails (exit 2)
when no conversation survives or when more than --max-skipped of the records were skipped; the files stay,
and rerunning with a higher --max-skipped finishes instantly.

Resume and atomicity: files are written under hidden temp names and renamed when complete, after the
commit that lists them; after every input batch the state (input position, bytes per open file, counts) is
committed to `.chat_state.json`. A killed run resumes from the last commit (open files truncated back to it)
and produces byte-identical files; meta.json is written last, so a directory without it is unfinished.
Changed inputs, tokenizer or options restart from scratch, removing only the files the earlier run's state
(or meta.json) lists and our own temp files; a file with one of our names that no state lists is never
removed, and a run refuses to start (naming it) while one is there. A run whose train split comes out empty
(--val-fraction too high for the data) fails and removes what it wrote (and --out, when it made it).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from z2all.config import opt
from z2all.data.readers import InputReader, MalformedJSON, expand_inputs
from z2all.io import NewOutput, atomic_write_text, claim_output_dir, fingerprint
from z2all.utils import UserError, markdown_table, print0, progress

COMMAND = "data chat"
FORMAT = "z2all-chat-1"
STATE = ".chat_state.json"
STATE_VERSION = 1
SCHEMAS = ("auto", "openai", "sharegpt", "alpaca", "fields")
ROLES = ("system", "user", "assistant")
SUFFIXES = (".bin", ".mask", ".idx")
IDX_DTYPE = np.dtype("<u8")
_ROLE_ALIASES = {"system": "system", "developer": "system", "user": "user", "human": "user",
                 "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "bot": "assistant",
                 "model": "assistant"}
SKIP_REASONS = ("malformed record", "missing field", "unknown role", "bad content", "empty assistant turn",
                "no assistant turn", "template refused", "unreadable rest of file")


@dataclass
class Config:
    inputs: list[str] = opt(None, "conversation files or directories (json, jsonl, parquet; .gz/.zst/.bz2)",
                            factory=list)
    tokenizer: str = opt("data/tokenizer", "tokenizer directory (tokenizer.json + tokenizer_config.json with a "
                                           "chat_template)")
    out: str = opt("data/chat", "output directory for train-*.bin/.mask/.idx, val-* and meta.json")
    schema: str = opt("auto", "record layout; auto detects openai / sharegpt / alpaca per record", choices=SCHEMAS)
    format: str = opt("", "force the file format instead of guessing it from the suffix",
                      choices=("", "jsonl", "json", "parquet"))
    messages_field: str = opt("", "schema fields: the field holding a list of messages")
    role_field: str = opt("role", "schema fields: the role key inside each message")
    content_field: str = opt("content", "schema fields: the content key inside each message")
    prompt_field: str = opt("", "schema fields: the user prompt field (single exchange)")
    response_field: str = opt("", "schema fields: the assistant response field (single exchange)")
    system_field: str = opt("", "schema fields: an optional system prompt field (single exchange)")
    roles: list[str] = opt(None, "extra role names, as from=to (to: system, user or assistant)", factory=list)
    max_len: int = opt(2048, "longest conversation in tokens (0 = no limit)")
    overlong: str = opt("truncate", "over-long conversations: truncate at a turn boundary, or drop",
                        choices=("truncate", "drop"))
    val_fraction: float = opt(0.02, "share of conversations that go to the held-out (val) split")
    seed: int = opt(0, "salt of the deterministic held-out split")
    file_mb: float = opt(1024.0, "roll token files at this many MB")
    batch_mb: float = opt(1.0, "raw input bytes per batch (a resume point after each)")
    max_skipped: float = opt(0.5, "fail when more than this share of the records had to be skipped")
    max_examples: int = opt(5, "file:line examples kept per skip reason")

    def validate(self) -> None:
        if not self.inputs:
            raise UserError("--inputs is empty; give at least one conversation file or directory")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"--val-fraction must be in [0, 1) (got {self.val_fraction})")
        if self.max_len < 0 or self.file_mb <= 0 or self.batch_mb <= 0:
            raise UserError("--max-len must be >= 0 and --file-mb, --batch-mb > 0")
        if not 0.0 <= self.max_skipped <= 1.0:
            raise UserError(f"--max-skipped must be in [0, 1] (got {self.max_skipped})")
        if self.schema == "fields" and not self.messages_field and not (self.prompt_field and self.response_field):
            raise UserError("--schema fields needs --messages-field, or --prompt-field and --response-field")
        role_map(self.roles)


def role_map(pairs: list[str]) -> dict[str, str]:
    """The role aliases plus `--roles from=to` pairs."""
    out = dict(_ROLE_ALIASES)
    for pair in pairs:
        src, sep, dst = pair.partition("=")
        if not sep or not src or dst not in ROLES:
            raise UserError(f"--roles {pair!r}: write from=to with to one of {', '.join(ROLES)}")
        out[src] = dst
    return out


# ---------------------------------------------------------------- records -> messages

class Skip(Exception):
    """A record that cannot become a conversation; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def _text(value, what: str) -> str:
    if value is None:
        raise Skip("missing field", what)
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # OpenAI content parts: text only
        parts = []
        for p in value:
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str):
                parts.append(p["text"])
            else:
                raise Skip("bad content", f"{what} has a non-text part")
        return "".join(parts)
    raise Skip("bad content", f"{what} is {type(value).__name__}, not text")


def _message_list(rec: dict, field: str, role_key: str, content_key: str, roles: dict[str, str]) -> list[dict]:
    msgs = rec.get(field)
    if msgs is None:
        raise Skip("missing field", field)
    if not isinstance(msgs, list):
        raise Skip("malformed record", f"{field} is not a list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise Skip("malformed record", f"{field}[{i}] is not an object")
        role = m.get(role_key)
        if role is None:
            raise Skip("missing field", f"{field}[{i}].{role_key}")
        if not isinstance(role, str) or role not in roles:
            raise Skip("unknown role", f"{field}[{i}].{role_key} = {role!r}")
        out.append({"role": roles[role], "content": _text(m.get(content_key), f"{field}[{i}].{content_key}")})
    return out


def _exchange(rec: dict, prompt: str, response: str, system: str, extra: str = "") -> list[dict]:
    user = _text(rec.get(prompt), prompt)
    if extra and rec.get(extra):
        user = f"{user}\n\n{_text(rec.get(extra), extra)}"
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": _text(rec.get(response), response)}]
    if system and rec.get(system):
        msgs.insert(0, {"role": "system", "content": _text(rec.get(system), system)})
    return msgs


def to_messages(rec, cfg: Config, roles: dict[str, str] | None = None) -> list[dict]:
    """One record -> [{"role", "content"}, ...] with roles in ROLES; raises Skip."""
    if not isinstance(rec, dict):
        raise Skip("malformed record", f"a JSON {type(rec).__name__}, not an object")
    roles = roles if roles is not None else role_map(cfg.roles)
    schema = cfg.schema
    if schema == "auto":
        if "messages" in rec:
            schema = "openai"
        elif "conversations" in rec:
            schema = "sharegpt"
        elif "instruction" in rec:
            schema = "alpaca"
        else:
            raise Skip("missing field", "none of messages, conversations, instruction (or use --schema fields)")
    if schema == "openai":
        msgs = _message_list(rec, "messages", "role", "content", roles)
    elif schema == "sharegpt":
        msgs = _message_list(rec, "conversations", "from", "value", roles)
        if isinstance(rec.get("system"), str) and rec["system"] and not (msgs and msgs[0]["role"] == "system"):
            msgs.insert(0, {"role": "system", "content": rec["system"]})
    elif schema == "alpaca":
        msgs = _exchange(rec, "instruction", "output", "system", extra="input")
    elif cfg.messages_field:
        msgs = _message_list(rec, cfg.messages_field, cfg.role_field, cfg.content_field, roles)
    else:
        msgs = _exchange(rec, cfg.prompt_field, cfg.response_field, cfg.system_field)
    if not any(m["role"] == "assistant" for m in msgs):
        raise Skip("no assistant turn")
    for i, m in enumerate(msgs):
        if m["role"] == "assistant" and not m["content"].strip():
            raise Skip("empty assistant turn", f"message {i}")
    return msgs


# ---------------------------------------------------------------- rendering with the tokenizer's template

# Message contents are replaced by these to find where the template writes them: the letters reveal a case
# change (refused), the whitespace around them a trim, which is then applied to the real contents.
_SENTINEL = " \n\ue000Zz{}\ue001\n "
_SENTINEL_RE = re.compile("( \n)?\ue000Zz(\\d+)\ue001(\n )?")
_STRIP = {(True, True): None, (False, True): str.lstrip, (True, False): str.rstrip, (False, False): str.strip}


def _offset_start(offset: tuple[int, int]) -> int:
    return offset[0]


def _offset_end(offset: tuple[int, int]) -> int:
    return offset[1]


def _token_str(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _compile(template: str, where: Path):
    """The template compiled the way transformers' `apply_chat_template` does (a sandbox with trim_blocks,
    lstrip_blocks, loop controls, its `tojson`, `raise_exception`, `strftime_now`, and `{% generation %}`
    blocks rendered as their body), without importing transformers (~3 s of start-up)."""
    try:
        import jinja2
        from jinja2 import nodes
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise UserError("rendering chat templates needs jinja2: pip install 'jinja2>=3.1.6'") from None

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return time.strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateError as e:
        raise UserError(f"{where}: the chat_template is not valid Jinja ({e})") from None


class Renderer:
    """Conversations -> (ids, mask) with the tokenizer directory's own chat template (see the module doc)."""

    def __init__(self, tok_dir: str | os.PathLike):
        from z2all.tokenizer.hf import read_tokenizer_json

        d = Path(tok_dir)
        tj, tc = d / "tokenizer.json", d / "tokenizer_config.json"
        for p in (tj, tc):
            if not p.is_file():
                raise UserError(f"{p} not found: --tokenizer must be a directory made by `z2all tokenizer train`")
        try:
            config = json.loads(tc.read_text(encoding="utf-8"))
        except ValueError as e:
            raise UserError(f"{tc} is not valid JSON ({e})") from None
        self.template = config.get("chat_template")
        if not isinstance(self.template, str) or not self.template:
            raise UserError(f"{tc} has no chat_template; train the tokenizer with z2all (it writes ChatML)")
        self.tok = read_tokenizer_json(tj)
        self.tok.encode_special_tokens = True  # message text never becomes a special id
        self.specials = {t.content: i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.tokenizer_sha256 = hashlib.sha256(tj.read_bytes()).hexdigest()
        self.template_sha256 = hashlib.sha256(self.template.encode("utf-8")).hexdigest()
        names = sorted(self.specials, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, names))) if names else None
        self._dir = d
        self._jinja = _compile(self.template, tc)
        self._token_vars = {k: _token_str(config.get(k)) for k in ("bos_token", "eos_token", "pad_token",
                                                                  "unk_token")}
        self._skeletons: dict[tuple[str, ...], list[tuple]] = {}

    def _render_text(self, messages: list[dict]) -> str:
        try:
            return self._jinja.render(messages=messages, add_generation_prompt=False, **self._token_vars)
        except Exception as e:  # raise_exception() (e.g. "roles must alternate"), undefined fields
            raise Skip("template refused", f"{type(e).__name__}: {e}") from None

    def skeleton(self, roles: tuple[str, ...]) -> list[tuple]:
        """The template's layout for this role sequence: ("special", id) | ("text", str) |
        ("content", message index, None or the str method the template trims the content with)."""
        sk = self._skeletons.get(roles)
        if sk is not None:
            return sk
        text = self._render_text([{"role": r, "content": _SENTINEL.format(i)} for i, r in enumerate(roles)])
        pieces: list[tuple] = []
        seen: list[int] = []
        pos = 0
        for m in _SENTINEL_RE.finditer(text):
            pieces += self._split_specials(text[pos: m.start()])
            pieces.append(("content", int(m.group(2)), _STRIP[bool(m.group(1)), bool(m.group(3))]))
            seen.append(int(m.group(2)))
            pos = m.end()
        pieces += self._split_specials(text[pos:])
        if seen != list(range(len(roles))):
            raise UserError(f"{self._dir}/tokenizer_config.json: the chat_template does not write each message "
                            f"content once and in order (roles {list(roles)} gave slots {seen}); z2all data chat "
                            f"supports templates that do")
        if len(self._skeletons) > 4096:
            self._skeletons.clear()
        self._skeletons[roles] = pieces
        return pieces

    def _split_specials(self, text: str) -> list[tuple]:
        out: list[tuple] = []
        pos = 0
        if self._special_re is not None:
            for m in self._special_re.finditer(text):
                if m.start() > pos:
                    out.append(("text", text[pos: m.start()]))
                out.append(("special", self.specials[m.group(0)]))
                pos = m.end()
        if pos < len(text):
            out.append(("text", text[pos:]))
        return out

    def _plan(self, msgs: list[dict], runs: list[str], spans: list[list[tuple[int, int]]]) -> list[tuple]:
        """The conversation as ("special", id, label) and ("run", k) items; run k's text goes to runs[k] and
        the character spans of assistant contents inside it to spans[k]."""
        plan: list[tuple] = []
        cur: list[str] = []
        cur_spans: list[tuple[int, int]] = []
        size, label_next = 0, False
        for piece in self.skeleton(tuple(m["role"] for m in msgs)) + [("end",)]:
            if piece[0] in ("special", "end"):
                if cur:
                    plan.append(("run", len(runs)))
                    runs.append("".join(cur))
                    spans.append(cur_spans)
                    cur, cur_spans, size = [], [], 0
                if piece[0] == "special":
                    plan.append(("special", piece[1], int(label_next)))
                    label_next = False
                continue
            if piece[0] == "text":
                text = piece[1]
            else:
                text = msgs[piece[1]]["content"]
                text = piece[2](text) if piece[2] else text
            if piece[0] == "content" and msgs[piece[1]]["role"] == "assistant":
                cur_spans.append((size, size + len(text)))
                label_next = True
            cur.append(text)
            size += len(text)
        return plan

    def render(self, convs: list[list[dict]]) -> list[tuple[list[int], list[int]]]:
        """[(ids, mask)] per conversation; one batched encode for all text runs."""
        runs: list[str] = []
        spans: list[list[tuple[int, int]]] = []
        plans = [self._plan(msgs, runs, spans) for msgs in convs]
        encs = self.tok.encode_batch(runs, add_special_tokens=False) if runs else []
        out = []
        for plan in plans:
            ids: list[int] = []
            mask: list[int] = []
            for item in plan:
                if item[0] == "special":
                    ids.append(item[1])
                    mask.append(item[2])
                    continue
                enc, sp = encs[item[1]], spans[item[1]]
                ids.extend(enc.ids)
                run_mask = [0] * len(enc.ids)
                if sp:
                    # offsets are non-decreasing, so the tokens touching [s1, e1) are one range [lo, hi)
                    offsets = enc.offsets
                    for s1, e1 in sp:
                        lo = bisect.bisect_right(offsets, s1, key=_offset_end)
                        hi = bisect.bisect_left(offsets, e1, key=_offset_start)
                        run_mask[lo:hi] = [1] * max(0, hi - lo)
                mask.extend(run_mask)
            out.append((ids, mask))
        return out


# ---------------------------------------------------------------- output files

def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size < 65536 else np.uint32).newbyteorder("<")


def is_val(messages: list[dict], seed: int, fraction: float) -> bool:
    if fraction <= 0:
        return False
    h = hashlib.blake2b(f"{seed}:".encode() + orjson.dumps(messages, option=orjson.OPT_SORT_KEYS), digest_size=8)
    return int.from_bytes(h.digest(), "little") < fraction * 2**64


class _SplitWriter:
    """`<split>-NNNNN.{bin,mask,idx}` of one split; each file appears (renamed) only when complete.
    `files`, `tokens`, `examples`, `open_tokens`, `open_examples` come from a committed state on resume.
    A finished set keeps its temp names until `publish()`, called after the commit that lists it: a file
    with one of our names is then always one a state lists, and a name no state lists is never ours."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, file_tokens: int, files: list[str] | None = None,
                 tokens: int = 0, examples: int = 0, open_tokens: int = 0, open_examples: int = 0):
        self.out, self.split, self.dtype, self.file_tokens = out, split, dtype, file_tokens
        self.files: list[str] = list(files or [])
        self.tokens, self.examples = tokens, examples
        self._f: list | None = None
        self._n = self._k = 0
        self._pending: list[tuple[Path, Path]] = []  # finished, listed by the next commit, then renamed
        for name in self.files:  # committed by a killed run that did not get to rename them
            for s in SUFFIXES:
                tmp, final = out / f".{Path(name).stem}{s}.tmp", out / f"{Path(name).stem}{s}"
                if not final.exists() and tmp.exists():
                    os.replace(tmp, final)
        if open_tokens or open_examples:
            self._reopen(open_tokens, open_examples)

    def _paths(self) -> list[tuple[Path, Path]]:
        stem = f"{self.split}-{len(self.files):05d}"
        return [(self.out / f".{stem}{s}.tmp", self.out / f"{stem}{s}") for s in SUFFIXES]

    def _open(self) -> None:
        self._f = [open(tmp, "wb") for tmp, _ in self._paths()]
        self._f[2].write(np.zeros(1, IDX_DTYPE).tobytes())
        self._n = self._k = 0

    def _reopen(self, n: int, k: int) -> None:
        sizes = (n * self.dtype.itemsize, n, (k + 1) * IDX_DTYPE.itemsize)
        self._f = []
        for (tmp, final), size in zip(self._paths(), sizes):
            if not tmp.exists() and final.exists():
                # a z2all before publish() renamed a set before its commit: the state names it open, so it is ours
                os.replace(final, tmp)
            if not tmp.exists() or tmp.stat().st_size < size:
                raise UserError(f"{tmp} is missing or shorter than {STATE} says; remove {self.out} and rerun")
            f = open(tmp, "r+b")
            f.truncate(size)
            f.seek(0, os.SEEK_END)
            self._f.append(f)
        self._n, self._k = n, k

    def _close(self) -> None:
        for f in self._f:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        self._pending.extend(self._paths())
        self.files.append(self._paths()[0][1].name)
        self._f = None

    def publish(self) -> None:
        """Rename the finished file sets into place: only once a committed state lists them."""
        for tmp, final in self._pending:
            os.replace(tmp, final)
        self._pending.clear()

    def add(self, ids: list[int], mask: list[int]) -> None:
        if self._f is not None and self._n and self._n + len(ids) > self.file_tokens:
            self._close()
        if self._f is None:
            self._open()
        self._f[0].write(np.asarray(ids, dtype=self.dtype).tobytes())
        self._f[1].write(np.asarray(mask, dtype=np.uint8).tobytes())
        self._n += len(ids)
        self._k += 1
        self._f[2].write(np.asarray([self._n], dtype=IDX_DTYPE).tobytes())
        self.tokens += len(ids)
        self.examples += 1

    def state(self) -> dict:
        if self._f is not None:
            for f in self._f:
                f.flush()
                os.fsync(f.fileno())
        return {"files": list(self.files), "tokens": self.tokens, "examples": self.examples,
                "open_tokens": self._n if self._f else 0, "open_examples": self._k if self._f else 0}

    def keep(self) -> set[str]:
        """Names in `out` this writer owns (finished sets, their temp names and the open set's temp files)."""
        return _listed({"files": self.files, "open_tokens": self._n if self._f is not None else 0,
                        "open_examples": self._k if self._f is not None else 0}, self.split)

    def finish(self) -> list[str]:
        if self._f is not None or not self.files:  # an empty split still gets one (empty) file set
            if self._f is None:
                self._open()
            self._close()
        return self.files


_NAME = re.compile(r"(train|val)-\d{5}\.(bin|mask|idx)")
_TMP = re.compile(r"\.(train|val)-\d{5}\.(bin|mask|idx)\.tmp")  # only _SplitWriter makes these hidden names


def _listed(writer: dict, split: str) -> set[str]:
    """The names in `out` a writer's committed state says it wrote: each file set (under its temp names
    too, when a kill came between the commit and the rename) and the set it had open."""
    stems = [Path(f).stem for f in writer.get("files") or [] if isinstance(f, str)]
    names = {f"{stem}{s}" for stem in stems for s in SUFFIXES} | {f".{stem}{s}.tmp" for stem in stems for s in SUFFIXES}
    if writer.get("open_tokens") or writer.get("open_examples"):
        names |= {f".{split}-{len(stems):05d}{s}.tmp" for s in SUFFIXES}
    return names


def _written(out: Path, state) -> set[str]:
    """Every file an earlier run says it wrote: from its state, else (unreadable) from its meta.json."""
    if isinstance(state, dict):
        writers = state.get("writers") if isinstance(state.get("writers"), dict) else {}
        return set().union(*(_listed(w, s) for s, w in writers.items() if isinstance(w, dict)))
    try:
        meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
        files = [f for s in ("train", "val") for f in meta.get(f"{s}_files") or [] if isinstance(f, str)]
        return {f"{Path(f).stem}{s}" for f in files for s in SUFFIXES}
    except (OSError, ValueError, AttributeError, TypeError):
        return set()


def _check_foreign(out: Path, listed: set[str]) -> None:
    """Refuse (before anything is removed) when `out` holds one of our file names that no state lists: a
    user's file, which would read as part of the output, or be overwritten by a later file of that name."""
    foreign = sorted(p.name for p in out.iterdir() if p.is_file() and _NAME.fullmatch(p.name) and p.name not in listed)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f", ... ({len(foreign)} files)" if len(foreign) > 3 else "")
        raise UserError(f"--out {out} holds {shown}, which `z2all {COMMAND}` did not write (its state does not list "
                        f"them); move them out or choose another --out (nothing was changed)")


def _temps(out: Path) -> list[Path]:
    """Our temp files in `out` (a killed run's unfinished file sets)."""
    return [p for p in out.iterdir() if p.is_file() and _TMP.fullmatch(p.name)]


def _check_part(stem: Path, dtype: np.dtype, meta_path: Path) -> tuple[np.ndarray, int]:
    """(idx, tokens) of one `<stem>.{bin,mask,idx}` set, checked before anything is mapped: each file exists
    and is a whole number of items, the token and mask files are equally long, and the index runs from 0 up
    to that length. A damaged file would otherwise crash np.memmap (an odd byte count) or, worse, train
    silently on misaligned labels (a mask one byte longer than its tokens)."""
    redo = "rebuild the directory with `z2all data chat`"
    sizes = {}
    for suffix, item, what in ((".bin", dtype, f"{dtype.name} tokens"), (".mask", np.dtype(np.uint8), "mask bytes"),
                               (".idx", IDX_DTYPE, "uint64 offsets")):
        path = Path(f"{stem}{suffix}")
        if not path.is_file():
            raise UserError(f"{path} (listed in {meta_path}) is missing; {redo}")
        size = path.stat().st_size
        if size % item.itemsize:
            raise UserError(f"{path} has {size:,} bytes, not a whole number of {what} ({item.itemsize} bytes "
                            f"each): it was truncated or appended to; {redo}")
        sizes[suffix] = size // item.itemsize
    idx = np.fromfile(f"{stem}.idx", dtype=IDX_DTYPE)
    n, n_mask = sizes[".bin"], sizes[".mask"]
    if not len(idx) or idx[0] != 0 or np.any(np.diff(idx.astype(np.int64)) < 0):
        raise UserError(f"{stem}.idx is not an offset index (it must start at 0 and never decrease); {redo}")
    end = int(idx[-1])
    if n != n_mask or end != n:
        # name the one file that disagrees with the other two where there is one
        odd = (".mask" if end == n else ".bin" if end == n_mask else ".idx" if n == n_mask else "")
        detail = f"{stem}.bin holds {n:,} tokens, {stem}.mask {n_mask:,} mask bytes, {stem}.idx ends at {end:,}"
        where = f"{stem}{odd} does not match the other two files" if odd else "the files do not match"
        raise UserError(f"{where} ({detail}): a file was truncated, appended to or replaced; {redo}")
    return idx, n


class ChatData:
    """Read side of the format: `ChatData(dir, "train").example(k)` -> (ids, mask) numpy arrays."""

    def __init__(self, data_dir, split: str = "train"):
        self.dir = Path(data_dir)
        meta_path = self.dir / "meta.json"
        if not meta_path.is_file():
            raise UserError(f"{meta_path} not found: use a directory made by `z2all data chat`")
        try:
            self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise UserError(f"{meta_path} is not valid JSON ({e}); rebuild the directory with `z2all data chat`") \
                from None
        fmt = self.meta.get("format") if isinstance(self.meta, dict) else None
        if fmt != FORMAT:
            raise UserError(f"{meta_path} is not a `z2all data chat` directory (format {fmt})")
        dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        self.parts = []
        tokens = examples = 0
        for name in self.meta[f"{split}_files"]:
            stem = self.dir / Path(name).stem
            idx, n = _check_part(stem, dtype, meta_path)
            tokens += n
            examples += len(idx) - 1
            if n:  # np.memmap refuses an empty file (an empty split still has one empty file set)
                self.parts.append((np.memmap(f"{stem}.bin", dtype=dtype, mode="r"),
                                   np.memmap(f"{stem}.mask", dtype=np.uint8, mode="r"), idx))
        # each file set is consistent on its own; a whole set removed or swapped shows only in the totals
        for key, got in ((f"{split}_tokens", tokens), (f"{split}_examples", examples)):
            want = self.meta.get(key)
            if want is not None and int(want) != got:
                raise UserError(f"the {split} files of {self.dir} hold {got:,} {key.split('_')[1]} but {meta_path} "
                                f"says {int(want):,}: a file set was removed, added or replaced; rebuild the "
                                f"directory with `z2all data chat`")
        self.counts = np.cumsum([0] + [len(p[2]) - 1 for p in self.parts])

    def __len__(self) -> int:
        return int(self.counts[-1])

    def example(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        f = int(np.searchsorted(self.counts, k, side="right")) - 1
        ids, mask, idx = self.parts[f]
        j = k - int(self.counts[f])
        a, b = int(idx[j]), int(idx[j + 1])
        return np.asarray(ids[a:b]), np.asarray(mask[a:b])


# ---------------------------------------------------------------- the command

def _signature(cfg: Config, files: list[Path], r: Renderer, dtype: np.dtype) -> dict:
    """Everything that changes the output: a resume must not mix two of them."""
    opts = {k: getattr(cfg, k) for k in ("schema", "format", "messages_field", "role_field", "content_field",
                                         "prompt_field", "response_field", "system_field", "roles", "max_len",
                                         "overlong", "val_fraction", "seed", "file_mb")}
    return {"version": STATE_VERSION, "inputs": [[str(p), fingerprint(p)] for p in files], "options": opts,
            "tokenizer_sha256": r.tokenizer_sha256, "template_sha256": r.template_sha256, "dtype": dtype.name}


def _new_stats() -> dict:
    return {"records": 0, "conversations": {"train": 0, "val": 0}, "turns": {"train": 0, "val": 0},
            "trained_tokens": {"train": 0, "val": 0}, "truncated": 0, "dropped_too_long": 0,
            "skipped": {}, "examples": {}}


def _start(out: Path, sig: dict) -> dict | None:
    """The committed state of an earlier run of the same job, else None (and the files the earlier run
    wrote are removed: those its state, or meta.json when the state is unreadable, lists, and our temp files)."""
    state = None
    try:
        state = json.loads((out / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    if isinstance(state, dict) and state.get("signature") == sig:
        return state
    listed = _written(out, state)
    _check_foreign(out, listed)
    for p in [*(out / n for n in sorted(listed)), *_temps(out), out / "meta.json", out / STATE]:
        p.unlink(missing_ok=True)
    return None


class _Job:
    def __init__(self, cfg: Config, out: Path, renderer: Renderer, state: dict):
        self.cfg, self.out, self.r, self.state = cfg, out, renderer, state
        self.stats = state["stats"]
        self.roles = role_map(cfg.roles)

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        s = self.stats
        s["skipped"][reason] = s["skipped"].get(reason, 0) + 1
        ex = s["examples"].setdefault(reason, [])
        if len(ex) < self.cfg.max_examples:
            ex.append(f"{where}" + (f" ({detail})" if detail else ""))

    def parse(self, items: list, kind: str, reader: InputReader, first: int) -> list[tuple[list[dict], str]]:
        convs = []
        for j, item in enumerate(items):
            where = reader.where(first + j)
            if kind == "lines":
                if not item.strip():
                    continue
                self.stats["records"] += 1
                try:
                    item = orjson.loads(item)
                except orjson.JSONDecodeError as e:
                    self.skip("malformed record", where, f"invalid JSON: {e}")
                    continue
            else:
                self.stats["records"] += 1
            try:
                msgs = to_messages(item, self.cfg, self.roles)
                self.r.skeleton(tuple(m["role"] for m in msgs))  # a template may refuse a role sequence
                convs.append((msgs, where))
            except Skip as e:
                self.skip(e.reason, where, e.detail)
        return convs

    def fit(self, msgs: list[dict], ids: list[int], mask: list[int]):
        """(msgs, ids, mask) within --max-len, or None when the conversation is dropped."""
        limit = self.cfg.max_len
        if not limit or len(ids) <= limit:
            return msgs, ids, mask
        if self.cfg.overlong == "truncate":
            for k in range(len(msgs) - 1, 0, -1):
                if msgs[k - 1]["role"] != "assistant":
                    continue
                try:
                    (tids, tmask), = self.r.render([msgs[:k]])
                except Skip:  # the template refuses this prefix
                    continue
                if len(tids) <= limit:
                    self.stats["truncated"] += 1
                    return msgs[:k], tids, tmask
        self.stats["dropped_too_long"] += 1
        return None

    def write(self, convs: list[tuple[list[dict], str]], writers: dict[str, _SplitWriter]) -> None:
        s = self.stats
        for (msgs, _), (ids, mask) in zip(convs, self.r.render([m for m, _ in convs])):
            split = "val" if is_val(msgs, self.cfg.seed, self.cfg.val_fraction) else "train"
            fitted = self.fit(msgs, ids, mask)
            if fitted is None:
                continue
            msgs, ids, mask = fitted
            writers[split].add(ids, mask)
            s["conversations"][split] += 1
            s["turns"][split] += len(msgs)
            s["trained_tokens"][split] += sum(mask)


def stats_table(meta: dict) -> str:
    s = meta["stats"]
    rows = []
    for split in ("train", "val"):
        tok = meta[f"{split}_tokens"]
        rows.append([split, s["conversations"][split], s["turns"][split], tok, s["trained_tokens"][split],
                     f"{s['trained_tokens'][split] / tok:.1%}" if tok else "-"])
    table = markdown_table(["split", "conversations", "turns", "tokens", "trained tokens", "trained share"], rows)
    lines = [table, f"records read: {s['records']:,}; over-long (> {meta['max_len']} tokens): "
                    f"{s['truncated']:,} truncated at a turn boundary, {s['dropped_too_long']:,} dropped"]
    for reason, n in s["skipped"].items():
        lines.append(f"skipped, {reason}: {n:,} (e.g. {'; '.join(s['examples'].get(reason, []))})")
    return "\n".join(lines)


def run(cfg: Config) -> int:
    """The command, holding --out (z2all.io.dir_lock): a second process writing it meanwhile is refused."""
    from z2all.io import dir_lock

    with dir_lock(cfg.out, COMMAND):
        return _run(cfg)


def _run(cfg: Config) -> int:
    cfg.validate()
    t0 = time.perf_counter()
    files = [f for p in cfg.inputs for f in expand_inputs(p)]
    renderer = Renderer(cfg.tokenizer)  # a broken tokenizer is reported before anything is created
    new = NewOutput(cfg.out)
    out = claim_output_dir(cfg.out, COMMAND, protect=[*cfg.inputs, cfg.tokenizer])
    dtype = dtype_for(renderer.vocab_size)
    sig = _signature(cfg, files, renderer, dtype)
    state = _start(out, sig)
    if state is not None and state["done"] and (out / "meta.json").exists():
        print0(f"data chat: {out} is complete (same inputs, tokenizer and options), nothing to do")
        return 0
    if state is None:
        state = {"signature": sig, "done": False, "file": 0, "item": 0, "stats": _new_stats(), "writers": {}}
    else:
        (out / "meta.json").unlink(missing_ok=True)
        if not state["done"]:
            print0(f"data chat: resuming {out} at input {state['file'] + 1}/{len(files)}, item {state['item'] + 1}")
    file_tokens = max(1, int(cfg.file_mb * 2**20) // dtype.itemsize)
    writers = {s: _SplitWriter(out, s, dtype, file_tokens, **state["writers"].get(s, {})) for s in ("train", "val")}
    keep = set().union(*(w.keep() for w in writers.values()))
    _check_foreign(out, keep)
    for p in _temps(out):  # opened after the last commit of a killed run
        if p.name not in keep:
            p.unlink()
    job = _Job(cfg, out, renderer, state)

    def commit(fi: int, item: int) -> None:
        state.update(file=fi, item=item, writers={s: w.state() for s, w in writers.items()})
        atomic_write_text(out / STATE, json.dumps(state, ensure_ascii=False) + "\n")
        for w in writers.values():
            w.publish()

    if not state["done"]:
        total = sum(p.stat().st_size for p in files)
        bar = progress(total=total, initial=sum(p.stat().st_size for p in files[: state["file"]]), desc="chat",
                       unit="B", unit_scale=True)
        try:
            for fi in range(state["file"], len(files)):
                path = files[fi]
                reader = InputReader(path, cfg.format or None)
                start = state["item"] if fi == state["file"] else 0
                last = 0
                try:
                    for first, items in reader.batches(start, batch_bytes=max(1, int(cfg.batch_mb * 2**20)),
                                                       batch_items=256):
                        job.write(job.parse(items, reader.kind, reader, first), writers)
                        commit(fi, first + len(items))
                        pos = reader.position()
                        bar.update(pos - last)
                        last = pos
                except MalformedJSON as e:  # a broken JSON array: the items before it were kept
                    job.skip("unreadable rest of file", reader.where(e.index), str(e))
                bar.update(path.stat().st_size - last)
                commit(fi + 1, 0)
        finally:
            bar.close()
        files_out = {s: w.finish() for s, w in writers.items()}
        state.update(done=True, file=len(files), item=0, writers={s: w.state() for s, w in writers.items()})
        atomic_write_text(out / STATE, json.dumps(state, ensure_ascii=False) + "\n")
        for w in writers.values():
            w.publish()
    else:
        files_out = {s: list(w.files) for s, w in writers.items()}
    stats = state["stats"]
    kept = sum(stats["conversations"].values())
    skipped = sum(stats["skipped"].values())
    first_bad = next((f"{r}: {ex[0]}" for r, ex in stats["examples"].items() if ex), "")
    if kept == 0:
        raise UserError(f"no conversation survived out of {stats['records']} records "
                        f"({skipped} skipped{', first: ' + first_bad if first_bad else ''}; "
                        f"{stats['dropped_too_long']} longer than --max-len {cfg.max_len}); check --schema and the "
                        f"inputs")
    if not stats["conversations"]["train"]:  # nothing to fine-tune on: a failure, not an output to resume
        for p in [*(out / n for n in sorted(set().union(*(w.keep() for w in writers.values())))), *_temps(out),
                  out / "meta.json", out / STATE]:
            p.unlink(missing_ok=True)
        new.undo()
        raise UserError(f"the train split is empty: all {kept:,} conversations went to validation (--val-fraction "
                        f"{cfg.val_fraction}); lower --val-fraction or add data (nothing was kept in {out})")
    if stats["records"] and skipped / stats["records"] > cfg.max_skipped:
        raise UserError(f"{skipped} of {stats['records']} records were skipped, more than --max-skipped "
                        f"{cfg.max_skipped} (first: {first_bad}); fix the inputs or raise --max-skipped (a rerun "
                        f"reuses the written files)")
    meta = {
        "format": FORMAT, "dtype": dtype.name, "byteorder": "little", "vocab_size": renderer.vocab_size,
        "mask_dtype": "uint8", "idx_dtype": "uint64",
        "train_files": files_out["train"], "val_files": files_out["val"],
        "train_tokens": writers["train"].tokens, "val_tokens": writers["val"].tokens,
        "train_examples": writers["train"].examples, "val_examples": writers["val"].examples,
        "specials": {t: i for t, i in renderer.specials.items() if not t.startswith("<|reserved_")},
        "eos_id": renderer.specials.get("<|endoftext|>"),
        "template_sha256": renderer.template_sha256, "tokenizer_sha256": renderer.tokenizer_sha256,
        "tokenizer_dir": str(Path(cfg.tokenizer).resolve()), "inputs": [str(p) for p in files],
        "max_len": cfg.max_len, "overlong": cfg.overlong, "val_fraction": cfg.val_fraction, "seed": cfg.seed,
        "stats": stats,
    }
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    dt = time.perf_counter() - t0
    print0(stats_table(meta))
    print0(f"data chat: {kept:,} conversations, {meta['train_tokens'] + meta['val_tokens']:,} tokens "
           f"({dt:.1f} s) -> {out}")
    return 0
