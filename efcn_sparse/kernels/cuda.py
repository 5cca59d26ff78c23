"""``cuda`` backend: the CUDA C++ kernels of ``csrc/cuda/`` (tensor-core mma.sync for float16 and
bfloat16, FMA units for float32 and float64, accumulation in float32 / float64; design notes in
``csrc/cuda/bsr_kernels.cuh``)."""

from __future__ import annotations

from typing import Optional

import torch

from .. import _extension
from ._native import forward, grad_input, grad_weight  # noqa: F401

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def unavailable_reason(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        where = "" if torch.cuda.is_available() else " (and this machine has no usable CUDA GPU)"
        return f"it runs CUDA tensors, got tensors on {device}{where}"
    if not torch.cuda.is_available():
        return "no usable CUDA GPU: torch.cuda.is_available() is False"
    if not _extension.load():
        return f"the compiled extension is not available ({_extension.error()})"
    if not _extension.has_cuda_kernels():
        return ("the extension was built without its CUDA kernels (a CPU-only torch, no CUDA toolkit at build "
                "time, or EFCN_NO_CUDA=1); rebuild with CUDA_HOME set: pip install -e . --no-build-isolation")
    return None


def grad_weight_acc(out, dy, x, row_idx, col_idx, mask_ids, mask_patterns) -> None:
    """out += dW in the grad_weight kernel's epilogue (no [nnzb, BR, BC] temporary)."""
    torch.ops.efcn_sparse_C.bsr_grad_weight_acc(out, dy, x, row_idx, col_idx, mask_ids, mask_patterns)
