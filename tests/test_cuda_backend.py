"""The ``cuda`` backend (csrc/cuda): registration, and a clear refusal where it cannot run; the
kernels' logic on the CPU emulator (csrc/cuda/emulate.h); parity with the reference on a GPU.

The emulator runs the unchanged kernel source on the CPU (mma.sync, ldmatrix and cp.async
emulated from the PTX ISA, bounds-checked memory, poisoned shared memory and outputs), so index
arithmetic, edge blocks, pipelining and fragment layouts are checked on machines without a GPU.
It is built on first use with torch.utils.cpp_extension (about a minute, cached afterwards);
``EFCN_SKIP_CUDA_EMULATION=1`` skips it. Timing, and anything the emulator does not model, is
left to the GPU tests here and to benchmarks/gpu_check.sh.
"""

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

import efcn_sparse
from conftest import assert_close_rel, path_missing, require_or_skip
from efcn_sparse import BSRLayout, _extension, backends, ops
from efcn_sparse.kernels import reference as ref

ROOT = Path(__file__).resolve().parent.parent
GPU = torch.cuda.is_available()
REL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 1e-2, torch.bfloat16: 2e-2}
OPS = ("bsr_forward", "bsr_grad_input", "bsr_grad_weight")


def random_case(block_shape, M, N, batch, dtype, masked=True, device="cpu", seed=0):
    """A random layout with an empty block row and column, partial edge blocks (M, N not
    multiples of the block), a random element mask (when masked); values zero where masked."""
    g = torch.Generator().manual_seed(seed)
    BR, BC = block_shape
    nbr, nbc = -(-M // BR), -(-N // BC)
    keep = torch.rand(nbr, nbc, generator=g) < 0.6
    if nbr > 2:
        keep[1, :] = False
    if nbc > 3:
        keep[:, 2] = False
    keep[-1, -1] = keep[0, 0] = True
    if masked:
        dense = keep.repeat_interleave(BR, 0).repeat_interleave(BC, 1)[:M, :N] & (torch.rand(M, N, generator=g) < 0.7)
        lay = BSRLayout.from_dense_mask(dense, block_shape)
    else:
        r, c = torch.nonzero(keep, as_tuple=True)
        lay = BSRLayout.from_block_coords((M, N), block_shape, r, c)
    lay = lay.validate().to(device)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)  # noqa: E731
    values = lay.apply_mask(rnd(lay.nnzb, BR, BC))
    return lay, values, rnd(batch, N), rnd(batch, M), rnd(M)


def check_three(fwd, gin, gw, lay, values, x, dy, bias, what=""):
    """The three kernels against the reference backend (computed on the CPU)."""
    M, N = lay.shape
    BR, BC = lay.block_shape
    rel = REL[values.dtype]
    c = lambda t: None if t is None else t.cpu()  # noqa: E731
    lc = lay.to("cpu")
    y = fwd(x, values, bias, lay.crow_ptr, lay.col_idx, lay.row_idx, M)
    assert_close_rel(y.cpu(), ref.forward(c(x), c(values), c(bias), lc.crow_ptr, lc.col_idx, lc.row_idx, M), rel,
                     f"forward {what}")
    y = fwd(x, values, None, lay.crow_ptr, lay.col_idx, lay.row_idx, M)
    assert_close_rel(y.cpu(), ref.forward(c(x), c(values), None, lc.crow_ptr, lc.col_idx, lc.row_idx, M), rel,
                     f"forward without bias {what}")
    dx = gin(dy, values, lay.ccol_ptr, lay.t_row_idx, lay.t_perm, N)
    assert_close_rel(dx.cpu(), ref.grad_input(c(dy), c(values), lc.ccol_ptr, lc.t_row_idx, lc.t_perm, N), rel,
                     f"grad_input {what}")
    dw = gw(dy, x, lay.row_idx, lay.col_idx, lay.mask_ids, lay.mask_patterns, BR, BC)
    expect = ref.grad_weight(c(dy), c(x), lc.row_idx, lc.col_idx, lc.mask_ids, lc.mask_patterns, BR, BC)
    assert_close_rel(dw.cpu(), expect, rel, f"grad_weight {what}")
    if lay.has_mask:  # masked entries exactly zero
        assert (dw.cpu()[~lc.block_mask()] == 0).all(), f"grad_weight {what}: masked entries not zero"


# Block shapes the package picks (conv_geometry.choose_block_side), and generic ones.
CASES = [  # (block, M, N, batch)
    ((16, 16), 40, 56, 7),
    ((32, 32), 96, 70, 33),
    ((64, 48), 130, 100, 1),
    ((64, 64), 128, 192, 130),
    ((48, 80), 100, 170, 17),
    ((96, 16), 200, 40, 20),
    ((112, 128), 120, 260, 3),
    ((3, 5), 10, 13, 9),
    ((17, 33), 40, 70, 70),
]


# --------------------------------------------------------------------------- without a GPU
def test_extension_imports_with_its_ops():
    if os.environ.get("EFCN_NO_EXT") == "1":
        pytest.skip("EFCN_NO_EXT=1")
    assert _extension.load(), _extension.error()
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"efcn_sparse_C::{op}", "CPU")


def _cuda_compiled_in() -> bool:
    """Whether efcn_sparse._C holds the CUDA launchers (it was built with the CUDA sources)."""
    if not _extension.load():
        return False
    from efcn_sparse import _C

    return b"launch_grad_weight" in Path(_C.__file__).read_bytes()


def test_cuda_kernels_are_registered_when_compiled_in():
    nvcc = shutil.which("nvcc", path=os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin"))
    if os.environ.get("CI") and torch.version.cuda and nvcc and os.environ.get("EFCN_NO_CUDA") != "1" \
            and os.environ.get("EFCN_NO_EXT") != "1":
        assert _cuda_compiled_in(), "CI: a CUDA torch and toolkit are present, yet the extension lacks its CUDA kernels"
    if not _cuda_compiled_in():
        pytest.skip("extension built without CUDA (CPU-only torch, no CUDA toolkit, or EFCN_NO_CUDA=1)")
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"efcn_sparse_C::{op}", "CUDA"), op
    assert _extension.has_cuda_kernels()


def test_cuda_backend_refuses_cpu_tensors_with_the_reason():
    with pytest.raises(backends.BackendUnavailable, match=r"backend 'cuda' cannot run on cpu: it runs CUDA tensors"):
        backends.resolve("cuda", "cpu")
    lay, values, x, _, _ = random_case((8, 8), 20, 24, 2, torch.float32)
    with pytest.raises(backends.BackendUnavailable, match="'cuda' cannot run on cpu"):
        ops.linear(x, lay, values, backend="cuda")
    assert "cuda" not in efcn_sparse.available_backends("cpu")


@pytest.mark.skipif(GPU, reason="a GPU is present")
def test_cuda_backend_without_a_gpu_says_so():
    with pytest.raises(backends.BackendUnavailable, match="no usable CUDA GPU"):
        backends.resolve("cuda", "cuda")
    assert backends.resolve("auto", "cuda", op="forward", dtype=torch.bfloat16, batch=8, block_shape=(64, 64)) != "cuda"


def test_auto_rule_on_cpu():
    choice = backends.resolve("auto", "cpu", op="grad_weight", dtype=torch.float16, batch=7, block_shape=(16, 16))
    assert choice == ("cpu" if backends.unavailable_reason("cpu", "cpu") is None else "reference")
    assert backends.resolve("auto", "cpu") == choice  # shape arguments are optional


@pytest.fixture
def table_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("EFCN_CACHE_DIR", str(tmp_path))
    backends._tables.clear()
    backends._auto_cache.clear()
    yield tmp_path
    backends._tables.clear()
    backends._auto_cache.clear()


def test_auto_follows_a_measured_table(table_dir, monkeypatch):
    if backends.unavailable_reason("cpu", "cpu") is not None:
        require_or_skip("cpu-ext", "needs the cpu backend beside the reference")
    shape = dict(dtype=torch.float32, batch=5, block_shape=(8, 8))
    backends.record_measured_choice("cpu", "forward", backend="reference", **shape)
    assert Path(backends.measured_table_path("cpu")).parent == table_dir
    assert backends.resolve("auto", "cpu", op="forward", **shape) == "reference"
    assert backends.resolve("auto", "cpu", op="grad_input", **shape) == "cpu"  # not measured: the rule
    assert backends.resolve("auto", "cpu", op="forward", dtype=torch.float32, batch=100, block_shape=(8, 8)) == "cpu"
    backends._tables.clear()  # a new process reads the file
    backends._auto_cache.clear()
    assert backends.resolve("auto", "cpu", op="forward", **shape) == "reference"
    monkeypatch.setenv("EFCN_AUTO_TABLE", "0")
    backends._auto_cache.clear()
    assert backends.resolve("auto", "cpu", op="forward", **shape) == "cpu"


def test_tune_records_the_fastest_per_op_and_auto_then_runs_it(table_dir, monkeypatch):
    """With planted timings (a different backend fastest per op), tune must record exactly the
    fastest in the table file, and ops with backend="auto" must then call those kernels."""
    if backends.unavailable_reason("cpu", "cpu") is not None:
        require_or_skip("cpu-ext", "needs the cpu backend beside the reference")
    import json
    from types import SimpleNamespace

    fastest = {"forward": "reference", "grad_input": "cpu", "grad_weight": "reference"}
    calls = []
    real = backends.kernels

    def spy(name):  # the kernel module of `name`, recording which (backend, op) runs
        k = real(name)
        return SimpleNamespace(**{op: (lambda *a, _op=op, _k=k: calls.append((name, _op)) or getattr(_k, _op)(*a))
                                  for op in fastest})

    monkeypatch.setattr(backends, "kernels", spy)
    monkeypatch.setattr(backends, "_median_time",
                        lambda fn, device, repeats: (fn(), 1.0 if calls[-1][0] == fastest[calls[-1][1]] else 2.0)[1])
    lay, values, x, dy, _ = random_case((8, 8), 24, 32, 3, torch.float32)
    best = backends.tune(lay, batch=3, dtype=torch.float32, device="cpu", repeats=1)
    assert best == fastest
    with open(backends.measured_table_path("cpu")) as f:
        assert json.load(f)["choices"] == {f"{op}/float32/b1-16/8x8": b for op, b in fastest.items()}
    calls.clear()
    leaves = [t.clone().requires_grad_(True) for t in (x, values)]
    ops.linear(leaves[0], lay, leaves[1], backend="auto").backward(dy)
    assert sorted(calls, key=lambda c: c[1]) == sorted(((b, op) for op, b in fastest.items()), key=lambda c: c[1])


# --------------------------------------------------------------------------- CPU emulator
@pytest.fixture(scope="module")
def emu():
    """torch.ops.efcn_sparse_emu: the CUDA kernels built for the CPU emulator."""
    missing = path_missing("cuda-emulator")
    if missing:
        require_or_skip("cuda-emulator", missing)
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    venv_bin = os.path.dirname(sys.executable)
    if shutil.which("ninja") is None:  # pytest run as .venv/bin/python without the venv on PATH
        os.environ["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")
    from torch.utils.cpp_extension import load

    load(name="efcn_sparse_cuda_emu", sources=[str(ROOT / "csrc" / "cuda" / "emulate" / "bsr_emulate.cpp")],
         extra_include_paths=[str(Path(cuda_home) / "include")], extra_cflags=["-O1", "-Wno-unknown-pragmas"],
         is_python_module=False)
    return torch.ops.efcn_sparse_emu


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0][0]}x{c[0][1]}-B{c[3]}")
def test_emulated_kernels_match_reference(emu, case, dtype):
    block, M, N, B = case
    for masked in (True, False):
        lay, values, x, dy, bias = random_case(block, M, N, B, dtype, masked=masked)
        check_three(emu.bsr_forward, emu.bsr_grad_input, emu.bsr_grad_weight, lay, values, x, dy, bias,
                    f"{block} B={B} {dtype} masked={masked}")


@pytest.mark.parametrize("B", [1, 16, 17, 64, 65, 256])
def test_emulated_batch_tiles(emu, B):
    """Every batch-tile configuration and its boundaries, on the reference layer's block shape."""
    lay, values, x, dy, bias = random_case((64, 64), 192, 192, B, torch.bfloat16)
    check_three(emu.bsr_forward, emu.bsr_grad_input, emu.bsr_grad_weight, lay, values, x, dy, bias, f"B={B}")


def test_emulated_unaligned_operands_take_the_element_path(emu):
    """Operands whose data pointers are not 16-byte aligned must not use 16-byte accesses."""
    lay, values, x, dy, bias = random_case((32, 32), 64, 96, 9, torch.float16)

    def shifted(t):  # the same contents one element past a 16-byte boundary
        buf = torch.empty(t.numel() + 1, dtype=t.dtype)
        out = buf[1:].view(t.shape)
        out.copy_(t)
        return out

    check_three(emu.bsr_forward, emu.bsr_grad_input, emu.bsr_grad_weight, lay, shifted(values), shifted(x),
                shifted(dy), shifted(bias), "unaligned")


def test_emulated_nan_propagates_and_masked_gradients_stay_zero(emu):
    lay, values, x, dy, bias = random_case((16, 16), 32, 48, 4, torch.float16)
    x[1, 3] = float("nan")
    y = emu.bsr_forward(x, values, bias, lay.crow_ptr, lay.col_idx, lay.row_idx, 32)
    expect = ref.forward(x, values, bias, lay.crow_ptr, lay.col_idx, lay.row_idx, 32)
    assert torch.isnan(y).any() and torch.equal(torch.isnan(y), torch.isnan(expect))
    dw = emu.bsr_grad_weight(dy, x, lay.row_idx, lay.col_idx, lay.mask_ids, lay.mask_patterns, 16, 16)
    expect = ref.grad_weight(dy, x, lay.row_idx, lay.col_idx, lay.mask_ids, lay.mask_patterns, 16, 16)
    assert torch.isnan(dw).any() and torch.equal(torch.isnan(dw), torch.isnan(expect))
    assert (dw[~lay.block_mask()] == 0).all()


def test_emulated_kernels_assert_on_corrupt_indices(emu):
    lay, values, x, _, _ = random_case((16, 16), 32, 48, 4, torch.float32)
    bad = lay.col_idx.clone()
    bad[0] = 99
    with pytest.raises(RuntimeError, match="kernel assertion failed"):
        emu.bsr_forward(x, values, None, lay.crow_ptr, bad, lay.row_idx, 32)


def test_emulated_glue_checks_preconditions(emu):
    lay, values, x, dy, _ = random_case((16, 16), 32, 48, 4, torch.float32)
    M, N = lay.shape
    with pytest.raises(RuntimeError, match="x has dtype"):
        emu.bsr_forward(x.double(), values, None, lay.crow_ptr, lay.col_idx, lay.row_idx, M)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        emu.bsr_forward(x.t().contiguous().t(), values, None, lay.crow_ptr, lay.col_idx, lay.row_idx, M)
    with pytest.raises(RuntimeError, match="crow_ptr must be int32"):
        emu.bsr_forward(x, values, None, lay.crow_ptr.long(), lay.col_idx, lay.row_idx, M)
    with pytest.raises(RuntimeError, match="crow_ptr has 3 entries, expected 5"):
        emu.bsr_forward(x, values, None, lay.crow_ptr, lay.col_idx, lay.row_idx, 50)
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        emu.bsr_grad_input(dy.int(), values.int(), lay.ccol_ptr, lay.t_row_idx, lay.t_perm, N)
    with pytest.raises(RuntimeError, match="mask_ids and mask_patterns must be given together"):
        emu.bsr_grad_weight(dy, x, lay.row_idx, lay.col_idx, lay.mask_ids, None, 16, 16)
    assert emu.bsr_forward(x[:0], values, None, lay.crow_ptr, lay.col_idx, lay.row_idx, M).shape == (0, M)
    assert (emu.bsr_grad_weight(dy[:0], x[:0], lay.row_idx, lay.col_idx, None, None, 16, 16) == 0).all()


# --------------------------------------------------------------------------- on a GPU
gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")


def _cuda_kernels():
    reason = backends.unavailable_reason("cuda", "cuda")
    if reason is not None:
        pytest.fail(f"a GPU is present but the cuda backend is not: {reason}")
    return backends.kernels("cuda")


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B", [1, 7, 33, 256])
@pytest.mark.parametrize("block", [(16, 16), (64, 48), (64, 64), (3, 5)], ids=str)
def test_gpu_parity_with_reference(block, B, dtype):
    k = _cuda_kernels()
    for masked in (True, False):
        lay, values, x, dy, bias = random_case(block, 5 * block[0] + 3, 6 * block[1] + 1, B, dtype, masked, "cuda")
        check_three(k.forward, k.grad_input, k.grad_weight, lay, values, x, dy, bias, f"{block} B={B} masked={masked}")
    torch.cuda.synchronize()


@gpu
def test_gpu_autograd_through_ops_linear():
    _cuda_kernels()
    lay, values, x, dy, bias = random_case((32, 32), 100, 90, 9, torch.float32, device="cuda")
    leaves = [t.clone().requires_grad_(True) for t in (x, values, bias)]
    expect = [t.clone().requires_grad_(True) for t in (x, values, bias)]
    ops.linear(leaves[0], lay, leaves[1], leaves[2], backend="cuda").backward(dy)
    ops.linear(expect[0], lay, expect[1], expect[2], backend="reference").backward(dy)
    for got, want, name in zip(leaves, expect, ("x", "values", "bias")):
        assert_close_rel(got.grad, want.grad, 1e-5, f"grad {name}")
    assert backends.resolve("auto", "cuda", op="forward", dtype=torch.bfloat16, batch=256, block_shape=(64, 64)) in (
        "cuda", "triton")


def _check_grad_weight_acc(acc, gw, lay, x, dy, what):
    """acc(out, ...) adds dW into out (the kernel's epilogue) as out + gw(...) would, masked entries untouched."""
    BR, BC = lay.block_shape
    out = lay.apply_mask(torch.randn(lay.nnzb, BR, BC, dtype=torch.float64).to(dy.device, dy.dtype))
    expected = out.cpu() + gw(dy, x, lay.row_idx, lay.col_idx, lay.mask_ids, lay.mask_patterns, BR, BC).cpu()
    acc(out, dy, x, lay.row_idx, lay.col_idx, lay.mask_ids, lay.mask_patterns)
    assert torch.equal(out.cpu(), expected), f"grad_weight_acc {what}"
    assert (out.cpu()[~lay.to("cpu").block_mask()] == 0).all(), f"grad_weight_acc {what}: masked entries changed"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("block", [(16, 16), (64, 48), (24, 20)], ids=str)
def test_emulated_grad_weight_accumulates_in_its_epilogue(emu, block, dtype):
    lay, _, x, dy, _ = random_case(block, 3 * block[0] + 5, 4 * block[1] + 3, 9, dtype)
    _check_grad_weight_acc(emu.bsr_grad_weight_acc, emu.bsr_grad_weight, lay, x, dy, f"{block} {dtype}")
    with pytest.raises(RuntimeError, match="out must be a contiguous"):
        emu.bsr_grad_weight_acc(torch.zeros(lay.nnzb + 1, *block, dtype=dtype), dy, x, lay.row_idx, lay.col_idx,
                                lay.mask_ids, lay.mask_patterns)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_grad_weight_accumulates_in_its_epilogue(dtype):
    k = _cuda_kernels()
    lay, _, x, dy, _ = random_case((64, 48), 5 * 64 + 3, 6 * 48 + 1, 33, dtype, device="cuda")
    _check_grad_weight_acc(k.grad_weight_acc, k.grad_weight, lay, x, dy, str(dtype))
