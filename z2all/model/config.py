"""ModelConfig (the shape of a Z2all / Llama-2 model) and the named presets.

    from z2all.model.config import model_preset
    cfg = model_preset("1.7b", max_seq_len=4096)

The field defaults are the `tiny` preset, so `ModelConfig()` is a model that trains on a CPU in minutes.
`vocab_size` is normally overridden by the trainer from the tokenizer / token files (meta.json).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from z2all.config import opt
from z2all.utils import UserError


@dataclass
class ModelConfig:
    dim: int = opt(256, "hidden size C (the residual stream width)")
    n_layers: int = opt(4, "number of transformer blocks L")
    n_heads: int = opt(4, "query heads H; head_dim = dim / n_heads (must be even for RoPE)")
    n_kv_heads: int = opt(2, "key/value heads for grouped-query attention (divides n_heads; = n_heads is MHA)")
    vocab_size: int = opt(8192, "vocabulary size (normally taken from the tokenizer)")
    ffn_dim: int = opt(0, "SwiGLU hidden size; 0 = Llama's rule: 2/3 * 4 * dim rounded up to multiple_of")
    multiple_of: int = opt(32, "the Llama FFN rule rounds its hidden size up to a multiple of this")
    norm_eps: float = opt(1e-5, "RMSNorm epsilon")
    rope_theta: float = opt(10000.0, "RoPE base frequency")
    max_seq_len: int = opt(256, "longest context trained on (generation may run past it, quality degrades)")
    tie_embeddings: bool = opt(False, "share the token embedding matrix with the LM head")
    dropout: float = opt(0.0, "dropout on the embeddings and on each residual branch (0 for pretraining)")
    init_std: float = opt(0.02, "std of the normal init; residual projections (wo, w2) use "
                          "init_std / sqrt(2 * n_layers)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        """The SwiGLU hidden size: ffn_dim, or Llama's rule (dim 2048, multiple_of 256 -> 5632)."""
        if self.ffn_dim > 0:
            return self.ffn_dim
        hidden = int(2 * (4 * self.dim) / 3)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def validate(self) -> None:
        """Raise UserError naming the field when the shape is impossible."""
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise UserError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise UserError(f"model.dim ({self.dim}) must be a multiple of model.n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads "
                              f"({self.n_kv_heads})")
        if self.head_dim % 2:
            raise UserError(f"head_dim = dim / n_heads = {self.head_dim} must be even for RoPE")
        if self.ffn_dim < 0:
            raise UserError(f"model.ffn_dim must be >= 0 (0 = Llama rule), got {self.ffn_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.dropout must be in [0, 1), got {self.dropout}")


# Each preset names every field that differs from the defaults (the defaults are `tiny`).
PRESETS: dict[str, dict] = {
    # ~2.9M non-embedding params: a few hundred steps on 2 CPU cores in minutes. head_dim 64 so the Triton
    # attention kernel (head dims 64/128) also runs on it.
    "tiny": {},
    # GPT-3 "small"/"medium" widths with Llama blocks; tied embeddings as the embedding is a large share here
    "125m": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, vocab_size=32000, multiple_of=256,
                 max_seq_len=2048, tie_embeddings=True),
    "350m": dict(dim=1024, n_layers=24, n_heads=16, n_kv_heads=16, vocab_size=32000, multiple_of=256,
                 max_seq_len=2048, tie_embeddings=True),
    # the 1.1B shape of TinyLlama (about the ~1B model of the original llm-zero2all project's single-GPU
    # ablation): FFN 5632, GQA 32/4
    "1b": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, vocab_size=32000, multiple_of=256,
               max_seq_len=2048),
    "1.7b": dict(dim=2048, n_layers=32, n_heads=16, n_kv_heads=8, vocab_size=64320, ffn_dim=5632,
                 multiple_of=256, max_seq_len=2048),
    "llama2-7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, vocab_size=32000, multiple_of=256,
                      max_seq_len=4096),
}


def model_preset(name: str, **overrides) -> ModelConfig:
    """The named preset with `overrides` applied (e.g. vocab_size from the tokenizer); validated."""
    if name not in PRESETS:
        raise UserError(f"unknown model preset '{name}'; choose from {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise UserError(f"unknown ModelConfig field(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    cfg = ModelConfig(**{**PRESETS[name], **overrides})
    cfg.validate()
    return cfg
