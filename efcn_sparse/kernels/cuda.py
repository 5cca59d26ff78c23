"""``cuda`` backend: the CUDA C++ kernels of ``csrc/cuda/``."""

from __future__ import annotations

from typing import Optional

import torch

from . import _native
from ._native import forward, grad_input, grad_weight  # noqa: F401


def unavailable_reason(device: torch.device) -> Optional[str]:
    return _native.unavailable_reason(device, "cuda", "CUDA")
