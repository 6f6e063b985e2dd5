"""`z2all data prefs`: preference pairs (a prompt, a chosen and a rejected answer) + a tokenizer directory ->
memory-mapped token, loss-mask and pair-index files for DPO (`z2all dpo`).

    z2all data prefs --inputs prefs.jsonl --tokenizer data/tok --out data/prefs
    z2all data prefs --inputs my.jsonl --schema fields --prompt-field question --chosen-field good \\
        --rejected-field bad --tokenizer data/tok --out data/prefs

Record layouts (`--schema auto` picks per record; json array, jsonl or parquet, .gz/.zst/.bz2, as `data chat`):
- `prompt` + `chosen` + `rejected` (TRL / UltraFeedback style): the prompt a string or a message list, each
  answer a string (one assistant turn) or a message list (the turns after the prompt; when a list starts
  with the prompt's own messages, as in HH-RLHF-style full conversations, that shared prefix is dropped);
  an optional `system` string.
- `chosen` + `rejected` message lists without `prompt` (HH style): the longest shared prefix ending before
  an assistant turn is the prompt.
- `conversations` + `chosen` + `rejected` (ShareGPT style, `from`/`value` messages; chosen/rejected one
  message or a list).
- `--schema fields`: `--prompt-field`, `--chosen-field`, `--rejected-field` (+ `--system-field`) name your
  own fields (string or message values, `--role-field`/`--content-field` inside messages).

Rendering: both sides go through `data/chat.py`'s Renderer (the tokenizer's own chat template, injection
safe). Labels (mask 1) cover only the response: the tokens after the rendered prompt that the template
marks as assistant content, plus the turn's closing `<|im_end|>`; the prompt, earlier assistant turns of a
multi-turn prompt included, is context only.

Output (`--out`, claimed for "data prefs"; written in a temp dir and swapped in whole):
    {train,val}.bin    token ids (uint16 below 65,536 ids, else uint32), little-endian, both sides of
                       every pair back to back
    {train,val}.mask   uint8 per token: 1 = a response token (DPO sums its log-prob)
    {train,val}.idx    uint64 [n_pairs, 4]: chosen start, chosen length, rejected start, rejected length
                       (plus the prompt length of each side in .plen, uint32 [n_pairs, 2])
    meta.json          {"format": "z2all-prefs-1", "dtype", "vocab_size", "tokenizer_sha256",
                        "template_sha256", "train_pairs", "val_pairs", "stats", ...}
`PrefData(dir, split).pair(k)` reads one back: (chosen ids, chosen mask, rejected ids, rejected mask); it checks
each file's size against meta.json's counts on open and names a damaged file in one UserError.

Held-out split: by prompt (blake2b of seed + prompt messages below --val-fraction), so the pairs of one
prompt never straddle the splits. Pairs longer than --max-len on either side are dropped and counted
(truncating the prompt would change what the preference was about). Bad records (not JSON, missing
field, unknown role, empty answer, chosen == rejected, a role sequence the template refuses) are skipped
and counted by reason with file:line; the run fails when none survives or more than --max-skipped did not.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from z2all.config import opt
from z2all.data.chat import Renderer, Skip, _message_list, _text, dtype_for, role_map
from z2all.data.readers import InputReader, MalformedJSON, expand_inputs
from z2all.io import OWNER_FILE, atomic_dir, atomic_write_json, claim_output_dir
from z2all.utils import UserError, markdown_table, print0

COMMAND = "data prefs"
FORMAT = "z2all-prefs-1"
SCHEMAS = ("auto", "prompt", "hh", "sharegpt", "fields")
IDX_DTYPE = np.dtype("<u8")
PLEN_DTYPE = np.dtype("<u4")
SPLITS = ("train", "val")


@dataclass
class Config:
    inputs: list[str] = opt(None, "preference files or directories (json, jsonl, parquet; .gz/.zst/.bz2)",
                            factory=list)
    tokenizer: str = opt("data/tokenizer", "tokenizer directory with a chat_template (as for `z2all data chat`)")
    out: str = opt("data/prefs", "output directory for {train,val}.bin/.mask/.idx/.plen and meta.json")
    schema: str = opt("auto", "record layout: prompt (prompt/chosen/rejected), hh (chosen/rejected "
                      "conversations), sharegpt (conversations + chosen/rejected), fields; auto picks per record",
                      choices=SCHEMAS)
    format: str = opt("", "force the file format instead of guessing it from the suffix",
                      choices=("", "jsonl", "json", "parquet"))
    prompt_field: str = opt("prompt", "schema fields: the prompt (a string or a message list)")
    chosen_field: str = opt("chosen", "schema fields: the preferred answer (a string or messages)")
    rejected_field: str = opt("rejected", "schema fields: the dispreferred answer (a string or messages)")
    system_field: str = opt("system", "schema fields: an optional system prompt")
    role_field: str = opt("role", "schema fields: the role key inside messages")
    content_field: str = opt("content", "schema fields: the content key inside messages")
    roles: list[str] = opt(None, "extra role names, as from=to (to: system, user or assistant)", factory=list)
    max_len: int = opt(1024, "longest side (prompt + answer) in tokens; longer pairs are dropped (0 = no limit)")
    val_fraction: float = opt(0.05, "share of prompts whose pairs go to the held-out (val) split")
    seed: int = opt(0, "salt of the deterministic held-out split")
    max_skipped: float = opt(0.5, "fail when more than this share of the records had to be skipped")
    max_examples: int = opt(5, "file:line examples kept per skip reason")

    def validate(self) -> None:
        if not self.inputs:
            raise UserError("--inputs is empty; give at least one preference file or directory")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"--val-fraction must be in [0, 1) (got {self.val_fraction})")
        if self.max_len < 0:
            raise UserError(f"--max-len must be >= 0 (got {self.max_len})")
        if not 0.0 <= self.max_skipped <= 1.0:
            raise UserError(f"--max-skipped must be in [0, 1] (got {self.max_skipped})")
        role_map(self.roles)


# ---------------------------------------------------------------- records -> (prompt, chosen, rejected)

def _messages(value, what: str, cfg: Config, roles: dict, role_key: str, content_key: str,
              default_role: str = "assistant") -> list[dict]:
    """A string (one message of default_role), one message object, or a list of messages."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        return _message_list({what: value}, what, role_key, content_key, roles)
    _text(value, what)  # raises Skip with the right reason (missing / not text)
    raise Skip("bad content", what)


def _strip_prompt(prompt: list[dict], answer: list[dict]) -> list[dict]:
    n = len(prompt)
    return answer[n:] if len(answer) > n and answer[:n] == prompt else answer


def to_pair(rec, cfg: Config, roles: dict) -> tuple[list[dict], list[dict], list[dict]]:
    """One record -> (prompt messages, chosen response messages, rejected response messages); raises Skip."""
    if not isinstance(rec, dict):
        raise Skip("malformed record", f"a JSON {type(rec).__name__}, not an object")
    schema = cfg.schema
    if schema == "auto":
        if "conversations" in rec:
            schema = "sharegpt"
        elif "prompt" in rec:
            schema = "prompt"
        elif "chosen" in rec and isinstance(rec["chosen"], list):
            schema = "hh"
        else:
            raise Skip("missing field", "none of prompt, conversations, chosen (or use --schema fields)")
    rk, ck = ("from", "value") if schema == "sharegpt" else (cfg.role_field, cfg.content_field)
    pf, chf, rjf, sf = (("prompt", "chosen", "rejected", "system") if schema in ("prompt", "hh", "sharegpt")
                        else (cfg.prompt_field, cfg.chosen_field, cfg.rejected_field, cfg.system_field))
    for f in (chf, rjf):
        if rec.get(f) is None:
            raise Skip("missing field", f)
    chosen = _messages(rec[chf], chf, cfg, roles, rk, ck)
    rejected = _messages(rec[rjf], rjf, cfg, roles, rk, ck)
    if schema == "hh":
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        while n > 0 and chosen[n - 1]["role"] == "assistant":  # the prompt ends before an assistant turn
            n -= 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    else:
        field = "conversations" if schema == "sharegpt" else pf
        if rec.get(field) is None:
            raise Skip("missing field", field)
        prompt = _messages(rec[field], field, cfg, roles, rk, ck, default_role="user")
        chosen, rejected = _strip_prompt(prompt, chosen), _strip_prompt(prompt, rejected)
    system = rec.get(sf)
    if isinstance(system, str) and system and not (prompt and prompt[0]["role"] == "system"):
        prompt.insert(0, {"role": "system", "content": system})
    if not prompt or prompt[-1]["role"] == "assistant":
        raise Skip("no prompt", "the prompt must end with a user (or system) turn")
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        if not side or side[0]["role"] != "assistant":
            raise Skip("no assistant turn", f"{name} does not start with an assistant answer")
        if any(m["role"] == "assistant" and not m["content"].strip() for m in side):
            raise Skip("empty answer", name)
    if chosen == rejected:
        raise Skip("chosen == rejected")
    return prompt, chosen, rejected


def is_val(prompt: list[dict], seed: int, fraction: float) -> bool:
    if fraction <= 0:
        return False
    h = hashlib.blake2b(orjson.dumps([seed, prompt]), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < fraction


def render_pair(r: Renderer, prompt: list[dict], chosen: list[dict], rejected: list[dict]):
    """[(ids, mask, prompt_len)] for chosen and rejected: mask only on the response's trained tokens."""
    (pids, _), (cids, cmask), (rids, rmask) = r.render([prompt, prompt + chosen, prompt + rejected])
    out = []
    for ids, mask in ((cids, cmask), (rids, rmask)):
        n = len(pids)
        if ids[:n] != pids:  # a template that renders a prompt differently once answers follow
            raise Skip("template refused", "the rendered prompt is not a prefix of the rendered pair")
        mask = [0] * n + list(mask[n:])
        if not any(mask):
            raise Skip("empty answer", "no trained token in the response")
        out.append((ids, mask, n))
    return out


# ---------------------------------------------------------------- read side

class PrefData:
    """`PrefData(dir, "train").pair(k)` -> (chosen ids, chosen mask, rejected ids, rejected mask)."""

    def __init__(self, data_dir, split: str = "train"):
        self.dir = Path(data_dir)
        meta_path = self.dir / "meta.json"
        if not meta_path.is_file():
            raise UserError(f"{meta_path} not found: --data.dir must be a directory made by `z2all data prefs`")
        try:
            self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise UserError(f"{meta_path} is not valid JSON ({e}); re-run `z2all data prefs`") from None
        if self.meta.get("format") != FORMAT:
            raise UserError(f"{meta_path} is not a `z2all data prefs` directory (format {self.meta.get('format')})")
        n = int(self.meta[f"{split}_pairs"])
        self.n = n
        if n:
            dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
            self._check_files(split, dtype, meta_path)
            self.ids = np.memmap(self.dir / f"{split}.bin", dtype=dtype, mode="r")
            self.mask = np.memmap(self.dir / f"{split}.mask", dtype=np.uint8, mode="r")
            self.idx = np.fromfile(self.dir / f"{split}.idx", dtype=IDX_DTYPE).reshape(-1, 4)
            ends = self.idx[:, [0, 2]] + self.idx[:, [1, 3]]
            if int(ends.max()) > len(self.ids):
                raise UserError(f"{self.dir / f'{split}.idx'} points past the end of {self.dir / f'{split}.bin'} "
                                f"({int(ends.max()):,} > {len(self.ids):,} tokens); rebuild the directory with "
                                "`z2all data prefs`")

    def _check_files(self, split: str, dtype: np.dtype, meta_path: Path) -> None:
        """Each file of the split exists and has exactly the size meta.json's counts give, before anything is
        mapped: a byte appended or cut would otherwise crash np.memmap or shift every label by one."""
        tokens = self.meta.get(f"{split}_tokens")
        expect = [("bin", dtype.itemsize, f"{dtype.name} tokens", tokens),
                  ("mask", 1, "mask bytes", tokens),  # one per token
                  ("idx", 4 * IDX_DTYPE.itemsize, "pair entries (4 x uint64)", self.n),
                  ("plen", 2 * PLEN_DTYPE.itemsize, "prompt-length entries (2 x uint32)", self.n)]
        counts = {}
        for ext, item, what, want in expect:
            path = self.dir / f"{split}.{ext}"
            if not path.is_file():
                raise UserError(f"{path} is missing ({meta_path} lists {self.n:,} {split} pairs); rebuild the "
                                "directory with `z2all data prefs`")
            size = path.stat().st_size
            if size % item:
                raise UserError(f"{path} has {size:,} bytes, not a whole number of {what} ({item} bytes each): it "
                                "was truncated or appended to; rebuild the directory with `z2all data prefs`")
            if want is not None and size // item != int(want):
                raise UserError(f"{path} holds {size // item:,} {what} but {meta_path} says {int(want):,}: it was "
                                "truncated, appended to or replaced; rebuild the directory with `z2all data prefs`")
            counts[ext] = size // item
        if counts["bin"] != counts["mask"]:  # a meta.json without {split}_tokens: the two must still agree
            raise UserError(f"{self.dir / f'{split}.mask'} holds {counts['mask']:,} mask bytes for "
                            f"{counts['bin']:,} tokens in {self.dir / f'{split}.bin'}; rebuild the directory with "
                            "`z2all data prefs`")

    def __len__(self) -> int:
        return self.n

    def side(self, k: int, which: int) -> tuple[np.ndarray, np.ndarray]:
        a, n = int(self.idx[k, 2 * which]), int(self.idx[k, 2 * which + 1])
        return np.asarray(self.ids[a:a + n], dtype=np.int64), np.asarray(self.mask[a:a + n]).astype(bool)

    def pair(self, k: int):
        return (*self.side(k, 0), *self.side(k, 1))


# ---------------------------------------------------------------- the command

def stats_table(meta: dict) -> str:
    s = meta["stats"]
    rows = []
    for split in SPLITS:
        n = meta[f"{split}_pairs"]
        rows.append([split, n, s["prompts"][split], meta[f"{split}_tokens"],
                     f"{s['chosen_tokens'][split] / n:.1f}" if n else "-",
                     f"{s['rejected_tokens'][split] / n:.1f}" if n else "-"])
    lines = [markdown_table(["split", "pairs", "prompts", "tokens", "chosen response tok/pair",
                             "rejected response tok/pair"], rows),
             f"records read: {s['records']:,}; longer than --max-len {meta['max_len']}: {s['dropped_too_long']:,} "
             "dropped"]
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
    renderer = Renderer(cfg.tokenizer)
    roles = role_map(cfg.roles)
    out = claim_output_dir(cfg.out, COMMAND, protect=[*cfg.inputs, cfg.tokenizer])
    dtype = dtype_for(renderer.vocab_size)
    stats = {"records": 0, "pairs": {s: 0 for s in SPLITS}, "prompts": {s: 0 for s in SPLITS},
             "chosen_tokens": {s: 0 for s in SPLITS}, "rejected_tokens": {s: 0 for s in SPLITS},
             "dropped_too_long": 0, "skipped": {}, "examples": {}}
    data = {s: {"ids": [], "mask": [], "idx": [], "plen": [], "tokens": 0, "prompts": set()} for s in SPLITS}

    def skip(reason: str, where: str, detail: str = "") -> None:
        stats["skipped"][reason] = stats["skipped"].get(reason, 0) + 1
        ex = stats["examples"].setdefault(reason, [])
        if len(ex) < cfg.max_examples:
            ex.append(where + (f" ({detail})" if detail else ""))

    for path in files:
        reader = InputReader(path, cfg.format or None)
        try:
            for first, items in reader.batches(0, batch_items=256):
                for j, item in enumerate(items):
                    where = reader.where(first + j)
                    if reader.kind == "lines":
                        if not item.strip():
                            continue
                        stats["records"] += 1
                        try:
                            item = orjson.loads(item)
                        except orjson.JSONDecodeError as e:
                            skip("malformed record", where, f"invalid JSON: {e}")
                            continue
                    else:
                        stats["records"] += 1
                    try:
                        prompt, chosen, rejected = to_pair(item, cfg, roles)
                        sides = render_pair(renderer, prompt, chosen, rejected)
                    except Skip as e:
                        skip(e.reason, where, e.detail)
                        continue
                    if cfg.max_len and max(len(ids) for ids, _, _ in sides) > cfg.max_len:
                        stats["dropped_too_long"] += 1
                        continue
                    split = "val" if is_val(prompt, cfg.seed, cfg.val_fraction) else "train"
                    d = data[split]
                    row = []
                    for ids, mask, _ in sides:
                        row += [d["tokens"], len(ids)]
                        d["ids"] += ids
                        d["mask"] += mask
                        d["tokens"] += len(ids)
                    d["idx"].append(row)
                    d["plen"].append([sides[0][2], sides[1][2]])
                    d["prompts"].add(hashlib.blake2b(orjson.dumps(prompt), digest_size=8).digest())
                    stats["pairs"][split] += 1
                    stats["chosen_tokens"][split] += sum(sides[0][1])
                    stats["rejected_tokens"][split] += sum(sides[1][1])
        except MalformedJSON as e:
            skip("unreadable rest of file", reader.where(e.index), str(e))
    for s in SPLITS:
        stats["prompts"][s] = len(data[s]["prompts"])
    kept = sum(stats["pairs"].values())
    skipped = sum(stats["skipped"].values())
    first_bad = next((f"{r}: {ex[0]}" for r, ex in stats["examples"].items() if ex), "")
    if kept == 0:
        raise UserError(f"no preference pair survived out of {stats['records']} records ({skipped} skipped"
                        f"{', first: ' + first_bad if first_bad else ''}; {stats['dropped_too_long']} longer than "
                        f"--max-len {cfg.max_len}); check --schema and the inputs")
    if stats["records"] and skipped / stats["records"] > cfg.max_skipped:
        raise UserError(f"{skipped} of {stats['records']} records were skipped, more than --max-skipped "
                        f"{cfg.max_skipped} (first: {first_bad}); fix the inputs or raise --max-skipped")
    meta = {"format": FORMAT, "dtype": dtype.name, "byteorder": "little", "vocab_size": renderer.vocab_size,
            "train_pairs": stats["pairs"]["train"], "val_pairs": stats["pairs"]["val"],
            "train_tokens": data["train"]["tokens"], "val_tokens": data["val"]["tokens"],
            "specials": {t: i for t, i in renderer.specials.items() if not t.startswith("<|reserved_")},
            "template_sha256": renderer.template_sha256, "tokenizer_sha256": renderer.tokenizer_sha256,
            "tokenizer_dir": str(Path(cfg.tokenizer).resolve()), "inputs": [str(p) for p in files],
            "max_len": cfg.max_len, "val_fraction": cfg.val_fraction, "seed": cfg.seed, "stats": stats}
    own = ["meta.json"] + [f"{s}.{ext}" for s in SPLITS for ext in ("bin", "mask", "idx", "plen")]
    with atomic_dir(out, ours=own) as tmp:
        (tmp / OWNER_FILE).write_bytes((out / OWNER_FILE).read_bytes())
        for s in SPLITS:
            d = data[s]
            if not d["idx"]:
                continue
            np.asarray(d["ids"], dtype=dtype).tofile(tmp / f"{s}.bin")
            np.asarray(d["mask"], dtype=np.uint8).tofile(tmp / f"{s}.mask")
            np.asarray(d["idx"], dtype=IDX_DTYPE).tofile(tmp / f"{s}.idx")
            np.asarray(d["plen"], dtype=np.dtype("<u4")).tofile(tmp / f"{s}.plen")
        atomic_write_json(tmp / "meta.json", meta)
    print0(stats_table(meta))
    print0(f"data prefs: {kept:,} pairs ({meta['train_pairs']:,} train, {meta['val_pairs']:,} val) "
           f"({time.perf_counter() - t0:.1f} s) -> {out}")
    return 0


# ---------------------------------------------------------------- pairs from the synthetic task set

def synthetic_pairs(records, seed: int = 0) -> list[dict]:
    """Preference records from `z2all data synth` records: the exact answer as chosen; as rejected, a
    plausible wrong answer (arithmetic off by a little, a list not reversed, a count off by one, a
    numeral off by one, another title) or, every third record, the right answer buried in an over-long
    one. Deterministic in (seed, record id)."""
    import random

    from z2all.data import synthetic

    out = []
    for rec in records:
        msgs, answer = rec["messages"], str(rec["answer"])
        rng = random.Random(f"{seed}:{rec.get('id', answer)}")
        prompt = [m for m in msgs if m["role"] != "assistant"]
        zh = rec.get("lang") == "zh"
        if rng.random() < 1 / 3:
            pad = ("我想想。" if zh else "Let me think about this carefully. ") * rng.randint(2, 4)
            wrong = f"{pad}{answer}"
        else:
            wrong = _plausible_wrong(rec.get("task", ""), answer, rng, synthetic)
        if wrong == answer:
            continue
        out.append({"prompt": prompt, "chosen": answer, "rejected": wrong, "task": rec.get("task"),
                    "lang": rec.get("lang"), "answer": answer})
    return out


def _plausible_wrong(task: str, answer: str, rng, synthetic) -> str:
    if task in ("arithmetic", "count") and answer.lstrip("-").isdigit():
        return str(int(answer) + rng.choice([-2, -1, 1, 2]))
    if task == "numeral":
        if answer.isdigit():
            return str(int(answer) + rng.choice([-1, 1, 10]))
        try:
            return synthetic.to_chinese(max(0, synthetic.from_chinese(answer) + rng.choice([1, 10])))
        except (ValueError, KeyError):
            pass
    if task == "reverse":
        sep = "、" if "、" in answer else (", " if ", " in answer else " ")
        words = answer.split(sep)
        if len(words) > 1:
            return sep.join(words[::-1]) if rng.random() < 0.5 else sep.join(words[1:] + words[:1])
    return answer[: max(1, len(answer) // 2)] if len(answer) > 1 else answer + answer
