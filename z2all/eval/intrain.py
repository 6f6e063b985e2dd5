"""Evaluation inside the training loop: bits per byte per domain and the "which continuation?" accuracy per
domain at every evaluation of `z2all train` (and of any objective whose eval section has these options),
so a run's curves say more than one validation loss in nats per token.

    z2all train --config configs/demo_cpu.toml --eval.bpb_max_tokens=4096 --eval.tasks_max_items=32
    z2all train ... --eval.heldout=runs/demo/tokens --eval.texts=law=law.jsonl --eval.bpb_max_tokens=20000
    z2all plot runs/demo/train        # -> heldout.png: a panel per metric family, a line per domain

Options (`HeldoutEvalOptions`, mixed into the objective's eval section); both scores are off by default:
  eval.bpb_max_tokens   bits per byte per domain on at most this many tokens (whole documents); 0 = off
  eval.tasks_max_items  "which continuation?" items per domain (4 choices each); 0 = off
  eval.heldout          the `z2all data tokenize` output whose held-out (val-split) documents are the domains;
                        '' = the training token files (`z2all train`); SFT/DPO must name one
  eval.texts            more domains as NAME=PATH (.txt = one document, .jsonl = one per line)
  eval.heldout_max_docs held-out documents kept per domain

Why off by default: the documents come from the converted shards that the token directory's meta.json
names, read once at the start (a full JSON pass over them on rank 0): cheap for the demo corpus, minutes
for a large corpus whose shards may not even be on the training machine. With a bound it costs about
what the validation loss costs: on the demo model, bits per byte on 4,096 tokens per domain ~ the
demo's 10-batch validation loss (~2.3 s CPU each), an item ~50 ms CPU (docs/performance.md).

What is logged, per evaluation, as one {"kind": "heldout", "step": N, ...} record of metrics.jsonl (nested
by domain; TensorBoard gets `<family>/<domain>` scalars):
  bpb {domain: bits per byte}, unigram_bpb {domain: the train split's unigram in the same units, a constant
  reference}, bpb_tokens {domain: tokens scored}, continuation_acc / continuation_acc_norm /
  continuation_acc_mi {domain} (lm-eval's acc, acc_norm and acc_mutual_info: the last credits what the context
  adds over each span's own likelihood, the sharper signal on this set), continuation_items {domain},
  chance (1 / choices), heldout_s (seconds the scoring took).

The items: up to 8 per held-out document (tasks.continuation_items per_doc), the first tasks_max_items in
offset-major order, seed 1234: the record equals what `z2all eval --ckpt <checkpoint of that step> --heldout DIR
--per_doc 8 --limit N --max_tokens M --window <data.seq_len>` reports (a test checks it).

Determinism: the documents, the items (their own seeded random.Random) and the scoring (eval mode, no
dropout, no sampling) touch no global RNG and no data loader, so a resumed run logs the same numbers and
trains on the same batches. Rank 0 scores with the single-device model (DDP replicas hold the same weights);
under FSDP2 every rank would have to join each forward, so the scores are skipped there (said once at the
start). Windows are the training sequence length (data.seq_len), not the model's max_seq_len, so the scores
are those of the contexts the model trains on (on the demo, 256-token windows gave 0.1-0.3% lower bits
per byte than its 128-token rows).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from z2all.config import opt
from z2all.utils import UserError

N_CHOICES = 4
PER_DOC = 8  # continuation items per document at most (as demo_report): small corpora hold out few documents
UNIGRAM_MAX_TOKENS = 50_000_000  # bincount of 50M uint16 tokens: ~0.3 s, once at the start


@dataclass
class HeldoutEvalOptions:
    """The in-training held-out scores' options (a base of the objectives' eval sections)."""
    bpb_max_tokens: int = opt(0, "bits per byte per domain at each evaluation, on at most this many held-out tokens "
                              "per domain (whole documents); 0 = off")
    tasks_max_items: int = opt(0, "'which continuation?' items per domain scored at each evaluation (4 choices, "
                               "log-likelihood; chance 0.25); 0 = off")
    heldout: str = opt("", "a `z2all data tokenize` output whose held-out documents are the domains of "
                       "eval.bpb_max_tokens / eval.tasks_max_items; '' = the training token files (z2all train)")
    texts: list[str] = opt(help="more domains for the held-out scores, as NAME=PATH (.txt = one document, "
                           ".jsonl = one per line)", factory=list)
    heldout_max_docs: int = opt(200, "held-out documents kept per domain (read once at the start)")


def enabled(opts) -> bool:
    return bool(getattr(opts, "bpb_max_tokens", 0) or getattr(opts, "tasks_max_items", 0))


def validate_options(opts) -> None:
    """One UserError naming the option, for a value the scores cannot use (every rank calls it)."""
    for key in ("bpb_max_tokens", "tasks_max_items"):
        if getattr(opts, key, 0) < 0:
            raise UserError(f"--eval.{key}={getattr(opts, key)}: must be >= 0 (0 = off)")
    if getattr(opts, "heldout_max_docs", 1) <= 0:
        raise UserError(f"--eval.heldout_max_docs={opts.heldout_max_docs}: must be positive")
    for spec in getattr(opts, "texts", None) or []:
        name, sep, path = spec.partition("=")
        if not (sep and name.strip() and path.strip()):
            raise UserError(f"--eval.texts '{spec}' must look like NAME=PATH")


class HeldoutEval:
    """The documents and items, built once; `__call__(model, autocast)` scores them (rank 0)."""

    def __init__(self, domains: dict[str, list[str]], tokenizer, bpb_max_tokens: int, tasks_max_items: int,
                 window: int, unigram=None, seed: int = 1234, batch_size: int = 8):
        from z2all.eval import tasks

        self.domains, self.tok, self.window, self.unigram = domains, tokenizer, window, unigram
        self.bpb_max_tokens, self.batch_size = bpb_max_tokens, batch_size
        self.items: dict[str, list] = {}
        if tasks_max_items:
            for dom, docs in sorted(domains.items()):
                items = tasks.continuation_items(docs, N_CHOICES, seed=seed, max_items=tasks_max_items,
                                                 where=f"{dom} held-out", per_doc=PER_DOC)
                if items:
                    self.items[dom] = items

    def describe(self) -> str:
        parts = []
        if self.bpb_max_tokens:
            parts.append(f"bits per byte on <= {self.bpb_max_tokens:,} tokens per domain")
        if self.items:
            parts.append(f"'which continuation?' on {sum(map(len, self.items.values()))} items")
        return (f"held-out scores at each evaluation: {' and '.join(parts) or 'nothing to score'} "
                f"({', '.join(f'{d}: {len(v)} docs' for d, v in sorted(self.domains.items()))}; windows of "
                f"{self.window} tokens)")

    def __call__(self, model, autocast) -> dict:
        """The record's fields (see the module docstring). `model` is the single-device module."""
        import torch

        from z2all.eval import score

        t0 = time.perf_counter()
        rec: dict = {}
        with torch.no_grad(), autocast:
            if self.bpb_max_tokens:
                res = score.bpb_per_domain(model, self.tok, self.domains, self.bpb_max_tokens, self.batch_size,
                                           self.unigram, window=self.window)
                rec["bpb"] = {d: r["bpb"] for d, r in res.items() if r["bytes"]}
                rec["unigram_bpb"] = {d: r["unigram_bpb"] for d, r in res.items() if "unigram_bpb" in r}
                rec["bpb_tokens"] = {d: r["tokens"] for d, r in res.items() if r["bytes"]}
            if self.items:
                was_training = model.training
                model.eval()
                try:
                    lm = score.LM(model, self.tok, "training", "", context=self.window)
                    acc, acc_norm, acc_mi, n = {}, {}, {}, {}
                    for dom, items in self.items.items():
                        k = k_norm = k_mi = m = 0
                        uncond = score.unconditional_loglikelihoods(lm, items, self.batch_size)
                        for it, r, u in zip(items, score.loglikelihoods(lm, items, self.batch_size), uncond):
                            if r is None or u is None:
                                continue
                            ll = [x[0] for x in r]
                            pred, pred_norm, _ = score.choose(ll, it.choices)
                            k += pred == it.gold
                            k_norm += pred_norm == it.gold
                            k_mi += score.choose_mutual_info(ll, [x[0] for x in u]) == it.gold
                            m += 1
                        if m:
                            acc[dom], acc_norm[dom], acc_mi[dom], n[dom] = k / m, k_norm / m, k_mi / m, m
                finally:
                    model.train(was_training)
                rec.update(continuation_acc=acc, continuation_acc_norm=acc_norm, continuation_acc_mi=acc_mi,
                           continuation_items=n, chance=1.0 / N_CHOICES)
        rec["heldout_s"] = round(time.perf_counter() - t0, 3)
        return rec


def summary(rec: dict) -> str:
    """One log line: `held-out: bpb zh 1.234 (unigram 2.345) ... | continuation acc zh 0.41 ... (chance 0.25)`."""
    parts = []
    if rec.get("bpb"):
        uni = rec.get("unigram_bpb", {})
        parts.append("bpb " + ", ".join(f"{d} {v:.3f}" + (f" (unigram {uni[d]:.3f})" if d in uni else "")
                                        for d, v in rec["bpb"].items()))
    if rec.get("continuation_acc"):
        mi = rec.get("continuation_acc_mi", {})
        parts.append("continuation acc " + ", ".join(f"{d} {v:.2f}" + (f"/{mi[d]:.2f}" if d in mi else "")
                                                      for d, v in rec["continuation_acc"].items())
                     + f" (acc/acc_mi; chance {rec['chance']:.2f})")
    return f"  held-out: {' | '.join(parts) or 'nothing scored'} ({rec['heldout_s']:.1f} s)"


def build(opts, default_dir: str | Path | None, tokenizer_dir: str | Path | None, window: int,
          seed: int = 1234) -> HeldoutEval | None:
    """The HeldoutEval the options ask for, or None when both scores are off. Reads the documents and the
    tokenizer; a missing input is one UserError naming the option."""
    if not enabled(opts):
        return None
    from z2all.eval import run, tasks
    from z2all.model.generate import load_tokenizer

    validate_options(opts)
    if tokenizer_dir is None or not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        raise UserError("--eval.bpb_max_tokens / --eval.tasks_max_items need the tokenizer, but the token files' "
                        "meta.json names none that exists; set both to 0")
    src = opts.heldout or (str(default_dir) if default_dir else "")
    domains: dict[str, list[str]] = {}
    if src:
        domains.update(tasks.heldout_docs(src, opts.heldout_max_docs,
                                          option="--eval.heldout" if opts.heldout else "--data.dir"))
    for spec in opts.texts:
        name, _, path = spec.partition("=")
        docs = [d for d in run._read_texts(name.strip(), Path(path.strip())) if d.strip()]
        if not docs:
            raise UserError(f"--eval.texts {spec}: no text in it (a .jsonl line needs a text or content field)")
        domains.setdefault(name.strip(), []).extend(docs[:opts.heldout_max_docs])
    if not domains:
        raise UserError("--eval.bpb_max_tokens / --eval.tasks_max_items: no documents to score; give "
                        "--eval.heldout TOKENS_DIR or --eval.texts NAME=PATH")
    tok = load_tokenizer(Path(tokenizer_dir))
    tok.model_max_length = 1 << 62  # documents are windowed here; silences transformers' length warning
    unigram = None
    if src and opts.bpb_max_tokens:
        unigram = run.unigram_counts(src, tokenizer_dir, UNIGRAM_MAX_TOKENS)
    return HeldoutEval(domains, tok, opts.bpb_max_tokens, opts.tasks_max_items, window, unigram, seed)
