"""Geometry of a Conv2d seen as an eFCN: which (output pixel, input pixel) pairs it connects,
with which kernel offset, and the block-sparse layout that stores them.

Flattening convention (pixel-major, channel-minor, i.e. NHWC order):

* row    = (h_out * W_out + w_out) * C_out + c_out
* column = (h * W + w) * C_in + c_in

so an (output pixel, input pixel) pair is a C_out x C_in block of the eFCN matrix, and an NHWC
(channels_last) activation is already a flat feature vector, with no copy.

Every padding mode is a linear map of the input, so the eFCN is exact for all of them: an
output pixel's tap at padded coordinate i reads input row ``pad_map(i)`` (none for zeros out of
range; mirrored for reflect; clamped for replicate; wrapped for circular). Two taps that land on
the same input pixel sum into one entry.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from math import gcd
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn

from .layout import BSRLayout

Halo = Union[int, str]

__all__ = ["ConvGeometry", "choose_block_side", "choose_block_shape", "build_layout", "embed_weight", "embed_bias", "check_halo"]


def _pair(v) -> Tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def check_halo(halo: Halo) -> Halo:
    if halo == "full":
        return halo
    if isinstance(halo, bool) or not isinstance(halo, int) or halo < 0:
        raise ValueError(f"halo: expected a non-negative int or 'full', got {halo!r}")
    return halo


@dataclass(frozen=True)
class ConvGeometry:
    """All a Conv2d's eFCN structure depends on (no weights)."""

    in_channels: int
    out_channels: int
    kernel_size: Tuple[int, int]
    stride: Tuple[int, int]
    dilation: Tuple[int, int]
    groups: int
    padding_mode: str
    pad_h: Tuple[int, int]  # (top, bottom)
    pad_w: Tuple[int, int]  # (left, right)
    input_size: Tuple[int, int]

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, input_size) -> "ConvGeometry":
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"expected an nn.Conv2d, got {type(conv).__name__}")
        H, W = _pair(input_size)
        if H <= 0 or W <= 0:
            raise ValueError(f"input_size: expected positive (H, W), got {input_size!r}")
        kh, kw = _pair(conv.kernel_size)
        dh, dw = _pair(conv.dilation)
        if isinstance(conv.padding, str):
            if conv.padding == "valid":
                pads = ((0, 0), (0, 0))
            else:  # 'same': PyTorch puts the extra pixel at the end
                th, tw = dh * (kh - 1), dw * (kw - 1)
                pads = ((th // 2, th - th // 2), (tw // 2, tw - tw // 2))
        else:
            ph, pw = _pair(conv.padding)
            pads = ((ph, ph), (pw, pw))
        geo = cls(conv.in_channels, conv.out_channels, (kh, kw), _pair(conv.stride), (dh, dw), conv.groups,
                  conv.padding_mode, pads[0], pads[1], (H, W))
        geo._check()
        return geo

    def _check(self) -> None:
        H, W = self.input_size
        if self.out_size[0] <= 0 or self.out_size[1] <= 0:
            raise ValueError(f"input size {self.input_size} is too small for kernel {self.kernel_size}, "
                             f"dilation {self.dilation}, padding {self.pad_h}/{self.pad_w}: output would be {self.out_size}")
        if self.padding_mode == "reflect" and max(self.pad_h) >= H or self.padding_mode == "reflect" and max(self.pad_w) >= W:
            raise ValueError(f"reflect padding {self.pad_h}/{self.pad_w} must be smaller than the input size {self.input_size}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ConvGeometry":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    @property
    def out_size(self) -> Tuple[int, int]:
        H, W = self.input_size
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        ho = (H + sum(self.pad_h) - dh * (kh - 1) - 1) // sh + 1
        wo = (W + sum(self.pad_w) - dw * (kw - 1) - 1) // sw + 1
        return ho, wo

    @property
    def in_features(self) -> int:
        return self.input_size[0] * self.input_size[1] * self.in_channels

    @property
    def out_features(self) -> int:
        return self.out_size[0] * self.out_size[1] * self.out_channels

    # -------------------------------------------------------------- pixel connectivity
    def _tap_map(self, axis: int) -> torch.Tensor:
        """[out, k] input coordinate read by each output coordinate's tap k along ``axis`` (-1: zero pad)."""
        n_in = self.input_size[axis]
        n_out = self.out_size[axis]
        k, s, d = self.kernel_size[axis], self.stride[axis], self.dilation[axis]
        before = (self.pad_h, self.pad_w)[axis][0]
        i = torch.arange(n_out)[:, None] * s - before + torch.arange(k)[None, :] * d
        mode = self.padding_mode
        if mode == "zeros":
            return torch.where((i >= 0) & (i < n_in), i, torch.full_like(i, -1))
        if mode == "replicate":
            return i.clamp(0, n_in - 1)
        if mode == "circular":
            return i.remainder(n_in)
        if mode == "reflect":
            if n_in == 1:
                return torch.zeros_like(i)
            period = 2 * (n_in - 1)
            j = i.remainder(period)
            return torch.where(j < n_in, j, period - j)
        raise ValueError(f"unsupported padding_mode {mode!r}")

    def local_taps(self):
        """(p_out, p_in, kh, kw) int64 tensors, one entry per kernel tap landing on an input pixel.

        Taps into zero padding are absent; taps of other modes that hit one pixel twice appear twice.
        """
        (Ho, Wo), W = self.out_size, self.input_size[1]
        KH, KW = self.kernel_size
        rm, cm = self._tap_map(0), self._tap_map(1)  # [Ho, KH], [Wo, KW]
        ho, wo, kh, kw = torch.meshgrid(torch.arange(Ho), torch.arange(Wo), torch.arange(KH), torch.arange(KW), indexing="ij")
        i, j = rm[ho, kh], cm[wo, kw]
        ok = (i >= 0) & (j >= 0)
        return (ho * Wo + wo)[ok], (i * W + j)[ok], kh[ok], kw[ok]

    def support_pairs(self, halo: Halo) -> torch.Tensor:
        """Sorted unique keys ``p_out * P_in + p_in`` of the stored pixel pairs."""
        halo = check_halo(halo)
        (Ho, Wo), (H, W) = self.out_size, self.input_size
        P_in = H * W
        if halo == "full":
            return torch.arange(Ho * Wo * P_in)
        po, pi, _, _ = self.local_taps()
        keys = [po * P_in + pi]
        if halo > 0:
            boxes = []
            for axis in (0, 1):
                n_out, n_in = self.out_size[axis], self.input_size[axis]
                k, s, d = self.kernel_size[axis], self.stride[axis], self.dilation[axis]
                before = (self.pad_h, self.pad_w)[axis][0]
                lo = torch.arange(n_out) * s - before - halo
                hi = torch.arange(n_out) * s - before + d * (k - 1) + halo
                coord = torch.arange(n_in)
                boxes.append((coord[None, :] >= lo[:, None]) & (coord[None, :] <= hi[:, None]))  # [n_out, n_in]
            inside = boxes[0][:, None, :, None] & boxes[1][None, :, None, :]  # [Ho, Wo, H, W]
            po_h, pi_h = torch.nonzero(inside.reshape(Ho * Wo, P_in), as_tuple=True)
            keys.append(po_h * P_in + pi_h)
        return torch.unique(torch.cat(keys))


def choose_block_side(channels: int, cap: int = 64) -> int:
    """Tile side for a channel count: a multiple of 16 dividing ``channels`` (pixel-aligned,
    largest up to ``cap``), else a tile spanning whole pixels (lcm of channels and 16) up to
    128 entries, else 16 with the mask covering partial pixels."""
    if channels % 16 == 0:
        return max(b for b in range(16, min(cap, channels) + 1, 16) if channels % b == 0)
    span = channels * 16 // gcd(channels, 16)
    return span if span <= 128 else 16


FEW_CHANNELS = 4  # a layer with at most this many input (or output) channels gets tight tiles


def _tight_side(channels: int) -> int:
    """Tile side that keeps a tile within one pixel's ``channels`` where it can: the multiple of 16
    of :func:`choose_block_side`, else the whole pixel (up to 64 channels), else the largest
    divisor from 8 to 64; with none (e.g. a prime), 16 with the mask covering the partial pixels,
    which over 64 channels stores at most 1.5x the pixel's entries."""
    if channels % 16 == 0:
        return choose_block_side(channels)
    if channels <= 64:
        return channels
    return max([d for d in range(8, 65) if channels % d == 0], default=16)


def choose_block_shape(geo: ConvGeometry, halo: Halo = 0) -> Tuple[int, int]:
    """The (BR, BC) tile of a conv's eFCN with ``halo``.

    Layers with few input or output channels (RGB or grey input, <= ``FEW_CHANNELS``) get tight
    tiles: one pixel's channels of one group per side (a column tile of 1-4 entries), so a stored
    block is one in-group (output pixel, input pixel) pair whatever the kernel, stride, dilation or
    halo, and nothing is stored that the support does not need (a tile spanning several pixels
    cannot follow the shifting receptive fields: most of it would be masked zeros). Except with
    ``halo="full"`` and no groups: every pair is stored, so the wider tiles below waste only
    their edges (kept to 1.5x), and fewer, larger blocks run faster. Other layers get
    :func:`choose_block_side` per side.
    """
    Cout, Cin, g = geo.out_channels, geo.in_channels, geo.groups
    wide = choose_block_side(Cout), choose_block_side(Cin)
    if min(Cout, Cin) > FEW_CHANNELS:
        return wide
    if halo == "full" and g == 1:
        (M, N), (BR, BC) = (geo.out_features, geo.in_features), wide
        if -(-M // BR) * BR * -(-N // BC) * BC <= 1.5 * M * N:
            return wide
    return _tight_side(Cout // g), _tight_side(Cin // g)


def _group_ok(geo: ConvGeometry, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Whether output channel ``r % C_out`` and input channel ``c % C_in`` share a group."""
    g = geo.groups
    if g == 1:
        return torch.ones(torch.broadcast_shapes(r.shape, c.shape), dtype=torch.bool)
    return (r % geo.out_channels) // (geo.out_channels // g) == (c % geo.in_channels) // (geo.in_channels // g)


def build_layout(geo: ConvGeometry, halo: Halo = 0, block_shape: Optional[Tuple[int, int]] = None,
                 device=None) -> BSRLayout:
    """The BSR layout storing the conv's receptive fields (plus ``halo``), with the element mask
    marking which entries may ever be non-zero (support pixel pair, same channel group, in range)."""
    Cout, Cin = geo.out_channels, geo.in_channels
    M, N = geo.out_features, geo.in_features
    P_in = geo.input_size[0] * geo.input_size[1]
    BR, BC = block_shape if block_shape is not None else choose_block_shape(geo, halo)
    if BR <= 0 or BC <= 0:
        raise ValueError(f"block_shape: expected positive sides, got {block_shape}")
    pairs = geo.support_pairs(halo)
    po, pi = pairs // P_in, pairs % P_in
    # blocks touched by each pixel pair (a pair's C_out x C_in sub-block may span several blocks)
    r_lo, r_hi = po * Cout // BR, ((po + 1) * Cout - 1) // BR
    c_lo, c_hi = pi * Cin // BC, ((pi + 1) * Cin - 1) // BC
    nbc = -(-N // BC)
    keys = []
    for dr in range(int((r_hi - r_lo).max()) + 1 if pairs.numel() else 0):
        for dc in range(int((c_hi - c_lo).max()) + 1):
            ok = (r_lo + dr <= r_hi) & (c_lo + dc <= c_hi)
            keys.append(((r_lo + dr) * nbc + c_lo + dc)[ok])
    keys = torch.unique(torch.cat(keys)) if keys else torch.zeros(0, dtype=torch.int64)
    brow, bcol = keys // nbc, keys % nbc

    aligned = Cout % BR == 0 and Cin % BC == 0
    if (aligned and geo.groups == 1) or keys.numel() == 0:
        return BSRLayout.from_block_coords((M, N), (BR, BC), brow, bcol, device=device)
    rr, cc = torch.arange(BR), torch.arange(BC)
    if aligned:
        # a block lies inside one pixel pair of the support: its mask is the group pattern at its channel offset
        okey = (brow * BR) % Cout * Cin + (bcol * BC) % Cin
        uniq, ids = torch.unique(okey, return_inverse=True)
        pats = _group_ok(geo, (uniq // Cin)[:, None, None] + rr[None, :, None], (uniq % Cin)[:, None, None] + cc[None, None, :])
    else:
        # tiles span several pixels: compute each block's mask, in chunks, and deduplicate
        known, pats_list, ids_list = {}, [], []
        for s in range(0, keys.numel(), 4096):
            R = brow[s:s + 4096, None, None] * BR + rr[None, :, None]
            C = bcol[s:s + 4096, None, None] * BC + cc[None, None, :]
            key = (R // Cout) * P_in + (C // Cin)
            pos = torch.searchsorted(pairs, key).clamp(max=pairs.numel() - 1)
            m = (pairs[pos] == key) & _group_ok(geo, R, C) & (R < M) & (C < N)
            u, inv = torch.unique(m.reshape(m.shape[0], -1), dim=0, return_inverse=True)
            ids = torch.empty(u.shape[0], dtype=torch.int64)
            for i, row in enumerate(u):  # distinct patterns only (a handful)
                b = row.numpy().tobytes()
                if b not in known:
                    known[b] = len(known)
                    pats_list.append(row.reshape(1, BR, BC))
                ids[i] = known[b]
            ids_list.append(ids[inv])
        pats, ids = torch.cat(pats_list), torch.cat(ids_list)
    flat = pats.reshape(pats.shape[0], BR * BC)
    keep = flat.any(1)[ids]  # drop blocks that lie wholly in other groups
    if bool(flat.all(1)[ids[keep]].all()):  # tiles follow the groups: every kept block is whole
        return BSRLayout.from_block_coords((M, N), (BR, BC), brow[keep], bcol[keep], device=device)
    return BSRLayout.from_block_coords((M, N), (BR, BC), brow[keep], bcol[keep], mask_ids=ids[keep],
                                       mask_patterns=pats, device=device)


def _stored_keys(layout: BSRLayout) -> torch.Tensor:
    """Sorted keys ``block_row * n_block_cols + block_col`` of the stored blocks (CSR order)."""
    return layout.row_idx.long().cpu() * layout.n_block_cols + layout.col_idx.long().cpu()


def _block_lookup(layout: BSRLayout, brow: torch.Tensor, bcol: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """Index into values of stored blocks (brow, bcol); raises if one is not stored."""
    key = brow * layout.n_block_cols + bcol
    pos = torch.searchsorted(stored, key).clamp(max=max(stored.numel() - 1, 0))
    if stored.numel() == 0 or not bool((stored[pos] == key).all()):
        raise RuntimeError("internal error: a receptive-field entry falls outside the stored blocks")
    return pos


def embed_weight(geo: ConvGeometry, layout: BSRLayout, weight: torch.Tensor, chunk: int = 1 << 22) -> torch.Tensor:
    """Values [nnzb, BR, BC] holding the conv kernel at every receptive field (zeros elsewhere)."""
    Cout, Cin, g = geo.out_channels, geo.in_channels, geo.groups
    cog, cig = Cout // g, Cin // g
    if tuple(weight.shape) != (Cout, cig) + geo.kernel_size:
        raise ValueError(f"weight: expected shape {(Cout, cig) + geo.kernel_size}, got {tuple(weight.shape)}")
    BR, BC = layout.block_shape
    w = weight.detach().cpu()
    values = torch.zeros(layout.nnzb, BR, BC, dtype=w.dtype)
    po, pi, kh, kw = geo.local_taps()
    stored = _stored_keys(layout)
    if Cout % BR == 0 and Cin % BC == 0:
        # pixel-aligned tiles: each (tap, tile) adds one kernel tile to one block
        KH, KW = geo.kernel_size
        dense = torch.zeros(KH, KW, Cout, Cin, dtype=w.dtype)  # group structure made explicit
        for gi in range(g):
            dense[:, :, gi * cog:(gi + 1) * cog, gi * cig:(gi + 1) * cig] = w[gi * cog:(gi + 1) * cog].permute(2, 3, 0, 1)
        ta, tb = Cout // BR, Cin // BC
        tiles = dense.reshape(KH * KW, ta, BR, tb, BC).permute(0, 1, 3, 2, 4).reshape(KH * KW * ta * tb, BR, BC)
        in_group = _group_ok(geo, torch.arange(Cout)[:, None], torch.arange(Cin)[None, :])
        a, b = torch.nonzero(in_group.reshape(ta, BR, tb, BC).any(3).any(1), as_tuple=True)  # tiles in a group
        step = max(1, chunk // (BR * BC * a.numel()))
        for s in range(0, po.numel(), step):
            sl = slice(s, s + step)
            blk = _block_lookup(layout, (po[sl, None] * ta + a).reshape(-1), (pi[sl, None] * tb + b).reshape(-1), stored)
            src = ((kh[sl] * KW + kw[sl])[:, None] * (ta * tb) + a * tb + b).reshape(-1)
            values.index_add_(0, blk, tiles[src])
        return values.to(weight.device)
    values = values.reshape(-1)
    co = torch.arange(Cout)
    ci = (co // cog)[:, None] * cig + torch.arange(cig)[None, :]  # [Cout, cig] input channel of each weight
    step = max(1, chunk // (Cout * cig))
    for s in range(0, po.numel(), step):
        r = po[s:s + step, None, None] * Cout + co[None, :, None]  # [t, Cout, 1]
        c = pi[s:s + step, None, None] * Cin + ci[None]  # [t, Cout, cig]
        r = r.expand_as(c)
        blk = _block_lookup(layout, (r // BR).reshape(-1), (c // BC).reshape(-1), stored)
        flat = blk * (BR * BC) + (r % BR).reshape(-1) * BC + (c % BC).reshape(-1)
        values.index_add_(0, flat, w[:, :, kh[s:s + step], kw[s:s + step]].permute(2, 0, 1).reshape(-1))
    return values.reshape(layout.nnzb, BR, BC).to(weight.device)


def embed_bias(geo: ConvGeometry, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The per-position bias [M]: the conv's per-channel bias at every output pixel."""
    if bias is None:
        return None
    return bias.detach().repeat(geo.out_size[0] * geo.out_size[1])
