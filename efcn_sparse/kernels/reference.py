"""Reference backend: plain PyTorch, vectorised over blocks (gathers, batched matmuls, index_add).

The simple, obviously-correct implementation every fast backend is tested against. Work is
chunked over blocks only to bound the temporary memory (batch x blocks x block side); there is
no Python loop over individual blocks. Half-precision inputs are computed in float32.

Kernel contract shared by every backend (see ``efcn_sparse.ops``): ``x`` [B, N] and ``dy``
[B, M] are contiguous and of the values' dtype; index tensors are int32 on the same device;
values [nnzb, BR, BC] hold zeros at masked entries; edge blocks may stick out of (M, N).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

_CHUNK_BYTES = 64 * 2**20


def _exact_dtypes(kernel):
    """Run ``kernel`` with autocast off: its matmuls must keep the dtypes it chose (the ops layer
    has already applied autocast's casts to the operands)."""
    @functools.wraps(kernel)
    def run(*args, **kwargs):
        kind = args[0].device.type
        if kind not in ("cpu", "cuda"):
            return kernel(*args, **kwargs)
        with torch.autocast(kind, enabled=False):
            return kernel(*args, **kwargs)
    return run


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _pad_cols(t: torch.Tensor, n_blocks: int, block: int) -> torch.Tensor:
    """View t [B, n] as [B, n_blocks, block], zero-padding the last block when needed."""
    B, n = t.shape
    if n != n_blocks * block:
        t = torch.nn.functional.pad(t, (0, n_blocks * block - n))
    return t.reshape(B, n_blocks, block)


def _chunks(nnzb: int, per_block_bytes: int):
    step = max(1, _CHUNK_BYTES // max(per_block_bytes, 1))
    for s in range(0, nnzb, step):
        yield s, min(nnzb, s + step)


@_exact_dtypes
def forward(x, values, bias: Optional[torch.Tensor], crow_ptr, col_idx, row_idx, M: int):
    B, N = x.shape
    nnzb, BR, BC = values.shape
    nbr, nbc = crow_ptr.numel() - 1, -(-N // BC)
    cd = _compute_dtype(values.dtype)
    xb = _pad_cols(x.to(cd), nbc, BC)  # [B, nbc, BC]
    w = values.to(cd)
    acc = torch.zeros(nbr, BR, B, dtype=cd, device=x.device)
    cols, rows = col_idx.long(), row_idx.long()
    for s, e in _chunks(nnzb, B * (BC + BR) * x.element_size()):
        xg = xb[:, cols[s:e]].permute(1, 2, 0)  # [k, BC, B]
        acc.index_add_(0, rows[s:e], torch.bmm(w[s:e], xg))
    y = acc.permute(2, 0, 1).reshape(B, nbr * BR)[:, :M]
    if bias is not None:
        y = y + bias.to(cd)
    return y.to(values.dtype).contiguous()


@_exact_dtypes
def grad_input(dy, values, ccol_ptr, t_row_idx, t_perm, N: int):
    B, M = dy.shape
    nnzb, BR, BC = values.shape
    nbc, nbr = ccol_ptr.numel() - 1, -(-M // BR)
    cd = _compute_dtype(values.dtype)
    dyb = _pad_cols(dy.to(cd), nbr, BR)  # [B, nbr, BR]
    w = values.to(cd)
    t_cols = torch.repeat_interleave(torch.arange(nbc, device=dy.device), ccol_ptr.long().diff())
    acc = torch.zeros(nbc, BC, B, dtype=cd, device=dy.device)
    rows, perm = t_row_idx.long(), t_perm.long()
    for s, e in _chunks(nnzb, B * (BC + BR) * dy.element_size()):
        dyg = dyb[:, rows[s:e]].permute(1, 2, 0)  # [k, BR, B]
        acc.index_add_(0, t_cols[s:e], torch.bmm(w[perm[s:e]].transpose(1, 2), dyg))
    return acc.permute(2, 0, 1).reshape(B, nbc * BC)[:, :N].to(values.dtype).contiguous()


def _grad_weight_chunks(dy, x, row_idx, col_idx, mask_ids, mask_patterns, BR: int, BC: int):
    """(start, end, dW[start:end]) over chunks of blocks, in the compute dtype, masked entries 0."""
    B, M = dy.shape
    N = x.shape[1]
    cd = _compute_dtype(dy.dtype)
    dyb = _pad_cols(dy.to(cd), -(-M // BR), BR)
    xb = _pad_cols(x.to(cd), -(-N // BC), BC)
    rows, cols = row_idx.long(), col_idx.long()
    for s, e in _chunks(row_idx.numel(), B * (BC + BR) * dy.element_size()):
        dyg = dyb[:, rows[s:e]].permute(1, 2, 0)  # [k, BR, B]
        xg = xb[:, cols[s:e]].transpose(0, 1)  # [k, B, BC]
        out = torch.bmm(dyg, xg)
        if mask_ids is not None:  # where, not multiply: masked entries stay exactly 0 even for non-finite inputs
            out = torch.where(mask_patterns[mask_ids[s:e].long()], out, out.new_zeros(()))
        yield s, e, out


@_exact_dtypes
def grad_weight(dy, x, row_idx, col_idx, mask_ids: Optional[torch.Tensor], mask_patterns: Optional[torch.Tensor],
                BR: int, BC: int):
    out = torch.empty(row_idx.numel(), BR, BC, dtype=dy.dtype, device=dy.device)
    for s, e, chunk in _grad_weight_chunks(dy, x, row_idx, col_idx, mask_ids, mask_patterns, BR, BC):
        out[s:e] = chunk
    return out


@_exact_dtypes
def bias_grad(dy):
    """dy summed over the batch in the compute dtype, rounded to dy's."""
    return dy.to(_compute_dtype(dy.dtype)).sum(0).to(dy.dtype)


def grad_weight_bias(dy, x, row_idx, col_idx, mask_ids: Optional[torch.Tensor],
                     mask_patterns: Optional[torch.Tensor], BR: int, BC: int, dw_dtype=None):
    """(grad_weight(...) converted to dw_dtype (default dy's), bias_grad(dy))."""
    dw = grad_weight(dy, x, row_idx, col_idx, mask_ids, mask_patterns, BR, BC)
    return dw.to(dw_dtype or dy.dtype), bias_grad(dy)


@_exact_dtypes
def grad_weight_acc(out, dy, x, row_idx, col_idx, mask_ids: Optional[torch.Tensor],
                    mask_patterns: Optional[torch.Tensor]) -> None:
    """out += dW, rounded as ``out += grad_weight(...)`` rounds it; no [nnzb, BR, BC] temporary."""
    for s, e, chunk in _grad_weight_chunks(dy, x, row_idx, col_idx, mask_ids, mask_patterns, *out.shape[1:]):
        out[s:e] += chunk.to(out.dtype)
