"""Shared by tests/eval: a tiny random-init Z2all checkpoint with a real byte-level BPE tokenizer trained
in-process on a few KB of the demo corpus, and writers for task fixtures."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

DEMO = Path(__file__).resolve().parents[2] / "z2all" / "data" / "demo"
EOS = "<|endoftext|>"


def demo_docs(name: str = "zh_wiki.jsonl.gz", field: str = "text", n: int = 12, chars: int = 3000) -> list[str]:
    out = []
    with gzip.open(DEMO / name, "rt", encoding="utf-8") as f:
        for line in f:
            t = json.loads(line)[field][:chars]
            if len(t) > min(600, chars // 2):
                out.append(t)
            if len(out) >= n:
                break
    return out


def make_tokenizer_dir(path: Path, vocab_size: int = 320) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = demo_docs(n=6) + demo_docs("code_python.jsonl.gz", "content", n=6)
    texts.append("Question: What is the answer? Answer: the cat sat on the mat. A B C D")
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)
    fast.save_pretrained(str(path))
    return path


def make_ckpt(root: Path, seed: int = 0, max_seq_len: int = 96, tie: bool = False) -> Path:
    """root/ckpt (model.safetensors + model_config.json + tokenizer/)."""
    import torch

    from z2all.model.config import ModelConfig
    from z2all.model.llama import Z2all, save_model

    tok_dir = root / "tok"
    if not tok_dir.exists():
        make_tokenizer_dir(tok_dir)
    from transformers import AutoTokenizer

    n = len(AutoTokenizer.from_pretrained(str(tok_dir)))
    torch.manual_seed(seed)
    cfg = ModelConfig(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=n + (-n) % 8, ffn_dim=70,
                      max_seq_len=max_seq_len, rope_theta=500.0, tie_embeddings=tie, init_std=0.2)
    model = Z2all(cfg)
    ckpt = root / f"ckpt{seed}"
    save_model(model, ckpt)
    shutil.copytree(tok_dir, ckpt / "tokenizer")
    return ckpt


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path
