"""Per-layer benchmarks: the eFCN's three ops and forward+backward on every available backend,
side by side with the anchors, in one run: F.conv2d (channels_last and NCHW input), the dense
eFCN via F.linear, torch.sparse BSR (F.linear and torch.sparse.mm), scipy.sparse.bsr_matrix and
an unfold-based locally-connected layer. Each function's warm-up result is checked first."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from efcn_sparse import ops

from . import benchlib as bl

# implementation -> the ops it is benchmarked for
ANCHORS = {
    "conv": bl.OPS,  # F.conv2d on the channels_last view of the eFCN's NHWC input
    "conv_nchw": ("forward", "fwd_bwd"),  # F.conv2d on a contiguous NCHW copy
    "dense": bl.OPS,  # the paper's dense eFCN: F.linear on the (M, N) matrix
    "torch_bsr_linear": ("forward",),  # F.linear(x, sparse_bsr_tensor)
    "torch_sparse_mm": ("forward",),  # torch.sparse.mm(sparse_bsr_tensor, x.T)
    "scipy_bsr": ("forward",),  # scipy.sparse.bsr_matrix @ x.T
    "unfold_lc": ("forward", "fwd_bwd"),  # F.unfold + per-position weights bmm (the usual eLCN)
}


def _params():
    out = []
    for case in bl.cases():
        for backend in bl.backends_to_run():
            out += [pytest.param(case, "efcn", backend, op, id=f"{case.name}-efcn_{backend}-{op}") for op in bl.OPS]
        for impl, ops_ in ANCHORS.items():
            if impl == "scipy_bsr" and bl.DEVICE.type != "cpu":
                continue
            out += [pytest.param(case, impl, None, op, id=f"{case.name}-{impl}-{op}") for op in ops_]
    return out


def teardown_module(module):
    bl.release_state()


@pytest.mark.parametrize("case,impl,backend,op", _params())
def test_layer(benchmark, case, impl, backend, op):
    st = bl.layer_state(case)
    fn, check, conv_flops = BUILDERS[impl](st, op, backend)
    info = dict(st.info(), op=op, impl=impl if impl != "efcn" else f"efcn[{backend}]", backend=backend,
                kind="efcn" if impl == "efcn" else "anchor",
                flops=st.useful_flops(op, conv=conv_flops), executed_flops=st.executed_flops(op),
                bytes=st.floor_bytes(op))
    bl.measure(benchmark, fn, check, group=f"{case.name} {op}", info=info)


# ----------------------------------------------------------------------------- the eFCN
def _efcn(st: bl.LayerState, op: str, backend: str):
    lay, v, b, x, gy = st.layout, st.values, st.bias, st.x, st.gy
    if op == "forward":
        def fn():
            with torch.no_grad():
                return ops.linear(x, lay, v, b, backend)
        return fn, lambda y: st.check_y(y, f"efcn[{backend}] forward"), False
    if op == "grad_input":
        def fn():
            return ops.bsr_grad_input(gy, v, lay.ccol_ptr, lay.t_row_idx, lay.t_perm, st.N, backend)
        return fn, lambda dx: st.check_gx(dx, f"efcn[{backend}]"), False
    if op == "grad_weight":
        def fn():
            return ops.bsr_grad_weight(gy, x, lay.row_idx, lay.col_idx, lay.mask_ids, lay.mask_patterns,
                                       st.BR, st.BC, backend)
        return fn, lambda dw: st.check_dw(dw, f"efcn[{backend}] grad_weight", backend), False
    xg, vg, bg = x.clone().requires_grad_(), v.clone().requires_grad_(), b.clone().requires_grad_()

    def fn():
        y = ops.linear(xg, lay, vg, bg, backend)
        return (y.detach(),) + torch.autograd.grad(y, (xg, vg, bg), gy)

    def check(out):
        y, gx, gw, gb = out
        st.check_y(y, f"efcn[{backend}] fwd_bwd")
        st.check_gx(gx, f"efcn[{backend}] fwd_bwd")
        st.check_dw(gw, f"efcn[{backend}] fwd_bwd", backend)
        st.check_gb_positions(gb, f"efcn[{backend}] fwd_bwd")
    return fn, check, False


# ----------------------------------------------------------------------------- F.conv2d
def _conv(st: bl.LayerState, op: str, backend, nchw: bool = False):
    x = st.x_nchw if nchw else st.x_img
    gy = st.gy_nchw if nchw else st.gy_img
    w, b, p = st.w, st.b, st.pad
    name = "conv_nchw" if nchw else "conv"
    if op == "forward":
        def fn():
            with torch.no_grad():
                return F.conv2d(x, w, b, padding=p)
        return fn, lambda y: st.check_y(st.flat(y), name), True
    if op in ("grad_input", "grad_weight"):
        mask = [True, False, False] if op == "grad_input" else [False, True, True]

        def fn():
            return torch.ops.aten.convolution_backward(gy, x, w, [w.shape[0]], [1, 1], [p, p], [1, 1], False, [0, 0],
                                                       1, mask)

        def check(out):
            if op == "grad_input":
                st.check_gx(st.flat(out[0]), name)
            else:
                bl.assert_close(out[1], st.gw_ref, f"{st.case.name} {name} weight grad")
                bl.assert_close(out[2], st.gb_ref, f"{st.case.name} {name} bias grad")
        return fn, check, True
    xg, wg, bg = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()

    def fn():
        y = F.conv2d(xg, wg, bg, padding=p)
        return (y.detach(),) + torch.autograd.grad(y, (xg, wg, bg), gy)

    def check(out):
        y, gx, gw, gb = out
        st.check_y(st.flat(y), name)
        st.check_gx(st.flat(gx), name)
        bl.assert_close(gw, st.gw_ref, f"{st.case.name} {name} weight grad")
        bl.assert_close(gb, st.gb_ref, f"{st.case.name} {name} bias grad")
    return fn, check, True


# ----------------------------------------------------------------------------- dense eFCN
def _dense(st: bl.LayerState, op: str, backend):
    if not st.dense_fits():
        pytest.skip(f"dense matrix {st.M}x{st.N} float32 = {st.dense_bytes() / bl.GiB:.1f} GiB "
                    f"> {bl.DENSE_BUDGET / bl.GiB:.0f} GiB budget")
    Wd = st.cached("dense", lambda: st.layout.to_dense(st.values, max_bytes=bl.DENSE_BUDGET))
    x, gy, b = st.x, st.gy, st.bias

    def check_dw(dw):
        st.check_dw(st.layout.gather_dense(dw), "dense grad_weight")
    if op == "forward":
        def fn():
            with torch.no_grad():
                return F.linear(x, Wd, b)
        return fn, lambda y: st.check_y(y, "dense"), False
    if op == "grad_input":
        return (lambda: torch.mm(gy, Wd)), (lambda dx: st.check_gx(dx, "dense")), False
    if op == "grad_weight":
        def fn():
            return torch.mm(gy.T, x), gy.sum(0)

        def check(out):
            check_dw(out[0])
            st.check_gb_positions(out[1], "dense")
        return fn, check, False
    xg, Wg, bg = x.clone().requires_grad_(), Wd.clone().requires_grad_(), b.clone().requires_grad_()

    def fn():
        y = F.linear(xg, Wg, bg)
        return (y.detach(),) + torch.autograd.grad(y, (xg, Wg, bg), gy)

    def check(out):
        y, gx, gw, gb = out
        st.check_y(y, "dense fwd_bwd")
        st.check_gx(gx, "dense fwd_bwd")
        check_dw(gw)
        st.check_gb_positions(gb, "dense fwd_bwd")
    return fn, check, False


# ----------------------------------------------------------------------------- torch.sparse / scipy
def _whole_blocks(st):
    if st.M % st.BR or st.N % st.BC:
        pytest.skip(f"shape {st.M}x{st.N} is not a multiple of the block {st.BR}x{st.BC}")


def _square_bsr(st: bl.LayerState) -> torch.Tensor:
    """The eFCN as a torch.sparse BSR tensor; MKL wants square blocks, so non-square blocks are
    split into g x g sub-blocks, g = gcd(BR, BC) (the same stored entries, more blocks)."""
    lay, v = st.layout, st.values
    if st.BR == st.BC:
        return lay.to_torch_bsr(v)
    g = math.gcd(st.BR, st.BC)
    a, c = st.BR // g, st.BC // g
    sub = lay.apply_mask(v).reshape(-1, a, g, c, g).permute(0, 1, 3, 2, 4).reshape(-1, g, g)
    rows = (lay.row_idx.long()[:, None, None] * a + torch.arange(a)[None, :, None]).expand(-1, a, c).reshape(-1)
    cols = (lay.col_idx.long()[:, None, None] * c + torch.arange(c)[None, None, :]).expand(-1, a, c).reshape(-1)
    order = torch.argsort(rows * (st.N // g) + cols)
    crow = torch.zeros(st.M // g + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=st.M // g), 0)
    return torch.sparse_bsr_tensor(crow, cols[order], sub[order].contiguous(), size=(st.M, st.N))


def _torch_bsr(st: bl.LayerState, op: str, backend, mm: bool = False):
    _whole_blocks(st)
    with torch.sparse.check_sparse_tensor_invariants(False):
        Wb = st.cached("torch_bsr", lambda: _square_bsr(st))
    x, b = st.x, st.bias
    if mm:
        bcol = b[:, None]

        def fn():
            with torch.no_grad():
                return (torch.sparse.mm(Wb, x.T) + bcol).T
    else:
        def fn():
            with torch.no_grad():
                return F.linear(x, Wb, b)
    return fn, lambda y: st.check_y(y, "torch_sparse_mm" if mm else "torch_bsr_linear"), False


def _scipy(st: bl.LayerState, op: str, backend):
    _whole_blocks(st)
    S = st.cached("scipy", lambda: st.layout.to_scipy(st.values))
    xT = st.x.cpu().numpy().T  # [N, B], a view
    bcol = st.bias.cpu().numpy()[:, None]

    def fn():
        return (S @ xT + bcol).T

    return fn, lambda y: st.check_y(torch.from_numpy(np.ascontiguousarray(y)), "scipy_bsr"), False


# ----------------------------------------------------------------------------- unfold LC
def _unfold_lc(st: bl.LayerState, op: str, backend):
    """Locally connected layer with the eFCN's support (kernel k + 2*halo, one weight set per
    position): F.unfold, then one batched matmul over positions. (The einsum spelling of the same
    product, "bkl,lok->bol", ran 2-3x slower here: it multiplies strided views.)"""
    c = st.case
    if c.halo == "full":
        pytest.skip("halo 'full' is the dense eFCN, not a locally connected layer")
    h = int(c.halo)
    K, pad = c.k + 2 * h, st.pad + h
    L = st.Ho * st.Wo
    cols_bytes = c.batch * c.cin * K * K * L * bl.DTYPE.itemsize
    need = cols_bytes * (2 if op == "forward" else 5)  # unfold output + its transposed copy (+ grads)
    if need > bl.ANCHOR_BUDGET:
        pytest.skip(f"unfold working set ~{need / bl.GiB:.1f} GiB > {bl.ANCHOR_BUDGET / bl.GiB:.0f} GiB budget")

    def weights():
        wk = F.pad(st.w, (h, h, h, h)).reshape(c.cout, -1)  # the conv kernel centred in K x K: [Cout, Cin*K*K]
        return wk.T[None].expand(L, -1, -1).contiguous(), st.b[:, None].expand(-1, L).contiguous()
    w_lc, b_lc = st.cached("lc", weights)  # [L, Cin*K*K, Cout], [Cout, L]
    x = st.x_img

    def lc(xx, ww, bb):
        cols = F.unfold(xx, K, padding=pad)  # [B, Cin*K*K, L]
        y = torch.bmm(cols.transpose(1, 2).contiguous().transpose(0, 1), ww)  # [L, B, Cout]
        return y.permute(1, 2, 0) + bb  # [B, Cout, L]

    def to_flat(y):
        return y.permute(0, 2, 1).reshape(c.batch, -1)
    if op == "forward":
        def fn():
            with torch.no_grad():
                return lc(x, w_lc, b_lc)
        return fn, lambda y: st.check_y(to_flat(y), "unfold_lc"), False
    gy = st.cached("lc_gy", lambda: st.gy_img.reshape(c.batch, c.cout, L))
    xg, wg, bg = x.clone().requires_grad_(), w_lc.clone().requires_grad_(), b_lc.clone().requires_grad_()

    def fn():
        y = lc(xg, wg, bg)
        return (y.detach(),) + torch.autograd.grad(y, (xg, wg, bg), gy)

    def check(out):
        y, gx, gw, gb = out
        st.check_y(to_flat(y), "unfold_lc fwd_bwd")
        st.check_gx(st.flat(gx), "unfold_lc fwd_bwd")
        gk = gw.sum(0).T.reshape(c.cout, c.cin, K, K)[:, :, h:h + c.k, h:h + c.k]
        bl.assert_close(gk, st.gw_ref, f"{c.name} unfold_lc weight grad summed over positions")
        bl.assert_close(gb.sum(1), st.gb_ref, f"{c.name} unfold_lc bias grad summed over positions")
    return fn, check, False


BUILDERS = {
    "efcn": _efcn,
    "conv": _conv,
    "conv_nchw": lambda st, op, b: _conv(st, op, b, nchw=True),
    "dense": _dense,
    "torch_bsr_linear": _torch_bsr,
    "torch_sparse_mm": lambda st, op, b: _torch_bsr(st, op, b, mm=True),
    "scipy_bsr": _scipy,
    "unfold_lc": _unfold_lc,
}
