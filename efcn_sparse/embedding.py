"""Whole-network embedding: every ``nn.Conv2d`` of a model replaced by its eFCN (``SparseEFCN``).

``embed`` keeps the function (the paper's eFCN at the relax time); ``fcn_like`` builds the same
structure with fresh weights (the paper's FCN baseline). Both find each conv's input size with a
shape probe (forward pre-hooks, one forward of a zero batch in eval mode), so any ``nn.Module``
works: nested, residual, shared sub-modules. Everything that is not a conv stays as it is.
"""

from __future__ import annotations

import copy
import warnings
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from .conv_geometry import ConvGeometry, Halo, build_layout, check_halo
from .layout import memory_budget_bytes
from .module import SparseEFCN

__all__ = ["embed", "fcn_like", "conv_input_sizes"]

BlockShape = Optional[Union[Tuple[int, int], Dict[str, Tuple[int, int]]]]


def _check_input_shape(input_shape) -> Tuple[int, int, int]:
    try:
        shp = tuple(int(s) for s in input_shape)
    except TypeError:
        shp = ()
    if len(shp) != 3 or min(shp) <= 0:
        raise ValueError(f"input_shape: expected (C, H, W) without the batch dimension, got {input_shape!r}")
    return shp


def _first_tensor(model: nn.Module):
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t
    return None


def _conv_paths(model: nn.Module) -> Dict[int, Tuple[nn.Conv2d, List[str]]]:
    """id(conv) -> (conv, every path it is registered under)."""
    out: Dict[int, Tuple[nn.Conv2d, List[str]]] = {}
    for path, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, nn.Conv2d):
            out.setdefault(id(m), (m, []))[1].append(path or "<model>")
    return out


def conv_input_sizes(model: nn.Module, input_shape) -> Dict[str, Tuple[int, int]]:
    """Path -> (H, W) of the input each ``nn.Conv2d`` sees for ``input_shape`` = (C, H, W) images.

    Runs one forward of a zero batch in eval mode under ``no_grad`` (the RNG and BatchNorm running
    statistics are untouched; train/eval flags are restored). A conv called at several input sizes
    raises ``ValueError`` naming it; a conv never called is left out (with a warning).
    """
    shp = _check_input_shape(input_shape)
    convs = _conv_paths(model)
    seen: Dict[int, set] = {}

    def hook(mod, args, kwargs):
        x = args[0] if args else kwargs.get("input")
        if isinstance(x, torch.Tensor) and x.dim() >= 3:
            seen.setdefault(id(mod), set()).add(tuple(int(s) for s in x.shape[-2:]))

    handles = [conv.register_forward_pre_hook(hook, with_kwargs=True) for conv, _ in convs.values()]
    modes = {m: m.training for m in model.modules()}
    ref = _first_tensor(model)
    x = torch.zeros((2,) + shp, dtype=ref.dtype if ref is not None else None,
                    device=ref.device if ref is not None else None)
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    except Exception as e:
        raise RuntimeError(f"shape probe failed: the model's forward on a [2, {shp[0]}, {shp[1]}, {shp[2]}] input "
                           f"raised {type(e).__name__}: {e}") from e
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.training = t
    sizes: Dict[str, Tuple[int, int]] = {}
    unused = []
    for key, (conv, paths) in convs.items():
        s = seen.get(key)
        if not s:
            unused.append(paths[0])
            continue
        if len(s) > 1:
            raise ValueError(f"conv '{' = '.join(paths)}' is called at several input sizes {sorted(s)}: its eFCN is "
                             f"built for one input size; give each call its own nn.Conv2d")
        for p in paths:
            sizes[p] = next(iter(s))
    if unused:
        warnings.warn(f"conv(s) {', '.join(unused)} not called during the shape probe: left as nn.Conv2d", stacklevel=3)
    return sizes


def _block_shape_for(block_shape: BlockShape, path: str):
    if isinstance(block_shape, dict):
        return block_shape.get(path)
    return block_shape


def _swap(model: nn.Module, input_shape, make: Callable[[nn.Conv2d, Tuple[int, int], str], nn.Module],
          finish: Optional[Callable[[nn.Module], object]] = None) -> nn.Module:
    """Replace (in place) every probed conv of ``model`` by ``make(conv, (H, W), path)``, then
    ``finish(new)`` (before the next one is built)."""
    sizes = conv_input_sizes(model, input_shape)
    convs = _conv_paths(model)
    root = None
    for conv, paths in convs.values():
        if paths[0] not in sizes:
            continue
        new = make(conv, sizes[paths[0]], paths[0])
        new.train(conv.training)
        if not conv.weight.requires_grad:
            new.requires_grad_(False)
        if finish is not None:
            finish(new)
        for path in paths:
            if path == "<model>":
                root = new
                continue
            parent_path, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent_path), name, new)
    return root if root is not None else model


def embed(model: nn.Module, input_shape, halo: Halo = 0, block_shape: BlockShape = None,
          backend: Optional[str] = None, finish_layer: Optional[Callable[[SparseEFCN], object]] = None) -> nn.Module:
    """A copy of ``model`` computing the same function with every ``nn.Conv2d`` replaced by its eFCN.

    Args:
        model: any ``nn.Module`` (left untouched).
        input_shape: (C, H, W) of one input image (no batch dimension).
        halo: 0 (receptive fields only: the eLCN), an int h (h extra pixels around them, trainable,
            starting at zero) or ``"full"`` (every block: the paper's eFCN).
        block_shape: None (automatic), one (BR, BC) for all layers, or a dict path -> (BR, BC).
        backend: kernel backend of the new layers (None: the global default).
        finish_layer: called on each new layer as soon as it is built, e.g.
            ``efcn_sparse.sharding.shard_layer``: then one whole layer at a time exists on this rank.

    Each ``SparseEFCN`` is built for the input size its conv sees (shape probe); the outputs are
    channels_last views, so a ``forward`` that flattens with ``x.view(B, -1)`` must use
    ``flatten``/``reshape`` instead.
    """
    halo = check_halo(halo)
    model = copy.deepcopy(model)
    return _swap(model, input_shape, lambda conv, size, path: SparseEFCN.from_conv(
        conv, size, halo=halo, block_shape=_block_shape_for(block_shape, path), backend=backend), finish_layer)


def _fresh_efcn(conv: nn.Conv2d, size, halo: Halo, block_shape, backend, generator) -> SparseEFCN:
    geo = ConvGeometry.from_conv(conv, size)
    w = conv.weight

    def check_fits(entries: int) -> None:
        if entries * w.element_size() > memory_budget_bytes():
            raise MemoryError(f"the FCN of {conv} on {geo.input_size} inputs with halo={halo!r} would store "
                              f"{entries * w.element_size() / 2**30:.2f} GiB of values, over the "
                              f"{memory_budget_bytes() / 2**30:.2f} GiB budget; use a smaller halo or input")

    if halo == "full":
        check_fits(geo.out_features * geo.in_features)
    layout = build_layout(geo, halo, block_shape)
    BR, BC = layout.block_shape
    check_fits(layout.nnzb * BR * BC)
    # nn.Linear's init per row: weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = trainable inputs
    fan = SparseEFCN._fan_in(layout).double()  # [M]
    bound = 1.0 / fan.clamp(min=1).sqrt()
    rows = layout.row_idx.long()[:, None] * BR + torch.arange(BR)[None, :]  # [nnzb, BR]
    row_bound = torch.nn.functional.pad(bound, (0, layout.n_block_rows * BR - bound.numel()))[rows]
    cd = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
    values = torch.rand(layout.nnzb, BR, BC, generator=generator, dtype=cd).mul_(2).sub_(1)
    values = values.mul_(row_bound[:, :, None].to(cd)).to(w.dtype)
    bias = False
    if conv.bias is not None:
        bias = ((torch.rand(bound.numel(), generator=generator, dtype=torch.float64) * 2 - 1) * bound).to(w.dtype)
    Ho, Wo = geo.out_size
    m = SparseEFCN(layout.to(w.device), values.to(w.device), bias=bias, in_shape=(geo.in_channels,) + geo.input_size,
                   out_shape=(geo.out_channels, Ho, Wo), backend=backend, dtype=w.dtype, device=w.device)
    m.geometry, m.halo = geo, halo
    return m


def fcn_like(model: nn.Module, input_shape, halo: Halo = "full", block_shape: BlockShape = None,
             backend: Optional[str] = None, generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
             reset_others: bool = True, finish_layer: Optional[Callable[[SparseEFCN], object]] = None) -> nn.Module:
    """The eFCN structure of ``model`` with fresh weights: the paper's "FCN of the same architecture".

    Each conv becomes a ``SparseEFCN`` with the layout ``embed`` would give it, initialised as
    ``nn.Linear`` would be with fan-in = the row's trainable inputs (weights and bias uniform in
    +-1/sqrt(fan_in)). With ``reset_others`` every other module with ``reset_parameters`` (Linear,
    BatchNorm, ...) is re-initialised too, so the result is a network trained from scratch.
    Randomness: ``seed`` or ``generator`` make it reproducible without touching the global RNG;
    with neither, the global RNG is used. ``finish_layer``: as in :func:`embed`.
    """
    halo = check_halo(halo)
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(int(seed))
    model = copy.deepcopy(model)
    sub_seed = None if generator is None else int(torch.randint(0, 2**62, (1,), generator=generator))
    devs = sorted({t.device.index or 0 for t in model.parameters() if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=devs, enabled=sub_seed is not None):
        if sub_seed is not None:
            torch.manual_seed(sub_seed)
        if reset_others:
            for m in model.modules():
                if not isinstance(m, (nn.Conv2d, SparseEFCN)) and callable(getattr(m, "reset_parameters", None)):
                    m.reset_parameters()
        return _swap(model, input_shape, lambda conv, size, path: _fresh_efcn(
            conv, size, halo, _block_shape_for(block_shape, path), backend, generator), finish_layer)
