"""The relax-time protocol of d'Ascoli et al. (2019), end to end, resumable and data-parallel.

For a model, a data set, a budget of T epochs and each seed s (``seeds``; seed s fixes the data
subset, the initialisations and the shuffling):

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

Run directory: ``config.json``, ``metrics.jsonl`` (every field, one row per seed, arm and epoch;
the source of truth), ``metrics.csv`` (flat fields, plus mean and std rows over the seeds),
``summary.md`` (statistics over the seeds and the paper's claims, see ``results.py``),
``figures/*.png`` and ``checkpoints/seed{s}/`` (one per arm, written atomically every epoch, plus
the CNN at each relax time). ``resume=True`` continues an interrupted run from its last checkpoints
with identical metrics (and may add seeds); ``force=True`` starts over. The module writes runs;
``results.py`` reads, summarises and merges them.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from . import results as R
from . import sharding as S
from . import training as T
from .data import DataInfo, load_data
from .results import CSV_FIELDS, RunError, load_run, summarize

__all__ = ["RelaxConfig", "relax", "relax_grid", "build_model", "merge", "load_run", "summarize", "RunError",
           "CSV_FIELDS", "PRESETS", "CorruptCheckpoint"]

Halo = Union[int, str]
LR_SCHEDULES = ("constant", "cosine")
PARALLEL = ("data", "seeds")  # under torchrun: DDP over each arm, or the seeds shared out over the ranks


class CorruptCheckpoint(RunError):
    """An arm's checkpoint cannot be loaded; ``older`` says what the arm can continue from instead
    (``relax(..., from_older=True)``, ``efcn relax --resume --from-older``)."""

    def __init__(self, path: str, cause: Exception, older: str):
        self.path, self.older = path, older
        super().__init__(f"checkpoint {path} is corrupt ({type(cause.__cause__ or cause).__name__}); it can continue "
                         f"from {older}: resume with --from-older for that, or use --force to start over")


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
    seed: int = 0  # the seed of a one-seed run
    seeds: Optional[List[int]] = None  # every seed (None: [seed]); seed s trains every arm, its CNN parents its eFCNs
    last_k: int = R.LAST_K  # final accuracy: mean of the last k epochs (summary only)
    device: str = "auto"
    backend: Optional[str] = None
    threads: Optional[int] = None  # torch CPU threads (None: torch's default)
    parallel: str = "data"  # under torchrun: "data" (DDP) or "seeds" (rank r trains seeds[r::world] alone)
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
        self._validate_seeds(bad)
        if self.last_k < 1:
            bad(f"--last-k must be >= 1, got {self.last_k}")
        if self.parallel not in PARALLEL:
            bad(f"--parallel must be one of {', '.join(PARALLEL)}, got {self.parallel!r}")
        if self.parallel == "seeds" and self.fsdp:
            bad("--fsdp shards every arm over the ranks and --parallel seeds gives each rank its own seeds: "
                "choose one")
        if self.backend is not None and self.backend not in CHOICES:
            bad(f"--backend must be one of {', '.join(CHOICES)}, got {self.backend!r}")
        from .sharding import DTYPES

        if self.param_dtype is not None and (not self.fsdp or self.param_dtype not in DTYPES):
            bad(f"--param-dtype needs --fsdp and one of {', '.join(DTYPES)}, got {self.param_dtype!r}"
                + ("" if self.fsdp else " without --fsdp"))
        return self

    def _validate_seeds(self, bad) -> None:
        if self.seeds is None:
            return
        seeds = list(self.seeds)
        if not seeds or any(not isinstance(v, (int, np.integer)) or v < 0 for v in seeds):
            bad(f"--seeds must be one or more integers >= 0, got {seeds}")
        if len(set(seeds)) != len(seeds):
            bad(f"--seeds has duplicates: {seeds}")
        self.seeds = [int(v) for v in seeds]
        self.seed = self.seeds[0]

    def resolved_seeds(self) -> List[int]:
        return list(self.seeds) if self.seeds is not None else [int(self.seed)]

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
    def preset(cls, name: str, **overrides) -> "RelaxConfig":
        """The named setting of :data:`PRESETS` with ``overrides`` on top."""
        if name not in PRESETS:
            raise RunError(f"unknown preset {name!r}: expected one of {', '.join(PRESETS)}")
        return cls(**dict(PRESETS[name], **overrides))

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
_NOT_COMPARED = {"device", "backend", "data_dir", "download", "eval_batch_size", "threads", "last_k", "seed", "seeds",
                 "parallel"}


# Named settings (``--preset``); options given explicitly override them.
PRESETS: Dict[str, dict] = {
    # The paper's setting: its small CNN at width 64 on the full Fashion-MNIST (60k/10k), plain SGD
    # lr 0.1 batch 250, the log-spaced relax times 0,1,2,4,8,13,23,39, halo "full", 3 seeds. T = 40:
    # twice the T = 20 of issue 13's H200 run (CNN at 90.7 %, test accuracy still moving by points
    # between epochs), so that the CNN has converged (not verified on the full data). Cost: 3 x (40 CNN
    # + 270 eFCN/FCN epochs); see PRESET_COST.
    "paper": dict(model="skinny", width=64, dataset="fashion-mnist", train_size=None, test_size=None, epochs=40,
                  relax_times=None, n_relax=8, after=None, halo="full", fcn=True, optimizer="sgd", lr=0.1,
                  lr_schedule="constant", momentum=0.0, weight_decay=0.0, batch_size=250, seeds=[0, 1, 2]),
}
PRESET_COST = {
    "paper": "about 15-20 minutes on one H200 (3 x (40 x 0.5 s + 270 x 1.0 s) of training, from the epoch times "
             "measured there at T = 20, plus evaluation) and 1 to 2 days on 2 CPU cores (about 90 s per CNN and "
             "210 s per eFCN epoch with evaluation on one core, extrapolated from 2000-image epochs: 50 hours on "
             "one core, 25-30 hours if the second core gives 1.7-2x, which was not measured)",
}


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


# ---------------------------------------------------------------------------------------- the run
class _Reporter:
    """tqdm bars (epochs and batches) and one log line per epoch; silent when quiet or not rank 0.

    The bars go to stderr, and only when it is a terminal: in a log file they would interleave with
    the epoch lines."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.tqdm = None
        if not quiet and _is_terminal(sys.stderr):
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


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


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


def _fmt_row(r: dict, label: str) -> str:
    s = (f"[{label:>9}] epoch {r['epoch']:>3} | train {r['train_loss']:.4f} {100 * r['train_acc']:5.1f}% | "
         f"test {r['test_loss']:.4f} {100 * r['test_acc']:5.1f}%")
    if r.get("deviation") is not None:
        s += f" | dev {r['deviation']:.4f} proj {100 * r['proj_test_acc']:5.1f}%"
    if r.get("epoch_time_s"):
        s += f" | {r['epoch_time_s']:.1f}s"
    return s + f" {r['peak_mem_mb']:.0f}MB"


class _Run:
    """The protocol on one process. ``group``: the torchrun processes; ``dist``: those sharing each arm
    (all of them with ``parallel="data"``; this one alone with ``"seeds"``, which trains its share of
    the seeds: seeds[rank::world])."""

    def __init__(self, cfg: RelaxConfig, out: str, info: T.DistInfo, quiet: bool,
                 model_fn: Optional[Callable[..., nn.Module]] = None, from_older: bool = False):
        self.cfg, self.out, self.group = cfg, out, info
        self.all_seeds = cfg.resolved_seeds()
        self.by_seed = cfg.parallel == "seeds" and info.enabled
        self.dist = T.DistInfo(local_rank=info.local_rank, device=info.device) if self.by_seed else info
        self.seeds = self.all_seeds[info.rank::info.world] if self.by_seed else self.all_seeds
        self.seed = (self.seeds or self.all_seeds)[0]  # the seed being trained
        self.from_older = from_older
        self.rep = _Reporter(quiet or not self.dist.is_main)
        self.ckpt_dir = os.path.join(out, "checkpoints")
        self.model_fn = model_fn
        self.fault = _fault_hook()
        self.rows: List[dict] = []

    # ---------------------------------------------------------------- setup
    def use_seed(self, seed: int) -> None:
        """Train seed ``seed`` from now on: its data subset, initialisations, shuffling and checkpoints."""
        if seed != self.seed or not hasattr(self, "xtr"):
            self.seed = seed
            self.load_data()

    def load_data(self):
        c = self.cfg
        tr, te, self.data_info = load_data(c.dataset, c.data_dir, c.train_size, c.test_size, c.download, self.seed,
                                           image_size=c.image_size)
        dev = self.dist.device
        self.xtr, self.ytr = (t.to(dev) for t in tr.tensors)
        self.xte, self.yte = (t.to(dev) for t in te.tensors)

    def new_cnn(self) -> nn.Module:
        torch.manual_seed(self.seed)
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
                        backend=c.backend, seed=T.epoch_seed(self.seed, "fcn", -1), finish_layer=self.layer_sharder())

    # ---------------------------------------------------------------- bookkeeping
    def ckpt(self, name: str, seed: Optional[int] = None) -> str:
        return os.path.join(self.ckpt_dir, f"seed{self.seed if seed is None else seed}", f"{name}.pt")

    def label(self, arm: str) -> str:
        return arm if len(self.all_seeds) == 1 else f"s{self.seed} {arm}"

    def sharded_ckpt(self, name: str, seed: Optional[int] = None) -> str:
        return os.path.join(self.ckpt_dir, f"seed{self.seed if seed is None else seed}", f"{name}.dcp")

    def save(self, obj, name: str) -> None:
        if self.dist.is_main:
            T.save_checkpoint(obj, self.ckpt(name))

    def append(self, row: dict) -> None:
        self.rows.append(row)
        if self.dist.is_main:
            # one write(2) with O_APPEND: whole lines even when ranks training different seeds append at once
            fd = os.open(os.path.join(self.out, "metrics.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                os.write(fd, (json.dumps(row) + "\n").encode())
                os.fsync(fd)
            finally:
                os.close(fd)
        if self.group.is_main:  # with parallel="seeds": this rank's seeds until the end of the run
            R.atomic_write_text(os.path.join(self.out, "metrics.csv"), R.csv_text(R.dedupe(self.rows)))
        self.rep.log(_fmt_row(row, self.label(row["arm"])))

    def restore_rows(self) -> None:
        """On resume: keep each (seed, arm)'s rows up to its checkpoint (later ones are redone)."""
        rows = R.read_jsonl(os.path.join(self.out, "metrics.jsonl"), self.all_seeds[0])
        done_epochs: Dict[Tuple[int, str], int] = {}
        for seed, arm in {(r["seed"], r["arm"]) for r in rows}:
            if self.cfg.fsdp and arm != "cnn":
                state = S.checkpoint_meta(self.sharded_ckpt(arm, seed))
            else:
                state = self.load_arm_state(arm, seed)
            done_epochs[(seed, arm)] = state["epoch"] if state is not None else -1
        self.rows = [r for r in rows if r["epochs_trained"] <= done_epochs[(r["seed"], r["arm"])]]
        if self.group.is_main:
            R.write_metrics(self.out, self.rows)
        self.group.barrier()  # before any rank appends

    def finish(self) -> None:
        """After every rank's last epoch: with parallel="seeds", gather all ranks' rows into metrics.csv."""
        self.group.barrier()
        if self.by_seed and self.group.is_main:
            R.write_metrics(self.out, R.read_jsonl(os.path.join(self.out, "metrics.jsonl"), self.all_seeds[0]))

    def load_arm_state(self, arm: str, seed: Optional[int] = None) -> Optional[dict]:
        """The checkpoint of an arm (None: none, start the arm over).

        A corrupt one raises :class:`CorruptCheckpoint`, naming the older state the arm can continue from;
        with ``from_older`` the run continues from it: the CNN from its latest intact snapshot at a relax
        time (a fresh optimizer state), an eFCN or the FCN from its start."""
        path = self.ckpt(arm, seed)
        if not os.path.exists(path):
            return None
        try:
            return T.load_checkpoint(path, map_location=self.dist.device)
        except RuntimeError as e:
            older = self.older_state(arm, seed)
            if not self.from_older:
                raise CorruptCheckpoint(path, e, older[1]) from e
            return older[0]

    def older_state(self, arm: str, seed: Optional[int]) -> Tuple[Optional[dict], str]:
        """(state to continue from, what it is) after the arm's own checkpoint proved corrupt."""
        if arm == "cnn":
            for t in sorted(self.cfg.resolved_relax_times(), reverse=True):
                p = self.ckpt(f"cnn_at_{t}", seed)
                if not os.path.exists(p):
                    continue
                try:
                    snap = T.load_checkpoint(p, map_location=self.dist.device)
                except RuntimeError:
                    continue
                return (dict(snap, done=False, optimizer=None, from_older=True),
                        f"the CNN snapshot at epoch {t} ({p}; the optimizer state is not kept there)")
        what = "its relax-time CNN snapshot" if arm.startswith("efcn") else "scratch"
        return None, f"the start of the arm ({what}; the arm is trained again)"

    # ---------------------------------------------------------------- measurement
    def measure(self, arm: str, kind: str, t_w: Optional[int], k: int, model: nn.Module,
                train: Optional[dict]) -> dict:
        c, d = self.cfg, self.dist
        t0 = time.perf_counter()
        if train is None:  # no training yet: evaluate the train set
            train = T.evaluate(model, self.xtr, self.ytr, c.eval_batch_size, d)
        test = T.evaluate(model, self.xte, self.yte, c.eval_batch_size, d)
        row = {"seed": self.seed, "arm": arm, "kind": kind, "t_w": t_w, "epoch": (t_w or 0) + k, "epochs_trained": k,
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
            if state.get("from_older"):  # replace the corrupt checkpoint now
                self.save_arm(arm, model, opt, start, start >= n_epochs)
        else:
            T.reset_peak_memory(d.device)
            self.append(self.measure(arm, kind, t_w, 0, model, None))
            if kind == "cnn" and 0 in snapshots:
                self.save({"model": model.state_dict(), "epoch": 0}, f"cnn_at_{0}")
            self.save_arm(arm, model, opt, 0, n_epochs == 0)
        if start >= n_epochs:
            return
        net = model if S.is_sharded(model) else T.wrap_ddp(model, d)
        bar = self.rep.bar(n_epochs, self.label(arm), initial=start)
        for k in range(start + 1, n_epochs + 1):
            T.reset_peak_memory(d.device)
            lr = c.lr_at((t_w or 0) + k - 1, t_w if kind == "efcn" else None)
            for g in opt.param_groups:
                g["lr"] = lr
            bbar = self.rep.bar(self.xtr.shape[0], f"{self.label(arm)} epoch {k}", leave=False, unit="ex")
            tr = T.train_epoch(net, opt, self.xtr, self.ytr, c.batch_size, T.epoch_seed(self.seed, arm, k), d,
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

    def load_snapshot(self, t_w: int) -> dict:
        path = self.ckpt(f"cnn_at_{t_w}")
        try:
            return T.load_checkpoint(path, map_location=self.dist.device)
        except FileNotFoundError:
            raise RunError(f"the CNN snapshot {path} is missing: resume with --force to start over") from None
        except RuntimeError as e:
            raise RunError(f"{e}; delete checkpoints/seed{self.seed}/cnn.pt too, so the CNN is trained "
                           "again, and --resume") from None

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
        state = self.load_arm_state(arm)
        if state is None:
            return None
        model.load_state_dict(state["model"])
        if not state["done"] and state.get("optimizer") is not None:  # none in a snapshot (from_older)
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
        for seed in self.seeds:
            self.use_seed(seed)
            self.run_seed()

    def run_seed(self) -> None:
        """Every arm of the current seed: its CNN, the eFCNs relaxed from that CNN, its FCN."""
        c = self.cfg
        grid = c.resolved_relax_times()
        self.run_arm("cnn", "cnn", None, c.epochs, self.new_cnn, snapshots=grid)
        for t in grid:
            def make(t=t):
                cnn = self.new_cnn()
                cnn.load_state_dict(self.load_snapshot(t)["model"])
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
    lost = sorted(set(old.resolved_seeds()) - set(cfg.resolved_seeds()))
    if lost:
        diff.append(f"seeds: {old.resolved_seeds()} -> {cfg.resolved_seeds()} (drops {lost}; adding seeds is fine)")
    if diff:
        raise RunError(f"--resume: the options differ from the run in {out} ({'; '.join(diff)}); resume with the "
                       f"same options, or use --force to start over")
    return True


def relax(config: Optional[RelaxConfig] = None, out: str = "runs/relax", resume: bool = False, force: bool = False,
          quiet: bool = False, plots: bool = True, model_fn: Optional[Callable[..., nn.Module]] = None,
          from_older: bool = False, **options) -> dict:
    """Run the relax-time protocol into ``out``; returns the summary (see :func:`summarize`).

    ``config`` or keyword ``options`` (the fields of :class:`RelaxConfig`) set the run; ``model_fn``
    (a callable taking in_channels, image_size, num_classes, width) replaces ``config.model`` for
    models defined in a script (the config then records ``model`` as given). Under ``torchrun``
    every rank calls this; rank 0 writes the files. ``from_older``: on resume, an arm whose
    checkpoint is corrupt continues from an older state (see :class:`CorruptCheckpoint`).
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
        run = _Run(cfg, out, info, quiet, model_fn, from_older=from_older)
        run.load_data()
        cnn = run.new_cnn()  # a bad model fails here, before anything is written
        try:  # and a model that cannot fit the device (or a layer FSDP cannot split), or no FSDP2 here
            if cfg.fsdp:
                S.mixed_precision(cfg.param_dtype)
            S.check_plan(cnn, run.data_info.input_shape, cfg.halo, run.dist.world, cfg.fsdp,
                         {"sgd": "sgd" if cfg.momentum > 0 else None, "adam": "adam"}[cfg.optimizer],
                         param_dtype=S.DTYPES.get(cfg.param_dtype), block_shape=cfg.block_shape, device=info.device)
        except (MemoryError, S.ShardingError) as e:
            raise RunError(str(e)) from e
        if info.is_main:
            if force:
                R.clear_artifacts(out)
            os.makedirs(run.ckpt_dir, exist_ok=True)
            meta = {"config": asdict(cfg), "relax_times": cfg.resolved_relax_times(), "seeds": cfg.resolved_seeds(),
                    "arms": _arms(cfg),
                    "data": run.data_info.to_dict(), "world_size": info.world, "device": str(info.device),
                    "torch": torch.__version__}
            R.atomic_write_text(os.path.join(out, "config.json"), json.dumps(meta, indent=2) + "\n")
        info.barrier()
        if resuming:
            run.restore_rows()
        run.rep.log(f"relax: {cfg.model} on {run.data_info.name} ({run.data_info.train_size} train / "
                    f"{run.data_info.test_size} test), seeds {cfg.resolved_seeds()}, {cfg.epochs} epochs, relax times "
                    f"{cfg.resolved_relax_times()}, halo={cfg.halo!r}, {info.world} process(es) on {info.device}"
                    + (f" (seeds {run.seeds} on this one)" if run.by_seed else "")
                    + (" (resuming)" if resuming else ""))
        run.run()
        run.finish()
        result = summarize(out)
        if info.is_main:
            R.atomic_write_text(os.path.join(out, "summary.md"), result["markdown"])
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


# ---------------------------------------------------------------------------------------- merge
def merge(run_dirs: Sequence[str], out: str, force: bool = False, plots: bool = True) -> dict:
    """:func:`efcn_sparse.results.merge` (join runs split by seeds and relax times), then the figures."""
    result = R.merge(run_dirs, out, force=force)
    if plots:
        _plots(out, _Reporter(quiet=True))
    return result
