"""Shared by tests/model: a tiny odd-sized model config and a real byte-level BPE tokenizer directory trained
in-test (with the `tokenizers` library) on a few KB of the embedded demo corpus."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from z2all.model.config import ModelConfig

DEMO = Path(__file__).resolve().parents[2] / "z2all" / "data" / "demo"
EOS = "<|endoftext|>"


def small_config(**kw) -> ModelConfig:
    """Odd sizes on purpose: dim 48, 6 heads of 8, 2 kv heads (GQA 3:1), FFN 70, vocab 97."""
    base = dict(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=97, ffn_dim=70, max_seq_len=64,
                rope_theta=500.0)
    return ModelConfig(**{**base, **kw})


def demo_texts(max_chars: int = 24_000) -> list[str]:
    texts, total = [], 0
    for name, field in (("code_python.jsonl.gz", "content"), ("zh_wiki.jsonl.gz", "text")):
        with gzip.open(DEMO / name, "rt", encoding="utf-8") as f:
            for line in f:
                t = json.loads(line)[field][:4000]
                texts.append(t)
                total += len(t)
                if total >= max_chars * (1 if name.startswith("zh") else 0.5):
                    break
    return texts


def make_tokenizer_dir(path: Path, vocab_size: int = 384) -> Path:
    """A byte-level BPE (GPT-2 style) saved as a transformers PreTrainedTokenizerFast directory, EOS
    <|endoftext|> (id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(demo_texts(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)
    fast.save_pretrained(str(path))
    return path
