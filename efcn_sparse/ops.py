"""The three block-sparse ops, registered as PyTorch custom ops (schema, fake impl, autograd).

* ``efcn_sparse::bsr_linear``      Y  = X W^T + b                 (differentiable)
* ``efcn_sparse::bsr_grad_input``  dX = dY W, via the transpose metadata (no copy of values)
* ``efcn_sparse::bsr_grad_weight`` dW = (dY^T X) on stored blocks only, times the element mask
* ``efcn_sparse::bsr_grad_weight_acc`` out += dW in place (gradient accumulation without a dW temporary)
* ``efcn_sparse::bsr_grad_weight_bias`` (dW, db = dY summed over the batch), db fused into the
  pass over dY where the backend can (cpu), else one more pass

W is the (M, N) matrix of a :class:`~efcn_sparse.layout.BSRLayout` with ``values``
[nnzb, BR, BC]. ``values`` has the dtype of X (dY), or is float32 with a bfloat16/float16 X (dY):
then the op computes as with ``values.to(X.dtype)`` (autocast's float32 master weights; backends
that round them as they pack them skip the copy), and dW can come back in float32, the
half-precision result widened (``dw_dtype``). Values at masked entries must be zero
(``SparseEFCN`` keeps them so: their gradient is exactly zero). ``backend`` names a kernel implementation (``efcn_sparse.backends``);
it is resolved inside the op, so ``torch.compile`` sees one opaque op whatever runs.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import backends
from .layout import BSRLayout

__all__ = ["bsr_linear", "bsr_grad_input", "bsr_grad_weight", "bsr_grad_weight_acc", "bsr_grad_weight_bias", "linear",
           "autocast_dtype"]


_HALF = (torch.bfloat16, torch.float16)


def _float32_values_for(dtype: torch.dtype, values: Tensor) -> bool:
    """Whether ``values`` are float32 master weights of an op computing in half-precision ``dtype``."""
    return values.dtype == torch.float32 and dtype in _HALF


def _check_operand(name: str, t: Tensor, cols: int, values: Tensor, float32_values: bool = False) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor [batch, {cols}], got shape {tuple(t.shape)}")
    if t.shape[1] != cols:
        raise ValueError(f"{name}: expected {cols} features, got {t.shape[1]} (shape {tuple(t.shape)})")
    if t.dtype != values.dtype and not (float32_values and _float32_values_for(t.dtype, values)):
        raise TypeError(f"{name}: dtype {t.dtype} does not match the weights' dtype {values.dtype}")
    if t.device != values.device:
        raise RuntimeError(f"{name}: on device {t.device}, but the weights are on {values.device}")


def _check_blocks(name: str, n: int, block: int, n_blocks: int) -> None:
    if not (n_blocks - 1) * block < n <= n_blocks * block and not (n == 0 and n_blocks == 0):
        raise ValueError(f"{name}: {n} features do not fit {n_blocks} blocks of {block}")


def _kernels(backend: str, device: torch.device, **shape_class):
    return backends.kernels(backends.resolve(backend, device, **shape_class))


def _takes_float32_values(k, dtype: torch.dtype) -> bool:
    """Whether kernel module ``k`` computes in ``dtype`` from float32 values itself (kernel
    ``takes_float32_values``), rounding them as it packs them, instead of needing a cast copy."""
    fn = getattr(k, "takes_float32_values", None)
    return fn is not None and bool(fn(dtype))


def _values_for(k, a: Tensor, values: Tensor) -> Tensor:
    # float32 values with a half-precision operand: the kernel rounds them itself, or gets a copy
    if values.dtype == a.dtype or _takes_float32_values(k, a.dtype):
        return values
    return values.to(a.dtype)


# --------------------------------------------------------------------------- forward
@torch.library.custom_op("efcn_sparse::bsr_linear", mutates_args=())
def bsr_linear(
    x: Tensor,
    values: Tensor,
    bias: Optional[Tensor],
    crow_ptr: Tensor,
    col_idx: Tensor,
    row_idx: Tensor,
    ccol_ptr: Tensor,
    t_row_idx: Tensor,
    t_perm: Tensor,
    mask_ids: Optional[Tensor],
    mask_patterns: Optional[Tensor],
    M: int,
    backend: str,
    accumulate_grad: bool = False,
) -> Tensor:
    """Y [B, M] = X [B, N] W^T + bias. ``accumulate_grad``: see :func:`linear`."""
    _check_operand("input", x, x.shape[1], values, float32_values=True)
    _check_blocks("input", x.shape[1], values.shape[2], ccol_ptr.numel() - 1)
    _check_blocks("output", M, values.shape[1], crow_ptr.numel() - 1)
    k = _kernels(backend, x.device, op="forward", dtype=x.dtype, batch=x.shape[0], block_shape=values.shape[1:])
    if x.shape[0] == 0:
        return x.new_empty(0, M)
    return k.forward(x.contiguous(), _values_for(k, x, values).contiguous(),
                     None if bias is None else bias.contiguous(), crow_ptr, col_idx, row_idx, M)


@bsr_linear.register_fake
def _(x, values, bias, crow_ptr, col_idx, row_idx, ccol_ptr, t_row_idx, t_perm, mask_ids, mask_patterns, M, backend,
      accumulate_grad=False):
    return x.new_empty(x.shape[0], M)


def _setup_context(ctx, inputs, output):
    (x, values, bias, crow_ptr, col_idx, row_idx, ccol_ptr, t_row_idx, t_perm, mask_ids, mask_patterns, M,
     backend) = inputs[:13]
    ctx.save_for_backward(x, values, row_idx, col_idx, ccol_ptr, t_row_idx, t_perm, mask_ids, mask_patterns)
    ctx.has_bias = bias is not None
    ctx.backend = backend
    # in-place accumulation needs the parameter itself (not an autocast copy) and eager autograd
    ctx.accumulate_grad = (len(inputs) > 13 and bool(inputs[13]) and values.is_leaf and values.requires_grad
                           and not torch.compiler.is_compiling())


def _accumulates_in_place(ctx, values: Tensor, dy: Tensor) -> bool:
    """Whether dW can go straight into ``values.grad``: asked for, a plain existing gradient of dy's
    dtype, no graph of the backward (create_graph) and no Python hooks that must see dW."""
    if not ctx.accumulate_grad:
        return False
    g = values.grad
    return (g is not None and not torch.is_grad_enabled() and g.dtype == dy.dtype
            and g.device == dy.device and g.layout == torch.strided and g.is_contiguous() and g.shape == values.shape
            and not values._backward_hooks and not getattr(values, "_post_accumulate_grad_hooks", None))


def _backward(ctx, dy):
    x, values, row_idx, col_idx, ccol_ptr, t_row_idx, t_perm, mask_ids, mask_patterns = ctx.saved_tensors
    dy = dy.contiguous()
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = bsr_grad_input(dy, values, ccol_ptr, t_row_idx, t_perm, x.shape[1], ctx.backend)
    need_db = ctx.has_bias and ctx.needs_input_grad[2]
    dw_dtype = values.dtype if values.dtype != dy.dtype else None  # float32 master values
    if ctx.needs_input_grad[1]:
        if _accumulates_in_place(ctx, values, dy):
            bsr_grad_weight_acc(values.grad, dy, x, row_idx, col_idx, mask_ids, mask_patterns, ctx.backend)
        elif need_db:
            dw, db = bsr_grad_weight_bias(dy, x, row_idx, col_idx, mask_ids, mask_patterns, values.shape[1],
                                          values.shape[2], ctx.backend, dw_dtype)
        else:
            dw = bsr_grad_weight(dy, x, row_idx, col_idx, mask_ids, mask_patterns, values.shape[1], values.shape[2],
                                 ctx.backend, dw_dtype)
    if need_db and db is None:
        db = _bias_grad(dy, ctx.backend)
    return dx, dw, db, None, None, None, None, None, None, None, None, None, None, None


bsr_linear.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- grad_input
@torch.library.custom_op("efcn_sparse::bsr_grad_input", mutates_args=())
def bsr_grad_input(dy: Tensor, values: Tensor, ccol_ptr: Tensor, t_row_idx: Tensor, t_perm: Tensor, N: int,
                   backend: str) -> Tensor:
    """dX [B, N] = dY [B, M] W."""
    _check_operand("grad_output", dy, dy.shape[1], values, float32_values=True)
    _check_blocks("grad_input", N, values.shape[2], ccol_ptr.numel() - 1)
    if dy.shape[0] == 0:
        return dy.new_zeros(0, N)
    k = _kernels(backend, dy.device, op="grad_input", dtype=dy.dtype, batch=dy.shape[0], block_shape=values.shape[1:])
    return k.grad_input(dy.contiguous(), _values_for(k, dy, values).contiguous(), ccol_ptr, t_row_idx, t_perm, N)


@bsr_grad_input.register_fake
def _(dy, values, ccol_ptr, t_row_idx, t_perm, N, backend):
    return dy.new_empty(dy.shape[0], N)


# --------------------------------------------------------------------------- grad_weight
def _check_grad_weight_operands(dy: Tensor, x: Tensor) -> None:
    if dy.dim() != 2 or x.dim() != 2 or dy.shape[0] != x.shape[0]:
        raise ValueError(f"grad_weight: expected dy [B, M] and x [B, N] with one batch, got {tuple(dy.shape)} and {tuple(x.shape)}")
    if dy.dtype != x.dtype:
        raise TypeError(f"grad_weight: dy dtype {dy.dtype} differs from x dtype {x.dtype}")


def _dw_dtype(dy: Tensor, dw_dtype: Optional[torch.dtype]) -> torch.dtype:
    """The dtype dW is returned in: dy's (None), or float32 for a half-precision dy."""
    if dw_dtype is None or dw_dtype == dy.dtype:
        return dy.dtype
    if dw_dtype == torch.float32 and dy.dtype in _HALF:
        return dw_dtype
    raise TypeError(f"grad_weight: dw_dtype must be dy's dtype ({dy.dtype}) or float32 for a half-precision dy, "
                    f"got {dw_dtype}")


def _grad_weight_as(k, dtype: torch.dtype, dy: Tensor, x: Tensor, *args) -> Tensor:
    # dW computed in dy's dtype, returned in `dtype`: widened by the kernel (grad_weight_as) or after it
    if dtype == dy.dtype:
        return k.grad_weight(dy, x, *args)
    fn = getattr(k, "grad_weight_as", None)
    return fn(dy, x, *args, dtype) if fn is not None else k.grad_weight(dy, x, *args).to(dtype)


@torch.library.custom_op("efcn_sparse::bsr_grad_weight", mutates_args=())
def bsr_grad_weight(dy: Tensor, x: Tensor, row_idx: Tensor, col_idx: Tensor, mask_ids: Optional[Tensor],
                    mask_patterns: Optional[Tensor], BR: int, BC: int, backend: str,
                    dw_dtype: Optional[torch.dtype] = None) -> Tensor:
    """dW [nnzb, BR, BC] = (dY^T X) restricted to the stored blocks, times the element mask,
    computed in dY's dtype and returned in ``dw_dtype`` (None: dY's; float32 for a
    half-precision dY: the gradient of float32 master values, the result widened)."""
    _check_grad_weight_operands(dy, x)
    out = _dw_dtype(dy, dw_dtype)
    if dy.shape[0] == 0:
        return dy.new_zeros(row_idx.numel(), BR, BC, dtype=out)
    k = _kernels(backend, dy.device, op="grad_weight", dtype=dy.dtype, batch=dy.shape[0], block_shape=(BR, BC))
    return _grad_weight_as(k, out, dy.contiguous(), x.contiguous(), row_idx, col_idx, mask_ids, mask_patterns, BR, BC)


@bsr_grad_weight.register_fake
def _(dy, x, row_idx, col_idx, mask_ids, mask_patterns, BR, BC, backend, dw_dtype=None):
    return dy.new_empty(row_idx.shape[0], BR, BC, dtype=_dw_dtype(dy, dw_dtype))


def _bias_grad(dy: Tensor, backend: str) -> Tensor:
    """dy summed over the batch as the backend's grad_weight_bias sums it (kernel ``bias_grad``),
    so that every backward path gives the bias the same bits; else ``dy.sum(0)``."""
    k = _kernels(backend, dy.device, op="grad_weight", dtype=dy.dtype, batch=dy.shape[0])
    fn = getattr(k, "bias_grad", None)
    return fn(dy) if fn is not None and dy.shape[0] > 0 else dy.sum(0)


@torch.library.custom_op("efcn_sparse::bsr_grad_weight_bias", mutates_args=())
def bsr_grad_weight_bias(dy: Tensor, x: Tensor, row_idx: Tensor, col_idx: Tensor, mask_ids: Optional[Tensor],
                         mask_patterns: Optional[Tensor], BR: int, BC: int, backend: str,
                         dw_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
    """(dW, db): ``bsr_grad_weight`` (dW in ``dw_dtype``) and the bias gradient dY summed over
    the batch [M] in dY's dtype (accumulated in float32 for half types), the sum fused into the
    backend's pass over dY where it has one (kernel ``grad_weight_bias``), else computed after it."""
    _check_grad_weight_operands(dy, x)
    out = _dw_dtype(dy, dw_dtype)
    if dy.shape[0] == 0:
        return dy.new_zeros(row_idx.numel(), BR, BC, dtype=out), dy.new_zeros(dy.shape[1])
    k = _kernels(backend, dy.device, op="grad_weight", dtype=dy.dtype, batch=dy.shape[0], block_shape=(BR, BC))
    dy, x = dy.contiguous(), x.contiguous()
    fused = getattr(k, "grad_weight_bias", None)
    if fused is not None:
        args = (dy, x, row_idx, col_idx, mask_ids, mask_patterns, BR, BC)
        return fused(*args) if out == dy.dtype else fused(*args, out)
    return _grad_weight_as(k, out, dy, x, row_idx, col_idx, mask_ids, mask_patterns, BR, BC), _bias_grad(dy, backend)


@bsr_grad_weight_bias.register_fake
def _(dy, x, row_idx, col_idx, mask_ids, mask_patterns, BR, BC, backend, dw_dtype=None):
    return dy.new_empty(row_idx.shape[0], BR, BC, dtype=_dw_dtype(dy, dw_dtype)), dy.new_empty(dy.shape[1])


@torch.library.custom_op("efcn_sparse::bsr_grad_weight_acc", mutates_args=("out",))
def bsr_grad_weight_acc(out: Tensor, dy: Tensor, x: Tensor, row_idx: Tensor, col_idx: Tensor,
                        mask_ids: Optional[Tensor], mask_patterns: Optional[Tensor], backend: str) -> None:
    """out [nnzb, BR, BC] += dW in place (as ``out += bsr_grad_weight(...)``, masked entries of out
    left as they are), without a dW temporary on backends that fuse it (triton, cuda, reference)."""
    _check_grad_weight_operands(dy, x)
    if out.dtype != dy.dtype:
        raise TypeError(f"grad_weight: dy {dy.dtype}, x {x.dtype} and out {out.dtype} must share one dtype")
    if out.dim() != 3 or out.shape[0] != row_idx.numel() or not out.is_contiguous():
        raise ValueError(f"grad_weight: out must be a contiguous [{row_idx.numel()}, BR, BC] tensor, got {tuple(out.shape)}")
    if dy.shape[0] == 0:
        return
    BR, BC = out.shape[1], out.shape[2]
    k = _kernels(backend, dy.device, op="grad_weight", dtype=dy.dtype, batch=dy.shape[0], block_shape=(BR, BC))
    fused = getattr(k, "grad_weight_acc", None)
    if fused is not None:
        fused(out, dy.contiguous(), x.contiguous(), row_idx, col_idx, mask_ids, mask_patterns)
    else:
        out += k.grad_weight(dy.contiguous(), x.contiguous(), row_idx, col_idx, mask_ids, mask_patterns, BR, BC)


@bsr_grad_weight_acc.register_fake
def _(out, dy, x, row_idx, col_idx, mask_ids, mask_patterns, backend):
    return None


# --------------------------------------------------------------------------- autocast
_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype ``torch.autocast`` computes linear layers in on ``device``, or None outside autocast."""
    kind = torch.device(device).type
    if kind not in ("cpu", "cuda", "xpu", "hpu", "mps"):
        return None
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
    if kind == "cpu":
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    return torch.get_autocast_gpu_dtype() if kind == "cuda" and torch.is_autocast_enabled() else None


def _autocast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    # as autocast's own casts: floating tensors other than float64 go to the autocast dtype; the
    # cast is differentiable, so float32 master values receive float32 gradients
    if t is None or t.dtype == dtype or t.dtype not in _AUTOCAST_ELIGIBLE:
        return t
    return t.to(dtype)


# --------------------------------------------------------------------------- convenience
def linear(x: Tensor, layout: BSRLayout, values: Tensor, bias: Optional[Tensor] = None,
           backend: Optional[str] = None, accumulate_grad: bool = False) -> Tensor:
    """``x [B, N] @ W^T + bias`` for W given by ``layout`` and ``values``; differentiable in all three.

    Inside ``torch.autocast`` it computes in the autocast dtype, as ``F.linear`` does: ``x``,
    ``values`` and ``bias`` are cast (float64 is left alone) and the output has that dtype.
    Where the backend rounds float32 values itself as it packs them (the ``cpu`` backend's
    bfloat16 dot-product kernels), the values are not copied: the ops take the float32 master
    values and return their gradient in float32, with the same bits as through the cast.

    ``accumulate_grad=True`` (eager autograd only): when ``values`` is a leaf whose ``.grad``
    already exists (gradient accumulation, ``zero_grad(set_to_none=False)``), the backward adds
    dW into it in place, with no dW temporary, and hands autograd no gradient for ``values``;
    otherwise (no ``.grad`` yet, an autocast copy, torch.compile, create_graph, Python hooks on
    ``values``) it does what ``False`` does. Hooks on ``values``' gradient accumulator (DDP,
    FSDP) do not fire for the in-place path: use it only without them."""
    M, N = layout.shape
    name = backends.check_name(backend or backends.get_default_backend())
    cast = autocast_dtype(x.device) if isinstance(x, Tensor) else None
    float32_values = False
    if cast is not None:
        x, bias = _autocast(x, cast), _autocast(bias, cast)
        float32_values = _keeps_float32_values(name, x, values, layout)
        if not float32_values:
            values = _autocast(values, cast)
    if values.shape[1:] != torch.Size(layout.block_shape) or values.shape[0] != layout.nnzb:
        layout.check_values(values)
    _check_operand("input", x, N, values, float32_values)
    if bias is not None and tuple(bias.shape) != (M,):
        raise ValueError(f"bias: expected shape ({M},), got {tuple(bias.shape)}")
    return bsr_linear(x, values, bias, layout.crow_ptr, layout.col_idx, layout.row_idx, layout.ccol_ptr,
                      layout.t_row_idx, layout.t_perm, layout.mask_ids, layout.mask_patterns, M, name,
                      accumulate_grad)


def _keeps_float32_values(backend: str, x: Tensor, values: Tensor, layout: BSRLayout) -> bool:
    """Under autocast: whether float32 ``values`` go to the ops uncast, because the backends of
    both ops that read them (forward, grad_input) round them to ``x``'s dtype themselves. Eager
    only: under torch.compile the cast stays in the graph."""
    if not _float32_values_for(x.dtype, values) or x.dim() != 2 or torch.compiler.is_compiling():
        return False
    return all(_takes_float32_values(_kernels(backend, x.device, op=op, dtype=x.dtype, batch=x.shape[0],
                                              block_shape=layout.block_shape), x.dtype)
               for op in ("forward", "grad_input"))
