"""grad_weight accumulated in place into an existing ``values.grad`` (no dW temporary)."""

import pytest
import torch
import torch.nn as nn
from conftest import CPU_BACKENDS, require_cpu_backend

import efcn_sparse
from efcn_sparse import SparseEFCN, ops
from efcn_sparse.kernels import reference

BACKENDS = list(CPU_BACKENDS)  # one missing here skips (fails under EFCN_REQUIRE), never drops out silently
FUSED = [b for b in BACKENDS if b != "cpu"]  # the cpu backend falls back to out += grad_weight


def _layers(backend, seed=0):
    """Two identical layers with masked entries inside stored blocks; one accumulates in place."""
    require_cpu_backend(backend)
    torch.manual_seed(seed)
    conv = nn.Conv2d(6, 16, 3, padding=1, groups=2)
    plain = SparseEFCN.from_conv(conv, (5, 5), halo=1, backend=backend)
    fused = SparseEFCN.from_conv(conv, (5, 5), halo=1, backend=backend)
    with torch.no_grad():
        noise = plain.layout.apply_mask(0.1 * torch.randn_like(plain.values))
        plain.values.add_(noise)
        fused.values.add_(noise)
    fused.accumulate_grad = True
    return plain, fused


def _steps(m, xs):
    for x in xs:
        m(x).square().sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_accumulated_gradient_equals_autograds_to_the_bit(backend):
    plain, fused = _layers(backend)
    xs = [torch.randn(5, 6, 5, 5) for _ in range(3)]
    _steps(plain, xs)
    _steps(fused, xs[:1])
    grad = fused.values.grad
    _steps(fused, xs[1:])
    assert fused.values.grad is grad  # the same tensor, updated in place
    assert torch.equal(fused.values.grad, plain.values.grad)
    assert torch.equal(fused.bias.grad, plain.bias.grad)
    masked = ~fused.layout.block_mask()
    assert masked.any() and (fused.values.grad[masked] == 0).all()  # raw gradient at masked entries


@pytest.mark.parametrize("backend", FUSED)
def test_fused_backends_never_materialise_dw(backend, monkeypatch):
    _, fused = _layers(backend)
    x = torch.randn(4, 6, 5, 5)
    _steps(fused, [x])  # no .grad yet: the ordinary path
    kernels = efcn_sparse.backends.kernels(backend)

    def no_temporary(*args, **kwargs):
        raise AssertionError("grad_weight materialised dW although .grad exists")

    monkeypatch.setattr(kernels, "grad_weight", no_temporary)
    expected = 2 * fused.values.grad.clone()
    _steps(fused, [x])
    torch.testing.assert_close(fused.values.grad, expected, rtol=1e-6, atol=1e-6)


def test_zero_grad_without_set_to_none_keeps_one_gradient_buffer():
    _, fused = _layers("reference")
    opt = torch.optim.SGD(fused.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(4, 6, 5, 5)
    _steps(fused, [x])
    buf = fused.values.grad.data_ptr()
    for _ in range(3):
        opt.zero_grad(set_to_none=False)
        _steps(fused, [x])
        opt.step()
        assert fused.values.grad.data_ptr() == buf
    masked = ~fused.layout.block_mask()
    assert (fused.values.detach()[masked] == 0).all()


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("why", ["hook", "create_graph", "autocast"])
def test_falls_back_to_autograd_where_in_place_would_be_wrong(why):
    plain, fused = _layers("reference")
    xs = [torch.randn(4, 6, 5, 5) for _ in range(2)]
    seen = []
    if why == "hook":
        fused.values.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.clone()))
    for m in (plain, fused):
        for x in xs:
            if why == "autocast":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = m(x).float().square().sum()
                loss.backward()
            else:
                m(x).square().sum().backward(create_graph=why == "create_graph")
    assert torch.equal(fused.values.grad, plain.values.grad)
    if why == "hook":
        assert len(seen) == 2 and torch.equal(seen[-1], plain.values.grad)  # the hook saw every gradient


def _op_case(batch, dtype=torch.float32, backend="reference"):
    """(layout, dy, x, out) for the op: random operands, ``out`` zero at masked entries."""
    lay = _layers(backend)[0].layout
    (M, N), (BR, BC) = lay.shape, lay.block_shape
    dy, x = torch.randn(batch, M, dtype=dtype), torch.randn(batch, N, dtype=dtype)
    return lay, dy, x, lay.apply_mask(torch.randn(lay.nnzb, BR, BC)).to(dtype)


@pytest.mark.parametrize("backend,dtype", [
    (b, d) for b in BACKENDS for d in (torch.float32, torch.bfloat16, torch.float64)
    if not (b == "triton" and d == torch.bfloat16)  # the Triton interpreter has no bfloat16
], ids=str)
def test_op_adds_dw_to_out_as_out_plus_grad_weight_does(backend, dtype):
    lay, dy, x, out = _op_case(7, dtype, backend)
    BR, BC = lay.block_shape
    dw = ops.bsr_grad_weight(dy, x, lay.row_idx, lay.col_idx, lay.mask_ids, lay.mask_patterns, BR, BC, backend)
    expected = out + dw
    ops.bsr_grad_weight_acc(out, dy, x, lay.row_idx, lay.col_idx, lay.mask_ids, lay.mask_patterns, backend)
    assert torch.equal(out, expected)


def test_op_leaves_masked_entries_exactly_as_they_are_for_non_finite_inputs():
    lay, dy, x, out = _op_case(3)
    x[0, 0] = float("inf")
    x[1, 1] = float("nan")
    for backend in BACKENDS:
        o = out.clone()
        ops.bsr_grad_weight_acc(o, dy, x, lay.row_idx, lay.col_idx, lay.mask_ids, lay.mask_patterns, backend)
        assert (o[~lay.block_mask()] == 0).all(), backend


def test_op_refuses_a_mismatched_out():
    lay, dy, x, _ = _op_case(3)
    BR, BC = lay.block_shape
    with pytest.raises(TypeError, match="one dtype"):
        ops.bsr_grad_weight_acc(torch.zeros(lay.nnzb, BR, BC, dtype=torch.float64), dy, x, lay.row_idx, lay.col_idx,
                                lay.mask_ids, lay.mask_patterns, "reference")
    with pytest.raises(ValueError, match="contiguous"):
        ops.bsr_grad_weight_acc(torch.zeros(lay.nnzb + 1, BR, BC), dy, x, lay.row_idx, lay.col_idx,
                                lay.mask_ids, lay.mask_patterns, "reference")


def test_opcheck():
    lay, dy, x, out = _op_case(3)
    args = (out, dy, x, lay.row_idx, lay.col_idx, lay.mask_ids, lay.mask_patterns, "reference")
    torch.library.opcheck(ops.bsr_grad_weight_acc, args)


def test_reference_kernel_rounds_like_the_unfused_sum_in_bfloat16():
    lay, dy, x, out = _op_case(9, torch.bfloat16)
    BR, BC = lay.block_shape
    expected = out + reference.grad_weight(dy, x, lay.row_idx, lay.col_idx, lay.mask_ids, lay.mask_patterns, BR, BC)
    reference.grad_weight_acc(out, dy, x, lay.row_idx, lay.col_idx, lay.mask_ids, lay.mask_patterns)
    assert torch.equal(out, expected)
