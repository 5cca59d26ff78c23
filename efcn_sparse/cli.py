"""Command line ``efcn`` (also ``python -m efcn_sparse``).

* ``efcn relax``: the relax-time protocol (CNN, eFCN relaxed at each t_w, FCN baseline) into a run dir.
* ``efcn plot RUN_DIR``: redraw the figures; ``efcn summary RUN_DIR``: print the results table.
* ``efcn merge RUN_DIRS... -o OUT``: join runs that split the seeds and relax times.
* ``efcn demo``: embed a conv, check equivalence, print the memory table.
* ``efcn plan``: the per-rank memory plan of a model's eFCN sharded over N ranks.
* ``efcn export CKPT_DIR -o FILE``: a sharded (``--fsdp``) checkpoint as one state_dict file.

Run ``efcn relax`` under ``torchrun --nproc_per_node N`` for data parallelism (gloo on CPU, NCCL on GPU);
``--fsdp`` shards the eFCN layers across the ranks (FSDP2), ``--parallel seeds`` shares the seeds out.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _demo(args) -> int:
    import torch
    import torch.nn as nn

    from . import SparseEFCN, backends

    torch.manual_seed(args.seed)
    conv = nn.Conv2d(args.channels, args.channels, 3, padding=1)
    x = torch.randn(args.batch, args.channels, args.size, args.size)
    print(f"Conv2d({args.channels}, {args.channels}, 3, padding=1) on {args.size}x{args.size}, batch {args.batch}, "
          f"backend {backends.resolve(None, 'cpu')}")
    print(f"{'halo':>6} {'blocks':>8} {'stored':>12} {'density':>9} {'sparse MiB':>11} {'dense MiB':>10} {'rel. error':>11}")
    ref = conv(x)
    for halo in (0, 1, 2, "full"):
        m = SparseEFCN.from_conv(conv, (args.size, args.size), halo=halo)
        y = m(x)
        err = ((y - ref).abs().max() / ref.abs().max()).item()
        M, N = m.shape
        stored = m.layout.stored_entries()
        print(f"{halo!s:>6} {m.nnzb:>8} {stored:>12} {stored / (M * N):>9.4f} "
              f"{m.values.numel() * 4 / 2**20:>11.2f} {M * N * 4 / 2**20:>10.2f} {err:>11.2e}")
    return 0


# ---------------------------------------------------------------------------------------- parsing helpers
def _int_list(s: str) -> List[int]:
    try:
        vals = [int(v) for v in s.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,1,3, got {s!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return vals


def _halo(s: str):
    if s == "full":
        return s
    try:
        h = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'full' or an integer >= 0, got {s!r}") from None
    if h < 0:
        raise argparse.ArgumentTypeError(f"expected 'full' or an integer >= 0, got {s!r}")
    return h


def _block_shape(s: str):
    try:
        br, bc = (int(v) for v in s.lower().replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BR,BC such as 64,16, got {s!r}") from None
    return (br, bc)


def _positive(kind):
    def parse(s: str):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"expected a value > 0, got {s!r}")
        return v

    return parse


def _non_negative(kind):
    def parse(s: str):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
        if v < 0:
            raise argparse.ArgumentTypeError(f"expected a value >= 0, got {s!r}")
        return v

    return parse


def _add_relax(sub) -> argparse.ArgumentParser:
    from .protocol import PRESET_COST, PRESETS, RelaxConfig

    d = RelaxConfig()
    p = sub.add_parser(
        "relax", help="run the relax-time protocol (CNN, eFCN at each relax time, FCN baseline)",
        description="Train the CNN for EPOCHS epochs, relax it into an eFCN at each relax time t_w and keep "
                    "training in FCN space, and train the FCN baseline; write metrics, summary and figures.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a named setting; options given explicitly override it. paper: "
                        + _preset_text(PRESETS["paper"]) + "; cost " + PRESET_COST["paper"])
    g = p.add_argument_group("model")
    g.add_argument("--model", default=d.model,
                   help="skinny (the paper's small CNN), alexnet, resnet18, vgg, or module:function for your own "
                        "(called with in_channels, image_size, num_classes, width as its signature accepts)")
    g.add_argument("--width", type=_positive(int), default=d.width, help="channels (of the first stage); default: the model's")
    g.add_argument("--halo", type=_halo, default=d.halo,
                   help="'full': the paper's eFCN; an integer h: receptive fields plus h pixels (0: the eLCN)")
    g.add_argument("--block-shape", type=_block_shape, default=None, help="BR,BC of the sparse blocks (default: automatic)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=d.dataset, help="fashion-mnist, mnist, cifar10 or synthetic")
    g.add_argument("--data-dir", default=None,
                   help="where the data set is (idx files, or torchvision's folders); fashion-mnist also looks in "
                        "/usr/share/datasets/fashion-mnist and data/fashion-mnist")
    g.add_argument("--download", action="store_true", help="let torchvision download a missing data set into --data-dir")
    g.add_argument("--train-size", type=_positive(int), default=None, help="random training subset (the authors' data_size)")
    g.add_argument("--test-size", type=_positive(int), default=None, help="random test subset")
    g.add_argument("--image-size", type=_positive(int), default=None, help="image side of the synthetic data set")
    g = p.add_argument_group("protocol")
    g.add_argument("--epochs", type=_positive(int), default=d.epochs, help="T: the training budget of every arm")
    g.add_argument("--relax-times", type=_int_list, default=None,
                   help="comma-separated relax times t_w (default: 0 and N_RELAX log-spaced points up to EPOCHS); "
                        "split them across jobs and join the runs with `efcn merge`")
    g.add_argument("--n-relax", type=_positive(int), default=d.n_relax, help="points of the default log-spaced grid")
    g.add_argument("--after", type=_non_negative(int), default=None,
                   help="epochs of eFCN training after each relax time (default: EPOCHS - t_w)")
    g.add_argument("--no-fcn", dest="fcn", action="store_false", help="skip the FCN baseline (e.g. in all but one split job)")
    g = p.add_argument_group("optimization")
    g.add_argument("--optimizer", choices=("sgd", "adam"), default=d.optimizer)
    g.add_argument("--lr", type=_positive(float), default=d.lr)
    g.add_argument("--lr-schedule", choices=("constant", "cosine"), default=d.lr_schedule,
                   help="cosine: decay over the protocol's global epochs (an eFCN continues the CNN's schedule)")
    g.add_argument("--momentum", type=_non_negative(float), default=d.momentum, help="SGD momentum")
    g.add_argument("--weight-decay", type=_non_negative(float), default=d.weight_decay)
    g.add_argument("--batch-size", type=_positive(int), default=d.batch_size, help="global batch (split across ranks)")
    g.add_argument("--eval-batch-size", type=_positive(int), default=d.eval_batch_size)
    g.add_argument("--seed", type=_non_negative(int), default=d.seed, help="the (first) seed")
    s = g.add_mutually_exclusive_group()
    s.add_argument("--seeds", type=_int_list, default=None,
                   help="comma-separated seeds: every arm is trained for each; the CNN of seed s parents the eFCNs "
                        "of seed s (split seeds across jobs and join the runs with `efcn merge`)")
    s.add_argument("--n-seeds", type=_positive(int), default=None, help="seeds SEED, SEED+1, ..., SEED+N-1")
    g.add_argument("--last-k", type=_positive(int), default=d.last_k,
                   help="final accuracy: the mean of the last K epochs of each arm (the best epoch is given beside)")
    g = p.add_argument_group("execution")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1 (torchrun: each rank its local GPU)")
    g.add_argument("--backend", default=None, help="kernel backend: auto, reference, cpu, triton, cuda")
    g.add_argument("--parallel", choices=("data", "seeds"), default=d.parallel,
                   help="under torchrun: 'data' trains each arm data-parallel (DDP) on all ranks; 'seeds' shares the "
                        "seeds out (rank r trains seeds[r::world] alone, with single-process numbers)")
    g.add_argument("--threads", type=_positive(int), default=None,
                   help="CPU threads per process (default: torch's; 1 avoids oversubscription on a busy machine)")
    g.add_argument("--fsdp", action="store_true",
                   help="shard the eFCN layers across the torchrun ranks (FSDP2) for models past one device; "
                        "checkpoints become sharded directories (torch.distributed.checkpoint) that --resume "
                        "loads with any number of ranks (one process: unsharded)")
    g.add_argument("--param-dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="with --fsdp: the dtype layers are gathered and computed in (mixed precision)")
    g.add_argument("--out", "-o", default="runs/relax", help="run directory")
    g.add_argument("--resume", action="store_true", help="continue the run in --out (or start it when empty)")
    g.add_argument("--from-older", action="store_true",
                   help="with --resume: an arm whose checkpoint is corrupt continues from an older one (the CNN "
                        "from its last snapshot at a relax time, an eFCN or the FCN from its start)")
    g.add_argument("--force", action="store_true", help="overwrite the run in --out")
    g.add_argument("--no-plots", dest="plots", action="store_false", help="skip the figures")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bars or log lines")
    p.set_defaults(func=_relax)
    return p


def _preset_text(preset: dict) -> str:
    return ", ".join(f"{k.replace('_', '-')} {','.join(map(str, v)) if isinstance(v, list) else v}"
                     for k, v in preset.items() if v is not None and k not in ("fcn", "after"))


def _seeds(args) -> Optional[List[int]]:
    if args.seeds is not None:
        return args.seeds
    if args.n_seeds is not None:
        return list(range(args.seed, args.seed + args.n_seeds))
    return None


def _relax(args) -> int:
    from .protocol import CorruptCheckpoint, RelaxConfig, relax

    cfg = RelaxConfig(model=args.model, width=args.width, dataset=args.dataset, data_dir=args.data_dir,
                      download=args.download, train_size=args.train_size, test_size=args.test_size,
                      image_size=args.image_size, epochs=args.epochs, relax_times=args.relax_times,
                      n_relax=args.n_relax, after=args.after, halo=args.halo, block_shape=args.block_shape,
                      fcn=args.fcn, optimizer=args.optimizer, lr=args.lr, lr_schedule=args.lr_schedule,
                      momentum=args.momentum,
                      weight_decay=args.weight_decay, batch_size=args.batch_size,
                      eval_batch_size=args.eval_batch_size, seed=args.seed, seeds=_seeds(args), last_k=args.last_k,
                      device=args.device, backend=args.backend, threads=args.threads,
                      parallel=args.parallel, fsdp=args.fsdp, param_dtype=args.param_dtype)
    run = dict(out=args.out, resume=args.resume, force=args.force, quiet=args.quiet, plots=args.plots)
    try:
        res = relax(cfg, from_older=args.from_older, **run)
    except CorruptCheckpoint as e:
        if not (args.resume and sys.stdin.isatty() and sys.stderr.isatty()):
            raise
        print(f"efcn relax: {e}", file=sys.stderr)
        if input(f"continue from {e.older}? [y/N] ").strip().lower() not in ("y", "yes"):
            return 2
        res = relax(cfg, from_older=True, **run)
    import os

    if not args.quiet and int(os.environ.get("RANK", "0")) == 0:
        print(res["markdown"], end="")
    return 0


def _plot(args) -> int:
    from .plots import plot_run

    for p in plot_run(args.run_dir, args.out):
        print(p)
    return 0


def _summary(args) -> int:
    from .results import summarize

    print(summarize(args.run_dir, last_k=args.last_k)["markdown"], end="")
    return 0


def _plan(args) -> int:
    from .models import get_model
    from .protocol import RunError
    from .sharding import DTYPES
    from .summary import summary

    kw = dict(in_channels=args.in_channels, image_size=args.image_size, num_classes=args.num_classes)
    if args.width is not None:
        kw["width"] = args.width
    try:
        model = get_model(args.model, **kw)
        s = summary(model, (args.in_channels, args.image_size, args.image_size), halo=args.halo,
                    world_size=args.world_size, optimizer=None if args.optimizer == "none" else args.optimizer,
                    dtype=DTYPES[args.dtype], param_dtype=DTYPES[args.param_dtype] if args.param_dtype else None)
    except (ValueError, KeyError) as e:
        raise RunError(f"{args.model}: {e}") from e
    print(s if args.layers else s.plan)
    if args.device_memory is not None:
        need = s.plan.needed_world_size(int(args.device_memory * 2**30))
        print(f"ranks needed with {args.device_memory:g} GiB each: "
              + (str(need) if need is not None else "none (one layer alone does not fit: FSDP cannot split it)"))
    return 0


def _export(args) -> int:
    from .sharding import export_checkpoint

    meta = export_checkpoint(args.checkpoint, args.out)
    print(f"{args.out}: full state_dict of {args.checkpoint} ({meta})")
    return 0


def _merge(args) -> int:
    from .results import merge

    res = merge(args.run_dirs, args.out, force=args.force)
    if args.plots:
        _plot(argparse.Namespace(run_dir=args.out, out=None))
    print(res["markdown"], end="")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from .data import DataError
    from .protocol import RunError

    parser = argparse.ArgumentParser(prog="efcn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="embed a conv, check equivalence, print the memory table")
    demo.add_argument("--channels", type=int, default=16)
    demo.add_argument("--size", type=int, default=16)
    demo.add_argument("--batch", type=int, default=8)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    relax_parser = _add_relax(sub)
    p = sub.add_parser("plot", help="redraw the figures of a run directory")
    p.add_argument("run_dir")
    p.add_argument("--out", "-o", default=None, help="folder for the PNGs (default RUN_DIR/figures)")
    p.set_defaults(func=_plot)
    p = sub.add_parser("summary", help="print the results table and the paper's claims of a run directory")
    p.add_argument("run_dir")
    p.add_argument("--last-k", type=_positive(int), default=None,
                   help="final accuracy: mean of the last K epochs (default: the run's --last-k)")
    p.set_defaults(func=_summary)
    p = sub.add_parser("plan", help="per-rank memory of a model's eFCN sharded by FSDP over N ranks")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--width", type=_positive(int), default=None)
    p.add_argument("--in-channels", type=_positive(int), default=3)
    p.add_argument("--image-size", type=_positive(int), default=32)
    p.add_argument("--num-classes", type=_positive(int), default=10)
    p.add_argument("--halo", type=_halo, default="full")
    p.add_argument("--world-size", type=_positive(int), default=1)
    p.add_argument("--optimizer", choices=("none", "sgd", "adam"), default="sgd", help="sgd: with momentum")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--param-dtype", choices=("float32", "bfloat16", "float16"), default=None)
    p.add_argument("--device-memory", type=_positive(float), default=None,
                   help="GiB per device: print the ranks needed")
    p.add_argument("--layers", action="store_true", help="also print the per-layer table")
    p.set_defaults(func=_plan)
    p = sub.add_parser("export", help="convert a sharded (--fsdp) checkpoint directory into one state_dict file")
    p.add_argument("checkpoint", help="a checkpoints/seedS/ARM.dcp directory")
    p.add_argument("--out", "-o", required=True)
    p.set_defaults(func=_export)
    p = sub.add_parser("merge", help="join runs that split the seeds and relax times into one run directory")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", "-o", required=True)
    p.add_argument("--force", action="store_true", help="overwrite a non-empty output directory")
    p.add_argument("--no-plots", dest="plots", action="store_false")
    p.set_defaults(func=_merge)
    args = parser.parse_args(argv)
    if getattr(args, "preset", None):  # the preset's values become the defaults; explicit options win
        from .protocol import PRESETS

        preset = dict(PRESETS[args.preset])
        preset["n_seeds"] = len(preset.pop("seeds"))  # so that an explicit --seeds or --n-seeds wins
        relax_parser.set_defaults(**preset)
        args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (RunError, DataError, FloatingPointError, MemoryError, FileNotFoundError) as e:
        print(f"efcn {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"efcn {args.command}: interrupted (continue with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
