"""AdamW with weight decay on matrices only, and the warmup + cosine learning-rate schedule.

Decay policy: every parameter with `ndim >= 2` (linear and embedding matrices) decays; vectors (RMSNorm
weights, biases) do not — decaying a norm gain towards 0 only fights the normalisation. A tied
embedding/LM-head matrix is one parameter and appears once.

Schedule (step counts from 0, `lr_at(step)` is the LR used for the update of that step):
    step <  warmup:            lr * (step + 1) / warmup           (linear, never exactly 0)
    warmup <= step < total:    min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * progress))
    step >= total:             min_lr
It is a pure function of the step, so resuming needs only the step number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from z2all.config import opt


@dataclass
class OptimConfig:
    lr: float = opt(3e-4, "peak learning rate (after warmup)")
    min_lr: float = opt(3e-5, "learning rate at the end of the cosine decay")
    warmup_steps: int = opt(100, "linear warmup steps")
    decay_steps: int = opt(0, "steps of warmup + cosine decay; 0 = train.max_steps")
    weight_decay: float = opt(0.1, "AdamW weight decay, applied to matrices only")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    eps: float = opt(1e-8, "AdamW epsilon")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this value; 0 = no clipping")
    fused: bool = opt(True, "use the fused CUDA AdamW kernel when training on CUDA (ignored on CPU)")


def validate_optim(cfg: OptimConfig, prefix: str = "optim") -> None:
    """Raise UserError naming the option for a value AdamW or the schedule cannot use (NaN included: a NaN
    learning rate would silently turn every weight into NaN at the first step)."""
    from z2all.utils import UserError

    # an upper bound too: past ~3e37 AdamW's step size overflows float32 (an internal error at step 1), and
    # no AdamW learning rate above 1e3 trains anything
    rules = [("lr", "in [0, 1e3]", lambda v: 0 <= v <= 1e3), ("min_lr", "in [0, 1e3]", lambda v: 0 <= v <= 1e3),
             ("weight_decay", ">= 0", lambda v: v >= 0), ("beta1", "in [0, 1)", lambda v: 0 <= v < 1),
             ("beta2", "in [0, 1)", lambda v: 0 <= v < 1), ("eps", "> 0", lambda v: v > 0),
             ("grad_clip", ">= 0 (0 = no clipping)", lambda v: v >= 0)]
    for name, want, ok in rules:
        v = getattr(cfg, name)
        if not (math.isfinite(v) and ok(v)):
            raise UserError(f"--{prefix}.{name}={v}: must be a finite number {want}")
    for name in ("warmup_steps", "decay_steps"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{prefix}.{name}={getattr(cfg, name)}: must be >= 0")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices (decayed) and everything else (not decayed); shared params counted once."""
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    fused = bool(cfg.fused and device.type == "cuda")
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, fused=fused)


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    total = cfg.decay_steps or total_steps
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= total:
        return cfg.min_lr
    span = max(1, total - cfg.warmup_steps)
    progress = (step - cfg.warmup_steps) / span
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
