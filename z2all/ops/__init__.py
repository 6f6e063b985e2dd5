"""One switch per op: which implementation the model calls for RMSNorm, RoPE, SwiGLU, attention and the
LM-head cross-entropy.

    from z2all.ops import OpsConfig, resolve
    ops = resolve(OpsConfig(attention="triton", preset=""))   # or OpsConfig(preset="use_all")
    y = ops.rms_norm(x, w, eps)

Implementations:
    rmsnorm, rope, swiglu, cross_entropy:  torch (reference.py) | triton (ops/triton/) | liger (Liger-Kernel,
                                           when installed; GPU only)
    attention:                             naive (explicit masked softmax) | sdpa (torch SDPA) | triton (ours)

Presets (the seed's ablation rows): "naive" = every op torch and naive attention; "use_all" = every op
Triton. A preset sets all ops first; then any op named explicitly overrides it, so `preset=use_all,
rope=torch` is the "w/o RoPE" row. An op left unset ("") takes the preset's choice, or without a preset
the default (DEFAULTS: torch everywhere, sdpa attention).

The signatures are those of `reference.py`; every backend implements exactly them. Implementations are
imported on first use, so choosing torch never imports Triton.
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
        return chosen


@dataclass(frozen=True)
class Ops:
    """The resolved callables, with reference.py's signatures."""

    rms_norm: Callable
    rope: Callable
    swiglu: Callable
    attention: Callable
    linear_cross_entropy: Callable
    names: tuple  # ((op, impl), ...) for logging


def _load(path: str) -> Callable:
    mod, fn = path.split(":")
    try:
        return getattr(importlib.import_module(mod), fn)
    except ImportError as e:
        raise UserError(f"cannot load op implementation {path}: {e}") from None


def resolve(cfg: OpsConfig | None = None) -> Ops:
    chosen = (cfg or OpsConfig()).selected()
    return Ops(
        rms_norm=_load(IMPLS["rmsnorm"][chosen["rmsnorm"]]),
        rope=_load(IMPLS["rope"][chosen["rope"]]),
        swiglu=_load(IMPLS["swiglu"][chosen["swiglu"]]),
        attention=_load(IMPLS["attention"][chosen["attention"]]),
        linear_cross_entropy=_load(IMPLS["cross_entropy"][chosen["cross_entropy"]]),
        names=tuple(chosen.items()),
    )
