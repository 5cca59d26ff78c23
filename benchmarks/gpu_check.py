"""GPU check of every GPU backend (``triton``, and ``cuda`` when built): parity, sanitizer, timings.

Run by ``benchmarks/gpu_check.sh`` on a GPU machine (it builds the package first). Stages, in
order of priority, each skipped with a note once the ``--deadline`` is near:

1. parity of each backend's three ops (and forward+backward through ``ops.linear``) against the
   ``reference`` backend: the reference GPU layer (Conv2d 64->64 3x3, 32x32, batch 256, bf16,
   halo 0) and small layouts with partial edge blocks, element masks, empty block rows and
   columns, odd batches, float32/float16/bfloat16. Inputs are fresh random; each output buffer is
   poisoned with NaN first (a NaN block handed back to the caching allocator, which gives it to
   the op's output), so an element the kernel forgets to write shows up.
2. timings (CUDA events, medians) of each op and forward+backward, per backend, against cuDNN's
   conv (bf16, channels_last), the dense eFCN ``F.linear`` (when it fits) and ``torch.sparse``
   BSR (bf16), with effective TFLOP/s (2 x batch x stored entries per GEMM) and GB/s against the
   bytes floor at the measured device copy bandwidth.
3. ``compute-sanitizer`` memcheck and racecheck on a small case of the ``cuda`` backend (and
   memcheck of ``triton`` when time is left), as subprocesses running ``--sanitize-case``.
4. ``torch.compile(fullgraph=True)`` over the ``efcn_sparse_triton`` triton_ops.

Prints one Markdown table last; writes ``gpu_check.log``-worthy lines to stdout and
``results.json``, ``table.md`` and the sanitizer logs under ``--out`` (default ``$OUT``).

``--smoke`` runs the same code on CPU with tiny sizes, the ``reference`` backend and the Triton
interpreter (and the C++ ``cpu`` backend when built): a check of this script, not of speed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (reference + Triton interpreter)")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="where logs and results go")
    p.add_argument("--deadline", type=float, default=None, help="unix time by which to finish (skips stages)")
    p.add_argument("--sanitize-case", metavar="BACKEND", help="run one small case of BACKEND and exit (for compute-sanitizer)")
    p.add_argument("--seed", type=int, default=None)
    return p.parse_args(argv)


ARGS = _args()
if ARGS.smoke:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import efcn_sparse  # noqa: E402
from efcn_sparse import BSRLayout, SparseEFCN, backends, ops  # noqa: E402

DEV = torch.device("cpu" if ARGS.smoke else "cuda")
T0 = time.time()
DEADLINE = ARGS.deadline or (T0 + (300 if ARGS.smoke else 420))
RESERVE = 0.1 if ARGS.smoke else 1.0  # scales the time kept back for later stages
SEED = ARGS.seed if ARGS.seed is not None else int(time.time()) % 2**31
NOTES = []  # skipped stages and anchors, errors that are not parity failures
FAILURES = []


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def left() -> float:
    """Seconds to the deadline, in units of the GPU run's stage reserves (smaller in smoke runs)."""
    return (DEADLINE - time.time()) / RESERVE


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- cases
def conv_layer(cin, cout, hw, halo, dtype, block_shape=None, k=3, pad=1):
    """A SparseEFCN of a random Conv2d (returns the conv too, for the cuDNN anchor)."""
    conv = nn.Conv2d(cin, cout, k, padding=pad, bias=True).to(DEV, dtype)
    return conv, SparseEFCN.from_conv(conv, hw, halo=halo, block_shape=block_shape)


def random_layout(block_shape, grid=(6, 7), p=0.5):
    """Partial edge blocks, an empty block row and column, a random element mask."""
    BR, BC = block_shape
    nbr, nbc = grid
    M, N = (nbr - 1) * BR + 5, (nbc - 1) * BC + 3
    keep = torch.rand(nbr, nbc) < p
    keep[1, :] = False
    keep[:, 2] = False
    keep[-1, -1] = keep[0, 0] = True
    dense = keep.repeat_interleave(BR, 0).repeat_interleave(BC, 1)[:M, :N] & (torch.rand(M, N) < 0.8)
    return BSRLayout.from_dense_mask(dense, block_shape).validate().to(DEV)


def gpu_backends():
    """Backends under test: every available one but the reference (on CPU: the interpreter and C++)."""
    return [b for b in efcn_sparse.available_backends(DEV) if b != "reference"]


# --------------------------------------------------------------------------- parity
def poison(shape, dtype):
    """Hand a NaN-filled block of this size back to the caching allocator: the op's output gets it."""
    if DEV.type == "cuda":
        t = torch.full(shape, float("nan"), dtype=dtype, device=DEV)
        del t


def rel_err(a, e):
    a, e = a.float(), e.float()
    if a.shape != e.shape:
        return math.inf
    if not bool(torch.isfinite(a).all()):
        return math.nan
    if e.numel() == 0:
        return 0.0
    return float((a - e).abs().max() / e.abs().max().clamp(min=1e-30))


def tol(backend, dtype):
    if dtype == torch.float64:
        return 1e-10
    if dtype == torch.float32:
        from efcn_sparse.kernels import triton_bsr
        exact = backend == "triton" and not triton_bsr._allow_tf32
        return 1e-4 if exact else 3e-3  # the cuda backend may use TF32 for float32 (issue 8)
    return 1e-2


def run_three(k, lay, values, x, dy, bias):
    M, N = lay.shape
    BR, BC = lay.block_shape
    B = x.shape[0]
    poison((B, M), values.dtype)
    y = k.forward(x, values, bias, lay.crow_ptr, lay.col_idx, lay.row_idx, M)
    poison((B, N), values.dtype)
    dx = k.grad_input(dy, values, lay.ccol_ptr, lay.t_row_idx, lay.t_perm, N)
    poison((lay.nnzb, BR, BC), values.dtype)
    dw = k.grad_weight(dy, x, lay.row_idx, lay.col_idx, lay.mask_ids, lay.mask_patterns, BR, BC)
    sync()
    return {"forward": y, "grad_input": dx, "grad_weight": dw}


def fwd_bwd(backend, lay, values, x, dy, bias):
    leaves = [t.detach().clone().requires_grad_() for t in (x, values, bias)]
    y = ops.linear(leaves[0], lay, leaves[1], leaves[2], backend=backend)
    return [y.detach()] + list(torch.autograd.grad(y, leaves, dy))


def parity_case(name, lay, values, backends_, batch, dtype, with_autograd=False, results=None):
    """Each backend's ops against the reference on one layout; records max relative errors."""
    M, N = lay.shape
    values = lay.apply_mask(values.to(dtype))
    x = torch.randn(batch, N, device=DEV, dtype=dtype)
    dy = torch.randn(batch, M, device=DEV, dtype=dtype)
    bias = torch.randn(M, device=DEV, dtype=dtype)
    expect = run_three(backends.kernels("reference"), lay, values, x, dy, bias)
    expect_ag = fwd_bwd("reference", lay, values, x, dy, bias) if with_autograd else None
    dname = str(dtype).replace("torch.", "")
    for b in backends_:
        try:
            got = run_three(backends.kernels(b), lay, values, x, dy, bias)
            errs = {op: rel_err(got[op], expect[op]) for op in got}
            masked = ~lay.block_mask().to(DEV)
            if masked.any() and not bool((got["grad_weight"][masked] == 0).all()):
                errs["grad_weight"] = math.inf  # masked entries must get exactly zero gradient
            if with_autograd:
                ag = fwd_bwd(b, lay, values, x, dy, bias)
                errs["fwd_bwd"] = max(rel_err(a, e) for a, e in zip(ag, expect_ag))
        except Exception as e:  # a crash is a failure of that backend, not of the script
            errs = {"error": f"{type(e).__name__}: {e}"}
            NOTES.append(f"{b} {name} {dname}: {traceback.format_exc(limit=3)}")
        t = tol(b, dtype)
        ok = "error" not in errs and all(v <= t for v in errs.values())  # NaN compares False
        shown = errs.get("error") or ", ".join(f"{op} {v:.1e}" for op, v in errs.items())
        log(f"parity {'ok  ' if ok else 'FAIL'} {b:7s} {name} {dname} B={batch}: {shown} (tol {t:.0e})")
        if not ok:
            FAILURES.append(f"parity {b} {name} {dname} B={batch}: {shown}")
        if results is not None:
            results.append(dict(backend=b, case=name, dtype=dname, batch=batch, errors=errs, tol=t, ok=ok))


def small_parity_stage(ref_layer, backends_, results):
    """Partial edge blocks, masks, odd batches, every dtype; heuristic launches (autotuning every
    shape and batch would cost minutes of compiling)."""
    if ARGS.smoke:
        small = [(torch.float32, (1, 7, 33)), (torch.float16, (7,))]
    else:
        small = [(torch.float32, (7, 100)), (torch.float16, (33,)), (torch.bfloat16, (1, 7, 300))]
    os.environ["EFCN_TRITON_AUTOTUNE"] = "0"
    try:
        if not ARGS.smoke:
            lay, values = ref_layer[:2]
            parity_case("ref-layer", lay, values, backends_, 64, torch.float16, results=results)
            parity_case("ref-layer", lay, values, backends_, 32, torch.float32, results=results)
        _small_parity(backends_, small, results)
    finally:
        os.environ.pop("EFCN_TRITON_AUTOTUNE", None)


def _small_parity(backends_, small, results):
    _, m = conv_layer(24, 40, (5, 4) if ARGS.smoke else (17, 13), 1, torch.float32)  # 80x48 blocks, masked
    cases = [("conv24-40-halo1", m.layout, m.values.detach())]
    for bs in ((32, 16), (64, 64)) if not ARGS.smoke else ((32, 16),):
        lay_r = random_layout(bs)
        cases.append((f"random-{bs[0]}x{bs[1]}", lay_r, torch.randn(lay_r.nnzb, *bs, device=DEV)))
    for name, lay_c, vals_c in cases:
        for dtype, batches in small:
            for B in batches:
                if left() < 100:  # keep time for the compile check
                    NOTES.append(f"parity: skipped {name} {dtype} B={B} and later cases (deadline)")
                    return
                parity_case(name, lay_c, vals_c, backends_, B, dtype, with_autograd=B == 7, results=results)
    lay_r = random_layout((16, 32))
    vals = torch.randn(lay_r.nnzb, 16, 32, device=DEV)
    parity_case("random-16x32", lay_r, vals, backends_, 9, torch.float64, results=results)
    if "triton" in backends_:
        from efcn_sparse.kernels import triton_bsr
        if DEV.type == "cuda":
            triton_bsr.set_allow_tf32(True)
            try:
                parity_case("random-16x32-tf32", lay_r, vals, ["triton"], 33, torch.float32, results=results)
            finally:
                triton_bsr.set_allow_tf32(False)


# --------------------------------------------------------------------------- timing
def bench(fn, max_s=1.5, min_reps=5, max_reps=25):
    """Median milliseconds of ``fn`` after one warm-up call (which may autotune or compile)."""
    if ARGS.smoke:
        min_reps = max_reps = 2
    fn()
    sync()
    times = []
    t_start = time.time()
    while len(times) < max_reps and (len(times) < min_reps or time.time() - t_start < max_s):
        if DEV.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def copy_bandwidth():
    """Device copy bandwidth in bytes/s (read + write) of a large tensor."""
    n = (1 << 30 if DEV.type == "cuda" else 1 << 26) // 4
    a = torch.empty(n, device=DEV)
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a), max_s=1.0)
    return 2 * a.numel() * 4 / (ms * 1e-3)


def try_bench(rows, impl, op, fn, **kw):
    if left() < 20:
        NOTES.append(f"timing: skipped {impl} {op} (deadline)")
        return
    try:
        ms = bench(fn, **kw)
        rows.append(dict(impl=impl, op=op, ms=ms))
        log(f"time {impl:22s} {op:11s} {ms:9.3f} ms")
    except Exception as e:
        NOTES.append(f"timing {impl} {op}: {type(e).__name__}: {str(e)[:300]}")
        log(f"time {impl:22s} {op:11s} n/a ({type(e).__name__}: {str(e)[:200]})")
    finally:
        if DEV.type == "cuda":
            torch.cuda.empty_cache()


def timing_stage(conv, layer, B, dtype, backends_):
    lay = layer.layout
    values = layer.values.detach()
    bias = layer.bias.detach()
    M, N = lay.shape
    BR, BC = lay.block_shape
    x = torch.randn(B, N, device=DEV, dtype=dtype)
    dy = torch.randn(B, M, device=DEV, dtype=dtype)
    rows = []
    for b in backends_:
        k = backends.kernels(b)
        try_bench(rows, b, "forward", lambda: k.forward(x, values, bias, lay.crow_ptr, lay.col_idx, lay.row_idx, M))
        try_bench(rows, b, "grad_input", lambda: k.grad_input(dy, values, lay.ccol_ptr, lay.t_row_idx, lay.t_perm, N))
        try_bench(rows, b, "grad_weight", lambda: k.grad_weight(dy, x, lay.row_idx, lay.col_idx, lay.mask_ids,
                                                                lay.mask_patterns, BR, BC))
        leaves = [t.clone().requires_grad_() for t in (x, values, bias)]
        try_bench(rows, b, "fwd_bwd", lambda: torch.autograd.grad(
            ops.linear(leaves[0], lay, leaves[1], leaves[2], backend=b), leaves, dy))
    anchors_cudnn(rows, conv, layer, x, dy)
    anchor_dense(rows, lay, values, bias, x, dy)
    anchor_torch_sparse(rows, lay, values, bias, x, dy)
    return rows


def anchors_cudnn(rows, conv, layer, x, dy):
    """F.conv2d on the same data in NCHW-logical, channels_last-physical tensors (a free view of x)."""
    torch.backends.cudnn.benchmark = True
    C, H, W = layer.in_shape
    Co, Ho, Wo = layer.out_shape
    xi = x.view(-1, H, W, C).permute(0, 3, 1, 2)  # channels_last view of the flat input
    gi = dy.view(-1, Ho, Wo, Co).permute(0, 3, 1, 2)
    w = conv.weight.detach().to(memory_format=torch.channels_last)
    b = conv.bias.detach()
    args = (conv.stride, conv.padding, conv.dilation, False, [0, 0], conv.groups)
    cb = torch.ops.aten.convolution_backward
    try_bench(rows, "cuDNN conv2d", "forward", lambda: F.conv2d(xi, w, b, conv.stride, conv.padding))
    try_bench(rows, "cuDNN conv2d", "grad_input", lambda: cb(gi, xi, w, None, *args, [True, False, False]))
    try_bench(rows, "cuDNN conv2d", "grad_weight", lambda: cb(gi, xi, w, None, *args, [False, True, True]))
    leaves = [t.clone().requires_grad_() for t in (xi, w, b)]
    try_bench(rows, "cuDNN conv2d", "fwd_bwd", lambda: torch.autograd.grad(
        F.conv2d(leaves[0], leaves[1], leaves[2], conv.stride, conv.padding), leaves, gi))


def anchor_dense(rows, lay, values, bias, x, dy):
    """The dense eFCN (the paper's layer): F.linear with the full (M, N) matrix, if it fits."""
    M, N = lay.shape
    need = 3.5 * M * N * values.element_size() + 2 * 2**30
    free = torch.cuda.mem_get_info()[0] if DEV.type == "cuda" else 8 * 2**30
    if need > free or left() < 60:
        NOTES.append(f"dense eFCN anchor skipped: needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free, "
                     f"{left():.0f} s left")
        return
    Wd = lay.to_dense(values, max_bytes=1 << 62)
    try_bench(rows, "dense eFCN F.linear", "forward", lambda: F.linear(x, Wd, bias))
    try_bench(rows, "dense eFCN F.linear", "grad_input", lambda: torch.mm(dy, Wd))
    try_bench(rows, "dense eFCN F.linear", "grad_weight", lambda: torch.mm(dy.t(), x))
    leaves = [x.clone().requires_grad_(), Wd.requires_grad_(), bias.clone().requires_grad_()]  # no copy of Wd
    try_bench(rows, "dense eFCN F.linear", "fwd_bwd", lambda: torch.autograd.grad(
        F.linear(leaves[0], leaves[1], leaves[2]), leaves, dy))
    del Wd, leaves


def anchor_torch_sparse(rows, lay, values, bias, x, dy):
    """torch.sparse BSR: F.linear(x, W_bsr); dX = F.linear(dy, W^T as BSR, kept alongside);
    dW = sampled_addmm on W's pattern. fwd_bwd is autograd through the values when torch
    supports it, else the sum of the three ops' medians (noted)."""
    name = "torch.sparse BSR"
    try:
        Wb = lay.to_torch_bsr(values)
        lt = lay.transpose()
        Wt = lt.to_torch_bsr(values[lay.t_perm.long()].transpose(1, 2).contiguous())
    except Exception as e:
        NOTES.append(f"{name} anchor skipped: {type(e).__name__}: {e}")
        return
    try_bench(rows, name, "forward", lambda: F.linear(x, Wb, bias))
    try_bench(rows, name, "grad_input", lambda: F.linear(dy, Wt))
    try_bench(rows, name, "grad_weight", lambda: torch.sparse.sampled_addmm(Wb, dy.t(), x, beta=0.0))
    leaf_v = values.clone().requires_grad_()
    leaf_x, leaf_b = x.clone().requires_grad_(), bias.clone().requires_grad_()

    def autograd_step():
        W = torch.sparse_bsr_tensor(Wb.crow_indices(), Wb.col_indices(), leaf_v, size=Wb.shape)
        return torch.autograd.grad(F.linear(leaf_x, W, leaf_b), [leaf_x, leaf_v, leaf_b], dy)

    n = len(rows)
    try_bench(rows, name, "fwd_bwd", autograd_step)
    if len(rows) == n:
        parts = [r["ms"] for r in rows if r["impl"] == name and r["op"] != "fwd_bwd"]
        if len(parts) == 3:
            rows.append(dict(impl=name, op="fwd_bwd", ms=sum(parts), note="sum of the three ops"))
            NOTES.append(f"{name} fwd_bwd: autograd through BSR values failed; reported the sum of the three ops")


def triton_configs():
    """The configurations the Triton autotuner chose, per kernel and key (for BENCHMARKS.md)."""
    try:
        from efcn_sparse.kernels import triton_bsr as tb
        tuned = {"forward": tb._tuned_forward, "grad_input": tb._tuned_grad_input, "grad_weight": tb._tuned_grad_weight}
        out = {k: {str(key): str(cfg) for key, cfg in t.cache.items()} for k, t in tuned.items() if t is not None}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
    for k, v in out.items():
        for key, cfg in v.items():
            log(f"autotuned {k} {key}: {cfg}")
    return out


# --------------------------------------------------------------------------- sanitizer and compile
def sanitize_case(backend):
    """A small case for compute-sanitizer: partial edge blocks, masks, odd batches; exit 1 on mismatch."""
    torch.manual_seed(0)
    k = backends.kernels(backends.resolve(backend, DEV))
    bad = 0
    half = torch.float16 if ARGS.smoke else torch.bfloat16  # the interpreter has no bfloat16
    for cin, cout, hw in ((24, 40, (5, 4)),) + (((64, 64, (4, 4)),) if not ARGS.smoke else ()):
        _, m = conv_layer(cin, cout, hw, 1, torch.float32)
        lay = m.layout
        for dtype in (torch.float32, half):
            vals = m.values.detach().to(dtype)
            for B in (7,) if ARGS.smoke else (7, 33):
                M, N = lay.shape
                x, dy, bias = (torch.randn(B, N, device=DEV, dtype=dtype), torch.randn(B, M, device=DEV, dtype=dtype),
                               torch.randn(M, device=DEV, dtype=dtype))
                got = run_three(k, lay, vals, x, dy, bias)
                exp = run_three(backends.kernels("reference"), lay, vals, x, dy, bias)
                for op in got:
                    e = rel_err(got[op], exp[op])
                    if not e <= tol(backend, dtype):
                        bad += 1
                        print(f"MISMATCH {backend} {op} {dtype} B={B}: {e}")
    print(f"SANITIZE_CASE {'OK' if not bad else 'FAILED'} {backend}")
    return 1 if bad else 0


def sanitizer_stage(backends_, out):
    tool_path = shutil.which("compute-sanitizer") or next(
        (p for p in ("/usr/local/cuda/bin/compute-sanitizer",) if os.path.exists(p)), None)
    runs = []
    if "cuda" in backends_:
        runs += [("cuda", "memcheck"), ("cuda", "racecheck")]
    if "triton" in backends_:
        runs += [("triton", "memcheck")]
    res = []
    if tool_path is None and not ARGS.smoke:
        NOTES.append("compute-sanitizer not found: sanitizer stage skipped")
        return res
    if "cuda" not in backends_:
        NOTES.append("cuda backend not available: its sanitizer runs skipped")
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1", EFCN_TRITON_AUTOTUNE="0")
    for backend, tool in runs:
        budget = min(240.0, left() - 30)
        if budget < 45:
            NOTES.append(f"sanitizer: skipped {tool} on {backend} (deadline)")
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--sanitize-case", backend, "--out", out]
        if ARGS.smoke:
            cmd.insert(2, "--smoke")  # no GPU here: run the case itself, without the sanitizer
        else:
            cmd = [tool_path, "--tool", tool, "--error-exitcode", "86", "--print-limit", "20"] + cmd
        logf = os.path.join(out, f"sanitizer_{backend}_{tool}.log")
        t = time.time()
        try:
            p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               timeout=budget)
            text, rc = p.stdout, p.returncode
        except subprocess.TimeoutExpired as e:
            text, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
        with open(logf, "w") as f:
            f.write(" ".join(cmd) + "\n" + text)
        summary = next((ln for ln in text.splitlines() if "ERROR SUMMARY" in ln or "RACECHECK SUMMARY" in ln), "")
        ok = rc == 0 and f"SANITIZE_CASE OK {backend}" in text
        log(f"sanitizer {'ok  ' if ok else 'FAIL'} {tool} {backend}: rc={rc} {summary.strip()} "
            f"({time.time() - t:.0f} s, log {logf})")
        if not ok:
            FAILURES.append(f"compute-sanitizer {tool} on {backend}: rc={rc} {summary.strip()}")
        res.append(dict(backend=backend, tool=tool, rc=rc, summary=summary.strip(), ok=ok))
    return res


def compile_stage(ref_layer):
    """torch.compile(fullgraph=True) over the triton_ops gives the eager result (GPU only)."""
    if DEV.type != "cuda" or not hasattr(torch.ops, "efcn_sparse_triton") or left() < 90:
        NOTES.append("torch.compile check of the triton_ops skipped (" +
                     ("no GPU" if DEV.type != "cuda" else "no triton_op or deadline") + ")")
        return None
    lay, values, _, dtype = ref_layer
    M, N = lay.shape
    BR, BC = lay.block_shape
    x = torch.randn(64, N, device=DEV, dtype=dtype)
    dy = torch.randn(64, M, device=DEV, dtype=dtype)
    bias = torch.randn(M, device=DEV, dtype=dtype)
    o = torch.ops.efcn_sparse_triton

    def f(x, values, bias, dy):
        y = o.forward(x, values, bias, lay.crow_ptr, lay.col_idx, M)
        dx = o.grad_input(dy, values, lay.ccol_ptr, lay.t_row_idx, lay.t_perm, N)
        dw = o.grad_weight(dy, x, lay.row_idx, lay.col_idx, lay.mask_ids, lay.mask_patterns, BR, BC)
        return y * 2, dx, dw  # an op after the kernel, for inductor to fuse around

    out = {}
    for mode in ("autotune", "heuristic"):
        os.environ["EFCN_TRITON_AUTOTUNE"] = "1" if mode == "autotune" else "0"
        try:
            torch._dynamo.reset()
            t = time.time()
            got = torch.compile(f, fullgraph=True)(x, values, bias, dy)
            exp = f(x, values, bias, dy)
            err = max(rel_err(a, e) for a, e in zip(got, exp))
            ok = err <= 1e-2
            out[mode] = dict(ok=ok, err=err, seconds=time.time() - t)
            log(f"torch.compile {'ok  ' if ok else 'FAIL'} triton_ops ({mode}): max rel err {err:.1e}, "
                f"{time.time() - t:.0f} s")
        except Exception as e:
            ok = False
            out[mode] = dict(ok=False, error=f"{type(e).__name__}: {str(e)[:500]}")
            log(f"torch.compile FAIL triton_ops ({mode}): {type(e).__name__}: {str(e)[:300]}")
        if not ok:
            FAILURES.append(f"torch.compile over the triton_ops ({mode}): {out[mode]}")
    os.environ.pop("EFCN_TRITON_AUTOTUNE", None)
    return out


# --------------------------------------------------------------------------- report
def floors(lay, B, elsize):
    """Bytes each op must move at least, and useful FLOPs (2 x batch x stored entries per GEMM)."""
    M, N = lay.shape
    BR, BC = lay.block_shape
    w = lay.nnzb * BR * BC * elsize
    xb, yb = B * N * elsize, B * M * elsize
    fl = 2 * B * lay.stored_entries()
    by = {"forward": w + xb + yb, "grad_input": w + yb + xb, "grad_weight": yb + xb + w}
    by["fwd_bwd"] = sum(by.values())
    return by, {"forward": fl, "grad_input": fl, "grad_weight": fl, "fwd_bwd": 3 * fl}


def table(rows, lay, B, elsize, bw, parity, dtype_name):
    by, fl = floors(lay, B, elsize)
    anchor = {(r["impl"], r["op"]): r["ms"] for r in rows}
    pmax = {}
    for p in parity:  # the timed case: reference layer, its batch and dtype
        if p["case"] == "ref-layer" and p["batch"] == B and p["dtype"] == dtype_name:
            for op, v in p["errors"].items():
                pmax[(p["backend"], op)] = v if isinstance(v, float) else math.inf
    lines = ["| impl | op | median ms | eff. TFLOP/s | eff. GB/s | x bytes floor | vs torch.sparse | vs dense eFCN "
             "| vs cuDNN | ref-layer parity |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]

    def ratio(name, r):
        a = anchor.get((name, r["op"]))
        return f"{a / r['ms']:.2f}x" if a else "-"

    for r in rows:
        ms, op = r["ms"], r["op"]
        floor_ms = by[op] / bw * 1e3
        par = pmax.get((r["impl"], op))
        par_s = "-" if par is None else (f"{par:.1e}" if par == par else "NaN")
        note = f" ({r['note']})" if r.get("note") else ""
        lines.append(f"| {r['impl']} | {op}{note} | {ms:.3f} | {fl[op] / ms / 1e9:.1f} | {by[op] / ms / 1e6:.0f} | "
                     f"{ms / floor_ms:.2f} | {ratio('torch.sparse BSR', r)} | {ratio('dense eFCN F.linear', r)} | "
                     f"{ratio('cuDNN conv2d', r)} | {par_s} |")
    return "\n".join(lines)


def goals(rows, lay, B, elsize, bw, backends_):
    by, _ = floors(lay, B, elsize)
    t = {(r["impl"], r["op"]): r["ms"] for r in rows}
    out = []
    for b in backends_:
        fb = t.get((b, "fwd_bwd"))
        for name, need, kind in (("torch.sparse BSR", 3.0, "required"), ("dense eFCN F.linear", 3.0, "required"),
                                 ("cuDNN conv2d", 0.5, "goal")):
            a = t.get((name, "fwd_bwd"))
            if fb and a:
                ok = a / fb >= need
                out.append(f"{kind} {'PASS' if ok else 'MISS'}: {b} fwd_bwd {a / fb:.2f}x faster than {name} "
                           f"(needs >= {need}x)")
        for op in ("forward", "grad_input", "grad_weight"):
            if (b, op) in t:
                x = t[(b, op)] / (by[op] / bw * 1e3)
                out.append(f"goal {'PASS' if x <= 1.5 else 'MISS'}: {b} {op} at {x:.2f}x its bytes floor (goal <= 1.5x)")
    return out


def main():
    os.makedirs(ARGS.out, exist_ok=True)
    if ARGS.sanitize_case:
        return sanitize_case(ARGS.sanitize_case)
    torch.manual_seed(SEED)
    env = dict(seed=SEED, device=torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu (smoke)",
               torch=torch.__version__, cuda=torch.version.cuda, python=sys.version.split()[0],
               triton=_version("triton"), extension=efcn_sparse._extension.error() or "loaded",
               available=efcn_sparse.available_backends(DEV))
    for name in backends.BACKENDS:
        env[f"reason_{name}"] = backends.unavailable_reason(name, DEV)
    log(f"environment: {json.dumps(env)}")
    backends_ = gpu_backends()
    if "triton" not in backends_:
        FAILURES.append(f"triton backend unavailable: {backends.unavailable_reason('triton', DEV)}")
    if ARGS.smoke:
        B, dtype, (cin, cout, hw) = 3, torch.float32, (16, 16, (4, 4))
    else:
        B, dtype, (cin, cout, hw) = 256, torch.bfloat16, (64, 64, (32, 32))
    conv, layer = conv_layer(cin, cout, hw, 0, dtype)
    lay = layer.layout
    log(f"reference layer: Conv2d {cin}->{cout} 3x3 pad 1 on {hw}, batch {B}, {dtype}, halo 0: shape {lay.shape}, "
        f"blocks {lay.block_shape}, nnzb {lay.nnzb}, stored entries {lay.stored_entries() / 1e6:.2f} M")
    ref_layer = (lay, layer.values.detach(), B, dtype)
    results = dict(env=env, parity=[], timing=[], sanitizer=[], compile=None)
    bw = copy_bandwidth()
    results["copy_bandwidth_GBps"] = bw / 1e9
    log(f"device copy bandwidth: {bw / 1e9:.0f} GB/s (read + write)")

    def stage(name, fn):
        try:
            fn()
        except Exception as e:
            FAILURES.append(f"stage {name} crashed: {type(e).__name__}: {e}")
            log(traceback.format_exc())

    # order by priority; the sanitizer subprocesses run beside the untimed stages, never beside timings
    stage("parity", lambda: parity_case("ref-layer", lay, ref_layer[1], backends_, B, dtype, with_autograd=True,
                                        results=results["parity"]))
    stage("timing", lambda: results["timing"].extend(timing_stage(conv, layer, B, dtype, backends_)))
    results["triton_configs"] = triton_configs()
    san = threading.Thread(target=stage, args=("sanitizer", lambda: results["sanitizer"].extend(
        sanitizer_stage(backends_, ARGS.out))), daemon=True)
    san.start()
    stage("parity (small cases)", lambda: small_parity_stage(ref_layer, backends_, results["parity"]))
    stage("compile", lambda: results.__setitem__("compile", compile_stage(ref_layer)))
    san.join(timeout=max(1.0, DEADLINE - time.time()))
    if san.is_alive():
        FAILURES.append("sanitizer stage still running at the deadline")

    el = layer.values.element_size()
    g = goals(results["timing"], lay, B, el, bw, backends_)
    tab = table(results["timing"], lay, B, el, bw, results["parity"], str(dtype).replace("torch.", ""))
    results.update(notes=NOTES, failures=FAILURES, goals=g, table=tab, seconds=time.time() - T0)
    with open(os.path.join(ARGS.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    header = (f"**{env['device']}**, torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}, Python "
              f"{env['python']}; reference layer Conv2d {cin}->{cout} 3x3, {hw[0]}x{hw[1]}, batch {B}, "
              f"{str(dtype).replace('torch.', '')}, halo 0 ({lay.stored_entries() / 1e6:.1f} M stored entries, "
              f"blocks {lay.block_shape[0]}x{lay.block_shape[1]}); copy bandwidth {bw / 1e9:.0f} GB/s; "
              f"useful FLOPs = 2 x batch x stored entries per GEMM; bytes floor = weights + input + output per op")
    with open(os.path.join(ARGS.out, "table.md"), "w") as f:
        f.write(header + "\n\n" + tab + "\n")
    print()
    for line in NOTES:
        print("note:", line.strip().splitlines()[0] if "Traceback" not in line else line.strip())
    for line in g:
        print(line)
    print(f"\n{len(FAILURES)} failure(s)" + "".join(f"\n  FAIL: {f}" for f in FAILURES))
    print(f"\n{header}\n\n{tab}")
    return 1 if FAILURES else 0


def _version(mod):
    try:
        return __import__(mod).__version__
    except Exception as e:
        return f"unavailable ({type(e).__name__})"


if __name__ == "__main__":
    sys.exit(main())
