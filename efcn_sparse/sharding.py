"""FSDP2 sharding of embedded models, sharded checkpoints, and the full state_dict for one machine.

A full eFCN (halo ``"full"``) of a real network does not fit one GPU, but each of its layers does.
:func:`shard` applies PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``) to every
``SparseEFCN`` of a model and to the root: each rank keeps a slice (along the block dimension) of
every layer's ``values`` and ``bias``; a layer is all-gathered only while it computes, and its
gradient is reduce-scattered. The layout (index and mask buffers) is replicated: every rank builds
the same one, and :func:`shard` checks that. Masked entries stay exactly zero: their gradient is
zero on every rank, so the reduce-scattered sum is zero too.

Checkpoints go through ``torch.distributed.checkpoint`` (DCP): every rank writes its own shard into
a temporary directory, which is renamed over the previous checkpoint once all ranks are done, so a
crash leaves the last good checkpoint. DCP reshards on load: a checkpoint written by N ranks loads
into M ranks, or into an unsharded model in one process. :func:`full_state_dict` and
:func:`export_checkpoint` give an ordinary ``state_dict`` for a single machine.

FSDP cannot split one layer: a layer that does not fit one device even alone is refused by the
memory plan (:func:`efcn_sparse.summary.summary` with ``world_size``; :func:`check_plan`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
import zlib
from typing import Dict, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from .module import SparseEFCN
from .training import _fsync_dir

__all__ = ["shard", "shard_layer", "is_sharded", "ShardingError", "fsdp_available", "mixed_precision",
           "save_checkpoint", "load_checkpoint", "checkpoint_meta", "full_state_dict", "export_checkpoint", "unsharded_cnn",
           "device_capacity", "check_plan"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
_META = "efcn_meta.json"


class ShardingError(RuntimeError):
    """Sharding cannot run here (no FSDP2 in this torch, no process group) or was misused."""


def _fsdp():
    """(fully_shard, MixedPrecisionPolicy, FSDPModule), imported lazily: the package supports torch
    versions without FSDP2."""
    try:
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    except ImportError:
        try:  # torch 2.4-2.5: the same API, not yet public
            from torch.distributed._composable.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
        except ImportError as e:
            raise ShardingError(f"FSDP2 (torch.distributed.fsdp.fully_shard) is not in torch {torch.__version__}: "
                                "sharding needs torch >= 2.4 (2.6 or later recommended); use DDP (no --fsdp)") from e
    return fully_shard, MixedPrecisionPolicy, FSDPModule


def fsdp_available() -> bool:
    try:
        _fsdp()
        return True
    except ShardingError:
        return False


def _dcp():
    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import state_dict as dsd
    except ImportError as e:
        raise ShardingError(f"torch.distributed.checkpoint is not in torch {torch.__version__}: sharded "
                            "checkpoints need torch >= 2.4") from e
    return dcp, dsd


def _checkpoint_exception():
    try:
        from torch.distributed.checkpoint.api import CheckpointException
    except ImportError:
        return Exception
    return CheckpointException


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` (or a sub-module) is managed by FSDP2."""
    if not fsdp_available():
        return False
    FSDPModule = _fsdp()[2]
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _dtype(d) -> Optional[torch.dtype]:
    if d is None or isinstance(d, torch.dtype):
        return d
    if d not in DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPES)} or a torch.dtype, got {d!r}")
    return DTYPES[d]


def mixed_precision(param_dtype=None, reduce_dtype=None):
    """An FSDP2 ``MixedPrecisionPolicy``: layers gathered and computed in ``param_dtype``, gradients
    reduced in ``reduce_dtype`` (default: ``param_dtype``); the sharded master copy keeps its dtype."""
    _, MixedPrecisionPolicy, _ = _fsdp()
    param_dtype = _dtype(param_dtype)
    reduce_dtype = _dtype(reduce_dtype)
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype or param_dtype)


def _layout_fingerprint(m: SparseEFCN) -> int:
    h = zlib.crc32(repr((tuple(m.shape), tuple(m.block_shape))).encode())
    for t in m.layout.tensors().values():
        if t is not None:
            h = zlib.crc32(t.detach().cpu().contiguous().numpy().tobytes(), h)
    return h


def _efcn_modules(model: nn.Module):
    """Every SparseEFCN of ``model`` once, with its first path."""
    seen, out = set(), []
    for path, m in model.named_modules():
        if isinstance(m, SparseEFCN) and id(m) not in seen:
            seen.add(id(m))
            out.append((path or "<model>", m))
    return out


def _own_output(module, args, out):
    """A SparseEFCN returns its image output as a channels_last view; FSDP2 hooks the layer's
    backward (the re-gather of its values) onto the output, and an in-place op on a view (a
    ``ReLU(inplace=True)`` right after the layer) would drop that hook silently. Under sharding the
    output is therefore copied (same strides): one activation copy per layer."""
    if isinstance(out, torch.Tensor) and out._is_view():
        return out.clone(memory_format=torch.preserve_format)
    return out


_MESHES: dict = {}


def _default_mesh(device: torch.device):
    """All ranks in one dimension, one mesh per device type and process group (layers share it)."""
    from torch.distributed.device_mesh import init_device_mesh

    key = (device.type, id(dist.group.WORLD), dist.get_world_size())
    if key not in _MESHES:
        _MESHES.clear()
        _MESHES[key] = init_device_mesh(device.type, (dist.get_world_size(),))
    return _MESHES[key]


def _require_group(what: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise ShardingError(f"{what}: no process group: run under torchrun (or call "
                            "torch.distributed.init_process_group first)")


def _policy(mp_policy, param_dtype, reduce_dtype):
    if mp_policy is not None and (param_dtype is not None or reduce_dtype is not None):
        raise ValueError("shard: give mp_policy or param_dtype/reduce_dtype, not both")
    return mp_policy if mp_policy is not None else mixed_precision(param_dtype, reduce_dtype)


def _device_of(module: nn.Module) -> torch.device:
    devices = {t.device for t in list(module.parameters()) + list(module.buffers())}
    if len(devices) != 1:
        raise ValueError(f"shard: the model's tensors are on several devices {sorted(map(str, devices))}: move it "
                         "to this rank's device first")
    return devices.pop()


def shard_layer(layer: SparseEFCN, mesh=None, mp_policy=None, param_dtype=None, reduce_dtype=None,
                reshard_after_forward: bool = True) -> SparseEFCN:
    """Shard one ``SparseEFCN`` in place (an FSDP2 unit: its ``values`` and ``bias``). Give it as
    ``finish_layer`` to ``embed``/``fcn_like`` to shard each layer as soon as it is built, so that a
    rank never holds more than one whole layer; then call :func:`shard` on the model for the root."""
    fully_shard, _, FSDPModule = _fsdp()
    _require_group("shard_layer")
    if not isinstance(layer, SparseEFCN):
        raise TypeError(f"shard_layer: expected a SparseEFCN, got {type(layer).__name__}")
    if isinstance(layer, FSDPModule):
        raise ShardingError("shard_layer: this layer is already sharded")
    layer.register_forward_hook(_own_output)  # before FSDP's hook, which then sees the copy
    fully_shard(layer, mesh=mesh if mesh is not None else _default_mesh(_device_of(layer)),
                mp_policy=_policy(mp_policy, param_dtype, reduce_dtype), reshard_after_forward=reshard_after_forward)
    return layer


def shard(model: nn.Module, mesh=None, mp_policy=None, param_dtype=None, reduce_dtype=None,
          reshard_after_forward: bool = True, check_layouts: bool = True) -> nn.Module:
    """Shard ``model`` in place with FSDP2: one unit per ``SparseEFCN`` (its ``values`` and ``bias``;
    layers already sharded by :func:`shard_layer` are kept), then the root (every other parameter).
    Returns ``model``.

    Every rank of the process group calls it with the same model (same layouts; ``check_layouts``
    verifies that with one all-gather of checksums). ``mesh``: a 1-D ``DeviceMesh`` (default: all
    ranks on the model's device type); ``mp_policy``: an FSDP2 ``MixedPrecisionPolicy``, or give
    ``param_dtype``/``reduce_dtype`` (see :func:`mixed_precision`). Build the optimizer after this
    call: the parameters become ``DTensor`` shards. Forward and backward are unchanged: FSDP2
    gathers a layer's ``values`` into an ordinary tensor before its forward, so the custom ops and
    their autograd see plain tensors.
    """
    fully_shard, _, FSDPModule = _fsdp()
    _require_group("shard")
    if isinstance(model, FSDPModule):
        raise ShardingError("shard: the model is already sharded")
    layers = _efcn_modules(model)
    if not layers:
        raise ValueError("shard: the model has no SparseEFCN layer: embed it first (efcn_sparse.embed)")
    mp_policy = _policy(mp_policy, param_dtype, reduce_dtype)
    device = _device_of(model)
    if check_layouts:
        mine = [_layout_fingerprint(m) for _, m in layers]
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        for r, theirs in enumerate(every):
            if theirs != mine:
                bad = [p for (p, _), a, b in zip(layers, mine, theirs) if a != b] if len(theirs) == len(mine) else []
                raise ShardingError(f"shard: rank {r} has other layouts than rank {dist.get_rank()} "
                                    f"({', '.join(bad) or 'a different number of layers'}): every rank must "
                                    "embed the same model with the same options")
    if mesh is None:
        mesh = _default_mesh(device)
    for _, m in layers:
        if m is not model and not isinstance(m, FSDPModule):
            shard_layer(m, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    if model in [m for _, m in layers]:
        model.register_forward_hook(_own_output)
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        if device.type == "cuda":  # batch statistics over the global batch, as DDP does (training.wrap_ddp)
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.register_forward_pre_hook(_broadcast_norm_buffers)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    return model


def _broadcast_norm_buffers(module, args) -> None:
    """Rank 0's BatchNorm running statistics to every rank before each forward (what DDP's
    ``broadcast_buffers`` does): evaluation and checkpoints then see one set of statistics."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for b in m.buffers(recurse=False):
                dist.broadcast(b, src=0)


# ---------------------------------------------------------------------------------------- checkpoints
def _world() -> tuple:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def _single_process_quiet(world: int):
    """DCP warns that it assumes one process when no process group exists: that is intended here."""
    with warnings.catch_warnings():
        if world == 1:
            warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        yield


def _recover(path: str) -> None:
    """Rank 0: finish or undo a swap a crash interrupted (``path.old`` is the previous good one)."""
    old, tmp = path + ".old", path + ".tmp"
    if os.path.isdir(old):
        if os.path.isdir(path):
            shutil.rmtree(old)
        else:
            os.rename(old, path)
    if os.path.isdir(tmp):
        shutil.rmtree(tmp)


def _state(model: nn.Module, optimizer, dsd):
    opts = dsd.StateDictOptions()
    if optimizer is None:
        return {"model": dsd.get_model_state_dict(model, options=opts)}
    msd, osd = dsd.get_state_dict(model, optimizer, options=opts)
    return {"model": msd, "optim": osd}


def save_checkpoint(path: str, model: nn.Module, optimizer=None, meta: Optional[dict] = None) -> None:
    """Write a sharded checkpoint directory at ``path`` (every rank calls it; each writes its shard).

    Atomic: DCP writes into ``path.tmp``; when every rank is done, rank 0 moves the previous
    checkpoint to ``path.old``, renames ``path.tmp`` to ``path`` and deletes ``path.old``. A crash at
    any point leaves a complete checkpoint at ``path`` or ``path.old`` (which :func:`load_checkpoint`
    falls back to). ``meta``: a small JSON-able dict (epoch, ...) stored beside the shards, readable
    with :func:`checkpoint_meta` without loading them. On several nodes ``path`` must be on a file
    system every rank sees.
    """
    dcp, dsd = _dcp()
    rank, world = _world()
    path = os.path.abspath(path)
    tmp = path + ".tmp"
    if rank == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _recover(path)
        os.makedirs(tmp)
    _barrier()
    state = _state(model, optimizer, dsd)
    with _single_process_quiet(world):
        dcp.save(state, checkpoint_id=tmp, no_dist=world == 1)
    if rank == 0:  # DCP fsyncs the shards it writes; the meta file and the folders are synced here
        with open(os.path.join(tmp, _META), "w") as f:
            json.dump(dict(meta or {}, world_size=world), f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
    _barrier()  # every rank's shard is on disk
    if rank == 0:
        old = path + ".old"
        if os.path.isdir(path):
            os.rename(path, old)
        os.rename(tmp, path)
        _fsync_dir(os.path.dirname(path))
        if os.path.isdir(old):
            shutil.rmtree(old)
    _barrier()


def _existing(path: str) -> Optional[str]:
    path = os.path.abspath(path)
    for p in (path, path + ".old"):
        if os.path.isfile(os.path.join(p, _META)):
            return p
    return None


def checkpoint_meta(path: str) -> Optional[dict]:
    """The ``meta`` dict of the checkpoint at ``path`` (None when there is none)."""
    p = _existing(path)
    if p is None:
        return None
    with open(os.path.join(p, _META)) as f:
        return json.load(f)


def load_checkpoint(path: str, model: nn.Module, optimizer=None) -> Optional[dict]:
    """Load the checkpoint at ``path`` into ``model`` (and ``optimizer``): sharded or not, with any
    world size (DCP reshards). Returns its ``meta`` dict, or None when there is no checkpoint."""
    dcp, dsd = _dcp()
    p = _existing(path)
    if p is None:
        return None
    _, world = _world()
    state = _state(model, optimizer, dsd)
    try:
        with _single_process_quiet(world):
            dcp.load(state, checkpoint_id=p, no_dist=world == 1)
    except (Exception, _checkpoint_exception()) as e:  # DCP's error is a BaseException
        raise RuntimeError(f"sharded checkpoint {p} cannot be loaded ({type(e).__name__}: {e}); it is corrupt or "
                           "belongs to another model: delete it (the arm restarts) or use --force") from e
    opts = dsd.StateDictOptions()
    if optimizer is None:
        dsd.set_model_state_dict(model, state["model"], options=opts)
    else:
        dsd.set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                           options=opts)
    return checkpoint_meta(p)


def full_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The ordinary, unsharded ``state_dict`` of a (sharded) model, on the CPU of rank 0 (other ranks
    get ``{}``); every rank must call it. Loads into the unsharded model with ``load_state_dict``."""
    _, dsd = _dcp()
    if not is_sharded(model):
        return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()}
    return dsd.get_model_state_dict(model, options=dsd.StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_checkpoint(path: str, out: str) -> dict:
    """Convert the sharded checkpoint directory ``path`` into one ``torch.save`` file ``out`` for a
    single machine, offline (no process group): ``{"model": state_dict, "meta": {...}}``. The whole
    model must fit this machine's memory. Returns the meta dict."""
    from . import training as T

    _dcp()
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    p = _existing(path)
    if p is None:
        raise FileNotFoundError(f"{path} holds no sharded checkpoint (no {_META})")
    tmp = out + ".tmp-export"
    try:
        dcp_to_torch_save(p, tmp)
        state = torch.load(tmp, map_location="cpu", weights_only=False, mmap=True)
        T.save_checkpoint({"model": state["model"], "meta": checkpoint_meta(p)}, out)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return checkpoint_meta(p)


def unsharded_cnn(model: nn.Module, cnn: nn.Module) -> nn.Module:
    """``cnn`` (the architecture ``model`` was embedded from) loaded with the projection of each eFCN
    layer of the (sharded) ``model`` onto the CNN subspace and the full values of its other
    parameters and buffers: ``subspace.to_cnn`` for sharded models, gathering one layer at a time.
    Every rank must call it."""
    from .subspace import _conv_from, _full

    sd = {}
    efcn = {}
    for path, m in model.named_modules():
        if isinstance(m, SparseEFCN) and m.geometry is not None and path not in efcn:
            efcn[path] = _conv_from(m)
    for path, conv in efcn.items():
        for k, v in conv.state_dict().items():
            sd[f"{path}.{k}" if path else k] = v
    for k, v in model.state_dict().items():
        if not any(k.startswith(p + ".") for p in efcn) and not k.endswith("_extra_state"):
            sd[k] = _full(v)
    cnn.load_state_dict(sd)
    return cnn


# ---------------------------------------------------------------------------------------- memory plan
def device_capacity(device: torch.device) -> int:
    """Bytes one rank may use: ``EFCN_DEVICE_MEMORY_GIB`` when set, else the GPU's total memory, else
    (CPU) the physical memory divided by the ranks on this node (``LOCAL_WORLD_SIZE``)."""
    env = os.environ.get("EFCN_DEVICE_MEMORY_GIB")
    if env:
        try:
            return int(float(env) * 2**30)
        except ValueError:
            raise ValueError(f"EFCN_DEVICE_MEMORY_GIB: expected a number of GiB, got {env!r}") from None
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 16 * 2**30
    return total // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def check_plan(model: nn.Module, input_shape, halo, world_size: int, sharded: bool, optimizer: Optional[str],
               dtype=None, param_dtype=None, block_shape=None, capacity: Optional[int] = None,
               device: Optional[torch.device] = None):
    """The memory plan of training ``model``'s eFCN on ``world_size`` ranks (sharded with FSDP, or
    replicated: DDP); raises ``MemoryError`` with the world size it needs when it does not fit one
    rank's ``capacity`` (default :func:`device_capacity`), or when one layer alone does not fit (FSDP
    cannot split a layer). Returns the plan."""
    from .summary import summary

    s = summary(model, input_shape, halo=halo, block_shape=block_shape, world_size=world_size if sharded else 1,
                optimizer=optimizer, dtype=dtype, param_dtype=param_dtype if sharded else None)
    plan = s.plan
    cap = capacity if capacity is not None else device_capacity(device or torch.device("cpu"))
    if plan.peak_bytes <= cap:
        return plan
    need = plan.needed_world_size(cap)
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    head = (f"the eFCN (halo={halo!r}) needs about {gib(plan.peak_bytes)} per rank on {world_size} rank(s) "
            f"({'FSDP' if sharded else 'replicated'}; weights {gib(plan.weights)}, gradients {gib(plan.gradients)}, "
            f"optimizer {gib(plan.optimizer_state)}, gathered layers {gib(plan.gathered_peak)}; activations not "
            f"counted), over this device's {gib(cap)}")
    if need is None:
        raise MemoryError(f"{head}: layer {plan.largest_layer} alone needs {gib(plan.largest_gathered)} gathered, "
                          "and FSDP cannot split a layer, so no world size fits; use a smaller halo, input or "
                          "dtype (--param-dtype bfloat16), or a device with more memory")
    hint = (f"run with --fsdp on at least {need} ranks (torchrun --nproc_per_node ... --nnodes ...)" if need > 1
            else "it fits one rank unsharded")
    if not sharded:
        hint = f"replicated (DDP) it cannot fit; {hint}"
    raise MemoryError(f"{head}: {hint}")
