"""Backend selection: which kernel implementation runs the three ops.

Backends: ``reference`` (pure PyTorch, any device), ``cpu`` (C++ extension, CPU tensors),
``cuda`` (CUDA C++ extension), ``triton`` (Triton; CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``). ``auto`` picks per device: see :func:`resolve`.

A kernel module exposes ``forward``, ``grad_input``, ``grad_weight`` (contract in
``efcn_sparse.kernels``) and ``unavailable_reason(device) -> Optional[str]``.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Dict, List, Optional

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")
CHOICES = ("auto",) + BACKENDS

_MODULES = {
    "reference": "efcn_sparse.kernels.reference",
    "cpu": "efcn_sparse.kernels.cpu",
    "cuda": "efcn_sparse.kernels.cuda",
    "triton": "efcn_sparse.kernels.triton_bsr",
}
_loaded: Dict[str, Optional[ModuleType]] = {}
_import_errors: Dict[str, str] = {}
_default = os.environ.get("EFCN_BACKEND", "auto")


class BackendUnavailable(RuntimeError):
    """A backend was asked for that cannot run here (with the reason)."""


def _module(name: str) -> Optional[ModuleType]:
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(_MODULES[name])
        except Exception as e:  # missing extension or triton: the backend is simply unavailable
            _loaded[name] = None
            _import_errors[name] = f"{type(e).__name__}: {e}"
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
    mod = _module(name)
    if mod is None:
        return f"backend {name!r} failed to load ({_import_errors.get(name)})"
    if name == "reference":
        return None
    return mod.unavailable_reason(torch.device(device))


def available_backends(device="cpu") -> List[str]:
    """Concrete backends that can run on ``device``."""
    return [b for b in BACKENDS if unavailable_reason(b, device) is None]


def set_default_backend(name: str) -> None:
    """Set the backend used wherever ``backend=None`` (module default); ``auto`` by default."""
    global _default
    _default = check_name(name)


def get_default_backend() -> str:
    return _default


def resolve(name: Optional[str], device) -> str:
    """The concrete backend for ``name`` (None: the global default) on ``device``.

    ``auto`` takes, in order, the first available of: on CPU ``cpu``, ``reference``; on CUDA
    ``cuda``, ``triton``, ``reference``. An explicit name that cannot run raises
    :class:`BackendUnavailable` with the reason.
    """
    name = check_name(name or _default)
    device = torch.device(device)
    if name == "auto":
        order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "reference")
        return next(b for b in order if unavailable_reason(b, device) is None)
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise BackendUnavailable(f"backend {name!r} cannot run on {device}: {reason}")
    return name


def kernels(name: str) -> ModuleType:
    """The kernel module of a concrete backend."""
    mod = _module(name)
    if mod is None:
        raise BackendUnavailable(f"backend {name!r} failed to load ({_import_errors.get(name)})")
    return mod
