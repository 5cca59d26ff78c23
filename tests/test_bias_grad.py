"""The bias gradient with the weight gradient (``ops.bsr_grad_weight_bias``): where both are
needed, the backward gets them from one op, and the ``cpu`` kernel sums dY over the batch in the
pass that packs dY for grad_weight instead of another pass over it. Every backend agrees with a
float64 sum; the fused and unfused sums of the cpu kernel give the same bits on every ISA and
thread count; the module's bias gradient is the conv's, position by position."""

import pytest
import torch
import torch.nn as nn

from conftest import assert_close_rel
from efcn_sparse import SparseEFCN, backends, ops
from efcn_sparse.kernels import cpu
from test_cpu_backend import random_layout

REL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2}

# wide blocks (fused on AVX-512 where the block height is a multiple of 8), narrow ones, and
# heights that are not (summed after the pass)
SHAPES = [
    (130, 200, 48, 40, dict(mask=True)),
    (300, 260, 64, 64, dict(density=0.6, full_row=True)),
    (130, 61, 64, 3, dict(mask=True)),
    (70, 300, 3, 64, dict(mask=True)),
    (90, 75, 12, 16, {}),
]


def _case(shape, B, dtype, seed=0):
    torch.manual_seed(seed)
    M, N, BR, BC, opts = shape
    lay = random_layout(M, N, BR, BC, **opts)
    return lay, torch.randn(B, M).to(dtype), torch.randn(B, N).to(dtype)


def _call(lay, dy, x, backend):
    return ops.bsr_grad_weight_bias(dy, x, lay.row_idx, lay.col_idx, lay.mask_ids, lay.mask_patterns,
                                    *lay.block_shape, backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}_b{s[2]}x{s[3]}")
@pytest.mark.parametrize("B", [1, 13, 40])
def test_each_backend_returns_grad_weight_and_the_batch_sum(cpu_backend, shape, B, dtype):
    if dtype not in getattr(backends.kernels(cpu_backend), "DTYPES", (dtype,)):
        pytest.skip(f"{cpu_backend} has no {dtype}")
    lay, dy, x = _case(shape, B, dtype)
    dw, db = _call(lay, dy, x, cpu_backend)
    want_dw = ops.bsr_grad_weight(dy, x, lay.row_idx, lay.col_idx, lay.mask_ids, lay.mask_patterns,
                                  *lay.block_shape, cpu_backend)
    assert torch.equal(dw, want_dw), "dW must be grad_weight's, bit for bit"
    assert db.dtype == dtype and db.shape == (lay.shape[0],)
    assert_close_rel(db.double(), dy.double().sum(0), REL[dtype], f"{cpu_backend} db")


def test_empty_batch_gives_zeros(cpu_backend):
    lay, dy, x = _case(SHAPES[0], 0, torch.float32)
    dw, db = _call(lay, dy, x, cpu_backend)
    assert torch.equal(dw, torch.zeros_like(dw)) and torch.equal(db, torch.zeros(lay.shape[0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cpu_sum_is_the_same_fused_or_not_on_every_isa_and_thread_count(dtype):
    """AVX-512 fuses the sum into its pass over dY (block height 64 here); AVX2 and the portable
    kernels sum afterwards: the same blocked order, the same bits, whatever the threads."""
    if backends.unavailable_reason("cpu", "cpu") is not None:
        pytest.skip("cpu backend unavailable")
    lay, dy, x = _case(SHAPES[1], 77, dtype, seed=5)
    before, threads = cpu.isa(), torch.get_num_threads()
    sums = []
    try:
        for name in cpu.supported_isas():
            cpu.isa(name)
            for t in (1, max(2, threads)):
                torch.set_num_threads(t)
                sums.append(_call(lay, dy, x, "cpu")[1])
    finally:
        cpu.isa(before)
        torch.set_num_threads(threads)
    assert all(torch.equal(s, sums[0]) for s in sums)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cpu_bias_grad_alone_has_the_fused_sums_bits(dtype):
    """The backward's unfused paths (in-place accumulation, no weight gradient) sum the bias
    gradient with the same bits as the fused one."""
    if backends.unavailable_reason("cpu", "cpu") is not None:
        pytest.skip("cpu backend unavailable")
    lay, dy, x = _case(SHAPES[1], 41, dtype, seed=2)
    assert torch.equal(cpu.bias_grad(dy), _call(lay, dy, x, "cpu")[1])


def test_opcheck():
    lay, dy, x = _case(SHAPES[0], 5, torch.float32)
    for backend in ("reference", "cpu") if backends.unavailable_reason("cpu", "cpu") is None else ("reference",):
        args = (dy, x, lay.row_idx, lay.col_idx, lay.mask_ids, lay.mask_patterns, *lay.block_shape, backend)
        torch.library.opcheck(ops.bsr_grad_weight_bias, args)


@pytest.mark.parametrize("input_grad", [True, False], ids=["x-grad", "no-x-grad"])
def test_module_bias_gradient_is_the_convs(cpu_backend, input_grad):
    torch.manual_seed(3)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    m = SparseEFCN.from_conv(conv, (6, 6), backend=cpu_backend)
    img = torch.randn(5, 8, 6, 6, requires_grad=input_grad)
    g = torch.randn(5, 16, 6, 6)
    m(img).backward(g)
    conv(img).backward(g)
    # one bias entry per output position (NHWC order): their per-channel sums are the conv's
    per_position = g.permute(0, 2, 3, 1).reshape(5, -1).double().sum(0)
    assert_close_rel(m.bias.grad.double(), per_position, 1e-6, f"{cpu_backend} bias grad")
    assert_close_rel(m.bias.grad.view(36, 16).sum(0), conv.bias.grad, 1e-5, f"{cpu_backend} vs conv")
