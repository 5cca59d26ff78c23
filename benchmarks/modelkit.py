"""Whole-model helpers for the benchmarks: the paper's CNN and AlexNet (from ``efcn_sparse.models``)
as the CNN, the sparse eFCN (``efcn_sparse.embed``, halo 0) and the authors' dense eFCN
(``nn.Linear`` on each conv's dense matrix); one SGD training step; and exact stored-entry counts
for any input size without building anything (for the largest eFCN that fits in memory).

No relative imports: ``memprobe.py`` loads this as a top-level module in a subprocess.
"""

from __future__ import annotations

import copy
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

VARIANTS = ("cnn", "efcn_sparse", "efcn_dense")


def import_models():
    """(paper_cnn, alexnet, embed, conv_input_sizes); ImportError naming what is missing (issue 4)."""
    from efcn_sparse.models import alexnet, paper_cnn  # noqa: F401

    try:
        from efcn_sparse import embed
    except ImportError:
        from efcn_sparse.embedding import embed
    from efcn_sparse.embedding import conv_input_sizes

    return paper_cnn, alexnet, embed, conv_input_sizes


def model_config(name: str, full: bool) -> dict:
    """Constructor kwargs, input shape (C, H, W) and batch of a benchmarked model."""
    width = 64 if full else 4
    batch = 128 if full else 4
    kw = dict(width=width, in_channels=3, image_size=32, num_classes=10)
    return dict(kwargs=kw, input_shape=(3, 32, 32), batch=batch)


def build_cnn(name: str, kwargs: dict) -> nn.Module:
    paper_cnn, alexnet, _, _ = import_models()
    return (paper_cnn if name == "paper_cnn" else alexnet)(**kwargs)


class DenseEFCN(nn.Module):
    """The authors' eFCN of one conv: ``nn.Linear`` on the dense (M, N) matrix, NHWC-flat features."""

    def __init__(self, sparse):
        super().__init__()
        M, N = sparse.shape
        self.in_shape, self.out_shape = sparse.in_shape, sparse.out_shape
        self.linear = nn.Linear(N, M, bias=sparse.bias is not None, dtype=sparse.values.dtype,
                                device=sparse.values.device)
        with torch.no_grad():
            self.linear.weight.copy_(sparse.to_dense(max_bytes=1 << 62))
            if sparse.bias is not None:
                self.linear.bias.copy_(sparse.bias)

    def forward(self, x):
        B = x.shape[0]
        y = self.linear(x.permute(0, 2, 3, 1).reshape(B, -1))
        C, Ho, Wo = self.out_shape
        return y.view(B, Ho, Wo, C).permute(0, 3, 1, 2)


def densify(model: nn.Module) -> nn.Module:
    """Replace (in place) every SparseEFCN of ``model`` by its DenseEFCN, freeing each sparse one."""
    from efcn_sparse import SparseEFCN

    for path, m in list(model.named_modules()):
        if isinstance(m, SparseEFCN):
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, name, DenseEFCN(m))
    return model


def make_variant(variant: str, cnn: nn.Module, input_shape, backend=None) -> nn.Module:
    """The CNN itself, its sparse eFCN (halo 0) or the dense eFCN; all compute the same function."""
    if variant == "cnn":
        return copy.deepcopy(cnn)
    _, _, embed, _ = import_models()
    m = embed(cnn, input_shape, halo=0, backend=backend)
    return densify(m) if variant == "efcn_dense" else m


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               autocast: Optional[torch.dtype] = None) -> torch.Tensor:
    """One SGD step on cross-entropy (the forward under ``torch.autocast(autocast)`` if given);
    returns the loss (detached)."""
    opt.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        loss = F.cross_entropy(model(x).float(), y)
    loss.backward()
    opt.step()
    return loss.detach()


def param_bytes(model: nn.Module) -> Tuple[int, int]:
    """(parameter bytes, buffer bytes): the weights and the layout index tensors."""
    p = sum(t.numel() * t.element_size() for t in model.parameters())
    b = sum(t.numel() * t.element_size() for t in model.buffers())
    return p, b


# ----------------------------------------------------------------------------- counts without building
def _axis_pairs(n_in: int, n_out: int, k: int, s: int, d: int, before: int, halo) -> int:
    """(output, input) coordinate pairs along one axis stored for zero padding: taps inside the input,
    or the halo box around them; 'full' is every pair."""
    if halo == "full":
        return n_out * n_in
    o = torch.arange(n_out, dtype=torch.int64)
    if halo == 0:
        i = o[:, None] * s - before + torch.arange(k)[None, :] * d
        return int(((i >= 0) & (i < n_in)).sum())
    lo = (o * s - before - halo).clamp(min=0)
    hi = (o * s - before + d * (k - 1) + halo).clamp(max=n_in - 1)
    return int((hi - lo + 1).clamp(min=0).sum())


def conv_entries(conv: nn.Conv2d, size: Tuple[int, int], halo) -> Dict[str, int]:
    """Exact stored (trainable) entries of the eFCN of ``conv`` (zero padding) and its dense M x N."""
    from efcn_sparse.conv_geometry import ConvGeometry

    if conv.padding_mode != "zeros":
        raise ValueError("counts assume zero padding")
    geo = ConvGeometry.from_conv(conv, size)
    pairs = 1
    for ax in (0, 1):
        pairs *= _axis_pairs(geo.input_size[ax], geo.out_size[ax], geo.kernel_size[ax], geo.stride[ax],
                             geo.dilation[ax], (geo.pad_h, geo.pad_w)[ax][0], halo)
    per_pair = geo.out_channels * geo.in_channels // geo.groups
    return {"stored": pairs * per_pair, "dense": geo.out_features * geo.in_features,
            "M": geo.out_features, "N": geo.in_features}


def model_entries(name: str, kwargs: dict, image_size: int, halo) -> Dict[str, int]:
    """Stored and dense entries over all convs of a model at ``image_size`` (built on the meta device)."""
    _, _, _, conv_input_sizes = import_models()
    kw = dict(kwargs, image_size=image_size)
    with torch.device("meta"):
        m = build_cnn(name, kw)
    sizes = conv_input_sizes(m, (kw["in_channels"], image_size, image_size))
    tot = {"stored": 0, "dense": 0}
    for path, size in sizes.items():
        c = conv_entries(m.get_submodule(path), size, halo)
        tot["stored"] += c["stored"]
        tot["dense"] += c["dense"]
    return tot
