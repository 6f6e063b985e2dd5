"""`z2all bench eval`: multiple-choice scoring items/s, ours (`z2all.eval.score.loglikelihoods`) against
lm-evaluation-harness's `hf` backend (HFLM), on the same items, the same weights (ours exported with
`export_hf`) and the same machine, in one process.

    z2all bench eval                                   # tiny random model, demo-corpus items, CPU
    z2all bench eval --ckpt runs/demo/train/checkpoints/step-400 --items 128 --batch-size 16

Items: the "which continuation?" set (z2all.eval.tasks) built from the embedded demo corpus (zh, en and
code documents, 4 choices, ~400-byte contexts), so every choice is a multi-token continuation. Without
--ckpt the model is the `tiny` preset with random weights and a byte-level BPE trained here on the same
corpus (speed does not depend on the weights). Both sides get the same rows per forward pass: lm-eval
`batch_size` = --batch-size rows, ours = --batch-size / n_choices questions (each question's context runs
once, then its choices). Each timed round is one whole `loglikelihood` call including tokenization;
rounds alternate, best-of-N is reported, medians below. The log-likelihoods are compared too.

Needs the optional extra: pip install 'llm-zero2all[lmeval]'.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from z2all.bench import machine_name, markdown_table
from z2all.config import opt, save_config
from z2all.utils import UserError, pick_device, pick_dtype, print0


@dataclass
class Config:
    ckpt: str = opt("", "checkpoint (ours, with tokenizer/) to measure; default: a random `tiny` model")
    items: int = opt(64, "multiple-choice items (questions)")
    n_choices: int = opt(4, "choices per item")
    batch_size: int = opt(16, "rows per forward pass (lm-eval's batch_size; ours: batch_size / n_choices questions)")
    rounds: int = opt(3, "timed rounds per side, alternating")
    device: str = opt("cpu", "device to run on")
    dtype: str = opt("fp32", "dtype for both sides", choices=("fp32", "bf16", "fp16"))
    threads: int = opt(0, "torch intra-op threads (0 = torch's default)")
    seed: int = opt(0, "seed for the random model and the items")
    out: str = opt("", "also write report.md and config.json here")


def _items(n: int, n_choices: int, seed: int):
    from z2all.demo import DEMO_DIR
    from z2all.eval.tasks import continuation_items
    from z2all.tokenizer.train import read_texts

    items = []
    for name in ("zh_wiki.jsonl.gz", "en_wiki.parquet", "code_python.jsonl.gz"):
        docs = []
        for t in read_texts(DEMO_DIR / name):
            if len(t) > 800:
                docs.append(t[:2000])
            if len(docs) >= n // 3 + n_choices + 2:
                break
        items += continuation_items(docs, n_choices, seed=seed, where=name)[:n // 3 + 1]
    return items[:n]


def _tokenizer_dir(path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from z2all.demo import DEMO_DIR
    from z2all.tokenizer.train import read_texts

    texts = []
    for name in ("zh_wiki.jsonl.gz", "en_wiki.parquet", "code_python.jsonl.gz"):
        for i, t in enumerate(read_texts(DEMO_DIR / name)):
            texts.append(t)
            if i >= 200:
                break
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=4096, special_tokens=["<|endoftext|>"],
                                                       show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
                            ).save_pretrained(str(path))
    return path


def _lm_eval_can_score(lm, item) -> bool:
    from z2all.eval.score import split_pair

    ctx = lm.encode_default(split_pair(item.context, "")[0])
    return all(len(lm.encode_default("".join(split_pair(item.context, c)))) > len(ctx) for c in item.continuations)


def run(cfg: Config) -> int:
    try:
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise UserError(f"z2all bench eval needs lm-eval with its hf backend ({e}); "
                        f"pip install 'llm-zero2all[lmeval]'") from None
    from transformers.utils import logging as hf_logging

    from z2all.eval import score
    from z2all.model.hf_compat import export_hf

    out_dir = None
    if cfg.out:
        from z2all.io import claim_output_dir

        out_dir = claim_output_dir(cfg.out, "bench eval")
    hf_logging.set_verbosity_error()
    threads = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    try:
        with tempfile.TemporaryDirectory(prefix="z2all-bench-eval-") as tmp:
            tmp = Path(tmp)
            if cfg.ckpt:
                ckpt = Path(cfg.ckpt)
            else:
                from z2all.model.config import model_preset
                from z2all.model.llama import Z2all, save_model

                tok_dir = _tokenizer_dir(tmp / "tok")
                from transformers import AutoTokenizer

                n = len(AutoTokenizer.from_pretrained(str(tok_dir)))
                torch.manual_seed(cfg.seed)
                ckpt = save_model(Z2all(model_preset("tiny", vocab_size=n + (-n) % 64)), tmp / "ckpt")
                import shutil

                shutil.copytree(tok_dir, ckpt / "tokenizer")
            hf_dir = export_hf(ckpt, tmp / "hf")
            ours = score.load_lm(ckpt, None, device, dtype)
            theirs = HFLM(pretrained=str(hf_dir), device=str(device), batch_size=cfg.batch_size,
                          dtype={torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype])
            items = _items(cfg.items + cfg.items // 4, cfg.n_choices, cfg.seed)
            # lm-eval asserts (crashes) when the joint encoding leaves a choice no token of its own; we fall
            # back to the choice's own encoding. Keep only items both sides can score.
            items = [it for it in items if _lm_eval_can_score(ours, it)][:cfg.items]
            reqs = [Instance(request_type="loglikelihood", doc={}, arguments=(it.context, c), idx=j)
                    for it in items for j, c in enumerate(it.continuations)]
            q_batch = max(1, cfg.batch_size // cfg.n_choices)

            def side(name: str):
                t0 = time.perf_counter()
                if name == "ours":
                    res = score.loglikelihoods(ours, items, q_batch)
                    lls = [x[0] for r in res for x in r]
                else:
                    lls = [x[0] for x in theirs.loglikelihood(reqs, disable_tqdm=True)]
                if device.type == "cuda":
                    torch.cuda.synchronize()
                return time.perf_counter() - t0, lls

            side("ours"), side("lm-eval")  # warm-up
            times: dict[str, list[float]] = {"ours": [], "lm-eval": []}
            lls = {}
            for _ in range(cfg.rounds):
                for name in times:
                    dt, lls[name] = side(name)
                    times[name].append(dt)
            n_params = ours.model.num_params()
    finally:
        torch.set_num_threads(threads)
    diff = max(abs(a - b) for a, b in zip(lls["ours"], lls["lm-eval"]))
    k = cfg.n_choices
    pick = {s: [max(range(k), key=lambda j, i=i: v[i * k + j]) for i in range(len(items))] for s, v in lls.items()}
    same = sum(a == b for a, b in zip(pick["ours"], pick["lm-eval"]))
    best = {s: len(items) / min(t) for s, t in times.items()}
    med = {s: len(items) / statistics.median(t) for s, t in times.items()}
    import lm_eval

    lines = [f"## z2all bench eval: multiple-choice scoring, ours vs lm-eval {lm_eval.__version__} `hf` backend\n",
             f"machine: {machine_name()}, {torch.get_num_threads() if cfg.threads <= 0 else cfg.threads} torch "
             f"threads, device {device}, {cfg.dtype}",
             f"model: {cfg.ckpt or 'tiny preset, random weights'} ({n_params / 1e6:.1f}M params); {len(items)} items x "
             f"{k} choices from the demo corpus; {cfg.batch_size} rows per forward on both sides\n",
             markdown_table(["scorer", "items/s (best)", "items/s (median)", "vs lm-eval"],
                            [["ours (shared context, KV cache)", best["ours"], med["ours"],
                              f"{best['ours'] / best['lm-eval']:.2f}x"],
                             ["lm-eval hf", best["lm-eval"], med["lm-eval"], "1.00x"]]),
             f"\nmax |log-likelihood difference| {diff:.2e}; same choice on {same}/{len(items)} items; best of "
             f"{cfg.rounds} alternating rounds, each a whole loglikelihood call with tokenization"]
    for line in lines:
        print0(line)
    if out_dir is not None:
        from z2all.io import atomic_write_text

        atomic_write_text(Path(out_dir) / "report.md", "\n".join(lines) + "\n")
        save_config(cfg, Path(out_dir) / "config.json", command="z2all bench eval", machine=machine_name(),
                    rounds=times, max_ll_diff=diff)
    return 0
