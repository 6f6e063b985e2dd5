"""What the ops tests share: the device they run on and the dtypes they test there.

Triton fixes interpreted-vs-compiled when the kernels are imported (tests/conftest.py sets TRITON_INTERPRET=1
only when there is no GPU), so one pytest process tests one device: the CPU interpreter (fp32, fp16; it
mishandles bf16) or, on a CUDA machine, the compiled kernels (fp32, fp16 and bf16). Every kernel test takes
its device and dtypes from here, so `pytest tests/ops` on a GPU box runs the whole suite on the real kernels
(scripts/gpu_check.sh does), not only the `gpu`-marked tests. Test ids name the device: `[cuda-bf16]`.
"""

from __future__ import annotations

import pytest
import torch

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
DTYPES = [pytest.param(dt, id=f"{DEV}-{str(dt).removeprefix('torch.')}") for dt in _DTYPES]
