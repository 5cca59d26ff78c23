"""Finished (or partial) relax runs: reading, robust statistics over seeds, the summary, merging.

The runner (``protocol.py``) writes run directories through this module and the figures
(``plots.py``) read them through it; neither imports the other's internals.

Robust statistics: the *final* accuracy of an arm is the mean of its last ``last_k`` epochs (its
epoch-0 row counts when the arm has fewer epochs), the *best* epoch stands beside it, and every
table gives mean, standard deviation and n over the seeds. ``metrics.csv`` holds one row per seed,
arm and epoch (``seed`` an integer) and, when there are several seeds, rows with ``seed`` = ``mean``
and ``std`` per arm and epoch (``n_seeds`` says over how many).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

from . import training as T
from .claims import DEVIATION_SMALL, Stat, claims_markdown, evaluate_claims, margin, stat, t_critical

__all__ = ["RunError", "CSV_FIELDS", "LAST_K", "load_run", "run_seeds", "arm_finals", "arm_stats", "summarize",
           "merge", "write_metrics", "csv_text"]

LAST_K = 3  # final accuracy: mean of the last k epochs


class RunError(RuntimeError):
    """A run that cannot start or continue as asked (bad options, an existing directory, a mismatch)."""


CSV_FIELDS = ["seed", "n_seeds", "arm", "kind", "t_w", "epoch", "epochs_trained", "lr", "train_loss", "train_acc",
              "test_loss", "test_acc", "proj_test_loss", "proj_test_acc", "deviation", "offlocal_ratio",
              "sharing_deviation", "bias_deviation", "weight_norm", "epoch_time_s", "eval_time_s", "peak_mem_mb"]
_KEYS = ("seed", "n_seeds", "arm", "kind", "t_w", "epoch", "epochs_trained")
ARTIFACTS = ("config.json", "metrics.jsonl", "metrics.csv", "summary.md", "figures", "checkpoints")
# config fields that may differ between runs that are merged
MERGE_FREE = {"device", "backend", "data_dir", "download", "eval_batch_size", "threads", "relax_times", "n_relax",
              "fcn", "seed", "seeds", "last_k", "parallel", "fsdp"}


# ---------------------------------------------------------------------------------------- files
def atomic_write_text(path: str, text: str) -> None:
    T.atomic_write(path, lambda f: f.write(text), binary=False)


def read_jsonl(path: str, default_seed: int = 0) -> List[dict]:
    """Metric rows of a ``metrics.jsonl`` (a row without ``seed``, from before seeds: ``default_seed``)."""
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill: its epoch is redone on resume
                continue
            r.setdefault("seed", default_seed)
            rows.append(r)
    return dedupe(rows)


def dedupe(rows: List[dict]) -> List[dict]:
    """Keep the last row of each (seed, arm, epochs_trained), sorted by arm, seed and epoch."""
    out: Dict[Tuple[int, str, int], dict] = {}
    for r in rows:
        out[(r.get("seed", 0), r["arm"], r["epochs_trained"])] = r
    return sorted(out.values(), key=lambda r: (arm_order(r), r.get("seed", 0), r["epochs_trained"]))


def arm_order(r: dict) -> Tuple[int, float]:
    return ({"cnn": 0, "efcn": 1, "fcn": 2}.get(r["kind"], 3), -1 if r.get("t_w") is None else r["t_w"])


def _fmt_csv(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return repr(v)
    return str(v)


def _aggregate_rows(rows: List[dict]) -> List[dict]:
    """Per (arm, epochs_trained): the mean and std rows over the seeds (only with several seeds)."""
    if len({r.get("seed", 0) for r in rows}) < 2:
        return []
    groups: Dict[Tuple[str, int], List[dict]] = {}
    for r in rows:
        groups.setdefault((r["arm"], r["epochs_trained"]), []).append(r)
    out = []
    for (arm, k), rs in sorted(groups.items(), key=lambda kv: (arm_order(kv[1][0]), kv[0][1])):
        stats = {f: stat([r.get(f) for r in rs]) for f in CSV_FIELDS if f not in _KEYS}
        base = {f: rs[0].get(f) for f in ("arm", "kind", "t_w", "epoch", "epochs_trained")}
        for which in ("mean", "std"):
            row = dict(base, seed=which, n_seeds=len(rs))
            row.update({f: (getattr(s, which) if s.n else None) for f, s in stats.items()})
            out.append(row)
    return out


def csv_text(rows: List[dict]) -> str:
    lines = [",".join(CSV_FIELDS)]
    lines += [",".join(_fmt_csv(r.get(k)) for k in CSV_FIELDS) for r in rows + _aggregate_rows(rows)]
    return "\n".join(lines) + "\n"


def write_metrics(out: str, rows: List[dict]) -> None:
    atomic_write_text(os.path.join(out, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_text(os.path.join(out, "metrics.csv"), csv_text(rows))


def run_seeds(meta: dict) -> List[int]:
    """The seeds of a run (a run from before seeds has one: its ``seed``)."""
    cfg = meta["config"]
    seeds = meta.get("seeds") or cfg.get("seeds")
    return list(seeds) if seeds else [int(cfg.get("seed", 0))]


def load_run(run_dir: str) -> Tuple[dict, List[dict]]:
    """(config.json as a dict, metric rows, each with its ``seed``) of a run directory."""
    cfg_path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise RunError(f"{run_dir} is not a run directory (no config.json)")
    try:
        with open(cfg_path) as f:
            meta = json.load(f)
        meta["seeds"] = run_seeds(meta)
    except (ValueError, KeyError, TypeError) as e:
        raise RunError(f"{cfg_path} is not a relax run's config ({type(e).__name__}: {e})") from e
    return meta, read_jsonl(os.path.join(run_dir, "metrics.jsonl"), meta["seeds"][0])


# ---------------------------------------------------------------------------------------- statistics
def _mean(vals: List[Optional[float]]) -> Optional[float]:
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None


def arm_finals(meta: dict, rows: List[dict], last_k: int = LAST_K) -> Dict[Tuple[int, str], dict]:
    """Per (seed, arm): its last row, plus ``final_*`` (means over the last ``last_k`` rows), ``best_test_acc``
    and ``best_epoch`` (the global epoch of the best test accuracy), ``time_per_epoch`` and ``complete``."""
    if last_k < 1:
        raise RunError(f"--last-k must be >= 1, got {last_k}")
    expected = {a["arm"]: a["epochs"] for a in meta["arms"]}
    groups: Dict[Tuple[int, str], List[dict]] = {}
    for r in rows:
        if r["arm"] in expected:
            groups.setdefault((r["seed"], r["arm"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        rs.sort(key=lambda r: r["epochs_trained"])
        tail, last = rs[-last_k:], rs[-1]
        best = max(rs, key=lambda r: (r["test_acc"], -r["epoch"]))
        times = [r["epoch_time_s"] for r in rs if r["epochs_trained"] > 0]
        out[key] = dict(last, complete=last["epochs_trained"] >= expected[key[1]], last_k=len(tail),
                        final_test_acc=_mean([r["test_acc"] for r in tail]),
                        final_train_acc=_mean([r["train_acc"] for r in tail]),
                        final_proj_test_acc=_mean([r.get("proj_test_acc") for r in tail]),
                        best_test_acc=best["test_acc"], best_epoch=best["epoch"],
                        time_per_epoch=_mean(times) or 0.0)
    return out


def arm_stats(meta: dict, finals: Dict[Tuple[int, str], dict]) -> List[dict]:
    """Per arm of the run (in order): its seeds' statistics (:class:`~efcn_sparse.claims.Stat` per field)."""
    out = []
    for a in meta["arms"]:
        fs = [finals[(s, a["arm"])] for s in meta["seeds"] if (s, a["arm"]) in finals]
        st = {f: stat([x.get(f) for x in fs]) for f in ("final_test_acc", "final_train_acc", "final_proj_test_acc",
                                                         "best_test_acc", "deviation", "offlocal_ratio",
                                                         "sharing_deviation", "time_per_epoch")}
        out.append(dict(a, n=len(fs), n_complete=sum(x["complete"] for x in fs), seeds=[x["seed"] for x in fs],
                        best_epochs=[x["best_epoch"] for x in fs],
                        epochs_done=[x["epochs_trained"] for x in fs], **st))
    return out


def claim_inputs(meta: dict, finals: Dict[Tuple[int, str], dict]) -> dict:
    """Per-seed final values of the complete arms, as :func:`~efcn_sparse.claims.evaluate_claims` takes them."""
    done = {k: f for k, f in finals.items() if f["complete"]}

    def per_seed(arm, field="final_test_acc"):
        return {s: f[field] for (s, a), f in done.items() if a == arm}

    efcn = [a for a in meta["arms"] if a["kind"] == "efcn" and a["epochs"] > 0]
    return dict(cnn=per_seed("cnn"), fcn=per_seed("fcn"),
                efcn={a["t_w"]: per_seed(a["arm"]) for a in efcn if per_seed(a["arm"])},
                deviation={a["t_w"]: per_seed(a["arm"], "deviation") for a in efcn if per_seed(a["arm"])},
                epochs=meta["config"]["epochs"])


# ---------------------------------------------------------------------------------------- summary
def _pct(s: Stat) -> str:
    return s.fmt(100.0, 2)


def _header(meta: dict, last_k: int) -> List[str]:
    cfg, d = meta["config"], meta["data"]
    seeds = meta["seeds"]
    return [f"# Relax-time protocol: {cfg['model']}" + (f" (width {cfg['width']})" if cfg.get("width") else "")
            + f" on {d['name']}",
            "",
            f"{d['train_size']} training / {d['test_size']} test examples, T = {cfg['epochs']} epochs, "
            f"halo = {cfg['halo']}, {cfg['optimizer']} lr {cfg['lr']} ({cfg.get('lr_schedule', 'constant')}) "
            f"momentum {cfg['momentum']} weight decay {cfg['weight_decay']}, batch {cfg['batch_size']}, "
            f"seeds {', '.join(map(str, seeds))} (n = {len(seeds)}).",
            "",
            f"Final accuracy: the mean of an arm's last {last_k} epochs (fewer when the arm has fewer); the best "
            "epoch's accuracy and its (global) epoch per seed beside it; a ± is the standard deviation over "
            "the seeds.",
            ""]


def _arm_table(stats: List[dict]) -> List[str]:
    lines = ["| arm | t_w | epochs | seeds | final test acc % | best test acc % (epoch) | final train acc % | "
             "projected CNN test acc % | deviation | off-local | sharing | time/epoch s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for a in stats:
        tw = a["t_w"] if a["t_w"] is not None else "—"
        if a["n"] == 0:
            lines.append(f"| {a['arm']} | {tw} | 0/{a['epochs']} | 0 | not run | | | | | | | |")
            continue
        ep = str(a["epochs"]) if a["n_complete"] == a["n"] else \
            f"{min(a['epochs_done'])}/{a['epochs']} (incomplete)"
        best = a["best_epochs"]
        where = "/".join(map(str, best)) if len(best) <= 5 else f"median {sorted(best)[len(best) // 2]}"
        f4 = lambda s: s.fmt(1.0, 4)  # noqa: E731
        lines.append(f"| {a['arm']} | {tw} | {ep} | {a['n']} | {_pct(a['final_test_acc'])} | "
                     f"{_pct(a['best_test_acc'])} (ep {where}) | {_pct(a['final_train_acc'])} | "
                     f"{_pct(a['final_proj_test_acc'])} | {f4(a['deviation'])} | {f4(a['offlocal_ratio'])} | "
                     f"{f4(a['sharing_deviation'])} | {a['time_per_epoch'].mean:.2f} |")
    return lines


def _per_t_w_table(claims) -> List[str]:
    dev, fcn, cnn = claims[0].per_t_w, claims[1].per_t_w, claims[2].per_t_w

    def cell(s: Optional[Stat], scale=100.0, boundary=0.0, sign=1.0, digits=2):
        if s is None or s.n == 0:
            return "—", "—"
        val = f"{scale * s.mean:+.{digits}f}" if scale == 100.0 else f"{s.mean:.{digits}f}"
        if s.n >= 2:
            val += f" ± {scale * s.se:.{digits}f}"
        m = margin(s, boundary, sign)
        return val, "—" if math.isnan(m) else f"{m:+.1f}"

    lines = ["| t_w | eFCN − CNN (points) | margin | eFCN − FCN (points) | margin | final deviation | "
             "margin below " + f"{DEVIATION_SMALL} |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for t in sorted(dev):
        c = cell(cnn.get(t))
        f = cell(fcn.get(t))
        d = cell(dev.get(t), 1.0, DEVIATION_SMALL, -1.0, 3)
        lines.append(f"| {t} | {c[0]} | {c[1]} | {f[0]} | {f[1]} | {d[0]} | {d[1]} |")
    return lines


def summarize(run_dir: str, last_k: Optional[int] = None) -> dict:
    """The run's results over its seeds: summary.md text, per-arm statistics, and the paper's claims.

    Returns ``markdown``, ``arms`` (arm name -> its statistics, see :func:`arm_stats`), ``finals`` (per
    (seed, arm)), ``claims`` (:class:`~efcn_sparse.claims.Claim` list), ``best_t_w``,
    ``gain_over_cnn``/``gain_over_fcn`` (mean final accuracy differences, fractions),
    ``efcn_above_fcn_everywhere``/``efcn_above_cnn_somewhere`` (on the means) and ``final_deviation``.
    ``last_k`` defaults to the run's ``last_k`` option (else :data:`LAST_K`).
    """
    meta, rows = load_run(run_dir)
    k = int(last_k if last_k is not None else meta["config"].get("last_k") or LAST_K)
    finals = arm_finals(meta, rows, k)
    stats = arm_stats(meta, finals)
    claims = evaluate_claims(**claim_inputs(meta, finals))
    lines = _header(meta, k) + _arm_table(stats)
    res = {"arms": {a["arm"]: a for a in stats}, "finals": finals, "claims": claims, "last_k": k, "best_t_w": None, "gain_over_cnn": None,
           "gain_over_fcn": None, "efcn_above_fcn_everywhere": None, "efcn_above_cnn_somewhere": None}
    cnn, fcn = res["arms"].get("cnn"), res["arms"].get("fcn")
    trained = [a for a in stats if a["kind"] == "efcn" and a["n"] and a["epochs_done"] and max(a["epochs_done"]) > 0]
    lines.append("")
    if trained:
        best = max(trained, key=lambda a: (a["final_test_acc"].mean, -a["t_w"]))
        res["best_t_w"] = best["t_w"]
        lines.append(f"- Best relax time (mean final accuracy): t_w = {best['t_w']} "
                     f"({_pct(best['final_test_acc'])}%).")
        if cnn is not None and cnn["n"]:
            c = cnn["final_test_acc"].mean
            res["gain_over_cnn"] = best["final_test_acc"].mean - c
            above = [a["t_w"] for a in trained if a["final_test_acc"].mean > c]
            res["efcn_above_cnn_somewhere"] = bool(above)
            lines.append(f"- Gain over the CNN ({_pct(cnn['final_test_acc'])}%): "
                         f"{100 * res['gain_over_cnn']:+.2f} points; mean eFCN above the mean CNN at t_w = "
                         f"{above if above else 'none'}.")
        if fcn is not None and fcn["n"]:
            f = fcn["final_test_acc"].mean
            res["gain_over_fcn"] = best["final_test_acc"].mean - f
            below = [a["t_w"] for a in trained if a["final_test_acc"].mean <= f]
            res["efcn_above_fcn_everywhere"] = not below
            lines.append(f"- Gain over the FCN ({_pct(fcn['final_test_acc'])}%): "
                         f"{100 * res['gain_over_fcn']:+.2f} points; mean eFCN above the mean FCN at every trained "
                         f"t_w: {'yes' if not below else 'no (not at t_w = ' + str(below) + ')'}.")
        res["final_deviation"] = {a["t_w"]: a["deviation"].mean for a in trained}
    incomplete = [f"{a} (seed {s})" for (s, a), f in sorted(finals.items()) if not f["complete"]]
    missing = [f"{a['arm']} (seed {s})" for a in meta["arms"] for s in meta["seeds"] if (s, a["arm"]) not in finals]
    if incomplete or missing:
        lines.append(f"- Not finished: {', '.join(incomplete + missing)}; resume the run with --resume. "
                     "The claims use finished arms only.")
    n = len(meta["seeds"])
    crit = t_critical(n)
    lines += ["", "## The paper's claims", "",
              "Paired per seed (the eFCN of seed s against the CNN and FCN of seed s); the margin is the mean "
              "distance from the claim's boundary in standard errors (s.e. = std / sqrt(n)); a claim holds "
              "beyond the two-sided 95 % Student t value"
              + (f" (±{crit:.2f} at n = {n})" if n >= 2 else "") + ", fails beyond its negative, and is "
              "undecided in between (always with one seed). A claim over every t_w is decided by its "
              "smallest margin, one about some t_w by its largest. \"Small\" deviation: below "
              f"{DEVIATION_SMALL}.", ""]
    lines += claims_markdown(claims)
    lines += ["", "Per relax time (mean ± s.e. of the paired differences over seeds; margins in s.e.):", ""]
    lines += _per_t_w_table(claims)
    res["markdown"] = "\n".join(lines) + "\n"
    return res


# ---------------------------------------------------------------------------------------- merge
def clear_artifacts(out: str) -> None:
    for name in ARTIFACTS:
        p = os.path.join(out, name)
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.unlink(p)


def merge(run_dirs: Sequence[str], out: str, force: bool = False) -> dict:
    """Join runs that split the seeds and relax times (``--seeds``, ``--relax-times``) into one run directory.

    The runs must share every protocol option except the seeds, the relax times and ``fcn``; a
    (seed, arm) present in several runs (the CNN, usually) is taken from the first, with a warning when
    the copies disagree (different hardware or library versions). Checkpoints are not copied.
    Returns :func:`summarize` of the merged run.
    """
    if not run_dirs:
        raise RunError("merge: no run directories given")
    loaded = [(d, *load_run(d)) for d in run_dirs]
    if os.path.isdir(out) and os.listdir(out):
        if not force:
            raise RunError(f"output directory {out} is not empty: use --force to overwrite it, or another -o")
        clear_artifacts(out)
    base_dir, base, _ = loaded[0]
    for d, meta, _ in loaded[1:]:
        diff = [k for k in base["config"] if k not in MERGE_FREE and base["config"][k] != meta["config"].get(k)]
        if diff:
            raise RunError(f"merge: {d} differs from {base_dir} in {', '.join(diff)}: only runs of one protocol "
                           f"(differing in the seeds and relax times) can be merged")
    rows: List[dict] = []
    arms: Dict[str, dict] = {}
    taken: Dict[Tuple[int, str], Dict[int, float]] = {}
    for d, meta, rs in loaded:
        for a in meta["arms"]:
            arms.setdefault(a["arm"], a)
            for s in meta["seeds"]:
                mine = [r for r in rs if r["arm"] == a["arm"] and r["seed"] == s]
                if not mine:
                    continue
                if (s, a["arm"]) in taken:
                    theirs = taken[(s, a["arm"])]
                    if any(abs(theirs.get(r["epochs_trained"], r["test_acc"]) - r["test_acc"]) > 1e-6 for r in mine):
                        warnings.warn(f"merge: arm {a['arm']} (seed {s}) of {d} differs from the copy already taken; "
                                      "keeping the first")
                    continue
                taken[(s, a["arm"])] = {r["epochs_trained"]: r["test_acc"] for r in mine}
                rows += mine
    seeds = sorted({s for s, _ in taken})
    cfg = dict(base["config"])
    times = sorted({a["t_w"] for a in arms.values() if a["kind"] == "efcn"})
    cfg.update(relax_times=times, fcn="fcn" in arms, seeds=seeds, seed=seeds[0] if seeds else cfg.get("seed", 0))
    order = sorted(arms.values(), key=arm_order)
    meta = dict(base, config=cfg, relax_times=times, arms=order, seeds=seeds,
                merged_from=[os.path.abspath(d) for d in run_dirs])
    os.makedirs(out, exist_ok=True)
    atomic_write_text(os.path.join(out, "config.json"), json.dumps(meta, indent=2) + "\n")
    write_metrics(out, dedupe(rows))
    result = summarize(out)
    atomic_write_text(os.path.join(out, "summary.md"), result["markdown"])
    return result
