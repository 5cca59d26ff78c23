"""Paired ratios for the headline comparisons: the eFCN and one anchor timed in alternating
rounds (order flipped every pair), the ratio taken per pair, then the median. On a shared machine
whose speed drifts by 2x within minutes this is far steadier than a ratio of two medians
measured minutes apart. Results go to the run's JSON (records.paired), not to pytest-benchmark.

The RGB input layer (L1) is also paired against itself stored in the wide tiles it had before
few-channel layers were stored tight (64x48 tiles spanning 16 pixels, mostly masked zeros): the
tight layout must be no slower."""

from __future__ import annotations

import dataclasses
import statistics
import time
import warnings

import pytest

from efcn_sparse.conv_geometry import choose_block_side

from . import benchlib as bl
from .test_bench_layers import BUILDERS

# (layer, op, anchor): the criteria
PAIRS = [
    ("L2", "fwd_bwd", "conv"),
    ("L2", "forward", "conv"),
    ("L2-16px", "fwd_bwd", "dense"),
    ("L2-16px", "forward", "torch_bsr_linear"),
    ("L2-16px", "forward", "torch_sparse_mm"),
    ("L2-16px", "forward", "scipy_bsr"),
]


def _backends():
    names = bl.backends_to_run()
    fast = [b for b in names if b != "reference"]
    return fast or names  # the reference backend only where nothing faster exists (its ratios are known-slow)


def _params():
    return [pytest.param(layer, op, anchor, b, id=f"{layer}-{op}-efcn_{b}-vs-{anchor}")
            for layer, op, anchor in PAIRS for b in _backends()]


def _timed(fn):
    t = time.perf_counter()
    fn()
    bl.sync()
    return time.perf_counter() - t


def _paired(fe, fa):
    """Per-pair times of fe and fa, alternating which runs first."""
    te, ta = [], []
    budget = 20.0 if bl.FULL else 0.0
    t_start = time.perf_counter()
    while len(te) < 15 and (len(te) < (5 if bl.FULL else 1) or time.perf_counter() - t_start < budget):
        order = ((fe, te), (fa, ta)) if len(te) % 2 == 0 else ((fa, ta), (fe, te))
        for fn, acc in order:
            acc.append(_timed(fn))
    return te, ta


def _record(layer, op, anchor, backend, te, ta, describe):
    ratios = [e / a for e, a in zip(te, ta)]
    bl.RECORDS.setdefault("paired", []).append(dict(
        layer=layer, op=op, anchor=anchor, backend=backend, pairs=len(ratios),
        ratio_median=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
        efcn_median=statistics.median(te), anchor_median=statistics.median(ta), describe=describe))


@pytest.mark.parametrize("layer,op,anchor,backend", _params())
def test_paired_ratio(layer, op, anchor, backend):
    case = next(c for c in bl.cases() if c.name == layer)
    st = bl.layer_state(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        fe, ce, _ = BUILDERS["efcn"](st, op, backend)
        fa, ca, _ = BUILDERS[anchor](st, op, None)  # skips when the anchor does not fit
        ce(fe())  # warm-up, checked
        ca(fa())
        te, ta = _paired(fe, fa)
    _record(layer, op, anchor, backend, te, ta, case.describe())


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("op", bl.OPS)
def test_paired_tight_vs_wide_tiles_on_the_rgb_input_layer(op, backend):
    case = next(c for c in bl.cases() if c.name == "L1")
    st = bl.layer_state(case)
    wide = (choose_block_side(case.cout), choose_block_side(case.cin))
    assert st.layout.block_shape == (case.cout, case.cin) != wide  # tight: one pixel per tile
    old = bl.LayerState(dataclasses.replace(case, name="L1-wide", block_shape=wide))
    fe, ce, _ = BUILDERS["efcn"](st, op, backend)
    fa, ca, _ = BUILDERS["efcn"](old, op, backend)
    ce(fe())  # warm-up, checked
    ca(fa())
    te, ta = _paired(fe, fa)
    _record("L1", op, f"efcn[{backend}], {wide[0]}x{wide[1]} tiles", backend, te, ta, case.describe())


@pytest.mark.parametrize("backend", _backends())
def test_paired_bf16_autocast_training_step(backend):
    """L2 forward+backward as a bfloat16 autocast training step runs it (module call on the image,
    backward into the float32 master weights and the input), against the conv under the same
    autocast; and, where the backend takes the float32 values uncast (ops.linear), against itself
    with the weights cast to a bfloat16 copy each step (as autocast did before): the same gradient
    bits, the copy's time saved."""
    from unittest import mock

    import torch

    from efcn_sparse import SparseEFCN, ops

    case = next(c for c in bl.cases() if c.name == "L2")
    st = bl.layer_state(case)
    m = SparseEFCN.from_conv(st.conv, (case.hw, case.hw), halo=case.halo, block_shape=case.block_shape,
                             backend=backend)
    conv = st.conv
    x_e, x_c = st.x_img.detach().requires_grad_(), st.x_nchw.detach().requires_grad_()
    gy_e, gy_c = st.gy_img.to(torch.bfloat16), st.gy_nchw.to(torch.bfloat16)

    def step(net, x, gy):
        net.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast(bl.DEVICE.type, dtype=torch.bfloat16):
            y = net(x)
        y.backward(gy)
        return y

    def cast_copy():
        with mock.patch.object(ops, "_keeps_float32_values", lambda *a: False):
            return step(m, x_e, gy_e)

    y_e, y_c = step(m, x_e, gy_e), step(conv, x_c, gy_c)
    assert y_e.dtype == y_c.dtype == torch.bfloat16
    bl.assert_close(st.flat(y_e.float()), st.flat(y_c.float()), "L2 bf16 autocast output vs conv", tol=2e-2)
    assert m.values.grad.dtype == torch.float32
    uncast = ops._keeps_float32_values(backend, st.x.to(torch.bfloat16), m.values, m.layout)
    te, ta = _paired(lambda: step(m, x_e, gy_e), lambda: step(conv, x_c, gy_c))
    _record("L2", "fwd_bwd_bf16_autocast", "conv (autocast)", backend, te, ta, case.describe())
    if uncast:
        g_uncast = m.values.grad.clone()
        cast_copy()
        assert torch.equal(m.values.grad, g_uncast)  # the same bits either way
        te, ta = _paired(lambda: step(m, x_e, gy_e), cast_copy)
        _record("L2", "fwd_bwd_bf16_autocast", f"efcn[{backend}], values cast to a bf16 copy", backend, te, ta,
                case.describe())
