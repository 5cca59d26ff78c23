"""Training and evaluation loops, optimizers, atomic checkpoints, and DDP plumbing.

Determinism: each epoch reseeds torch's RNG and its shuffling generator from (seed, arm, epoch),
so an epoch replays identically whether the run went straight through or was resumed from a
checkpoint. Data sets are in-memory tensors, batched by index (no DataLoader workers).

Data parallel: under ``torchrun`` every rank draws the same permutation; each global batch is
split across ranks and each rank's loss is ``sum(local losses) * world / global batch``, so DDP's
gradient average equals the single-process mean over the global batch (to float rounding).
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import tempfile
import time
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["OPTIMIZERS", "make_optimizer", "epoch_seed", "DistInfo", "setup_distributed", "cleanup_distributed",
           "wrap_ddp", "train_epoch", "evaluate", "save_checkpoint", "load_checkpoint", "peak_memory_mb",
           "reset_peak_memory", "resolve_device", "rank_device"]

OPTIMIZERS = ("sgd", "adam")


def make_optimizer(params: Iterable, name: str = "sgd", lr: float = 0.1, momentum: float = 0.0,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """SGD (lr, momentum, weight decay) or Adam (lr, weight decay; ``momentum`` is ignored)."""
    name = name.lower()
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if momentum < 0 or weight_decay < 0:
        raise ValueError(f"momentum and weight decay must be >= 0, got {momentum}, {weight_decay}")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}: expected one of {', '.join(OPTIMIZERS)}")


def epoch_seed(seed: int, arm: str, epoch: int) -> int:
    """A stable 63-bit seed for one epoch of one arm (independent of resumption and world size)."""
    return (int(seed) * 1_000_003 + zlib.crc32(f"{arm}/{epoch}".encode())) % (2**63 - 1)


# ---------------------------------------------------------------------------------------- devices, DDP
def resolve_device(device: Optional[str]) -> torch.device:
    """``auto``/None: CUDA when available, else CPU; a clear error for an unusable device."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"bad device {device!r}: {e}") from e
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here (use --device cpu)")
    return d


def rank_device(base: torch.device, local_rank: int, device_count: Optional[int] = None) -> torch.device:
    """The device of the rank with torchrun's ``LOCAL_RANK`` on a node: CPU stays CPU; CUDA is GPU
    ``local_rank``, or GPU 0 when each process sees a single GPU (SLURM's ``--gpus-per-task=1``
    sets ``CUDA_VISIBLE_DEVICES`` per task)."""
    if base.type != "cuda":
        return base
    n = torch.cuda.device_count() if device_count is None else device_count
    if local_rank < 0:
        raise ValueError(f"LOCAL_RANK must be >= 0, got {local_rank}")
    if local_rank < n:
        return torch.device("cuda", local_rank)
    if n == 1:
        return torch.device("cuda", 0)
    raise ValueError(f"LOCAL_RANK={local_rank}, but this process sees {n} GPU(s): start at most {n} processes per "
                     "node (torchrun --nproc_per_node), or give each process its own GPU")


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_sum(self, values) -> list:
        """Sum a list of floats over ranks (float64)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64,
                         device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return t.tolist()


def setup_distributed(device: Optional[str] = None) -> DistInfo:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    base = resolve_device(device)
    if world <= 1:
        return DistInfo(device=base)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    base = rank_device(base, local)
    kw = {}
    if base.type == "cuda":
        torch.cuda.set_device(base)
        kw["device_id"] = base  # binds NCCL (barriers, collectives) to this rank's GPU from the start
    here = False
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend="nccl" if base.type == "cuda" else "gloo", **kw)
        except TypeError:  # torch < 2.3 has no device_id
            dist.init_process_group(backend="nccl" if base.type == "cuda" else "gloo")
        here = True
    return DistInfo(rank=rank, world=world, local_rank=local, device=base, initialized_here=here)


def cleanup_distributed(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """DistributedDataParallel when running on several ranks, else the model itself."""
    if not info.enabled:
        return model
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if has_bn and info.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [info.device.index] if info.device.type == "cuda" else None
    # layout buffers never change: broadcast buffers only when BatchNorm statistics need it
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=has_bn)


# ---------------------------------------------------------------------------------------- memory
def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated since the last reset; CPU: the process's peak resident set (high-water mark)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


# ---------------------------------------------------------------------------------------- loops
def _local_part(idx: torch.Tensor, info: DistInfo) -> torch.Tensor:
    return idx[info.rank::info.world] if info.enabled else idx


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                batch_size: int, seed: int, info: Optional[DistInfo] = None,
                progress: Optional[Callable[[int], None]] = None,
                on_batch: Optional[Callable[[int], None]] = None) -> Dict[str, float]:
    """One epoch of minibatch training over (x, y); returns the running train loss and accuracy.

    ``seed`` fixes the shuffling and every random op of the epoch (dropout). ``progress(n)`` is
    called after each batch with the batch size; ``on_batch(i)`` before each step (fault injection).
    """
    info = info or DistInfo(device=x.device)
    torch.manual_seed(seed)
    n = x.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    model.train()
    tot_loss = tot_correct = tot_n = 0.0
    t0 = time.perf_counter()
    for i, start in enumerate(range(0, n, batch_size)):
        if on_batch is not None:
            on_batch(i)
        gidx = perm[start:start + batch_size]
        lidx = _local_part(gidx, info)
        weight = 1.0
        if lidx.numel() == 0:  # fewer samples than ranks: run one sample with zero weight
            lidx, weight = gidx[:1], 0.0
        lidx = lidx.to(x.device)
        xb, yb = x[lidx], y[lidx]
        optimizer.zero_grad(set_to_none=True)
        out = model(xb)
        losses = F.cross_entropy(out, yb, reduction="none")
        loss = losses.sum() * (weight * info.world / gidx.numel())
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            tot_loss += weight * losses.sum().item()
            tot_correct += weight * (out.argmax(1) == yb).sum().item()
            tot_n += weight * lidx.numel()
        if progress is not None:
            progress(gidx.numel())
    tot_loss, tot_correct, tot_n = info.all_sum([tot_loss, tot_correct, tot_n])
    if not math.isfinite(tot_loss):
        raise FloatingPointError("the training loss is not finite (diverged): lower the learning rate")
    return {"loss": tot_loss / tot_n, "acc": tot_correct / tot_n, "time_s": time.perf_counter() - t0}


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000,
             info: Optional[DistInfo] = None) -> Dict[str, float]:
    """Mean cross-entropy and accuracy over (x, y) in eval mode, sharded across ranks."""
    info = info or DistInfo(device=x.device)
    was = model.training
    model.eval()
    n = x.shape[0]
    idx = _local_part(torch.arange(n), info)
    tot_loss = tot_correct = 0.0
    # the same number of forwards on every rank (a sharded model gathers its layers collectively);
    # a rank out of examples runs one with weight 0
    for start in range(0, -(-n // info.world), batch_size):
        b = idx[start:start + batch_size].to(x.device)
        if b.numel() == 0:
            model(x[:1])
            continue
        out = model(x[b])
        tot_loss += F.cross_entropy(out, y[b], reduction="sum").item()
        tot_correct += (out.argmax(1) == y[b]).sum().item()
    tot_loss, tot_correct = info.all_sum([tot_loss, tot_correct])
    model.train(was)
    return {"loss": tot_loss / n, "acc": tot_correct / n}


# ---------------------------------------------------------------------------------------- checkpoints
def atomic_write(path: str, write: Callable, binary: bool = True) -> None:
    """Write a file atomically: ``write(f)`` into a temporary file in the same folder, fsync, rename.

    A crash at any point leaves either the old file or the new one, never a torn one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        os.fchmod(fd, _default_file_mode())  # mkstemp creates 0600; give the file the usual mode (umask)
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def _default_file_mode() -> int:
    """0666 less the process umask: the mode ``open(path, "w")`` would give a new file."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def save_checkpoint(obj, path: str) -> None:
    """Write ``obj`` with torch.save atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def _fsync_dir(folder: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_checkpoint(path: str, map_location="cpu"):
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``: no code runs)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise RuntimeError(f"checkpoint {path} cannot be loaded ({type(e).__name__}: {e}); it is corrupt or was "
                           "not written by efcn_sparse: delete it (the arm restarts) or use --force") from e
