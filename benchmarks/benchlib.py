"""Shared machinery of the benchmark suite: the layer cases (full and smoke sizes), the timing
harness, the FLOP and byte floors, and the correctness checks against the conv.

Every benchmarked function is run once as a warm-up whose result is checked against the conv
(or the reference backend), then timed by pytest-benchmark over several rounds; the report
takes medians. Nothing here asserts on absolute time.
"""

from __future__ import annotations

import gc
import math
import os
import time
import warnings
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

import efcn_sparse
from efcn_sparse import SparseEFCN, ops

FULL = False  # set by conftest: True under `pytest benchmarks/ --benchmark`
DEVICE = torch.device(os.environ.get("EFCN_BENCH_DEVICE", "cpu"))
DTYPE = torch.float32
GiB = 2**30
DENSE_BUDGET = 2 * GiB  # the dense eFCN anchor runs when its matrix fits in this
ANCHOR_BUDGET = 4 * GiB  # an anchor whose estimated working set passes this is skipped
TOL = 1e-4  # max |a - e| / max |e| in float32 (sums of up to a few thousand products)

RECORDS: Dict[str, dict] = {}  # non-timing results (memory, largest eFCN), written into the JSON

OPS = ("forward", "grad_input", "grad_weight", "fwd_bwd")


def backends_to_run():
    """Backends to benchmark on DEVICE: every available one, but never Triton's CPU interpreter.

    ``EFCN_BENCH_BACKENDS=reference,cpu`` restricts the list.
    """
    names = [b for b in efcn_sparse.available_backends(DEVICE) if not (b == "triton" and DEVICE.type == "cpu")]
    only = os.environ.get("EFCN_BENCH_BACKENDS")
    if only:
        names = [b for b in names if b in only.split(",")]
    return names


# ----------------------------------------------------------------------------- layer cases
@dataclass(frozen=True)
class LayerCase:
    """One Conv2d layer (padding k//2, stride 1) on hw x hw inputs with a batch, as an eFCN with ``halo``."""

    name: str
    cin: int
    cout: int
    k: int
    hw: int
    batch: int
    halo: Union[int, str] = 0
    block_shape: Optional[Tuple[int, int]] = None  # None: the package's choice

    def describe(self) -> str:
        blocks = "" if self.block_shape is None else f", blocks {self.block_shape[0]}x{self.block_shape[1]}"
        return (f"Conv {self.cin}->{self.cout} {self.k}x{self.k} pad {self.k // 2}, {self.hw}x{self.hw} input, "
                f"batch {self.batch}, halo {self.halo}{blocks}")


FULL_CASES = [
    LayerCase("L1", 3, 64, 3, 32, 128),
    LayerCase("L2", 64, 64, 3, 32, 128),
    LayerCase("L3", 128, 128, 3, 16, 128),
    LayerCase("L4", 64, 192, 5, 8, 128),
    LayerCase("L2-halo2", 64, 64, 3, 32, 128, halo=2),
    LayerCase("S-full", 32, 32, 3, 8, 128, halo="full"),
    LayerCase("L2-b1", 64, 64, 3, 32, 1),
    LayerCase("L2-b32", 64, 64, 3, 32, 32),
    LayerCase("L2-b512", 64, 64, 3, 32, 512),
    LayerCase("L2-16px", 64, 64, 3, 16, 128),
]

# the same structure (kernel, halo, few-channel input layer, batch 1) at sizes that run in seconds
SMOKE_CASES = [
    LayerCase("L1", 3, 16, 3, 6, 3),
    LayerCase("L2", 16, 16, 3, 6, 3),
    LayerCase("L3", 32, 32, 3, 4, 3),
    LayerCase("L4", 16, 48, 5, 4, 3),
    LayerCase("L2-halo2", 16, 16, 3, 6, 3, halo=2),
    LayerCase("S-full", 16, 16, 3, 4, 3, halo="full"),
    LayerCase("L2-b1", 16, 16, 3, 6, 1),
    LayerCase("L2-b32", 16, 16, 3, 6, 2),
    LayerCase("L2-b512", 16, 16, 3, 6, 5),
    LayerCase("L2-16px", 16, 16, 3, 4, 3),
]


def cases():
    return FULL_CASES if FULL else SMOKE_CASES


def seed(name: str) -> None:
    torch.manual_seed(zlib.crc32(name.encode()))


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach(), expected.detach()
    assert tuple(actual.shape) == tuple(expected.shape), f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().clamp(min=1e-30)
    return float(((actual - expected).abs().max() / scale).item())


def assert_close(actual, expected, what: str, tol: float = TOL) -> None:
    err = rel_err(torch.as_tensor(actual).to(expected.device, expected.dtype), expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


class LayerState:
    """Everything one layer case needs, built once: conv, eFCN, inputs, conv reference results."""

    def __init__(self, case: LayerCase):
        self.case = case
        seed(case.name)
        B, H, k = case.batch, case.hw, case.k
        self.pad = k // 2
        self.conv = nn.Conv2d(case.cin, case.cout, k, padding=self.pad).to(DEVICE, DTYPE)
        self.efcn = SparseEFCN.from_conv(self.conv, (H, H), halo=case.halo, block_shape=case.block_shape)
        self.layout = self.efcn.layout
        self.values = self.efcn.values.detach()
        self.bias = self.efcn.bias.detach()
        self.geo = self.efcn.geometry
        self.M, self.N = self.layout.shape
        self.BR, self.BC = self.layout.block_shape
        self.Ho, self.Wo = self.geo.out_size
        self.w = self.conv.weight.detach()
        self.b = self.conv.bias.detach()
        self.x = torch.randn(B, self.N, device=DEVICE, dtype=DTYPE)  # NHWC-flat, as the eFCN reads it
        self.gy = torch.randn(B, self.M, device=DEVICE, dtype=DTYPE)
        self.x_img = self.x.view(B, H, H, case.cin).permute(0, 3, 1, 2)  # channels_last view, no copy
        self.gy_img = self.gy.view(B, self.Ho, self.Wo, case.cout).permute(0, 3, 1, 2)
        self.x_nchw = self.x_img.contiguous()
        self.gy_nchw = self.gy_img.contiguous()
        # reference results: the conv on contiguous NCHW tensors
        xr = self.x_nchw.clone().requires_grad_()
        wr, br = self.w.clone().requires_grad_(), self.b.clone().requires_grad_()
        y = F.conv2d(xr, wr, br, padding=self.pad)
        gx, gw, gb = torch.autograd.grad(y, (xr, wr, br), self.gy_nchw)
        self.y_ref = self.flat(y.detach())
        self.gx_ref = gx.permute(0, 2, 3, 1).reshape(B, self.N)
        self.gw_ref, self.gb_ref = gw, gb
        # adjoint probe for weight gradients: <dW, E(R)> = <conv dW, R> for the embedding E of a kernel R
        from efcn_sparse.conv_geometry import embed_weight

        self.probe = torch.randn_like(self.w)
        self.probe_values = embed_weight(self.geo, self.layout, self.probe).to(DEVICE, DTYPE)
        self.probe_target = float((self.gw_ref.double() * self.probe.double()).sum())
        self.stored = self.layout.stored_entries()
        self.conv_entries = int(self.geo.local_taps()[0].numel()) * case.cout * case.cin  # groups = 1
        self._cache: Dict[str, object] = {}

    # ------------------------------------------------------------------ helpers
    def flat(self, img: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] (any memory format) -> NHWC-flat [B, C*H*W]."""
        return img.permute(0, 2, 3, 1).reshape(img.shape[0], -1)

    def cached(self, key: str, make: Callable[[], object]):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def dense_bytes(self) -> int:
        return self.M * self.N * DTYPE.itemsize

    def dense_fits(self) -> bool:
        return self.dense_bytes() <= DENSE_BUDGET

    def dw_expected(self) -> Optional[torch.Tensor]:
        """Exact stored-block weight gradient, from the dense dY^T X where that takes at most 512 MiB."""
        if self.dense_bytes() > GiB // 2:
            return None
        return self.cached("dw_dense", lambda: self.layout.gather_dense(self.gy.T @ self.x))

    def dw_reference(self) -> torch.Tensor:
        return self.cached("dw_ref", lambda: ops.bsr_grad_weight(
            self.gy, self.x, self.layout.row_idx, self.layout.col_idx, self.layout.mask_ids,
            self.layout.mask_patterns, self.BR, self.BC, "reference"))

    # ------------------------------------------------------------------ checks
    def check_y(self, y_flat, what):
        assert_close(y_flat, self.y_ref, f"{self.case.name} {what} output vs conv")

    def check_gx(self, gx_flat, what):
        assert_close(gx_flat, self.gx_ref, f"{self.case.name} {what} grad_input vs conv")

    def check_gb_positions(self, gb_pos, what):
        """An untied per-position bias gradient [M] summed over positions equals the conv's."""
        assert_close(gb_pos.reshape(-1, self.case.cout).sum(0), self.gb_ref,
                     f"{self.case.name} {what} bias grad vs conv")

    def check_dw(self, dw: torch.Tensor, what: str, backend: str = "reference") -> None:
        """A stored-block weight gradient: mask respected, summed over positions it equals the
        conv's (adjoint probe), and elementwise equal to the dense or reference result."""
        name = f"{self.case.name} {what}"
        assert tuple(dw.shape) == tuple(self.values.shape), f"{name}: shape {tuple(dw.shape)}"
        if self.layout.has_mask:
            off = dw.detach()[~self.layout.block_mask()]
            assert off.numel() == 0 or float(off.abs().max()) == 0.0, f"{name}: masked entries got a gradient"
        got = float((dw.detach().double() * self.probe_values.double()).sum())
        scale = float((dw.detach().double().abs() * self.probe_values.double().abs()).sum()) or 1.0
        assert abs(got - self.probe_target) <= TOL * scale, \
            f"{name}: weight gradient summed over positions differs from the conv's ({got} vs {self.probe_target})"
        exact = self.dw_expected()
        if exact is None and backend != "reference":
            exact = self.dw_reference()
        if exact is not None:
            src = "dense" if self.dense_bytes() <= GiB // 2 else "reference"
            assert_close(dw, exact, f"{name} weight gradient vs {src}")

    # ------------------------------------------------------------------ counts
    def useful_flops(self, op: str, conv: bool = False) -> int:
        """2 x batch x stored entries per GEMM (the conv's own entries for conv anchors)."""
        entries = self.conv_entries if conv else self.stored
        return (3 if op == "fwd_bwd" else 1) * 2 * self.case.batch * entries

    def executed_flops(self, op: str) -> int:
        """What the block kernels compute: whole stored blocks, masked entries included."""
        return (3 if op == "fwd_bwd" else 1) * 2 * self.case.batch * self.layout.nnzb * self.BR * self.BC

    def floor_bytes(self, op: str) -> int:
        """Bytes each op must move at least: values once, activations in and out once (float32)."""
        s = DTYPE.itemsize
        V = self.layout.nnzb * self.BR * self.BC * s
        X, Y = self.case.batch * self.N * s, self.case.batch * self.M * s
        per = {"forward": V + X + Y + self.M * s, "grad_input": V + Y + X, "grad_weight": Y + X + V}
        return per[op] if op != "fwd_bwd" else sum(per.values()) + self.M * s

    def info(self) -> dict:
        c = self.case
        return dict(layer=c.name, describe=c.describe(), batch=c.batch, halo=str(c.halo), cin=c.cin, cout=c.cout,
                    k=c.k, hw=c.hw, M=self.M, N=self.N, nnzb=self.layout.nnzb, block_shape=[self.BR, self.BC],
                    stored=self.stored, conv_entries=self.conv_entries, density=self.stored / (self.M * self.N),
                    dense_bytes=self.dense_bytes(), device=str(DEVICE), dtype=str(DTYPE).replace("torch.", ""))


_STATE: Dict[str, LayerState] = {}


def layer_state(case: LayerCase) -> LayerState:
    """The state of ``case``, keeping one layer's tensors alive at a time (memory)."""
    if case.name not in _STATE:
        _STATE.clear()
        gc.collect()
        _STATE[case.name] = LayerState(case)
    return _STATE[case.name]


def release_state() -> None:
    if _STATE:
        _STATE.clear()
        gc.collect()


# ----------------------------------------------------------------------------- timing harness
def rounds_for(t0: float) -> int:
    """Rounds after warm-up: at least 5 (3 when one call takes 2 s or more), about 3 s in all."""
    if t0 >= 2.0:
        return 3
    return int(min(50, max(5, math.ceil(3.0 / max(t0, 1e-6)))))


def measure(benchmark, fn: Callable[[], object], check: Callable[[object], None], group: str, info: dict) -> None:
    """Warm up once and check the result, then time ``fn`` with pytest-benchmark (median over rounds)."""
    def run():
        out = fn()
        sync()
        return out

    benchmark.group = group
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch.sparse "beta" warnings
        out = run()
        t0 = time.perf_counter() - t
        check(out)
        del out
        info = dict(info, warmup_s=t0, threads=torch.get_num_threads())
        if benchmark.enabled:
            info["rounds"] = rounds_for(t0)
        benchmark.extra_info.update(info)
        benchmark.pedantic(run, rounds=info.get("rounds", 1), warmup_rounds=1 if t0 < 0.5 else 0, iterations=1)
