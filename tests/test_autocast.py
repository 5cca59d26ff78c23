"""SparseEFCN and ops.linear under torch.autocast: computed in the autocast dtype, as F.linear is."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import efcn_sparse
from efcn_sparse import SparseEFCN, ops

GPU = torch.cuda.is_available()
# (device, backend): every backend that runs here; the GPU ones where a GPU is present
CASES = [("cpu", b) for b in ("reference", "cpu") if b in efcn_sparse.available_backends("cpu")] + [
    ("cuda", b) for b in ("cuda", "triton") if GPU and b in efcn_sparse.available_backends("cuda")]
CPU_BACKENDS = [b for d, b in CASES if d == "cpu"]
LOW = [torch.bfloat16, torch.float16]


def _layer(backend, seed=0, device="cpu"):
    torch.manual_seed(seed)
    conv = nn.Conv2d(6, 32, 3, padding=1, groups=2)  # groups: masked entries inside stored blocks
    m = SparseEFCN.from_conv(conv, (5, 5), halo=1, backend=backend)
    with torch.no_grad():  # off-local (halo) entries non-zero too, masked ones untouched
        m.values.add_(m.layout.apply_mask(0.1 * torch.randn_like(m.values)))
    return conv.to(device), m.to(device)


def _raw_masked(m):
    return ~m.layout.block_mask()


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("device,backend", CASES)
def test_module_computes_in_the_autocast_dtype_like_an_explicit_cast(device, backend, dtype):
    _, m = _layer(backend, device=device)
    x = torch.randn(7, 6, 5, 5, device=device)
    with torch.autocast(device, dtype=dtype):
        y = m(x)
    assert y.dtype == dtype
    # the same numbers as casting by hand outside autocast: autocast changes dtypes, nothing else
    flat = x.permute(0, 2, 3, 1).reshape(7, -1).to(dtype)
    ref = ops.linear(flat, m.layout, m.values.detach().to(dtype), m.bias.detach().to(dtype), backend=backend)
    assert torch.equal(y.permute(0, 2, 3, 1).reshape(7, -1), ref)
    assert m.values.dtype == torch.float32  # the master values are not touched


@pytest.mark.parametrize("device,backend", CASES)
def test_autocast_output_matches_the_conv_to_bfloat16_precision(device, backend):
    conv, m = _layer(backend, device=device)
    with torch.no_grad():
        m.values.copy_(SparseEFCN.from_conv(conv, (5, 5), halo=1).values)
    x = torch.randn(5, 6, 5, 5, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        y, y_conv = m(x), conv(x)
    assert y.dtype == y_conv.dtype == torch.bfloat16
    # independent reference: the conv in float32 on bfloat16-rounded operands
    ref = F.conv2d(x.bfloat16().float(), conv.weight.bfloat16().float(), conv.bias.bfloat16().float(), padding=1,
                   groups=2)
    assert (y.float() - ref).abs().max() <= 1e-2 * ref.abs().max()


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("device,backend", CASES)
def test_float32_master_values_get_float32_gradients_and_masked_ones_stay_zero(device, backend, dtype):
    _, m = _layer(backend, device=device)
    x = torch.randn(7, 6, 5, 5, device=device, requires_grad=True)
    with torch.autocast(device, dtype=dtype):
        loss = m(x).float().square().sum()
    loss.backward()
    assert m.values.grad.dtype == torch.float32 and m.bias.grad.dtype == torch.float32
    assert x.grad.dtype == torch.float32
    masked = _raw_masked(m)
    assert masked.any() and (m.values.grad[masked] == 0).all()  # raw gradient, not through to_dense

    # the gradients are those of the explicitly cast computation, converted to float32
    xs = x.detach().to(dtype).requires_grad_()
    vs = m.values.detach().to(dtype).requires_grad_()
    bs = m.bias.detach().to(dtype).requires_grad_()
    flat = xs.permute(0, 2, 3, 1).reshape(7, -1)
    ops.linear(flat, m.layout, vs, bs, backend=backend).float().square().sum().backward()
    assert torch.equal(m.values.grad, vs.grad.float())
    assert torch.equal(m.bias.grad, bs.grad.float())
    assert torch.equal(x.grad, xs.grad.float())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_low_precision_input_to_a_float32_layer_is_accepted_under_autocast(backend):
    _, m = _layer(backend)
    x = torch.randn(3, 6, 5, 5).bfloat16()
    with pytest.raises(TypeError, match="does not match the layer's dtype"):
        m(x)  # outside autocast a dtype mismatch stays an error, as for nn.Linear
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m(x).dtype == torch.bfloat16


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="cpu backend unavailable")
@pytest.mark.parametrize("dot", ["0", "1"])
def test_cpu_backend_takes_the_float32_master_values_uncast(monkeypatch, dot):
    """The cpu kernels round float32 values to bfloat16 while packing them (float32 or dot-product
    path), so bfloat16 autocast hands them the master values: no bfloat16 copy of the weights per
    step, and their gradient arrives in float32 with no cast node (the bits are those of the
    explicit cast: the tests above run this path). float16 still casts; so does the reference."""
    monkeypatch.setenv("EFCN_CPU_BF16_DOT", dot)
    _, m = _layer("cpu")
    flat = torch.randn(4, m.shape[1])

    def values_reach_the_op_uncast(dtype, backend="cpu"):
        with torch.autocast("cpu", dtype=dtype):
            y = ops.linear(flat, m.layout, m.values, m.bias, backend=backend)
        assert y.dtype == dtype
        return any(getattr(fn, "variable", None) is m.values for fn, _ in y.grad_fn.next_functions if fn is not None)

    assert values_reach_the_op_uncast(torch.bfloat16)
    assert not values_reach_the_op_uncast(torch.float16)
    assert not values_reach_the_op_uncast(torch.bfloat16, "reference")


def test_float64_is_left_alone_by_autocast():
    torch.manual_seed(0)
    m = SparseEFCN.from_conv(nn.Conv2d(4, 16, 3, padding=1).double(), (4, 4))
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, m(x), rtol=0, atol=0)


def test_ops_linear_under_autocast_and_outside_it():
    _, m = _layer("reference")
    flat = torch.randn(4, m.shape[1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ops.linear(flat, m.layout, m.values, m.bias).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert ops.linear(flat, m.layout, m.values, m.bias).dtype == torch.float32
    assert ops.linear(flat, m.layout, m.values, m.bias).dtype == torch.float32


def test_embedded_network_trains_under_autocast_like_its_cnn():
    """A whole embedded network in a bfloat16 autocast step: same loss as the CNN's to bf16 precision."""
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2, padding=1),
                        nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
    fc = efcn_sparse.embed(cnn, (3, 8, 8))
    x, target = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    losses = []
    for net in (cnn, fc):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x)
            losses.append(F.cross_entropy(out.float(), target))
        assert out.dtype == torch.bfloat16
        losses[-1].backward()
    assert abs(losses[0].item() - losses[1].item()) <= 2e-2 * abs(losses[0].item())
    for p in fc.parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()


def test_autocast_under_torch_compile_matches_eager():
    _, m = _layer("reference")
    x = torch.randn(3, 6, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = m(x)
        compiled = torch.compile(m, backend="aot_eager", fullgraph=True)(x)
    assert compiled.dtype == torch.bfloat16
    assert torch.equal(compiled, eager)
