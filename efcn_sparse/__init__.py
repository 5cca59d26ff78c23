"""efcn_sparse: the equivalent fully-connected network (eFCN) of a CNN, stored block-sparse.

d'Ascoli et al. (NeurIPS 2019) map each Conv2d to the Linear layer computing the same function
and keep training it without locality or weight sharing. This package stores those matrices in a
block-sparse layout (:class:`BSRLayout`) and runs them with reference, C++ CPU, Triton and CUDA
kernels behind three custom ops, with masked gradients.
"""

from . import _extension

_extension.load()

# layout -> ops -> kernels (via backends) -> modules -> embedding and CNN subspace -> protocol
from . import backends, models, ops  # noqa: E402
from .backends import available_backends, get_default_backend, set_default_backend  # noqa: E402
from .conv_geometry import ConvGeometry  # noqa: E402
from .embedding import embed, fcn_like  # noqa: E402
from .interpolation import interpolate, interpolate_curvilinear, interpolate_linear  # noqa: E402
from .layout import BSRLayout, LayoutError  # noqa: E402
from .models import get_model  # noqa: E402
from .module import SparseEFCN  # noqa: E402
from .protocol import RelaxConfig, relax  # noqa: E402
from .sharding import shard  # noqa: E402
from .subspace import deviation, project, to_cnn  # noqa: E402
from .summary import summary  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BSRLayout",
    "LayoutError",
    "SparseEFCN",
    "ConvGeometry",
    "available_backends",
    "get_default_backend",
    "set_default_backend",
    "backends",
    "ops",
    "embed",
    "fcn_like",
    "project",
    "to_cnn",
    "deviation",
    "interpolate",
    "interpolate_linear",
    "interpolate_curvilinear",
    "summary",
    "get_model",
    "models",
    "relax",
    "RelaxConfig",
    "shard",
]
