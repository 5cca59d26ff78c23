"""Memory: peak resident memory of building the paper's CNN and AlexNet as eFCNs (sparse, halo 0,
against the authors' dense nn.Linear eFCN) and of one SGD training step, measured by
``memprobe.py`` (peak RSS, in a subprocess per variant under --benchmark, in-process in the smoke
run); and the largest eFCN that fits in 24 GiB, computed from exact stored-entry counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.nn as nn

from . import benchlib as bl

from . import modelkit

PROBE = Path(__file__).resolve().parent / "memprobe.py"
BUDGET_24 = 24 * bl.GiB
TRAIN_BYTES_PER_ENTRY = 12  # float32 value + gradient + SGD momentum
MEASURE_BUDGET = float(os.environ.get("EFCN_BENCH_MEM_BUDGET_GIB", "8")) * bl.GiB


def _probe(model: str, variants, full: bool) -> dict:
    if not full:  # smoke: the same code in this process (no interpreter start-up)
        from . import memprobe

        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            memprobe.main(["--model", model, "--variants", ",".join(variants), "--no-gc"])
        return json.loads(buf.getvalue())
    res = subprocess.run([sys.executable, str(PROBE), "--model", model, "--variants", ",".join(variants), "--full"],
                         capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, f"memprobe failed for {model} {variants}:\n{res.stderr[-3000:]}"
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("model", ["paper_cnn", "alexnet"])
def test_memory_model(model):
    cfg = modelkit.model_config(model, bl.FULL)
    counts = modelkit.model_entries(model, cfg["kwargs"], cfg["input_shape"][1], 0)
    dense_need = counts["dense"] * 4 * 4  # matrix, gradient, momentum, construction copy
    variants = [v for v in modelkit.VARIANTS if v != "efcn_dense" or dense_need <= MEASURE_BUDGET]
    if bl.FULL:
        results = {}
        for v in variants:  # one process per variant: nothing left over from the previous one
            probe = _probe(model, [v], True)
            results.update(probe["variants"])
    else:
        probe = _probe(model, variants, False)
        results = probe["variants"]
    for v, r in results.items():
        assert r["rel_err"] <= bl.TOL, f"{model} {v}: output differs from the CNN by {r['rel_err']:.2e}"
        assert r["loss_finite"], f"{model} {v}: training step gave a non-finite loss"
    sparse = results["efcn_sparse"]
    assert sparse["param_bytes"] >= counts["stored"] * 4, "sparse eFCN holds fewer weights than its stored entries"
    if "efcn_dense" in results:
        assert results["efcn_dense"]["param_bytes"] > sparse["param_bytes"]
    bl.RECORDS.setdefault("memory", {})[model] = {
        "config": cfg, "batch": cfg["batch"], "backend": probe.get("backend"),
        "method": "one subprocess per variant" if bl.FULL else "in-process (smoke run)",
        "stored_entries": counts["stored"], "dense_entries": counts["dense"], "variants": results,
        "dense_measured": "efcn_dense" in results,
        "dense_computed_train_state_bytes": counts["dense"] * TRAIN_BYTES_PER_ENTRY,
    }


# ----------------------------------------------------------------------------- largest eFCN in 24 GiB
def _l2_entries(image_size: int, halo) -> dict:
    conv = nn.Conv2d(64, 64, 3, padding=1, device="meta")
    return modelkit.conv_entries(conv, (image_size, image_size), halo)


def _largest(entries_at, key: str, lo: int = 32, hi: int = 1 << 17) -> int:
    """Largest image side S in [lo, hi] whose training state (12 bytes per entry) fits in 24 GiB."""
    fits = lambda s: entries_at(s)[key] * TRAIN_BYTES_PER_ENTRY <= BUDGET_24  # noqa: E731
    if not fits(lo):
        return 0
    while lo < hi and fits(min(hi, lo * 2)):
        lo = min(hi, lo * 2)
    top = min(hi, lo * 2)
    while top - lo > 1:
        mid = (lo + top) // 2
        lo, top = (mid, top) if fits(mid) else (lo, mid)
    return lo


def test_entry_counts_exact():
    """The closed-form counts used below equal what SparseEFCN.from_conv stores (and embed, for the models)."""
    from efcn_sparse import SparseEFCN

    for halo in (0, 2, "full"):
        for (cin, cout, k, s, p, size) in ((64, 64, 3, 1, 1, 7), (3, 16, 4, 2, 2, 9), (16, 32, 5, 1, 0, 8)):
            conv = nn.Conv2d(cin, cout, k, stride=s, padding=p)
            got = SparseEFCN.from_conv(conv, (size, size), halo=halo).layout.stored_entries()
            assert got == modelkit.conv_entries(conv, (size, size), halo)["stored"], (cin, cout, k, s, p, size, halo)
    paper_cnn, alexnet, embed, _ = modelkit.import_models()
    from efcn_sparse import SparseEFCN

    for name, halo in (("paper_cnn", 2), ("alexnet", 0)):  # strided, explicit-pad and few-channel convs
        kw = dict(modelkit.model_config(name, False)["kwargs"])
        m = embed(modelkit.build_cnn(name, kw), (3, 32, 32), halo=halo)
        got = sum(l.layout.stored_entries() for l in m.modules() if isinstance(l, SparseEFCN))
        assert got == modelkit.model_entries(name, kw, 32, halo)["stored"], (name, halo)


def test_largest_efcn_in_24gib():
    """Computed estimate: the largest square input whose eFCN training state fits in 24 GiB."""
    rows = []
    targets = [("L2 conv 64->64 3x3 pad 1", lambda s, h: _l2_entries(s, h), 1)]
    for name in ("paper_cnn", "alexnet"):
        kw = modelkit.model_config(name, True)["kwargs"]  # full width: it is only counted, never built
        targets.append((f"{name} (width {kw['width']})",
                        lambda s, h, name=name, kw=kw: modelkit.model_entries(name, kw, s, h), 32))
    for label, entries, lo in targets:
        for halo in (0, 2, "full"):
            key = "dense" if halo == "full" else "stored"
            s = _largest(lambda size: entries(size, halo), key, lo=lo)
            e = entries(s, halo)[key] if s else 0
            rows.append({"network": label, "halo": str(halo), "largest_side": s, "entries": e,
                         "train_state_bytes": e * TRAIN_BYTES_PER_ENTRY})
    sparse = {r["network"]: r["largest_side"] for r in rows if r["halo"] == "0"}
    dense = {r["network"]: r["largest_side"] for r in rows if r["halo"] == "full"}
    for net in sparse:
        assert sparse[net] > dense[net], f"{net}: the sparse eFCN should fit at larger inputs than the dense one"
    bl.RECORDS["largest_24gib"] = {
        "budget_bytes": BUDGET_24, "bytes_per_entry": TRAIN_BYTES_PER_ENTRY,
        "note": "computed estimate: float32 values + gradient + SGD momentum of the conv layers' eFCNs; "
                "activations, the CNN's other layers and index tensors excluded", "rows": rows}
