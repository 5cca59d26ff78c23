"""Shared glue for the backends that call the compiled extension (``cpu`` and ``cuda``)."""

from __future__ import annotations

from typing import Optional

import torch

from .. import _extension


def unavailable_reason(device: torch.device, device_type: str, dispatch_key: str) -> Optional[str]:
    if device.type != device_type:
        return f"it runs {device_type} tensors, got {device}"
    if not _extension.load():
        return f"the compiled extension is not available ({_extension.error()})"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("efcn_sparse_C::bsr_forward", dispatch_key):
        return f"the extension was built without {device_type} kernels"
    return None


def forward(x, values, bias, crow_ptr, col_idx, row_idx, M: int):
    return torch.ops.efcn_sparse_C.bsr_forward(x, values, bias, crow_ptr, col_idx, row_idx, M)


def grad_input(dy, values, ccol_ptr, t_row_idx, t_perm, N: int):
    return torch.ops.efcn_sparse_C.bsr_grad_input(dy, values, ccol_ptr, t_row_idx, t_perm, N)


def grad_weight(dy, x, row_idx, col_idx, mask_ids, mask_patterns, BR: int, BC: int):
    return torch.ops.efcn_sparse_C.bsr_grad_weight(dy, x, row_idx, col_idx, mask_ids, mask_patterns, BR, BC)
