#!/usr/bin/env python3
"""Turn a saved benchmark run (pytest-benchmark JSON from ``pytest benchmarks/ --benchmark``) into
BENCHMARKS.md: machine, versions, date; per layer the median times, ratios to the conv and to each
anchor, effective GFLOP/s against the measured torch.mm rate and GB/s against the measured copy
bandwidth; the training-step, memory and largest-eFCN tables; and the GPU tables.

Usage: python benchmarks/report.py [RUN.json] [-o BENCHMARKS.md]
(default: the newest benchmarks/results/bench-*.json). Standard library only.

GPU tables come from ``benchmarks/gpu_check.sh``: save its final Markdown table as
``benchmarks/results/gpu/<card>.md`` (first line: a heading naming the card and versions) and they
are included here; without such files, a GPU section already in BENCHMARKS.md is kept as it is.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GPU_BEGIN, GPU_END = "<!-- gpu-tables:begin -->", "<!-- gpu-tables:end -->"
OPS = ("forward", "grad_input", "grad_weight", "fwd_bwd")
ANCHOR_COLS = ("conv", "conv_nchw", "dense", "torch_bsr_linear", "torch_sparse_mm", "scipy_bsr", "unfold_lc")
ANCHOR_DOC = {
    "conv": "`F.conv2d` on the channels_last view of the eFCN's NHWC input (grads via `aten.convolution_backward`)",
    "conv_nchw": "`F.conv2d` on a contiguous NCHW input",
    "dense": "the paper's dense eFCN: `F.linear` on the (M, N) matrix (only where it fits in 2 GiB)",
    "torch_bsr_linear": "`F.linear(x, torch.sparse_bsr_tensor)` (MKL; non-square blocks split into gcd-square ones)",
    "torch_sparse_mm": "`torch.sparse.mm(bsr, x.T).T` (same tensor)",
    "scipy_bsr": "`scipy.sparse.bsr_matrix @ x.T` (float32)",
    "unfold_lc": "locally connected layer (the usual eLCN): `F.unfold` + per-position weights in one batched "
                 "matmul (kernel k + 2*halo)",
}
CONV_OF = {"forward": ("conv", "conv_nchw"), "grad_input": ("conv",), "grad_weight": ("conv",),
           "fwd_bwd": ("conv", "conv_nchw")}
# GEMMs per op: forward+backward (and a training step) is forward + grad_input + grad_weight
GEMMS = {"forward": 1, "grad_input": 1, "grad_weight": 1, "fwd_bwd": 3, "train_step": 3}
CONV_IMPLS = ("conv", "conv_nchw")  # anchors whose useful work is the conv's own taps


def fmt_t(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} µs"


def fmt_b(n) -> str:
    if n is None:
        return "—"
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def fmt_x(r) -> str:
    return "—" if r is None else (f"{r:.2f}×" if r < 100 else f"{r:.0f}×")


def newest_run() -> Path:
    runs = sorted((HERE / "results").glob("bench-*.json"))
    if not runs:
        sys.exit("no benchmarks/results/bench-*.json: run `pytest benchmarks/ --benchmark` first")
    return runs[-1]


class Run:
    """The saved run, indexed: rows with their median, and the calibration rates."""

    def __init__(self, data: dict):
        self.data = data
        self.efcn = data.get("efcn", {})
        self.session = self.efcn.get("session", {})
        self.records = self.efcn.get("records", {})
        self.rows = []
        for b in data["benchmarks"]:
            info = dict(b.get("extra_info", {}))
            st = b["stats"]
            info.update(name=b["name"], median=st["median"], iqr=st.get("iqr", 0.0), rounds=st["rounds"],
                        min=st["min"], max=st["max"])
            self.rows.append(info)
        cal = lambda kind: [r for r in self.rows if r.get("calibration") == kind]  # noqa: E731
        self.mm = {r["when"]: r["flops"] / r["median"] for r in cal("mm")}
        self.copy = {r["when"]: r["bytes"] / r["median"] for r in cal("copy")}
        # the best of the start/end calibrations: what the machine reaches when it is not shared
        self.mm_rate = max(self.mm.values()) if self.mm else None
        self.bw = max(self.copy.values()) if self.copy else None

    def layer_rows(self, layer):
        return [r for r in self.rows if r.get("layer") == layer]

    def layers(self):
        seen = []
        for r in self.rows:
            if r.get("layer") and r["layer"] not in seen:
                seen.append(r["layer"])
        return seen

    @staticmethod
    def useful_flops(r) -> float:
        """Useful FLOPs of a layer row: GEMMS[op] x 2 x batch x entries (the conv's own entries for the
        conv anchors, the stored entries otherwise), recomputed from the row's counts so that every
        derived column counts forward+backward as three GEMMs whatever the run recorded."""
        if "batch" not in r or "stored" not in r or r.get("op") not in GEMMS:
            return r.get("flops") or 0
        entries = r.get("conv_entries", r["stored"]) if r.get("impl") in CONV_IMPLS else r["stored"]
        return GEMMS[r["op"]] * 2 * r["batch"] * entries

    def rate(self, flops, seconds):
        """(GFLOP/s, fraction of the mm rate or None)."""
        gf = flops / seconds / 1e9
        return gf, (gf * 1e9 / self.mm_rate if self.mm_rate else None)

    def paired(self, backend, layer, op):
        """The paired record of ``backend``'s eFCN against the conv for (layer, op), or None."""
        for p in self.records.get("paired", []):
            if (p["backend"], p["layer"], p["op"], p["anchor"]) == (backend, layer, op, "conv"):
                return p
        return None

    @staticmethod
    def find(rows, impl, op):
        for r in rows:
            if r.get("impl") == impl and r.get("op") == op:
                return r
        return None

    def conv_time(self, rows, op):
        """The best conv (channels_last or NCHW input) for ``op``: the speed to reach."""
        ts = [r["median"] for c in CONV_OF[op] if (r := self.find(rows, c, op))]
        return min(ts) if ts else None

    def floor(self, r):
        """Time floor of a row: its useful FLOPs at the mm rate or its bytes at the copy bandwidth."""
        parts = []
        flops = self.useful_flops(r)
        if self.mm_rate and flops:
            parts.append(flops / self.mm_rate)
        if self.bw and r.get("bytes") and r.get("kind") == "efcn":
            parts.append(r["bytes"] / self.bw)
        return max(parts) if parts else None


# ----------------------------------------------------------------------------- sections
def section_header(run: Run, src: Path) -> list:
    s = run.session
    mi = run.data.get("machine_info", {})
    v = s.get("versions", {})
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `python benchmarks/report.py` from `{src.relative_to(ROOT) if src.is_relative_to(ROOT) else src}`"
        " "
        f"(`pytest benchmarks/ --benchmark`). Do not edit by hand: rerun the suite and the report.",
        "",
        "## Machine and run",
        "",
        f"- Date: {s.get('date', run.data.get('datetime', '?'))}; git {s.get('git', '?')}",
        f"- CPU: {s.get('cpu_model', mi.get('cpu', {}).get('brand_raw', '?'))}, "
        f"{s.get('cpu_count', '?')} logical cores "
        f"(affinity {s.get('cpu_affinity', '?')}), torch threads {s.get('torch_threads', '?')}, "
        f"memory {fmt_b(s.get('memory_bytes'))}",
        f"- {s.get('platform', mi.get('system', '?'))}, Python {s.get('python', mi.get('python_version', '?'))}",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + f", efcn_sparse {s.get('efcn_sparse', '?')}",
        f"- Device {s.get('device', 'cpu')}; backends benchmarked: "
        f"{', '.join(s.get('backends_benchmarked', [])) or '—'}"
        + "".join(f"; `{b}` unavailable ({why})" for b, why in s.get("backends_unavailable", {}).items()),
        f"- Wall time of the whole run: {s['wall_s'] / 60:.1f} min" if "wall_s" in s else "- Wall time: ?",
    ]
    if run.mm:
        lines.append("- Measured ceilings (same run): 2048³ float32 `torch.mm` "
                     + ", ".join(f"{w} {r / 1e9:.1f}" for w, r in run.mm.items()) + " GFLOP/s; copy bandwidth "
                     + ", ".join(f"{w} {r / 1e9:.1f}" for w, r in run.copy.items()) + " GB/s (read + write). "
                     f"The report uses the best of each, {run.mm_rate / 1e9:.1f} GFLOP/s and {run.bw / 1e9:.1f} GB/s, "
                     "as the machine's ceilings (rows timed while the machine was busy fall well short of them).")
    ls, le = s.get("load_start"), s.get("load_end")
    lines += [
        "",
        "**Noise.** This machine's cores are shared with other work"
        + (f" (1-minute load average {ls[0]:.1f} at the start, {le[0]:.1f} at the end, on {s.get('cpu_count')} cores)"
           if ls and le else "")
        + ": absolute times are noisy. Quote medians and ratios (each ratio compares two medians from the same "
        "run, minutes apart at most); the IQR column shows each row's spread, and the start/end calibrations "
        "above show how much the machine's speed drifted over the run. Nothing asserts on absolute time.",
        "",
    ]
    return lines


def section_method() -> list:
    return [
        "## Method",
        "",
        "- Reproduce: `pytest benchmarks/ --benchmark` (saves `benchmarks/results/bench-<date>.json`), then "
        "`python benchmarks/report.py`. Without `--benchmark` the same benchmarks run once each at tiny sizes as "
        "a correctness check (CI). `EFCN_BENCH_BACKENDS=cpu,reference` restricts the backends; Triton is never "
        "benchmarked through its CPU interpreter.",
        "- Each benchmarked function runs once as a warm-up whose result is checked against the conv (outputs, "
        "input and weight gradients; the eFCN weight gradient summed over positions must equal the conv's, and "
        "equal the dense or reference result entry by entry), then pytest-benchmark times it: at least 5 rounds "
        "(3 when one call takes 2 s or more), about 3 s in all, one call per round; the tables give the median.",
        "- float32 throughout. Inputs are NHWC-flat `[B, H*W*C]` (the eFCN's convention); the conv sees the "
        "same memory as a channels_last view. `× conv` is the ratio to the best conv anchor for the same op "
        "(channels_last or NCHW input): below 1 the row is faster than the conv.",
        "- Useful FLOPs = 2 × batch × stored entries per GEMM (3 GEMMs for forward+backward); for the conv "
        "anchors, its own taps × C_out × C_in (equal to the eFCN's at halo 0). Effective GFLOP/s = useful "
        "FLOPs / median; `% mm` compares it to the measured `torch.mm` rate.",
        "- Bytes floor (eFCN rows) = values once + activations in and out once per op; GB/s = floor bytes / "
        "median. `× floor` = median / max(useful FLOPs at the mm rate, floor bytes at the copy bandwidth).",
        "- Anchors: " + "; ".join(f"`{k}`: {v}" for k, v in ANCHOR_DOC.items()) + ".",
        "",
    ]


def section_headline(run: Run) -> list:
    backends = [r["backend"] for r in run.rows if r.get("kind") == "efcn" and r.get("layer") == "L2"
                and r.get("op") == "fwd_bwd"]
    if not backends:
        return []
    out = ["## Headline (issue 6 criteria, CPU)", "",
           "| backend | L2 fwd+bwd × conv (req. ≤ 2.0, goal ≤ 1.0) | L2 fwd+bwd useful GFLOP/s, 3 GEMMs (% mm) "
           "| L2-16px: dense fwd+bwd ÷ eFCN (req. ≥ 20) "
           "| L2-16px forward: torch BSR F.linear ÷ eFCN / torch.sparse.mm ÷ eFCN "
           "/ scipy ÷ eFCN (req. ≥ 20) |",
           "|---|---|---|---|---|"]
    L2, L16 = run.layer_rows("L2"), run.layer_rows("L2-16px")
    for b in backends:
        e = run.find(L2, f"efcn[{b}]", "fwd_bwd")
        c = run.conv_time(L2, "fwd_bwd")
        pe = run.paired(b, "L2", "fwd_bwd")
        gf, frac = run.rate(run.useful_flops(e), pe["efcn_median"] if pe else e["median"])
        pct = (f" ({100 * frac:.0f}%)" if frac is not None else "") + (" paired" if pe else "")
        ef16 = run.find(L16, f"efcn[{b}]", "fwd_bwd")
        d16 = run.find(L16, "dense", "fwd_bwd")
        f16 = run.find(L16, f"efcn[{b}]", "forward")
        sp = [run.find(L16, a, "forward") for a in ("torch_bsr_linear", "torch_sparse_mm", "scipy_bsr")]
        spd = " / ".join(fmt_x(a["median"] / f16["median"]) if a and f16 else "—" for a in sp)
        out.append(f"| {b} | {fmt_x(e['median'] / c) if c else '—'} | {gf:.1f}{pct} | "
                   f"{fmt_x(d16['median'] / ef16['median']) if d16 and ef16 else '—'} | {spd} |")
    out += ["", "Ratios here are anchor time ÷ eFCN time where the requirement is a speed-up (≥), and eFCN ÷ conv "
            "where it is a bound (≤); each is a ratio of two medians from the per-layer tables below. The GFLOP/s "
            "column uses the eFCN's median from the paired rounds below where they exist (marked `paired`), else "
            "the per-layer median.", ""]
    paired = run.records.get("paired", [])
    if paired:
        out += ["Paired measurements of the same comparisons: the eFCN and the anchor timed in alternating rounds, "
                "the ratio taken per pair (eFCN ÷ anchor, below 1: the eFCN is faster), median and range over the "
                "pairs. These are the numbers to trust on a loaded machine. `fwd_bwd_bf16_autocast`: the module's "
                "forward+backward as a bfloat16 `torch.autocast` training step runs it (float32 master weights, "
                "gradients into them and the input), the conv under the same autocast; its GFLOP/s count fwd_bwd's "
                "useful work, against the float32 mm.", "",
                "| layer | op | backend | anchor | pairs | eFCN ÷ anchor (median) | range | anchor ÷ eFCN | "
                "eFCN median | anchor median | eFCN GFLOP/s (% mm) | anchor GFLOP/s (% mm) |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for p in paired:
            rows = run.layer_rows(p["layer"])
            cells = []
            # an op named fwd_bwd_<variant> (e.g. _bf16_autocast) does fwd_bwd's useful work; an anchor
            # "conv (autocast)" is the conv's
            op = "fwd_bwd" if p["op"].startswith("fwd_bwd") else p["op"]
            for impl, t in ((f"efcn[{p['backend']}]", p["efcn_median"]), (p["anchor"].split(" (")[0], p["anchor_median"])):
                r = run.find(rows, impl, op)
                gf, frac = run.rate(run.useful_flops(r), t) if r else (None, None)
                cells.append("—" if gf is None else f"{gf:.1f}" + (f" ({100 * frac:.0f}%)" if frac is not None else ""))
            out.append(f"| {p['layer']} | {p['op']} | {p['backend']} | {p['anchor']} | {p['pairs']} | "
                       f"{fmt_x(p['ratio_median'])} | {fmt_x(p['ratio_min'])}–{fmt_x(p['ratio_max'])} | "
                       f"{fmt_x(1 / p['ratio_median'])} | {fmt_t(p['efcn_median'])} | {fmt_t(p['anchor_median'])} | "
                       + " | ".join(cells) + " |")
        out.append("")
    return out


def section_layers(run: Run) -> list:
    out = ["## Layers", ""]
    for layer in run.layers():
        rows = run.layer_rows(layer)
        r0 = rows[0]
        BR, BC = r0["block_shape"]
        out += [f"### {layer}: {r0['describe']}", "",
                f"eFCN matrix {r0['M']} × {r0['N']}, blocks {BR} × {BC}, {r0['nnzb']} stored blocks, "
                f"{r0['stored']:,} trainable entries (density {r0['density']:.4%}); dense matrix "
                f"{fmt_b(r0['dense_bytes'])}. Useful work per forward: "
                f"{2 * r0['batch'] * r0['stored'] / 1e9:.2f} GFLOP.",
                "",
                "| op | implementation | median | IQR | rounds | × conv | GFLOP/s | % mm | GB/s | × floor |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for op in OPS:
            conv = run.conv_time(rows, op)
            for r in sorted((r for r in rows if r["op"] == op), key=lambda r: (r["kind"] != "efcn", r["impl"])):
                gf, frac = run.rate(run.useful_flops(r), r["median"])
                pct = f"{100 * frac:.0f}%" if frac is not None else "—"
                gbs = f"{r['bytes'] / r['median'] / 1e9:.1f}" if r["kind"] == "efcn" else "—"
                fl = run.floor(r)
                name = f"**{r['impl']}**" if r["kind"] == "efcn" else r["impl"]
                out.append(f"| {op} | {name} | {fmt_t(r['median'])} | {100 * r['iqr'] / r['median']:.0f}% | "
                           f"{r['rounds']} | {fmt_x(r['median'] / conv) if conv else '—'} | {gf:.1f} | {pct} | "
                           f"{gbs} | "
                           f"{fmt_x(r['median'] / fl) if fl and r['kind'] == 'efcn' else '—'} |")
        efcn = [r for r in rows if r["kind"] == "efcn"]
        if efcn:
            cols = [a for a in ANCHOR_COLS if any(r["impl"] == a for r in rows)]
            out += ["", "eFCN time ÷ anchor time, same op (below 1: the eFCN is faster):", "",
                    "| eFCN | op | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
            for r in sorted(efcn, key=lambda r: (r["impl"], OPS.index(r["op"]))):
                cells = []
                for a in cols:
                    ar = run.find(rows, a, r["op"])
                    cells.append(fmt_x(r["median"] / ar["median"]) if ar else "—")
                out.append(f"| {r['impl']} | {r['op']} | " + " | ".join(cells) + " |")
        sk = skipped_in(run, layer)
        if sk:
            out += ["", "Not run: " + "; ".join(f"`{impl}` {', '.join(ops)}: {why}" for (impl, why), ops in sk.items())
                    + "."]
        out.append("")
    return out


def skipped_in(run: Run, layer: str) -> dict:
    """(implementation, reason) -> ops skipped for ``layer`` (test ids are test_layer[<layer>-<impl>-<op>])."""
    layers = run.layers()
    out = {}
    for key, why in run.records.get("skipped", {}).items():
        if not key.startswith("test_layer["):
            continue
        inner = key[len("test_layer["):-1]
        owners = [name for name in layers if inner.startswith(name + "-")]
        if not owners or max(owners, key=len) != layer:
            continue
        impl, _, op = inner[len(layer) + 1:].rpartition("-")
        out.setdefault((impl, why), []).append(op)
    return out


def section_models(run: Run) -> list:
    rows = [r for r in run.rows if r.get("op") == "train_step"]
    if not rows:
        return ["## Training step of whole models", "", "Not measured in this run"
                + (f" ({next(iter(v for k, v in run.records.get('skipped', {}).items() if 'train_step' in k))})"
                   if any("train_step" in k for k in run.records.get("skipped", {})) else "") + ".", ""]
    out = ["## Training step of whole models", "",
           "One SGD step (momentum 0.9, cross-entropy) on 3×32×32 inputs: the CNN, its sparse eFCN (halo 0, "
           "`efcn_sparse.embed`) per backend and the authors' dense eFCN (`nn.Linear` per conv); rows marked "
           "`bf16 autocast` run the forward under `torch.autocast(dtype=torch.bfloat16)` (float32 master "
           "weights), × CNN against the CNN's step under the same autocast. GFLOP/s counts "
           "the convs' useful work (3 GEMMs × 2 × batch × stored entries).", "",
           "| model | variant | batch | median | IQR | × CNN | conv GFLOP/s |", "|---|---|---|---|---|---|---|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        mr = [r for r in rows if r["model"] == model]
        for r in mr:
            prec = r.get("precision", "fp32")
            cnn = next((c["median"] for c in mr if c["variant"] == "cnn" and c.get("precision", "fp32") == prec), None)
            out.append(f"| {model} | {r['impl']} | {r['batch']} | {fmt_t(r['median'])} | "
                       f"{100 * r['iqr'] / r['median']:.0f}% | {fmt_x(r['median'] / cnn) if cnn else '—'} | "
                       f"{r['conv_flops'] / r['median'] / 1e9:.1f} |")
    return out + [""]


def section_memory(run: Run) -> list:
    mem = run.records.get("memory", {})
    out = ["## Memory", ""]
    if not mem:
        out += ["Not measured in this run" + (" (efcn_sparse.models / embed not importable)" if "skipped" in run.records
                                              else "") + ".", ""]
    else:
        first = next(iter(mem.values()))
        backend = f"; the sparse eFCN runs the `{first['backend']}` backend" if first.get("backend") else ""
        out += [f"Peak resident memory (RSS) above the level before each phase, measured with Linux's VmHWM reset "
                f"through /proc/self/clear_refs ({first['method']}{backend}): building the variant from the CNN, "
                f"then its first SGD training step (momentum buffers created, batch {first['batch']}). "
                "`weights` and `train state` are computed from tensor sizes (parameters; parameters + gradients + "
                "momentum + layout index tensors).", "",
                "| model | variant | weights | index | train state (computed) | build peak | train-step peak | "
                "rel. error vs CNN |", "|---|---|---|---|---|---|---|---|"]
        for model, m in mem.items():
            for v, r in m["variants"].items():
                out.append(f"| {model} | {v} | {fmt_b(r['param_bytes'])} | {fmt_b(r['buffer_bytes'])} | "
                           f"{fmt_b(r['train_state_bytes'])} | {fmt_b(r['build']['peak_bytes'])} | "
                           f"{fmt_b(r['train_step']['peak_bytes'])} | {r['rel_err']:.1e} |")
            if not m["dense_measured"]:
                out.append(f"| {model} | efcn_dense | {fmt_b(m['dense_entries'] * 4)} (computed) | — | "
                           f"{fmt_b(m['dense_computed_train_state_bytes'])} (computed) | not built | not built | — |")
        out.append("")
    lg = run.records.get("largest_24gib")
    if lg:
        out += ["### Largest eFCN that fits in 24 GiB (computed estimate)", "",
                f"Largest square input side S whose eFCN training state fits in 24 GiB; {lg['note']}. Stored "
                "entries are exact counts (checked against `SparseEFCN.from_conv` and `embed`).", "",
                "| network | halo | largest S | entries at S | train state at S |", "|---|---|---|---|---|"]
        for r in lg["rows"]:
            out.append(f"| {r['network']} | {r['halo']} | {r['largest_side']} | {r['entries']:,} | "
                       f"{fmt_b(r['train_state_bytes'])} |")
        out.append("")
    return out


def section_gpu(existing: str) -> list:
    files = sorted((HERE / "results" / "gpu").glob("*.md"))
    if files:
        body = []
        for f in files:
            body += [f.read_text().rstrip(), ""]
    elif GPU_BEGIN in existing and GPU_END in existing:
        body = existing.split(GPU_BEGIN, 1)[1].split(GPU_END, 1)[0].strip("\n").splitlines()
    else:
        body = ["Not yet measured. `benchmarks/gpu_check.sh` (the Triton issue) times each op and forward+backward "
                "against cuDNN's conv, the dense eFCN and torch.sparse BSR on a GPU machine; save its final table as "
                "`benchmarks/results/gpu/<card>.md` and rerun this report.", ""]
    return ["## GPU", "", GPU_BEGIN] + body + [GPU_END, ""]


def render(run: Run, src: Path, existing: str = "") -> str:
    lines = (section_header(run, src) + section_headline(run) + section_layers(run) + section_models(run)
             + section_memory(run) + section_gpu(existing) + section_method())
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="?", type=Path, help="a saved run (default: newest benchmarks/results/bench-*.json)")
    ap.add_argument("-o", "--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = ap.parse_args(argv)
    src = (args.json or newest_run()).resolve()
    run = Run(json.loads(src.read_text()))
    existing = args.output.read_text() if args.output.exists() else ""
    args.output.write_text(render(run, src, existing))
    print(f"wrote {args.output} from {src}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
