"""The ``triton`` backend against the reference, on CPU tensors under the Triton interpreter.

conftest sets TRITON_INTERPRET=1 before triton loads. Sizes stay tiny: the interpreter runs
each program in Python. The interpreter has no bfloat16 (that dtype is checked on a GPU by
benchmarks/gpu_check.py).
"""

import os

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close_rel, path_missing, require_or_skip
from efcn_sparse import BSRLayout, SparseEFCN, backends, ops
from efcn_sparse.kernels import reference as ref
from efcn_sparse.kernels import triton_bsr as tb  # imports without triton; a bug in it must fail here

_reason = backends.unavailable_reason("triton", "cpu")
if _reason is not None:
    require_or_skip("triton", f"triton backend unavailable: {_reason}")

REL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.float64: 1e-12}


def random_layout(block_shape, masked=True):
    """A 4x5 block grid with partial edge blocks (when masked), an empty block row and an empty
    block column, stored blocks at random, and a random element mask (when masked)."""
    BR, BC = block_shape
    M, N = (3 * BR + 5, 4 * BC + 3) if masked else (4 * BR, 5 * BC)
    keep = torch.rand(4, 5) < 0.6
    keep[1, :] = False  # empty block row
    keep[:, 2] = False  # empty block column
    keep[3, 4] = keep[0, 0] = True  # the partial corner block, and one full block
    if not masked:
        r, c = torch.nonzero(keep, as_tuple=True)
        return BSRLayout.from_block_coords((M, N), block_shape, r, c).validate()
    dense = keep.repeat_interleave(BR, 0).repeat_interleave(BC, 1)[:M, :N] & (torch.rand(M, N) < 0.7)
    lay = BSRLayout.from_dense_mask(dense, block_shape)
    assert lay.has_mask
    return lay.validate()


def random_case(block_shape, batch, dtype, masked=True):
    lay = random_layout(block_shape, masked)
    M, N = lay.shape
    values = lay.apply_mask(torch.randn(lay.nnzb, *block_shape)).to(dtype)
    x, dy, bias = torch.randn(batch, N).to(dtype), torch.randn(batch, M).to(dtype), torch.randn(M).to(dtype)
    return lay, values, x, dy, bias


def check_three_ops(lay, values, x, dy, bias, rel):
    M, N = lay.shape
    BR, BC = lay.block_shape
    y = tb.forward(x, values, bias, lay.crow_ptr, lay.col_idx, lay.row_idx, M)
    assert_close_rel(y, ref.forward(x, values, bias, lay.crow_ptr, lay.col_idx, lay.row_idx, M), rel, "forward")
    y0 = tb.forward(x, values, None, lay.crow_ptr, lay.col_idx, lay.row_idx, M)
    assert_close_rel(y0, ref.forward(x, values, None, lay.crow_ptr, lay.col_idx, lay.row_idx, M), rel, "forward, no bias")
    dx = tb.grad_input(dy, values, lay.ccol_ptr, lay.t_row_idx, lay.t_perm, N)
    assert_close_rel(dx, ref.grad_input(dy, values, lay.ccol_ptr, lay.t_row_idx, lay.t_perm, N), rel, "grad_input")
    dw = tb.grad_weight(dy, x, lay.row_idx, lay.col_idx, lay.mask_ids, lay.mask_patterns, BR, BC)
    dw_ref = ref.grad_weight(dy, x, lay.row_idx, lay.col_idx, lay.mask_ids, lay.mask_patterns, BR, BC)
    assert_close_rel(dw, dw_ref, rel, "grad_weight")
    assert bool((dw[~lay.block_mask()] == 0).all()), "masked entries of grad_weight must be exactly zero"
    for t in (y, dx, dw):
        assert t.dtype == values.dtype and t.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("batch", [1, 7, 16, 33])
@pytest.mark.parametrize("block_shape", [(16, 16), (32, 16)], ids=["16x16", "32x16"])
def test_parity_masked_edges(block_shape, batch, dtype):
    check_three_ops(*random_case(block_shape, batch, dtype), REL[dtype])


@pytest.mark.parametrize("block_shape,batch,dtype", [
    ((16, 32), 70, torch.float32),   # two batch tiles, the second partial
    ((24, 20), 5, torch.float32),    # sides that are not powers of two (padded to 32 in the kernel)
    ((16, 16), 9, torch.float64),
])
def test_parity_other_shapes(block_shape, batch, dtype):
    check_three_ops(*random_case(block_shape, batch, dtype), REL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_parity_without_element_mask(dtype):
    case = random_case((16, 32), 12, dtype, masked=False)
    assert not case[0].has_mask
    check_three_ops(*case, REL[dtype])


def test_empty_layout():
    lay = BSRLayout.from_block_coords((20, 40), (16, 16), [], [])
    x, dy, bias = torch.randn(3, 40), torch.randn(3, 20), torch.randn(20)
    values = torch.zeros(0, 16, 16)
    torch.testing.assert_close(tb.forward(x, values, bias, lay.crow_ptr, lay.col_idx, lay.row_idx, 20),
                               bias.expand(3, 20))
    assert bool((tb.grad_input(dy, values, lay.ccol_ptr, lay.t_row_idx, lay.t_perm, 40) == 0).all())
    assert tb.grad_weight(dy, x, lay.row_idx, lay.col_idx, None, None, 16, 16).shape == (0, 16, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_linear_autograd(dtype):
    lay, values, x, dy, bias = random_case((32, 16), 7, dtype)
    grads = {}
    for backend in ("reference", "triton"):
        leaves = [t.clone().requires_grad_() for t in (x, values, bias)]
        y = ops.linear(leaves[0], lay, leaves[1], leaves[2], backend=backend)
        y.backward(dy)
        grads[backend] = [y.detach()] + [t.grad for t in leaves]
    for name, a, e in zip(("y", "dx", "dvalues", "dbias"), grads["triton"], grads["reference"]):
        assert_close_rel(a, e, REL[dtype], name)


def test_from_conv_matches_conv():
    conv = torch.nn.Conv2d(3, 16, (3, 2), padding=1, bias=True)
    m = SparseEFCN.from_conv(conv, (6, 5), halo=1, backend="triton")
    x = torch.randn(2, 3, 6, 5, requires_grad=True)
    y = m(x)
    expected = F.conv2d(x, conv.weight, conv.bias, padding=1)
    assert_close_rel(y, expected, 1e-5, "conv output")
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, g)
    (dx_ref,) = torch.autograd.grad(expected, x, g)
    assert_close_rel(dx, dx_ref, 1e-5, "conv input gradient")


def test_registered_ops_opcheck():
    if not hasattr(torch.library, "triton_op"):
        pytest.skip(f"torch {torch.__version__} < 2.6 has no torch.library.triton_op: plain function path")
    for op in ("forward", "grad_input", "grad_weight"):  # torch >= 2.6: registration must have happened
        assert torch._C._dispatch_has_kernel(f"efcn_sparse_triton::{op}"), f"efcn_sparse_triton::{op} is not registered"
    lay, values, x, dy, bias = random_case((16, 16), 5, torch.float32)
    M, N = lay.shape
    utils = ("test_schema", "test_faketensor")
    o = torch.ops.efcn_sparse_triton
    torch.library.opcheck(o.forward.default, (x, values, bias, lay.crow_ptr, lay.col_idx, M), test_utils=utils)
    torch.library.opcheck(o.grad_input.default, (dy, values, lay.ccol_ptr, lay.t_row_idx, lay.t_perm, N),
                          test_utils=utils)
    torch.library.opcheck(o.grad_weight.default, (dy, x, lay.row_idx, lay.col_idx, lay.mask_ids, lay.mask_patterns,
                                                  16, 16), test_utils=utils)


def test_availability_and_dtype_errors():
    assert tb.unavailable_reason(torch.device("cpu")) is None
    assert "triton" in backends.available_backends("cpu")
    assert tb.unavailable_reason(torch.device("meta")) is not None
    lay, values, x, dy, bias = random_case((16, 16), 2, torch.float32)
    with pytest.raises(TypeError, match="unsupported dtype"):
        tb.forward(x.int(), values.int(), None, lay.crow_ptr, lay.col_idx, lay.row_idx, lay.shape[0])


def test_heuristic_configs_are_valid():
    for kind in ("forward", "grad_input", "grad_weight"):
        for B in (1, 7, 33, 256, 10**5):
            for dtype in (torch.float32, torch.bfloat16):
                meta = tb._heuristic(kind, B, 64, 64, dtype)
                b = meta["BLOCK_B"]
                assert b >= 16 and b & (b - 1) == 0 and b <= max(16, tb._pow2(B))


def _aot_cases(*args):
    """The JSON lines of ``python -m efcn_sparse.kernels.triton_aot ARGS`` (the real compiler, in a
    process without TRITON_INTERPRET); skips (or fails where required) without the compiler."""
    import json
    import subprocess
    import sys

    missing = path_missing("triton-compiler")
    if missing:
        require_or_skip("triton-compiler", f"no Triton CUDA compiler here: {missing}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "efcn_sparse.kernels.triton_aot", *args], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]  # a ptxas error in our kernels fails here, never skips
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def test_kernels_compile_for_sm90():
    """The real compiler (not the interpreter) on the main shapes, for an H100, without a GPU:
    no register spills, shared memory within an A100's 163 KiB, aligned tiles loaded in 16-byte
    cp.async copies (software-pipelined)."""
    cases = _aot_cases("90")
    assert len(cases) == 6
    for c in cases:
        what = f"{c['kind']} {c['dtype']} {c['block_shape']}"
        assert c["ptxas_ok"] and c["spill_bytes"] == 0, f"{what}: {c}"
        assert c["shared_bytes"] <= 163 * 1024, f"{what}: {c}"
        if c["block_shape"] == [64, 64]:  # aligned shapes (the masked odd ones cannot be)
            assert c["cp_async_16B"] > 0, f"{what}: tile loads are not pipelined 16-byte copies: {c}"


@pytest.mark.parametrize("block_shape,batch", [((24, 20), 5), ((16, 32), 70), ((64, 48), 3)])
def test_float64_takes_the_fma_path_exactly(block_shape, batch):
    """float64 never reaches tl.dot (its lowering differs by Triton release and GPU): rank-1
    updates in float64, exact to 1e-12 against the reference, masked edges and partial tiles too."""
    check_three_ops(*random_case(block_shape, batch, torch.float64), REL[torch.float64])


def test_float64_kernels_compile_for_sm90_without_tensor_cores():
    """The float64 path through the real compiler: it compiles for an H100/H200, spills nothing,
    and holds no mma/wgmma instruction; the bfloat16 reference shapes do use the tensor cores."""
    for args, has_mma in ((["90", "fp64"], False), (["90"], True)):
        cases = _aot_cases(*args)
        assert len(cases) == 6
        for c in cases:
            what = f"{c['kind']} {c['dtype']} {c['block_shape']}"
            assert c["ptxas_ok"] and c["spill_bytes"] == 0, f"{what}: {c}"
            if c["dtype"] == "fp64":
                assert c["mma"] == 0, f"{what}: float64 must not use tensor-core dots: {c}"
            elif c["dtype"] == "bf16":
                assert (c["mma"] > 0) == has_mma, f"{what}: bfloat16 tiles must run on the tensor cores: {c}"


@pytest.mark.parametrize("block_shape", [(16, 16), (8, 24)])
def test_float32_values_with_float16_activations_compute_as_their_float16_copy(block_shape):
    """autocast's float32 master values go to the kernels uncast (takes_float32_values): rounded
    to the activations' dtype as they are loaded, the same bits as the cast copy; dW in float32
    is the float16 dW widened. (bfloat16 alike, checked on a GPU: the interpreter has none.)"""
    torch.manual_seed(3)
    lay, v32, x, dy, bias = random_case(block_shape, 5, torch.float32)
    h = torch.float16
    x, dy, bias, v16 = x.to(h), dy.to(h), bias.to(h), v32.to(h)
    M, N = lay.shape
    BR, BC = lay.block_shape
    assert tb.takes_float32_values(h) and tb.takes_float32_values(torch.bfloat16)
    assert not tb.takes_float32_values(torch.float32)
    y = tb.forward(x, v32, bias, lay.crow_ptr, lay.col_idx, lay.row_idx, M)
    assert y.dtype == h and torch.equal(y, tb.forward(x, v16, bias, lay.crow_ptr, lay.col_idx, lay.row_idx, M))
    dx = tb.grad_input(dy, v32, lay.ccol_ptr, lay.t_row_idx, lay.t_perm, N)
    assert dx.dtype == h and torch.equal(dx, tb.grad_input(dy, v16, lay.ccol_ptr, lay.t_row_idx, lay.t_perm, N))
    gw = (dy, x, lay.row_idx, lay.col_idx, lay.mask_ids, lay.mask_patterns, BR, BC)
    dw = tb.grad_weight_as(*gw, torch.float32)
    assert dw.dtype == torch.float32 and torch.equal(dw, tb.grad_weight(*gw).float())
    # through the public ops, as autocast's backward calls them
    assert torch.equal(ops.bsr_grad_weight(*gw, "triton", torch.float32), dw)


def test_autocast_kernels_compile_for_sm90_on_tensor_cores():
    """bfloat16 activations with float32 master values (autocast, values rounded as they are
    loaded, dW stored in float32) through the real compiler for an H100/H200: no spills, shared
    memory within 163 KiB, and the products still on the tensor cores (mma/wgmma)."""
    cases = _aot_cases("90", "autocast")
    assert len(cases) == 6
    for c in cases:
        what = f"{c['kind']} {c['dtype']}/{c['values_dtype']} {c['block_shape']}"
        assert (c["dtype"], c["values_dtype"]) == ("bf16", "fp32"), what
        assert c["ptxas_ok"] and c["spill_bytes"] == 0, f"{what}: {c}"
        assert c["shared_bytes"] <= 163 * 1024, f"{what}: {c}"
        assert c["mma"] > 0, f"{what}: the rounded values must still reach the tensor cores: {c}"


def test_autocast_hands_the_triton_kernels_float32_master_values():
    """Under float16 autocast (the interpreter has no bfloat16) ops.linear gives the triton
    backend the float32 values uncast; forward and gradients have the bits of the explicit cast."""
    torch.manual_seed(4)
    lay, v32, x, dy, bias = random_case((16, 16), 6, torch.float32)
    h = torch.float16
    v = v32.clone().requires_grad_()
    b = bias.clone().requires_grad_()
    xx = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=h):
        y = ops.linear(xx, lay, v, b, backend="triton")
    assert y.dtype == h
    assert any(getattr(fn, "variable", None) is v for fn, _ in y.grad_fn.next_functions if fn is not None)
    y.backward(dy.to(h))
    vs, bs, xs = (t.detach().to(h).requires_grad_() for t in (v32, bias, x))
    ys = ops.linear(xs, lay, vs, bs, backend="triton")
    ys.backward(dy.to(h))
    assert torch.equal(y, ys)
    assert v.grad.dtype == torch.float32 and torch.equal(v.grad, vs.grad.float())
    assert torch.equal(b.grad, bs.grad.float()) and torch.equal(xx.grad, xs.grad.float())
