"""bfloat16 on the ``cpu`` backend, two ways: the float32 kernels on operands widened as they are
packed (bit for bit the float32 ops on widened copies, rounded once), or, where the CPU has
AVX512_BF16 and the active ISA is AVX-512, dot products of bf16 pairs into float32 accumulators
(``EFCN_CPU_BF16_DOT=1``; the default on AMD only). Both must match the reference (float32 sums,
one rounding) within bf16 accuracy; float32 master values (autocast) give the bits of their
bfloat16 copy either way."""

import pytest
import torch

from conftest import assert_close_rel
from efcn_sparse import backends
from efcn_sparse.kernels import cpu
from efcn_sparse.kernels import reference as R
from test_cpu_backend import REL, random_layout, random_values, run_all

_REASON = backends.unavailable_reason("cpu", "cpu")
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"cpu backend unavailable: {_REASON}")

# (M, N, BR, BC, layout options): even N and BC take the dot-product path; the last two do not
SHAPES = [
    (130, 200, 48, 40, dict(mask=True)),
    (300, 260, 64, 64, dict(density=0.6, full_row=True)),
    (97, 130, 8, 24, dict(mask=True)),  # 8-row blocks: the grouped (narrow) forward
    (70, 300, 3, 64, dict(mask=True)),
    (45, 1100, 16, 16, dict(full_row=True)),
    (200, 150, 12, 8, dict(mask=True)),
    (61, 130, 64, 2, dict(full_col=True)),
    (90, 75, 16, 16, dict(mask=True)),  # odd N
    (90, 96, 16, 3, dict(mask=True)),  # odd block width
]


def _inputs(shape, B, seed=0):
    torch.manual_seed(seed)
    M, N, BR, BC, opts = shape
    lay = random_layout(M, N, BR, BC, **opts)
    bf = torch.bfloat16
    return (lay, torch.randn(B, N).to(bf), torch.randn(B, M).to(bf), random_values(lay, bf), torch.randn(M).to(bf))


@pytest.fixture
def dot_off(monkeypatch):
    monkeypatch.setenv("EFCN_CPU_BF16_DOT", "0")


def _needs_dot():
    if not cpu.bf16_dot():
        pytest.skip("this CPU or build has no AVX512_BF16 path (or the active ISA is below AVX-512)")


@pytest.fixture(params=["float32", "dot"])
def path(request, monkeypatch):
    """Each way of computing bfloat16: float32 kernels, or dot products (where the CPU has them)."""
    monkeypatch.setenv("EFCN_CPU_BF16_DOT", "1" if request.param == "dot" else "0")
    if request.param == "dot":
        _needs_dot()
    return request.param


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}_b{s[2]}x{s[3]}")
@pytest.mark.parametrize("B", [1, 2, 13, 29])
def test_bf16_ops_match_reference(shape, B, path):
    lay, x, dy, v, bias = _inputs(shape, B)
    got = run_all(backends.kernels("cpu"), lay, x, dy, v, bias)
    want = run_all(R, lay, x, dy, v, bias)
    for g, w, what in zip(got, want, ("forward", "grad_input", "grad_weight")):
        assert g.dtype == torch.bfloat16, what
        assert torch.isfinite(g.float()).all(), f"{what}: unwritten (poisoned) entries"
        assert_close_rel(g.float(), w.float(), REL[torch.bfloat16], f"bf16 {what} {shape} B={B}")
    if lay.has_mask:
        assert (got[2][~lay.block_mask()] == 0).all(), "masked grad_weight entries must be exactly 0"


def test_dot_products_run_when_turned_on(monkeypatch):
    """With EFCN_CPU_BF16_DOT=1 on a CPU with AVX512_BF16 all three ops take the dot-product path,
    and it is not the float32 computation under another name: over 576 (64) terms the roundings
    differ somewhere."""
    monkeypatch.setenv("EFCN_CPU_BF16_DOT", "1")
    _needs_dot()
    lay, x, dy, v, bias = _inputs((640, 576, 64, 64, dict(density=1.0)), 64, seed=3)
    ops = backends.kernels("cpu")
    dot = run_all(ops, lay, x, dy, v, bias)
    monkeypatch.setenv("EFCN_CPU_BF16_DOT", "0")
    assert cpu.bf16_dot() is False
    f32 = run_all(ops, lay, x, dy, v, bias)
    for d, f, what in zip(dot, f32, ("forward", "grad_input", "grad_weight")):
        assert not torch.equal(d, f), f"{what}: the dot-product path did not run"
    want = run_all(R, lay, x, dy, v, bias)
    for d, f, w in zip(dot, f32, want):
        assert_close_rel(d.float(), w.float(), REL[torch.bfloat16], "dot path")
        assert_close_rel(f.float(), w.float(), REL[torch.bfloat16], "float32 path")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}_b{s[2]}x{s[3]}")
@pytest.mark.parametrize("B", [1, 13, 29])
def test_turned_off_it_computes_in_float32_exactly(dot_off, shape, B):
    """EFCN_CPU_BF16_DOT=0: bf16 ops are the float32 ops on the widened operands, rounded once
    (widened as packed where the shape allows, on float32 copies elsewhere), bias and dW too."""
    lay, x, dy, v, bias = _inputs(shape, B)
    ops = backends.kernels("cpu")
    got = run_all(ops, lay, x, dy, v, bias)
    f32 = run_all(ops, lay, x.float(), dy.float(), v.float(), bias.float())
    for g, f in zip(got, f32):
        assert torch.equal(g, f.to(torch.bfloat16))
    BR, BC = lay.block_shape
    dw, db = cpu.grad_weight_bias(dy, x, lay.row_idx, lay.col_idx, lay.mask_ids, lay.mask_patterns, BR, BC)
    dwf, dbf = cpu.grad_weight_bias(dy.float(), x.float(), lay.row_idx, lay.col_idx, lay.mask_ids,
                                    lay.mask_patterns, BR, BC)
    assert torch.equal(dw, dwf.to(torch.bfloat16)) and torch.equal(db, dbf.to(torch.bfloat16))


def test_float32_path_gives_the_same_bits_on_every_isa(dot_off):
    """The float32 path of bfloat16 (rounding in vector registers on AVX-512, one entry at a time
    elsewhere) is the same computation on every ISA: the SIMD ISAs agree bit for bit."""
    simd = [name for name in cpu.supported_isas() if name != "generic"]
    if len(simd) < 2:
        pytest.skip(f"fewer than two SIMD ISAs here: {simd}")
    lay, x, dy, v, bias = _inputs(SHAPES[1], 29)
    ops = backends.kernels("cpu")
    before = cpu.isa()
    try:
        results = {}
        for name in simd:
            cpu.isa(name)
            results[name] = run_all(ops, lay, x, dy, v, bias)
    finally:
        cpu.isa(before)
    first = next(iter(results.values()))
    for name, got in results.items():
        for g, f in zip(got, first):
            assert torch.equal(g, f), name


def _cpu_is_amd():
    try:
        with open("/proc/cpuinfo") as f:
            return "AuthenticAMD" in f.read(4096)
    except OSError:
        return None


def test_dot_products_are_the_default_only_on_amd(monkeypatch):
    amd = _cpu_is_amd()
    if amd is None:
        pytest.skip("no /proc/cpuinfo to read the CPU vendor from")
    monkeypatch.setenv("EFCN_CPU_BF16_DOT", "1")
    has = cpu.bf16_dot()
    monkeypatch.delenv("EFCN_CPU_BF16_DOT")
    assert cpu.bf16_dot() == (has and amd)


def test_other_isas_do_not_use_dot_products():
    before = cpu.isa()
    try:
        for name in cpu.supported_isas():
            cpu.isa(name)
            if name != "avx512":
                assert cpu.bf16_dot() is False, name
    finally:
        cpu.isa(before)


def test_environment_switch_is_read_at_each_call(monkeypatch):
    monkeypatch.setenv("EFCN_CPU_BF16_DOT", "1")
    _needs_dot()
    monkeypatch.setenv("EFCN_CPU_BF16_DOT", "0")
    assert cpu.bf16_dot() is False
    monkeypatch.setenv("EFCN_CPU_BF16_DOT", "1")
    assert cpu.bf16_dot() is True


# ------------------------------------------------------------------ float32 values (autocast)
def _ties_and_subnormals(v):
    """v with some entries replaced by float32 numbers that test rounding to bfloat16: exact ties
    (low 16 bits 0x8000) on even and odd bfloat16 mantissas, near-ties, subnormals, +-0."""
    bits = v.view(torch.int32).clone()
    flat = bits.view(-1)
    n = flat.numel()
    idx = torch.randperm(n)[: n // 4]
    specials = torch.tensor([0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0xBF818000, 0x00008000, 0x00018000,
                             0x00007FFF, 0x80000000, 0x00000000], dtype=torch.int64)
    flat[idx] = specials[torch.arange(idx.numel()) % specials.numel()].to(torch.int32)
    return bits.view(torch.float32)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}_b{s[2]}x{s[3]}")
@pytest.mark.parametrize("B", [1, 2, 29])
def test_float32_values_compute_as_their_bfloat16_copy(shape, B, path):
    """float32 values with bfloat16 x/dy (autocast's master weights, handed over uncast): the same
    bits as with values.to(bfloat16), ties-to-even and subnormals included, whether the kernel
    rounds them while packing or (shapes it does not cover) copies; dW widened to float32 is the
    bfloat16 dW exactly."""
    lay, x, dy, _, bias = _inputs(shape, B)
    v32 = lay.apply_mask(_ties_and_subnormals(torch.randn(lay.nnzb, *lay.block_shape)))
    v16 = v32.to(torch.bfloat16)
    assert not torch.equal(v16.float(), v32)  # the rounding matters
    C = torch.ops.efcn_sparse_C
    M, N = lay.shape
    BR, BC = lay.block_shape
    got = run_all(backends.kernels("cpu"), lay, x, dy, v32, bias)[:2]
    want = run_all(backends.kernels("cpu"), lay, x, dy, v16, bias)
    for g, w, what in zip(got, want, ("forward", "grad_input")):
        assert g.dtype == torch.bfloat16 and torch.equal(g, w), what
    for dw in (C.bsr_grad_weight_as(dy, x, lay.row_idx, lay.col_idx, lay.mask_ids, lay.mask_patterns, BR, BC,
                                    torch.float32),
               C.bsr_grad_weight_bias(dy, x, lay.row_idx, lay.col_idx, lay.mask_ids, lay.mask_patterns, BR, BC,
                                      torch.float32)[0]):
        assert dw.dtype == torch.float32 and torch.equal(dw, want[2].float())


def test_float32_values_with_float16_operands_compute_as_their_float16_copy():
    lay, x, dy, _, _ = _inputs(SHAPES[0], 13)
    v32 = random_values(lay, torch.float32)
    h = torch.float16
    got = run_all(backends.kernels("cpu"), lay, x.to(h), dy.to(h), v32, None)
    want = run_all(backends.kernels("cpu"), lay, x.to(h), dy.to(h), v32.to(h), None)
    for g, w in zip(got[:2], want[:2]):
        assert g.dtype == h and torch.equal(g, w)
    BR, BC = lay.block_shape
    dw = torch.ops.efcn_sparse_C.bsr_grad_weight_as(dy.to(h), x.to(h), lay.row_idx, lay.col_idx, lay.mask_ids,
                                                     lay.mask_patterns, BR, BC, torch.float32)
    assert dw.dtype == torch.float32 and torch.equal(dw, want[2].float())


def test_mixed_dtypes_other_than_float32_values_are_refused():
    lay, x, dy, v16, bias = _inputs(SHAPES[0], 3)
    M, N = lay.shape
    BR, BC = lay.block_shape
    C = torch.ops.efcn_sparse_C
    with pytest.raises(RuntimeError, match="x: dtype Float does not match BFloat16"):
        C.bsr_forward(x.float(), v16, bias, lay.crow_ptr, lay.col_idx, lay.row_idx, M)  # float32 x, bf16 values
    with pytest.raises(RuntimeError, match="x: dtype BFloat16 does not match Double"):
        C.bsr_forward(x, v16.double(), None, lay.crow_ptr, lay.col_idx, lay.row_idx, M)
    with pytest.raises(RuntimeError, match="bias: dtype Float does not match BFloat16"):
        C.bsr_forward(x, v16.float(), bias.float(), lay.crow_ptr, lay.col_idx, lay.row_idx, M)
    with pytest.raises(RuntimeError, match="dw_dtype: expected BFloat16 .* got Double"):
        C.bsr_grad_weight_as(dy, x, lay.row_idx, lay.col_idx, lay.mask_ids, lay.mask_patterns, BR, BC, torch.float64)
    with pytest.raises(RuntimeError, match="dw_dtype: expected Float .* got BFloat16"):
        C.bsr_grad_weight_as(dy.float(), x.float(), lay.row_idx, lay.col_idx, lay.mask_ids, lay.mask_patterns, BR, BC,
                             torch.bfloat16)
