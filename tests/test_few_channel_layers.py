"""Layers with few input or output channels (an RGB or grey input layer) are stored tight: at
most 1.5x the entries their support needs, whatever the kernel, stride, dilation, groups, padding
or halo, and every backend that runs here computes them exactly."""

import pytest
import torch
import torch.nn as nn
from conftest import assert_close_rel
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from efcn_sparse import SparseEFCN, backends, embed
from efcn_sparse.conv_geometry import ConvGeometry, build_layout
from efcn_sparse.models import paper_cnn

MODES = ["zeros", "reflect", "replicate", "circular"]


def _useful(geo: ConvGeometry, halo) -> int:
    """Entries the support needs, from the geometry alone: every in-group channel pair of every
    stored pixel pair."""
    return int(geo.support_pairs(halo).numel()) * geo.out_channels * (geo.in_channels // geo.groups)


def _geometry(cfg, size):
    """The conv's geometry, or None where PyTorch rejects the configuration."""
    conv = nn.Conv2d(**cfg)
    try:
        conv(torch.zeros(1, cfg["in_channels"], *size))
    except RuntimeError:
        return None
    return ConvGeometry.from_conv(conv, size)


@st.composite
def few_channel_convs(draw):
    few = draw(st.integers(1, 4))
    groups = draw(st.sampled_from([d for d in range(1, few + 1) if few % d == 0]))
    many = groups * draw(st.sampled_from([1, 2, 3, 5, 8, 12, 16, 24, 33, 48, 64, 67, 100]))
    cin, cout = (many, few) if draw(st.booleans()) and many > 4 else (few, many)
    cfg = dict(in_channels=cin, out_channels=cout, groups=groups,
               kernel_size=(draw(st.integers(1, 5)), draw(st.integers(1, 5))),
               stride=(draw(st.integers(1, 3)), draw(st.integers(1, 3))),
               dilation=(draw(st.integers(1, 3)), draw(st.integers(1, 3))),
               padding=(draw(st.integers(0, 3)), draw(st.integers(0, 3))), padding_mode=draw(st.sampled_from(MODES)))
    size = (draw(st.integers(1, 10)), draw(st.integers(1, 10)))
    return cfg, size, draw(st.sampled_from([0, 1, 2, 3, "full"]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(few_channel_convs())
def test_few_channel_layers_store_at_most_one_and_a_half_times_the_useful_entries(case):
    cfg, size, halo = case
    geo = _geometry(cfg, size)
    assume(geo is not None)
    lay = build_layout(geo, halo).validate()
    BR, BC = lay.block_shape
    useful = _useful(geo, halo)
    assert lay.stored_entries() == useful  # the element mask keeps exactly the support
    assert lay.nnzb * BR * BC <= 1.5 * useful, (lay.block_shape, lay.nnzb * BR * BC, useful)


@pytest.mark.parametrize("halo", [0, 1, 2])
@pytest.mark.parametrize("name,conv,size,block", [
    ("paper CNN on grey 28x28, after ZeroPad2d(2)", nn.Conv2d(1, 64, 4, stride=2), (32, 32), (64, 1)),
    ("paper CNN on RGB 32x32, after ZeroPad2d(2)", nn.Conv2d(3, 64, 4, stride=2), (36, 36), (64, 3)),
    ("RGB 3x3 input layer", nn.Conv2d(3, 64, 3, padding=1), (32, 32), (64, 3)),
], ids=lambda v: v if isinstance(v, str) else None)
def test_input_layers_of_the_issue_store_exactly_their_support(name, conv, size, block, halo):
    geo = ConvGeometry.from_conv(conv, size)
    lay = build_layout(geo, halo)
    assert lay.block_shape == block and not lay.has_mask
    assert lay.nnzb * block[0] * block[1] == _useful(geo, halo)


def test_full_halo_keeps_wide_tiles_where_they_waste_only_edges():
    """halo="full" stores every pixel pair: wide tiles store nothing more (fewer, faster blocks)."""
    lay = build_layout(ConvGeometry.from_conv(nn.Conv2d(1, 64, 4, stride=2), (32, 32)), "full")
    assert lay.block_shape == (64, 16) and lay.nnzb * 64 * 16 == lay.shape[0] * lay.shape[1]
    tiny = build_layout(ConvGeometry.from_conv(nn.Conv2d(3, 64, 3, padding=1), (2, 2)), "full")
    assert tiny.block_shape == (64, 3)  # a 48-column tile would hold 4x the 12 input features


def test_embedded_paper_cnn_stores_its_first_layer_tight():
    net = embed(paper_cnn(width=16, in_channels=1, image_size=28), (1, 28, 28))
    first = net[1]
    assert first.block_shape == (16, 1)
    assert first.values.numel() == first.layout.stored_entries() == _useful(first.geometry, 0)


# A few-channel layer of each kind (in or out, groups, stride, dilation, padding mode), small
# enough for the Triton interpreter.
EXACT_CASES = [
    (dict(in_channels=1, out_channels=16, kernel_size=4, stride=2, padding=2), (7, 6), 0),
    (dict(in_channels=3, out_channels=16, kernel_size=3, padding=1), (6, 5), 1),
    (dict(in_channels=4, out_channels=6, kernel_size=(3, 2), dilation=(2, 1), padding=1, groups=2,
          padding_mode="reflect"), (5, 6), 0),
    (dict(in_channels=2, out_channels=67, kernel_size=3, stride=(1, 2), padding=1, bias=False), (3, 5), 1),
    (dict(in_channels=24, out_channels=3, kernel_size=3, padding=1, padding_mode="circular"), (5, 4), 1),
    (dict(in_channels=3, out_channels=3, kernel_size=3, padding=1, groups=3), (5, 5), 0),
]


def _dense_grad_on_blocks(m: SparseEFCN, x_flat, dy_flat):
    """dY^T X read off on the stored blocks (mask applied): the stored-block weight gradient."""
    return m.layout.gather_dense(dy_flat.T @ x_flat)


@pytest.mark.parametrize("backend", backends.available_backends("cpu"))
@pytest.mark.parametrize("i", range(len(EXACT_CASES)))
def test_few_channel_layers_are_exact_on_every_cpu_backend(i, backend):
    cfg, size, halo = EXACT_CASES[i]
    conv = nn.Conv2d(**cfg)
    m = SparseEFCN.from_conv(conv, size, halo=halo, backend=backend)
    assert m.nnzb * m.block_shape[0] * m.block_shape[1] <= 1.5 * m.layout.stored_entries()
    x = torch.randn(3, cfg["in_channels"], *size, requires_grad=True)
    ref = conv(x)
    gy = torch.randn_like(ref)
    dx_ref, = torch.autograd.grad(ref, x, gy)
    y = m(x)
    assert_close_rel(y, ref, 1e-5, f"output ({backend})")
    dx, dv = torch.autograd.grad(y, (x, m.values), gy)
    assert_close_rel(dx, dx_ref, 1e-5, f"input gradient ({backend})")
    x_flat = x.detach().permute(0, 2, 3, 1).reshape(3, -1)
    dy_flat = gy.permute(0, 2, 3, 1).reshape(3, -1)
    assert_close_rel(dv, _dense_grad_on_blocks(m, x_flat, dy_flat), 1e-5, f"weight gradient ({backend})")


@pytest.mark.skipif(backends.unavailable_reason("cpu", "cpu") is not None, reason="cpu backend unavailable")
def test_cpu_narrow_block_paths_are_deterministic_across_threads():
    """Tight few-channel blocks take the C++ kernels' narrow-block paths (grouped block rows and
    columns, gathered panels): results fixed by the layout, whatever the thread count."""
    results = []
    threads = torch.get_num_threads()
    for conv, size in ((nn.Conv2d(3, 64, 3, padding=1), (16, 16)), (nn.Conv2d(64, 2, 3, padding=1), (16, 16))):
        m = SparseEFCN.from_conv(conv, size, halo=1, backend="cpu")
        x = torch.randn(32, conv.in_channels, *size, requires_grad=True)
        gy = torch.randn(32, conv.out_channels, *size)
        runs = []
        try:
            for n in (1, max(2, threads), max(2, threads)):
                torch.set_num_threads(n)
                y = m(x)
                runs.append((y.detach(),) + torch.autograd.grad(y, (x, m.values), gy))
        finally:
            torch.set_num_threads(threads)
        results.append(runs)
    for runs in results:
        for a, b in zip(runs[0], runs[1]):
            assert torch.equal(a, b)
        for a, b in zip(runs[1], runs[2]):
            assert torch.equal(a, b)


@pytest.mark.skipif(backends.unavailable_reason("cpu", "cpu") is not None, reason="cpu backend unavailable")
def test_cpu_narrow_grad_weight_keeps_masked_entries_zero_under_nan():
    conv = nn.Conv2d(2, 67, 3, padding=1)  # 16-row tiles straddling pixels: a real element mask
    m = SparseEFCN.from_conv(conv, (4, 5), backend="cpu")
    assert m.layout.has_mask and m.block_shape[1] < 16
    lay = m.layout
    x = torch.randn(5, lay.shape[1])
    x[2, 3] = float("nan")
    dy = torch.randn(5, lay.shape[0])
    dw = backends.kernels("cpu").grad_weight(dy, x, lay.row_idx, lay.col_idx, lay.mask_ids, lay.mask_patterns,
                                            *lay.block_shape)
    assert (dw[~lay.block_mask()] == 0).all()
    assert torch.isnan(dw).any()  # and the NaN does reach the entries it should


@pytest.mark.skipif(backends.unavailable_reason("cpu", "cpu") is not None, reason="cpu backend unavailable")
@pytest.mark.parametrize("BR,BC", [(16, 16), (2, 3), (4, 1)], ids=str)
def test_cpu_kernels_sum_duplicate_and_unsorted_blocks_like_the_reference(BR, BC):
    """Index lists that are unsorted or repeat a block (trusted, not checked) are summed as the
    reference does, without reaching past any buffer: a line holds more K entries than the
    operand has features here (run under `make sanitize` for the bounds)."""
    from efcn_sparse.kernels import reference as R

    i32 = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    M, N = 2 * BR, 2 * BC
    # block row 0: columns 1, 0, 1, 1 (unsorted, repeated); block row 1: column 0
    crow, col, row = i32([0, 4, 5]), i32([1, 0, 1, 1, 0]), i32([0, 0, 0, 0, 1])
    # block column 0: rows 1, 0, 1 (unsorted, repeated); block column 1: rows 0, 0
    ccol, t_row, t_perm = i32([0, 3, 5]), i32([1, 0, 1, 0, 0]), i32([4, 1, 4, 0, 2])
    v = torch.randn(5, BR, BC)
    x, dy, bias = torch.randn(7, N), torch.randn(7, M), torch.randn(M)
    cpu = backends.kernels("cpu")
    assert_close_rel(cpu.forward(x, v, bias, crow, col, row, M), R.forward(x, v, bias, crow, col, row, M), 1e-5)
    assert_close_rel(cpu.grad_input(dy, v, ccol, t_row, t_perm, N), R.grad_input(dy, v, ccol, t_row, t_perm, N), 1e-5)
    assert_close_rel(cpu.grad_weight(dy, x, row, col, None, None, BR, BC),
                     R.grad_weight(dy, x, row, col, None, None, BR, BC), 1e-5)
