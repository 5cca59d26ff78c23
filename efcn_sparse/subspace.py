"""The CNN subspace of an eFCN: the weights a conv could produce, and the distance to it.

For a ``SparseEFCN`` built from a conv (it has a ``.geometry``), let E be the linear embedding map
kernel -> eFCN weight (``embed_weight``): entry (p_out, c_out; p_in, c_in) = sum of the kernel
weights K[c_out, c_in, k] over the taps k of output pixel p_out that read input pixel p_in. The CNN
subspace is range(E) (zero off the receptive fields, shared across positions), and the orthogonal
(Frobenius) projection is P = E (E^T E)^+ E^T.

E^T E is block-diagonal: one (KH*KW)^2 Gram matrix G, shared by every (c_out, c_in) pair, with
G[k, k'] = number of pixel pairs that taps k and k' both land on. For zeros padding G is diagonal
(G[k, k] = number of output pixels whose tap k is not in the padding), and P reduces to "the mean
of the entries sharing (c_out, c_in, offset)", with border positions contributing only their valid
entries. For reflect/replicate/circular padding, two taps can land on one pixel and G is not
diagonal; a pseudo-inverse keeps P the exact orthogonal projection even where some kernel entries
are not identifiable (``to_cnn`` then returns the minimum-norm kernel). The bias subspace is "the
same value at every position" per channel; its projection is the mean over positions.

Everything here is O(stored entries): per layer, index tensors mapping the receptive-field entries
to values (by block when the tiles are pixel-aligned, by entry otherwise) and per-block locality
and distance codes are computed once and cached (weakly, per module); statistics are accumulated
in float64 in bounded chunks. No dense matrix is built.
"""

from __future__ import annotations

import copy
import weakref
from typing import Dict, Optional

import torch
import torch.nn as nn
from torch import Tensor

from .conv_geometry import ConvGeometry
from .module import SparseEFCN

__all__ = ["project", "to_cnn", "deviation", "cnn_kernel", "project_values", "clear_cache"]

_CHUNK = 1 << 20  # elements per temporary (float64: 8 MiB)
_FLAT_CACHE_MAX = 1 << 22  # cache per-entry indices of non-aligned layers up to this many entries
_TABLE_MAX = 1 << 22  # cache per-pixel-pair codes of non-aligned layers up to this many pairs
_cache: "weakref.WeakKeyDictionary[SparseEFCN, tuple]" = weakref.WeakKeyDictionary()


def clear_cache() -> None:
    """Drop the cached per-layer index maps (they are rebuilt on demand)."""
    _cache.clear()


def _group_ok(Cout: int, Cin: int, g: int, r: Tensor, c: Tensor) -> Tensor:
    return (r // (Cout // g)) == (c // (Cin // g))


class _Maps:
    """Index maps of one SparseEFCN (built once, cached).

    Local entries are handled per local pixel pair u (a pair read by at least one tap), as rows
    X[u] of a "local space": for pixel-aligned tiles the T stored blocks of the pair (in-group
    tiles, D = T*BR*BC), otherwise the Cout x Cin/g entries gathered one by one (D = Cout*cig).
    C[u, k] counts the taps of offset k landing on pair u, so E K = C (K in local space) and
    E^T W = C^T X.
    """

    def __init__(self, m: SparseEFCN):
        geo: ConvGeometry = m.geometry
        lay = m.layout
        dev = m.values.device
        self.geo = geo
        self.Cout, self.Cin, self.g = geo.out_channels, geo.in_channels, geo.groups
        self.cog, self.cig = self.Cout // self.g, self.Cin // self.g
        KH, KW = geo.kernel_size
        self.KK = KH * KW
        self.BR, self.BC = lay.block_shape
        self.M, self.N = lay.shape
        self.P_in = geo.input_size[0] * geo.input_size[1]
        if (self.M, self.N) != (geo.out_features, geo.in_features):
            raise ValueError(f"SparseEFCN of shape {(self.M, self.N)} does not match its geometry "
                             f"({geo.out_features}, {geo.in_features})")

        # local pixel pairs and the taps landing on them, grouped by pair
        po, pi, kh, kw = geo.local_taps()
        pairs, tap_u = torch.unique(po * self.P_in + pi, return_inverse=True)
        order = torch.argsort(tap_u, stable=True)
        tap_u, tap_k = tap_u[order], (kh * KW + kw)[order]
        self.U = pairs.numel()
        self.tap_ptr = torch.searchsorted(tap_u, torch.arange(self.U + 1))  # CPU
        self.max_taps = int(self.tap_ptr.diff().max()) if self.U else 1
        self.pairs = pairs  # keys p_out * P_in + p_in of the local-space rows, in row order (CPU)
        if self.max_taps == 1:
            # one tap per pair (e.g. zeros padding): order the rows by offset, so that E^T and E
            # act on contiguous segments (sums and broadcasts instead of matmuls)
            perm = torch.argsort(tap_k, stable=True)
            self.pairs, tap_k = pairs[perm], tap_k[perm]
            self.k_ptr = torch.searchsorted(tap_k, torch.arange(self.KK + 1)).tolist()
        self.tap_u, self.tap_k = tap_u.to(dev), tap_k.to(dev)

        # Gram matrix G = C^T C and its pseudo-inverse
        G = torch.zeros(self.KK, self.KK, dtype=torch.float64)
        if self.max_taps == 1:
            G.diagonal().copy_(torch.bincount(tap_k, minlength=self.KK).double())
        else:
            step = max(1, _CHUNK // self.KK)
            for s in range(0, self.U, step):
                C = self._counts(s, min(s + step, self.U), tap_u, tap_k)
                G += C.T @ C
        self.G = G
        self.Gdiag = None  # diagonal G: divide (exact for sums of equal entries) rather than multiply
        if bool((G - torch.diag(G.diagonal())).eq(0).all()):
            d = G.diagonal().clone()
            self.Gdiag = torch.where(d > 0, d, torch.full_like(d, float("inf")))[:, None].to(dev)  # x / inf = 0
            Ginv = torch.diag(torch.where(d > 0, 1.0 / d.clamp(min=1), torch.zeros_like(d)))
        else:
            Ginv = torch.linalg.pinv(G, rtol=1e-10, hermitian=True)
        self.Ginv = Ginv.to(dev)

        # where each local entry lives in values
        self._stored = lay.row_idx.long().cpu() * lay.n_block_cols + lay.col_idx.long().cpu()  # sorted
        self.aligned = self.Cout % self.BR == 0 and self.Cin % self.BC == 0
        ppo, ppi = self.pairs // self.P_in, self.pairs % self.P_in
        if self.aligned:
            ta, tb = self.Cout // self.BR, self.Cin // self.BC
            self.ta, self.tb = ta, tb
            in_group = _group_ok(self.Cout, self.Cin, self.g, torch.arange(self.Cout)[:, None], torch.arange(self.Cin)[None, :])
            tiles = in_group.reshape(ta, self.BR, tb, self.BC).permute(0, 2, 1, 3)  # [ta, tb, BR, BC]
            a, b = torch.nonzero(tiles.any(3).any(2), as_tuple=True)
            self.tile_a, self.tile_b = a.to(dev), b.to(dev)
            self.tile_mask = None if self.g == 1 else tiles[a, b].reshape(-1).to(dev)  # [T*BR*BC]
            blk = self._lookup((ppo[:, None] * ta + a).reshape(-1), (ppi[:, None] * tb + b).reshape(-1))
            self.blk = blk.reshape(self.U, a.numel()).to(dev)
            self.D = a.numel() * self.BR * self.BC
            # per-block locality and distance codes (a block lies inside one pixel pair)
            bpo = lay.row_idx.long().cpu() * self.BR // self.Cout
            bpi = lay.col_idx.long().cpu() * self.BC // self.Cin
            local, dist = self._codes(bpo, bpi, pairs)
            off = torch.nonzero(~local).reshape(-1)
            self.off_blocks, self.off_dist = off.to(dev), dist[off].to(dev)
            self.max_dist = int(dist[off].max()) if off.numel() else 0
        else:
            self.D = self.Cout * self.cig
            self.flat = self._flat_index(0, self.U).to(dev) if self.U * self.D <= _FLAT_CACHE_MAX else None
        self._pairs_dev = pairs.to(dev)
        if not self.aligned:
            # code per pixel pair (-1: local, else distance), as a table when small, and the blocks
            # holding off-local entries
            P_out = geo.out_size[0] * geo.out_size[1]
            self.code_table = None
            if P_out * self.P_in <= _TABLE_MAX:
                po_all = torch.arange(P_out)[:, None].expand(-1, self.P_in)
                pi_all = torch.arange(self.P_in)[None, :].expand(P_out, -1)
                local, dist = self._codes(po_all, pi_all, pairs)
                self.code_table = torch.where(local, -1, dist).to(torch.int16).to(dev)
            lay_dev = lay.to(dev)
            step = max(1, _CHUNK // (self.BR * self.BC))
            has_off, self.max_dist = [], 0
            for idx in torch.arange(lay.nnzb, device=dev).split(step):
                code = self.block_codes(lay_dev, idx).masked_fill_(~self._block_mask(lay_dev, idx), -1)
                has_off.append(code.flatten(1).amax(1) >= 0)
                self.max_dist = max(self.max_dist, int(code.max()) if code.numel() else 0)
            self.off_blocks = torch.nonzero(torch.cat(has_off)).reshape(-1) if has_off else \
                torch.zeros(0, dtype=torch.int64, device=dev)

    # ---------------------------------------------------------------- index helpers
    def _counts(self, u0: int, u1: int, tap_u: Optional[Tensor] = None, tap_k: Optional[Tensor] = None) -> Tensor:
        """C[u0:u1] as [u, KK] float64 (taps of each offset landing on each pair)."""
        tap_u = self.tap_u if tap_u is None else tap_u
        tap_k = self.tap_k if tap_k is None else tap_k
        t0, t1 = int(self.tap_ptr[u0]), int(self.tap_ptr[u1])
        C = torch.zeros(u1 - u0, self.KK, dtype=torch.float64, device=tap_u.device)
        return C.index_put_((tap_u[t0:t1] - u0, tap_k[t0:t1]), C.new_ones(t1 - t0), accumulate=True)

    def _lookup(self, brow: Tensor, bcol: Tensor) -> Tensor:
        key = brow * ((self.N + self.BC - 1) // self.BC) + bcol
        st = self._stored
        pos = torch.searchsorted(st, key).clamp(max=max(st.numel() - 1, 0))
        if st.numel() == 0 or not bool((st[pos] == key).all()):
            raise RuntimeError("a receptive-field entry is not stored: the layout does not match the geometry")
        return pos

    def _flat_index(self, u0: int, u1: int) -> Tensor:
        """[u, Cout * cig] index into values.view(-1) of the local entries of pairs u0:u1."""
        pairs = self.pairs[u0:u1]
        ppo, ppi = pairs // self.P_in, pairs % self.P_in
        co = torch.arange(self.Cout)
        ci = (co // self.cog)[:, None] * self.cig + torch.arange(self.cig)[None, :]  # [Cout, cig]
        r = (ppo[:, None, None] * self.Cout + co[None, :, None]).expand(-1, -1, self.cig)
        c = ppi[:, None, None] * self.Cin + ci[None]
        blk = self._lookup((r // self.BR).reshape(-1), (c // self.BC).reshape(-1))
        flat = blk * (self.BR * self.BC) + (r % self.BR).reshape(-1) * self.BC + (c % self.BC).reshape(-1)
        return flat.reshape(-1, self.D)

    def _codes(self, po: Tensor, pi: Tensor, pairs: Tensor):
        """(local, distance) of pixel pairs: local = some tap reads p_in for p_out; distance = Chebyshev
        distance in pixels from p_in to p_out's receptive-field bounding box (0 inside it)."""
        geo = self.geo
        key = po * self.P_in + pi
        pos = torch.searchsorted(pairs, key).clamp(max=max(pairs.numel() - 1, 0))
        local = (pairs[pos] == key) if pairs.numel() else torch.zeros_like(key, dtype=torch.bool)
        Wo, W = geo.out_size[1], geo.input_size[1]
        dist = torch.zeros_like(po)
        for o, x, axis in ((po // Wo, pi // W, 0), (po % Wo, pi % W, 1)):
            k, s, d = geo.kernel_size[axis], geo.stride[axis], geo.dilation[axis]
            lo = o * s - (geo.pad_h, geo.pad_w)[axis][0]
            hi = lo + d * (k - 1)
            dist = torch.maximum(dist, torch.maximum(lo - x, x - hi).clamp(min=0))
        return local, dist

    def _block_mask(self, lay, idx: Tensor) -> Tensor:
        """[k, BR, BC] entries of blocks ``idx`` that may be non-zero (the layout's element mask)."""
        if lay.mask_ids is None:
            return torch.ones(idx.numel(), self.BR, self.BC, dtype=torch.bool, device=idx.device)
        return lay.mask_patterns[lay.mask_ids[idx].long()]

    def _pixels(self, lay, idx: Tensor):
        """Output pixel of each row [k, BR] and input pixel of each column [k, BC] of blocks ``idx``
        (rows/columns outside the matrix get the last pixel; they are masked)."""
        dev = idx.device
        rows = lay.row_idx[idx].long()[:, None] * self.BR + torch.arange(self.BR, device=dev)
        cols = lay.col_idx[idx].long()[:, None] * self.BC + torch.arange(self.BC, device=dev)
        return (rows // self.Cout).clamp(max=self.M // self.Cout - 1), (cols // self.Cin).clamp(max=self.P_in - 1)

    def pair_codes(self, po: Tensor, pi: Tensor) -> Tensor:
        """Code of pixel pairs (broadcast shapes): -1 local, else the off-local distance."""
        if self.code_table is not None:
            return self.code_table.view(-1)[po * self.P_in + pi]
        local, dist = self._codes(po, pi, self._pairs_dev)
        return torch.where(local, -1, dist)

    def block_codes(self, lay, idx: Tensor) -> Tensor:
        """[k, BR, BC] code of each entry of blocks ``idx`` (non-aligned layouts)."""
        po, pi = self._pixels(lay, idx)
        return self.pair_codes(po[:, :, None], pi[:, None, :])

    def segments(self, u0: int, u1: int):
        """(k, a, b): rows u0+a : u0+b all have their one tap at offset k (only when max_taps == 1)."""
        for k in range(self.KK):
            a, b = max(u0, self.k_ptr[k]), min(u1, self.k_ptr[k + 1])
            if a < b:
                yield k, a - u0, b - u0

    def chunks(self):
        """Ranges of local pairs whose temporaries stay under _CHUNK elements."""
        step = max(1, _CHUNK // max(self.D, 1))
        for s in range(0, self.U, step):
            yield s, min(self.U, s + step)

    # ---------------------------------------------------------------- local space
    def _index(self, u0: int, u1: int, device) -> Tensor:
        if self.aligned:
            return self.blk[u0:u1].reshape(-1)
        flat = self.flat[u0:u1] if self.flat is not None else self._flat_index(u0, u1).to(device)
        return flat.reshape(-1)

    def _rows(self, values: Tensor) -> Tensor:
        """``values`` viewed as the rows ``_index`` selects (blocks, or single entries)."""
        return values if self.aligned else values.reshape(-1)

    def _as_rows(self, buf: Tensor) -> Tensor:
        return buf.view(-1, self.BR, self.BC) if self.aligned else buf

    def gather(self, values: Tensor, u0: int, u1: int, ws: "_Workspace") -> Tensor:
        """X[u0:u1] as [u, D] float64 (in a workspace buffer, valid until the next gather)."""
        n = (u1 - u0) * self.D
        idx = self._index(u0, u1, values.device)
        raw = ws.get("raw", n, values.dtype, values.device)
        torch.index_select(self._rows(values), 0, idx, out=self._as_rows(raw))
        x = ws.get("x", n, torch.float64, values.device).copy_(raw).view(u1 - u0, self.D)
        return x if not self.aligned or self.tile_mask is None else x.mul_(self.tile_mask)

    def scatter(self, out: Tensor, u0: int, u1: int, x: Tensor, ws: "_Workspace") -> None:
        """Write X[u0:u1] ([u, D]) into ``out`` (values layout)."""
        idx = self._index(u0, u1, out.device)
        raw = ws.get("raw", x.numel(), out.dtype, out.device).copy_(x.reshape(-1))
        self._rows(out).index_copy_(0, idx, self._as_rows(raw))

    def to_space(self, K: Tensor) -> Tensor:
        """Kernel [KK, Cout * cig] -> [KK, D] (local space of one pair)."""
        if not self.aligned:
            return K
        KK, g, cog, cig = self.KK, self.g, self.cog, self.cig
        full = K.new_zeros(KK, g, cog, g, cig)
        full.diagonal(dim1=1, dim2=3).copy_(K.reshape(KK, g, cog, cig).permute(0, 2, 3, 1))
        tiles = full.reshape(KK, self.ta, self.BR, self.tb, self.BC).permute(0, 1, 3, 2, 4)
        return tiles[:, self.tile_a, self.tile_b].reshape(KK, self.D)

    def from_space(self, B: Tensor) -> Tensor:
        """[KK, D] -> kernel layout [KK, Cout * cig] (the adjoint of ``to_space``)."""
        if not self.aligned:
            return B
        KK, g, cog, cig = self.KK, self.g, self.cog, self.cig
        tiles = B.new_zeros(KK, self.ta, self.tb, self.BR, self.BC)
        tiles[:, self.tile_a, self.tile_b] = B.reshape(KK, -1, self.BR, self.BC)
        full = tiles.permute(0, 1, 3, 2, 4).reshape(KK, g, cog, g, cig)
        return full.diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2).reshape(KK, self.Cout * cig)

    # ---------------------------------------------------------------- the projection
    def kernel(self, values: Tensor, ws: "_Workspace"):
        """(K = G^+ E^T W as [KK, Cout * cig] float64, ||W_local||^2)."""
        b = torch.zeros(self.KK, self.D, dtype=torch.float64, device=values.device)
        local2 = torch.zeros((), dtype=torch.float64, device=values.device)
        for u0, u1 in self.chunks():
            x = self.gather(values, u0, u1, ws)
            local2 += x.reshape(-1) @ x.reshape(-1)
            if self.max_taps == 1:
                for k, a, e in self.segments(u0, u1):
                    b[k] += x[a:e].sum(0)
            else:
                b.addmm_(self._counts(u0, u1).T, x)
        b = self.from_space(b)
        return (b / self.Gdiag if self.Gdiag is not None else self.Ginv @ b), local2

    def embed_local(self, Ks: Tensor, u0: int, u1: int, ws: "_Workspace") -> Tensor:
        """(E K)[u0:u1] as [u, D] (workspace buffer), K given in local space (``to_space``)."""
        out = ws.get("ek", (u1 - u0) * self.D, torch.float64, Ks.device).view(u1 - u0, self.D)
        if self.max_taps == 1:
            for k, a, e in self.segments(u0, u1):
                out[a:e] = Ks[k]
            return out
        return torch.mm(self._counts(u0, u1), Ks, out=out)

    def residual2(self, values: Tensor, Ks: Tensor, ws: "_Workspace") -> Tensor:
        """||X - E K||^2 over the local entries (K in local space)."""
        resid = torch.zeros((), dtype=torch.float64, device=values.device)
        for u0, u1 in self.chunks():
            x = self.gather(values, u0, u1, ws)
            if self.max_taps == 1:
                for k, a, e in self.segments(u0, u1):
                    x[a:e] -= Ks[k]
            else:
                x -= self.embed_local(Ks, u0, u1, ws)
            resid += x.reshape(-1) @ x.reshape(-1)
        return resid


class _Workspace:
    """Reusable flat buffers, so chunked loops do not allocate (and page-fault) on every chunk."""

    def __init__(self):
        self._bufs: Dict[tuple, Tensor] = {}

    def get(self, name: str, n: int, dtype, device) -> Tensor:
        key = (name, dtype, torch.device(device))
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < n:
            buf = torch.empty(max(n, 1), dtype=dtype, device=device)
            self._bufs[key] = buf
        return buf[:n]


def _maps(m: SparseEFCN) -> _Maps:
    if m.geometry is None:
        raise ValueError("this SparseEFCN was not built from a conv (no .geometry): it has no CNN subspace")
    lay_sig = tuple((t.data_ptr(), t._version, tuple(t.shape)) if t is not None else None
                    for t in (m.crow_ptr, m.col_idx, m.row_idx, m.mask_ids))
    sig = (m.geometry, tuple(m.block_shape), tuple(m.shape), m.values.device, lay_sig)
    hit = _cache.get(m)
    if hit is not None and hit[0] == sig:
        return hit[1]
    maps = _Maps(m)
    _cache[m] = (sig, maps)
    return maps


def _full(t: Tensor) -> Tensor:
    """``t`` detached; a DTensor (a layer sharded by FSDP, see ``efcn_sparse.sharding``) is gathered
    whole first (a collective: every rank must get here)."""
    t = t.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _efcn_layers(model: nn.Module):
    """(path, module) of every SparseEFCN with a geometry, each module once."""
    return [(p or "<model>", m) for p, m in model.named_modules()
            if isinstance(m, SparseEFCN) and m.geometry is not None]


# ------------------------------------------------------------------------------------ per layer
def cnn_kernel(m: SparseEFCN):
    """(weight [Cout, Cin/g, KH, KW], bias [Cout] or None) of the projection of ``m`` onto the CNN subspace."""
    mp = _maps(m)
    with torch.no_grad():
        K, _ = mp.kernel(_full(m.values), _Workspace())
        KH, KW = mp.geo.kernel_size
        w = K.reshape(KH, KW, mp.Cout, mp.cig).permute(2, 3, 0, 1).to(m.values.dtype).contiguous()
        b = None
        if m.bias is not None:
            b = _full(m.bias).double().reshape(-1, mp.Cout).mean(0).to(m.bias.dtype)
    return w, b


def project_values(m: SparseEFCN):
    """(values, bias) of the orthogonal projection of ``m``'s weights onto the CNN subspace."""
    mp = _maps(m)
    with torch.no_grad():
        v = _full(m.values)
        ws = _Workspace()
        Ks = mp.to_space(mp.kernel(v, ws)[0])
        out = torch.zeros_like(v)
        for u0, u1 in mp.chunks():
            mp.scatter(out, u0, u1, mp.embed_local(Ks, u0, u1, ws), ws)
        b = None
        if m.bias is not None:
            b = _full(m.bias).double().reshape(-1, mp.Cout).mean(0).repeat(m.bias.numel() // mp.Cout).to(m.bias.dtype)
    return out, b


def _layer_stats(m: SparseEFCN, ws: Optional["_Workspace"] = None) -> dict:
    """Sums of squares (float64 tensors) of one layer: total, local, off-local (also by distance),
    residual of the local part, bias and its residual."""
    mp = _maps(m)
    v = _full(m.values)
    dev = v.device
    lay = m.layout
    zero = torch.zeros((), dtype=torch.float64, device=dev)
    off = zero.clone()
    by_dist = torch.zeros(mp.max_dist + 1, dtype=torch.float64, device=dev)
    if mp.aligned:  # whole blocks are off-local
        step = max(1, _CHUNK // (mp.BR * mp.BC))
        for s in range(0, mp.off_blocks.numel(), step):
            idx = mp.off_blocks[s:s + step]
            sq = v[idx].double().square_()
            if lay.mask_patterns is not None:
                sq.mul_(lay.mask_patterns[lay.mask_ids[idx].long()])
            bsq = sq.sum((1, 2))
            off += bsq.sum()
            by_dist.index_add_(0, mp.off_dist[s:s + step], bsq)
    else:  # tiles span several pixels: per-entry codes, on the blocks holding off-local entries
        step = max(1, _CHUNK // (mp.BR * mp.BC))
        for idx in mp.off_blocks.split(step):
            sq = v[idx].double().square_()
            if lay.mask_patterns is not None:
                sq.mul_(lay.mask_patterns[lay.mask_ids[idx].long()])
            po, pi = mp._pixels(lay, idx)
            # a code depends on the pixel pair only: sum over the channels first where a block's
            # rows (or columns) all belong to one pixel
            if mp.Cout % mp.BR == 0:
                sq, code = sq.sum(1), mp.pair_codes(po[:, :1], pi)
            elif mp.Cin % mp.BC == 0:
                sq, code = sq.sum(2), mp.pair_codes(po, pi[:, :1])
            else:
                code = mp.pair_codes(po[:, :, None], pi[:, None, :])
            w = sq.mul_(code >= 0).reshape(-1)  # local entries weigh 0
            off += w.sum()
            # entries beyond the stored support are masked (weight 0): clamp their codes into range
            by_dist.index_add_(0, code.reshape(-1).long().clamp_(0, mp.max_dist), w)

    K, local2 = mp.kernel(v, ws)  # every stored entry is local or off-local: ||W||^2 = local2 + off
    Ks = mp.to_space(K)
    resid = mp.residual2(v, Ks, ws)

    bias2 = bias_res = zero.clone()
    if m.bias is not None:
        b = _full(m.bias).double().reshape(-1, mp.Cout)
        bias2 = (b ** 2).sum()
        bias_res = ((b - b.mean(0)) ** 2).sum()
    return dict(total=local2 + off, local=local2, off=off, share=resid, by_dist=by_dist, bias=bias2, bias_res=bias_res)


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else 0.0


def _report(st: dict) -> dict:
    f = {k: float(v) if k != "by_dist" else v for k, v in st.items()}
    wn = f["total"] ** 0.5
    return {
        "weight_norm": wn,
        "local_norm": f["local"] ** 0.5,
        "offlocal_norm": f["off"] ** 0.5,
        "offlocal_ratio": _ratio(f["off"] ** 0.5, wn),
        "sharing_deviation": _ratio(f["share"] ** 0.5, wn),
        "deviation": _ratio((f["off"] + f["share"]) ** 0.5, wn),
        "bias_norm": f["bias"] ** 0.5,
        "bias_deviation": _ratio(f["bias_res"] ** 0.5, f["bias"] ** 0.5),
        "offlocal_by_distance": [x ** 0.5 for x in st["by_dist"].cpu().tolist()],
    }


def deviation(model: nn.Module) -> dict:
    """How far each eFCN layer of ``model`` is from the CNN subspace.

    Returns ``{"layers": {path: stats}, "total": stats}`` over every ``SparseEFCN`` with a
    ``.geometry`` (path ``"<model>"`` when ``model`` is itself one); ``total`` pools the sums of
    squares of all those layers (other parameters are not included). ``stats`` keys (floats):

    * ``weight_norm``: ||W|| (Frobenius, stored entries);
    * ``local_norm``: ||W_local||, entries on the receptive fields;
    * ``offlocal_norm``: ||W_off||, entries off the receptive fields;
    * ``offlocal_ratio``: ||W_off|| / ||W||;
    * ``sharing_deviation``: ||W_local - P(W)|| / ||W||;
    * ``deviation``: ||W - P(W)|| / ||W|| (its square is the sum of the squares of the two above);
    * ``bias_norm``: ||b||; ``bias_deviation``: ||b - P(b)|| / ||b|| (P(b): per-channel mean);
    * ``offlocal_by_distance``: list, entry d = norm of the off-local weights whose input pixel is
      at Chebyshev distance d pixels from the output pixel's receptive-field bounding box (d = 0:
      inside the box but not read by any tap, e.g. dilation gaps); one entry per distance up to
      the largest one the layer stores (halo h: at most h + 1 entries); the squares sum to
      ``offlocal_norm``**2.

    Per layer also ``halo``. Ratios are 0 when the denominator is 0. O(stored entries), no dense matrix.
    """
    layers: Dict[str, dict] = {}
    acc: Optional[dict] = None
    ws = _Workspace()
    with torch.no_grad():
        for path, m in _efcn_layers(model):
            st = _layer_stats(m, ws)
            layers[path] = dict(_report(st), halo=m.halo)
            if acc is None:
                acc = {k: v.detach().clone() for k, v in st.items()}
                continue
            for k, val in st.items():
                if k == "by_dist":
                    n = max(acc[k].numel(), val.numel())
                    acc[k] = nn.functional.pad(acc[k], (0, n - acc[k].numel())) + nn.functional.pad(val.to(acc[k].device), (0, n - val.numel()))
                else:
                    acc[k] = acc[k] + val.to(acc[k].device)
    if acc is None:
        acc = {k: torch.zeros((), dtype=torch.float64) for k in ("total", "local", "off", "share", "bias", "bias_res")}
        acc["by_dist"] = torch.zeros(1, dtype=torch.float64)
    return {"layers": layers, "total": _report(acc)}


# ------------------------------------------------------------------------------------ whole model
def project(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every eFCN layer (``SparseEFCN`` with a ``.geometry``) replaced by
    its orthogonal projection onto the CNN subspace (weights and bias); the rest is copied as is."""
    memo = {}  # deepcopy picks up the projected parameters instead of copying the old values
    for _, m in _efcn_layers(model):
        values, bias = project_values(m)
        memo[id(m.values)] = nn.Parameter(values, requires_grad=m.values.requires_grad)
        if bias is not None:
            memo[id(m.bias)] = nn.Parameter(bias, requires_grad=m.bias.requires_grad)
    return copy.deepcopy(model, memo)


def _conv_from(m: SparseEFCN) -> nn.Conv2d:
    geo = m.geometry
    if geo.pad_h[0] == geo.pad_h[1] and geo.pad_w[0] == geo.pad_w[1]:
        padding = (geo.pad_h[0], geo.pad_w[0])
    else:  # only padding='same' gives asymmetric padding
        padding = "same"
        if geo.stride != (1, 1):
            raise ValueError(f"cannot express the padding {geo.pad_h}/{geo.pad_w} of this eFCN as an nn.Conv2d padding")
        probe = nn.Conv2d(geo.in_channels, geo.out_channels, geo.kernel_size, geo.stride, "same", geo.dilation,
                          geo.groups, device="meta")
        same = ConvGeometry.from_conv(probe, geo.input_size)
        if (same.pad_h, same.pad_w) != (geo.pad_h, geo.pad_w):
            raise ValueError(f"cannot express the padding {geo.pad_h}/{geo.pad_w} of this eFCN as an nn.Conv2d padding")
    w, b = cnn_kernel(m)
    conv = nn.Conv2d(geo.in_channels, geo.out_channels, geo.kernel_size, geo.stride, padding, geo.dilation,
                     geo.groups, bias=b is not None, padding_mode=geo.padding_mode,
                     device=m.values.device, dtype=m.values.dtype)
    with torch.no_grad():
        conv.weight.copy_(w)
        if b is not None:
            conv.bias.copy_(b)
    conv.train(m.training)
    conv.requires_grad_(m.values.requires_grad)
    return conv


def to_cnn(model: nn.Module) -> nn.Module:
    """An ordinary CNN: a copy of ``model`` with every eFCN layer replaced by an ``nn.Conv2d`` of the
    same hyper-parameters whose kernel and bias are its projection onto the CNN subspace.

    For a freshly embedded model this gives back the source weights (exactly for zeros padding;
    to float rounding otherwise, except kernel entries that never touch an input pixel, which the
    eFCN cannot see: those come back as 0). Generic ``SparseEFCN`` layers (no geometry) are kept.
    """
    memo = {id(m): _conv_from(m) for _, m in _efcn_layers(model)}  # deepcopy puts the convs in their place
    return copy.deepcopy(model, memo)
