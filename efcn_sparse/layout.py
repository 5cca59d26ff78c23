"""The block-sparse row (BSR) layout: the single source of truth for a sparse eFCN matrix.

A matrix of logical shape (M, N) is cut into blocks of shape (BR, BC). The block grid has
``ceil(M / BR)`` block rows and ``ceil(N / BC)`` block columns; edge blocks may stick out of
the matrix, and their out-of-range entries are masked (they are never read or written by the
kernels). Only stored blocks are kept, row-major:

* ``crow_ptr``  int32 [n_block_rows + 1]: blocks of block row i are ``crow_ptr[i]:crow_ptr[i+1]``.
* ``col_idx``   int32 [nnzb]: block column of each stored block, sorted and unique in a row.
* ``row_idx``   int32 [nnzb]: block row of each stored block (for grids over blocks).

Transpose metadata, computed once, lets ``dX = dY W`` walk block columns without copying values:

* ``ccol_ptr``  int32 [n_block_cols + 1]: block-column pointers.
* ``t_row_idx`` int32 [nnzb]: block row of the k-th block in column-major order.
* ``t_perm``    int32 [nnzb]: index into ``values`` of the k-th block in column-major order.

An optional element mask says which entries of each stored block may ever be non-zero. It is
stored compactly as ``mask_ids`` int32 [nnzb], a pattern id per block, into ``mask_patterns``
bool [n_patterns, BR, BC]. ``mask_ids is None`` means every entry of every stored block is free.

Index tensors are plain strided tensors (never ``torch.sparse``) so ``torch.compile`` accepts
them. Offsets that can pass 2^31 (batch x columns, block x block size) are computed in int64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

__all__ = ["BSRLayout", "LayoutError", "memory_budget_bytes"]

INDEX_FIELDS = ("crow_ptr", "col_idx", "row_idx", "ccol_ptr", "t_row_idx", "t_perm")
MASK_FIELDS = ("mask_ids", "mask_patterns")


class LayoutError(ValueError):
    """A BSR layout whose index arrays are inconsistent."""


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, eq=False)
class BSRLayout:
    """Block-sparse structure of an (M, N) matrix with (BR, BC) blocks; holds no values."""

    shape: Tuple[int, int]
    block_shape: Tuple[int, int]
    crow_ptr: torch.Tensor
    col_idx: torch.Tensor
    row_idx: torch.Tensor
    ccol_ptr: torch.Tensor
    t_row_idx: torch.Tensor
    t_perm: torch.Tensor
    mask_ids: Optional[torch.Tensor] = None
    mask_patterns: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_block_coords(
        cls,
        shape: Tuple[int, int],
        block_shape: Tuple[int, int],
        block_rows,
        block_cols,
        mask_ids=None,
        mask_patterns=None,
        device=None,
    ) -> "BSRLayout":
        """Build from (block row, block col) pairs of stored blocks, in any order, no duplicates.

        ``mask_ids`` (one per given pair, in the given order) and ``mask_patterns`` are optional.
        """
        M, N = (int(s) for s in shape)
        BR, BC = (int(b) for b in block_shape)
        if M < 0 or N < 0 or BR <= 0 or BC <= 0:
            raise LayoutError(f"expected shape >= 0 and block_shape > 0, got shape={shape}, block_shape={block_shape}")
        nbr, nbc = _cdiv(M, BR), _cdiv(N, BC)
        r = torch.as_tensor(block_rows, dtype=torch.int64).reshape(-1).cpu()
        c = torch.as_tensor(block_cols, dtype=torch.int64).reshape(-1).cpu()
        if r.numel() != c.numel():
            raise LayoutError(f"block_rows and block_cols differ in length: {r.numel()} vs {c.numel()}")
        if r.numel() and (r.min() < 0 or r.max() >= nbr or c.min() < 0 or c.max() >= nbc):
            raise LayoutError(
                f"block coordinates out of range: grid is {nbr}x{nbc}, got rows in "
                f"[{int(r.min())}, {int(r.max())}] and cols in [{int(c.min())}, {int(c.max())}]"
            )
        key = r * max(nbc, 1) + c
        key_sorted, order = torch.sort(key, stable=True)
        if key_sorted.numel() > 1 and bool((key_sorted[1:] == key_sorted[:-1]).any()):
            raise LayoutError("duplicate (block row, block col) pairs")
        r, c = r[order], c[order]
        if mask_ids is not None:
            mask_ids = torch.as_tensor(mask_ids, dtype=torch.int64).reshape(-1).cpu()[order]
        return cls._from_sorted(shape=(M, N), block_shape=(BR, BC), rows=r, cols=c,
                                mask_ids=mask_ids, mask_patterns=mask_patterns, device=device)

    @classmethod
    def _from_sorted(cls, shape, block_shape, rows, cols, mask_ids, mask_patterns, device):
        M, N = shape
        BR, BC = block_shape
        nbr, nbc = _cdiv(M, BR), _cdiv(N, BC)
        counts = torch.bincount(rows, minlength=nbr) if rows.numel() else torch.zeros(nbr, dtype=torch.int64)
        crow = torch.zeros(nbr + 1, dtype=torch.int64)
        crow[1:] = torch.cumsum(counts, 0)
        tkey = cols * max(nbr, 1) + rows
        t_perm = torch.sort(tkey, stable=True)[1]
        ccounts = torch.bincount(cols, minlength=nbc) if cols.numel() else torch.zeros(nbc, dtype=torch.int64)
        ccol = torch.zeros(nbc + 1, dtype=torch.int64)
        ccol[1:] = torch.cumsum(ccounts, 0)
        if rows.numel() >= 2**31:
            raise LayoutError(f"too many blocks for int32 indices: {rows.numel()}")
        i32 = lambda t: t.to(dtype=torch.int32, device=device)  # noqa: E731
        if mask_patterns is not None:
            mask_patterns = torch.as_tensor(mask_patterns).to(dtype=torch.bool, device=device)
            if mask_ids is None:
                raise LayoutError("mask_patterns given without mask_ids")
            mask_ids = i32(torch.as_tensor(mask_ids))
        elif mask_ids is not None:
            raise LayoutError("mask_ids given without mask_patterns")
        lay = cls(
            shape=(M, N),
            block_shape=(BR, BC),
            crow_ptr=i32(crow),
            col_idx=i32(cols),
            row_idx=i32(rows),
            ccol_ptr=i32(ccol),
            t_row_idx=i32(rows[t_perm]),
            t_perm=i32(t_perm),
            mask_ids=mask_ids,
            mask_patterns=mask_patterns,
        )
        lay._add_edge_mask()
        return lay

    def _add_edge_mask(self) -> None:
        """Mask the entries of edge blocks that stick out of the (M, N) matrix."""
        M, N = self.shape
        BR, BC = self.block_shape
        if M % BR == 0 and N % BC == 0 or self.nnzb == 0:
            return
        last_r, last_c = M // BR, N // BC  # block row/col that is partial, if any
        edge = ((self.row_idx.long() == last_r) & (M % BR != 0)) | ((self.col_idx.long() == last_c) & (N % BC != 0))
        if not bool(edge.any()):
            return
        dev = self.crow_ptr.device
        pats = self.mask_patterns if self.mask_patterns is not None else torch.ones(1, BR, BC, dtype=torch.bool, device=dev)
        ids = self.mask_ids.long() if self.mask_ids is not None else torch.zeros(self.nnzb, dtype=torch.int64, device=dev)
        rr = torch.arange(BR, device=dev)[:, None]
        cc = torch.arange(BC, device=dev)[None, :]
        rlim = torch.where(self.row_idx.long() == last_r, M - last_r * BR, BR)[edge]
        clim = torch.where(self.col_idx.long() == last_c, N - last_c * BC, BC)[edge]
        edge_masks = pats[ids[edge]] & (rr[None] < rlim[:, None, None]) & (cc[None] < clim[:, None, None])
        new_pats, inv = torch.unique(torch.cat([pats, edge_masks]).reshape(-1, BR * BC), dim=0, return_inverse=True)
        new_ids = inv[ids]
        new_ids[edge] = inv[pats.shape[0]:]
        object.__setattr__(self, "mask_patterns", new_pats.reshape(-1, BR, BC))
        object.__setattr__(self, "mask_ids", new_ids.to(torch.int32))

    @classmethod
    def from_dense_mask(cls, mask: torch.Tensor, block_shape: Tuple[int, int], device=None) -> "BSRLayout":
        """Layout storing every block that holds a True entry of the (M, N) boolean ``mask``;
        the element mask keeps exactly the True entries (``None`` if every stored block is full)."""
        mask = torch.as_tensor(mask).to(torch.bool).cpu()
        if mask.dim() != 2:
            raise LayoutError(f"expected a 2-D mask, got shape {tuple(mask.shape)}")
        M, N = mask.shape
        BR, BC = block_shape
        nbr, nbc = _cdiv(M, BR), _cdiv(N, BC)
        padded = torch.zeros(nbr * BR, nbc * BC, dtype=torch.bool)
        padded[:M, :N] = mask
        blocks = padded.reshape(nbr, BR, nbc, BC).permute(0, 2, 1, 3)
        r, c = torch.nonzero(blocks.any(dim=(2, 3)), as_tuple=True)
        bm = blocks[r, c]
        pats, ids = torch.unique(bm.reshape(-1, BR * BC), dim=0, return_inverse=True)
        if pats.shape[0] == 1 and bool(pats.all()):
            return cls.from_block_coords((M, N), (BR, BC), r, c, device=device)
        return cls.from_block_coords((M, N), (BR, BC), r, c, mask_ids=ids,
                                     mask_patterns=pats.reshape(-1, BR, BC), device=device)

    # ------------------------------------------------------------------ properties
    @property
    def nnzb(self) -> int:
        return int(self.col_idx.numel())

    @property
    def n_block_rows(self) -> int:
        return int(self.crow_ptr.numel()) - 1

    @property
    def n_block_cols(self) -> int:
        return int(self.ccol_ptr.numel()) - 1

    @property
    def device(self) -> torch.device:
        return self.crow_ptr.device

    @property
    def has_mask(self) -> bool:
        return self.mask_ids is not None

    def stored_entries(self) -> int:
        """Entries that may be non-zero (mask applied), i.e. the trainable weights."""
        BR, BC = self.block_shape
        if not self.has_mask:
            return self.nnzb * BR * BC
        per_pattern = self.mask_patterns.reshape(self.mask_patterns.shape[0], -1).sum(1)
        return int(per_pattern[self.mask_ids.long()].sum())

    def density(self) -> float:
        M, N = self.shape
        return self.stored_entries() / max(M * N, 1)

    def tensors(self) -> dict:
        """All index and mask tensors by name (mask entries may be None)."""
        return {f: getattr(self, f) for f in INDEX_FIELDS + MASK_FIELDS}

    def to(self, device) -> "BSRLayout":
        moved = {k: (v.to(device) if v is not None else None) for k, v in self.tensors().items()}
        return BSRLayout(shape=self.shape, block_shape=self.block_shape, **moved)

    def block_mask(self, dtype=torch.bool) -> torch.Tensor:
        """The element mask expanded to [nnzb, BR, BC] (all ones without a mask)."""
        BR, BC = self.block_shape
        if not self.has_mask:
            return torch.ones(self.nnzb, BR, BC, dtype=dtype, device=self.device)
        return self.mask_patterns[self.mask_ids.long()].to(dtype)

    def apply_mask(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` with every masked entry set to zero (a new tensor when a mask exists)."""
        if not self.has_mask:
            return values
        return values * self.block_mask(values.dtype).to(values.device)

    # ------------------------------------------------------------------ checks
    def validate(self, values: Optional[torch.Tensor] = None) -> "BSRLayout":
        """Raise ``LayoutError`` naming the first inconsistency; return self when sound."""
        M, N = self.shape
        BR, BC = self.block_shape
        nbr, nbc = _cdiv(M, BR), _cdiv(N, BC)
        for name in INDEX_FIELDS:
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor):
                raise LayoutError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
            if t.dtype != torch.int32:
                raise LayoutError(f"{name}: expected dtype int32, got {t.dtype}")
            if t.dim() != 1:
                raise LayoutError(f"{name}: expected a 1-D tensor, got shape {tuple(t.shape)}")
            if t.layout != torch.strided:
                raise LayoutError(f"{name}: expected a strided tensor, got layout {t.layout}")
            if t.device != self.device:
                raise LayoutError(f"{name}: on {t.device}, but crow_ptr is on {self.device}")
        if self.crow_ptr.numel() != nbr + 1:
            raise LayoutError(f"crow_ptr: expected {nbr + 1} entries for {M} rows in blocks of {BR}, got {self.crow_ptr.numel()}")
        if self.ccol_ptr.numel() != nbc + 1:
            raise LayoutError(f"ccol_ptr: expected {nbc + 1} entries for {N} cols in blocks of {BC}, got {self.ccol_ptr.numel()}")
        nnzb = self.nnzb
        for name in ("row_idx", "t_row_idx", "t_perm"):
            if getattr(self, name).numel() != nnzb:
                raise LayoutError(f"{name}: expected {nnzb} entries (one per stored block), got {getattr(self, name).numel()}")
        crow, col = self.crow_ptr.long().cpu(), self.col_idx.long().cpu()
        for name, ptr, total in (("crow_ptr", crow, nnzb), ("ccol_ptr", self.ccol_ptr.long().cpu(), nnzb)):
            if int(ptr[0]) != 0 or int(ptr[-1]) != total:
                raise LayoutError(f"{name}: must start at 0 and end at nnzb={total}, got {int(ptr[0])} .. {int(ptr[-1])}")
            if bool((ptr[1:] < ptr[:-1]).any()):
                i = int(torch.nonzero(ptr[1:] < ptr[:-1])[0])
                raise LayoutError(f"{name}: not monotone at position {i}: {int(ptr[i])} > {int(ptr[i + 1])}")
        if nnzb:
            if int(col.min()) < 0 or int(col.max()) >= nbc:
                raise LayoutError(f"col_idx: block columns must lie in [0, {nbc}), got [{int(col.min())}, {int(col.max())}]")
            rows = torch.repeat_interleave(torch.arange(nbr), crow[1:] - crow[:-1])
            if not torch.equal(rows, self.row_idx.long().cpu()):
                raise LayoutError("row_idx: does not match crow_ptr")
            same_row = rows[1:] == rows[:-1]
            bad = same_row & (col[1:] <= col[:-1])
            if bool(bad.any()):
                i = int(torch.nonzero(bad)[0])
                kind = "duplicate" if int(col[i + 1]) == int(col[i]) else "unsorted"
                raise LayoutError(f"col_idx: {kind} block columns in block row {int(rows[i])}: {int(col[i])} then {int(col[i + 1])}")
            perm = self.t_perm.long().cpu()
            if not torch.equal(torch.sort(perm)[0], torch.arange(nnzb)):
                raise LayoutError("t_perm: is not a permutation of the stored blocks")
            tkey = col[perm] * max(nbr, 1) + rows[perm]
            if bool((tkey[1:] <= tkey[:-1]).any()):
                raise LayoutError("t_perm: blocks are not in column-major order")
            if not torch.equal(rows[perm], self.t_row_idx.long().cpu()):
                raise LayoutError("t_row_idx: does not match row_idx[t_perm]")
            ccounts = torch.bincount(col, minlength=nbc)
            if not torch.equal(ccounts, self.ccol_ptr.long().cpu().diff()):
                raise LayoutError("ccol_ptr: does not match the column counts of col_idx")
        if (self.mask_ids is None) != (self.mask_patterns is None):
            raise LayoutError("mask_ids and mask_patterns must be given together")
        if self.mask_ids is not None:
            if self.mask_ids.dtype != torch.int32 or self.mask_ids.numel() != nnzb:
                raise LayoutError(f"mask_ids: expected int32 [{nnzb}], got {self.mask_ids.dtype} {tuple(self.mask_ids.shape)}")
            if self.mask_patterns.dtype != torch.bool or tuple(self.mask_patterns.shape[1:]) != (BR, BC):
                raise LayoutError(f"mask_patterns: expected bool [n, {BR}, {BC}], got {self.mask_patterns.dtype} {tuple(self.mask_patterns.shape)}")
            if nnzb and (int(self.mask_ids.min()) < 0 or int(self.mask_ids.max()) >= self.mask_patterns.shape[0]):
                raise LayoutError(f"mask_ids: pattern ids must lie in [0, {self.mask_patterns.shape[0]})")
        if values is not None:
            self.check_values(values)
        return self

    def check_values(self, values: torch.Tensor) -> None:
        BR, BC = self.block_shape
        if tuple(values.shape) != (self.nnzb, BR, BC):
            raise LayoutError(f"values: expected shape ({self.nnzb}, {BR}, {BC}), got {tuple(values.shape)}")

    # ------------------------------------------------------------------ conversions
    def transpose(self) -> "BSRLayout":
        """Layout of the (N, M) transpose. Its block k is block ``t_perm[k]`` of self, transposed:
        values follow as ``values[t_perm].transpose(1, 2)`` (the kernels never need this copy)."""
        M, N = self.shape
        BR, BC = self.block_shape
        cols = self.col_idx.long().cpu()[self.t_perm.long().cpu()]
        ids = self.mask_ids.long().cpu()[self.t_perm.long().cpu()] if self.has_mask else None
        pats = self.mask_patterns.transpose(1, 2).cpu() if self.has_mask else None
        return BSRLayout._from_sorted((N, M), (BC, BR), cols, self.t_row_idx.long().cpu(), ids, pats, self.device)

    def to_dense(self, values: torch.Tensor, max_bytes: Optional[int] = None) -> torch.Tensor:
        """The (M, N) dense matrix; refuses with a clear error when it would exceed ``max_bytes``."""
        self.check_values(values)
        M, N = self.shape
        BR, BC = self.block_shape
        need = M * N * values.element_size()
        if max_bytes is None:
            max_bytes = memory_budget_bytes()
        if need > max_bytes:
            raise MemoryError(
                f"dense matrix of shape ({M}, {N}) in {values.dtype} needs {need / 2**30:.2f} GiB, over the "
                f"{max_bytes / 2**30:.2f} GiB allowed (pass max_bytes to override)"
            )
        nbr, nbc = self.n_block_rows, self.n_block_cols
        out = values.new_zeros(nbr, nbc, BR, BC)
        out[self.row_idx.long(), self.col_idx.long()] = self.apply_mask(values)
        return out.permute(0, 2, 1, 3).reshape(nbr * BR, nbc * BC)[:M, :N]

    @staticmethod
    def from_dense(dense: torch.Tensor, block_shape: Tuple[int, int], mask: Optional[torch.Tensor] = None):
        """(layout, values) storing the blocks of ``dense`` (non-zero blocks, or those of ``mask``)."""
        if dense.dim() != 2:
            raise LayoutError(f"expected a 2-D matrix, got shape {tuple(dense.shape)}")
        support = (dense != 0) if mask is None else torch.as_tensor(mask, dtype=torch.bool, device=dense.device)
        if tuple(support.shape) != tuple(dense.shape):
            raise LayoutError(f"mask shape {tuple(support.shape)} does not match matrix shape {tuple(dense.shape)}")
        lay = BSRLayout.from_dense_mask(support, block_shape, device=dense.device)
        return lay, lay.gather_dense(dense)

    def gather_dense(self, dense: torch.Tensor) -> torch.Tensor:
        """Values [nnzb, BR, BC] of this layout read off a dense (M, N) matrix, mask applied."""
        M, N = self.shape
        if tuple(dense.shape) != (M, N):
            raise LayoutError(f"expected a dense matrix of shape ({M}, {N}), got {tuple(dense.shape)}")
        BR, BC = self.block_shape
        nbr, nbc = self.n_block_rows, self.n_block_cols
        padded = dense.new_zeros(nbr * BR, nbc * BC)
        padded[:M, :N] = dense
        blocks = padded.reshape(nbr, BR, nbc, BC).permute(0, 2, 1, 3)
        vals = blocks[self.row_idx.long().to(dense.device), self.col_idx.long().to(dense.device)].contiguous()
        return self.apply_mask(vals)

    def _require_whole_blocks(self, what: str) -> None:
        M, N = self.shape
        BR, BC = self.block_shape
        if M % BR or N % BC:
            raise LayoutError(f"{what} needs the shape to be a multiple of the block shape: got ({M}, {N}) "
                              f"with blocks ({BR}, {BC}); use to_dense() or a layout with whole blocks")

    def to_torch_bsr(self, values: torch.Tensor) -> torch.Tensor:
        """A ``torch.sparse_bsr_tensor`` of the same matrix (mask applied)."""
        self.check_values(values)
        self._require_whole_blocks("to_torch_bsr")
        return torch.sparse_bsr_tensor(self.crow_ptr.long(), self.col_idx.long(), self.apply_mask(values),
                                       size=self.shape, dtype=values.dtype, device=values.device)

    @staticmethod
    def from_torch_bsr(t: torch.Tensor):
        """(layout, values) from a ``torch.sparse_bsr_tensor``."""
        if t.layout != torch.sparse_bsr:
            raise LayoutError(f"expected a torch.sparse_bsr tensor, got layout {t.layout}")
        vals = t.values()
        block_shape = tuple(vals.shape[1:])
        crow = t.crow_indices().long().cpu()
        rows = torch.repeat_interleave(torch.arange(crow.numel() - 1), crow.diff())
        lay = BSRLayout.from_block_coords(tuple(t.shape), block_shape, rows, t.col_indices().long().cpu(), device=vals.device)
        lay.validate()
        return lay, vals.contiguous()

    def to_scipy(self, values: torch.Tensor):
        """A ``scipy.sparse.bsr_matrix`` of the same matrix (mask applied)."""
        import scipy.sparse as sp

        self.check_values(values)
        self._require_whole_blocks("to_scipy")
        data = self.apply_mask(values).detach().cpu().numpy()
        return sp.bsr_matrix((data, self.col_idx.cpu().numpy().astype(np.int32),
                              self.crow_ptr.cpu().numpy().astype(np.int32)), shape=self.shape)

    @staticmethod
    def from_scipy(m):
        """(layout, values) from a ``scipy.sparse.bsr_matrix`` (duplicates summed, columns sorted)."""
        import scipy.sparse as sp

        m = sp.bsr_matrix(m, copy=True)
        m.sum_duplicates()
        m.sort_indices()
        crow = torch.from_numpy(m.indptr.astype(np.int64))
        rows = torch.repeat_interleave(torch.arange(crow.numel() - 1), crow.diff())
        lay = BSRLayout.from_block_coords(m.shape, m.blocksize, rows, torch.from_numpy(m.indices.astype(np.int64)))
        return lay, torch.from_numpy(np.ascontiguousarray(m.data))

    def __repr__(self) -> str:
        M, N = self.shape
        BR, BC = self.block_shape
        masks = f", mask_patterns={self.mask_patterns.shape[0]}" if self.has_mask else ""
        return (f"BSRLayout(shape=({M}, {N}), block_shape=({BR}, {BC}), nnzb={self.nnzb}, "
                f"block_density={self.nnzb / max(self.n_block_rows * self.n_block_cols, 1):.4f}{masks}, device={self.device})")


def memory_budget_bytes() -> int:
    """Half of the physical memory: a dense matrix larger than that would not fit usefully."""
    try:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30
