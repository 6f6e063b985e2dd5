"""One switch per op: which implementation the model calls for RMSNorm, RoPE, SwiGLU, attention and the
LM-head cross-entropy.

    from z2all.ops import OpsConfig, resolve
    ops = resolve(OpsConfig(attention="triton", preset=""))   # or OpsConfig(preset="use_all")
    y = ops.rmsnorm(x, w, eps)

Implementations:
    rmsnorm, rope, swiglu, cross_entropy:  torch (reference.py) | triton (ops/triton/) | liger (Liger-Kernel,
                                           when installed; GPU only)
    attention:                             naive (explicit masked softmax) | sdpa (torch SDPA) | triton (ours)
    attention_bwd (Triton attention only): split (dK/dV and dQ kernels, deterministic; the default) | atomic
                                           (FlashAttention-2's one kernel with fp32 atomic dQ)

One name per op everywhere: the config key (`--model.ops.rmsnorm`), the field of the resolved `Ops`
(`ops.rmsnorm`), the ablation row and the `bench kernels --ops` name are the same word. The callables keep
reference.py's descriptive names (rms_norm, linear_cross_entropy).

Presets (the rows of the original llm-zero2all project's ablation): "naive" = every op torch and naive
attention; "use_all" = every op Triton. A preset sets all ops first; then any op named explicitly
overrides it, so `preset=use_all, rope=torch` is the "w/o RoPE" row. An op left unset ("") takes the
preset's choice, or without a preset the default (DEFAULTS: torch everywhere, sdpa attention).

The signatures are those of `reference.py`; every backend implements exactly them. Attention's is
`attention(q, k, v, causal=True, key_padding_mask=None, segment_ids=None)`: segment_ids [B, T] int32 (T == S)
marks the example each position of a packed row belongs to; a position attends only within its segment
(block-diagonal causal). naive and sdpa build that mask; the Triton kernel skips blocks across boundaries.
The model passes segment_ids only for packed rows, so a backend without it still serves everything else.
Implementations are imported on first use, so choosing torch never imports Triton.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from z2all.config import opt
from z2all.utils import UserError

OPS = ("rmsnorm", "rope", "swiglu", "attention", "cross_entropy")

# op -> impl -> "module:function"
IMPLS: dict[str, dict[str, str]] = {
    "rmsnorm": {"torch": "z2all.ops.reference:rms_norm", "triton": "z2all.ops.triton.rmsnorm:rms_norm",
                "liger": "z2all.ops.liger:rms_norm"},
    "rope": {"torch": "z2all.ops.reference:rope", "triton": "z2all.ops.triton.rope:rope",
             "liger": "z2all.ops.liger:rope"},
    "swiglu": {"torch": "z2all.ops.reference:swiglu", "triton": "z2all.ops.triton.swiglu:swiglu",
               "liger": "z2all.ops.liger:swiglu"},
    "attention": {"naive": "z2all.ops.reference:attention_naive", "sdpa": "z2all.ops.reference:attention_sdpa",
                  "triton": "z2all.ops.triton.attention:attention"},
    "cross_entropy": {"torch": "z2all.ops.reference:linear_cross_entropy",
                      "triton": "z2all.ops.triton.cross_entropy:linear_cross_entropy",
                      "liger": "z2all.ops.liger:linear_cross_entropy"},
}

# the Triton attention's two backward passes (ops.attention_bwd), same forward
ATTENTION_BWD = {"split": IMPLS["attention"]["triton"],
                 "atomic": "z2all.ops.triton.attention:attention_atomic_dq"}

PRESETS = {
    "naive": {"rmsnorm": "torch", "rope": "torch", "swiglu": "torch", "attention": "naive",
              "cross_entropy": "torch"},
    "use_all": {op: "triton" for op in OPS},
}


# what an op gets when neither it nor a preset names an implementation
DEFAULTS = {"rmsnorm": "torch", "rope": "torch", "swiglu": "torch", "attention": "sdpa", "cross_entropy": "torch"}
_UNSET = " ('' = the preset's choice, else {})"


@dataclass
class OpsConfig:
    preset: str = opt("", "shorthand for every op at once: '' (use the per-op values), naive, use_all; "
                      "ops named explicitly override it", choices=("", "naive", "use_all"))
    rmsnorm: str = opt("", "RMSNorm implementation" + _UNSET.format(DEFAULTS["rmsnorm"]),
                       choices=("", *IMPLS["rmsnorm"]))
    rope: str = opt("", "rotary embedding implementation" + _UNSET.format(DEFAULTS["rope"]),
                    choices=("", *IMPLS["rope"]))
    swiglu: str = opt("", "SwiGLU silu(a)*b implementation" + _UNSET.format(DEFAULTS["swiglu"]),
                      choices=("", *IMPLS["swiglu"]))
    attention: str = opt("", "causal attention implementation" + _UNSET.format(DEFAULTS["attention"]),
                         choices=("", *IMPLS["attention"]))
    cross_entropy: str = opt("", "LM head + cross-entropy implementation (triton/liger are fused and chunked: "
                             "full-vocabulary logits are never held at once)"
                             + _UNSET.format(DEFAULTS["cross_entropy"]),
                             choices=("", *IMPLS["cross_entropy"]))
    attention_bwd: str = opt("split", "backward of the Triton attention: split (a dK/dV kernel and a dQ kernel, "
                             "no atomics, deterministic) or atomic (FlashAttention-2: one kernel, dQ added with "
                             "fp32 atomics, 5 block matmuls instead of 7); needs attention=triton",
                             choices=tuple(ATTENTION_BWD))

    def selected(self) -> dict[str, str]:
        """The implementation of each op: the explicit value, else the preset's, else DEFAULTS."""
        if self.preset and self.preset not in PRESETS:
            raise UserError(f"ops.preset: unknown preset '{self.preset}'; choose from {', '.join(PRESETS)}")
        chosen = dict(DEFAULTS)
        chosen.update(PRESETS.get(self.preset, {}))
        for op in OPS:
            if getattr(self, op):
                chosen[op] = getattr(self, op)
        for op, impl in chosen.items():
            if impl not in IMPLS[op]:
                raise UserError(f"ops.{op}: unknown implementation '{impl}'; choose from {', '.join(IMPLS[op])}")
        if self.attention_bwd not in ATTENTION_BWD:
            raise UserError(f"ops.attention_bwd: unknown backward '{self.attention_bwd}'; choose from "
                            f"{', '.join(ATTENTION_BWD)}")
        if self.attention_bwd != "split" and chosen["attention"] != "triton":
            raise UserError(f"ops.attention_bwd={self.attention_bwd} applies to the Triton attention only, but "
                            f"attention is '{chosen['attention']}'; add --model.ops.attention=triton (or "
                            "preset=use_all), or drop attention_bwd")
        return chosen


@dataclass(frozen=True)
class Ops:
    """The resolved callables, with reference.py's signatures; one field per op of OPS, same names."""

    rmsnorm: Callable
    rope: Callable
    swiglu: Callable
    attention: Callable
    cross_entropy: Callable
    names: tuple  # ((op, impl), ...) for logging


def _load(path: str) -> Callable:
    mod, fn = path.split(":")
    try:
        return getattr(importlib.import_module(mod), fn)
    except ImportError as e:
        raise UserError(f"cannot load op implementation {path}: {e}") from None


def resolve(cfg: OpsConfig | None = None) -> Ops:
    cfg = cfg or OpsConfig()
    chosen = cfg.selected()
    fns = {op: _load(IMPLS[op][impl]) for op, impl in chosen.items()}
    names = tuple(chosen.items())
    if chosen["attention"] == "triton":
        fns["attention"] = _load(ATTENTION_BWD[cfg.attention_bwd])
        names += (("attention_bwd", cfg.attention_bwd),)
    return Ops(**fns, names=names)
