"""Liger-Kernel as an outside baseline behind our op signatures (`ops.<op>=liger`, and extra rows in
`z2all bench kernels`). GPU only; optional (`pip install 'llm-zero2all[liger]'`).

Thin adapters only, no maths of our own:
  * rope: Liger wants Hugging Face's full-width tables [.., T, D] (the two halves repeated) and a batch dim;
    ours are [T, D/2] or [B, T, D/2].
  * rms_norm: Liger's "llama" casting mode matches reference.rms_norm (fp32 statistics, cast before weight).
  * linear_cross_entropy: Liger's fused linear CE; note it returns NaN rather than 0 when no target is valid.
"""

from __future__ import annotations

import torch

try:
    from liger_kernel.transformers.functional import (
        liger_fused_linear_cross_entropy,
        liger_rms_norm,
        liger_rope,
        liger_swiglu,
    )
except ImportError as e:  # surfaced by z2all.ops.resolve as a UserError naming this module
    raise ImportError(f"Liger-Kernel is not installed ({e}); pip install 'llm-zero2all[liger]' on a CUDA machine "
                      "or choose the torch/triton implementation") from e


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return liger_rms_norm(x, weight, eps, 0.0, "llama", False)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    cos = torch.cat((cos, cos), dim=-1)
    sin = torch.cat((sin, sin), dim=-1)
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    return liger_rope(q, k, cos, sin)


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return liger_swiglu(a, b)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100) -> torch.Tensor:
    return liger_fused_linear_cross_entropy(h, weight, targets, ignore_index=ignore_index)
