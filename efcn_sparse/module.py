"""``SparseEFCN``: a block-sparse Linear layer, and the exact eFCN of a Conv2d.

Parameters are ``values`` [nnzb, BR, BC] and an untied per-position ``bias`` [M]; the layout
lives in buffers, so ``state_dict`` round-trips and ``.to()`` moves everything. Gradients of
masked entries are exactly zero (the grad_weight op multiplies by the mask), so structural
zeros stay zero under any optimizer whose update of a zero-gradient, zero-valued entry is zero
(SGD with momentum and weight decay, Adam, AdamW).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from . import backends
from .conv_geometry import ConvGeometry, Halo, build_layout, check_halo, embed_bias, embed_weight
from .layout import INDEX_FIELDS, MASK_FIELDS, BSRLayout, memory_budget_bytes
from .ops import autocast_dtype, linear

__all__ = ["SparseEFCN"]


class SparseEFCN(nn.Module):
    """``y = x W^T + b`` with W block-sparse; built from a conv it computes exactly that conv.

    Args:
        layout: the block structure of W (shape (M, N)).
        values: initial block values [nnzb, BR, BC] (default: nn.Linear's init with fan-in = the
            row's trainable entries, masked entries zero).
        bias: initial bias [M]; ``None``/``True``: nn.Linear's uniform init; ``False``: no bias.
        in_shape / out_shape: optional (C, H, W) of the input and output images; with them the
            layer takes and returns images, else flat features.
        backend: kernel backend (``None``: the global default, see ``efcn_sparse.backends``).

    ``accumulate_grad`` (attribute, default False): when True and ``values.grad`` exists, the
    backward adds dW into it in place instead of allocating a fresh [nnzb, BR, BC] gradient
    (gradient accumulation, ``zero_grad(set_to_none=False)``); not with DDP/FSDP or gradient hooks
    on ``values`` (see :func:`efcn_sparse.ops.linear`).
    """

    def __init__(self, layout: BSRLayout, values: Optional[Tensor] = None, bias=None,
                 in_shape: Optional[Tuple[int, int, int]] = None, out_shape: Optional[Tuple[int, int, int]] = None,
                 backend: Optional[str] = None, dtype=None, device=None):
        super().__init__()
        layout.validate()
        M, N = layout.shape
        for name, shp, n in (("in_shape", in_shape, N), ("out_shape", out_shape, M)):
            if shp is not None and (len(shp) != 3 or shp[0] * shp[1] * shp[2] != n):
                raise ValueError(f"{name}: expected (C, H, W) with C*H*W = {n}, got {shp}")
        self.shape = (M, N)
        self.block_shape = layout.block_shape
        self.in_shape = tuple(in_shape) if in_shape is not None else None
        self.out_shape = tuple(out_shape) if out_shape is not None else None
        self.backend = backends.check_name(backend) if backend is not None else None
        self.geometry: Optional[ConvGeometry] = None
        self.halo: Optional[Halo] = None
        # add dW into an existing values.grad in place (no dW temporary); see ops.linear
        self.accumulate_grad = False
        for f in INDEX_FIELDS:
            self.register_buffer(f, getattr(layout, f).to(device=device))
        for f in MASK_FIELDS:
            t = getattr(layout, f)
            self.register_buffer(f, None if t is None else t.to(device=device))
        BR, BC = layout.block_shape
        if values is None:
            values = self._default_init(layout, dtype or torch.get_default_dtype())
        else:
            layout.check_values(values)
            values = layout.apply_mask(values.detach().to(device=layout.device)).clone()
        self.values = nn.Parameter(values.to(device=device, dtype=dtype or values.dtype))
        if bias is False:
            self.register_parameter("bias", None)
        else:
            if bias is None or bias is True:  # nn.Linear's init, with each row's own fan-in
                bound = self._fan_in(layout).clamp(min=1).rsqrt()
                bias = (torch.rand(M) * 2 - 1) * bound
            bias = torch.as_tensor(bias).detach()
            if tuple(bias.shape) != (M,):
                raise ValueError(f"bias: expected shape ({M},), got {tuple(bias.shape)}")
            self.bias = nn.Parameter(bias.clone().to(device=device, dtype=self.values.dtype))

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _fan_in(layout: BSRLayout) -> Tensor:
        """Trainable entries of each row (the fan-in nn.Linear's init would use)."""
        M, _ = layout.shape
        BR, _ = layout.block_shape
        per_row = layout.block_mask(torch.float32).sum(2)  # [nnzb, BR]
        fan = torch.zeros(layout.n_block_rows, BR, device=layout.device)
        fan.index_add_(0, layout.row_idx.long(), per_row)
        return fan.reshape(-1)[:M].cpu()

    @classmethod
    def _default_init(cls, layout: BSRLayout, dtype) -> Tensor:
        """Kaiming-uniform as nn.Linear does, with each row's own fan-in."""
        BR, BC = layout.block_shape
        fan = torch.nn.functional.pad(cls._fan_in(layout), (0, layout.n_block_rows * BR - layout.shape[0]))
        bound = 1.0 / fan.clamp(min=1).sqrt().reshape(layout.n_block_rows, BR)
        u = torch.empty(layout.nnzb, BR, BC, dtype=dtype).uniform_(-1, 1)
        vals = u * bound[layout.row_idx.long().cpu()][:, :, None].to(dtype)
        return layout.apply_mask(vals.to(layout.device))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, input_size, halo: Halo = 0, block_shape: Optional[Tuple[int, int]] = None,
                  backend: Optional[str] = None) -> "SparseEFCN":
        """The eFCN of ``conv`` on ``input_size`` (H, W) images: same outputs, same gradients.

        ``halo``: 0 stores the receptive fields only (the eLCN); h also stores input pixels up to
        h pixels beyond them (trainable, starting at zero); ``"full"`` stores every block (the
        paper's dense eFCN).
        """
        geo = ConvGeometry.from_conv(conv, input_size)
        halo = check_halo(halo)
        w = conv.weight.detach()

        def check_fits(entries: int) -> None:
            need = entries * w.element_size()
            if need > memory_budget_bytes():
                raise MemoryError(
                    f"the eFCN of {conv} on {geo.input_size} inputs with halo={halo!r} would store {need / 2**30:.2f} "
                    f"GiB of {w.dtype} values, over the {memory_budget_bytes() / 2**30:.2f} GiB budget (half the "
                    "machine's memory); use a smaller halo or input")

        if halo == "full":
            check_fits(geo.out_features * geo.in_features)
        layout = build_layout(geo, halo, block_shape)
        check_fits(layout.nnzb * layout.block_shape[0] * layout.block_shape[1])
        values = embed_weight(geo, layout, w)
        Ho, Wo = geo.out_size
        m = cls(layout.to(w.device), values.to(w.device), bias=False if conv.bias is None else embed_bias(geo, conv.bias),
                in_shape=(geo.in_channels,) + geo.input_size, out_shape=(geo.out_channels, Ho, Wo),
                backend=backend, dtype=w.dtype, device=w.device)
        m.geometry, m.halo = geo, halo
        return m

    @classmethod
    def from_dense(cls, weight: Tensor, block_shape: Tuple[int, int], mask: Optional[Tensor] = None,
                   bias=False, backend: Optional[str] = None) -> "SparseEFCN":
        """Store the blocks of a dense (M, N) weight that hold non-zeros (or True entries of ``mask``)."""
        layout, values = BSRLayout.from_dense(weight.detach(), block_shape, mask)
        return cls(layout, values, bias=bias, backend=backend, dtype=weight.dtype, device=weight.device)

    # ------------------------------------------------------------------ structure
    @property
    def layout(self) -> BSRLayout:
        return BSRLayout(self.shape, self.block_shape, **{f: getattr(self, f) for f in INDEX_FIELDS + MASK_FIELDS})

    @property
    def nnzb(self) -> int:
        return self.values.shape[0]

    def to_dense(self, max_bytes: Optional[int] = None) -> Tensor:
        """The (M, N) weight matrix in the package's flattening convention."""
        return self.layout.to_dense(self.values.detach(), max_bytes=max_bytes)

    def extra_repr(self) -> str:
        M, N = self.shape
        BR, BC = self.block_shape
        lay = self.layout
        stored = lay.stored_entries()
        nbytes = self.values.numel() * self.values.element_size() + sum(
            t.numel() * t.element_size() for t in lay.tensors().values() if t is not None)
        s = (f"shape=({M}, {N}), block_shape=({BR}, {BC}), nnzb={self.nnzb}, stored={stored}, "
             f"density={stored / max(M * N, 1):.4g}, bytes={nbytes}, bias={self.bias is not None}")
        if self.in_shape is not None:
            s += f", in_shape={self.in_shape}, out_shape={self.out_shape}"
        if self.halo is not None:
            s += f", halo={self.halo!r}"
        if self.backend is not None:
            s += f", backend={self.backend!r}"
        return s

    # ------------------------------------------------------------------ forward
    def _flatten(self, x: Tensor) -> Tuple[Tensor, bool]:
        M, N = self.shape
        if x.dim() == 4:
            if self.in_shape is None:
                raise ValueError(f"this SparseEFCN has no image shape: expected flat input [B, {N}], got {tuple(x.shape)}")
            if tuple(x.shape[1:]) != self.in_shape:
                raise ValueError(f"expected input [B, {', '.join(map(str, self.in_shape))}] (C, H, W), got {tuple(x.shape)}")
            return x.permute(0, 2, 3, 1).reshape(x.shape[0], N), True  # free for channels_last input
        if x.dim() == 2:
            if x.shape[1] != N:
                raise ValueError(f"expected flat input [B, {N}], got {tuple(x.shape)}")
            return x, False
        img = f" or [B, {', '.join(map(str, self.in_shape))}]" if self.in_shape is not None else ""
        raise ValueError(f"expected input [B, {N}]{img}, got a {x.dim()}-D tensor of shape {tuple(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
        if x.dtype != self.values.dtype and autocast_dtype(x.device) is None:
            raise TypeError(f"input dtype {x.dtype} does not match the layer's dtype {self.values.dtype}")
        if x.device != self.values.device:
            raise RuntimeError(f"input on device {x.device}, but the layer is on device {self.values.device}")
        flat, image = self._flatten(x)
        y = linear(flat, self.layout, self.values, self.bias, backend=self.backend, accumulate_grad=self.accumulate_grad)
        if not image:
            return y
        C, Ho, Wo = self.out_shape
        return y.view(x.shape[0], Ho, Wo, C).permute(0, 3, 1, 2)  # channels_last view, no copy

    # ------------------------------------------------------------------ state
    def get_extra_state(self):
        return {"shape": self.shape, "block_shape": self.block_shape, "in_shape": self.in_shape,
                "out_shape": self.out_shape, "halo": self.halo,
                "geometry": None if self.geometry is None else self.geometry.to_dict()}

    def set_extra_state(self, state) -> None:
        if tuple(state["shape"]) != tuple(self.shape) or tuple(state["block_shape"]) != tuple(self.block_shape):
            raise ValueError(f"state_dict is for a SparseEFCN of shape {tuple(state['shape'])} with blocks "
                             f"{tuple(state['block_shape'])}, this one has {self.shape} and {self.block_shape}")
        self.in_shape = tuple(state["in_shape"]) if state["in_shape"] is not None else None
        self.out_shape = tuple(state["out_shape"]) if state["out_shape"] is not None else None
        self.halo = state["halo"]
        self.geometry = None if state["geometry"] is None else ConvGeometry.from_dict(state["geometry"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the layout buffers may differ in size from this module's (loading into a blank layer)
        for f in INDEX_FIELDS + MASK_FIELDS + ("values",):
            t = state_dict.get(prefix + f)
            cur = getattr(self, f, None)
            if t is not None and cur is not None and t.shape != cur.shape:
                if f == "values":
                    self.values = nn.Parameter(torch.empty_like(t, device=cur.device, dtype=cur.dtype))
                else:
                    setattr(self, f, torch.empty_like(t, device=cur.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
