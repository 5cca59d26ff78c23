"""The three custom ops: registration (opcheck), gradients (gradcheck), compile, backend choice."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import assert_close_rel, poison_one_sample
from test_conv_embedding import _weight_grad_in_kernel_shape
from test_layout import random_layout

import efcn_sparse
from efcn_sparse import SparseEFCN, backends, ops


def _args(lay, vals, x, bias, backend="reference"):
    return (x, vals, bias, lay.crow_ptr, lay.col_idx, lay.row_idx, lay.ccol_ptr, lay.t_row_idx, lay.t_perm,
            lay.mask_ids, lay.mask_patterns, lay.shape[0], backend)


@pytest.mark.parametrize("masked", [False, True])
def test_reference_ops_match_dense_products(masked):
    lay, vals, dense = random_layout(M=37, N=50, masked=masked)
    x = torch.randn(6, 50, dtype=torch.float64)
    b = torch.randn(37, dtype=torch.float64)
    y = ops.bsr_linear(*_args(lay, vals, x, b))
    torch.testing.assert_close(y, x @ dense.T + b)
    dy = torch.randn(6, 37, dtype=torch.float64)
    dx = ops.bsr_grad_input(dy, vals, lay.ccol_ptr, lay.t_row_idx, lay.t_perm, 50, "reference")
    torch.testing.assert_close(dx, dy @ dense)
    dw = ops.bsr_grad_weight(dy, x, lay.row_idx, lay.col_idx, lay.mask_ids, lay.mask_patterns, 8, 8, "reference")
    support = lay.to_dense(torch.ones_like(vals)) != 0
    torch.testing.assert_close(lay.to_dense(dw), (dy.T @ x) * support)
    # to_dense re-applies the mask: the raw gradient must itself be zero at masked entries
    assert (dw[~lay.block_mask()] == 0).all()


@pytest.mark.parametrize("masked", [False, True])
def test_opcheck_passes_for_all_three_ops(masked):
    lay, vals, _ = random_layout(M=24, N=40, masked=masked, dtype=torch.float32)
    x = torch.randn(3, 40, requires_grad=True)
    vals.requires_grad_(True)
    b = torch.randn(24, requires_grad=True)
    torch.library.opcheck(ops.bsr_linear, _args(lay, vals, x, b))
    torch.library.opcheck(ops.bsr_linear, _args(lay, vals, x, None))
    dy = torch.randn(3, 24)
    torch.library.opcheck(ops.bsr_grad_input, (dy, vals.detach(), lay.ccol_ptr, lay.t_row_idx, lay.t_perm, 40, "reference"))
    torch.library.opcheck(ops.bsr_grad_weight, (dy, x.detach(), lay.row_idx, lay.col_idx, lay.mask_ids,
                                                lay.mask_patterns, 8, 8, "reference"))


@pytest.mark.parametrize("backend", [b for b in ("reference", "cpu") if b in efcn_sparse.available_backends("cpu")])
def test_opcheck_passes_with_float32_values_and_bfloat16_operands(backend):
    """autocast's float32 master values handed to the ops uncast: registrations (fake dtype of
    dW, autograd) hold for the mixed call too."""
    lay, vals, _ = random_layout(M=24, N=40, masked=True, dtype=torch.float32)
    x = torch.randn(3, 40).bfloat16().requires_grad_(True)
    vals.requires_grad_(True)
    b = torch.randn(24).bfloat16().requires_grad_(True)
    torch.library.opcheck(ops.bsr_linear, _args(lay, vals, x, b, backend))
    dy = torch.randn(3, 24).bfloat16()
    torch.library.opcheck(ops.bsr_grad_input, (dy, vals.detach(), lay.ccol_ptr, lay.t_row_idx, lay.t_perm, 40, backend))
    gw = (dy, x.detach(), lay.row_idx, lay.col_idx, lay.mask_ids, lay.mask_patterns, 8, 8, backend, torch.float32)
    torch.library.opcheck(ops.bsr_grad_weight, gw)
    torch.library.opcheck(ops.bsr_grad_weight_bias, gw)
    dw, db = ops.bsr_grad_weight_bias(*gw)
    assert dw.dtype == torch.float32 and db.dtype == torch.bfloat16
    assert torch.equal(dw, ops.bsr_grad_weight(*gw[:-1]).float())


def test_grad_weight_refuses_a_dw_dtype_it_cannot_give():
    lay, _, _ = random_layout(M=24, N=40)
    dy, x = torch.randn(3, 24), torch.randn(3, 40)
    args = (lay.row_idx, lay.col_idx, lay.mask_ids, lay.mask_patterns, 8, 8, "reference")
    with pytest.raises(TypeError, match="dw_dtype must be dy's dtype"):
        ops.bsr_grad_weight(dy, x, *args, torch.float64)
    with pytest.raises(TypeError, match="dw_dtype must be dy's dtype"):
        ops.bsr_grad_weight_bias(dy.bfloat16(), x.bfloat16(), *args, torch.float16)
    with pytest.raises(TypeError, match="does not match the weights' dtype"):  # float32 x, bfloat16 values
        ops.bsr_linear(*_args(lay, torch.randn(lay.nnzb, 8, 8).bfloat16(), torch.randn(3, 40), None))


@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck_in_float64(masked):
    lay, vals, _ = random_layout(M=20, N=28, block=(8, 4), masked=masked)
    mask = lay.block_mask(torch.float64)
    x = torch.randn(3, 28, dtype=torch.float64, requires_grad=True)
    v = vals.clone().requires_grad_(True)
    b = torch.randn(20, dtype=torch.float64, requires_grad=True)
    # values outside the mask are structural zeros: the op's gradient there is zero by contract
    assert torch.autograd.gradcheck(lambda x, v, b: ops.linear(x, lay, v * mask, b, backend="reference"), (x, v, b))


def test_masked_entries_get_exactly_zero_gradient():
    lay, vals, _ = random_layout(masked=True)
    v = vals.clone().requires_grad_(True)
    x = torch.randn(4, lay.shape[1], dtype=torch.float64)
    ops.linear(x, lay, v, backend="reference").square().sum().backward()
    assert (v.grad[~lay.block_mask()] == 0).all()
    assert (v.grad[lay.block_mask()] != 0).any()


def test_masked_grad_weight_is_zero_even_for_non_finite_products(cpu_backend):
    """Masked entries of dW are exactly 0 even where dy^T x is inf or NaN there (multiplying by
    the mask would leave NaN), through the op and through autograd, on every CPU backend."""
    lay, vals, _ = random_layout(M=40, N=56, block=(16, 16), masked=True, dtype=torch.float32)
    mask = lay.block_mask()
    assert (~mask).any()
    x = poison_one_sample(torch.randn(3, 56))
    dy = torch.randn(3, 40)
    dw = ops.bsr_grad_weight(dy, x, lay.row_idx, lay.col_idx, lay.mask_ids, lay.mask_patterns, 16, 16, cpu_backend)
    assert not torch.isfinite(dw[mask]).any(), "the poisoned sample must reach every stored entry"
    assert (dw[~mask] == 0).all(), f"{cpu_backend}: masked entries of grad_weight are not exactly zero"
    v = vals.clone().requires_grad_(True)
    ops.linear(x, lay, v, backend=cpu_backend).backward(dy)
    assert (v.grad[~mask] == 0).all(), f"{cpu_backend}: masked entries of values.grad are not exactly zero"


def test_torch_compile_fullgraph_matches_the_cnn():
    """Compiled forward and backward against the CNN itself (conv weight gradient summed back)."""
    conv = nn.Conv2d(4, 16, 3, padding=1)
    head = nn.Linear(16 * 36, 3)
    model = nn.Sequential(SparseEFCN.from_conv(conv, (6, 6), halo=1), nn.ReLU(), nn.Flatten(), head)
    cnn = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), head)
    x = torch.randn(5, 4, 6, 6)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    assert_close_rel(y, cnn(x), 1e-5, "compiled vs CNN")
    g = torch.randn_like(y)
    y.backward(g)
    cnn(x).backward(g)
    m = model[0]
    dw = _weight_grad_in_kernel_shape(m, m.layout.to_dense(m.values.grad))
    assert_close_rel(dw, conv.weight.grad, 1e-4, "compiled weight gradient vs CNN")
    assert_close_rel(m.bias.grad.reshape(-1, 16).sum(0), conv.bias.grad, 1e-4, "compiled bias gradient vs CNN")


def test_torch_compile_inductor_matches_the_conv():
    conv = nn.Conv2d(2, 16, 3, padding=1)
    m = SparseEFCN.from_conv(conv, (4, 4))
    x = torch.randn(3, 2, 4, 4)
    assert_close_rel(torch.compile(m, fullgraph=True)(x), F.conv2d(x, conv.weight, conv.bias, padding=1), 1e-5)


def test_unknown_backend_is_rejected():
    lay, vals, _ = random_layout()
    x = torch.randn(2, lay.shape[1], dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown backend 'fast'.*expected one of"):
        ops.linear(x, lay, vals, backend="fast")


def test_unavailable_backend_says_why():
    with pytest.raises(backends.BackendUnavailable, match="'cuda' cannot run on cpu"):
        backends.resolve("cuda", "cpu")


def test_default_backend_can_be_set_globally():
    old = efcn_sparse.get_default_backend()
    try:
        efcn_sparse.set_default_backend("reference")
        assert backends.resolve(None, "cpu") == "reference"
        with pytest.raises(ValueError):
            efcn_sparse.set_default_backend("nope")
    finally:
        efcn_sparse.set_default_backend(old)
    assert "reference" in efcn_sparse.available_backends("cpu")


def test_op_rejects_mismatched_operands():
    lay, vals, _ = random_layout()
    with pytest.raises(TypeError, match="dtype"):
        ops.linear(torch.randn(2, lay.shape[1]), lay, vals)
    with pytest.raises(ValueError, match="features"):
        ops.linear(torch.randn(2, lay.shape[1] + 1, dtype=torch.float64), lay, vals)
    with pytest.raises(ValueError, match="bias"):
        ops.linear(torch.randn(2, lay.shape[1], dtype=torch.float64), lay, vals, torch.zeros(3, dtype=torch.float64))
