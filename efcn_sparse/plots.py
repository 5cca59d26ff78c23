"""Figures of a relax run (matplotlib, PNG), redrawn from ``metrics.jsonl`` by ``efcn plot RUN_DIR``.

Every figure shows the mean over the run's seeds with a band or error bars of one standard
deviation (none with a single seed); the legend gives n.

* ``relax_final_acc.png``: final test accuracy (mean of the last k epochs) against the relax time
  t_w, with the CNN and the FCN as horizontal lines (the paper's main figure), and the eFCNs
  projected back to CNNs.
* ``test_acc_epochs.png``: test accuracy over epochs for every arm.
* ``deviation.png``: deviation from the CNN subspace (total, off-local, sharing) over the epochs
  after relaxing, per t_w.
* ``offlocal_distance.png``: final off-local weight norm against the distance (pixels) beyond the
  receptive field, per t_w.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .results import arm_finals, load_run

__all__ = ["plot_run", "FIGURES"]

FIGURES = ("relax_final_acc.png", "test_acc_epochs.png", "deviation.png", "offlocal_distance.png")


def _pyplot():
    import matplotlib

    if not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def _mean_std(values: Sequence[Sequence[float]]) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and sample std (0 for one value) over the first axis, ignoring missing (None/NaN) entries."""
    a = np.array([[np.nan if v is None else v for v in vs] for vs in values], dtype=float).reshape(len(values), -1)
    ok = ~np.isnan(a)
    n = ok.sum(axis=0)
    filled = np.where(ok, a, 0.0)
    mean = filled.sum(axis=0) / np.maximum(n, 1)
    var = (np.where(ok, a - mean, 0.0) ** 2).sum(axis=0) / np.maximum(n - 1, 1)
    return np.where(n > 0, mean, np.nan), np.sqrt(var)


def _curves(rows: List[dict], arm: str, key: str, x: str = "epoch") -> Tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """x, mean and std over the seeds of ``key`` per ``x`` for one arm, and the number of seeds."""
    per: Dict[int, Dict[float, float]] = {}
    for r in rows:
        if r["arm"] == arm and r.get(key) is not None:
            per.setdefault(r["seed"], {})[r[x]] = r[key]
    xs = sorted({v for d in per.values() for v in d})
    mean, std = _mean_std([[d.get(v) for v in xs] for d in per.values()])
    return np.array(xs), mean, std, len(per)


def _band(ax, x, mean, std, color, **kw):
    line = ax.plot(x, mean, color=color, **kw)
    if np.any(std > 0):
        ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.15, lw=0)
    return line


def _colors(plt, times):
    cmap = plt.get_cmap("viridis")
    n = max(len(times) - 1, 1)
    return {t: cmap(0.9 * i / n) for i, t in enumerate(times)}


def plot_run(run_dir: str, out_dir: Optional[str] = None) -> List[str]:
    """Draw the figures of ``run_dir`` into ``out_dir`` (default RUN_DIR/figures); returns their paths."""
    plt = _pyplot()
    meta, rows = load_run(run_dir)
    out_dir = out_dir or os.path.join(run_dir, "figures")
    os.makedirs(out_dir, exist_ok=True)
    k = int(meta["config"].get("last_k") or 3)
    finals = arm_finals(meta, rows, k)
    present = {a for _, a in finals}
    cfg, data = meta["config"], meta["data"]
    n_seeds = len({s for s, _ in finals})
    title = (f"{cfg['model']} on {data['name']} ({data['train_size']} train), T={cfg['epochs']}, halo={cfg['halo']}, "
             f"{n_seeds} seed{'s' if n_seeds != 1 else ''}" + (" (mean ± std)" if n_seeds > 1 else ""))
    efcn = sorted((a for a in meta["arms"] if a["kind"] == "efcn" and a["arm"] in present), key=lambda a: a["t_w"])
    times = [a["t_w"] for a in efcn]
    col = _colors(plt, times)
    paths = []

    def final(arm: str, key: str) -> Tuple[float, float, int]:
        vals = [f[key] for (s, a), f in finals.items() if a == arm and f.get(key) is not None]
        m, sd = _mean_std([[v] for v in vals])
        return (float(m[0]), float(sd[0]), len(vals)) if vals else (np.nan, 0.0, 0)

    def save(fig, name):
        p = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)

    # 1. final test accuracy vs relax time (the paper's main figure)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    if efcn:
        for key, fmt, alpha, label in (("final_test_acc", "o-", 1.0, "eFCN (relaxed at t_w)"),
                                       ("final_proj_test_acc", "s--", 0.5, "eFCN projected to a CNN")):
            st = [final(a["arm"], key) for a in efcn]
            ax.errorbar(times, [100 * m for m, _, _ in st], yerr=[100 * sd for _, sd, _ in st], fmt=fmt,
                        color="C2", alpha=alpha, capsize=3, markersize=5 if alpha == 1 else 4, label=label)
    for arm, color, ls, label in (("cnn", "C0", "-", "CNN"), ("fcn", "C3", ":", "FCN from scratch")):
        if arm in present:
            m, sd, n = final(arm, "final_test_acc")
            ax.axhline(100 * m, color=color, ls=ls, label=f"{label} (n={n})")
            if sd > 0:
                ax.axhspan(100 * (m - sd), 100 * (m + sd), color=color, alpha=0.12, lw=0)
    ax.set_xscale("symlog", linthresh=1)
    if times:
        ax.set_xticks(times)
        ax.set_xticklabels([str(t) for t in times])
        ax.minorticks_off()
    ax.set_xlabel("relax time t_w (epochs of CNN training)")
    ax.set_ylabel(f"final test accuracy (%, mean of last {k} epochs)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, FIGURES[0])

    # 2. test accuracy over epochs, every arm
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for arm, color, label in (("cnn", "C0", "CNN"), ("fcn", "C3", "FCN")):
        if arm in present:
            x, m, sd, _ = _curves(rows, arm, "test_acc")
            _band(ax, x, 100 * m, 100 * sd, color, lw=2, label=label)
    for a in efcn:
        x, m, sd, _ = _curves(rows, a["arm"], "test_acc")
        _band(ax, x, 100 * m, 100 * sd, col[a["t_w"]], lw=1, label=f"eFCN t_w={a['t_w']}")
    ax.set_xlabel("epoch (CNN epochs before relaxing + eFCN epochs after)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    save(fig, FIGURES[1])

    # 3. deviation from the CNN subspace after relaxing
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for ax, key, label in zip(axes, ("deviation", "offlocal_ratio", "sharing_deviation"),
                              ("total ||W - P(W)|| / ||W||", "off-local ||W_off|| / ||W||",
                               "sharing ||W_loc - P(W)|| / ||W||")):
        for a in efcn:
            x, m, sd, _ = _curves(rows, a["arm"], key, x="epochs_trained")
            _band(ax, x, m, sd, col[a["t_w"]], marker="o", ms=3, label=f"t_w={a['t_w']}")
        if "fcn" in present:
            x, m, sd, _ = _curves(rows, "fcn", key, x="epochs_trained")
            _band(ax, x, m, sd, "C3", ls=":", label="FCN")
        ax.set_xlabel("epochs after relaxing")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("deviation from the CNN subspace")
    axes[-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    save(fig, FIGURES[2])

    # 4. final off-local weight norm by distance beyond the receptive field
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    drawn = False
    for a in efcn + ([{"arm": "fcn", "t_w": None}] if "fcn" in present else []):
        profs = [f.get("offlocal_by_distance") or [] for (s, arm), f in finals.items() if arm == a["arm"]]
        width = max((len(p) for p in profs), default=0)
        if not width:
            continue
        m, sd = _mean_std([list(p) + [None] * (width - len(p)) for p in profs])
        d = [i for i in range(width) if m[i] > 0]
        if not d:
            continue
        color = "C3" if a["t_w"] is None else col[a["t_w"]]
        ax.errorbar(d, m[d], yerr=sd[d], fmt="o-", ms=3, capsize=2, color=color,
                    label="FCN" if a["t_w"] is None else f"t_w={a['t_w']}")
        drawn = True
    if drawn:
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no off-local weights (halo = 0, or no training after relaxing)", ha="center",
                transform=ax.transAxes)
    ax.set_xlabel("distance beyond the receptive field (pixels, Chebyshev)")
    ax.set_ylabel("off-local weight norm at the end")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    save(fig, FIGURES[3])
    return paths
