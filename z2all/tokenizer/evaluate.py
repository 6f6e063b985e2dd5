"""`z2all tokenizer eval`: bytes/token and chars/token per domain (zh, en, code), plus a round-trip check.

    z2all tokenizer eval runs/tok                       # ours vs an HF BpeTrainer twin vs gpt2/cl100k/o200k
    z2all tokenizer eval runs/tok other/tok --no-baseline --corpora path/to/jsonl_dir

Rows: every tokenizer directory given; the "HF twin" of the first one (tokenizers' BpeTrainer with the same
split pattern, vocabulary size and min_frequency, trained on the same inputs, read from the directory's
provenance file); and the reference tokenizers (tiktoken rank files in `--references`, skipped when
absent). Higher bytes/token = better compression.

Eval text: held-out documents (every `holdout_every`-th document of each file, up to `max_chars` per
domain) of the corpus files in `--corpora`; by default ../shared/corpora next to the repository when it
exists, otherwise the demo corpus embedded in the package (z2all/data/demo). A file's domain is its name
prefix: zh_*, en_*, code_*. When the twin's training inputs are not on disk it trains on the other
(non-held-out) documents of the eval corpus.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from z2all.config import opt
from z2all.tokenizer import hf
from z2all.tokenizer.train import Config as TrainConfig
from z2all.tokenizer.train import input_format, read_texts, train_tokenizer
from z2all.utils import UserError, markdown_table, print0

DOMAINS = ("zh", "en", "code")
_REPO = Path(__file__).resolve().parents[2]
DEMO_DIR = Path(__file__).resolve().parents[1] / "data" / "demo"


def default_corpora() -> Path:
    shared = _REPO.parent / "shared" / "corpora"
    return shared if shared.is_dir() else DEMO_DIR


def default_references() -> Path:
    return _REPO.parent / "shared" / "reference_tokenizers"


@dataclass
class Config:
    tokenizers: list[str] = opt(factory=list, help="tokenizer directories to evaluate (comma separated)",
                                positional=True)
    corpora: str = opt("", "directory of zh_*/en_*/code_* corpus files (default: ../shared/corpora if present, "
                       "else the embedded demo corpus)")
    references: str = opt("", "directory of reference .tiktoken/.json files (default: ../shared/"
                          "reference_tokenizers; skipped when absent)")
    baseline: bool = opt(True, "also train and evaluate an HF BpeTrainer twin of the first tokenizer")
    holdout_every: int = opt(10, "every N-th document of each corpus file is held out for evaluation")
    max_chars: int = opt(300_000, "held-out characters per domain")
    twin_max_chars: int = opt(0, "cap on the twin's training text (0 = what the tokenizer's provenance says)")


def domain_of(path: Path) -> str | None:
    name = path.name.lower()
    return next((d for d in DOMAINS if name.startswith(d + "_") or name.startswith(d + "-")), None)


def corpus_files(corpora: Path) -> list[Path]:
    if not corpora.is_dir():
        raise UserError(f"--corpora {corpora}: not a directory")
    files = sorted(f for f in corpora.iterdir() if f.is_file() and input_format(f) and domain_of(f))
    if not files:
        raise UserError(f"--corpora {corpora}: no zh_*/en_*/code_* .jsonl/.parquet/.txt files")
    return files


def split_docs(files: list[Path], every: int, max_chars: int) -> tuple[dict[str, list[str]], list[str]]:
    """(held-out docs per domain, up to max_chars each; the remaining docs for training a twin)."""
    held: dict[str, list[str]] = {d: [] for d in DOMAINS}
    size = dict.fromkeys(DOMAINS, 0)
    train: list[str] = []
    for f in files:
        dom = domain_of(f)
        for i, text in enumerate(read_texts(f)):
            if not text:
                continue
            if i % every == every - 1:
                if size[dom] < max_chars:
                    t = text[: max_chars - size[dom]]
                    held[dom].append(t)
                    size[dom] += len(t)
            else:
                train.append(text)
    return held, train


def _stats(encode_batch, decode, held: dict[str, list[str]]) -> dict:
    row = {}
    nb_all = nt_all = 0
    bad = 0
    for dom, docs in held.items():
        if not docs:
            continue
        ids = encode_batch(docs)
        nt = sum(len(x) for x in ids)
        nb = sum(len(d.encode("utf-8")) for d in docs)
        nc = sum(len(d) for d in docs)
        row[dom] = (nb / max(1, nt), nc / max(1, nt))
        nb_all += nb
        nt_all += nt
        if decode is not None:
            bad += sum(decode(x) != d for x, d in zip(ids, docs))
    row["all"] = nb_all / max(1, nt_all)
    row["round_trip"] = "n/a" if decode is None else ("ok" if bad == 0 else f"{bad} docs differ")
    return row


def eval_tokenizer_dir(path: str | Path, held: dict[str, list[str]]) -> dict:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
    enc = lambda docs: [e.ids for e in tok.encode_batch(docs, add_special_tokens=False)]
    row = _stats(enc, lambda ids: tok.decode(ids, skip_special_tokens=False), held)
    row["vocab"] = tok.get_vocab_size()
    return row


def eval_reference(name: str, ref_dir: Path, held: dict[str, list[str]]) -> dict | None:
    meta_path, ranks_path = ref_dir / f"{name}.json", ref_dir / f"{name}.tiktoken"
    if not (meta_path.exists() and ranks_path.exists()):
        return None
    try:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe
    except ImportError:
        return None
    meta = json.loads(meta_path.read_text())
    enc = tiktoken.Encoding(name, pat_str=meta["pat_str"], mergeable_ranks=load_tiktoken_bpe(str(ranks_path)),
                            special_tokens=meta.get("special_tokens", {}))
    row = _stats(lambda docs: enc.encode_ordinary_batch(docs), enc.decode, held)
    row["vocab"] = enc.n_vocab
    return row


def _twin(path: Path, train_docs: list[str], twin_max_chars: int) -> Path | None:
    """Train the HF BpeTrainer twin of tokenizer dir `path` into a temp dir; returns its directory."""
    prov_path = path / hf.PROVENANCE
    if not prov_path.exists():
        return None
    prov = json.loads(prov_path.read_text())
    cfg = prov["config"]
    if cfg.get("backend") == "spm":
        return None
    tmp = Path(tempfile.mkdtemp(prefix="z2all-twin-"))
    inputs = [p for p in prov.get("inputs", []) if Path(p).exists()]
    if not inputs:  # train on the eval corpus' training split
        f = tmp / "train.jsonl"
        f.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in train_docs), "utf-8")
        inputs = [str(f)]
    tc = TrainConfig(inputs=inputs, out_dir=str(tmp / "tok"), backend="hf", vocab_size=cfg["vocab_size"],
                     han_chunk=cfg["han_chunk"], min_frequency=cfg["min_frequency"],
                     special_tokens=cfg["special_tokens"], text_field=cfg["text_field"],
                     max_chars=twin_max_chars or cfg["max_chars"])
    train_tokenizer(tc)
    return tmp / "tok"


def evaluate(cfg: Config) -> tuple[list[str], list[list]]:
    corpora = Path(cfg.corpora) if cfg.corpora else default_corpora()
    files = corpus_files(corpora)
    held, train_docs = split_docs(files, max(2, cfg.holdout_every), cfg.max_chars)
    rows: list[tuple[str, dict]] = []
    for d in cfg.tokenizers:
        p = Path(d)
        if not (p / "tokenizer.json").exists():
            raise UserError(f"{p}: no tokenizer.json here; pass a directory written by `z2all tokenizer train`")
        prov = p / hf.PROVENANCE
        backend = json.loads(prov.read_text())["config"]["backend"] if prov.exists() else "?"
        rows.append((f"{p.name} ({backend})", eval_tokenizer_dir(p, held)))
    if cfg.baseline and cfg.tokenizers:
        twin = _twin(Path(cfg.tokenizers[0]), train_docs, cfg.twin_max_chars)
        if twin is not None:
            rows.append((f"HF BpeTrainer twin of {Path(cfg.tokenizers[0]).name}", eval_tokenizer_dir(twin, held)))
            shutil.rmtree(twin.parent, ignore_errors=True)
    ref_dir = Path(cfg.references) if cfg.references else default_references()
    if ref_dir.is_dir():
        for name in ("gpt2", "cl100k_base", "o200k_base"):
            row = eval_reference(name, ref_dir, held)
            if row is not None:
                rows.append((f"{name} (tiktoken)", row))
    headers = ["tokenizer", "vocab"]
    doms = [d for d in DOMAINS if held[d]]
    for d in doms:
        headers += [f"{d} bytes/tok", f"{d} chars/tok"]
    headers += ["all bytes/tok", "round trip"]
    table = []
    for name, r in rows:
        line = [name, r["vocab"]]
        for d in doms:
            line += [round(r[d][0], 3), round(r[d][1], 3)]
        line += [round(r["all"], 3), r["round_trip"]]
        table.append(line)
    sizes = ", ".join(f"{d} {sum(len(t) for t in held[d]):,} chars" for d in doms)
    print0(f"held-out text from {corpora} (every {cfg.holdout_every}th doc): {sizes}")
    return headers, table


def run(cfg: Config) -> int:
    if not cfg.tokenizers:
        raise UserError("give at least one tokenizer directory, e.g. `z2all tokenizer eval runs/tokenizer`")
    headers, table = evaluate(cfg)
    print0(markdown_table(headers, table))
    return 0
