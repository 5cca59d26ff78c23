"""``cpu`` backend: the C++ kernels of ``csrc/cpu/`` (OpenMP over blocks, dense micro-GEMMs)."""

from __future__ import annotations

from typing import Optional

import torch

from .. import _extension
from . import _native
from ._native import forward, grad_input, grad_weight  # noqa: F401

# float32/float64 natively; bfloat16/float16 are computed in float32 and rounded once at the end
# (bfloat16 with its operands widened as they are packed, or on AVX512_BF16 dot products: bf16_dot())
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def bias_grad(dy):
    """dy summed over the batch, with the same bits as grad_weight_bias's sum."""
    return torch.ops.efcn_sparse_C.bsr_bias_grad(dy)


def grad_weight_bias(dy, x, row_idx, col_idx, mask_ids, mask_patterns, BR: int, BC: int, dw_dtype=None):
    """(grad_weight(...) in dw_dtype as for grad_weight_as, dy summed over the batch): the sum made
    in the pass that packs dy for grad_weight where the kernel has one (AVX-512, block height a
    multiple of 8), else after it; the same bits either way, fixed by the batch alone."""
    return torch.ops.efcn_sparse_C.bsr_grad_weight_bias(dy, x, row_idx, col_idx, mask_ids, mask_patterns, BR, BC,
                                                        dw_dtype)


def grad_weight_as(dy, x, row_idx, col_idx, mask_ids, mask_patterns, BR: int, BC: int, dw_dtype):
    """grad_weight(...) returned in dw_dtype: float32 for a bfloat16/float16 dy is the
    half-precision result widened, written so by the bf16 dot-product kernels (no bf16 temporary)."""
    return torch.ops.efcn_sparse_C.bsr_grad_weight_as(dy, x, row_idx, col_idx, mask_ids, mask_patterns, BR, BC,
                                                      dw_dtype)


def takes_float32_values(dtype) -> bool:
    """Whether forward and grad_input computing in ``dtype`` are best handed float32 values as
    they are (autocast's master weights): true for bfloat16, whose kernels (dot products or
    float32) round the values as they pack them, with the bits of values.to(bfloat16) and without
    that copy. (The C++ ops take float32 values with any half-precision operand; where they cannot
    round while packing, float16 or shapes the bfloat16 kernels do not cover, they copy.)"""
    return dtype == torch.bfloat16


def unavailable_reason(device: torch.device) -> Optional[str]:
    return _native.unavailable_reason(device, "cpu", "CPU")


ISAS = ("avx512", "avx2", "generic")  # micro-kernel instruction sets, best first


def isa(request: str = "") -> str:
    """The instruction set of the C++ micro-kernels, for this process. ``request`` (one of ``ISAS``,
    or ``"best"``) selects one, capped at what the CPU supports; ``""`` only asks. Returns the name
    of the one now active. The default is the best the CPU has, or the ``EFCN_CPU_ISA`` environment
    variable's choice. Results are bit-identical run to run for a given ISA (and equal between the
    two SIMD ones, which both chain fused multiply-adds, except the forward at batch <= 2)."""
    if not _extension.load():
        raise RuntimeError(f"the compiled extension is not available ({_extension.error()})")
    return torch.ops.efcn_sparse_C.cpu_isa(request)


def bf16_dot() -> bool:
    """Whether bfloat16 ops now run on the CPU's AVX512_BF16 dot-product instructions (pairs of
    bfloat16 multiplied and summed into float32, rounded once to bfloat16) rather than on the
    float32 kernels (operands widened as they are packed, the float32 sums rounded once): the CPU
    has them, the active ISA is AVX-512, and ``EFCN_CPU_BF16_DOT`` is ``1``, or unset on an AMD CPU
    (elsewhere VDPBF16PS runs below the float32 FMA rate: on this project's Intel Xeon the dot
    products took 1.5-1.7x the time of the float32 kernels on widened operands). Shapes it does not cover go through float32:
    the forward needs N and the block width even; grad_input M and the block height even and
    blocks wider than 16; grad_weight blocks wider than 8 and a block height that is a multiple of 8."""
    if not _extension.load():
        raise RuntimeError(f"the compiled extension is not available ({_extension.error()})")
    return bool(torch.ops.efcn_sparse_C.cpu_bf16_dot())


def supported_isas() -> tuple:
    """The ISAs this CPU and build can run, best first (``generic`` always)."""
    current = isa()
    try:
        best = isa("best")
    finally:
        isa(current)
    return ISAS[ISAS.index(best):]
