"""`z2all tokenizer eval`: bytes/token and chars/token per domain (zh, en, code), plus a round-trip check.

    z2all tokenizer eval runs/tok                       # ours vs an HF BpeTrainer twin vs gpt2/cl100k/o200k
    z2all tokenizer eval runs/tok other/tok --no-baseline --corpora path/to/jsonl_dir
    z2all tokenizer eval runs/tok --references ~/tiktoken-files   # where the reference rank files lie

Rows: every tokenizer directory given; the "HF twin" of the first one (tokenizers' BpeTrainer with the same
split pattern, vocabulary size and min_frequency, trained on the same inputs, read from the directory's
provenance file); and the reference tokenizers GPT-2, GPT-4 (cl100k_base) and GPT-4o (o200k_base) through
tiktoken. Higher bytes/token = better compression. Every row that cannot be made is named under the table
with the reason (no tiktoken, no rank file, a rank file that is not the published one, no provenance).

Reference files are never downloaded here. `--references DIR` (default ../shared/reference_tokenizers)
holds tiktoken's published rank files, as fetched once by hand from
https://openaipublic.blob.core.windows.net/encodings/: `r50k_base.tiktoken` (GPT-2's ranks; also accepted
as `gpt2.tiktoken`), `cl100k_base.tiktoken`, `o200k_base.tiktoken` (docs/install.md). Each is checked
against the sha256 tiktoken itself expects; the split pattern and special tokens come from the installed
tiktoken (or from a `<name>.json` beside the rank file: {"pat_str", "special_tokens"}). `--references none`
leaves the rows out.

Eval text: held-out documents (every `holdout_every`-th document of each file, up to `max_chars` per
domain) of the corpus files in `--corpora`; by default ../shared/corpora next to the repository when it
exists, otherwise the demo corpus embedded in the package (z2all/data/demo). A file's domain is its name
prefix: zh_*, en_*, code_*. When a tokenizer's provenance lists an eval file among its training inputs
(same path, or same size and head/tail hash) the held-out documents were seen in training; a warning
says so (its rows flatter it; the twin trained on the same inputs, so ours vs twin stays fair). When the
twin's training inputs are not on disk it trains on the other (non-held-out) documents of the eval corpus,
and the table says so.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from z2all.config import opt
from z2all.io import fingerprint
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
    references: str = opt("", "directory of tiktoken's published rank files r50k_base.tiktoken (or gpt2."
                          "tiktoken), cl100k_base.tiktoken, o200k_base.tiktoken (default: ../shared/"
                          "reference_tokenizers, rows skipped with a note when absent; 'none': leave them out)")
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
    tok = hf.read_tokenizer_json(path, option="tokenizer")
    enc = lambda docs: [e.ids for e in tok.encode_batch(docs, add_special_tokens=False)]
    row = _stats(enc, lambda ids: tok.decode(ids, skip_special_tokens=False), held)
    row["vocab"] = tok.get_vocab_size()
    return row


# reference rows: (row name, tiktoken_ext.openai_public constructor, accepted file names)
REFERENCES = (("gpt2", "r50k_base", ("r50k_base", "gpt2")), ("cl100k_base", "cl100k_base", ("cl100k_base",)),
              ("o200k_base", "o200k_base", ("o200k_base",)))


def _tiktoken_spec(constructor: str) -> dict:
    """pat_str, special_tokens and the rank file's expected sha256 of one of tiktoken's encodings, read from
    the installed tiktoken without letting it fetch anything (its loader is swapped for a recorder)."""
    from tiktoken_ext import openai_public as op

    seen: dict = {}

    def record(url, expected_hash=None, *a, **k):
        seen["sha256"] = expected_hash
        return {}

    saved = op.load_tiktoken_bpe
    op.load_tiktoken_bpe = record
    try:
        spec = getattr(op, constructor)()
    finally:
        op.load_tiktoken_bpe = saved
    return {"pat_str": spec["pat_str"], "special_tokens": spec["special_tokens"], "sha256": seen.get("sha256")}


def _load_ranks(data: bytes) -> dict[bytes, int]:
    """A .tiktoken file: one `base64(token) rank` per line (parsed here: tiktoken's own loader would
    cache a copy of a local file under /tmp, keyed by its path)."""
    ranks = {}
    for line in data.splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def eval_reference(name: str, ref_dir: Path, held: dict[str, list[str]]) -> tuple[dict | None, str]:
    """(row, "") or (None, why it was skipped)."""
    _, constructor, files = next(r for r in REFERENCES if r[0] == name)
    ranks_path = next((ref_dir / f"{f}.tiktoken" for f in files if (ref_dir / f"{f}.tiktoken").exists()), None)
    if ranks_path is None:
        return None, f"no {' or '.join(f + '.tiktoken' for f in files)} in {ref_dir}"
    try:
        import tiktoken
    except ImportError:
        return None, "tiktoken is not installed (pip install tiktoken)"
    meta_path = ranks_path.with_suffix(".json")
    spec: dict = {}
    try:
        spec = _tiktoken_spec(constructor)
    except (ImportError, AttributeError, KeyError, TypeError):  # another tiktoken layout: a .json must say
        pass
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            spec.update(pat_str=meta["pat_str"], special_tokens=meta.get("special_tokens", {}))
        except (ValueError, KeyError) as e:
            return None, f"{meta_path}: not a {{\"pat_str\", \"special_tokens\"}} JSON object ({e})"
    if "pat_str" not in spec:
        return None, f"this tiktoken has no {constructor} definition and there is no {meta_path.name}"
    data = ranks_path.read_bytes()
    if spec.get("sha256") and hashlib.sha256(data).hexdigest() != spec["sha256"]:
        return None, f"{ranks_path} is not tiktoken's published {constructor}.tiktoken (sha256 differs)"
    enc = tiktoken.Encoding(name, pat_str=spec["pat_str"], mergeable_ranks=_load_ranks(data),
                            special_tokens=spec["special_tokens"])
    row = _stats(lambda docs: enc.encode_ordinary_batch(docs), enc.decode, held)
    row["vocab"] = enc.n_vocab
    return row, ""


def _twin(path: Path, train_docs: list[str], twin_max_chars: int) -> tuple[Path | None, str]:
    """Train the HF BpeTrainer twin of tokenizer dir `path` into a temp dir; returns (its directory, a note:
    why there is none, or that it did not train on `path`'s own inputs)."""
    prov_path = path / hf.PROVENANCE
    if not prov_path.exists():
        return None, f"no HF twin: {path} has no {hf.PROVENANCE} (not written by `z2all tokenizer train`)"
    prov = json.loads(prov_path.read_text())
    cfg = prov["config"]
    if cfg.get("backend") == "spm":
        return None, f"no HF twin: {path} is a sentencepiece tokenizer (the twin is a byte-level BPE)"
    tmp = Path(tempfile.mkdtemp(prefix="z2all-twin-"))
    inputs = [p for p in prov.get("inputs", []) if Path(p).exists()]
    note = ""
    if not inputs:  # train on the eval corpus' training split
        f = tmp / "train.jsonl"
        f.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in train_docs), "utf-8")
        inputs = [str(f)]
        note = (f"the HF twin trained on the eval corpus' non-held-out documents: {path.name}'s training inputs "
                f"are not on disk, so the twin row is not a same-data comparison")
    tc = TrainConfig(inputs=inputs, out_dir=str(tmp / "tok"), backend="hf", vocab_size=cfg["vocab_size"],
                     pattern=cfg.get("pattern", "z2all"),  # tokenizers from before --pattern used ours
                     han_chunk=cfg["han_chunk"], min_frequency=cfg["min_frequency"],
                     special_tokens=cfg["special_tokens"], text_field=cfg["text_field"],
                     max_chars=twin_max_chars or cfg["max_chars"])
    train_tokenizer(tc)
    return tmp / "tok", note


def _identity(path: Path) -> tuple[int, str] | None:
    """Content identity for the overlap check: size and head/tail hash (not the mtime: a copy counts)."""
    try:
        fp = fingerprint(path)
    except OSError:
        return None
    return fp["size"], fp["head_tail_sha256"]


def training_overlap(tok_dir: Path, eval_files: list[Path]) -> tuple[list[Path], bool]:
    """(eval files that were among the tokenizer's training inputs, whether its inputs could be checked)."""
    prov_path = tok_dir / hf.PROVENANCE
    if not prov_path.exists():
        return [], False
    inputs = [Path(p) for p in json.loads(prov_path.read_text()).get("inputs", [])]
    present = [p for p in inputs if p.exists()]
    paths = {p.resolve() for p in present}
    ids = {i for i in map(_identity, present) if i is not None}
    hits = [f for f in eval_files if f.resolve() in paths or _identity(f) in ids]
    return hits, bool(present)


def evaluate(cfg: Config) -> tuple[list[str], list[list], list[str]]:
    """(table headers, rows, notes: skipped rows and overlap warnings, one line each)."""
    if cfg.holdout_every < 2:
        raise UserError(f"--holdout-every must be >= 2 (every N-th document is held out, the rest trains), got "
                        f"{cfg.holdout_every}")
    corpora = Path(cfg.corpora) if cfg.corpora else default_corpora()
    files = corpus_files(corpora)
    held, train_docs = split_docs(files, cfg.holdout_every, cfg.max_chars)
    rows: list[tuple[str, dict]] = []
    notes: list[str] = []
    for d in cfg.tokenizers:
        p = Path(d)
        if not (p / "tokenizer.json").exists():
            raise UserError(f"{p}: no tokenizer.json here; pass a directory written by `z2all tokenizer train`")
        prov = p / hf.PROVENANCE
        backend = json.loads(prov.read_text())["config"]["backend"] if prov.exists() else "?"
        rows.append((f"{p.name} ({backend})", eval_tokenizer_dir(p, held)))
        hits, checked = training_overlap(p, files)
        if hits:
            notes.append(f"warning: {p.name} was trained on {', '.join(f.name for f in hits)}, the files the eval "
                         f"text is held out from: those documents were seen in training, so its row flatters it "
                         f"(the HF twin trained on the same inputs, so the two stay comparable). Use --corpora "
                         f"with text it did not train on")
        elif not checked:
            notes.append(f"could not check whether {p.name} trained on the eval text: "
                         + ("its training inputs are not on disk" if prov.exists() else f"no {hf.PROVENANCE}"))
    if cfg.baseline and cfg.tokenizers:
        twin, note = _twin(Path(cfg.tokenizers[0]), train_docs, cfg.twin_max_chars)
        if note:
            notes.append(note)
        if twin is not None:
            rows.append((f"HF BpeTrainer twin of {Path(cfg.tokenizers[0]).name}", eval_tokenizer_dir(twin, held)))
            shutil.rmtree(twin.parent, ignore_errors=True)
    if cfg.references.lower() != "none":
        ref_dir = Path(cfg.references) if cfg.references else default_references()
        if cfg.references and not ref_dir.is_dir():
            raise UserError(f"--references {ref_dir}: not a directory; give the directory holding "
                            f"r50k_base.tiktoken, cl100k_base.tiktoken, o200k_base.tiktoken (docs/install.md), "
                            f"or --references none")
        if not ref_dir.is_dir():
            notes.append(f"skipped gpt2, cl100k_base, o200k_base: no {ref_dir}; put tiktoken's published rank "
                         f"files in a directory and pass --references DIR (docs/install.md)")
        else:
            for name, _, _ in REFERENCES:
                row, why = eval_reference(name, ref_dir, held)
                if row is None:
                    notes.append(f"skipped {name}: {why}")
                else:
                    rows.append((f"{name} (tiktoken)", row))
    headers = ["tokenizer", "vocab"]
    doms = [d for d in DOMAINS if held[d]]
    for d in doms:
        headers += [f"{d} bytes/tok", f"{d} chars/tok"]
    headers += ["all bytes/tok", "round trip"]
    table = []
    for name, r in rows:  # unrounded: markdown_table prints 3 significant digits, tests compare exactly
        line = [name, r["vocab"]]
        for d in doms:
            line += [r[d][0], r[d][1]]
        line += [r["all"], r["round_trip"]]
        table.append(line)
    sizes = ", ".join(f"{d} {sum(len(t) for t in held[d]):,} chars" for d in doms)
    print0(f"held-out text from {corpora} (every {cfg.holdout_every}th doc): {sizes}")
    return headers, table, notes


def run(cfg: Config) -> int:
    if not cfg.tokenizers:
        raise UserError("give at least one tokenizer directory, e.g. `z2all tokenizer eval runs/tokenizer`")
    headers, table, notes = evaluate(cfg)
    print0(markdown_table(headers, table))
    for note in notes:
        print0(note)
    return 0
