"""The machine's measured ceilings, in the same run as the layers: a 2048^3 float32 torch.mm
(GFLOP/s) and a large tensor copy (GB/s, read + write). Run at the start and again at the end,
so the report can show how much the shared machine's speed drifted."""

from __future__ import annotations

import pytest
import torch

from . import benchlib as bl

WHEN = [pytest.param("start", id="start"), pytest.param("end", id="end", marks=pytest.mark.efcn_run_last)]


@pytest.mark.parametrize("when", WHEN)
def test_mm_rate(benchmark, when):
    n = 2048 if bl.FULL else 128
    bl.seed("mm")
    a = torch.randn(n, n, device=bl.DEVICE, dtype=bl.DTYPE)
    b = torch.randn(n, n, device=bl.DEVICE, dtype=bl.DTYPE)
    ref = (a.double() @ b.double()).to(bl.DTYPE)

    def check(c):
        bl.assert_close(c, ref, "torch.mm", tol=1e-5)
    bl.measure(benchmark, lambda: torch.mm(a, b), check, group="calibration",
               info=dict(calibration="mm", when=when, n=n, flops=2 * n**3, bytes=3 * n * n * bl.DTYPE.itemsize))


@pytest.mark.parametrize("when", WHEN)
def test_copy_bandwidth(benchmark, when):
    numel = (64 if bl.FULL else 1) * 2**20  # 256 MiB read + 256 MiB written (full): far beyond the caches
    src = torch.randn(numel, device=bl.DEVICE, dtype=bl.DTYPE)
    dst = torch.empty_like(src)

    def check(out):
        assert torch.equal(out, src), "copy differs"
    bl.measure(benchmark, lambda: dst.copy_(src), check, group="calibration",
               info=dict(calibration="copy", when=when, numel=numel, flops=0, bytes=2 * numel * bl.DTYPE.itemsize))
