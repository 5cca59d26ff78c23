"""The CNN subspace: projection, deviation, back to a CNN; and interpolation between models."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import assert_close_rel

from efcn_sparse import SparseEFCN, deviation, embed, get_model, interpolate, interpolate_curvilinear, \
    interpolate_linear, project, to_cnn
from efcn_sparse.interpolation import OutputAverage, interpolated_model
from efcn_sparse.subspace import clear_cache

BACKEND = "reference"
KEYS = {"weight_norm", "local_norm", "offlocal_norm", "offlocal_ratio", "sharing_deviation", "deviation",
        "bias_norm", "bias_deviation", "offlocal_by_distance"}


def _efcns(m):
    return [x for x in m.modules() if isinstance(x, SparseEFCN)]


def _perturb(m: SparseEFCN, scale=0.3):
    """Random changes on every trainable entry (and the bias), as training in FCN space would make."""
    with torch.no_grad():
        m.values.add_(scale * torch.randn_like(m.values) * m.layout.block_mask(m.values.dtype))
        if m.bias is not None:
            m.bias.add_(scale * torch.randn_like(m.bias))


# ------------------------------------------------------------------------------- dense reference
def _dense_reference(conv: nn.Conv2d, size):
    """Independent of the package: the embedding map E (kernel -> dense eFCN matrix, [M*N, P]) from
    torch's own padding and unfold applied to the identity basis, and per matrix entry its distance
    (in pixels, Chebyshev) to the output pixel's receptive-field bounding box."""
    H, W = size
    Cin, Cout, g = conv.in_channels, conv.out_channels, conv.groups
    cig, cog = Cin // g, Cout // g
    (KH, KW), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    N = Cin * H * W
    eye = torch.eye(N, dtype=torch.float64).reshape(N, H, W, Cin).permute(0, 3, 1, 2)
    pads = conv._reversed_padding_repeated_twice  # (left, right, top, bottom), as Conv2d pads
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    A = torch.nn.functional.unfold(torch.nn.functional.pad(eye, pads, mode=mode), (KH, KW), (dh, dw), 0, (sh, sw))
    Ho = (H + pads[2] + pads[3] - dh * (KH - 1) - 1) // sh + 1
    Wo = (W + pads[0] + pads[1] - dw * (KW - 1) - 1) // sw + 1
    L = Ho * Wo
    A = A.reshape(N, Cin, KH * KW, L).permute(3, 0, 1, 2)  # [L, N, Cin, KK]: tap k of output l reads input n
    E = torch.zeros(L, Cout, N, Cout, cig, KH * KW, dtype=torch.float64)
    for co in range(Cout):
        gi = co // cog
        E[:, co, :, co] = A[:, :, gi * cig:(gi + 1) * cig]
    M = Cout * L
    E = E.reshape(M * N, -1)
    return E, _distances(conv, size), (M, N)


def _distances(conv: nn.Conv2d, size):
    """Per (M, N) matrix entry, the distance in pixels (Chebyshev) from its input pixel to its
    output pixel's receptive-field bounding box."""
    H, W = size
    Cin, Cout = conv.in_channels, conv.out_channels
    (KH, KW), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    pads = conv._reversed_padding_repeated_twice
    Ho = (H + pads[2] + pads[3] - dh * (KH - 1) - 1) // sh + 1
    Wo = (W + pads[0] + pads[1] - dw * (KW - 1) - 1) // sw + 1
    M, N = Cout * Ho * Wo, Cin * H * W
    r, c = torch.arange(M)[:, None], torch.arange(N)[None, :]
    po, pi = r // Cout, c // Cin
    dist = torch.zeros(M, N, dtype=torch.int64)
    for o, x, k, s, d, before in ((po // Wo, pi // W, KH, sh, dh, pads[2]), (po % Wo, pi % W, KW, sw, dw, pads[0])):
        lo = o * s - before
        hi = lo + d * (k - 1)
        dist = torch.maximum(dist, torch.maximum(lo - x, x - hi).clamp(min=0))
    return dist


def _reference_stats(m: SparseEFCN, E, dist):
    W = m.to_dense().double()
    K = torch.linalg.pinv(E) @ W.reshape(-1)
    return _stats(m, W, (E @ K).reshape(W.shape), K, (E != 0).any(1).reshape(W.shape), dist)


def _probed_stats(m: SparseEFCN, conv: nn.Conv2d, size):
    """The dense reference for layers too large for E: the eFCN matrix of a kernel K by probing
    torch's conv (with the layer's padding mode) with every basis image, W(K), linear in K; the
    orthogonal projection of W onto {W(K)} by conjugate gradients on E^T E K = E^T W, starting at
    0 (so the min-norm K), with E^T from autograd. Independent of the package but for m.to_dense()."""
    import copy

    H, W_ = size
    N = conv.in_channels * H * W_
    basis = torch.eye(N, dtype=torch.float64).reshape(N, H, W_, conv.in_channels).permute(0, 3, 1, 2)
    c = copy.deepcopy(conv).double()

    def dense_of(K):
        return c._conv_forward(basis, K, None).permute(0, 2, 3, 1).reshape(N, -1).T

    zero = torch.zeros_like(c.weight.detach())
    _, vjp = torch.func.vjp(dense_of, zero)
    adjoint = lambda D: vjp(D)[0]  # noqa: E731
    W = m.to_dense().double()
    rhs = adjoint(W)
    K, r = zero.clone(), rhs.clone()
    p, rr = r.clone(), (r * r).sum()
    for _ in range(1000):
        if rr.sqrt() <= 1e-15 * rhs.norm():
            break
        Ap = adjoint(dense_of(p))
        alpha = rr / (p * Ap).sum()
        K, r = K + alpha * p, r - alpha * Ap
        rr, rr_old = (r * r).sum(), rr
        p = r + (rr / rr_old) * p
    else:
        raise AssertionError("conjugate gradients did not converge")
    local = dense_of(torch.ones_like(zero)) != 0  # a positive kernel: every entry some tap reaches
    return _stats(m, W, dense_of(K), K.reshape(-1), local, _distances(conv, size))


def _stats(m: SparseEFCN, W, PW, K, local, dist):
    norm = W.norm().item()
    off = W[~local]
    by = torch.zeros(int(dist.max()) + 1, dtype=torch.float64).index_add_(0, dist[~local], off ** 2).sqrt()
    b = m.bias.detach().double().reshape(-1, m.geometry.out_channels)
    return dict(weight_norm=norm, local_norm=W[local].norm().item(), offlocal_norm=off.norm().item(),
                offlocal_ratio=off.norm().item() / norm, sharing_deviation=(W - PW)[local].norm().item() / norm,
                deviation=(W - PW).norm().item() / norm, bias_norm=b.norm().item(),
                bias_deviation=(b - b.mean(0)).norm().item() / b.norm().item(), by=by, PW=PW, K=K)


DENSE_CASES = [  # (conv, input size, halo, block shape)
    (lambda: nn.Conv2d(4, 6, 3, padding=1), (5, 4), "full", (3, 2)),  # pixel-aligned tiles
    (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (5, 4), 1, (3, 2)),  # aligned, groups
    (lambda: nn.Conv2d(3, 5, (3, 2), stride=(2, 1), dilation=(1, 2), padding=(1, 2)), (6, 5), "full", None),  # spanning tiles
    (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), (4, 5), 1, None),  # taps that coincide
    (lambda: nn.Conv2d(2, 4, 3, padding=1, padding_mode="circular", groups=2), (3, 2), "full", (2, 1)),  # wrap-around
    (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="replicate"), (4, 4), 0, (4, 3)),
    (lambda: nn.Conv2d(2, 2, 4, padding="same"), (5, 5), 2, (2, 2)),  # asymmetric padding
    (lambda: nn.Conv2d(2, 2, 3, stride=3, padding=1), (2, 2), "full", (2, 2)),  # kernel entries never used
    (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (5, 5), "full", (4, 2)),  # block rows in one pixel only
    (lambda: nn.Conv2d(4, 3, 3, padding=1), (4, 4), 1, (2, 4)),  # block columns in one pixel only
]


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("case", range(len(DENSE_CASES)))
def test_deviation_projection_and_to_cnn_agree_with_a_dense_reference(case):
    make, size, halo, block = DENSE_CASES[case]
    conv = make()
    m = SparseEFCN.from_conv(conv, size, halo=halo, block_shape=block, backend=BACKEND)
    _perturb(m)
    E, dist, _ = _dense_reference(conv, size)
    ref = _reference_stats(m, E, dist)
    probed = _probed_stats(m, conv, size)  # the reference for larger layers must agree with this one
    for k, v in ref.items():
        if isinstance(v, float):
            assert math.isclose(v, probed[k], rel_tol=1e-9, abs_tol=1e-12), (k, v, probed[k])
        else:
            assert torch.allclose(v, probed[k], rtol=1e-9, atol=1e-10), k

    got = deviation(m)
    assert set(got["layers"]) == {"<model>"} and set(got["total"]) == KEYS
    layer = got["layers"]["<model>"]
    assert layer["halo"] == halo
    for k in KEYS - {"offlocal_by_distance"}:
        assert math.isclose(layer[k], ref[k], rel_tol=1e-9, abs_tol=1e-12), (k, layer[k], ref[k])
        assert math.isclose(got["total"][k], ref[k], rel_tol=1e-9, abs_tol=1e-12), k
    by = torch.tensor(layer["offlocal_by_distance"], dtype=torch.float64)
    n = max(by.numel(), ref["by"].numel())
    pad = lambda t: torch.nn.functional.pad(t, (0, n - t.numel()))  # noqa: E731
    assert torch.allclose(pad(by), pad(ref["by"]), rtol=1e-9, atol=1e-12)
    assert math.isclose(layer["deviation"] ** 2, layer["offlocal_ratio"] ** 2 + layer["sharing_deviation"] ** 2,
                        rel_tol=1e-9)

    # the projection is the dense orthogonal projection; to_cnn's kernel is the min-norm preimage
    p = project(m)
    assert torch.allclose(p.to_dense().double(), ref["PW"], rtol=1e-5, atol=1e-6)
    b = m.bias.detach().reshape(-1, conv.out_channels)
    assert torch.allclose(p.bias.reshape(-1, conv.out_channels), b.mean(0).expand_as(b), atol=1e-6)
    cnn = to_cnn(m)
    assert isinstance(cnn, nn.Conv2d)
    assert (cnn.kernel_size, cnn.stride, cnn.dilation, cnn.groups, cnn.padding_mode) == \
        (conv.kernel_size, conv.stride, conv.dilation, conv.groups, conv.padding_mode)
    assert torch.allclose(cnn.weight.double().reshape(-1), ref["K"], rtol=1e-5, atol=1e-6)
    x = torch.randn(2, conv.in_channels, *size)
    assert_close_rel(cnn(x), p(x), 1e-5, "to_cnn vs projection")


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("case", range(len(DENSE_CASES)))
def test_fresh_embedding_is_in_the_subspace_and_projection_is_idempotent(case):
    make, size, halo, block = DENSE_CASES[case]
    conv = make()
    m = SparseEFCN.from_conv(conv, size, halo=halo, block_shape=block, backend=BACKEND)
    dev = deviation(m)["total"]
    assert dev["deviation"] <= 1e-7 and dev["offlocal_ratio"] == 0 and dev["bias_deviation"] <= 1e-7
    cnn = to_cnn(m)
    E, _, _ = _dense_reference(conv, size)
    used = (E != 0).any(0).reshape(conv.weight.shape)  # kernel entries that touch an input pixel
    w0 = conv.weight.detach()
    if conv.padding_mode == "zeros":
        assert torch.equal(cnn.weight[used], w0[used]) and torch.equal(cnn.bias, conv.bias.detach())  # exact
    assert torch.allclose(cnn.bias, conv.bias.detach(), rtol=1e-6, atol=1e-7)
    if torch.linalg.matrix_rank(E) == E.shape[1]:  # every kernel entry identifiable from the eFCN
        assert torch.allclose(cnn.weight, w0, rtol=1e-6, atol=1e-7)
    else:  # e.g. circular padding wrapping two taps onto one pixel: same eFCN, minimum-norm kernel
        assert torch.allclose(E @ cnn.weight.double().reshape(-1), E @ w0.double().reshape(-1), atol=1e-6)
        assert torch.allclose(cnn.weight.double().reshape(-1), torch.linalg.pinv(E) @ E @ w0.double().reshape(-1),
                              atol=1e-6)
    assert (cnn.weight[~used] == 0).all()

    _perturb(m)
    before = m.values.detach().clone()
    p = project(m)
    pp = project(p)
    assert torch.equal(m.values, before)  # project() leaves its input alone
    assert torch.allclose(pp.values, p.values, rtol=1e-6, atol=1e-7)
    assert torch.allclose(pp.bias, p.bias, rtol=1e-6, atol=1e-7)
    assert deviation(p)["total"]["deviation"] <= 1e-6


def test_fresh_embedding_of_a_network_and_to_cnn_round_trip():
    net = get_model("resnet18", width=4)
    efcn = embed(net, (3, 16, 16), halo=0, backend=BACKEND)  # 16x16: every kernel entry touches the image
    dev = deviation(efcn)
    assert len(dev["layers"]) == 20 and dev["total"]["deviation"] == 0.0
    back = to_cnn(efcn)
    assert not _efcns(back)
    sd, ref = back.state_dict(), net.state_dict()
    assert sd.keys() == ref.keys()
    for k in ref:
        assert torch.equal(sd[k], ref[k]), k  # exactly the source weights (zeros padding)
    x = torch.randn(2, 3, 16, 16)
    net.eval(), back.eval()
    assert_close_rel(back(x), net(x), 1e-6, "round trip")


@pytest.mark.parametrize("halo", [0, 1, "full"])
def test_one_sgd_step_in_fcn_space_leaves_the_subspace(halo):
    net = get_model("skinny", width=4, in_channels=1, image_size=28)
    efcn = embed(net, (1, 28, 28), halo=halo, backend=BACKEND)
    assert deviation(efcn)["total"]["deviation"] == 0.0
    opt = torch.optim.SGD(efcn.parameters(), lr=0.5)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    nn.functional.cross_entropy(efcn(x), y).backward()
    opt.step()
    dev = deviation(efcn)
    for path, layer in dev["layers"].items():
        assert layer["deviation"] > 1e-4 and layer["sharing_deviation"] > 1e-4, path
        assert layer["bias_deviation"] > 1e-4, path
        if halo == 0:
            assert layer["offlocal_ratio"] == 0 and layer["offlocal_norm"] == 0, path
        else:
            assert layer["offlocal_ratio"] > 1e-6, path
            by = layer["offlocal_by_distance"]
            assert by[1] > 0 and (halo == "full" or len(by) == halo + 1), (path, by)
            assert math.isclose(sum(v * v for v in by), layer["offlocal_norm"] ** 2, rel_tol=1e-9)
    t = dev["total"]
    assert math.isclose(t["weight_norm"] ** 2, sum(v["weight_norm"] ** 2 for v in dev["layers"].values()), rel_tol=1e-9)
    assert t["deviation"] > 0 and (t["offlocal_ratio"] > 0) == (halo != 0)


def test_deviation_skips_generic_layers_and_cache_follows_layout_changes():
    generic = SparseEFCN.from_dense(torch.randn(8, 8), (4, 4))
    conv = nn.Conv2d(2, 2, 3, padding=1)
    m = SparseEFCN.from_conv(conv, (2, 2), halo=0, backend=BACKEND)
    _perturb(m)
    model = nn.Sequential(generic, nn.Unflatten(1, (2, 2, 2)), m)
    x = torch.randn(3, 8)
    ref = _reference_stats(m, *_dense_reference(conv, (2, 2))[:2])
    h = generic(x).detach().double().reshape(3, 2, 2, 2).permute(0, 2, 3, 1).reshape(3, 8)  # NHWC-flat image
    b = m.bias.detach().double().reshape(-1, 2).mean(0).repeat(4)
    expected = (h @ ref["PW"].T + b).reshape(3, 2, 2, 2).permute(0, 3, 1, 2)
    assert_close_rel(to_cnn(model)(x).double(), expected, 1e-5, "to_cnn of a mixed model vs dense projection")
    assert_close_rel(project(model)(x).double(), expected, 1e-5, "project of a mixed model vs dense projection")
    dev = deviation(model)
    assert set(dev["layers"]) == {"2"}
    assert project(model)[0] is not generic and torch.equal(project(model)[0].values, generic.values)
    assert isinstance(to_cnn(model)[0], SparseEFCN) and isinstance(to_cnn(model)[2], nn.Conv2d)
    assert deviation(nn.Linear(2, 2)) == {"layers": {}, "total": deviation(nn.Sequential())["total"]}
    # loading a different layout into the same module object invalidates its cached maps
    m = SparseEFCN.from_conv(conv, (5, 4), halo=0, backend=BACKEND)
    assert deviation(m)["total"]["offlocal_ratio"] == 0
    full = SparseEFCN.from_conv(conv, (5, 4), halo="full", backend=BACKEND)
    _perturb(full)
    m.load_state_dict(full.state_dict())
    want = _reference_stats(full, *_dense_reference(conv, (5, 4))[:2])["deviation"]
    assert math.isclose(deviation(m)["total"]["deviation"], want, rel_tol=1e-9)
    clear_cache()
    assert deviation(m)["total"]["offlocal_ratio"] > 0


def test_deviation_and_projection_on_larger_layers_of_each_kind():
    """Larger layers against the probed dense reference, and the chunked paths (several chunks per
    layer) against the single-chunk result."""
    import efcn_sparse.subspace as S

    convs = [(nn.Conv2d(16, 32, 3, padding=1), (6, 6), "full"),
             (nn.Conv2d(3, 16, 3, padding=1, padding_mode="reflect"), (7, 6), 2),
             (nn.Conv2d(16, 16, 3, padding=1, groups=16), (6, 6), 1),
             (nn.Conv2d(8, 16, (3, 2), stride=2, dilation=(1, 2), padding=2, padding_mode="circular", groups=2),
              (7, 8), "full")]
    for conv, size, halo in convs:
        m = SparseEFCN.from_conv(conv, size, halo=halo, backend=BACKEND)
        _perturb(m)
        clear_cache()
        ref, pref = deviation(m), project(m).values
        dense = _probed_stats(m, conv, size)
        for k in KEYS - {"offlocal_by_distance"}:
            assert math.isclose(ref["total"][k], dense[k], rel_tol=1e-9, abs_tol=1e-12), (conv, k, ref["total"][k], dense[k])
        by = torch.tensor(ref["total"]["offlocal_by_distance"], dtype=torch.float64)
        n = max(by.numel(), dense["by"].numel())
        assert torch.allclose(F.pad(by, (0, n - by.numel())), F.pad(dense["by"], (0, n - dense["by"].numel())),
                              rtol=1e-9, atol=1e-12), conv
        assert torch.allclose(project(m).to_dense().double(), dense["PW"], rtol=1e-5, atol=1e-6), conv
        assert torch.allclose(to_cnn(m).weight.double().reshape(-1), dense["K"], rtol=1e-5, atol=1e-6), conv
        old = (S._CHUNK, S._FLAT_CACHE_MAX, S._TABLE_MAX)
        try:
            S._CHUNK, S._FLAT_CACHE_MAX, S._TABLE_MAX = 1024, 0, 0
            clear_cache()
            got, pgot = deviation(m), project(m).values
        finally:
            S._CHUNK, S._FLAT_CACHE_MAX, S._TABLE_MAX = old
            clear_cache()
        for k in KEYS - {"offlocal_by_distance"}:
            assert math.isclose(got["total"][k], ref["total"][k], rel_tol=1e-9, abs_tol=1e-12), k
        assert got["total"]["offlocal_by_distance"] == pytest.approx(ref["total"]["offlocal_by_distance"], rel=1e-9)
        assert torch.allclose(pgot, pref, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------- interpolation
def _two_models():
    net = get_model("skinny", width=4, in_channels=1, image_size=28)
    a = embed(net, (1, 28, 28), halo=1, backend=BACKEND)
    b = embed(net, (1, 28, 28), halo=1, backend=BACKEND)
    for m in _efcns(b):
        _perturb(m, 0.05)
    with torch.no_grad():
        b[-1].weight.mul_(-2)
    return a, b


def test_linear_and_curvilinear_interpolation():
    a, b = _two_models()
    for f in (interpolate_linear, interpolate_curvilinear):
        for alpha, end in ((0.0, a), (1.0, b)):
            mid = f(a, b, alpha)
            for (k, x), (_, y) in zip(mid.state_dict().items(), end.state_dict().items()):
                assert not isinstance(x, torch.Tensor) or torch.allclose(x, y, rtol=1e-6, atol=1e-7), (f.__name__, k)
    lin, cur = interpolate_linear(a, b, 0.3), interpolate_curvilinear(a, b, 0.3)
    for (k, pa), (_, pb), (_, pl), (_, pc) in zip(a.named_parameters(), b.named_parameters(), lin.named_parameters(),
                                                  cur.named_parameters()):
        assert torch.allclose(pl, 0.7 * pa + 0.3 * pb, atol=1e-6), k
        assert math.isclose(pc.norm().item(), 0.7 * pa.norm().item() + 0.3 * pb.norm().item(), rel_tol=1e-5), k
        cos = torch.nn.functional.cosine_similarity(pc.reshape(1, -1), pl.reshape(1, -1)).item()
        assert cos > 1 - 1e-5 or pl.norm() == 0, k  # same direction as the linear mix
    for m in _efcns(lin):  # masked entries stay zero
        assert torch.equal(m.values, m.layout.apply_mask(m.values))


def test_interpolate_evaluates_the_path_and_output_averaging():
    a, b = _two_models()
    x, y = torch.randn(12, 1, 28, 28), torch.randint(0, 10, (12,))
    loader = [(x[:5], y[:5]), (x[5:], y[5:])]
    res = interpolate(a, b, [0.0, 0.5, 1.0], loader, mode="linear")
    assert res["alpha"] == [0.0, 0.5, 1.0] and len(res["loss"]) == len(res["accuracy"]) == 3
    a.eval()
    with torch.no_grad():
        want = nn.functional.cross_entropy(a(x), y).item()
        acc = (a(x).argmax(1) == y).float().mean().item()
    assert math.isclose(res["loss"][0], want, rel_tol=1e-5) and math.isclose(res["accuracy"][0], acc)
    a.train(), b.train()
    out = interpolate(a, b, [0.25], loader, mode="output")
    avg = interpolated_model(a, b, 0.25, "output")
    assert isinstance(avg, OutputAverage)
    a.eval(), b.eval()
    with torch.no_grad():
        mixed = 0.75 * a(x) + 0.25 * b(x)
    assert math.isclose(out["loss"][0], nn.functional.cross_entropy(mixed, y).item(), rel_tol=1e-5)
    assert all(0 <= v <= 1 for v in res["accuracy"] + out["accuracy"])
    cur = interpolate(a, b, [0.5], loader, mode="curvilinear")
    assert math.isfinite(cur["loss"][0])
    with pytest.raises(ValueError, match="mode"):
        interpolate(a, b, [0.5], loader, mode="spline")
    other = embed(get_model("skinny", width=4, in_channels=1, image_size=28), (1, 28, 28), halo=0)
    with pytest.raises(ValueError, match="differ"):
        interpolate_linear(a, other, 0.5)
