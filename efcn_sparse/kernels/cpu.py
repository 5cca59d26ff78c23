"""``cpu`` backend: the C++ kernels of ``csrc/cpu/`` (OpenMP over blocks, dense micro-GEMMs)."""

from __future__ import annotations

from typing import Optional

import torch

from . import _native
from ._native import forward, grad_input, grad_weight  # noqa: F401


def unavailable_reason(device: torch.device) -> Optional[str]:
    return _native.unavailable_reason(device, "cpu", "CPU")
