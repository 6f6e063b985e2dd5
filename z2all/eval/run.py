"""`z2all eval`: score one or more checkpoints (ours or any Hugging Face Llama directory) on bits per byte
per domain, multiple-choice suites and generative exact match; one comparison table for several models.

    z2all eval --ckpt runs/demo/train/checkpoints/step-400 --heldout runs/demo/tokens
    z2all eval --ckpt A --ckpt hf/llama --tasks mmlu=data/mmlu/test/anatomy_test.csv --fewshot 5
    z2all eval --ckpt A --tasks ceval=ceval/val --tasks hellaswag=hellaswag_val.jsonl --texts zh=zh.txt
    z2all eval --ckpt A --tasks gen=qa.jsonl --stop "\\n" --chat auto --out results/

Inputs:
  --tasks FORMAT=PATH[@DEV]  formats: mmlu, ceval, cmmlu (csv), hellaswag, arc, jsonl (generic multiple
                             choice), gen (generative; see formats.py). PATH may be a directory: every
                             .csv / .jsonl file in it is one task. Few-shot examples come from DEV, else
                             from the dev split next to PATH (MMLU / C-Eval / CMMLU layouts), else from the
                             other items of PATH.
  --texts NAME=PATH          bits per byte on a text file (.txt: the file is one document; .jsonl: one
                             document per line, field text / content / a converted record)
  --heldout TOKENS_DIR       a `z2all data tokenize` output: bits per byte per domain on its held-out
                             documents (the unigram baseline from its train split), and the "which
                             continuation?" task per domain built from them (tasks.py)

--ckpt may also be a training run directory (runs/<run>/train): its latest checkpoint is scored, as the
other commands do (llama.resolve_checkpoint), and a note on stderr says which.

Output: results.json and results.md in --out, else in <ckpt>/eval/ for each checkpoint (a directory this
command owns: it refuses one it did not write; a run that fails before writing results leaves none
behind); the markdown tables are also printed. Rows that cannot be used are skipped and counted with
file:line; each table says how many items were scored.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from z2all.config import opt
from z2all.eval import formats, tasks
from z2all.utils import UserError, markdown_table, print0

if TYPE_CHECKING:  # score imports torch: loaded only once the inputs are known to be good
    from z2all.eval import score

COMMAND = "eval"


@dataclass
class Config:
    ckpt: list[str] = opt(help="checkpoint directories: ours (model_config.json), a training run directory (its "
                          "latest checkpoint) or Hugging Face Llama (config.json + safetensors); several give one "
                          "comparison table", factory=list)
    tokenizer: str = opt("", "tokenizer directory for every --ckpt (default: <ckpt>/tokenizer/, else <ckpt>)")
    tasks: list[str] = opt(help="tasks as FORMAT=PATH[@DEV]; formats: " + ", ".join(formats.FORMATS),
                           factory=list)
    texts: list[str] = opt(help="bits-per-byte domains as NAME=PATH (.txt or .jsonl)", factory=list)
    heldout: str = opt("", "a `z2all data tokenize` output dir: bpb and the continuation task per domain on "
                       "its held-out documents")
    max_docs: int = opt(200, "held-out documents per domain at most (--heldout)")
    max_tokens: int = opt(200_000, "bits per byte: tokens scored per domain at most (whole documents); 0 = all")
    continuation: bool = opt(True, "build the 'which continuation?' task from the --heldout / --texts documents")
    n_choices: int = opt(4, "choices per item of the continuation task")
    per_doc: int = opt(1, "continuation task: items per held-out document at most (non-overlapping; > 1 for "
                       "corpora with few held-out documents)")
    fewshot: int = opt(0, "few-shot examples per item (from the dev split), drawn with --seed")
    seed: int = opt(1234, "seed for few-shot sampling and the continuation task")
    limit: int = opt(0, "items per task at most (the first ones); 0 = all")
    truncate: str = opt("left", "a context longer than the model's window: cut from the left, or skip the item",
                        choices=("left", "skip"))
    chat: str = opt("auto", "generative tasks: wrap the prompt in the tokenizer's chat template (auto = when it "
                    "has one)", choices=("auto", "on", "off"))
    stop: list[str] = opt(help="generative tasks: stop strings (the answer is cut at the first; \\n and \\t "
                          "are a newline and a tab)",
                          factory=lambda: ["\n"])
    max_new_tokens: int = opt(32, "generative tasks: tokens generated per item at most")
    batch_size: int = opt(8, "questions (or documents) per forward batch")
    window: int = opt(0, "tokens per scoring window (bits per byte, multiple-choice contexts); 0 = the model's "
                      "max_seq_len. A model trained on shorter rows than its max_seq_len (the demo: 128 of 256) "
                      "scores as in training with --window set to that length")
    threads: int = opt(0, "torch CPU threads (0 = torch's default); 1 is often faster for small models on a "
                       "busy machine")
    device: str = opt("auto", "auto (cuda when available, else cpu), cpu, cuda, cuda:1, ...")
    dtype: str = opt("auto", "compute dtype: auto = bf16/fp16 on GPU, fp32 on CPU",
                     choices=("auto", "fp32", "bf16", "fp16"))
    out: str = opt("", "write results.json + results.md here (default: <ckpt>/eval/ per checkpoint)")


# ---------------------------------------------------------------- inputs

@dataclass
class Task:
    name: str
    kind: str  # "mc" or "gen"
    items: list
    skipped: list[str]
    total: int
    chance: float | None = None
    mutual_info: bool = False  # also acc_mi (the "which continuation?" set): one more pass without the context


def _split_spec(spec: str, what: str) -> tuple[str, str]:
    key, sep, path = spec.partition("=")
    if not sep or not key or not path:
        raise UserError(f"{what} '{spec}' must look like NAME=PATH")
    return key.strip(), path.strip()


def _task_files(path: Path, fmt: str) -> list[Path]:
    if path.is_dir():
        ext = ".csv" if fmt in ("mmlu", "ceval", "cmmlu") else ".jsonl"
        files = sorted(p for p in path.iterdir() if p.suffix == ext and p.is_file())
        if not files:
            raise UserError(f"--tasks {fmt}={path}: no {ext} file in that directory")
        return files
    if not path.is_file():
        raise UserError(f"--tasks {fmt}={path}: file not found")
    return [path]


def load_tasks(cfg: Config) -> list[Task]:
    out = []
    for spec in cfg.tasks:
        fmt, rest = _split_spec(spec, "--tasks")
        if fmt not in formats.FORMATS:
            raise UserError(f"--tasks {spec}: unknown format '{fmt}'; use one of {', '.join(formats.FORMATS)}")
        path_s, _, dev_s = rest.partition("@")
        for path in _task_files(Path(path_s), fmt):
            loaded = formats.load(fmt, path)
            if not loaded.docs and not loaded.skipped:  # refused before any model loads or result is written
                raise UserError(f"--tasks {spec}: {path} holds no rows; give a file of {fmt} items")
            dev = None
            if cfg.fewshot > 0:
                dev_path = Path(dev_s) if dev_s else formats.dev_path_for(path)
                if dev_path is not None:
                    dev = formats.load(fmt, dev_path).docs
                    if not dev:
                        raise UserError(f"few-shot split {dev_path} has no usable row")
            items = formats.build_items(loaded, cfg.fewshot, dev, cfg.seed)
            pool = len(dev) if dev is not None else len(loaded.docs) - 1
            if 0 < pool < cfg.fewshot:  # said, not silent: the numbers are then not --fewshot's
                print0(f"note: {fmt}/{path.stem}: --fewshot {cfg.fewshot} but only {pool} other example(s) to draw "
                       f"from: {pool}-shot")
            total = len(items) + len(loaded.skipped)
            if cfg.limit:
                items = items[:cfg.limit]
            # chance = the expected accuracy of a uniform guess over the items scored: the mean of 1/choices
            # (1/max(choices) understated it when items have different numbers of choices)
            scored = [d for d in loaded.docs[:len(items)] if d.choices]
            chance = None
            if scored and not loaded.generative:
                chance = sum(1.0 / len(d.choices) for d in scored) / len(scored)
            out.append(Task(f"{fmt}/{path.stem}", "gen" if loaded.generative else "mc", items, loaded.skipped,
                            total, chance))
    return out


def _read_texts(name: str, path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"--texts {name}={path}: file not found")
    if path.suffix != ".jsonl":
        try:
            return [path.read_text(encoding="utf-8")]
        except UnicodeDecodeError:
            raise UserError(f"--texts {name}={path}: not UTF-8 text") from None
    from z2all.data.schema import record_text

    docs = []
    with open(path, encoding="utf-8") as f:
        try:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    raise UserError(f"{path}:{n}: malformed JSON line") from None
                text = rec.get("text") if isinstance(rec, dict) else None
                if text is None and isinstance(rec, dict):
                    # record_text calls string methods on these fields: a number or a list there would
                    # surface as an AttributeError far from the line that holds it
                    bad = next((k for k in ("content", "title", "desc")
                                if rec.get(k) is not None and not isinstance(rec[k], str)), None)
                    if bad:
                        raise UserError(f"{path}:{n}: field {bad} is a {type(rec[bad]).__name__}, not a string")
                    text = record_text(rec)
                if text:
                    docs.append(str(text))
        except UnicodeDecodeError:
            # decoding happens line by line while iterating, so this is the only place to catch it
            raise UserError(f"--texts {name}={path}: not UTF-8 text; convert it to UTF-8") from None
    return docs


def load_domains(cfg: Config) -> dict[str, list[str]]:
    domains: dict[str, list[str]] = {}
    if cfg.heldout:
        domains.update(tasks.heldout_docs(cfg.heldout, cfg.max_docs))
    for spec in cfg.texts:
        name, path = _split_spec(spec, "--texts")
        docs = [d for d in _read_texts(name, Path(path)) if d.strip()]
        if not docs:
            raise UserError(f"--texts {name}={path}: no text in it (a .jsonl line needs a text or content field)")
        domains.setdefault(name, []).extend(docs)
    return domains


def unigram_counts(tokens_dir: str | Path, tok_dir: str | Path | None, max_tokens: int = 0):
    """Token counts of a tokenize output's train split, when it was made with the same tokenizer.json as
    the model's (else None: the in-sample unigram is used). max_tokens > 0: count only the first that many
    tokens of the train files (in file order), so the cost stays bounded on a large corpus."""
    import numpy as np

    tokens_dir = Path(tokens_dir)
    meta = json.loads((tokens_dir / "meta.json").read_text(encoding="utf-8"))
    theirs = Path(meta.get("tokenizer_dir", "")) / "tokenizer.json"
    ours = Path(tok_dir or "") / "tokenizer.json"
    if not (theirs.is_file() and ours.is_file() and theirs.read_bytes() == ours.read_bytes()):
        return None
    vocab = int(meta["vocab_size"])
    counts = np.zeros(vocab, dtype=np.int64)
    left = max_tokens or None
    for name in meta["train_files"]:
        p = tokens_dir / name
        if p.stat().st_size:
            arr = np.memmap(p, dtype=np.dtype(meta["dtype"]).newbyteorder("<"), mode="r")
            if left is not None:
                arr = arr[:left]
                left -= len(arr)
            counts += np.bincount(arr, minlength=vocab)[:vocab]
            if left is not None and left <= 0:
                break
    return counts


# ---------------------------------------------------------------- scoring

def evaluate_task(lm: score.LM, task: Task, cfg: Config) -> dict:
    """Scores of one model on one task: {"kind", "n" (scored), "total", "skipped", ...} and per-item rows."""
    from z2all.eval import score

    t0 = time.perf_counter()
    res: dict = {"kind": task.kind, "total": task.total, "chance": task.chance}
    if task.kind == "mc":
        lls = score.loglikelihoods(lm, task.items, cfg.batch_size, cfg.truncate)
        uncond = score.unconditional_loglikelihoods(lm, task.items, cfg.batch_size) if task.mutual_info else None
        per, acc, acc_norm, acc_bytes, acc_mi = [], 0, 0, 0, 0
        too_long = []
        for k, (it, r) in enumerate(zip(task.items, lls)):
            if r is None:
                too_long.append(f"{it.where}: longer than the model's window ({lm.window} tokens)")
                continue
            ll = [x[0] for x in r]
            pred, pred_norm, pred_bytes = score.choose(ll, it.choices)
            acc += pred == it.gold
            acc_norm += pred_norm == it.gold
            acc_bytes += pred_bytes == it.gold
            per.append({"where": it.where, "gold": it.gold, "pred": pred, "pred_norm": pred_norm,
                        "pred_bytes": pred_bytes, "ll": ll, "greedy": [x[1] for x in r]})
            if uncond is not None:  # the choices alone always fit: a choice longer than the window skips the item
                un = [x[0] for x in uncond[k]]
                per[-1].update(ll_unconditional=un, pred_mi=score.choose_mutual_info(ll, un))
                acc_mi += per[-1]["pred_mi"] == it.gold
        n = len(per)
        res.update(n=n, acc=acc / n if n else None, acc_norm=acc_norm / n if n else None,
                   acc_bytes=acc_bytes / n if n else None, items=per)
        if uncond is not None:
            res["acc_mi"] = acc_mi / n if n else None
    else:
        chat = cfg.chat == "on" or (cfg.chat == "auto" and score.has_chat_template(lm))
        if cfg.chat == "on" and not score.has_chat_template(lm):
            raise UserError(f"--chat on, but the tokenizer of {lm.path} has no chat template")
        stops = [s.replace("\\n", "\n").replace("\\t", "\t") for s in cfg.stop]  # "\n" typed in a shell
        gens = score.exact_match(lm, task.items, cfg.max_new_tokens, stops, chat, cfg.batch_size, cfg.truncate)
        per, too_long = [], []
        for it, g in zip(task.items, gens):
            if g is None:
                too_long.append(f"{it.where}: prompt longer than the window minus --max-new-tokens")
                continue
            per.append({"where": it.where, "output": g[0], "correct": g[1], "answers": it.answers})
        n = len(per)
        res.update(n=n, em=sum(p["correct"] for p in per) / n if n else None, chat=chat, items=per)
    res["skipped"] = len(task.skipped) + len(too_long)
    res["skipped_rows"] = (task.skipped + too_long)[:50]
    res["seconds"] = round(time.perf_counter() - t0, 3)
    return res


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def tables(results: dict) -> str:
    """Markdown: one bits-per-byte table (a row per model) and one table per task (a row per model)."""
    models = results["models"]
    parts = []
    doms = sorted({d for m in models.values() for d in m.get("bpb", {})})
    if doms:
        rows = []
        for name, m in models.items():
            row = [name]
            for d in doms:
                r = m.get("bpb", {}).get(d)
                row.append(_fmt(r["bpb"]) if r else "-")
            rows.append(row)
        first = next(iter(models.values())).get("bpb", {})
        rows.append(["unigram baseline (first model's tokenizer)"] + [_fmt(first.get(d, {}).get("unigram_bpb"))
                                                                      for d in doms])
        head = ["model"] + [f"{d} bpb" for d in doms]
        docs = ", ".join(f"{d}: {first[d]['docs']} docs / {first[d]['bytes']:,} bytes" for d in doms if d in first)
        parts.append(f"### bits per byte (lower is better; {docs})\n\n" + markdown_table(head, rows))
    task_names = sorted({t for m in models.values() for t in m.get("tasks", {})})
    for t in task_names:
        rows, kind, chance = [], None, None
        mi = any("acc_mi" in m.get("tasks", {}).get(t, {}) for m in models.values())
        for name, m in models.items():
            r = m.get("tasks", {}).get(t)
            if r is None:
                continue
            kind, chance = r["kind"], r.get("chance")
            scored = f"{r['n']} / {r['total']}"
            if kind == "mc":
                rows.append([name, _fmt(r["acc"]), _fmt(r["acc_norm"]), _fmt(r["acc_bytes"])]
                            + ([_fmt(r.get("acc_mi"))] if mi else []) + [scored, r["skipped"]])
            else:
                rows.append([name, _fmt(r["em"]), scored, r["skipped"]])
        head = (["model", "acc", "acc_norm", "acc_bytes"] + (["acc_mi"] if mi else []) + ["scored / items", "skipped"]
                if kind == "mc" else ["model", "exact match", "scored / items", "skipped"])
        note = f" (chance {chance:.3f})" if chance else ""
        parts.append(f"### {t}{note}\n\n" + markdown_table(head, rows))
    return "\n\n".join(parts) + "\n"


def evaluate_model(lm: score.LM, task_list: list[Task], domains: dict, cfg: Config, unigram=None) -> dict:
    from z2all.eval import score

    m: dict = {"path": lm.path, "params": lm.model.num_params(), "window": lm.window, "tasks": {}}
    if domains:
        m["bpb"] = score.bpb_per_domain(lm.model, lm.tok, domains, cfg.max_tokens, cfg.batch_size, unigram,
                                        window=lm.window)
    for t in task_list:
        m["tasks"][t.name] = evaluate_task(lm, t, cfg)
    return m


def _continuation_tasks(domains: dict, cfg: Config) -> list[Task]:
    out = []
    for dom, docs in sorted(domains.items()):
        items = tasks.continuation_items(docs, cfg.n_choices, seed=cfg.seed, where=f"{dom} held-out",
                                         per_doc=cfg.per_doc)
        if cfg.limit:
            items = items[:cfg.limit]
        if items:
            out.append(Task(f"continuation/{dom}", "mc", items, [], len(items), 1.0 / cfg.n_choices, mutual_info=True))
    return out


def _write(out_dir: Path, results: dict) -> None:
    from z2all.io import atomic_write_json, atomic_write_text

    atomic_write_json(out_dir / "results.json", results)
    atomic_write_text(out_dir / "results.md", "# z2all eval\n\n" + tables(results))


def _resolve_ckpts(paths: list[str]) -> list[str]:
    """The model directory of each --ckpt, as the other commands read it (llama.resolve_checkpoint): a run
    directory becomes its latest checkpoint, with a note on stderr saying which. A sharded Hugging Face
    directory (model.safetensors.index.json), which resolve_checkpoint refuses but score.load_lm reads, is
    kept as given. A path that needs no resolving is kept as typed, so results are keyed by what the user gave."""
    import sys

    from z2all.model.llama import CONFIG_FILE, resolve_checkpoint

    out = []
    for path in paths:
        p = Path(path)
        if p.is_dir() and not (p / CONFIG_FILE).is_file() and (p / "model.safetensors.index.json").is_file():
            out.append(path)
            continue
        resolved, _, note = resolve_checkpoint(path, "--ckpt")
        if note:
            print(note, file=sys.stderr, flush=True)
        out.append(str(resolved) if note else path)
    return out


def run(cfg: Config) -> int:
    from contextlib import ExitStack

    if not cfg.ckpt:
        raise UserError("give --ckpt DIR (one or more checkpoints or Hugging Face Llama directories)")
    for path in cfg.ckpt:
        if not Path(path).is_dir():
            raise UserError(f"--ckpt {path} is not a directory (give a checkpoint step-N/, a training run directory "
                            f"or an HF Llama directory)")
    ckpts = _resolve_ckpts(cfg.ckpt)
    if not (cfg.tasks or cfg.texts or cfg.heldout):
        raise UserError("nothing to evaluate: give --tasks FORMAT=PATH, --texts NAME=PATH or --heldout TOKENS_DIR")
    if cfg.fewshot < 0 or cfg.batch_size < 1 or cfg.n_choices < 2 or cfg.per_doc < 1 or cfg.window < 0:
        raise UserError("--fewshot must be >= 0, --batch-size >= 1, --n-choices >= 2, --per-doc >= 1 and "
                        "--window >= 0")
    task_list = load_tasks(cfg)
    domains = load_domains(cfg)
    if cfg.continuation:
        task_list += _continuation_tasks(domains, cfg)
    # Claim every output directory before the (long) scoring, so a refusal comes at once. Each claim is
    # undone if anything fails before that directory's results are written (a bad model, a window too
    # large, a refused second claim), so a failed first run leaves no directory holding only the owner
    # file; once written, a directory's claim is closed and kept, whatever fails later.
    from z2all.io import claimed_output_dir

    protect = [*cfg.ckpt, *ckpts, cfg.heldout or None, cfg.tokenizer or None]
    # deduplicated: one directory claimed twice would be undone by its first claim after results were written
    out_dirs = [cfg.out] if cfg.out else list(dict.fromkeys(str(Path(p) / "eval") for p in ckpts))
    with ExitStack() as on_failure:
        claims: dict[str, ExitStack] = {}
        for d in out_dirs:
            claims[d] = ExitStack()
            on_failure.push(claims[d])  # exited with the exception, if any: undoes a claim still open
            claims[d].enter_context(claimed_output_dir(
                d, COMMAND, option="--out" if cfg.out else "the default output <ckpt>/eval", protect=protect))
        return _score_and_write(cfg, ckpts, task_list, domains, claims)


def _score_and_write(cfg: Config, ckpts: list[str], task_list: list[Task], domains: dict,
                     claims: dict) -> int:
    """Score every model, write results where `claims` (output dir -> its open claim) say, closing each
    claim once its directory holds results."""
    import torch

    from z2all import __version__
    from z2all.eval import score
    from z2all.utils import pick_device, pick_dtype

    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    results = {"z2all": "eval", "z2all_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, "models": {}}
    for path in ckpts:
        lm = score.load_lm(path, cfg.tokenizer or None, device, dtype)
        if cfg.window:
            if cfg.window > lm.model.cfg.max_seq_len:
                raise UserError(f"--window {cfg.window} exceeds the max_seq_len of {path} "
                                f"({lm.model.cfg.max_seq_len}); give at most that")
            lm.context = cfg.window
        unigram = unigram_counts(cfg.heldout, _tok_dir(path, cfg.tokenizer)) if cfg.heldout else None
        with torch.inference_mode():
            m = evaluate_model(lm, task_list, domains, cfg, unigram)
        m["unigram"] = "train split" if unigram is not None else "in-sample"
        results["models"][path] = m
        if not cfg.out:
            out = str(Path(path) / "eval")
            _write(Path(out), {**results, "models": {path: m}})
            claims[out].close()
    text = tables(results)
    print0(text)
    for t in task_list:
        if t.skipped:
            print0(f"{t.name}: skipped {len(t.skipped)} row(s), e.g. {t.skipped[0]}")
    if cfg.out:
        _write(Path(cfg.out), results)
        claims[cfg.out].close()
        print0(f"z2all eval: results in {Path(cfg.out) / 'results.json'} and results.md")
    else:
        print0("z2all eval: results in " + ", ".join(str(Path(p) / "eval" / "results.json") for p in ckpts))
    scored = sum(r.get("n", 0) for m in results["models"].values() for r in m["tasks"].values())
    if not scored and not domains:
        raise UserError("no item could be scored (every row was skipped; see the table)")
    return 0


def _tok_dir(path: str, tokenizer: str) -> Path:
    if tokenizer:
        return Path(tokenizer)
    p = Path(path)
    return p / "tokenizer" if (p / "tokenizer").is_dir() else p


def trained_seq_len(ckpt_dir: str | Path) -> int:
    """The row length a `z2all train` / `z2all sft` checkpoint was trained on (its config.json's data.seq_len),
    or 0 when the checkpoint does not say (an HF directory, an older checkpoint)."""
    try:
        cfg = json.loads((Path(ckpt_dir) / "config.json").read_text(encoding="utf-8"))
        return int(cfg["config"]["data"]["seq_len"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def demo_report(ckpt_dir: str | Path, tokens_dir: str | Path, max_docs: int = 100, max_tokens: int = 10_000,
                max_items: int = 200, per_doc: int = 32, seed: int = 1234, threads: int = 0) -> tuple[str, dict]:
    """For `make demo`: (markdown, results) with bits per byte per domain on the held-out documents of the
    demo's token directory next to the unigram baseline of its train split (same units), and the "which
    continuation?" accuracy per domain next to chance (1/4). Bounded: at most `max_docs` documents,
    `max_tokens` tokens (whole documents) and `max_items` items per domain (up to `per_doc` per document:
    the demo holds out only ~5-36 documents per domain). Windows are the length the
    checkpoint was trained on (config.json's data.seq_len; the demo trains on 128-token rows of a
    256-position model), else its max_seq_len. CPU, fp32; `threads` > 0 sets torch's thread count meanwhile.

    results: {"window", "seconds", "unigram" ("train split" | "in-sample"), "above_chance": {"acc", "acc_mi"}
    (True when every domain beats chance by 2 standard errors of a guesser: 0.31 at 200 items),
    "domains": {domain: {"docs", "bytes", "tokens", "bpb", "unigram_bpb", "acc",
    "acc_norm", "acc_mi", "items", "chance"}}}. acc_mi (lm-eval's acc_mutual_info) is the measure to quote:
    the distractors are real text, so plain acc mostly ranks spans by how likely they are on their own; on
    the demo checkpoint (146 steps) plain acc was 0.27-0.31, as a random-init model's 0.26-0.29, while acc_mi
    was 0.37-0.52 against the random model's 0.25 (docs/performance.md)."""
    import torch

    from z2all.eval import score
    from z2all.model.generate import num_threads

    t0 = time.perf_counter()
    with num_threads(threads):
        lm = score.load_lm(ckpt_dir, None, "cpu", torch.float32)
        lm.context = min(trained_seq_len(ckpt_dir) or lm.window, int(lm.model.cfg.max_seq_len))
        cfg = Config(ckpt=[str(ckpt_dir)], heldout=str(tokens_dir), max_docs=max_docs, max_tokens=max_tokens,
                     seed=seed, limit=max_items, per_doc=per_doc, device="cpu")
        domains = load_domains(cfg)
        unigram = unigram_counts(tokens_dir, _tok_dir(str(ckpt_dir), ""))
        with torch.inference_mode():
            bpb = score.bpb_per_domain(lm.model, lm.tok, domains, max_tokens, cfg.batch_size, unigram,
                                       window=lm.context)
            tasks_ = {t.name.split("/", 1)[1]: evaluate_task(lm, t, cfg) for t in _continuation_tasks(domains, cfg)}
    chance = 1.0 / cfg.n_choices
    doms: dict = {}
    for dom in sorted(bpb):
        b, t = bpb[dom], tasks_.get(dom)
        doms[dom] = {"docs": b["docs"], "bytes": b["bytes"], "tokens": b["tokens"], "bpb": b["bpb"],
                     "unigram_bpb": b.get("unigram_bpb"), "acc": t["acc"] if t else None,
                     "acc_norm": t["acc_norm"] if t else None, "acc_mi": t.get("acc_mi") if t else None,
                     "items": t["n"] if t else 0, "chance": chance}

    def above(key: str) -> bool:  # by more than 2 standard errors of a guesser on that many items
        return bool(doms) and all(d[key] is not None and d[key] > chance + 2 * math.sqrt(chance * (1 - chance)
                                                                                      / d["items"])
                                  for d in doms.values())

    res = {"window": lm.context, "seconds": round(time.perf_counter() - t0, 1),
           "unigram": "train split" if unigram is not None else "in-sample",
           "above_chance": {"acc": above("acc"), "acc_mi": above("acc_mi")}, "domains": doms}
    rows = [[dom, d["docs"], f"{d['bytes']:,}", _fmt(d["bpb"]), _fmt(d["unigram_bpb"]), _fmt(d["acc"]),
             _fmt(d["acc_mi"]), f"{chance:.2f}", d["items"]] for dom, d in doms.items()]
    yes = {k: "yes" if v else "NO" for k, v in res["above_chance"].items()}
    text = (markdown_table(["domain", "held-out docs", "bytes", "bits/byte", f"unigram bits/byte ({res['unigram']})",
                            "continuation acc", "acc_mi", "chance", "items"], rows)
            + f"\nbits per byte: lower is better, windows of {lm.context} tokens. 'Which continuation?': the true next "
            f"span against {cfg.n_choices - 1} spans of other held-out documents of the same domain; acc = highest "
            "log-likelihood (lm-eval's acc), acc_mi = highest gain over the span's likelihood without the context "
            f"(lm-eval's acc_mutual_info). Above chance by 2 standard errors in every domain: acc {yes['acc']}, "
            f"acc_mi {yes['acc_mi']} ({res['seconds']:.1f} s)\n")
    return text, res
