"""Subprocess probe: peak resident memory of building a model variant and of one training step.

Method: Linux's peak RSS (VmHWM in /proc/self/status), reset before each phase by writing 5 to
/proc/self/clear_refs; a phase's peak is VmHWM after it minus VmRSS before it. It sees every
allocation of the process (torch's CPU allocator returns large blocks to the OS), so it measures
what the machine must hold, not only live tensors. Prints one JSON object.

Usage: python benchmarks/memprobe.py --model paper_cnn --variants cnn,efcn_sparse [--full]
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import modelkit  # noqa: E402


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def phase(fn, collect: bool = True):
    """(result, {peak_bytes, resident_bytes, seconds}) of running ``fn``, relative to the RSS before it."""
    if collect:
        gc.collect()
    rss0 = _status_bytes("VmRSS")
    can_reset = _reset_peak()
    t = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t
    peak = _status_bytes("VmHWM") - rss0 if can_reset else None
    return out, {"peak_bytes": peak, "resident_bytes": _status_bytes("VmRSS") - rss0, "seconds": dt}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True, choices=("paper_cnn", "alexnet"))
    ap.add_argument("--variants", default=",".join(modelkit.VARIANTS))
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--backend", default=None)
    ap.add_argument("--no-gc", action="store_true", help="skip gc.collect() between phases (quick smoke runs)")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    cfg = modelkit.model_config(args.model, args.full)
    shape, B = cfg["input_shape"], cfg["batch"]
    cnn = modelkit.build_cnn(args.model, cfg["kwargs"])
    x = torch.randn(B, *shape)
    y = torch.randint(0, cfg["kwargs"]["num_classes"], (B,))
    with torch.no_grad():
        ref = cnn.eval()(x[:2])
    cnn.train()
    warm = modelkit.make_variant("cnn", cnn, shape)  # one throwaway step: thread pools, oneDNN, autograd set-up
    modelkit.train_step(warm, torch.optim.SGD(warm.parameters(), lr=0.01, momentum=0.9), x[:2], y[:2])
    del warm
    from efcn_sparse import backends

    out = {"model": args.model, "config": cfg, "method": "VmHWM reset via /proc/self/clear_refs",
           "backend": backends.resolve(args.backend, "cpu"), "variants": {}}
    for v in args.variants.split(","):
        m, build = phase(lambda: modelkit.make_variant(v, cnn, shape, args.backend), not args.no_gc)
        with torch.no_grad():
            got = m.eval()(x[:2])
        m.train()
        err = float(((got - ref).abs().max() / ref.abs().max()).item())
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
        loss, step = phase(functools.partial(modelkit.train_step, m, opt, x, y), not args.no_gc)
        p, b = modelkit.param_bytes(m)
        out["variants"][v] = {"build": build, "train_step": step, "param_bytes": p, "buffer_bytes": b,
                              "train_state_bytes": 3 * p + b, "rel_err": err, "loss": float(loss),
                              "loss_finite": math.isfinite(float(loss))}
        del m, opt, got
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
