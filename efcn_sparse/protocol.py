"""The relax-time protocol of d'Ascoli et al. (2019), end to end, resumable and data-parallel.

For a model, a data set and a budget of T epochs:

1. ``cnn``: train the CNN for T epochs, keeping its weights at each relax time t_w of a grid
   (default: the authors' log-spaced grid 0, 1, 2, 3, 5, ... up to T).
2. ``efcn_tw{t}``: embed the CNN at t_w as an eFCN (``halo``; "full" is the paper's eFCN) and train
   it in FCN space with the same optimizer settings (a fresh optimizer) for T - t_w epochs, or
   ``after`` epochs.
3. ``fcn``: the same eFCN structure with fresh weights (``fcn_like``) trained from scratch for T
   epochs: the paper's FCN baseline (with ``halo`` other than "full", the matching sparse net).

Every epoch of every arm gives one metrics row: train loss/accuracy (running averages over the
epoch; rows with no training yet are evaluated on the train set in eval mode), test loss/accuracy,
time and peak memory; FCN-space arms add the deviation from the CNN subspace (whole model, per
layer, off-local norm by distance) and the test accuracy of the model projected back to a CNN.

Run directory: ``config.json``, ``metrics.jsonl`` (every field; the source of truth),
``metrics.csv`` (flat fields), ``summary.md``, ``figures/*.png`` and ``checkpoints/`` (one per arm,
written atomically every epoch, plus the CNN at each relax time). ``resume=True`` continues an
interrupted run from its last checkpoints with identical metrics; ``force=True`` starts over.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from . import sharding as S
from . import training as T
from .data import DataInfo, load_data

__all__ = ["RelaxConfig", "relax", "relax_grid", "build_model", "merge", "load_run", "summarize", "RunError",
           "CSV_FIELDS"]

Halo = Union[int, str]
LR_SCHEDULES = ("constant", "cosine")


class RunError(RuntimeError):
    """A run that cannot start or continue as asked (bad options, an existing directory, a mismatch)."""


@dataclass
class RelaxConfig:
    """Every option of a relax run. Fields in ``_NOT_COMPARED`` may differ when resuming."""

    model: str = "skinny"
    width: Optional[int] = None
    dataset: str = "fashion-mnist"
    data_dir: Optional[str] = None
    download: bool = False
    train_size: Optional[int] = None
    test_size: Optional[int] = None
    image_size: Optional[int] = None  # synthetic data only
    epochs: int = 20
    relax_times: Optional[List[int]] = None  # None: relax_grid(epochs, n_relax)
    n_relax: int = 8
    after: Optional[int] = None
    halo: Halo = "full"
    block_shape: Optional[Tuple[int, int]] = None
    fcn: bool = True
    optimizer: str = "sgd"
    lr: float = 0.1
    lr_schedule: str = "constant"  # or "cosine": over the global epochs 0..T of the protocol
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 250
    eval_batch_size: int = 1000
    seed: int = 0
    device: str = "auto"
    backend: Optional[str] = None
    threads: Optional[int] = None  # torch CPU threads (None: torch's default)
    fsdp: bool = False  # FCN-space arms sharded by FSDP2 (efcn_sparse.sharding), checkpoints through DCP
    param_dtype: Optional[str] = None  # with fsdp: the dtype layers are gathered and computed in

    def validate(self) -> "RelaxConfig":
        from .backends import CHOICES

        def bad(msg):
            raise RunError(msg)

        if not isinstance(self.model, str) or not self.model:
            bad(f"model: expected a name or 'module:function', got {self.model!r}")
        if self.width is not None and self.width < 1:
            bad(f"--width must be >= 1, got {self.width}")
        if self.epochs < 1:
            bad(f"--epochs must be >= 1, got {self.epochs}")
        if self.n_relax < 1:
            bad(f"--n-relax must be >= 1, got {self.n_relax}")
        if self.relax_times is not None:
            rt = list(self.relax_times)
            if not rt:
                bad("--relax-times is empty")
            if any(not isinstance(t, (int, np.integer)) or t < 0 or t > self.epochs for t in rt):
                bad(f"--relax-times must be integers in [0, {self.epochs}] (the epochs), got {rt}")
            if len(set(rt)) != len(rt):
                bad(f"--relax-times has duplicates: {rt}")
            self.relax_times = sorted(int(t) for t in rt)
        if self.after is not None and self.after < 0:
            bad(f"--after must be >= 0, got {self.after}")
        if isinstance(self.halo, str) and self.halo != "full":
            try:
                self.halo = int(self.halo)
            except ValueError:
                bad(f"--halo must be 'full' or an integer >= 0, got {self.halo!r}")
        if not isinstance(self.halo, str) and (not isinstance(self.halo, (int, np.integer)) or self.halo < 0):
            bad(f"--halo must be 'full' or an integer >= 0, got {self.halo!r}")
        if self.block_shape is not None:
            bs = tuple(int(b) for b in self.block_shape)
            if len(bs) != 2 or min(bs) < 1:
                bad(f"--block-shape must be two positive integers BR,BC, got {self.block_shape!r}")
            self.block_shape = bs
        if self.optimizer.lower() not in T.OPTIMIZERS:
            bad(f"--optimizer must be one of {', '.join(T.OPTIMIZERS)}, got {self.optimizer!r}")
        self.optimizer = self.optimizer.lower()
        if self.lr_schedule not in LR_SCHEDULES:
            bad(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            bad(f"--lr must be > 0, got {self.lr}")
        if self.momentum < 0 or self.weight_decay < 0:
            bad(f"--momentum and --weight-decay must be >= 0, got {self.momentum}, {self.weight_decay}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            bad(f"--batch-size must be >= 1, got {self.batch_size}")
        for name in ("train_size", "test_size", "image_size", "threads"):
            v = getattr(self, name)
            if v is not None and v < 1:
                bad(f"--{name.replace('_', '-')} must be >= 1, got {v}")
        if self.backend is not None and self.backend not in CHOICES:
            bad(f"--backend must be one of {', '.join(CHOICES)}, got {self.backend!r}")
        from .sharding import DTYPES

        if self.param_dtype is not None and (not self.fsdp or self.param_dtype not in DTYPES):
            bad(f"--param-dtype needs --fsdp and one of {', '.join(DTYPES)}, got {self.param_dtype!r}"
                + ("" if self.fsdp else " without --fsdp"))
        return self

    def resolved_relax_times(self) -> List[int]:
        return list(self.relax_times) if self.relax_times is not None else relax_grid(self.epochs, self.n_relax)

    def efcn_epochs(self, t_w: int) -> int:
        return self.after if self.after is not None else self.epochs - t_w

    def lr_at(self, epoch: int, t_w: Optional[int] = None) -> float:
        """Learning rate of the epoch that starts at global epoch ``epoch`` (0-based).

        The schedule runs over the protocol's global epochs, so an eFCN relaxed at t_w continues
        where the CNN was; with ``after`` its horizon is max(T, t_w + after).
        """
        if self.lr_schedule == "constant":
            return self.lr
        horizon = self.epochs if t_w is None else max(self.epochs, t_w + self.efcn_epochs(t_w))
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * min(epoch, horizon) / horizon))

    @classmethod
    def from_dict(cls, d: dict) -> "RelaxConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise RunError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        d = dict(d)
        if d.get("block_shape") is not None:
            d["block_shape"] = tuple(d["block_shape"])
        return cls(**d)


# may differ between a run and its resumption (they do not change the numbers, or only by rounding)
_NOT_COMPARED = {"device", "backend", "data_dir", "download", "eval_batch_size", "threads"}
# may differ between runs that are merged
_MERGE_FREE = _NOT_COMPARED | {"relax_times", "n_relax", "fcn", "fsdp"}


def relax_grid(epochs: int, n: int = 8) -> List[int]:
    """The authors' grid: 0 and the unique integer parts of ``n`` log-spaced points in [1, epochs]."""
    pts = np.unique(np.logspace(0, np.log10(max(epochs, 1)), n).astype(int)) if n > 1 else np.array([epochs])
    return [0] + [int(p) for p in pts if 0 < p <= epochs]


def build_model(spec: Union[str, Callable[..., nn.Module]], info: DataInfo, width: Optional[int] = None) -> nn.Module:
    """A CNN from a registry name (``efcn_sparse.models``), ``"module:function"`` or a callable.

    The factory gets ``in_channels``, ``image_size``, ``num_classes`` and ``width`` (when given) as
    far as its signature accepts them.
    """
    kw = dict(in_channels=info.in_channels, image_size=info.image_size, num_classes=info.num_classes)
    if width is not None:
        kw["width"] = width
    if callable(spec):
        fn, what = spec, getattr(spec, "__name__", repr(spec))
    elif ":" in spec:
        mod_name, _, fn_name = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise RunError(f"--model {spec!r}: cannot import {fn_name} from {mod_name} ({e})") from e
        what = spec
    else:
        from .models import MODELS, get_model

        if spec.lower() not in MODELS:
            raise RunError(f"unknown model {spec!r}: expected one of {', '.join(MODELS)} or 'module:function'")
        fn, what = (lambda **k: get_model(spec, **k)), spec
        fn.__signature__ = inspect.signature(MODELS[spec.lower()])
    try:
        params = inspect.signature(fn).parameters
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            if "width" in kw and "width" not in params:
                raise RunError(f"model {what!r} takes no width")
            kw = {k: v for k, v in kw.items() if k in params}
    except (TypeError, ValueError):
        pass
    try:
        model = fn(**kw)
    except RunError:
        raise
    except Exception as e:
        raise RunError(f"building model {what!r} with {kw} failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise RunError(f"model {what!r} returned {type(model).__name__}, not an nn.Module")
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        raise RunError(f"model {what!r} has no nn.Conv2d: there is nothing to relax")
    return model


# ---------------------------------------------------------------------------------------- metrics I/O
CSV_FIELDS = ["arm", "kind", "t_w", "epoch", "epochs_trained", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
              "proj_test_loss", "proj_test_acc", "deviation", "offlocal_ratio", "sharing_deviation",
              "bias_deviation", "weight_norm", "epoch_time_s", "eval_time_s", "peak_mem_mb"]
_TIMING_FIELDS = ("epoch_time_s", "eval_time_s", "peak_mem_mb")
_ARTIFACTS = ("config.json", "metrics.jsonl", "metrics.csv", "summary.md", "figures", "checkpoints")


def _read_jsonl(path: str) -> List[dict]:
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill: its epoch is redone on resume
                continue
    return _dedupe(rows)


def _dedupe(rows: List[dict]) -> List[dict]:
    """Keep the last row of each (arm, epochs_trained), in first-seen order."""
    out: Dict[Tuple[str, int], dict] = {}
    for r in rows:
        out[(r["arm"], r["epochs_trained"])] = r
    return sorted(out.values(), key=lambda r: (_arm_order(r), r["epochs_trained"]))


def _arm_order(r: dict) -> Tuple[int, float]:
    return ({"cnn": 0, "efcn": 1, "fcn": 2}.get(r["kind"], 3), -1 if r.get("t_w") is None else r["t_w"])


def _atomic_write_text(path: str, text: str) -> None:
    T.atomic_write(path, lambda f: f.write(text), binary=False)


def _csv_text(rows: List[dict]) -> str:
    def fmt(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return repr(v)
        return str(v)

    lines = [",".join(CSV_FIELDS)]
    lines += [",".join(fmt(r.get(k)) for k in CSV_FIELDS) for r in rows]
    return "\n".join(lines) + "\n"


def _write_metrics(out: str, rows: List[dict]) -> None:
    _atomic_write_text(os.path.join(out, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    _atomic_write_text(os.path.join(out, "metrics.csv"), _csv_text(rows))


def load_run(run_dir: str) -> Tuple[dict, List[dict]]:
    """(config.json as a dict, metric rows) of a run directory."""
    cfg_path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise RunError(f"{run_dir} is not a run directory (no config.json)")
    with open(cfg_path) as f:
        meta = json.load(f)
    return meta, _read_jsonl(os.path.join(run_dir, "metrics.jsonl"))


# ---------------------------------------------------------------------------------------- the run
class _Reporter:
    """tqdm bars (epochs and batches) and one log line per epoch; silent when quiet or not rank 0."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.tqdm = None
        if not quiet:
            try:
                from tqdm.auto import tqdm

                self.tqdm = tqdm
            except ImportError:
                pass

    def bar(self, total: int, desc: str, initial: int = 0, leave: bool = True, unit: str = "epoch"):
        if self.tqdm is None:
            return None
        return self.tqdm(total=total, initial=initial, desc=desc, leave=leave, unit=unit, dynamic_ncols=True)

    def log(self, msg: str) -> None:
        if self.quiet:
            return
        if self.tqdm is not None:
            self.tqdm.write(msg)
        else:
            print(msg, flush=True)


def _fault_hook():
    """Test hook: EFCN_FAULT_AFTER_BATCHES=n kills the process (os._exit, no clean-up) after n batches."""
    n = int(os.environ.get("EFCN_FAULT_AFTER_BATCHES", "0") or 0)
    if n <= 0:
        return None
    count = {"n": 0}

    def hook(_i):
        count["n"] += 1
        if count["n"] > n:
            os._exit(75)

    return hook


def _fmt_row(r: dict) -> str:
    s = (f"[{r['arm']:>9}] epoch {r['epoch']:>3} | train {r['train_loss']:.4f} {100 * r['train_acc']:5.1f}% | "
         f"test {r['test_loss']:.4f} {100 * r['test_acc']:5.1f}%")
    if r.get("deviation") is not None:
        s += f" | dev {r['deviation']:.4f} proj {100 * r['proj_test_acc']:5.1f}%"
    if r.get("epoch_time_s"):
        s += f" | {r['epoch_time_s']:.1f}s"
    return s + f" {r['peak_mem_mb']:.0f}MB"


class _Run:
    def __init__(self, cfg: RelaxConfig, out: str, info: T.DistInfo, quiet: bool,
                 model_fn: Optional[Callable[..., nn.Module]] = None):
        self.cfg, self.out, self.dist = cfg, out, info
        self.rep = _Reporter(quiet or not info.is_main)
        self.ckpt_dir = os.path.join(out, "checkpoints")
        self.model_fn = model_fn
        self.fault = _fault_hook()
        self.rows: List[dict] = []

    # ---------------------------------------------------------------- setup
    def load_data(self):
        c = self.cfg
        tr, te, self.data_info = load_data(c.dataset, c.data_dir, c.train_size, c.test_size, c.download, c.seed,
                                           image_size=c.image_size)
        dev = self.dist.device
        self.xtr, self.ytr = (t.to(dev) for t in tr.tensors)
        self.xte, self.yte = (t.to(dev) for t in te.tensors)

    def new_cnn(self) -> nn.Module:
        torch.manual_seed(self.cfg.seed)
        return build_model(self.model_fn or self.cfg.model, self.data_info, self.cfg.width).to(self.dist.device)

    def embed(self, cnn: nn.Module) -> nn.Module:
        from .embedding import embed

        c = self.cfg
        return embed(cnn, self.data_info.input_shape, halo=c.halo, block_shape=c.block_shape, backend=c.backend,
                     finish_layer=self.layer_sharder())

    def fresh_fcn(self) -> nn.Module:
        from .embedding import fcn_like

        c = self.cfg
        return fcn_like(self.new_cnn(), self.data_info.input_shape, halo=c.halo, block_shape=c.block_shape,
                        backend=c.backend, seed=T.epoch_seed(c.seed, "fcn", -1), finish_layer=self.layer_sharder())

    # ---------------------------------------------------------------- bookkeeping
    def ckpt(self, name: str) -> str:
        return os.path.join(self.ckpt_dir, f"{name}.pt")

    def sharded_ckpt(self, name: str) -> str:
        return os.path.join(self.ckpt_dir, f"{name}.dcp")

    def save(self, obj, name: str) -> None:
        if self.dist.is_main:
            T.save_checkpoint(obj, self.ckpt(name))

    def append(self, row: dict) -> None:
        self.rows.append(row)
        if self.dist.is_main:
            with open(os.path.join(self.out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
            _atomic_write_text(os.path.join(self.out, "metrics.csv"), _csv_text(_dedupe(self.rows)))
        self.rep.log(_fmt_row(row))

    def restore_rows(self) -> None:
        """On resume: keep each arm's rows up to its checkpoint (later ones are redone)."""
        rows = _read_jsonl(os.path.join(self.out, "metrics.jsonl"))
        done_epochs: Dict[str, int] = {}
        for arm in {r["arm"] for r in rows}:
            p = self.ckpt(arm)
            done_epochs[arm] = T.load_checkpoint(p)["epoch"] if os.path.exists(p) else -1
            if self.cfg.fsdp and arm != "cnn":
                done_epochs[arm] = (S.checkpoint_meta(self.sharded_ckpt(arm)) or {"epoch": -1})["epoch"]
        self.rows = [r for r in rows if r["epochs_trained"] <= done_epochs[r["arm"]]]
        if self.dist.is_main:
            _write_metrics(self.out, self.rows)

    # ---------------------------------------------------------------- measurement
    def measure(self, arm: str, kind: str, t_w: Optional[int], k: int, model: nn.Module,
                train: Optional[dict]) -> dict:
        c, d = self.cfg, self.dist
        t0 = time.perf_counter()
        if train is None:  # no training yet: evaluate the train set
            train = T.evaluate(model, self.xtr, self.ytr, c.eval_batch_size, d)
        test = T.evaluate(model, self.xte, self.yte, c.eval_batch_size, d)
        row = {"arm": arm, "kind": kind, "t_w": t_w, "epoch": (t_w or 0) + k, "epochs_trained": k,
               "train_loss": train["loss"], "train_acc": train["acc"], "test_loss": test["loss"],
               "test_acc": test["acc"]}
        if kind != "cnn":
            from .subspace import deviation

            dev = deviation(model)
            tot = dev["total"]
            proj = T.evaluate(self.to_cnn(model), self.xte, self.yte, c.eval_batch_size, d)
            row.update(proj_test_loss=proj["loss"], proj_test_acc=proj["acc"], deviation=tot["deviation"],
                       offlocal_ratio=tot["offlocal_ratio"], sharing_deviation=tot["sharing_deviation"],
                       bias_deviation=tot["bias_deviation"], weight_norm=tot["weight_norm"],
                       offlocal_by_distance=tot["offlocal_by_distance"],
                       layers={p: {k2: v for k2, v in s.items() if k2 != "halo"} for p, s in dev["layers"].items()})
        row.update(epoch_time_s=train.get("time_s", 0.0), eval_time_s=time.perf_counter() - t0,
                   peak_mem_mb=T.peak_memory_mb(d.device))
        return row

    # ---------------------------------------------------------------- one arm
    def run_arm(self, arm: str, kind: str, t_w: Optional[int], n_epochs: int, make: Callable[[], nn.Module],
                snapshots: Sequence[int] = ()) -> None:
        c, d = self.cfg, self.dist
        d.barrier()
        model = self.prepare(make(), kind)
        opt = T.make_optimizer(model.parameters(), c.optimizer, c.lr, c.momentum, c.weight_decay)
        start = 0
        state = self.load_arm(arm, kind, model, opt)
        if state is not None:
            if state["done"]:
                return
            start = state["epoch"]
        else:
            T.reset_peak_memory(d.device)
            self.append(self.measure(arm, kind, t_w, 0, model, None))
            if kind == "cnn" and 0 in snapshots:
                self.save({"model": model.state_dict(), "epoch": 0}, f"cnn_at_{0}")
            self.save_arm(arm, model, opt, 0, n_epochs == 0)
        if start >= n_epochs:
            return
        net = model if S.is_sharded(model) else T.wrap_ddp(model, d)
        bar = self.rep.bar(n_epochs, arm, initial=start)
        for k in range(start + 1, n_epochs + 1):
            T.reset_peak_memory(d.device)
            lr = c.lr_at((t_w or 0) + k - 1, t_w if kind == "efcn" else None)
            for g in opt.param_groups:
                g["lr"] = lr
            bbar = self.rep.bar(self.xtr.shape[0], f"{arm} epoch {k}", leave=False, unit="ex")
            tr = T.train_epoch(net, opt, self.xtr, self.ytr, c.batch_size, T.epoch_seed(c.seed, arm, k), d,
                               progress=bbar.update if bbar is not None else None, on_batch=self.fault)
            if bbar is not None:
                bbar.close()
            self.append(dict(self.measure(arm, kind, t_w, k, model, tr), lr=lr))
            if kind == "cnn" and k in snapshots:
                self.save({"model": model.state_dict(), "epoch": k}, f"cnn_at_{k}")
            self.save_arm(arm, model, opt, k, k == n_epochs)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()

    def save_arm(self, arm: str, model: nn.Module, opt, epoch: int, done: bool) -> None:
        if self.cfg.fsdp and arm != "cnn":  # every rank writes its shard
            S.save_checkpoint(self.sharded_ckpt(arm), model, None if done else opt, {"epoch": epoch, "done": done})
            return
        state = {"model": model.state_dict(), "epoch": epoch, "done": done}
        if not done:
            state["optimizer"] = opt.state_dict()
        self.save(state, arm)

    # ---------------------------------------------------------------- sharding (cfg.fsdp: FCN-space arms)
    def layer_sharder(self) -> Optional[Callable[[nn.Module], object]]:
        """When sharding: each eFCN layer is sharded as soon as it is built (one whole layer at a time)."""
        if not (self.cfg.fsdp and self.dist.enabled):
            if self.cfg.param_dtype is not None:
                warnings.warn("--param-dtype applies to sharded layers: one process computes in the stored dtype")
            return None
        return lambda layer: S.shard_layer(layer, param_dtype=self.cfg.param_dtype)

    def prepare(self, model: nn.Module, kind: str) -> nn.Module:
        """FSDP2 over the root too when sharding (the CNN arm stays replicated: it is small)."""
        if not (self.cfg.fsdp and kind != "cnn" and self.dist.enabled):
            return model
        return S.shard(model, param_dtype=self.cfg.param_dtype)

    def load_arm(self, arm: str, kind: str, model: nn.Module, opt) -> Optional[dict]:
        """Load the arm's checkpoint into model and optimizer: its {"epoch", "done"}, None when none."""
        if self.cfg.fsdp and kind != "cnn":
            path = self.sharded_ckpt(arm)
            meta = S.checkpoint_meta(path)
            if meta is None:
                return None
            return S.load_checkpoint(path, model, None if meta["done"] else opt)
        path = self.ckpt(arm)
        if not os.path.exists(path):
            return None
        state = T.load_checkpoint(path, map_location=self.dist.device)
        model.load_state_dict(state["model"])
        if not state["done"]:
            opt.load_state_dict(state["optimizer"])
        return state

    def to_cnn(self, model: nn.Module) -> nn.Module:
        from .subspace import to_cnn

        if not S.is_sharded(model):
            return to_cnn(model)
        with torch.random.fork_rng(devices=[self.dist.device] if self.dist.device.type == "cuda" else []):
            return S.unsharded_cnn(model, self.new_cnn())

    # ---------------------------------------------------------------- the protocol
    def run(self) -> None:
        c = self.cfg
        grid = c.resolved_relax_times()
        self.run_arm("cnn", "cnn", None, c.epochs, self.new_cnn, snapshots=grid)
        for t in grid:
            def make(t=t):
                cnn = self.new_cnn()
                cnn.load_state_dict(T.load_checkpoint(self.ckpt(f"cnn_at_{t}"), map_location=self.dist.device)["model"])
                return self.embed(cnn)

            self.run_arm(f"efcn_tw{t}", "efcn", t, c.efcn_epochs(t), make)
        if c.fcn:
            self.run_arm("fcn", "fcn", None, c.epochs, self.fresh_fcn)


def _arms(cfg: RelaxConfig) -> List[dict]:
    arms = [{"arm": "cnn", "kind": "cnn", "t_w": None, "epochs": cfg.epochs}]
    arms += [{"arm": f"efcn_tw{t}", "kind": "efcn", "t_w": t, "epochs": cfg.efcn_epochs(t)}
             for t in cfg.resolved_relax_times()]
    if cfg.fcn:
        arms.append({"arm": "fcn", "kind": "fcn", "t_w": None, "epochs": cfg.epochs})
    return arms


def _prepare_dir(out: str, cfg: RelaxConfig, resume: bool, force: bool) -> bool:
    """Check the output directory (on every rank, before anyone writes); True when resuming."""
    if resume and force:
        raise RunError("--resume and --force exclude each other")
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunError(f"output {out} exists and is not a directory")
    entries = os.listdir(out) if os.path.isdir(out) else []
    if not entries:
        return False
    if force:
        return False
    if not resume:
        raise RunError(f"output directory {out} is not empty: pass --resume to continue that run, "
                       f"--force to overwrite it, or choose another --out")
    cfg_path = os.path.join(out, "config.json")
    if not os.path.isfile(cfg_path):
        raise RunError(f"--resume: {out} holds no config.json, so it is not a run to resume (use --force to start over)")
    with open(cfg_path) as f:
        old = RelaxConfig.from_dict(json.load(f)["config"]).validate()
    diff = [f"{k}: {getattr(old, k)!r} -> {getattr(cfg, k)!r}" for k in (f.name for f in fields(cfg))
            if k not in _NOT_COMPARED and getattr(old, k) != getattr(cfg, k)]
    if diff:
        raise RunError(f"--resume: the options differ from the run in {out} ({'; '.join(diff)}); resume with the "
                       f"same options, or use --force to start over")
    return True


def _clear_artifacts(out: str) -> None:
    for name in _ARTIFACTS:
        p = os.path.join(out, name)
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.unlink(p)


def relax(config: Optional[RelaxConfig] = None, out: str = "runs/relax", resume: bool = False, force: bool = False,
          quiet: bool = False, plots: bool = True, model_fn: Optional[Callable[..., nn.Module]] = None,
          **options) -> dict:
    """Run the relax-time protocol into ``out``; returns the summary (see :func:`summarize`).

    ``config`` or keyword ``options`` (the fields of :class:`RelaxConfig`) set the run; ``model_fn``
    (a callable taking in_channels, image_size, num_classes, width) replaces ``config.model`` for
    models defined in a script (the config then records ``model`` as given). Under ``torchrun``
    every rank calls this; rank 0 writes the files.
    """
    cfg = copy.deepcopy(config) if config is not None else RelaxConfig()
    for k, v in options.items():
        if not hasattr(cfg, k):
            raise RunError(f"unknown option {k!r}: expected one of {', '.join(f.name for f in fields(cfg))}")
        setattr(cfg, k, v)
    if model_fn is not None and cfg.model == RelaxConfig.model:
        cfg.model = f"<python:{getattr(model_fn, '__qualname__', 'model_fn')}>"
    cfg.validate()
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        info = T.setup_distributed(cfg.device)
    except ValueError as e:
        torch.set_num_threads(threads)
        raise RunError(str(e)) from e
    try:
        resuming = _prepare_dir(out, cfg, resume, force)
        info.barrier()
        if cfg.backend is not None:
            from . import backends

            try:
                backends.resolve(cfg.backend, info.device)
            except backends.BackendUnavailable as e:
                raise RunError(str(e)) from e
        run = _Run(cfg, out, info, quiet, model_fn)
        run.load_data()
        cnn = run.new_cnn()  # a bad model fails here, before anything is written
        try:  # and a model that cannot fit the device (or a layer FSDP cannot split), or no FSDP2 here
            if cfg.fsdp:
                S.mixed_precision(cfg.param_dtype)
            S.check_plan(cnn, run.data_info.input_shape, cfg.halo, info.world, cfg.fsdp,
                         {"sgd": "sgd" if cfg.momentum > 0 else None, "adam": "adam"}[cfg.optimizer],
                         param_dtype=S.DTYPES.get(cfg.param_dtype), block_shape=cfg.block_shape, device=info.device)
        except (MemoryError, S.ShardingError) as e:
            raise RunError(str(e)) from e
        if info.is_main:
            if force:
                _clear_artifacts(out)
            os.makedirs(run.ckpt_dir, exist_ok=True)
            meta = {"config": asdict(cfg), "relax_times": cfg.resolved_relax_times(), "arms": _arms(cfg),
                    "data": run.data_info.to_dict(), "world_size": info.world, "device": str(info.device),
                    "torch": torch.__version__}
            _atomic_write_text(os.path.join(out, "config.json"), json.dumps(meta, indent=2) + "\n")
        info.barrier()
        if resuming:
            run.restore_rows()
        run.rep.log(f"relax: {cfg.model} on {run.data_info.name} ({run.data_info.train_size} train / "
                    f"{run.data_info.test_size} test), {cfg.epochs} epochs, relax times "
                    f"{cfg.resolved_relax_times()}, halo={cfg.halo!r}, {info.world} process(es) on {info.device}"
                    + (" (resuming)" if resuming else ""))
        run.run()
        info.barrier()
        result = summarize(out)
        if info.is_main:
            _atomic_write_text(os.path.join(out, "summary.md"), result["markdown"])
            if plots:
                _plots(out, run.rep)
            run.rep.log(f"results in {out}: summary.md, metrics.csv, figures/")
        return result
    finally:
        T.cleanup_distributed(info)
        torch.set_num_threads(threads)


def _plots(out: str, rep: _Reporter) -> None:
    try:
        from .plots import plot_run
    except ImportError as e:  # matplotlib missing: the numbers are still written
        warnings.warn(f"figures skipped: {e} (pip install matplotlib)")
        return
    for p in plot_run(out):
        rep.log(f"figure: {p}")


# ---------------------------------------------------------------------------------------- summary
def _final_rows(meta: dict, rows: List[dict]) -> Dict[str, dict]:
    """Last row of each arm, with ``complete`` set when the arm trained all its epochs."""
    expected = {a["arm"]: a["epochs"] for a in meta["arms"]}
    last: Dict[str, dict] = {}
    for r in rows:
        if r["arm"] not in last or r["epochs_trained"] >= last[r["arm"]]["epochs_trained"]:
            last[r["arm"]] = r
    out = {}
    for a in meta["arms"]:
        if a["arm"] in last:
            out[a["arm"]] = dict(last[a["arm"]], complete=last[a["arm"]]["epochs_trained"] >= expected[a["arm"]])
    return out


def _pct(v: Optional[float]) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def summarize(run_dir: str) -> dict:
    """Final accuracies per arm, best t_w, gains over the CNN and the FCN, final deviations.

    Returns a dict with ``markdown`` (the summary.md text), ``arms`` (final rows), ``best_t_w``,
    ``gain_over_cnn``/``gain_over_fcn`` (accuracy points, fractions), and the paper's three checks.
    """
    meta, rows = load_run(run_dir)
    cfg = meta["config"]
    fin = _final_rows(meta, rows)
    efcn = {a: r for a, r in fin.items() if r["kind"] == "efcn"}
    cnn, fcn = fin.get("cnn"), fin.get("fcn")
    d = meta["data"]
    lines = [f"# Relax-time protocol: {cfg['model']}" + (f" (width {cfg['width']})" if cfg.get("width") else "")
             + f" on {d['name']}",
             "",
             f"{d['train_size']} training / {d['test_size']} test examples, T = {cfg['epochs']} epochs, "
             f"halo = {cfg['halo']}, {cfg['optimizer']} lr {cfg['lr']} ({cfg.get('lr_schedule', 'constant')}) "
             f"momentum {cfg['momentum']} "
             f"weight decay {cfg['weight_decay']}, batch {cfg['batch_size']}, seed {cfg['seed']}.",
             "",
             "| arm | t_w | epochs | train acc % | test acc % | projected CNN test acc % | deviation | off-local | "
             "sharing | time/epoch s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for a in meta["arms"]:
        r = fin.get(a["arm"])
        if r is None:
            lines.append(f"| {a['arm']} | {a['t_w'] if a['t_w'] is not None else '—'} | 0/{a['epochs']} | "
                         "not run | | | | | | |")
            continue
        times = [x["epoch_time_s"] for x in rows if x["arm"] == a["arm"] and x["epochs_trained"] > 0]
        f4 = lambda k: "—" if r.get(k) is None else f"{r[k]:.4f}"  # noqa: E731
        lines.append(
            f"| {a['arm']} | {a['t_w'] if a['t_w'] is not None else '—'} | {r['epochs_trained']}"
            + ("" if r["complete"] else f"/{a['epochs']} (incomplete)")
            + f" | {_pct(r['train_acc'])} | {_pct(r['test_acc'])} | {_pct(r.get('proj_test_acc'))} | "
            f"{f4('deviation')} | {f4('offlocal_ratio')} | {f4('sharing_deviation')} | "
            f"{(sum(times) / len(times)) if times else 0:.2f} |")
    res = {"markdown": "", "arms": fin, "best_t_w": None, "gain_over_cnn": None, "gain_over_fcn": None,
           "efcn_above_fcn_everywhere": None, "efcn_above_cnn_somewhere": None}
    trained = {a: r for a, r in efcn.items() if r["epochs_trained"] > 0}
    lines.append("")
    if trained:
        best = max(trained.values(), key=lambda r: (r["test_acc"], -r["t_w"]))
        res["best_t_w"] = best["t_w"]
        lines.append(f"- Best relax time: t_w = {best['t_w']} (final test accuracy {_pct(best['test_acc'])}%).")
        if cnn is not None:
            res["gain_over_cnn"] = best["test_acc"] - cnn["test_acc"]
            above = sorted(r["t_w"] for r in trained.values() if r["test_acc"] > cnn["test_acc"])
            res["efcn_above_cnn_somewhere"] = bool(above)
            lines.append(f"- Gain over the CNN ({_pct(cnn['test_acc'])}%): {100 * res['gain_over_cnn']:+.2f} points; "
                         f"eFCN above the CNN at t_w = {above if above else 'none'}.")
        if fcn is not None:
            res["gain_over_fcn"] = best["test_acc"] - fcn["test_acc"]
            below = sorted(r["t_w"] for r in trained.values() if r["test_acc"] <= fcn["test_acc"])
            res["efcn_above_fcn_everywhere"] = not below
            lines.append(f"- Gain over the FCN ({_pct(fcn['test_acc'])}%): {100 * res['gain_over_fcn']:+.2f} points; "
                         f"eFCN above the FCN at every trained t_w: "
                         f"{'yes' if not below else 'no (not at t_w = ' + str(below) + ')'}.")
        devs = [r["deviation"] for r in trained.values()]
        lines.append(f"- Deviation from the CNN subspace at the end (||W - P(W)|| / ||W||): "
                     f"{min(devs):.4f} to {max(devs):.4f} across t_w"
                     + (f" (the FCN trained from scratch: {fcn['deviation']:.4f})." if fcn is not None else "."))
        res["final_deviation"] = {r["t_w"]: r["deviation"] for r in trained.values()}
    incomplete = [a for a, r in fin.items() if not r["complete"]]
    if incomplete:
        lines.append(f"- Incomplete arms: {', '.join(incomplete)} (resume the run with --resume).")
    res["markdown"] = "\n".join(lines) + "\n"
    return res


# ---------------------------------------------------------------------------------------- merge
def merge(run_dirs: Sequence[str], out: str, force: bool = False, plots: bool = True) -> dict:
    """Join runs that split the relax times (``--relax-times``) into one run directory.

    The runs must share every protocol option except the relax times and ``fcn``; an arm present
    in several runs (the CNN, usually) is taken from the first, and a warning is given when the
    copies disagree (different hardware or library versions). Checkpoints are not copied.
    """
    if not run_dirs:
        raise RunError("merge: no run directories given")
    loaded = [(d, *load_run(d)) for d in run_dirs]
    if os.path.isdir(out) and os.listdir(out):
        if not force:
            raise RunError(f"output directory {out} is not empty: use --force to overwrite it, or another -o")
        _clear_artifacts(out)
    base_dir, base, _ = loaded[0]
    for d, meta, _ in loaded[1:]:
        diff = [k for k in base["config"] if k not in _MERGE_FREE and base["config"][k] != meta["config"].get(k)]
        if diff:
            raise RunError(f"merge: {d} differs from {base_dir} in {', '.join(diff)}: only runs of one protocol "
                           f"(differing in the relax times) can be merged")
    rows: List[dict] = []
    arms: Dict[str, dict] = {}
    for d, meta, rs in loaded:
        for a in meta["arms"]:
            mine = [r for r in rs if r["arm"] == a["arm"]]
            if not mine:
                continue
            if a["arm"] in arms:
                theirs = {r["epochs_trained"]: r["test_acc"] for r in rows if r["arm"] == a["arm"]}
                if any(abs(theirs.get(r["epochs_trained"], r["test_acc"]) - r["test_acc"]) > 1e-6 for r in mine):
                    warnings.warn(f"merge: arm {a['arm']} of {d} differs from the copy already taken; keeping the first")
                continue
            arms[a["arm"]] = a
            rows += mine
    cfg = dict(base["config"])
    times = sorted({a["t_w"] for a in arms.values() if a["kind"] == "efcn"})
    cfg.update(relax_times=times, fcn="fcn" in arms)
    order = sorted(arms.values(), key=_arm_order)
    meta = dict(base, config=cfg, relax_times=times, arms=order, merged_from=[os.path.abspath(d) for d in run_dirs])
    os.makedirs(out, exist_ok=True)
    _atomic_write_text(os.path.join(out, "config.json"), json.dumps(meta, indent=2) + "\n")
    _write_metrics(out, _dedupe(rows))
    result = summarize(out)
    _atomic_write_text(os.path.join(out, "summary.md"), result["markdown"])
    if plots:
        _plots(out, _Reporter(quiet=True))
    return result
