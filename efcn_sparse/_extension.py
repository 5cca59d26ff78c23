"""Loads the compiled extension ``efcn_sparse._C`` (C++ CPU and CUDA kernels), if it was built.

Loading registers the ``efcn_sparse_C::*`` kernel ops. Without it the package still works on the
pure-PyTorch ``reference`` backend (and Triton), after one warning saying why.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch  # noqa: F401  (loads libc10 and libtorch before the extension)

_error: Optional[str] = None
_loaded = False


def load() -> bool:
    """Import the extension once; True when its ops are registered."""
    global _error, _loaded
    if _loaded or _error is not None:
        return _loaded
    if os.environ.get("EFCN_NO_EXT") == "1":
        _error = "EFCN_NO_EXT=1 is set"
    else:
        try:
            from . import _C  # noqa: F401

            _loaded = True
        except ImportError as e:
            _error = str(e)
    if not _loaded:
        warnings.warn(
            f"efcn_sparse: the compiled extension is not available ({_error}); using the pure-PyTorch "
            "'reference' backend on CPU. Build it with `pip install -e . --no-build-isolation`.",
            RuntimeWarning,
            stacklevel=3,
        )
    return _loaded


def error() -> Optional[str]:
    """Why the extension is not loaded (None when it is)."""
    return _error


def has_cuda_kernels() -> bool:
    """Whether the loaded extension was built with its CUDA sources."""
    return load() and torch._C._dispatch_has_kernel_for_dispatch_key("efcn_sparse_C::bsr_forward", "CUDA")
