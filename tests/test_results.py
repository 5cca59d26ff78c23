"""Robust statistics and the paper's claims on synthetic metrics whose answer is known: verdicts,
final accuracy as a mean of the last k epochs, best epochs, aggregate CSV rows, old run directories."""

import json
import math
import os

import pytest

from efcn_sparse.claims import Stat, evaluate_claims, margin, stat, t_critical, verdict
from efcn_sparse.results import CSV_FIELDS, arm_finals, load_run, summarize

T_EPOCHS = 4
TIMES = [0, 1, 2, 4]


def _by_key(claims):
    return {c.key: c for c in claims}


def _seeds(values):
    return dict(enumerate(values))


def test_stat_margin_and_t_critical():
    s = stat([1.0, 2.0, 3.0])
    assert (s.mean, s.std, s.n) == (2.0, 1.0, 3) and s.se == pytest.approx(1 / math.sqrt(3))
    assert math.isnan(stat([5.0]).std) and math.isnan(stat([5.0]).se) and stat([]).n == 0
    assert t_critical(3) == pytest.approx(4.3027, abs=1e-4) and t_critical(31) == pytest.approx(2.0423, abs=1e-4)
    assert math.isnan(t_critical(1))
    assert margin(s, 0.0) == pytest.approx(2 * math.sqrt(3)) and margin(s, 3.0, sign=-1.0) == pytest.approx(math.sqrt(3))
    assert margin(Stat(0.1, 0.0, 3), 0.25, -1.0) == math.inf
    assert verdict(5.0, 3) == "holds" and verdict(-5.0, 3) == "fails" and verdict(4.0, 3) == "undecided"
    assert verdict(100.0, 1) == "undecided" and verdict(float("nan"), 5) == "undecided"


def _inputs(efcn_minus_cnn, efcn_minus_fcn, dev, noise=(0.001, -0.002, 0.0015, -0.0005, 0.0)):
    """Synthetic finals for 5 (or len(noise)) seeds: eFCN = CNN + the given offset per t_w (plus small noise)."""
    n = len(noise)
    cnn = _seeds([0.80 + 0.01 * i for i in range(n)])
    efcn = {t: {s: cnn[s] + efcn_minus_cnn[t] + noise[s] for s in cnn} for t in TIMES}
    fcn = {s: efcn[0][s] - efcn_minus_fcn for s in cnn}
    deviation = {t: {s: dev[t] + noise[s] for s in cnn} for t in TIMES}
    return dict(cnn=cnn, fcn=fcn, efcn=efcn, deviation=deviation, epochs=T_EPOCHS)


def test_claims_hold_when_clearly_true():
    inp = _inputs({0: 0.0, 1: 0.02, 2: 0.03, 4: 0.0}, 0.05, {0: 0.10, 1: 0.08, 2: 0.06, 4: 0.0})
    c = _by_key(evaluate_claims(**inp))
    assert [c[k].verdict for k in ("deviation", "above_fcn", "above_cnn")] == ["holds"] * 3
    assert c["above_cnn"].n == 5 and "t_w = 2" in c["above_cnn"].numbers  # the largest margin decides
    assert c["above_fcn"].margin > t_critical(5)


def test_claims_fail_when_clearly_false():
    # the deviation is large at t_w = 0; the eFCN is below the CNN at every intermediate t_w and below
    # the FCN at t_w = 1
    inp = _inputs({0: 0.0, 1: -0.04, 2: -0.03, 4: 0.0}, 0.01, {0: 0.60, 1: 0.08, 2: 0.06, 4: 0.0})
    c = _by_key(evaluate_claims(**inp))
    assert [c[k].verdict for k in ("deviation", "above_fcn", "above_cnn")] == ["fails"] * 3
    assert "t_w = 0" in c["deviation"].numbers and "t_w = 1" in c["above_fcn"].numbers


def test_claims_undecided_with_one_seed_or_within_noise():
    one = _inputs({0: 0.0, 1: 0.02, 2: 0.03, 4: 0.0}, 0.05, {0: 0.1, 1: 0.1, 2: 0.1, 4: 0.0}, noise=(0.0,))
    assert {c.verdict for c in evaluate_claims(**one)} == {"undecided"}
    assert all(math.isnan(c.margin) for c in evaluate_claims(**one))
    # differences of +-1 point that flip sign between seeds: no verdict at n = 3
    noisy = (0.01, -0.012, 0.003)
    inp = _inputs({0: 0.0, 1: 0.0, 2: 0.0, 4: 0.0}, 0.0, {0: 0.25, 1: 0.25, 2: 0.25, 4: 0.0}, noise=noisy)
    c = _by_key(evaluate_claims(**inp))
    assert [c[k].verdict for k in ("deviation", "above_fcn", "above_cnn")] == ["undecided"] * 3


def test_claim_three_counts_intermediate_relax_times_only():
    # the eFCN beats the CNN clearly at t_w = 0 only: not an intermediate relax time
    inp = _inputs({0: 0.05, 1: -0.03, 2: -0.03, 4: 0.0}, 0.05, {0: 0.1, 1: 0.1, 2: 0.1, 4: 0.0})
    c = _by_key(evaluate_claims(**inp))
    assert c["above_cnn"].verdict == "fails" and set(c["above_cnn"].per_t_w) == {1, 2}
    none = dict(inp, efcn={0: inp["efcn"][0]}, deviation={0: inp["deviation"][0]})
    c = _by_key(evaluate_claims(**none))
    assert c["above_cnn"].verdict == "undecided" and "no intermediate" in c["above_cnn"].numbers


# ---------------------------------------------------------------------------------------- synthetic run dirs
def _write_run(path, accs, seeds=(0, 1, 2), with_seed_field=True, last_k=3):
    """A run directory from per-(arm, seed) test-accuracy sequences (index = epochs trained)."""
    os.makedirs(path)
    arms = [{"arm": "cnn", "kind": "cnn", "t_w": None, "epochs": T_EPOCHS}]
    arms += [{"arm": f"efcn_tw{t}", "kind": "efcn", "t_w": t, "epochs": T_EPOCHS - t} for t in TIMES]
    arms.append({"arm": "fcn", "kind": "fcn", "t_w": None, "epochs": T_EPOCHS})
    cfg = dict(model="skinny", width=8, epochs=T_EPOCHS, halo="full", optimizer="sgd", lr=0.1, momentum=0.0,
               weight_decay=0.0, batch_size=10, seed=seeds[0], last_k=last_k)
    if with_seed_field:
        cfg["seeds"] = list(seeds)
    meta = {"config": cfg, "relax_times": TIMES, "arms": arms,
            "data": {"name": "synthetic", "train_size": 100, "test_size": 100}}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(meta, f)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for a in arms:
            for s in seeds:
                seq = accs(a, s)
                for k, acc in enumerate(seq):
                    r = {"arm": a["arm"], "kind": a["kind"], "t_w": a["t_w"], "epoch": (a["t_w"] or 0) + k,
                         "epochs_trained": k, "train_loss": 1.0, "train_acc": acc, "test_loss": 1.0, "test_acc": acc,
                         "epoch_time_s": 0.5 if k else 0.0, "eval_time_s": 0.1, "peak_mem_mb": 10.0}
                    if with_seed_field:
                        r["seed"] = s
                    if a["kind"] != "cnn":
                        dev = 0.9 if a["kind"] == "fcn" else 0.02 * k
                        r.update(proj_test_acc=acc - 0.1, deviation=dev, offlocal_ratio=dev / 2,
                                 sharing_deviation=dev / 2, offlocal_by_distance=[0.0, dev])
                    f.write(json.dumps(r) + "\n")
    return meta


def _known_accs(a, s):
    """CNN ends at 0.80 + 0.01 s (after a noisy last epoch); eFCN at t_w = 1, 2 ends 3 points above
    it; t_w = 0 ends 1 point above the FCN; the FCN ends 4 points below the CNN."""
    n = a["epochs"] + 1
    base = 0.80 + 0.01 * s
    if a["kind"] == "cnn":
        return [0.1] + [base] * (n - 3) + [base + 0.02, base - 0.02]  # spike then drop: the mean smooths it
    if a["kind"] == "fcn":
        return [0.1] + [base - 0.04] * (n - 1)
    if a["t_w"] in (1, 2):
        return [base] + [base + 0.03] * (n - 1)
    if a["t_w"] == 0:
        return [0.1] + [base - 0.03] * (n - 1)
    return [base]


def test_final_is_mean_of_last_k_and_best_epoch_beside_it(tmp_path):
    out = str(tmp_path / "run")
    _write_run(out, _known_accs)
    meta, rows = load_run(out)
    fin = arm_finals(meta, rows, 3)
    cnn = fin[(1, "cnn")]
    assert cnn["final_test_acc"] == pytest.approx(0.81) and cnn["last_k"] == 3  # (0.81 + 0.83 + 0.79) / 3
    assert cnn["best_test_acc"] == pytest.approx(0.83) and cnn["best_epoch"] == 3
    assert cnn["test_acc"] == pytest.approx(0.79)  # the last epoch alone
    assert arm_finals(meta, rows, 1)[(1, "cnn")]["final_test_acc"] == pytest.approx(0.79)
    short = fin[(0, "efcn_tw2")]  # 2 epochs after relaxing: its epoch-0 row counts
    assert short["last_k"] == 3 and short["final_test_acc"] == pytest.approx((0.80 + 0.83 + 0.83) / 3)
    assert all(f["complete"] for f in fin.values())


def test_summary_claims_on_known_synthetic_run(tmp_path):
    out = str(tmp_path / "run")
    _write_run(out, _known_accs)
    res = summarize(out, last_k=1)
    c = _by_key(res["claims"])
    # exact offsets: zero spread, infinite margins
    assert c["deviation"].verdict == "holds"
    assert c["above_cnn"].verdict == "holds" and c["above_cnn"].per_t_w[1].mean == pytest.approx(0.05)
    assert c["above_fcn"].verdict == "holds"
    md = res["markdown"]
    assert "## The paper's claims" in md and md.count("**holds** (n = 3)") == 3
    assert "| cnn | — | 4 | 3 | 79.00 ± 1.00 | 83.00 ± 1.00 (ep 3/3/3)" in md
    # with the mean of the last 3 epochs the t_w = 2 eFCN (rows base, base + 0.03, base + 0.03) is compared
    # with the CNN's mean (base + 0, + 0.02, - 0.02): +2 points on every seed
    res3 = summarize(out)
    assert res3["last_k"] == 3
    assert _by_key(res3["claims"])["above_cnn"].per_t_w[2].mean == pytest.approx(0.02)


def test_claims_use_finished_arms_only(tmp_path):
    out = str(tmp_path / "run")

    def accs(a, s):  # seed 2's eFCN at t_w = 1 stopped after one epoch
        seq = _known_accs(a, s)
        return seq[:2] if (a["arm"], s) == ("efcn_tw1", 2) else seq

    _write_run(out, accs)
    res = summarize(out)
    assert _by_key(res["claims"])["above_cnn"].per_t_w[1].n == 2
    assert "Not finished: efcn_tw1 (seed 2)" in res["markdown"]
    assert "| efcn_tw1 | 1 | 1/3 (incomplete) | 3 |" in res["markdown"]


def test_csv_has_seed_rows_and_mean_std_rows(tmp_path):
    from efcn_sparse.results import csv_text

    out = str(tmp_path / "run")
    _write_run(out, _known_accs)
    _, rows = load_run(out)
    lines = csv_text(rows).splitlines()
    assert lines[0].split(",") == CSV_FIELDS
    recs = [dict(zip(CSV_FIELDS, ln.split(","))) for ln in lines[1:]]
    assert len([r for r in recs if r["seed"] in ("0", "1", "2")]) == len(rows)
    m = [r for r in recs if r["seed"] == "mean" and r["arm"] == "fcn" and r["epochs_trained"] == "4"]
    sd = [r for r in recs if r["seed"] == "std" and r["arm"] == "fcn" and r["epochs_trained"] == "4"]
    assert len(m) == len(sd) == 1 and m[0]["n_seeds"] == "3"
    assert float(m[0]["test_acc"]) == pytest.approx(0.77) and float(sd[0]["test_acc"]) == pytest.approx(0.01)


def test_run_from_before_seeds_reads_as_its_seed(tmp_path):
    out = str(tmp_path / "old")
    _write_run(out, _known_accs, seeds=(0,), with_seed_field=False)
    meta, rows = load_run(out)
    assert meta["seeds"] == [0] and {r["seed"] for r in rows} == {0}
    res = summarize(out)
    assert {c.verdict for c in res["claims"]} == {"undecided"} and "(n = 1)" in res["markdown"]
