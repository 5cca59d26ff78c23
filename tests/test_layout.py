"""BSRLayout: construction, validation of every kind of corruption, conversions, transpose."""

import dataclasses

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from efcn_sparse import BSRLayout, LayoutError


def random_layout(M=40, N=56, block=(8, 8), density=0.4, empty_row=True, empty_col=True, masked=False, seed=0,
                  dtype=torch.float64):
    """A random (layout, values, dense) triple with empty block rows/cols and optional masks."""
    g = torch.Generator().manual_seed(seed)
    BR, BC = block
    nbr, nbc = -(-M // BR), -(-N // BC)
    keep = torch.rand(nbr, nbc, generator=g) < density
    if empty_row:
        keep[nbr // 2] = False
    if empty_col:
        keep[:, nbc // 3] = False
    mask = keep.repeat_interleave(BR, 0).repeat_interleave(BC, 1)[:M, :N]
    if masked:
        mask &= torch.rand(M, N, generator=g) < 0.7
    dense = torch.randn(M, N, generator=g, dtype=dtype) * mask
    lay, vals = BSRLayout.from_dense(dense, block, mask=mask)
    return lay, vals, dense


def test_from_dense_round_trips_with_edge_blocks_and_masks():
    lay, vals, dense = random_layout(M=37, N=50, masked=True)
    lay.validate(vals)
    assert lay.has_mask
    torch.testing.assert_close(lay.to_dense(vals), dense, rtol=0, atol=0)
    assert lay.stored_entries() == int((lay.to_dense(torch.ones_like(vals)) != 0).sum())


def test_index_arrays_are_int32_and_consistent():
    lay, _, _ = random_layout()
    for name in ("crow_ptr", "col_idx", "row_idx", "ccol_ptr", "t_row_idx", "t_perm"):
        assert getattr(lay, name).dtype == torch.int32
        assert getattr(lay, name).layout == torch.strided
    crow = lay.crow_ptr.long()
    assert (crow.diff() == 0).any(), "an empty block row is expected"
    assert (lay.ccol_ptr.long().diff() == 0).any(), "an empty block column is expected"


def test_transpose_layout_gives_the_transposed_matrix_without_reordering_values():
    lay, vals, dense = random_layout(M=45, N=30, block=(16, 8), masked=True)
    t = lay.transpose()
    t.validate()
    tvals = vals[lay.t_perm.long()].transpose(1, 2)
    torch.testing.assert_close(t.to_dense(tvals), dense.T, rtol=0, atol=0)
    x = torch.randn(5, 45, dtype=torch.float64)
    torch.testing.assert_close(x @ lay.to_dense(vals), x @ t.to_dense(tvals).T)


def test_torch_bsr_and_scipy_round_trips():
    lay, vals, dense = random_layout(M=48, N=64, block=(16, 8))
    tb = lay.to_torch_bsr(vals)
    torch.testing.assert_close(tb.to_dense(), dense)
    lay2, vals2 = BSRLayout.from_torch_bsr(tb)
    torch.testing.assert_close(lay2.to_dense(vals2), dense)
    sm = lay.to_scipy(vals)
    np.testing.assert_allclose(sm.toarray(), dense.numpy())
    lay3, vals3 = BSRLayout.from_scipy(sm)
    torch.testing.assert_close(lay3.to_dense(vals3), dense)
    x = np.random.default_rng(0).standard_normal((64, 3))
    np.testing.assert_allclose(sm @ x, dense.numpy() @ x, rtol=1e-12)


def test_scipy_input_with_unsorted_duplicate_blocks_is_normalised():
    data = np.arange(3 * 4, dtype=np.float64).reshape(3, 2, 2) + 1
    m = sp.bsr_matrix((data, np.array([1, 0, 1]), np.array([0, 3, 3])), shape=(4, 4))
    lay, vals = BSRLayout.from_scipy(m)
    lay.validate(vals)
    np.testing.assert_allclose(lay.to_dense(vals).numpy(), m.toarray())


def test_conversions_that_need_whole_blocks_say_so():
    lay, vals, _ = random_layout(M=37, N=50)
    with pytest.raises(LayoutError, match="multiple of the block shape"):
        lay.to_torch_bsr(vals)
    with pytest.raises(LayoutError, match="multiple of the block shape"):
        lay.to_scipy(vals)


def test_empty_layout():
    lay = BSRLayout.from_block_coords((32, 16), (16, 16), [], [])
    lay.validate()
    vals = torch.zeros(0, 16, 16)
    assert lay.to_dense(vals).shape == (32, 16)
    assert lay.nnzb == 0 and lay.stored_entries() == 0


def _corrupt(lay, **changes):
    return dataclasses.replace(lay, **changes)


@pytest.mark.parametrize("mutate,match", [
    (lambda l: _corrupt(l, crow_ptr=l.crow_ptr.flip(0).contiguous()), "crow_ptr"),
    (lambda l: _corrupt(l, crow_ptr=torch.cat([l.crow_ptr[:2], l.crow_ptr[1:2] - 1, l.crow_ptr[3:]])), "crow_ptr"),
    (lambda l: _corrupt(l, crow_ptr=l.crow_ptr[:-1]), "crow_ptr"),
    (lambda l: _corrupt(l, col_idx=torch.where(l.col_idx == l.col_idx.max(), 99, l.col_idx).int()), "col_idx: block columns must lie in"),
    (lambda l: _corrupt(l, col_idx=torch.cat([l.col_idx[1:2], l.col_idx[0:1], l.col_idx[2:]])), "col_idx|row_idx"),
    (lambda l: _corrupt(l, col_idx=l.col_idx.long()), "int32"),
    (lambda l: _corrupt(l, row_idx=l.row_idx[:-1]), "row_idx"),
    (lambda l: _corrupt(l, t_perm=torch.zeros_like(l.t_perm)), "t_perm"),
    (lambda l: _corrupt(l, t_row_idx=l.t_row_idx.flip(0).contiguous()), "t_row_idx"),
    (lambda l: _corrupt(l, ccol_ptr=l.ccol_ptr.clone().index_fill_(0, torch.tensor([1]), 0)), "ccol_ptr"),
    (lambda l: _corrupt(l, mask_ids=torch.full_like(l.mask_ids, 1000)), "mask_ids"),
    (lambda l: _corrupt(l, mask_patterns=None), "mask_ids and mask_patterns"),
    (lambda l: _corrupt(l, col_idx=l.col_idx.reshape(1, -1)), "1-D"),
])
def test_validate_catches_corruption(mutate, match):
    lay, _, _ = random_layout(M=64, N=64, block=(8, 8), density=0.6, empty_row=False, empty_col=False, masked=True)
    lay.validate()
    with pytest.raises(LayoutError, match=match):
        mutate(lay).validate()


def test_validate_catches_duplicate_columns_in_a_row():
    crow = torch.tensor([0, 2, 2], dtype=torch.int32)
    col = torch.tensor([1, 1], dtype=torch.int32)
    row = torch.tensor([0, 0], dtype=torch.int32)
    lay = BSRLayout((16, 32), (8, 8), crow, col, row, torch.tensor([0, 0, 2, 2, 2], dtype=torch.int32),
                    row.clone(), torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(LayoutError, match="duplicate"):
        lay.validate()


def test_values_shape_mismatch_is_reported():
    lay, vals, _ = random_layout()
    with pytest.raises(LayoutError, match="values: expected shape"):
        lay.validate(vals[:, :, :-1])


def test_block_coords_reject_duplicates_and_out_of_range():
    with pytest.raises(LayoutError, match="duplicate"):
        BSRLayout.from_block_coords((32, 32), (16, 16), [0, 0], [1, 1])
    with pytest.raises(LayoutError, match="out of range"):
        BSRLayout.from_block_coords((32, 32), (16, 16), [0, 2], [1, 1])


def test_to_dense_refuses_when_too_large():
    lay = BSRLayout.from_block_coords((2**20, 2**20), (64, 64), [0], [0])
    with pytest.raises(MemoryError, match=r"\(1048576, 1048576\).*GiB"):
        lay.to_dense(torch.zeros(1, 64, 64))


def test_layout_moves_between_devices_and_keeps_structure():
    lay, vals, dense = random_layout(masked=True)
    moved = lay.to("meta")
    assert moved.device.type == "meta" and moved.nnzb == lay.nnzb and moved.has_mask
    assert moved.shape == lay.shape and moved.block_shape == lay.block_shape
    for name, t in lay.tensors().items():  # every index and mask tensor moved, dtype and shape kept
        m = moved.tensors()[name]
        assert m.device.type == "meta" and m.dtype == t.dtype and m.shape == t.shape, name
    back = lay.to("cpu")
    for name, t in lay.tensors().items():
        assert torch.equal(back.tensors()[name], t), name
    torch.testing.assert_close(back.validate(vals).to_dense(vals), dense, rtol=0, atol=0)
    with pytest.raises(NotImplementedError):  # meta -> cpu cannot invent the indices
        moved.to("cpu")
