"""Parameter and memory table of a CNN's eFCN: why the dense eFCN cannot scale, what the sparse one costs.

``summary(model, input_shape)`` works on a CNN (it counts what ``embed(model, input_shape, halo)``
would store, from the geometry alone where the count is analytic) and on an embedded model (it
reads the layers). Counts include the biases (the eFCN's bias is untied: one per output position).

With ``world_size`` (or ``optimizer``) it also gives a memory plan (:class:`MemoryPlan`): the bytes
each rank holds when the eFCN trains sharded by FSDP over that many ranks (``efcn_sparse.shard``).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from .conv_geometry import ConvGeometry, Halo, build_layout, check_halo, choose_block_shape
from .embedding import _block_shape_for, conv_input_sizes
from .module import SparseEFCN

__all__ = ["summary", "Summary", "MemoryPlan"]

COLUMNS = ("layer", "kind", "in_shape", "out_shape", "halo", "block_shape", "cnn_params", "dense_params", "stored",
           "local", "nnzb", "density", "bytes", "dense_bytes")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _local_pairs(geo: ConvGeometry) -> int:
    po, pi, _, _ = geo.local_taps()
    P_in = geo.input_size[0] * geo.input_size[1]
    return int(torch.unique(po * P_in + pi).numel())


def _index_bytes(nbr: int, nbc: int, nnzb: int, n_patterns: Optional[int], block) -> int:
    """int32 crow/ccol pointers, col/row/t_row/t_perm per block, and the mask (ids + bool patterns)."""
    b = 4 * (nbr + 1 + nbc + 1 + 4 * nnzb)
    if n_patterns is not None:
        b += 4 * nnzb + n_patterns * block[0] * block[1]
    return b


def _conv_counts(geo: ConvGeometry, halo: Halo, block_shape) -> dict:
    """What ``build_layout(geo, halo, block_shape)`` stores, analytically where possible:
    nnzb, trainable weight entries, index/mask bytes, block shape."""
    Cout, Cin, g = geo.out_channels, geo.in_channels, geo.groups
    cig = Cin // g
    M, N = geo.out_features, geo.in_features
    BR, BC = block_shape if block_shape is not None else choose_block_shape(geo, halo)
    nbr, nbc = _cdiv(M, BR), _cdiv(N, BC)
    P_out, P_in = geo.out_size[0] * geo.out_size[1], geo.input_size[0] * geo.input_size[1]
    if Cout % BR == 0 and Cin % BC == 0:  # pixel-aligned tiles: every support pair holds its in-group tiles
        n_pairs = P_out * P_in if halo == "full" else int(geo.support_pairs(halo).numel())
        ta, tb = Cout // BR, Cin // BC
        co, ci = torch.arange(Cout), torch.arange(Cin)
        ok = ((co[:, None] // (Cout // g)) == (ci[None, :] // cig)).reshape(ta, BR, tb, BC)
        in_group = ok.any(3).any(1)  # [ta, tb] tiles holding in-group entries: stored
        tiles = int(in_group.sum())
        masked = not bool(ok.all(3).all(1)[in_group].all())  # tiles that do not follow the groups
        nnzb = n_pairs * tiles
        return dict(nnzb=nnzb, weights=n_pairs * Cout * cig, block=(BR, BC),
                    index_bytes=_index_bytes(nbr, nbc, nnzb, ta * tb if masked else None, (BR, BC)))
    if halo == "full" and g == 1:  # every block, masked only where it sticks out of the matrix
        row_types = (1 if M % BR == 0 else 1 + (nbr > 1))
        col_types = (1 if N % BC == 0 else 1 + (nbc > 1))
        nnzb = nbr * nbc
        patterns = row_types * col_types if row_types * col_types > 1 else None  # all blocks whole: no mask
        return dict(nnzb=nnzb, weights=M * N, block=(BR, BC),
                    index_bytes=_index_bytes(nbr, nbc, nnzb, patterns, (BR, BC)))
    lay = build_layout(geo, halo, (BR, BC))  # few-channel layer: the layout is small
    return dict(nnzb=lay.nnzb, weights=lay.stored_entries(), block=(BR, BC),
                index_bytes=sum(t.numel() * t.element_size() for t in lay.tensors().values() if t is not None))


class Summary:
    """A table: ``rows`` (list of dicts, one per conv/eFCN layer, then "(other)" for the remaining
    parameters) and ``total`` (dict). Columns:

    * ``cnn_params``: the conv's weights + bias; ``dense_params``: the dense eFCN's M*N + M;
    * ``stored``: trainable entries the sparse eFCN stores (+ bias); ``local``: those on the
      receptive fields (+ bias); ``nnzb``: stored blocks; ``density``: stored / dense_params;
    * ``bytes``: what the sparse eFCN holds (values, bias, index and mask arrays);
      ``dense_bytes``: what the dense eFCN would hold.
    """

    def __init__(self, rows: List[dict], total: dict, plan: Optional["MemoryPlan"] = None):
        self.rows = rows
        self.total = total
        self.plan = plan

    def to_dict(self) -> dict:
        d = {"rows": [dict(r) for r in self.rows], "total": dict(self.total)}
        if self.plan is not None:
            d["plan"] = self.plan.at(self.plan.world_size)
        return d

    def __str__(self) -> str:
        def num(v):
            return "-" if v is None else f"{v:,}"

        def nbytes(v):
            if v is None:
                return "-"
            for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
                if v < 1024 or unit == "TiB":
                    return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
                v /= 1024

        def shape(s):
            return "-" if s is None else "x".join(map(str, s))

        head = ("layer", "kind", "in -> out", "halo", "block", "CNN params", "dense eFCN", "stored", "local",
                "density", "bytes", "dense bytes")
        lines = []
        for r in self.rows + [self.total]:
            io = "-" if r.get("in_shape") is None else f"{shape(r['in_shape'])} -> {shape(r['out_shape'])}"
            lines.append((r["layer"], r["kind"], io, "-" if r.get("halo") is None else str(r["halo"]),
                          shape(r.get("block_shape")), num(r["cnn_params"]), num(r["dense_params"]), num(r["stored"]),
                          num(r["local"]), f"{r['density']:.4g}", nbytes(r["bytes"]), nbytes(r["dense_bytes"])))
        widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
        fmt = lambda row: "  ".join(c.ljust(w) if i < 5 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
        rule = "-" * len(fmt(head))
        table = "\n".join([fmt(head), rule] + [fmt(l) for l in lines[:-1]] + [rule, fmt(lines[-1])])
        return table if self.plan is None else table + "\n\n" + str(self.plan)

    def __repr__(self) -> str:
        return str(self)


OPTIMIZER_STATES = {None: 0, "none": 0, "sgd": 1, "adam": 2}


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


class MemoryPlan:
    """Per-rank bytes of training an eFCN sharded by FSDP2 over ``world_size`` ranks (``shard``):
    one FSDP unit per eFCN layer, the root unit holding every other parameter.

    Each parameter is split along its first dimension (padded to a multiple of the world size);
    ``weights`` is a rank's shard plus the replicated layout (index and mask arrays) and buffers;
    ``gradients`` the sharded gradients (same dtype); ``optimizer_state`` 0 (plain SGD), 1 (SGD
    momentum: ``"sgd"``) or 2 (``"adam"``) tensors of the shard's size; ``largest_gathered`` the
    biggest layer all-gathered in the compute dtype (``param_dtype``). ``peak_bytes`` adds to the
    resident part the root unit gathered and three copies of the largest layer in flight (the layer
    computing, the next one prefetched, an unsharded gradient before its reduce-scatter).
    Activations are not counted. With ``world_size`` 1 nothing is sharded or gathered.
    FSDP never splits a layer: when one layer alone does not fit a device, no world size helps
    (:meth:`needed_world_size` returns None).
    """

    def __init__(self, units: List[dict], replicated_bytes: int, world_size: int, optimizer: Optional[str],
                 dtype: Optional[torch.dtype], param_dtype: Optional[torch.dtype]):
        self.units, self.replicated_bytes = units, replicated_bytes
        self.world_size, self.optimizer, self.dtype, self.param_dtype = world_size, optimizer, dtype, param_dtype
        self.n_states = OPTIMIZER_STATES[optimizer]
        for k, v in self.at(world_size).items():
            setattr(self, k, v)

    def at(self, world_size: int) -> dict:
        """The plan's numbers (bytes per rank) for ``world_size`` ranks."""
        n = int(world_size)
        if n < 1:
            raise ValueError(f"world_size: expected >= 1, got {world_size}")
        shard = 0
        gathered = {}
        for u in self.units:
            for shape, es, cs in u["params"]:
                d0, rest = (shape[0], math.prod(shape[1:])) if shape else (1, 1)
                shard += -(-d0 // n) * rest * es
                gathered[u["name"]] = gathered.get(u["name"], 0) + (-(-d0 // n) * n * rest * cs if n > 1 else 0)
        root = gathered.pop("(other)", 0)
        name, largest = max(gathered.items(), key=lambda kv: kv[1], default=(None, 0))
        if n == 1:
            name = max(((u["name"], sum(math.prod(s) * es for s, es, _ in u["params"])) for u in self.units
                        if u["name"] != "(other)"), key=lambda kv: kv[1], default=(None, 0))[0]
        weights = shard + self.replicated_bytes
        gathered_peak = root + 3 * largest
        return dict(world_size=n, weights=weights, gradients=shard, optimizer_state=self.n_states * shard,
                    largest_layer=name, largest_gathered=largest, gathered_peak=gathered_peak,
                    peak_bytes=weights + shard + self.n_states * shard + gathered_peak)

    def needed_world_size(self, capacity: int, max_world: int = 4096) -> Optional[int]:
        """The smallest world size up to ``max_world`` whose ``peak_bytes`` fits ``capacity`` bytes
        per rank; None when none does (the replicated part or one gathered layer alone is too big).
        A linear scan: padding to multiples of the world size makes the peak not quite monotone."""
        for n in range(1, max_world + 1):
            if self.at(n)["peak_bytes"] <= capacity:
                return n
        return None

    def __str__(self) -> str:
        d = self.at(self.world_size)
        dt = lambda t: "as stored" if t is None else str(t).replace("torch.", "")  # noqa: E731
        how = "FSDP" if d["world_size"] > 1 else "unsharded"
        return (f"memory plan per rank on {d['world_size']} rank(s) ({how}, optimizer {self.optimizer or 'none'}, "
                f"dtype {dt(self.dtype)}, compute {dt(self.param_dtype)}): weights {_gib(d['weights'])}, gradients "
                f"{_gib(d['gradients'])}, optimizer state {_gib(d['optimizer_state'])}, largest gathered layer "
                f"{_gib(d['largest_gathered'])} ({d['largest_layer']}); peak about {_gib(d['peak_bytes'])} "
                "without activations")

    def __repr__(self) -> str:
        return str(self)


def _row(layer, kind, in_shape, out_shape, halo, block, cnn, dense, stored, local, nnzb, nbytes, dense_bytes) -> dict:
    return dict(layer=layer, kind=kind, in_shape=in_shape, out_shape=out_shape, halo=halo, block_shape=block,
                cnn_params=cnn, dense_params=dense, stored=stored, local=local, nnzb=nnzb,
                density=stored / dense if dense else 0.0, bytes=nbytes, dense_bytes=dense_bytes)


def summary(model: nn.Module, input_shape=None, halo: Halo = 0, block_shape=None, world_size: Optional[int] = None,
            optimizer: Optional[str] = None, dtype: Optional[torch.dtype] = None,
            param_dtype: Optional[torch.dtype] = None) -> Summary:
    """Per-layer and total parameter and memory counts of ``model``'s eFCN.

    ``nn.Conv2d`` layers are counted as ``embed(model, input_shape, halo, block_shape)`` would
    store them (``input_shape`` = (C, H, W) is needed for them); ``SparseEFCN`` layers as they are.
    Nothing is built: a full eFCN far past this machine's memory is counted from its geometry.

    ``dtype``: the parameters' dtype (default: as they are). With ``world_size`` or ``optimizer``
    (None: plain SGD, ``"sgd"``: with momentum, ``"adam"``) the result's ``.plan`` is the
    :class:`MemoryPlan` of training sharded by FSDP over ``world_size`` ranks (default 1),
    gathering layers in ``param_dtype`` (default ``dtype``).
    """
    halo = check_halo(halo)
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer: expected None, 'sgd' (with momentum) or 'adam', got {optimizer!r}")
    if world_size is not None and (not isinstance(world_size, int) or world_size < 1):
        raise ValueError(f"world_size: expected an integer >= 1, got {world_size!r}")
    for name, d in (("dtype", dtype), ("param_dtype", param_dtype)):
        if d is not None and not (isinstance(d, torch.dtype) and d.is_floating_point):
            raise ValueError(f"{name}: expected a floating torch.dtype, got {d!r}")
    units: List[dict] = []
    replicated = 0

    def sizes_of(es_here: int):
        es = dtype.itemsize if dtype is not None else es_here
        return es, (param_dtype.itemsize if param_dtype is not None else es)

    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    sizes: Dict[str, tuple] = {}
    if convs:
        if input_shape is None:
            raise ValueError("summary: input_shape (C, H, W) is needed to count the eFCN of a model with nn.Conv2d layers")
        sizes = conv_input_sizes(model, input_shape)
    rows, counted = [], set()
    for path, m in model.named_modules():
        path = path or "<model>"
        if isinstance(m, nn.Conv2d) and path in sizes:
            geo = ConvGeometry.from_conv(m, sizes[path])
            c = _conv_counts(geo, halo, _block_shape_for(block_shape, path))
            es, cs = sizes_of(m.weight.element_size())
            nb = 0 if m.bias is None else geo.out_features
            cnn = sum(p.numel() for p in m.parameters(recurse=False))
            local = _local_pairs(geo) * geo.out_channels * (geo.in_channels // geo.groups) + nb
            rows.append(_row(path, "conv", (geo.in_channels,) + geo.input_size, (geo.out_channels,) + geo.out_size, halo,
                             c["block"], cnn, geo.out_features * geo.in_features + nb, c["weights"] + nb, local,
                             c["nnzb"], (c["nnzb"] * c["block"][0] * c["block"][1] + nb) * es + c["index_bytes"],
                             (geo.out_features * geo.in_features + nb) * es))
            shapes = [(c["nnzb"],) + tuple(c["block"])] + ([(geo.out_features,)] if nb else [])
            units.append(dict(name=path, params=[(s, es, cs) for s in shapes]))
            replicated += c["index_bytes"]
        elif isinstance(m, SparseEFCN):
            lay = m.layout
            M, N = m.shape
            es, cs = sizes_of(m.values.element_size())
            nb = 0 if m.bias is None else M
            index_bytes = sum(t.numel() * t.element_size() for t in lay.tensors().values() if t is not None)
            nbytes = (m.values.numel() + nb) * es + index_bytes
            units.append(dict(name=path, params=[(tuple(t.shape), es, cs) for t in (m.values, m.bias)
                                                 if t is not None]))
            replicated += index_bytes
            geo = m.geometry
            cnn = local = None
            if geo is not None:
                cnn = geo.out_channels * (geo.in_channels // geo.groups) * geo.kernel_size[0] * geo.kernel_size[1]
                cnn += 0 if m.bias is None else geo.out_channels
                local = _local_pairs(geo) * geo.out_channels * (geo.in_channels // geo.groups) + nb
            rows.append(_row(path, "efcn" if geo is not None else "sparse", m.in_shape, m.out_shape, m.halo,
                             tuple(m.block_shape), cnn, M * N + nb, lay.stored_entries() + nb, local, m.nnzb,
                             nbytes, (M * N + nb) * es))
        else:
            continue
        counted.update(id(p) for p in m.parameters(recurse=False))
    other = [p for p in model.parameters() if id(p) not in counted]
    if other:
        n = sum(p.numel() for p in other)
        nbytes = sum(p.numel() * sizes_of(p.element_size())[0] for p in other)
        units.append(dict(name="(other)", params=[(tuple(p.shape),) + sizes_of(p.element_size()) for p in other]))
        rows.append(_row("(other)", "other", None, None, None, None, n, n, n, n, None, nbytes, nbytes))
    keys = ("cnn_params", "dense_params", "stored", "local", "nnzb", "bytes", "dense_bytes")
    tot = {k: sum(r[k] for r in rows if r[k] is not None) for k in keys}
    total = _row("total", "", None, None, None, None, tot["cnn_params"], tot["dense_params"], tot["stored"],
                 tot["local"], tot["nnzb"], tot["bytes"], tot["dense_bytes"])
    plan = None
    if world_size is not None or optimizer is not None:
        layout_buffers = {id(b) for m in model.modules() if isinstance(m, SparseEFCN) for b in m.buffers(recurse=False)}
        replicated += sum(b.numel() * b.element_size() for b in model.buffers() if id(b) not in layout_buffers)
        plan = MemoryPlan(units, replicated, world_size or 1, optimizer, dtype, param_dtype)
    return Summary(rows, total, plan)
