"""A Conv2d's eFCN computes exactly what the conv computes: outputs, input gradients, and the
weight gradient summed back over positions. Property-based over random conv configurations."""

import pytest
import torch
import torch.nn as nn
from conftest import assert_close_rel
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from efcn_sparse import SparseEFCN
from efcn_sparse.conv_geometry import ConvGeometry, build_layout, choose_block_side

MODES = ["zeros", "reflect", "replicate", "circular"]


@st.composite
def conv_configs(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3, "depthwise"]))
    if groups == "depthwise":
        cin = draw(st.integers(1, 24))
        cout, groups = cin, cin
    else:
        cin = groups * draw(st.integers(1, 24 // groups))
        cout = groups * draw(st.integers(1, 24 // groups))
    kh, kw = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    pad_kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    if pad_kind == "same":
        stride = (1, 1)
        padding = "same"
    elif pad_kind == "valid":
        padding = "valid"
    elif pad_kind == "int":
        padding = draw(st.integers(0, 3))
    else:
        padding = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    mode = draw(st.sampled_from(MODES))
    H, W = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    assume(H != W or draw(st.booleans()))
    return dict(in_channels=cin, out_channels=cout, kernel_size=(kh, kw), stride=stride, dilation=dilation,
                padding=padding, padding_mode=mode, groups=groups, bias=draw(st.booleans())), (H, W), draw(st.integers(1, 5))


def _make(cfg, size):
    """The conv, or None where PyTorch itself rejects the configuration."""
    conv = nn.Conv2d(**cfg)
    x = torch.randn(1, cfg["in_channels"], *size)
    try:
        conv(x)
    except RuntimeError:
        return None
    return conv


def _weight_grad_in_kernel_shape(m: SparseEFCN, dense_grad: torch.Tensor) -> torch.Tensor:
    """Sum the eFCN weight gradient over every position, back into the conv kernel's shape."""
    geo = m.geometry
    Cout, Cin, g = geo.out_channels, geo.in_channels, geo.groups
    cog, cig = Cout // g, Cin // g
    po, pi, kh, kw = geo.local_taps()
    co = torch.arange(Cout)
    ci = (co // cog)[:, None] * cig + torch.arange(cig)[None, :]
    rows = po[:, None, None] * Cout + co[None, :, None]
    cols = pi[:, None, None] * Cin + ci[None]
    per_tap = dense_grad[rows.expand_as(cols), cols]  # [taps, Cout, cig]
    out = torch.zeros(Cout, cig, *geo.kernel_size, dtype=dense_grad.dtype)
    out.index_put_((co[None, :, None].expand_as(cols), torch.arange(cig)[None, None, :].expand_as(cols),
                    kh[:, None, None].expand_as(cols), kw[:, None, None].expand_as(cols)), per_tap, accumulate=True)
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(conv_configs(), st.sampled_from([torch.float32, torch.float64]))
def test_efcn_matches_conv_outputs_and_gradients(case, dtype):
    cfg, size, batch = case
    conv = _make(cfg, size)
    assume(conv is not None)
    conv = conv.to(dtype)
    m = SparseEFCN.from_conv(conv, size, backend="reference")
    rel = 1e-5 if dtype == torch.float32 else 1e-12
    x = torch.randn(batch, cfg["in_channels"], *size, dtype=dtype, requires_grad=True)
    ref = conv(x)
    y = m(x)
    assert_close_rel(y, ref, rel, "output")
    gy = torch.randn_like(ref)
    dx_ref, dw_ref = torch.autograd.grad(ref, (x, conv.weight), gy)
    dx, dvals = torch.autograd.grad(y, (x, m.values), gy)
    assert_close_rel(dx, dx_ref, rel, "input gradient")
    assert (dvals[~m.layout.block_mask()] == 0).all(), "raw gradient at masked entries"
    dw = _weight_grad_in_kernel_shape(m, m.layout.to_dense(dvals))
    assert_close_rel(dw, dw_ref, rel * 10, "weight gradient summed over positions")
    if conv.bias is not None:
        db_ref, = torch.autograd.grad(conv(x), conv.bias, gy)
        db, = torch.autograd.grad(m(x), m.bias, gy)
        assert_close_rel(db.reshape(-1, cfg["out_channels"]).sum(0), db_ref, rel * 10, "bias gradient")


def _dense_by_probing(conv: nn.Conv2d, size) -> torch.Tensor:
    """Independent eFCN matrix: the conv (without bias) applied to every basis image, NHWC-flattened."""
    C, (H, W) = conv.in_channels, size
    N = C * H * W
    basis = torch.eye(N, dtype=torch.float64).reshape(N, H, W, C).permute(0, 3, 1, 2)
    with torch.no_grad():
        out = conv(basis)
    return out.permute(0, 2, 3, 1).reshape(N, -1).T


@pytest.mark.parametrize("cfg,size", [
    (dict(in_channels=3, out_channels=5, kernel_size=(3, 2), padding=1), (6, 5)),
    (dict(in_channels=4, out_channels=6, kernel_size=3, padding="same", padding_mode="reflect", groups=2), (5, 7)),
    (dict(in_channels=2, out_channels=3, kernel_size=4, stride=2, padding=3, padding_mode="circular", dilation=2), (6, 6)),
    (dict(in_channels=4, out_channels=4, kernel_size=5, padding=2, padding_mode="replicate", groups=4), (4, 5)),
])
@pytest.mark.parametrize("halo", [0, 1, "full"])
def test_to_dense_matches_probed_conv_matrix(cfg, size, halo):
    conv = nn.Conv2d(**cfg, bias=False).double()
    m = SparseEFCN.from_conv(conv, size, halo=halo)
    torch.testing.assert_close(m.to_dense(), _dense_by_probing(conv, size), rtol=1e-12, atol=1e-12)


def _expected_pairs(geo: ConvGeometry, halo: int) -> int:
    """Count (output pixel, input pixel) pairs within `halo` of the receptive field, by brute force."""
    (Ho, Wo), (H, W) = geo.out_size, geo.input_size
    (kh, kw), (sh, sw), (dh, dw) = geo.kernel_size, geo.stride, geo.dilation
    n = 0
    for ho in range(Ho):
        for wo in range(Wo):
            r0, c0 = ho * sh - geo.pad_h[0], wo * sw - geo.pad_w[0]
            rows = [i for i in range(H) if r0 - halo <= i <= r0 + dh * (kh - 1) + halo]
            cols = [j for j in range(W) if c0 - halo <= j <= c0 + dw * (kw - 1) + halo]
            n += len(rows) * len(cols)
    return n


@pytest.mark.parametrize("halo", [0, 1, 2, 5, "full"])
def test_halo_stores_expected_blocks_and_same_output(halo):
    conv = nn.Conv2d(16, 32, 3, padding=1, stride=(1, 2))
    size = (9, 10)
    m = SparseEFCN.from_conv(conv, size, halo=halo, block_shape=(16, 16))
    geo = m.geometry
    pairs = geo.input_size[0] * geo.input_size[1] * geo.out_size[0] * geo.out_size[1] if halo == "full" \
        else _expected_pairs(geo, halo)
    assert m.nnzb == pairs * 2  # 32 output channels = two row tiles per pixel pair
    assert not m.layout.has_mask
    x = torch.randn(3, 16, *size)
    assert_close_rel(m(x), conv(x), 1e-5, f"halo={halo}")
    base = SparseEFCN.from_conv(conv, size, halo=0, block_shape=(16, 16))
    dense, dense0 = m.to_dense(), base.to_dense()
    torch.testing.assert_close(dense, dense0)


def test_halo_entries_are_trainable_and_start_at_zero():
    conv = nn.Conv2d(2, 3, 3, padding=1)
    # 16x16 tiles over 3 output / 2 input channels span several pixels: masked entries in every block
    m = SparseEFCN.from_conv(conv, (6, 6), halo=1, block_shape=(16, 16))
    local = SparseEFCN.from_conv(conv, (6, 6), halo=0, block_shape=(16, 16))
    mask = m.layout.block_mask()
    assert (~mask).any()
    dense_support = m.layout.to_dense(torch.ones_like(m.values)) != 0
    local_support = local.layout.to_dense(torch.ones_like(local.values)) != 0
    assert (dense_support & ~local_support).any(), "halo must add off-local entries"
    assert (m.to_dense()[dense_support & ~local_support] == 0).all()  # stored off-local entries start at 0
    assert (m.values.detach()[~mask] == 0).all()  # raw values: to_dense would hide masked ones
    x = torch.randn(4, 2, 6, 6)
    m(x).square().sum().backward()
    grad = m.layout.to_dense(m.values.grad)
    assert (grad[dense_support & ~local_support] != 0).any(), "off-local entries must receive gradient"
    assert (m.values.grad[~mask] == 0).all()  # raw gradient at masked entries


def test_groups_mask_other_groups_forever():
    conv = nn.Conv2d(32, 32, 3, padding=1, groups=4)
    m = SparseEFCN.from_conv(conv, (5, 5), halo="full")
    assert m.layout.has_mask
    stored = m.layout.to_dense(torch.ones_like(m.values)) != 0
    rows = torch.arange(m.shape[0]) % 32 // 8
    cols = torch.arange(m.shape[1]) % 32 // 8
    assert torch.equal(stored, rows[:, None] == cols[None, :])
    m(torch.randn(2, 32, 5, 5)).square().sum().backward()
    mask = m.layout.block_mask()
    assert (m.values.detach()[~mask] == 0).all() and (m.values.grad[~mask] == 0).all()  # raw, not via to_dense


@pytest.mark.parametrize("channels,expected", [(64, 64), (192, 64), (48, 48), (16, 16), (3, 48), (1, 16), (10, 80), (24, 48), (100, 16)])
def test_block_side_is_pixel_aligned_multiple_of_16(channels, expected):
    assert choose_block_side(channels) == expected


def test_rgb_input_layer_uses_multi_pixel_tiles_with_mask():
    conv = nn.Conv2d(3, 64, 3, padding=1)
    m = SparseEFCN.from_conv(conv, (8, 8))
    assert m.block_shape == (64, 48)
    assert m.layout.has_mask
    x = torch.randn(2, 3, 8, 8)
    assert_close_rel(m(x), conv(x), 1e-5)


def test_block_shape_override_with_partial_edge_blocks():
    conv = nn.Conv2d(5, 7, 3, padding=1).double()
    m = SparseEFCN.from_conv(conv, (5, 6), block_shape=(16, 32))
    assert m.shape[0] % 16 and m.shape[1] % 32
    x = torch.randn(3, 5, 5, 6, dtype=torch.float64)
    assert_close_rel(m(x), conv(x), 1e-12)


def test_layout_geometry_matches_between_builders():
    geo = ConvGeometry.from_conv(nn.Conv2d(16, 16, 3, padding=1), (6, 6))
    lay = build_layout(geo, 0, (16, 16))
    lay.validate()
    assert lay.nnzb == _expected_pairs(geo, 0)


def test_full_halo_too_large_is_refused_before_allocating():
    conv = nn.Conv2d(64, 64, 3, padding=1)
    with pytest.raises(MemoryError, match="GiB"):
        SparseEFCN.from_conv(conv, (128, 128), halo="full")


@pytest.mark.parametrize("bad,match", [
    (dict(input_size=(0, 4)), "input_size"),
    (dict(input_size=(4, 4), halo=-1), "halo"),
    (dict(input_size=(4, 4), halo="wide"), "halo"),
    (dict(input_size=(1, 1)), "too small"),
])
def test_from_conv_rejects_bad_arguments(bad, match):
    conv = nn.Conv2d(2, 2, 3)
    with pytest.raises(ValueError, match=match):
        SparseEFCN.from_conv(conv, **bad)


def test_from_conv_rejects_non_conv():
    with pytest.raises(TypeError, match="Conv2d"):
        SparseEFCN.from_conv(nn.Linear(3, 3), (4, 4))
