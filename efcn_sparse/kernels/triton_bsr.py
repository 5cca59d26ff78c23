"""``triton`` backend: Triton kernels for the three block-sparse ops (kernels in ``triton_bsr_kernels``).

* forward:     one program per (block row, batch tile), looping over the row's stored blocks; bias fused.
* grad_input:  one program per (block column, batch tile), through ``ccol_ptr``/``t_row_idx``/``t_perm``.
* grad_weight: one program per stored block, reducing over the batch; element mask in the epilogue.

Runs CUDA tensors on a GPU, or CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``
set before triton is imported). float32 is exact (``input_precision="ieee"``) unless TF32 is
allowed (``EFCN_TRITON_TF32=1`` or :func:`set_allow_tf32`); float16/bfloat16 use tensor cores;
accumulation is float32. float64 runs on the FMA units (rank-1 updates, float64 accumulation,
no ``tl.dot``), exact but slow: ``auto`` prefers the ``cuda`` backend for it.

Launch configurations are autotuned on the GPU, keyed on block shape, batch bucket, blocks per
row and dtype; ``EFCN_TRITON_AUTOTUNE=0`` (read at each call) uses a fixed heuristic instead,
and the interpreter never autotunes.

The launchers are registered as ``efcn_sparse_triton::{forward,grad_input,grad_weight}`` with
``torch.library.triton_op`` (torch >= 2.6) so ``torch.compile`` can trace into the kernels; on
older torch they are plain functions.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

# Only a failed ``import triton`` makes the backend unavailable (it then says why). An error in
# our own kernel module is a bug: it propagates, so that it fails loudly instead of hiding as
# "triton unavailable".
try:
    import triton
except ImportError as e:
    triton = None
    _IMPORT_ERROR: Optional[str] = f"{type(e).__name__}: {e}"
else:
    _IMPORT_ERROR = None
    from .triton_bsr_kernels import bsr_forward_kernel, bsr_grad_input_kernel, bsr_grad_weight_kernel

__all__ = ["forward", "grad_input", "grad_weight", "grad_weight_as", "grad_weight_acc", "takes_float32_values",
           "unavailable_reason", "set_allow_tf32", "interpreted"]

_allow_tf32 = os.environ.get("EFCN_TRITON_TF32", "0") == "1"
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # also read by backends.resolve("auto")


def set_allow_tf32(flag: bool) -> None:
    """Let float32 products use TF32 tensor cores (faster, ~1e-3 relative error). Off by default."""
    global _allow_tf32
    _allow_tf32 = bool(flag)


def interpreted() -> bool:
    """Whether the kernels were built by the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return triton is not None and not isinstance(bsr_forward_kernel, triton.runtime.JITFunction)


def unavailable_reason(device: torch.device) -> Optional[str]:
    """None when the kernels can run tensors of ``device``, else why not."""
    device = torch.device(device)
    if triton is None:
        return f"triton could not be imported ({_IMPORT_ERROR})"
    if device.type == "cuda":
        if interpreted():
            return None
        if not torch.cuda.is_available():
            return "no CUDA GPU is available"
        return None
    if device.type == "cpu":
        if interpreted():
            return None
        if os.environ.get("TRITON_INTERPRET") == "1":
            return "TRITON_INTERPRET=1 was set after the Triton kernels were compiled; set it before importing efcn_sparse"
        return "Triton runs CPU tensors only under its interpreter: set TRITON_INTERPRET=1 before importing triton"
    return f"Triton kernels run CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {device}"


# --------------------------------------------------------------------------- launch configuration
def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _side(n: int) -> int:
    """A block side padded to a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, _pow2(n))


def _autotune_on() -> bool:
    return os.environ.get("EFCN_TRITON_AUTOTUNE", "1") != "0" and not interpreted()


def _dot_prec(dtype: torch.dtype) -> str:
    if dtype == torch.float64 or (dtype == torch.float32 and not _allow_tf32):
        return "ieee"
    return "tf32"  # Triton's default: TF32 for float32, no effect on 16-bit inputs


def _check_dtype(t: Tensor) -> None:
    if t.dtype not in DTYPES:
        raise TypeError(f"triton backend: unsupported dtype {t.dtype}; expected one of "
                        f"{', '.join(str(d).replace('torch.', '') for d in DTYPES)}")


def _staged(a: Tensor, values: Tensor) -> torch.dtype:
    """The dtype whose size bounds a staged tile: float32 values with half-precision activations
    (autocast) are loaded as float32 before they are rounded."""
    return values.dtype if values.dtype.itemsize > a.dtype.itemsize else a.dtype


def _heuristic(kind: str, B: int, BRP: int, BCP: int, dtype: torch.dtype) -> dict:
    """The configuration used when autotuning is off: a batch tile near the batch, as many
    pipeline stages as fit a conservative shared-memory budget, warps by tile size."""
    el = dtype.itemsize
    block_b = min(_pow2(max(B, 16)), 64 if kind == "grad_weight" or el >= 4 else 128)
    k_side, out_side = {"forward": (BCP, BRP), "grad_input": (BRP, BCP), "grad_weight": (BRP, BCP)}[kind]

    def stage_bytes(bb):  # the two tl.dot operand tiles of one loop iteration
        return (bb * (BRP + BCP) if kind == "grad_weight" else bb * k_side + k_side * out_side) * el

    budget = 96 * 1024
    while block_b > 16 and 2 * stage_bytes(block_b) > budget:
        block_b //= 2
    stages = 3 if 3 * stage_bytes(block_b) <= budget else 2
    acc = BRP * BCP if kind == "grad_weight" else block_b * out_side
    return dict(BLOCK_B=block_b, num_warps=8 if acc >= 128 * 64 else 4, num_stages=stages)


def _prune(configs, named_args, **kwargs):
    """Drop batch tiles far above the batch (they only add masked work); keep at least one."""
    limit = max(16, _pow2(named_args["B"]))
    kept = [c for c in configs if c.kwargs["BLOCK_B"] <= limit]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_B"])]


def _tuned(kernel, key, tiles_warps_stages):
    if triton is None or interpreted():
        return None
    configs = [triton.Config({"BLOCK_B": b}, num_warps=w, num_stages=s) for b, w, s in tiles_warps_stages]
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": _prune})(kernel)


# (BLOCK_B, num_warps, num_stages); configs that do not fit shared memory are dropped by the autotuner
_ROW_CONFIGS = [(16, 4, 3), (32, 4, 3), (64, 4, 3), (64, 8, 3), (128, 4, 3), (128, 8, 3), (128, 8, 4), (256, 8, 3)]
_GW_CONFIGS = [(16, 4, 3), (32, 4, 3), (32, 8, 3), (64, 4, 3), (64, 8, 3), (64, 8, 4)]
_ROW_KEY = ["BR", "BC", "B_KEY", "BPR_KEY"]  # the autotuner adds the tensors' dtypes to the key
_tuned_forward = _tuned(bsr_forward_kernel, _ROW_KEY, _ROW_CONFIGS) if triton is not None else None
_tuned_grad_input = _tuned(bsr_grad_input_kernel, _ROW_KEY, _ROW_CONFIGS) if triton is not None else None
_tuned_grad_weight = _tuned(bsr_grad_weight_kernel, ["BR", "BC", "B_KEY"], _GW_CONFIGS) if triton is not None else None


def _launcher(wrap, tuned, plain, kind, B, BRP, BCP, dtype, n_programs_per_tile: int):
    """(kernel, grid, extra launch kwargs) for autotuned or heuristic launches."""
    if tuned is not None and _autotune_on():
        if kind == "grad_weight":
            return wrap(tuned), (lambda meta: (n_programs_per_tile,)), {}
        return wrap(tuned), (lambda meta: (n_programs_per_tile * triton.cdiv(B, meta["BLOCK_B"]),)), {}
    meta = _heuristic(kind, B, BRP, BCP, dtype)
    n = n_programs_per_tile if kind == "grad_weight" else n_programs_per_tile * triton.cdiv(B, meta["BLOCK_B"])
    if interpreted():
        meta = {"BLOCK_B": meta["BLOCK_B"]}  # the interpreter takes no warps/stages
    return wrap(plain), (n,), meta


def _is_fake(t: Tensor) -> bool:
    return isinstance(t, torch._subclasses.fake_tensor.FakeTensor)


def _skip_launch(t: Tensor) -> bool:
    # wrap_triton lets interpreted kernels through unwrapped; they cannot run on fake tensors
    return t.numel() == 0 or (interpreted() and _is_fake(t))


def _even(M: int, N: int, BR: int, BC: int) -> dict:
    """Whether rows / columns need no feature mask (whole blocks, sides that are powers of two)."""
    return dict(EVEN_M=M % BR == 0 and BR == _side(BR), EVEN_N=N % BC == 0 and BC == _side(BC))


def _bpr_key(nnzb: int, n_lines: int) -> int:
    return _pow2(max(1, round(nnzb / max(n_lines, 1))))


# --------------------------------------------------------------------------- implementations
def _forward_impl(wrap, x: Tensor, values: Tensor, bias: Optional[Tensor], crow_ptr: Tensor, col_idx: Tensor,
                  M: int) -> Tensor:
    _check_dtype(values)
    B, N = x.shape
    nnzb, BR, BC = values.shape
    nbr = crow_ptr.shape[0] - 1
    y = x.new_empty(B, M)
    if _skip_launch(y):
        return y
    BRP, BCP = _side(BR), _side(BC)
    kernel, grid, meta = _launcher(wrap, _tuned_forward, bsr_forward_kernel, "forward", B, BRP, BCP,
                                   _staged(x, values), nbr)
    kernel[grid](
        x, values, bias if bias is not None else y, y, crow_ptr, col_idx,
        B, M, N, min(_pow2(B), 4096), _bpr_key(nnzb, nbr),
        BR=BR, BC=BC, BRP=BRP, BCP=BCP, **_even(M, N, BR, BC), HAS_BIAS=bias is not None, DOT_PREC=_dot_prec(x.dtype),
        ACC_F64=x.dtype == torch.float64, **meta,
    )
    return y


def _grad_input_impl(wrap, dy: Tensor, values: Tensor, ccol_ptr: Tensor, t_row_idx: Tensor, t_perm: Tensor,
                     N: int) -> Tensor:
    _check_dtype(values)
    B, M = dy.shape
    nnzb, BR, BC = values.shape
    nbc = ccol_ptr.shape[0] - 1
    dx = dy.new_empty(B, N)
    if _skip_launch(dx):
        return dx
    BRP, BCP = _side(BR), _side(BC)
    kernel, grid, meta = _launcher(wrap, _tuned_grad_input, bsr_grad_input_kernel, "grad_input", B, BRP, BCP,
                                   _staged(dy, values), nbc)
    kernel[grid](
        dy, values, dx, ccol_ptr, t_row_idx, t_perm,
        B, M, N, min(_pow2(B), 4096), _bpr_key(nnzb, nbc),
        BR=BR, BC=BC, BRP=BRP, BCP=BCP, **_even(M, N, BR, BC), DOT_PREC=_dot_prec(dy.dtype), ACC_F64=dy.dtype == torch.float64, **meta,
    )
    return dx


def _grad_weight_impl(wrap, dy: Tensor, x: Tensor, row_idx: Tensor, col_idx: Tensor, mask_ids: Optional[Tensor],
                      mask_patterns: Optional[Tensor], BR: int, BC: int, out: Optional[Tensor] = None,
                      dw_dtype: Optional[torch.dtype] = None) -> Tensor:
    """dW (in dw_dtype: dy's, or float32 for half-precision dy, the result widened), or with
    ``out``: out += dW in place."""
    _check_dtype(dy)
    B, M = dy.shape
    N = x.shape[1]
    nnzb = row_idx.shape[0]
    dw = dy.new_empty(nnzb, BR, BC, dtype=dw_dtype or dy.dtype) if out is None else out
    if _skip_launch(dw):
        return dw
    has_mask = mask_ids is not None and mask_patterns is not None
    pats = mask_patterns.contiguous().view(torch.uint8) if has_mask else row_idx
    BRP, BCP = _side(BR), _side(BC)
    kernel, grid, meta = _launcher(wrap, _tuned_grad_weight, bsr_grad_weight_kernel, "grad_weight", B, BRP, BCP,
                                   dy.dtype, nnzb)
    kernel[grid](
        dy, x, dw, row_idx, col_idx, mask_ids if has_mask else row_idx, pats,
        B, M, N, min(_pow2(B), 4096),
        BR=BR, BC=BC, BRP=BRP, BCP=BCP, **_even(M, N, BR, BC), HAS_MASK=has_mask, DOT_PREC=_dot_prec(dy.dtype),
        ACC_F64=dy.dtype == torch.float64, ACCUMULATE=out is not None, **meta,
    )
    return dw


# --------------------------------------------------------------------------- registration
def _register():
    """Register the launchers as triton_ops (torch >= 2.6); else return them as plain functions."""
    if triton is None:
        return None
    lib = torch.library
    if not (hasattr(lib, "triton_op") and hasattr(lib, "wrap_triton")):
        ident = lambda k: k  # noqa: E731
        def grad_weight_acc_plain(out, *a):
            _grad_weight_impl(ident, *a, out.shape[1], out.shape[2], out)

        def grad_weight_plain(*a, dw_dtype=None):
            return _grad_weight_impl(ident, *a, None, dw_dtype)

        return (lambda *a: _forward_impl(ident, *a), lambda *a: _grad_input_impl(ident, *a), grad_weight_plain,
                grad_weight_acc_plain)

    def wrap(kernel):
        return kernel if interpreted() else lib.wrap_triton(kernel)

    @lib.triton_op("efcn_sparse_triton::forward", mutates_args=())
    def forward_op(x: Tensor, values: Tensor, bias: Optional[Tensor], crow_ptr: Tensor, col_idx: Tensor,
                   M: int) -> Tensor:
        return _forward_impl(wrap, x, values, bias, crow_ptr, col_idx, M)

    @lib.triton_op("efcn_sparse_triton::grad_input", mutates_args=())
    def grad_input_op(dy: Tensor, values: Tensor, ccol_ptr: Tensor, t_row_idx: Tensor, t_perm: Tensor,
                      N: int) -> Tensor:
        return _grad_input_impl(wrap, dy, values, ccol_ptr, t_row_idx, t_perm, N)

    @lib.triton_op("efcn_sparse_triton::grad_weight", mutates_args=())
    def grad_weight_op(dy: Tensor, x: Tensor, row_idx: Tensor, col_idx: Tensor, mask_ids: Optional[Tensor],
                       mask_patterns: Optional[Tensor], BR: int, BC: int,
                       dw_dtype: Optional[torch.dtype] = None) -> Tensor:
        return _grad_weight_impl(wrap, dy, x, row_idx, col_idx, mask_ids, mask_patterns, BR, BC, None, dw_dtype)

    @lib.triton_op("efcn_sparse_triton::grad_weight_acc", mutates_args=("out",))
    def grad_weight_acc_op(out: Tensor, dy: Tensor, x: Tensor, row_idx: Tensor, col_idx: Tensor,
                           mask_ids: Optional[Tensor], mask_patterns: Optional[Tensor]) -> None:
        _grad_weight_impl(wrap, dy, x, row_idx, col_idx, mask_ids, mask_patterns, out.shape[1], out.shape[2], out)

    return forward_op, grad_input_op, grad_weight_op, grad_weight_acc_op


_OPS = _register()


# --------------------------------------------------------------------------- kernel contract
def _ops():
    if _OPS is None:
        raise RuntimeError(f"triton backend: {unavailable_reason(torch.device('cuda'))}")
    return _OPS


def forward(x, values, bias: Optional[Tensor], crow_ptr, col_idx, row_idx, M: int):
    """Y [B, M] = X [B, N] W^T + bias (row_idx is unused: rows come from crow_ptr)."""
    return _ops()[0](x, values, bias, crow_ptr, col_idx, M)


def grad_input(dy, values, ccol_ptr, t_row_idx, t_perm, N: int):
    """dX [B, N] = dY [B, M] W, walking block columns through the transpose metadata."""
    return _ops()[1](dy, values, ccol_ptr, t_row_idx, t_perm, N)


def grad_weight(dy, x, row_idx, col_idx, mask_ids: Optional[Tensor], mask_patterns: Optional[Tensor], BR: int, BC: int):
    """dW [nnzb, BR, BC] = dY^T X on the stored blocks, times the element mask."""
    return _ops()[2](dy, x, row_idx, col_idx, mask_ids, mask_patterns, BR, BC)


def grad_weight_as(dy, x, row_idx, col_idx, mask_ids: Optional[Tensor], mask_patterns: Optional[Tensor], BR: int,
                   BC: int, dw_dtype: torch.dtype):
    """grad_weight in dw_dtype: float32 for a half-precision dy is its result widened, stored so
    by the kernel (no half-precision temporary)."""
    return _ops()[2](dy, x, row_idx, col_idx, mask_ids, mask_patterns, BR, BC, dw_dtype=dw_dtype)


def takes_float32_values(dtype: torch.dtype) -> bool:
    """The kernels round float32 values to a half-precision ``dtype`` as they load them
    (autocast's master weights need no cast copy)."""
    return dtype in (torch.float16, torch.bfloat16)


def grad_weight_acc(out, dy, x, row_idx, col_idx, mask_ids: Optional[Tensor], mask_patterns: Optional[Tensor]) -> None:
    """out += dW in place (masked entries of out left as they are), no [nnzb, BR, BC] temporary."""
    _ops()[3](out, dy, x, row_idx, col_idx, mask_ids, mask_patterns)
