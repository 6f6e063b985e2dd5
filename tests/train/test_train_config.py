"""Train configs: every preset in configs/ loads and resolves to a model; model overrides, vocab from the
token files and bad values; the LR schedule, AdamW groups and the MFU table."""

from __future__ import annotations

import math

import pytest
import torch
from train_helpers import REPO

from z2all.config import load_config
from z2all.model.config import model_preset
from z2all.model.llama import Z2all
from z2all.train import metrics, optim
from z2all.train.pretrain import Config, resolve_model_config
from z2all.utils import UserError

PRESETS = sorted((REPO / "configs").glob("*.toml"))


def test_presets_exist():
    names = {p.stem for p in PRESETS}
    assert {"demo_cpu", "gpu_1b", "seed_a800", "seed_a800_short"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_every_preset_loads_and_resolves(path):
    cfg = load_config(Config, path)
    mcfg = resolve_model_config(cfg.model, 50_000, cfg.data.seq_len)
    assert mcfg.vocab_size >= 50_000 and mcfg.max_seq_len >= cfg.data.seq_len
    cfg.model.ops.selected()  # every op name is valid
    if path.stem.startswith("seed_a800"):
        # the seed's breakdown line: 16 grad accum steps * 1 processes * 2 batch size * 2048 max seq len (its
        # "tokens per iteration: 262,144" does not match those factors; the factors are what we keep)
        assert (cfg.data.grad_accum, cfg.data.batch_size, cfg.data.seq_len) == (16, 2, 2048)


def test_model_overrides_and_ops_from_the_command_line():
    cfg = load_config(Config, REPO / "configs/demo_cpu.toml",
                      ["model.dim=64", "--model.n_layers=3", "model.ops.attention=naive"])
    mcfg = resolve_model_config(cfg.model, 300, 64)
    assert (mcfg.dim, mcfg.n_layers, mcfg.vocab_size) == (64, 3, 300)
    assert mcfg.n_heads == model_preset("tiny").n_heads  # untouched fields keep the preset's value
    assert cfg.model.ops.selected()["attention"] == "naive"


def test_bad_values_are_clear_errors():
    with pytest.raises(UserError, match="model.dimm"):
        load_config(Config, None, ["model.dimm=3"])
    with pytest.raises(UserError, match="data.grad_accum"):
        load_config(Config, None, ["data.grad_accum=0"])
    cfg = load_config(Config, None, ["model.vocab_size=100"])
    with pytest.raises(UserError, match="smaller than the token files"):
        resolve_model_config(cfg.model, 256, 32)
    cfg = load_config(Config, None, ["model.max_seq_len=16"])
    with pytest.raises(UserError, match="exceeds model.max_seq_len"):
        resolve_model_config(cfg.model, 256, 32)


def test_lr_schedule_warmup_cosine_min():
    c = optim.OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10)
    lrs = [optim.lr_at(s, c, 110) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:110]))  # monotone decay after warmup
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[110] == lrs[119] == pytest.approx(0.1)


def test_weight_decay_on_matrices_only():
    model = Z2all(model_preset("tiny", dim=32, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=64,
                               tie_embeddings=True))
    decay, no_decay = optim.param_groups(model, 0.1)
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == model.num_params()  # the tied matrix is counted once
    opt = optim.make_optimizer(model, optim.OptimConfig(), torch.device("cpu"))
    assert not opt.defaults["fused"]  # fused AdamW is CUDA only


def test_mfu_table():
    assert metrics.device_peak_flops(torch.device("cpu")) is None
    assert metrics.mfu(1e9, 1e3, None) is None and metrics.fmt_mfu(None) == "n/a"
    assert metrics.device_peak_flops(torch.device("cpu"), override_tflops=312) == 312e12
    # 1B model: 6e9 FLOP/token * 26,000 tok/s on one 312 TFLOP/s device = 50%
    assert metrics.mfu(6e9, 26_000, 312e12) == pytest.approx(0.5)
    assert metrics.mfu(6e9, 52_000, 312e12, n_devices=2) == pytest.approx(0.5)
    peaks = dict(metrics.PEAK_BF16_TFLOPS)
    assert peaks["A100"] == peaks["A800"] == 312 and peaks["H100"] == peaks["H200"] == 989
