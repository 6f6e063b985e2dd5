"""A small token directory with everything the in-training held-out scores read (z2all/eval/intrain.py):
a converted shard of real demo documents (zh prose and python code), a byte-level BPE tokenizer trained on
them in-process, and train/val token files split by `is_val` exactly as `z2all data tokenize` splits them,
with the meta.json keys (shards, seed, val_fraction, tokenizer_dir) it writes."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np

DEMO = Path(__file__).resolve().parents[2] / "z2all" / "data" / "demo"
EOS = "<|endoftext|>"


def demo_docs(name: str, field: str, n: int, chars: int) -> list[str]:
    out = []
    with gzip.open(DEMO / name, "rt", encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)[field][:chars]
            if len(text) >= chars // 2:
                out.append(text)
            if len(out) >= n:
                break
    return out


def write_heldout_token_dir(root: Path, n_docs: int = 30, chars: int = 700, val_fraction: float = 0.3,
                            seed: int = 7) -> Path:
    """root/tokens (+ root/conv/part-00000.jsonl, root/tok/); returns the tokens dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from z2all.data.tokenize import is_val

    docs = {"wikipedia_zh": demo_docs("zh_wiki.jsonl.gz", "text", n_docs, chars),
            "github_python": demo_docs("code_python.jsonl.gz", "content", n_docs, chars)}
    recs = [{"gid": 1000 * k + i, "data_src": dom, "category": "x", "title": "", "content": t}
            for k, (dom, texts) in enumerate(docs.items()) for i, t in enumerate(texts)]
    shard = root / "conv" / "part-00000.jsonl"
    shard.parent.mkdir(parents=True)
    shard.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([r["content"] for r in recs], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)
    tok_dir = root / "tok"
    fast.save_pretrained(str(tok_dir))
    eos = fast.eos_token_id

    split: dict[str, list[int]] = {"train": [], "val": []}
    for r in recs:
        split["val" if is_val(r["gid"], seed, val_fraction) else "train"] += [eos] + fast(r["content"])["input_ids"]
    out = root / "tokens"
    out.mkdir()
    for name, ids in split.items():
        np.asarray(ids, dtype="<u2").tofile(out / f"{name}-00000.bin")
    (out / "meta.json").write_text(json.dumps({
        "dtype": "uint16", "vocab_size": len(fast), "eos_id": eos, "train_tokens": len(split["train"]),
        "val_tokens": len(split["val"]), "train_files": ["train-00000.bin"], "val_files": ["val-00000.bin"],
        "tokenizer_dir": str(tok_dir.resolve()), "val_fraction": val_fraction, "seed": seed,
        "shards": [str(shard.resolve())], "byteorder": "little"}), encoding="utf-8")
    return out
