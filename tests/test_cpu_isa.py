"""The ``cpu`` backend's micro-kernels on every instruction set this machine supports (AVX-512,
AVX2, portable C++), each forced in turn: parity with the reference backend, bit-identical results
across runs and thread counts, the two SIMD tile paths equal bit for bit (both chain fused
multiply-adds in the same order, also where an output slice's K spans several packed panels; the
AVX-512 forward at batch <= 2 is a matrix-vector product), and the selection itself (capped at the
CPU, named errors, EFCN_CPU_ISA)."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import assert_close_rel
from efcn_sparse import backends
from efcn_sparse.kernels import cpu
from efcn_sparse.kernels import reference as R
from test_cpu_backend import REL, random_layout, random_values, run_all

_REASON = backends.unavailable_reason("cpu", "cpu")
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"cpu backend unavailable: {_REASON}")

# block shapes around both tile widths (16/32 floats, 8/16 doubles) and heights (6, 12 rows)
SHAPES = [
    (130, 200, 48, 40, dict(mask=True)),
    (300, 260, 64, 64, dict(density=0.6)),
    (97, 131, 8, 24, dict(mask=True)),
    (45, 1100, 16, 16, dict(full_row=True)),
    (1100, 37, 12, 36, dict(full_col=True, mask=True)),
    # narrow blocks (few-channel layers stored tight): grouped lines, gathered grad_weight panels
    (130, 61, 64, 3, dict(mask=True)),
    (97, 150, 64, 1, dict(full_col=True)),
    (70, 300, 3, 64, dict(mask=True)),
    (1100, 37, 1, 2, dict(full_col=True, mask=True)),
    (200, 150, 12, 8, dict(mask=True)),  # narrow on 32-wide tiles only (grad_input also on 16-wide ones)
    # the forward's weight panels: 16 x 16 transposes (AVX-512), an 8 x 8 one, 5 columns one at a time
    (200, 300, 32, 45, dict(density=0.7)),
]


@pytest.fixture(params=cpu.ISAS if _REASON is None else [])
def isa(request):
    if request.param not in cpu.supported_isas():
        pytest.skip(f"this CPU or build has no {request.param} path (sanitizer builds have only the portable one)")
    before = cpu.isa()
    assert cpu.isa(request.param) == request.param
    yield request.param
    cpu.isa(before)


def _inputs(shape, B, dtype):
    M, N, BR, BC, opts = shape
    lay = random_layout(M, N, BR, BC, **opts)
    return lay, torch.randn(B, N, dtype=dtype), torch.randn(B, M, dtype=dtype), random_values(lay, dtype), \
        torch.randn(M, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}_b{s[2]}x{s[3]}")
def test_each_isa_matches_reference(isa, shape, dtype):
    for B in (1, 2, 13, 29):  # matrix-vector forward (B <= 2, AVX-512), batch tiles full and partial
        lay, x, dy, v, bias = _inputs(shape, B, dtype)
        got = run_all(backends.kernels("cpu"), lay, x, dy, v, bias)
        want = run_all(R, lay, x, dy, v, bias)
        for g, w, what in zip(got, want, ("forward", "grad_input", "grad_weight")):
            assert_close_rel(g, w, REL[dtype], f"{isa} {what} {shape} B={B}")
            assert torch.isfinite(g).all(), f"{isa} {what}: unwritten (poisoned) entries"
        if lay.has_mask:
            assert (got[2][~lay.block_mask()] == 0).all(), f"{isa}: masked grad_weight entries must be exactly 0"


@pytest.mark.parametrize("dtype,side", [(torch.float32, 70000), (torch.float64, 36000)], ids=["float32", "float64"])
@pytest.mark.parametrize("B", [40, 41])
def test_each_isa_matches_reference_on_operands_larger_than_the_caches(isa, dtype, side, B):
    """Outputs and packed operands of 8 MiB or more go through the non-temporal store paths
    (y, dx, the batch tiles, grad_weight's x and dy panels); an odd batch leaves a last row
    unpaired; sides that are not a multiple of the block leave partial edge blocks."""
    torch.manual_seed(7)
    lay = random_layout(side, side, 64, 64, density=0.003, full_row=True, full_col=True)
    x, dy, v, bias = (torch.randn(B, side, dtype=dtype), torch.randn(B, side, dtype=dtype),
                      random_values(lay, dtype), torch.randn(side, dtype=dtype))
    assert B * side * dtype.itemsize >= 8 << 20
    got = run_all(backends.kernels("cpu"), lay, x, dy, v, bias)
    want = run_all(R, lay, x, dy, v, bias)
    for g, w, what in zip(got, want, ("forward", "grad_input", "grad_weight")):
        assert_close_rel(g, w, REL[dtype], f"{isa} {what} large B={B}")


@pytest.mark.parametrize("B", [1, 37])
@pytest.mark.parametrize("shape", [(1500, 1300, 64, 48, dict(density=0.3, mask=True, full_row=True)),
                                   (2000, 300, 64, 3, dict(full_col=True, mask=True)),  # narrow, K > 256
                                   (300, 2000, 3, 64, dict(full_row=True))],
                         ids=lambda s: f"{s[0]}x{s[1]}_b{s[2]}x{s[3]}")
def test_each_isa_deterministic_across_runs_and_threads(isa, shape, B):
    lay, x, dy, v, bias = _inputs(shape, B, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_all(backends.kernels("cpu"), lay, x, dy, v, bias)
        torch.set_num_threads(max(2, threads))
        two = run_all(backends.kernels("cpu"), lay, x, dy, v, bias)
        again = run_all(backends.kernels("cpu"), lay, x, dy, v, bias)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(one, two, again):
        assert torch.equal(a, b) and torch.equal(b, c), isa


# the last three: output slices whose K spans several packed panels (more than 256 entries), for
# narrow blocks grouped NR / side lines to a tile, so the groups differ between the tile widths
AGREE_SHAPES = [
    (300, 260, 64, 40, dict(density=0.6, mask=True)),
    (200, 300, 32, 45, dict(density=0.7)),
    (130, 61, 64, 3, dict(mask=True)),  # narrow grad_input and grad_weight
    (70, 200, 3, 64, dict(mask=True)),  # narrow forward
    (1500, 1300, 64, 48, dict(density=0.3, mask=True, full_row=True)),
    (2000, 300, 64, 3, dict(full_col=True, mask=True)),
    (300, 2000, 3, 64, dict(full_row=True)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", AGREE_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}_b{s[2]}x{s[3]}")
def test_simd_isas_agree_bit_for_bit(shape, dtype):
    simd = [i for i in ("avx512", "avx2") if i in cpu.supported_isas()]
    if len(simd) < 2:
        pytest.skip("needs both AVX-512 and AVX2")
    lay, x, dy, v, bias = _inputs(shape, 29, dtype)
    before = cpu.isa()
    try:
        outs = []
        for name in simd:
            cpu.isa(name)
            outs.append(run_all(backends.kernels("cpu"), lay, x, dy, v, bias))
    finally:
        cpu.isa(before)
    for a, b, what in zip(*outs, ("forward", "grad_input", "grad_weight")):
        assert torch.equal(a, b), f"{what}: AVX-512 and AVX2 results differ"


def test_selection_is_capped_at_the_cpu_and_names_the_choices():
    supported = cpu.supported_isas()
    assert supported[-1] == "generic" and set(supported) <= set(cpu.ISAS)
    before = cpu.isa()
    try:
        for name in cpu.ISAS:  # a request above what the CPU has gets the best it has
            want = name if name in supported else supported[0]
            assert cpu.isa(name) == want and cpu.isa() == want
        assert cpu.isa("best") == supported[0]
        with pytest.raises(RuntimeError, match="expected one of avx512, avx2, generic, got 'sse4'"):
            cpu.isa("sse4")
    finally:
        cpu.isa(before)


def _run_with_env(value, code):
    env = dict(os.environ, EFCN_CPU_ISA=value)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_environment_variable_selects_the_isa():
    # an op call and a query, each printing its result or its error
    code = ("import torch; from efcn_sparse.kernels import cpu; from efcn_sparse import backends\n"
            "for f in (lambda: backends.kernels('cpu').grad_weight(torch.randn(2, 4), torch.randn(2, 4), "
            "torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32), None, None, 4, 4).shape, cpu.isa):\n"
            "    try:\n"
            "        print('ok:', f())\n"
            "    except RuntimeError as e:\n"
            "        print('error:', e)\n")
    r = _run_with_env("generic", code)
    assert r.returncode == 0 and r.stdout.splitlines() == ["ok: torch.Size([1, 4, 4])", "ok: generic"], r.stderr
    r = _run_with_env("avx1024", code)
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and len(lines) == 2, r.stderr
    for line in lines:
        assert line.startswith("error: CPU ISA: expected one of avx512, avx2, generic, got 'avx1024'"), line
