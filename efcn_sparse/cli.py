"""Command line: ``efcn demo`` (embed a small CNN, check equivalence, print memory)."""

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


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="efcn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="embed a conv, check equivalence, print the memory table")
    demo.add_argument("--channels", type=int, default=16)
    demo.add_argument("--size", type=int, default=16)
    demo.add_argument("--batch", type=int, default=8)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
