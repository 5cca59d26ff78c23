"""SparseEFCN as a module: masked training under every optimizer, state, shapes, bad input."""

import io

import pytest
import torch
import torch.nn as nn
from conftest import assert_close_rel, poison_one_sample
from test_layout import random_layout

from efcn_sparse import BSRLayout, SparseEFCN


def _masked_layer():
    """A layer with structural zeros inside stored blocks (groups and a multi-pixel input tile)."""
    return SparseEFCN.from_conv(nn.Conv2d(6, 32, 3, padding=1, groups=2), (5, 5), halo=1)


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
    lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-1),
], ids=["sgd", "sgd-momentum-wd", "adam", "adamw"])
def test_structural_zeros_stay_zero_under_optimizers(make_opt):
    m = _masked_layer()
    mask = m.layout.block_mask()
    assert (~mask).any()
    before = m.values.detach().clone()
    opt = make_opt(m.parameters())
    for _ in range(4):
        x = torch.randn(8, 6, 5, 5)
        opt.zero_grad()
        m(x).square().mean().backward()
        assert (m.values.grad[~mask] == 0).all()
        opt.step()
    assert (m.values.detach()[~mask] == 0).all()
    assert not torch.equal(m.values.detach()[mask], before[mask])


def test_non_finite_input_leaves_structural_zeros_exactly_zero(cpu_backend):
    """One sample of +inf: the unmasked gradients are non-finite, the masked ones exactly 0, and
    an SGD step keeps the masked values exactly 0, on every CPU backend."""
    m = SparseEFCN.from_conv(nn.Conv2d(6, 32, 3, padding=1, groups=2), (5, 5), halo=1, backend=cpu_backend)
    mask = m.layout.block_mask()
    assert (~mask).any()
    x = poison_one_sample(torch.randn(3, 6, 5, 5))
    m(x).sum().backward()
    assert not torch.isfinite(m.values.grad[mask]).all()
    assert (m.values.grad[~mask] == 0).all(), f"{cpu_backend}: NaN/inf leaked into masked gradient entries"
    torch.optim.SGD(m.parameters(), lr=0.1).step()
    assert (m.values.detach()[~mask] == 0).all()


def test_state_dict_round_trips_into_a_fresh_layer():
    conv = nn.Conv2d(6, 32, 3, padding=1, groups=2)
    m = SparseEFCN.from_conv(conv, (5, 5), halo=1)
    with torch.no_grad():
        m.values.add_(m.layout.apply_mask(torch.randn_like(m.values)))
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = SparseEFCN.from_conv(nn.Conv2d(6, 32, 3, padding=1, groups=2), (5, 5), halo=1)
    fresh.load_state_dict(state)
    x = torch.randn(3, 6, 5, 5)
    flat = x.permute(0, 2, 3, 1).reshape(3, -1)  # independent: a dense matmul with the saved weights
    expected = (flat @ m.to_dense().T + m.bias.detach()).reshape(3, 5, 5, 32).permute(0, 3, 1, 2)
    assert_close_rel(fresh(x), expected, 1e-5, "reloaded layer vs dense matmul")
    assert fresh.geometry == m.geometry and fresh.halo == 1


def test_state_dict_loads_into_a_layer_of_another_size():
    m = SparseEFCN.from_conv(nn.Conv2d(4, 16, 3, padding=1), (6, 6), halo=2)
    other = SparseEFCN.from_conv(nn.Conv2d(4, 16, 3, padding=1), (6, 6), halo=0)
    with torch.no_grad():  # halo entries non-zero, so the smaller layer must really grow to hold them
        m.values.add_(m.layout.apply_mask(torch.randn_like(m.values)))
    other.load_state_dict(m.state_dict())
    x = torch.randn(2, 4, 6, 6)
    flat = x.permute(0, 2, 3, 1).reshape(2, -1)
    expected = (flat @ m.to_dense().T + m.bias.detach()).reshape(2, 6, 6, 16).permute(0, 3, 1, 2)
    assert_close_rel(other(x), expected, 1e-5, "loaded layer vs dense matmul")
    assert other.halo == 2


def test_to_dtype_keeps_index_buffers():
    m = _masked_layer().double()
    assert m.values.dtype == torch.float64 and m.bias.dtype == torch.float64
    assert m.crow_ptr.dtype == torch.int32 and m.mask_patterns.dtype == torch.bool
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    assert m(x).dtype == torch.float64


def test_to_moves_parameters_and_buffers_and_round_trips():
    """.to() across dtypes and devices (cpu -> meta -> cpu): parameters change dtype and device,
    index buffers keep their dtype, and the round-tripped layer computes what it did before."""
    m = _masked_layer()
    with torch.no_grad():
        m.values.add_(m.layout.apply_mask(torch.randn_like(m.values)))
    x = torch.randn(2, 6, 5, 5)
    y0 = m(x).detach()
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in m.state_dict().items()}
    index_dtypes = {k: b.dtype for k, b in m.named_buffers()}

    m.to(torch.float64)
    assert m.values.dtype == m.bias.dtype == torch.float64
    assert {k: b.dtype for k, b in m.named_buffers()} == index_dtypes
    assert_close_rel(m(x.double()), y0.double(), 1e-6, "float64")
    m.to(torch.float32)
    assert torch.equal(m.values, state["values"])  # float32 -> float64 -> float32 is exact

    m.to("meta")
    assert all(t.device.type == "meta" for t in list(m.parameters()) + list(m.buffers()))
    assert {k: b.dtype for k, b in m.named_buffers()} == index_dtypes
    assert m(x.to("meta")).shape == y0.shape  # shapes propagate through the ops' fake kernels
    m.to_empty(device="cpu")
    m.load_state_dict(state)
    assert all(t.device.type == "cpu" for t in list(m.parameters()) + list(m.buffers()))
    torch.testing.assert_close(m(x), y0, rtol=0, atol=0)


def test_extra_repr_shows_structure():
    r = repr(_masked_layer())
    for word in ("shape=(800, 150)", "block_shape=(32, 48)", "nnzb=", "stored=", "density=", "bytes=", "halo=1"):
        assert word in r, r


def test_image_input_gives_channels_last_output_without_copy():
    conv = nn.Conv2d(4, 16, 3, padding=1, stride=2)
    m = SparseEFCN.from_conv(conv, (7, 6))
    for x in (torch.randn(3, 4, 7, 6), torch.randn(3, 4, 7, 6).to(memory_format=torch.channels_last)):
        y = m(x)
        assert y.shape == (3, 16, 4, 3)
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert_close_rel(y, conv(x), 1e-5)


def test_flat_input_gives_flat_output():
    conv = nn.Conv2d(4, 16, 3, padding=1)
    m = SparseEFCN.from_conv(conv, (5, 5))
    x = torch.randn(3, 4, 5, 5)
    flat = x.permute(0, 2, 3, 1).reshape(3, -1)
    y = m(flat)
    assert y.shape == (3, 16 * 25)
    torch.testing.assert_close(y, conv(x).permute(0, 2, 3, 1).reshape(3, -1), rtol=1e-5, atol=1e-5)


def test_non_contiguous_input_is_handled():
    conv = nn.Conv2d(4, 16, 3, padding=1)
    m = SparseEFCN.from_conv(conv, (5, 5))
    x = torch.randn(3, 4, 5, 10)[..., ::2]
    assert not x.is_contiguous()
    assert_close_rel(m(x), conv(x), 1e-5)
    flat = torch.randn(100, 3).T
    y = m(flat)
    torch.testing.assert_close(y, flat @ m.to_dense().T + m.bias.detach(), rtol=1e-5, atol=1e-5)


def test_empty_batch_returns_empty_output():
    m = SparseEFCN.from_conv(nn.Conv2d(4, 16, 3, padding=1), (5, 5))
    x = torch.randn(0, 4, 5, 5, requires_grad=True)
    y = m(x)
    assert y.shape == (0, 16, 5, 5)
    y.sum().backward()
    assert x.grad.shape == x.shape and (m.values.grad == 0).all()


def test_nan_inputs_propagate():
    conv = nn.Conv2d(4, 16, 3, padding=1)
    m = SparseEFCN.from_conv(conv, (5, 5))
    x = torch.randn(2, 4, 5, 5)
    x[0, 1, 2, 2] = float("nan")
    y, ref = m(x), conv(x)
    # NaN reaches at least the conv's NaN outputs; a block's stored zeros may spread it further
    # within the sample, as 0 * NaN does in a dense matmul. Other samples stay clean.
    assert torch.isnan(y[torch.isnan(ref)]).all()
    assert not torch.isnan(y[1]).any()
    finite = ~torch.isnan(y)
    torch.testing.assert_close(y[finite], ref[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x,err,match", [
    (torch.randn(2, 3, 5, 5), ValueError, r"expected input \[B, 4, 5, 5\]"),
    (torch.randn(2, 4, 6, 5), ValueError, r"expected input \[B, 4, 5, 5\]"),
    (torch.randn(4, 5, 5), ValueError, "3-D tensor"),
    (torch.randn(2, 99), ValueError, r"expected flat input \[B, 100\]"),
    (torch.randn(2, 4, 5, 5, dtype=torch.float64), TypeError, "dtype"),
    (torch.randn(2, 4, 5, 5, device="meta"), RuntimeError, "device"),
    ([1.0, 2.0], TypeError, "Tensor"),
])
def test_bad_input_gets_a_clear_error(x, err, match):
    m = SparseEFCN.from_conv(nn.Conv2d(4, 16, 3, padding=1), (5, 5))
    with pytest.raises(err, match=match):
        m(x)


def test_to_dense_refuses_when_too_large():
    m = SparseEFCN.from_conv(nn.Conv2d(4, 16, 3, padding=1), (5, 5))
    with pytest.raises(MemoryError, match=r"\(400, 100\)"):
        m.to_dense(max_bytes=1000)


def test_from_dense_and_generic_layout_constructor():
    lay, vals, dense = random_layout(M=37, N=50, masked=True, dtype=torch.float32)
    m = SparseEFCN.from_dense(dense, (8, 8), mask=lay.to_dense(torch.ones_like(vals)) != 0)
    x = torch.randn(4, 50)
    torch.testing.assert_close(m(x), x @ dense.T)
    fresh = SparseEFCN(lay)
    assert fresh.values.shape == vals.shape and fresh.bias.shape == (37,)
    assert (fresh.values.detach()[~lay.block_mask()] == 0).all()
    # nn.Linear's init with each row's fan-in: bound 1/sqrt(fan_in)
    fan = SparseEFCN._fan_in(lay)
    w = fresh.to_dense()
    assert (w.abs().max(1).values <= 1 / fan.clamp(min=1).sqrt() + 1e-7).all()
    assert SparseEFCN(lay, bias=False).bias is None


def test_constructor_checks_image_shapes():
    lay, vals, _ = random_layout(M=40, N=56, dtype=torch.float32)
    with pytest.raises(ValueError, match="in_shape"):
        SparseEFCN(lay, vals, in_shape=(3, 4, 4))
    m = SparseEFCN(lay, vals, in_shape=(14, 2, 2), out_shape=(10, 2, 2))
    assert m(torch.randn(2, 14, 2, 2)).shape == (2, 10, 2, 2)


def test_layout_property_reflects_buffers():
    m = _masked_layer()
    lay = m.layout
    assert isinstance(lay, BSRLayout) and lay.nnzb == m.nnzb
    lay.validate(m.values)
