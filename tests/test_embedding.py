"""Whole-network embedding (embed, fcn_like) and the memory summary."""

import math

import pytest
import torch
import torch.nn as nn
from conftest import assert_close_rel, poison_one_sample
from test_conv_embedding import _weight_grad_in_kernel_shape

from efcn_sparse import SparseEFCN, embed, fcn_like, get_model, summary
from efcn_sparse.embedding import conv_input_sizes

BACKEND = "reference"

# tiny members of every family: (name, constructor kwargs, input shape, halo)
FAMILIES = [
    ("skinny", dict(width=4, in_channels=1, image_size=28), (1, 28, 28), "full"),
    ("alexnet", dict(width=4, hidden=32, image_size=32), (3, 32, 32), 1),
    ("resnet18", dict(width=4), (3, 8, 8), 0),
    ("vgg", dict(width=4, image_size=8), (3, 8, 8), "full"),
    ("mobilenet", dict(width=8, image_size=8), (3, 8, 8), 1),
]


def _convs(m):
    return [x for x in m.modules() if isinstance(x, nn.Conv2d)]


def _efcns(m):
    return [x for x in m.modules() if isinstance(x, SparseEFCN)]


@pytest.mark.parametrize("name,kw,shape,halo", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_embedding_is_equivalent_in_eval_and_train_mode(name, kw, shape, halo):
    net = get_model(name, **kw)
    with torch.no_grad():  # non-trivial BatchNorm statistics and affine parameters
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    n_convs = len(_convs(net))
    efcn = embed(net, shape, halo=halo, backend=BACKEND)

    # the source is untouched, every conv is swapped
    assert len(_convs(net)) == n_convs and not _efcns(net)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not _convs(efcn) and len(_efcns(efcn)) == n_convs
    assert all(m.halo == halo and m.geometry is not None for m in _efcns(efcn))

    x = torch.randn(3, *shape)
    for train in (False, True):
        net.train(train), efcn.train(train)
        torch.manual_seed(7)
        ref = net(x)
        torch.manual_seed(7)
        out = efcn(x)
        assert_close_rel(out, ref, 1e-5, f"{name} halo={halo} train={train}")
    # backward through the whole network (train mode, same dropout), in float64 so that rounding
    # through a deep net cannot hide a wrong term: each eFCN's weight gradient, summed back over
    # positions, is its conv's weight gradient; masked entries get exactly 0
    net.double(), efcn.double()
    g = torch.randn_like(ref).double()
    for model in (net, efcn):
        model.zero_grad()
        torch.manual_seed(7)
        model(x.double()).backward(g)
    for conv, m in zip(_convs(net), _efcns(efcn)):
        assert (m.values.grad[~m.layout.block_mask()] == 0).all()
        dw = _weight_grad_in_kernel_shape(m, m.layout.to_dense(m.values.grad))
        assert_close_rel(dw, conv.weight.grad, 1e-9, f"{name}: weight gradient of {conv}")
        if conv.bias is not None:
            db = m.bias.grad.reshape(-1, conv.out_channels).sum(0)
            assert_close_rel(db, conv.bias.grad, 1e-9, f"{name}: bias gradient of {conv}")


def test_non_finite_input_leaves_masked_gradients_of_every_layer_zero(cpu_backend):
    """A whole embedded network on each CPU backend: one +inf sample makes the gradients
    non-finite, yet every layer's masked entries get exactly 0."""
    # over 4 channels a side, so that tiles are not the tight one-pixel ones: groups leave masked entries
    net = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1, groups=4))
    efcn = embed(net, (8, 5, 5), halo=1, backend=cpu_backend)
    efcn(poison_one_sample(torch.randn(3, 8, 5, 5))).sum().backward()
    for m in _efcns(efcn):
        mask = m.layout.block_mask()
        assert (~mask).any() and not torch.isfinite(m.values.grad[mask]).all()
        assert (m.values.grad[~mask] == 0).all(), f"{cpu_backend}: NaN/inf leaked into masked gradient entries"


def test_training_flags_and_frozen_parameters_are_kept():
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3))
    net.eval()
    net[2].requires_grad_(False)
    efcn = embed(net, (2, 6, 6), backend=BACKEND)
    assert not efcn.training and not efcn[0].training and not efcn[2].training
    assert efcn[0].values.requires_grad and not efcn[2].values.requires_grad and not efcn[2].bias.requires_grad


class _Shared(nn.Module):
    """A conv used twice at the same size, inside nested and residual structure."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.body = nn.ModuleDict({"conv": nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular")})
        self.alias = self.body["conv"]  # registered under two paths
        self.head = nn.Linear(4 * 5 * 6, 2)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + self.body["conv"](x)
        x = x + self.alias(torch.tanh(x))
        return self.head(x.flatten(1))


def test_shared_conv_becomes_one_shared_efcn():
    net = _Shared()
    efcn = embed(net, (3, 5, 6), halo=1, backend=BACKEND)
    assert isinstance(efcn.body["conv"], SparseEFCN) and efcn.alias is efcn.body["conv"]
    x = torch.randn(2, 3, 5, 6)
    assert_close_rel(efcn(x), net(x), 1e-5, "shared conv")


class _TwoSizes(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1))
        self.pool = nn.AvgPool2d(2)

    def forward(self, x):
        return self.block(self.pool(self.block(x)))


def test_conv_called_at_two_sizes_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"conv 'block\.0' is called at several input sizes \[\(4, 4\), \(8, 8\)\]"):
        embed(_TwoSizes(), (3, 8, 8))


def test_bare_conv_and_bad_input_shape():
    conv = nn.Conv2d(2, 3, 3, stride=2)
    m = embed(conv, (2, 7, 9), halo="full", backend=BACKEND)
    assert isinstance(m, SparseEFCN) and m.geometry.input_size == (7, 9)
    x = torch.randn(2, 2, 7, 9)
    assert_close_rel(m(x), conv(x), 1e-5, "bare conv")
    with pytest.raises(ValueError, match=r"\(C, H, W\) without the batch"):
        embed(conv, (1, 2, 7, 9))
    with pytest.raises(RuntimeError, match="shape probe failed"):
        embed(conv, (3, 7, 9))  # wrong channel count


def test_unused_conv_is_left_with_a_warning():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.spare = nn.Conv2d(1, 2, 3), nn.Conv2d(1, 2, 3)

        def forward(self, x):
            return self.used(x)

    with pytest.warns(UserWarning, match="spare"):
        efcn = embed(Net(), (1, 5, 5))
    assert isinstance(efcn.used, SparseEFCN) and isinstance(efcn.spare, nn.Conv2d)


def test_probe_sizes_and_per_layer_block_shapes():
    net = get_model("skinny", width=4, in_channels=1, image_size=28)
    assert conv_input_sizes(net, (1, 28, 28)) == {"1": (32, 32), "5": (11, 11), "9": (5, 5)}
    rng = torch.get_rng_state()
    efcn = embed(net, (1, 28, 28), block_shape={"5": (4, 8)}, backend=BACKEND)
    assert torch.equal(rng, torch.get_rng_state())  # embedding does not consume randomness
    assert efcn[5].block_shape == (4, 8) and efcn[1].block_shape != (4, 8)


def test_fcn_like_has_embeds_layout_and_linear_init():
    net = get_model("skinny", width=4, in_channels=1, image_size=28)
    ref = embed(net, (1, 28, 28), halo="full", backend=BACKEND)
    rng = torch.get_rng_state()
    fcn = fcn_like(net, (1, 28, 28), seed=3, backend=BACKEND)
    assert torch.equal(rng, torch.get_rng_state())  # a seed leaves the global RNG alone
    again = fcn_like(net, (1, 28, 28), seed=3, backend=BACKEND)
    other = fcn_like(net, (1, 28, 28), seed=4, backend=BACKEND)
    for (k, a), (_, b) in zip(fcn.state_dict().items(), again.state_dict().items()):
        assert not isinstance(a, torch.Tensor) or torch.equal(a, b), k
    assert not torch.equal(fcn[1].values, other[1].values)
    assert not torch.equal(fcn[-1].weight, net[-1].weight)  # the Linear head is re-initialised too
    for f, e in zip(_efcns(fcn), _efcns(ref)):
        assert f.geometry == e.geometry and f.halo == "full"
        for name in ("crow_ptr", "col_idx", "mask_ids"):
            a, b = getattr(f, name), getattr(e, name)
            assert (a is None and b is None) or torch.equal(a, b)
        # nn.Linear's init per row: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = trainable inputs of the row
        W = f.to_dense().double()
        mask = f.layout.to_dense(torch.ones_like(f.values)).bool()
        fan = mask.sum(1).double()
        bound = 1 / fan.sqrt()
        assert (W.abs() <= bound[:, None] + 1e-7).all()
        assert (f.values.detach()[~f.layout.block_mask()] == 0).all()  # raw: to_dense re-applies the mask
        z = (W / bound[:, None])[mask]  # uniform on [-1, 1]: variance 1/3
        assert abs(z.var().item() - 1 / 3) < 0.02 and abs(z.mean().item()) < 0.02
        assert (f.bias.abs() <= bound + 1e-7).all() and f.bias.std() > 0.3 * bound.mean()
    x = torch.randn(2, 1, 28, 28)
    assert torch.isfinite(fcn(x)).all()
    g = torch.Generator().manual_seed(5)
    assert isinstance(fcn_like(net, (1, 28, 28), halo=0, generator=g)[1], SparseEFCN)


# ------------------------------------------------------------------------------------------------ summary
def _independent_counts(conv: nn.Conv2d, size, halo):
    """Count an eFCN without the package's geometry: dense matrix of the conv by convolving the
    identity basis; local = its non-zeros (positive kernel); stored = pixel pairs read by the
    kernel, plus for halo h > 0 those within h pixels (Chebyshev) of each output pixel's
    receptive-field box, times the channel pairs of one group."""
    H, W = size
    Cin, Cout, g = conv.in_channels, conv.out_channels, conv.groups
    N = Cin * H * W
    eye = torch.eye(N, dtype=torch.float64).reshape(N, H, W, Cin).permute(0, 3, 1, 2)
    c64 = nn.Conv2d(Cin, Cout, conv.kernel_size, conv.stride, conv.padding, conv.dilation, g, bias=False,
                    padding_mode=conv.padding_mode).double()
    with torch.no_grad():
        c64.weight.uniform_(0.5, 1.5)
        out = c64(eye)  # [N, Cout, Ho, Wo]
    Ho, Wo = out.shape[2:]
    dense = out.permute(0, 2, 3, 1).reshape(N, -1).T  # [M, N]
    local = int((dense != 0).sum())
    ok_pixel = dense.reshape(Ho * Wo, Cout, H * W, Cin).ne(0).any(3).any(1)
    if halo == "full":
        ok_pixel = torch.ones(Ho * Wo, H * W, dtype=torch.bool)
    elif halo > 0:
        ph, pw = conv.padding
        kh, kw = conv.kernel_size
        (sh, sw), (dh, dw) = conv.stride, conv.dilation
        ho, wo = torch.arange(Ho)[:, None], torch.arange(Wo)[:, None]
        rows = (torch.arange(H)[None] >= ho * sh - ph - halo) & (torch.arange(H)[None] <= ho * sh - ph + dh * (kh - 1) + halo)
        cols = (torch.arange(W)[None] >= wo * sw - pw - halo) & (torch.arange(W)[None] <= wo * sw - pw + dw * (kw - 1) + halo)
        ok_pixel |= (rows[:, None, :, None] & cols[None, :, None, :]).reshape(Ho * Wo, H * W)
    co, ci = torch.arange(Cout), torch.arange(Cin)
    ok_channel = (co[:, None] // (Cout // g)) == (ci[None] // (Cin // g))
    stored = int(ok_pixel.sum()) * int(ok_channel.sum())
    nb = Cout * Ho * Wo if conv.bias is not None else 0
    return dict(cnn_params=sum(p.numel() for p in conv.parameters()), dense_params=dense.numel() + nb,
                stored=stored + nb, local=local + nb)


SUMMARY_CONVS = [
    (nn.Conv2d(3, 16, 3, padding=1), (6, 5)),  # few input channels: tight tiles, one pixel each
    (nn.Conv2d(4, 6, 3, padding=1, groups=2), (5, 4)),  # few channels and groups: one group's pixel each
    (nn.Conv2d(2, 67, 3, padding=1), (4, 5)),  # 67 output channels: 16-row tiles with a mask
    (nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), (6, 6)),  # pixel-aligned tiles
    (nn.Conv2d(32, 32, 3, padding=1, groups=32), (5, 4)),  # depthwise
    (nn.Conv2d(6, 10, (3, 2), dilation=(1, 2), padding=(1, 2), groups=2), (5, 6)),  # groups, non-aligned
]


@pytest.mark.parametrize("halo", [0, 1, "full"])
@pytest.mark.parametrize("i", range(len(SUMMARY_CONVS)))
def test_summary_counts_agree_with_an_independent_count(i, halo):
    conv, size = SUMMARY_CONVS[i]
    net = nn.Sequential(conv)
    shape = (conv.in_channels,) + size
    want = _independent_counts(conv, size, halo)
    s_cnn = summary(net, shape, halo=halo)
    efcn = embed(net, shape, halo=halo)
    s_efcn = summary(efcn)
    m = efcn[0]
    actual_bytes = sum(t.numel() * t.element_size() for t in [m.values, m.bias] + list(m.layout.tensors().values())
                       if t is not None)
    for s in (s_cnn, s_efcn):
        row = s.rows[0]
        for k, v in want.items():
            assert row[k] == v, (k, row[k], v, s)
        assert row["nnzb"] == m.nnzb
        assert row["bytes"] == actual_bytes  # the CNN's row predicts the embedded layer's memory exactly
        assert row["dense_bytes"] == want["dense_params"] * 4
        assert math.isclose(row["density"], want["stored"] / want["dense_params"])
        assert s.total["stored"] == row["stored"] and len(s.rows) == 1


def test_summary_of_a_model_totals_and_table():
    net = get_model("mobilenet", width=8, image_size=8)
    s = summary(net, (3, 8, 8), halo=1)
    convs = _convs(net)
    assert [r["layer"] for r in s.rows[:-1]] == [p for p, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    other = s.rows[-1]
    assert other["layer"] == "(other)" and other["cnn_params"] == sum(p.numel() for p in net.parameters()) - sum(
        p.numel() for c in convs for p in c.parameters())
    for k in ("cnn_params", "dense_params", "stored", "local", "bytes", "dense_bytes"):
        assert s.total[k] == sum(r[k] for r in s.rows)
    assert s.total["cnn_params"] == sum(p.numel() for p in net.parameters())
    text = str(s)
    assert "depthwise" in text and "total" in text and "dense eFCN" in text
    d = s.to_dict()
    assert d["total"] == s.total and len(d["rows"]) == len(s.rows)
    with pytest.raises(ValueError, match="input_shape"):
        summary(net)
