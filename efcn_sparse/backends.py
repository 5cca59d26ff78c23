"""Backend selection: which kernel implementation runs the three ops.

Backends: ``reference`` (pure PyTorch, any device), ``cpu`` (C++ extension, CPU tensors),
``cuda`` (CUDA C++ extension), ``triton`` (Triton; CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``). ``auto`` picks per device, op and shape class: see :func:`resolve`
(a rule, or a table measured once per GPU model by :func:`tune`).

A kernel module exposes ``forward``, ``grad_input``, ``grad_weight`` (contract in
``efcn_sparse.kernels``) and ``unavailable_reason(device) -> Optional[str]``.
"""

from __future__ import annotations

import importlib
import json
import os
from types import ModuleType
from typing import Dict, List, Optional, Tuple

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")
CHOICES = ("auto",) + BACKENDS

_MODULES = {
    "reference": "efcn_sparse.kernels.reference",
    "cpu": "efcn_sparse.kernels.cpu",
    "cuda": "efcn_sparse.kernels.cuda",
    "triton": "efcn_sparse.kernels.triton_bsr",
}
_loaded: Dict[str, ModuleType] = {}
_default = os.environ.get("EFCN_BACKEND", "auto")


class BackendUnavailable(RuntimeError):
    """A backend was asked for that cannot run here (with the reason)."""


def _module(name: str) -> ModuleType:
    """The kernel module of ``name``. A missing optional dependency (the compiled extension,
    triton) is handled inside the module, which then reports itself unavailable; any error while
    importing it is a bug in the package and propagates instead of hiding as "unavailable"."""
    if name not in _loaded:
        _loaded[name] = importlib.import_module(_MODULES[name])
    return _loaded[name]


def check_name(name: str) -> str:
    if name not in CHOICES:
        raise ValueError(f"unknown backend {name!r}: expected one of {', '.join(CHOICES)}")
    return name


def unavailable_reason(name: str, device) -> Optional[str]:
    """None when backend ``name`` can run on ``device``, else why not."""
    check_name(name)
    if name == "auto":
        return None
    if name == "reference":
        return None
    return _module(name).unavailable_reason(torch.device(device))


def available_backends(device="cpu") -> List[str]:
    """Concrete backends that can run on ``device``."""
    return [b for b in BACKENDS if unavailable_reason(b, device) is None]


def set_default_backend(name: str) -> None:
    """Set the backend used wherever ``backend=None`` (module default); ``auto`` by default."""
    global _default
    _default = check_name(name)


def get_default_backend() -> str:
    return _default


def resolve(name: Optional[str], device, *, op: Optional[str] = None, dtype: Optional[torch.dtype] = None,
            batch: Optional[int] = None, block_shape: Optional[Tuple[int, int]] = None) -> str:
    """The concrete backend for ``name`` (None: the global default) on ``device``.

    An explicit name that cannot run raises :class:`BackendUnavailable` with the reason.
    ``auto`` chooses per op (``forward``, ``grad_input``, ``grad_weight``) and shape class
    (dtype, batch bucket, block shape), all optional:

    1. a measured table, when one was recorded on this GPU (:func:`tune`; one JSON file per GPU
       name under ``$EFCN_CACHE_DIR``, default ``~/.cache/efcn_sparse``; ``EFCN_AUTO_TABLE=0``
       ignores it): the fastest measured backend for the op and shape class, if it can run;
    2. otherwise the rule: on CUDA tensors ``cuda``, then ``triton``, then ``reference``; on CPU
       tensors ``cpu``, then ``reference``: the first that can run here and supports the dtype.
       The compiled kernels come first because they are the ones built for each op's data flow
       (tensor cores, pipelined gathers); Triton is the portable fallback, the reference the last
       resort. BENCHMARKS.md holds the measurements the rule is to be checked against.
    """
    name = check_name(name or _default)
    device = torch.device(device)
    if name == "auto":
        key = (device, op, dtype, shape_class(batch, block_shape))
        if key not in _auto_cache:
            _auto_cache[key] = _auto(device, op, dtype, batch, block_shape)
        return _auto_cache[key]
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise BackendUnavailable(f"backend {name!r} cannot run on {device}: {reason}")
    return name


_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}
_auto_cache: Dict[tuple, str] = {}


def _supports(name: str, device: torch.device, dtype: Optional[torch.dtype]) -> bool:
    if unavailable_reason(name, device) is not None:
        return False
    dtypes = getattr(_module(name), "DTYPES", None)  # a kernel module may list the dtypes it takes
    return dtype is None or dtypes is None or dtype in dtypes


def _auto(device, op, dtype, batch, block_shape) -> str:
    candidates = [b for b in _AUTO_ORDER.get(device.type, ("reference",)) if _supports(b, device, dtype)]
    if not candidates:
        return "reference"
    measurable = device.type != "cuda" or torch.cuda.is_available()  # not so under the Triton interpreter
    if op is not None and len(candidates) > 1 and measurable and os.environ.get("EFCN_AUTO_TABLE", "1") != "0":
        measured = load_measured_table(device).get(_table_key(op, dtype, batch, block_shape))
        if measured in candidates:
            return measured
    return candidates[0]


# --------------------------------------------------------------------------- measured table
def shape_class(batch: Optional[int], block_shape: Optional[Tuple[int, int]]) -> str:
    """Shape class of the ``auto`` table: batch bucket (1-16, 17-64, 65-256, 257+) and block shape."""
    b = "any" if batch is None else next((f"b{lo}-{hi}" for lo, hi in ((1, 16), (17, 64), (65, 256)) if batch <= hi), "b257+")
    blk = "any" if block_shape is None else "x".join(str(int(s)) for s in block_shape)
    return f"{b}/{blk}"


def _table_key(op: str, dtype: Optional[torch.dtype], batch, block_shape) -> str:
    return f"{op}/{str(dtype).replace('torch.', '') if dtype is not None else 'any'}/{shape_class(batch, block_shape)}"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine() or "cpu"


def measured_table_path(device) -> str:
    """The JSON file of ``auto``'s measured choices for the GPU (or CPU) of ``device``."""
    device = torch.device(device)
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in _device_name(device))
    root = os.environ.get("EFCN_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "efcn_sparse"))
    return os.path.join(root, f"auto-{device.type}-{slug}.json")


_tables: Dict[str, Dict[str, str]] = {}


def load_measured_table(device) -> Dict[str, str]:
    """``{op/dtype/shape class: backend}`` measured on this device's model ({} when none)."""
    path = measured_table_path(device)
    if path not in _tables:
        try:
            with open(path) as f:
                _tables[path] = dict(json.load(f).get("choices", {}))
        except (OSError, ValueError):
            _tables[path] = {}
    return _tables[path]


def record_measured_choice(device, op: str, dtype: Optional[torch.dtype], batch: Optional[int],
                           block_shape: Optional[Tuple[int, int]], backend: str) -> None:
    """Store ``backend`` as ``auto``'s choice for this op and shape class on this device's model."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")
    device = torch.device(device)
    table = load_measured_table(device)
    table[_table_key(op, dtype, batch, block_shape)] = backend
    path = measured_table_path(device)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"device": _device_name(device), "choices": table}, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    _auto_cache.clear()


def tune(layout, batch: int, dtype: torch.dtype, device="cuda", repeats: int = 20) -> Dict[str, str]:
    """Time every backend that can run the three ops of ``layout`` at ``batch`` and ``dtype`` on
    ``device`` (CUDA events on a GPU, wall clock on CPU; median of ``repeats`` after a warm-up),
    record the fastest per op in the measured table, and return ``{op: backend}``. One call per
    shape class in use is enough: the table persists across processes."""
    device = torch.device(device)
    lay = layout.to(device)
    M, N = lay.shape
    BR, BC = lay.block_shape
    values = torch.randn(lay.nnzb, BR, BC, device=device).to(dtype)
    x, dy = torch.randn(batch, N, device=device).to(dtype), torch.randn(batch, M, device=device).to(dtype)
    bias = torch.randn(M, device=device).to(dtype)
    calls = {
        "forward": lambda k: k.forward(x, values, bias, lay.crow_ptr, lay.col_idx, lay.row_idx, M),
        "grad_input": lambda k: k.grad_input(dy, values, lay.ccol_ptr, lay.t_row_idx, lay.t_perm, N),
        "grad_weight": lambda k: k.grad_weight(dy, x, lay.row_idx, lay.col_idx, lay.mask_ids, lay.mask_patterns, BR, BC),
    }
    names = [b for b in _AUTO_ORDER.get(device.type, ("reference",)) if _supports(b, device, dtype)]
    best: Dict[str, str] = {}
    for op, call in calls.items():
        times = {b: _median_time(lambda: call(kernels(b)), device, repeats) for b in names}
        best[op] = min(times, key=times.get)
        record_measured_choice(device, op, dtype, batch, (BR, BC), best[op])
    return best


def _median_time(fn, device: torch.device, repeats: int) -> float:
    import statistics
    import time

    fn()
    times = []
    for _ in range(max(repeats, 1)):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def kernels(name: str) -> ModuleType:
    """The kernel module of a concrete backend."""
    return _module(name)
