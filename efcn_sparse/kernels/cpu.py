"""``cpu`` backend: the C++ kernels of ``csrc/cpu/`` (OpenMP over blocks, dense micro-GEMMs)."""

from __future__ import annotations

from typing import Optional

import torch

from . import _native
from ._native import forward, grad_input, grad_weight  # noqa: F401

# float32/float64 natively; bfloat16/float16 are computed in float32 and rounded once at the end
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def unavailable_reason(device: torch.device) -> Optional[str]:
    return _native.unavailable_reason(device, "cpu", "CPU")
