"""The ``cpu`` backend (C++ kernels in csrc/cpu/) against the ``reference`` backend.

Parity on random layouts (empty block rows and columns, element masks, partial edge blocks,
rows and columns longer than one packed panel, odd batch sizes), gradcheck and opcheck through
the public op, determinism across runs and thread counts, and precondition errors raised as
RuntimeError instead of crashes. Outputs are poisoned before each kernel call (a NaN-filled
block of the same size is freed just before, so an entry the kernel forgets to write shows up).
"""

import pytest
import torch

from conftest import assert_close_rel, require_or_skip
from efcn_sparse import backends, ops
from efcn_sparse.kernels import reference as R
from efcn_sparse.layout import BSRLayout

_REASON = backends.unavailable_reason("cpu", "cpu")
if _REASON is not None:
    require_or_skip("cpu-ext", f"cpu backend unavailable: {_REASON}")

C_OPS = torch.ops.efcn_sparse_C
REL = {torch.float32: 2e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2}


def random_layout(M, N, BR, BC, density=0.4, mask=False, full_row=False, full_col=False, empties=True):
    """Random layout with at least one empty block row and column (``empties``, grid allowing),
    optionally a fully stored row/column (to exceed one packed panel) and random element masks."""
    nbr, nbc = -(-M // BR), -(-N // BC)
    dm = torch.rand(nbr, nbc) < density
    if empties and nbr > 1:
        dm[torch.randint(nbr, ()).item()] = False
    if empties and nbc > 1:
        dm[:, torch.randint(nbc, ()).item()] = False
    if full_row:
        dm[nbr - 1] = True  # the last row: also partial when M % BR
    if full_col:
        dm[:, nbc - 1] = True
    r, c = torch.nonzero(dm, as_tuple=True)
    if not mask:
        return BSRLayout.from_block_coords((M, N), (BR, BC), r, c).validate()
    pats = torch.rand(3, BR, BC) < 0.7
    pats[0] = True
    ids = torch.randint(0, 3, (r.numel(),))
    return BSRLayout.from_block_coords((M, N), (BR, BC), r, c, mask_ids=ids, mask_patterns=pats).validate()


def random_values(lay, dtype):
    return lay.apply_mask(torch.randn(lay.nnzb, *lay.block_shape, dtype=dtype))


def poisoned(fn, shape, dtype):
    """fn() with a NaN-filled buffer of the output's size freed just before, so the allocator
    likely hands the kernel that memory: entries it does not write stay NaN."""
    junk = torch.full(shape, float("nan"), dtype=dtype)
    del junk
    return fn()


def run_all(backend_ops, lay, x, dy, v, bias):
    M, N = lay.shape
    BR, BC = lay.block_shape
    B = x.shape[0]
    y = poisoned(lambda: backend_ops.forward(x, v, bias, lay.crow_ptr, lay.col_idx, lay.row_idx, M), (B, M), x.dtype)
    dx = poisoned(lambda: backend_ops.grad_input(dy, v, lay.ccol_ptr, lay.t_row_idx, lay.t_perm, N), (B, N), x.dtype)
    dw = poisoned(lambda: backend_ops.grad_weight(dy, x, lay.row_idx, lay.col_idx, lay.mask_ids, lay.mask_patterns,
                                                  BR, BC), (lay.nnzb, BR, BC), x.dtype)
    return y, dx, dw


def cpu_kernels():
    return backends.kernels("cpu")


# (M, N, BR, BC, options): partial edge blocks, blocks narrower/wider than a register tile,
# rows/columns longer than one packed panel (1024 entries), one block wider than a panel,
# blocks of 1-4 rows or columns.
SHAPES = [
    (100, 70, 16, 32, dict(mask=True)),
    (64, 64, 16, 16, dict()),
    (130, 200, 48, 40, dict(mask=True)),
    (97, 131, 8, 24, dict(mask=True)),
    (45, 1100, 16, 16, dict(full_row=True)),
    (1100, 37, 16, 16, dict(full_col=True, mask=True)),
    (9, 2100, 4, 1040, dict(full_row=True)),
    (300, 260, 64, 64, dict(density=0.6)),
    # narrow blocks (tight few-channel layers): grouped block rows/columns, gathered panels
    (100, 70, 16, 1, dict(mask=True)),
    (130, 61, 64, 3, dict(mask=True)),
    (30, 2000, 4, 3, dict(full_row=True)),
    (1100, 37, 7, 2, dict(full_col=True, mask=True)),
    (70, 90, 1, 64, dict(mask=True)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}_b{s[2]}x{s[3]}")
@pytest.mark.parametrize("B", [1, 7, 13])
def test_parity_with_reference(shape, B, dtype):
    M, N, BR, BC, opts = shape
    lay = random_layout(M, N, BR, BC, **opts)
    v = random_values(lay, dtype)
    x, dy, bias = torch.randn(B, N, dtype=dtype), torch.randn(B, M, dtype=dtype), torch.randn(M, dtype=dtype)
    got = run_all(cpu_kernels(), lay, x, dy, v, bias)
    want = run_all(R, lay, x, dy, v, bias)
    for g, w, what in zip(got, want, ("forward", "grad_input", "grad_weight")):
        assert_close_rel(g, w, REL[dtype], f"{what} {shape} B={B}")
        assert torch.isfinite(g).all(), f"{what}: unwritten (poisoned) entries"
    y0 = cpu_kernels().forward(x, v, None, lay.crow_ptr, lay.col_idx, lay.row_idx, M)
    assert_close_rel(y0, want[0] - bias, REL[dtype], "forward without bias")
    if lay.has_mask:
        assert (got[2][~lay.block_mask()] == 0).all(), "masked entries of grad_weight must be exactly zero"


def test_empty_layout_and_empty_batch():
    lay = BSRLayout.from_block_coords((50, 40), (16, 16), [], [])
    v = torch.zeros(0, 16, 16)
    x, dy, bias = torch.randn(3, 40), torch.randn(3, 50), torch.randn(50)
    y, dx, dw = run_all(cpu_kernels(), lay, x, dy, v, bias)
    assert torch.equal(y, bias.expand(3, 50)) and torch.equal(dx, torch.zeros(3, 40)) and dw.shape == (0, 16, 16)
    lay = random_layout(50, 40, 16, 16, density=1.0, mask=True)
    v = random_values(lay, torch.float32)
    y, dx, dw = run_all(cpu_kernels(), lay, x[:0], dy[:0], v, bias)
    assert y.shape == (0, 50) and dx.shape == (0, 40) and torch.equal(dw, torch.zeros_like(dw))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_types_match_reference(dtype):
    """Computed in float32 and rounded once, like the reference."""
    lay = random_layout(100, 70, 16, 32, mask=True)
    v = random_values(lay, dtype)
    x, dy, bias = (torch.randn(5, 70).to(dtype), torch.randn(5, 100).to(dtype), torch.randn(100).to(dtype))
    for g, w in zip(run_all(cpu_kernels(), lay, x, dy, v, bias), run_all(R, lay, x, dy, v, bias)):
        assert g.dtype == dtype
        assert_close_rel(g.float(), w.float(), REL[torch.bfloat16], str(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_public_op_non_contiguous_inputs(dtype):
    """ops.linear with strided x, bias and grad_output gives the reference's results and grads."""
    lay = random_layout(90, 75, 16, 24, mask=True)
    v0 = random_values(lay, dtype)
    x0 = torch.randn(75, 2 * 7, dtype=dtype).t()[::2]  # [7, 75], neither row- nor column-contiguous
    b0 = torch.randn(2 * 90, dtype=dtype)[::2]
    g = torch.randn(90, 7, dtype=dtype).t()
    assert not x0.is_contiguous() and not b0.is_contiguous() and not g.is_contiguous()
    results = {}
    for backend in ("cpu", "reference"):
        x, b = x0.detach().requires_grad_(), b0.detach().requires_grad_()  # views: strides kept
        v = v0.detach().clone().requires_grad_()
        y = ops.linear(x, lay, v, b, backend=backend)
        y.backward(g)
        results[backend] = (y, x.grad, v.grad, b.grad)
    for got, want, what in zip(results["cpu"], results["reference"], ("y", "dx", "dW", "db")):
        assert_close_rel(got, want, REL[dtype], what)


def test_gradcheck_float64():
    lay = random_layout(14, 13, 4, 6, density=0.6, mask=True)  # partial edge blocks both ways
    maskf = lay.block_mask(torch.float64)
    v = random_values(lay, torch.float64).requires_grad_()
    x = torch.randn(3, 13, dtype=torch.float64, requires_grad=True)
    b = torch.randn(14, dtype=torch.float64, requires_grad=True)
    # v * mask: numerical derivatives along masked entries then vanish like the analytic ones
    f = lambda x, v, b: ops.linear(x, lay, v * maskf, b, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, v, b), eps=1e-6, atol=1e-8)


def test_opcheck_bsr_linear():
    lay = random_layout(40, 36, 8, 12, mask=True)
    v = random_values(lay, torch.float32).requires_grad_()
    x = torch.randn(5, 36, requires_grad=True)
    b = torch.randn(40, requires_grad=True)
    args = (x, v, b, lay.crow_ptr, lay.col_idx, lay.row_idx, lay.ccol_ptr, lay.t_row_idx, lay.t_perm,
            lay.mask_ids, lay.mask_patterns, 40, "cpu")
    torch.library.opcheck(torch.ops.efcn_sparse.bsr_linear.default, args)


def test_auto_resolves_to_cpu():
    assert backends.resolve("auto", "cpu") == "cpu"


def test_deterministic_across_runs_and_threads():
    lay = random_layout(1500, 1300, 64, 48, density=0.3, mask=True, full_row=True)
    v = random_values(lay, torch.float32)
    x, dy, bias = torch.randn(37, 1300), torch.randn(37, 1500), torch.randn(1500)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_all(cpu_kernels(), lay, x, dy, v, bias)
        torch.set_num_threads(max(2, threads))
        two = run_all(cpu_kernels(), lay, x, dy, v, bias)
        again = run_all(cpu_kernels(), lay, x, dy, v, bias)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(one, two, again):
        assert torch.equal(a, b) and torch.equal(b, c)


# ---------------------------------------------------------------------------- preconditions
def _setup():
    lay = random_layout(64, 48, 16, 16, density=0.6, mask=True)
    return lay, random_values(lay, torch.float32), torch.randn(3, 48), torch.randn(3, 64)


def _i32(values):
    return torch.tensor(values, dtype=torch.int32)


def _forward_cases(lay, v, x):
    good = dict(x=x, values=v, bias=None, crow_ptr=lay.crow_ptr, col_idx=lay.col_idx, row_idx=lay.row_idx, M=64)
    bad_col = lay.col_idx.clone()
    bad_col[-1] = 3  # ceil(48 / 16) = 3 block columns
    neg_col = lay.col_idx.clone()
    neg_col[0] = -1
    bad_crow = lay.crow_ptr.clone()
    bad_crow[1], bad_crow[2] = bad_crow[2] + 1, bad_crow[1]
    short_end = lay.crow_ptr.clone()
    short_end[-1] -= 1
    return good, {
        "int64 col_idx": dict(col_idx=lay.col_idx.long()),
        "column out of range": dict(col_idx=bad_col),
        "negative column": dict(col_idx=neg_col),
        "non-monotone crow_ptr": dict(crow_ptr=bad_crow),
        "crow_ptr not ending at nnzb": dict(crow_ptr=short_end),
        "crow_ptr of the wrong length": dict(crow_ptr=lay.crow_ptr[:-1]),
        "M inconsistent with crow_ptr": dict(M=200),
        "x of another dtype": dict(x=x.double()),
        "non-contiguous x": dict(x=torch.randn(48, 3).t()),
        "1-D x": dict(x=x[0]),
        "non-contiguous values": dict(values=v.transpose(1, 2)),
        "int values": dict(values=v.int(), x=x.int()),
        "bias of the wrong size": dict(bias=torch.randn(63)),
        "bias of another dtype": dict(bias=torch.randn(64, dtype=torch.float64)),
        "2-D crow_ptr": dict(crow_ptr=lay.crow_ptr[None]),
    }


def test_forward_rejects_bad_layouts_and_inputs():
    lay, v, x, _ = _setup()
    good, cases = _forward_cases(lay, v, x)
    C_OPS.bsr_forward(**good)
    for what, change in cases.items():
        with pytest.raises(RuntimeError):
            C_OPS.bsr_forward(**{**good, **change})
            pytest.fail(f"no error for {what}")


def test_grad_input_rejects_bad_layouts():
    lay, v, _, dy = _setup()
    good = dict(dy=dy, values=v, ccol_ptr=lay.ccol_ptr, t_row_idx=lay.t_row_idx, t_perm=lay.t_perm, N=48)
    bad_row, bad_perm, bad_ptr = lay.t_row_idx.clone(), lay.t_perm.clone(), lay.ccol_ptr.clone()
    bad_row[0] = 4  # 64 / 16 = 4 block rows
    bad_perm[-1] = lay.nnzb
    bad_ptr[1] = lay.nnzb + 5
    cases = {
        "int64 t_perm": dict(t_perm=lay.t_perm.long()),
        "row out of range": dict(t_row_idx=bad_row),
        "perm out of range": dict(t_perm=bad_perm),
        "ccol_ptr past nnzb": dict(ccol_ptr=bad_ptr),
        "N inconsistent with ccol_ptr": dict(N=100),
        "dy of another dtype": dict(dy=dy.double()),
        "t_row_idx too short": dict(t_row_idx=lay.t_row_idx[:-1]),
    }
    C_OPS.bsr_grad_input(**good)
    for what, change in cases.items():
        with pytest.raises(RuntimeError):
            C_OPS.bsr_grad_input(**{**good, **change})
            pytest.fail(f"no error for {what}")


def test_grad_weight_rejects_bad_layouts():
    lay, _, x, dy = _setup()
    good = dict(dy=dy, x=x, row_idx=lay.row_idx, col_idx=lay.col_idx, mask_ids=lay.mask_ids,
                mask_patterns=lay.mask_patterns, BR=16, BC=16)
    bad_row, bad_ids = lay.row_idx.clone(), lay.mask_ids.clone()
    bad_row[-1] = 4
    bad_ids[0] = lay.mask_patterns.shape[0]
    cases = {
        "int64 row_idx": dict(row_idx=lay.row_idx.long()),
        "row out of range": dict(row_idx=bad_row),
        "mask id out of range": dict(mask_ids=bad_ids),
        "mask_ids without patterns": dict(mask_patterns=None),
        "float mask patterns": dict(mask_patterns=lay.mask_patterns.float()),
        "patterns of another block shape": dict(mask_patterns=lay.mask_patterns[:, :8]),
        "batch mismatch": dict(x=x[:2]),
        "x of another dtype": dict(x=x.double()),
        "col_idx shorter than row_idx": dict(col_idx=lay.col_idx[:-1]),
        "zero block side": dict(BR=0),
    }
    C_OPS.bsr_grad_weight(**good)
    for what, change in cases.items():
        with pytest.raises(RuntimeError):
            C_OPS.bsr_grad_weight(**{**good, **change})
            pytest.fail(f"no error for {what}")


def test_nan_propagates_but_not_into_masked_entries():
    lay = random_layout(64, 48, 16, 16, density=1.0, mask=True, empties=False)
    v = random_values(lay, torch.float32)
    x, dy = torch.randn(2, 48), torch.randn(2, 64)
    x[0, 5] = float("nan")
    y, _, dw = run_all(cpu_kernels(), lay, x, dy, v, None)
    assert torch.isnan(y[0]).any() and torch.isfinite(y[1]).all()
    col0, mask = dw[lay.col_idx == 0][:, :, 5], lay.block_mask()[lay.col_idx == 0][:, :, 5]
    assert torch.isnan(col0[mask]).all() and (col0[~mask] == 0).all()


def test_recycled_large_buffers_are_fully_rewritten():
    """Outputs of 4 MiB and more come from a pool of buffers recycled between calls: a call whose
    results are all NaN, freed, then a call on finite inputs must leave no stale NaN behind."""
    lay = random_layout(4096, 512, 64, 64, density=0.8, mask=True)  # grad_weight: >= 1 Mi floats
    v = random_values(lay, torch.float32)
    B = 300  # forward / grad_input outputs: 300 x 4096 and 300 x 512 floats
    nan_x, nan_dy = torch.full((B, 512), float("nan")), torch.full((B, 4096), float("nan"))
    bias = torch.randn(4096)
    stale = run_all(cpu_kernels(), lay, nan_x, nan_dy, v, bias)
    assert torch.isnan(stale[0]).any() and torch.isnan(stale[2][lay.block_mask()]).all()  # (empty rows: bias)
    del stale
    x, dy = torch.randn(B, 512), torch.randn(B, 4096)
    got = run_all(cpu_kernels(), lay, x, dy, v, bias)
    want = run_all(R, lay, x, dy, v, bias)
    for g, w, what in zip(got, want, ("forward", "grad_input", "grad_weight")):
        assert torch.isfinite(g).all(), f"{what}: stale entries from a recycled buffer"
        assert_close_rel(g, w, REL[torch.float32], what)


def test_bad_pool_size_variable_is_a_clear_error():
    import os
    import subprocess
    import sys

    code = ("import torch\nfrom efcn_sparse import backends\n"
            "try:\n"
            "    backends.kernels('cpu').grad_weight(torch.randn(2, 2048), torch.randn(2, 4096), "
            "torch.zeros(256, dtype=torch.int32), torch.arange(256, dtype=torch.int32) % 32, None, None, 64, 64)\n"
            "except RuntimeError as e:\n"
            "    print(str(e).splitlines()[0])\n")
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, EFCN_CPU_POOL_MIB="lots"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "EFCN_CPU_POOL_MIB: expected a number of MiB >= 0, got 'lots'", r.stdout
