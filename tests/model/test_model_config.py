"""ModelConfig and presets: the Llama FFN rule, published parameter counts of known shapes (built on the
meta device, so no memory is used), the FLOPs formula, and clear errors for bad shapes / names."""

from __future__ import annotations

import pytest
import torch

from z2all.model.config import PRESETS, ModelConfig, model_preset
from z2all.model.llama import Z2all
from z2all.utils import UserError


def meta_model(cfg: ModelConfig) -> Z2all:
    with torch.device("meta"):
        return Z2all(cfg)


def test_defaults_are_the_tiny_preset():
    assert model_preset("tiny") == ModelConfig()
    cfg = ModelConfig()
    assert cfg.head_dim == 64 and cfg.n_heads % cfg.n_kv_heads == 0 and cfg.max_seq_len == 256


def test_llama_ffn_rule():
    assert ModelConfig(dim=4096, multiple_of=256).ffn_hidden == 11008  # Llama-2 7B
    assert ModelConfig(dim=2048, multiple_of=256).ffn_hidden == 5632  # TinyLlama / our 1b and 1.7b
    assert ModelConfig(dim=48, ffn_dim=70).ffn_hidden == 70


def test_1_7b_preset_shape():
    c = model_preset("1.7b")
    assert (c.dim, c.ffn_hidden, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.max_seq_len) == \
        (2048, 5632, 32, 16, 8, 64320, 2048)
    n = meta_model(c).num_params()
    assert 1.6e9 < n < 1.8e9


@pytest.mark.parametrize("name,expected", [
    ("llama2-7b", 6_738_415_616),  # meta-llama/Llama-2-7b-hf
    ("1b", 1_100_048_384),  # TinyLlama-1.1B
])
def test_published_parameter_counts(name, expected):
    assert meta_model(model_preset(name)).num_params() == expected


def test_every_preset_builds_and_counts():
    for name in PRESETS:
        cfg = model_preset(name)
        m = meta_model(cfg)
        emb = cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2)
        assert m.num_params() - m.num_params(exclude_embeddings=True) == emb


def test_flops_per_token_formula():
    cfg = model_preset("tiny", vocab_size=1000)
    m = meta_model(cfg)
    per_layer = 2 * cfg.dim * cfg.dim + 2 * cfg.dim * cfg.n_kv_heads * cfg.head_dim + 3 * cfg.dim * cfg.ffn_hidden \
        + 2 * cfg.dim
    n = cfg.n_layers * per_layer + cfg.dim + cfg.vocab_size * cfg.dim  # blocks + final norm + LM head
    assert m.flops_per_token(256) == 6 * n + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * 256
    tied = meta_model(model_preset("tiny", vocab_size=1000, tie_embeddings=True))
    assert tied.flops_per_token(256) == m.flops_per_token(256)  # the LM head matmul counts either way


def test_overrides_and_errors():
    assert model_preset("125m", vocab_size=5000).vocab_size == 5000
    with pytest.raises(UserError, match="tiny, 125m, 350m, 1b, 1.7b, llama2-7b"):
        model_preset("13b")
    with pytest.raises(UserError, match="n_layer"):
        model_preset("tiny", n_layer=3)
    with pytest.raises(UserError, match="n_kv_heads"):
        model_preset("tiny", n_kv_heads=3)
    with pytest.raises(UserError, match="multiple of model.n_heads"):
        ModelConfig(dim=50, n_heads=4).validate()
    with pytest.raises(UserError, match="even"):
        ModelConfig(dim=36, n_heads=4, n_kv_heads=4).validate()
