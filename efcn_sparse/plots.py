"""Figures of a relax run (matplotlib, PNG), redrawn from ``metrics.jsonl`` by ``efcn plot RUN_DIR``.

* ``relax_final_acc.png``: final test accuracy against the relax time t_w, with the CNN and the
  FCN as horizontal lines (the paper's main figure), and the eFCNs projected back to CNNs.
* ``test_acc_epochs.png``: test accuracy over epochs for every arm.
* ``deviation.png``: deviation from the CNN subspace (total, off-local, sharing) over the epochs
  after relaxing, per t_w.
* ``offlocal_distance.png``: final off-local weight norm against the distance (pixels) beyond the
  receptive field, per t_w.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional

__all__ = ["plot_run", "FIGURES"]

FIGURES = ("relax_final_acc.png", "test_acc_epochs.png", "deviation.png", "offlocal_distance.png")


def _pyplot():
    import matplotlib

    if not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def _by_arm(rows: List[dict]) -> Dict[str, List[dict]]:
    out: Dict[str, List[dict]] = {}
    for r in rows:
        out.setdefault(r["arm"], []).append(r)
    for v in out.values():
        v.sort(key=lambda r: r["epochs_trained"])
    return out


def _colors(plt, times):
    cmap = plt.get_cmap("viridis")
    n = max(len(times) - 1, 1)
    return {t: cmap(0.9 * i / n) for i, t in enumerate(times)}


def plot_run(run_dir: str, out_dir: Optional[str] = None) -> List[str]:
    """Draw the figures of ``run_dir`` into ``out_dir`` (default RUN_DIR/figures); returns their paths."""
    from .protocol import _final_rows, load_run

    plt = _pyplot()
    meta, rows = load_run(run_dir)
    out_dir = out_dir or os.path.join(run_dir, "figures")
    os.makedirs(out_dir, exist_ok=True)
    arms = _by_arm(rows)
    fin = _final_rows(meta, rows)
    cfg, data = meta["config"], meta["data"]
    title = f"{cfg['model']} on {data['name']} ({data['train_size']} train), T={cfg['epochs']}, halo={cfg['halo']}"
    efcn = sorted((a for a in meta["arms"] if a["kind"] == "efcn" and a["arm"] in fin), key=lambda a: a["t_w"])
    times = [a["t_w"] for a in efcn]
    col = _colors(plt, times)
    paths = []

    def save(fig, name):
        p = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)

    # 1. final test accuracy vs relax time (the paper's main figure)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    if efcn:
        ax.plot(times, [100 * fin[a["arm"]]["test_acc"] for a in efcn], "o-", color="C2", label="eFCN (relaxed at t_w)")
        ax.plot(times, [100 * fin[a["arm"]]["proj_test_acc"] for a in efcn], "s--", color="C2", alpha=0.5,
                markersize=4, label="eFCN projected to a CNN")
    for arm, color, label in (("cnn", "C0", "CNN"), ("fcn", "C3", "FCN from scratch")):
        if arm in fin:
            ax.axhline(100 * fin[arm]["test_acc"], color=color, ls="-" if arm == "cnn" else ":", label=label)
    ax.set_xscale("symlog", linthresh=1)
    if times:
        ax.set_xticks(times)
        ax.set_xticklabels([str(t) for t in times])
        ax.minorticks_off()
    ax.set_xlabel("relax time t_w (epochs of CNN training)")
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, FIGURES[0])

    # 2. test accuracy over epochs, every arm
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for arm, color, label in (("cnn", "C0", "CNN"), ("fcn", "C3", "FCN")):
        if arm in arms:
            ax.plot([r["epoch"] for r in arms[arm]], [100 * r["test_acc"] for r in arms[arm]], color=color, lw=2,
                    label=label)
    for a in efcn:
        rs = arms[a["arm"]]
        ax.plot([r["epoch"] for r in rs], [100 * r["test_acc"] for r in rs], color=col[a["t_w"]], lw=1,
                label=f"eFCN t_w={a['t_w']}")
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
            rs = arms[a["arm"]]
            ax.plot([r["epochs_trained"] for r in rs], [r[key] for r in rs], "o-", ms=3, color=col[a["t_w"]],
                    label=f"t_w={a['t_w']}")
        if "fcn" in arms:
            rs = arms["fcn"]
            ax.plot([r["epochs_trained"] for r in rs], [r[key] for r in rs], ":", color="C3", label="FCN")
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
    for a in efcn + ([{"arm": "fcn", "t_w": None}] if "fcn" in fin else []):
        prof = fin[a["arm"]].get("offlocal_by_distance") or []
        if not any(v > 0 for v in prof):
            continue
        d = [i for i, v in enumerate(prof) if v > 0]
        color = "C3" if a["t_w"] is None else col[a["t_w"]]
        ax.plot(d, [prof[i] for i in d], "o-", ms=3, color=color,
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
