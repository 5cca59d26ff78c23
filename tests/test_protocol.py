"""The relax protocol end to end on tiny synthetic runs of two seeds: outputs, deviation at relax, resume
after a kill, DDP (2 gloo processes) against 1 process, runs split by seeds and relax times merged,
corrupt checkpoints, file modes, and option errors."""

import json
import math
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn

from efcn_sparse import training as T
from efcn_sparse.plots import FIGURES
from efcn_sparse.protocol import (CSV_FIELDS, CorruptCheckpoint, RelaxConfig, RunError, load_run, merge, relax,
                                  relax_grid, summarize)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def tiny_cnn(in_channels=1, image_size=12, num_classes=4, width=4):
    """Two 3x3 convs and a Linear: tiny eFCNs, so a whole protocol runs in seconds."""
    s = image_size // 2
    return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(width * s * s, num_classes))


# 45 examples, batch 24: the last batch (21) splits unevenly over 2 ranks
TINY = dict(model="test_protocol:tiny_cnn", dataset="synthetic", image_size=12, train_size=45, test_size=40,
            epochs=2, relax_times=[0, 1, 2], batch_size=24, lr=0.05, momentum=0.9, width=4, device="cpu",
            threads=1, seeds=[0, 1])  # one thread: tiny ops crawl when OpenMP threads compete on a busy machine
SEEDS = TINY["seeds"]
DETERMINISTIC = [f for f in CSV_FIELDS if f not in ("epoch_time_s", "eval_time_s", "peak_mem_mb")] + [
    "offlocal_by_distance", "layers"]
DIAGNOSTICS = ("deviation", "offlocal_ratio", "sharing_deviation", "bias_deviation", "weight_norm",
               "offlocal_by_distance", "layers")


def _cli_args(opts: dict) -> list:
    args = []
    for k, v in opts.items():
        flag = "--" + k.replace("_", "-")
        args += [flag, ",".join(map(str, v)) if isinstance(v, list) else str(v)]
    return args


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([HERE, ROOT, env.get("PYTHONPATH", "")])
    env.pop("EFCN_FAULT_AFTER_BATCHES", None)
    return env


def _key(rows):
    return {(r["seed"], r["arm"], r["epochs_trained"]): r for r in rows}


def _close(va, vb, rel):
    if isinstance(va, dict):
        assert va.keys() == vb.keys()
        return all(_close(va[k], vb[k], rel) for k in va)
    if isinstance(va, list):
        return len(va) == len(vb) and all(_close(x, y, rel) for x, y in zip(va, vb))
    if isinstance(va, float) and rel:
        # the absolute floor only serves values near 0: it must never decide for values of order 1
        return va == pytest.approx(vb, rel=rel, abs=rel * 1e-3)
    return va == vb


def test_close_is_decided_by_the_relative_tolerance():
    assert _close(0.1, 0.1 * (1 + 1e-13), 1e-12) and _close(0.0, 0.0, 1e-12)
    assert not _close(0.1, 0.1 + 1e-9, 1e-12)  # passed while abs=1e-6 decided
    assert not _close({"a": [0.5]}, {"a": [0.5 + 1e-8]}, 1e-12)


def _assert_same(rows_a, rows_b, rel=0.0, acc_slack=0.0, diag_rel=1e-12):
    """Same rows; deterministic fields equal (rel=0) or to ``rel``; accuracies within ``acc_slack``.

    The subspace diagnostics (``deviation`` & co.) get ``diag_rel`` at least: their float64 sums can
    differ in the last bit between processes for identical weights."""
    a, b = _key(rows_a), _key(rows_b)
    assert a.keys() == b.keys()
    for k in a:
        for f in DETERMINISTIC:
            va, vb = a[k].get(f), b[k].get(f)
            if f.endswith("_acc") and va is not None and acc_slack:
                assert abs(va - vb) <= acc_slack, (k, f, va, vb)
            elif f in DIAGNOSTICS:
                assert _close(va, vb, max(rel, diag_rel)), (k, f, va, vb)
            else:
                assert _close(va, vb, rel), (k, f, va, vb)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("relax") / "run")
    res = relax(out=out, quiet=True, **TINY)
    return out, res


def test_relax_grid():
    assert relax_grid(10, 8) == [0, 1, 2, 3, 5, 7, 10]
    assert relax_grid(3, 8) == [0, 1, 2, 3]
    assert relax_grid(100, 20)[:6] == [0, 1, 2, 3, 4, 5] and relax_grid(100, 20)[-1] == 100
    assert RelaxConfig(epochs=10).resolved_relax_times() == [0, 1, 2, 3, 5, 7, 10]


def test_outputs_and_value_ranges(tiny_run):
    out, res = tiny_run
    for f in ("config.json", "metrics.jsonl", "metrics.csv", "summary.md"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    for f in FIGURES:
        with open(os.path.join(out, "figures", f), "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n", f
    meta, rows = load_run(out)
    assert meta["relax_times"] == [0, 1, 2] and meta["data"]["train_size"] == 45
    arms = {a["arm"]: a["epochs"] for a in meta["arms"]}
    assert arms == {"cnn": 2, "efcn_tw0": 2, "efcn_tw1": 1, "efcn_tw2": 0, "fcn": 2}
    assert meta["seeds"] == SEEDS and meta["config"]["seeds"] == SEEDS
    for arm, n in arms.items():
        for s in SEEDS:
            mine = sorted(r["epochs_trained"] for r in rows if r["arm"] == arm and r["seed"] == s)
            assert mine == list(range(n + 1)), (arm, s)
            assert os.path.isfile(os.path.join(out, "checkpoints", f"seed{s}", f"{arm}.pt"))
    for s in SEEDS:
        for t in (0, 1, 2):
            assert os.path.isfile(os.path.join(out, "checkpoints", f"seed{s}", f"cnn_at_{t}.pt"))
    # the seeds differ: data subset (synthetic), initialisation, shuffling
    k = _key(rows)
    assert k[(0, "cnn", 2)]["train_loss"] != k[(1, "cnn", 2)]["train_loss"]
    for r in rows:
        for f in ("train_acc", "test_acc"):
            assert 0.0 <= r[f] <= 1.0
        for f in ("train_loss", "test_loss"):
            assert math.isfinite(r[f]) and r[f] >= 0
        assert r["peak_mem_mb"] > 0 and r["epoch_time_s"] >= 0 and r["eval_time_s"] > 0
        assert r["epoch"] == (r["t_w"] or 0) + r["epochs_trained"]
        if r["kind"] == "cnn":
            assert r.get("deviation") is None
            continue
        assert 0.0 <= r["proj_test_acc"] <= 1.0
        for f in ("deviation", "offlocal_ratio", "sharing_deviation", "bias_deviation"):
            assert 0.0 <= r[f] <= 1.0 + 1e-9, (r["arm"], f, r[f])
        assert r["weight_norm"] > 0
        assert set(r["layers"]) == {"0", "3"}
        assert r["deviation"] ** 2 == pytest.approx(r["offlocal_ratio"] ** 2 + r["sharing_deviation"] ** 2, abs=1e-12)
    fcn_end = [r for r in rows if r["arm"] == "fcn" and r["seed"] == 1][-1]
    assert fcn_end["deviation"] > 0.5  # an FCN from scratch is far from the CNN subspace
    with open(os.path.join(out, "metrics.csv")) as f:
        lines = f.read().splitlines()
    groups = {(r["arm"], r["epochs_trained"]) for r in rows}  # plus a mean and a std row each
    assert lines[0].split(",") == CSV_FIELDS and len(lines) == len(rows) + 2 * len(groups) + 1
    assert sum(ln.startswith("mean,2,") for ln in lines) == len(groups)
    mask = os.umask(0)
    os.umask(mask)
    for f in ("config.json", "metrics.csv", "metrics.jsonl", "summary.md", "figures/deviation.png"):
        assert os.stat(os.path.join(out, f)).st_mode & 0o777 == 0o666 & ~mask, f  # not mkstemp's 0600
    md = open(os.path.join(out, "summary.md")).read()
    assert md == res["markdown"]
    for arm in arms:
        assert f"| {arm} |" in md
    assert res["best_t_w"] in (0, 1)
    assert "Best relax time" in md and "Gain over the CNN" in md and "Gain over the FCN" in md
    assert "## The paper's claims" in md and len(res["claims"]) == 3 and all(c.n == 2 for c in res["claims"])
    ckpts = os.path.join(out, "checkpoints", "seed1")
    for name in os.listdir(ckpts):
        state = torch.load(os.path.join(ckpts, name), weights_only=True)
        assert "model" in state and "epoch" in state
    assert not [n for n in os.listdir(ckpts) if n.startswith(".tmp")]


def test_deviation_exactly_zero_at_relax(tiny_run):
    out, _ = tiny_run
    _, rows = load_run(out)
    rows = _key(rows)
    for s in SEEDS:  # the eFCNs of seed s start from the CNN of seed s
        for t in (0, 1, 2):
            r = rows[(s, f"efcn_tw{t}", 0)]
            assert r["epoch"] == t
            assert r["deviation"] == 0.0 and r["offlocal_ratio"] == 0.0 and r["sharing_deviation"] == 0.0
            assert r["bias_deviation"] == 0.0
            assert not any(r["offlocal_by_distance"])
            cnn = rows[(s, "cnn", t)]
            # the eFCN computes the CNN's function: same test accuracy, loss to float rounding
            assert r["test_acc"] == cnn["test_acc"] and r["proj_test_acc"] == cnn["test_acc"]
            assert r["test_loss"] == pytest.approx(cnn["test_loss"], rel=1e-5)
        for t in (0, 1):  # one FCN-space epoch leaves the CNN subspace
            assert rows[(s, f"efcn_tw{t}", 1)]["deviation"] > 0


def test_resume_after_kill_gives_identical_metrics(tiny_run, tmp_path):
    ref_dir, _ = tiny_run
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "efcn_sparse", "relax", *_cli_args(TINY), "--out", out, "--quiet", "--no-plots"]
    # a hard kill (os._exit, no clean-up) of a separate process; 2 batches per epoch, 14 per seed (the CNN
    # takes 4, then efcn_tw0 4): the kill lands mid-way through the 2nd epoch of seed 1's efcn_tw0
    p = subprocess.run(cmd, env=dict(_env(), EFCN_FAULT_AFTER_BATCHES="21"), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 75, p.stderr
    _, partial = load_run(out)
    assert (1, "efcn_tw0", 1) in _key(partial) and (1, "efcn_tw0", 2) not in _key(partial)
    assert (0, "fcn", 2) in _key(partial)
    assert not os.path.exists(os.path.join(out, "summary.md"))
    relax(out=out, resume=True, quiet=True, plots=False, **TINY)  # the resumption, in this process
    _assert_same(load_run(out)[1], load_run(ref_dir)[1])
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert len(f.read().splitlines()) == len(load_run(ref_dir)[1])  # no duplicated or lost rows


def test_ddp_two_gloo_processes_match_one(tiny_run, tmp_path):
    ref_dir, _ = tiny_run
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "efcn_sparse", "relax", *_cli_args(TINY), "--out", out, "--quiet", "--no-plots"]
    p = subprocess.run(cmd, env=dict(_env(), OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    meta, rows = load_run(out)
    assert meta["world_size"] == 2
    # float tolerance (reduction order differs); an accuracy may flip by one near-tied example
    _assert_same(rows, load_run(ref_dir)[1], rel=1e-4, acc_slack=1.0 / 40 + 1e-12)


def test_torchrun_sharing_seeds_over_ranks_matches_one_process(tiny_run, tmp_path):
    """--parallel seeds: each of 2 ranks trains one seed alone; the rows are the single-process ones."""
    ref_dir, _ = tiny_run
    out = str(tmp_path / "by_seed")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "efcn_sparse", "relax", *_cli_args(TINY), "--parallel", "seeds", "--out", out, "--quiet", "--no-plots"]
    p = subprocess.run(cmd, env=dict(_env(), OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    meta, rows = load_run(out)
    assert meta["world_size"] == 2 and meta["seeds"] == SEEDS
    _assert_same(rows, load_run(ref_dir)[1])
    with open(os.path.join(out, "metrics.csv")) as f:
        assert {ln.split(",")[0] for ln in f.read().splitlines()[1:]} == {"0", "1", "mean", "std"}


def test_split_seeds_and_relax_times_and_merge(tiny_run, tmp_path):
    """Jobs with a subset of the seeds or relax times give the same (seed, arm)s; merge joins them into one run."""
    ref_dir, _ = tiny_run
    ref = load_run(ref_dir)[1]
    a, b, m = str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "merged")
    relax(out=a, quiet=True, plots=False, **dict(TINY, relax_times=[1], fcn=False, seeds=[1]))
    relax(out=b, quiet=True, plots=False, **dict(TINY, relax_times=[0, 2], seeds=[0]))
    _assert_same(load_run(a)[1], [r for r in ref if r["arm"] in ("cnn", "efcn_tw1") and r["seed"] == 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the (seed, arm)s both runs hold agree
        res = merge([a, b, ref_dir], m, plots=False)
    meta, rows = load_run(m)
    assert meta["relax_times"] == [0, 1, 2] and meta["seeds"] == SEEDS and len(meta["merged_from"]) == 3
    _assert_same(rows, ref)
    assert res["best_t_w"] == summarize(ref_dir)["best_t_w"]
    assert open(os.path.join(m, "summary.md")).read() == res["markdown"]
    # the seeds of a and b alone: seed 1 lacks efcn_tw0/2 and the FCN, so those have n = 1
    res = merge([a, b], str(tmp_path / "ab"), plots=False)
    n = {arm: x["n"] for arm, x in res["arms"].items()}
    assert n == {"cnn": 2, "efcn_tw0": 1, "efcn_tw1": 1, "efcn_tw2": 1, "fcn": 1}
    with pytest.raises(RunError, match="not empty"):
        merge([a, ref_dir], m)
    other = str(tmp_path / "c")
    shutil.copytree(a, other)
    cfg_path = os.path.join(other, "config.json")
    meta = json.load(open(cfg_path))
    meta["config"]["lr"] = 0.5
    json.dump(meta, open(cfg_path, "w"))
    with pytest.raises(RunError, match="differs"):
        merge([ref_dir, other], str(tmp_path / "m3"))


def test_after_cosine_schedule_and_local_halo(tmp_path):
    """--after N trains every eFCN N epochs (past T too); the cosine schedule runs over global epochs;
    halo 0 (the locally connected relaxation) never grows off-local weights."""
    out = str(tmp_path / "r")
    cfg = dict(TINY, relax_times=[0, 2], after=1, lr_schedule="cosine", halo=0, seeds=[0])
    relax(out=out, quiet=True, plots=False, **cfg)
    meta, rows = load_run(out)
    assert {a["arm"]: a["epochs"] for a in meta["arms"]} == {"cnn": 2, "efcn_tw0": 1, "efcn_tw2": 1, "fcn": 2}
    rows = _key(rows)
    assert rows[(0, "efcn_tw2", 1)]["epoch"] == 3
    lr = TINY["lr"]
    assert rows[(0, "cnn", 1)]["lr"] == pytest.approx(lr) and rows[(0, "cnn", 2)]["lr"] == pytest.approx(lr / 2)
    assert rows[(0, "efcn_tw0", 1)]["lr"] == pytest.approx(lr)
    assert rows[(0, "efcn_tw2", 1)]["lr"] == pytest.approx(lr * 0.5 * (1 + math.cos(2 * math.pi / 3)))  # horizon 3
    for r in rows.values():
        if r["kind"] != "cnn":
            assert r["offlocal_ratio"] == 0.0
    assert rows[(0, "efcn_tw0", 1)]["sharing_deviation"] > 0


def test_existing_directory_and_resume_rules(tiny_run, tmp_path):
    ref_dir, _ = tiny_run
    with pytest.raises(RunError, match="not empty"):
        relax(out=ref_dir, quiet=True, **TINY)
    with pytest.raises(RunError, match="options differ"):
        relax(out=ref_dir, quiet=True, resume=True, **dict(TINY, lr=0.01))
    with pytest.raises(RunError, match="exclude"):
        relax(out=ref_dir, quiet=True, resume=True, force=True, **TINY)
    d = tmp_path / "foreign"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match="no config.json"):
        relax(out=str(d), quiet=True, resume=True, **TINY)
    with pytest.raises(RunError, match="drops"):
        relax(out=ref_dir, quiet=True, resume=True, **dict(TINY, seeds=[1]))
    # a finished run resumes to the same result without training again
    before = load_run(ref_dir)[1]
    res = relax(out=ref_dir, quiet=True, resume=True, plots=False, **TINY)
    assert load_run(ref_dir)[1] == before and res["markdown"] == summarize(ref_dir)["markdown"]


def test_resume_adds_seeds(tiny_run, tmp_path):
    ref_dir, _ = tiny_run
    out = str(tmp_path / "r")
    relax(out=out, quiet=True, plots=False, **dict(TINY, seeds=[0]))
    relax(out=out, quiet=True, plots=False, resume=True, **TINY)
    _assert_same(load_run(out)[1], load_run(ref_dir)[1])


def test_corrupt_checkpoint_is_one_error_and_older_state_continues(tiny_run, tmp_path):
    ref_dir, _ = tiny_run
    out = str(tmp_path / "r")
    shutil.copytree(ref_dir, out)
    for arm in ("cnn", "efcn_tw0"):
        with open(os.path.join(out, "checkpoints", "seed1", f"{arm}.pt"), "wb") as f:
            f.write(b"not a checkpoint")
    with pytest.raises(CorruptCheckpoint, match="seed1/(cnn|efcn_tw0).pt is corrupt") as e:
        relax(out=out, quiet=True, plots=False, resume=True, **TINY)
    assert "--from-older" in str(e.value) and "\n" not in str(e.value)
    # the CNN continues from its last snapshot (epoch 2: nothing left to train), efcn_tw0 from its start
    relax(out=out, quiet=True, plots=False, resume=True, from_older=True, **TINY)
    _assert_same(load_run(out)[1], load_run(ref_dir)[1])
    relax(out=out, quiet=True, plots=False, resume=True, **TINY)  # both checkpoints were rewritten
    os.unlink(os.path.join(out, "checkpoints", "seed0", "cnn_at_1.pt"))
    os.unlink(os.path.join(out, "checkpoints", "seed0", "efcn_tw1.pt"))
    with pytest.raises(RunError, match="cnn_at_1.pt is missing"):
        relax(out=out, quiet=True, plots=False, resume=True, **TINY)


@pytest.mark.parametrize("opts, msg", [
    (dict(epochs=0), "--epochs"),
    (dict(relax_times=[1, 9]), "relax-times"),
    (dict(relax_times=[1, 1]), "duplicates"),
    (dict(halo="wide"), "--halo"),
    (dict(halo=-1), "--halo"),
    (dict(optimizer="rmsprop"), "--optimizer"),
    (dict(lr=0.0), "--lr"),
    (dict(batch_size=0), "--batch-size"),
    (dict(after=-2), "--after"),
    (dict(backend="fortran"), "--backend"),
    (dict(block_shape=(16,)), "--block-shape"),
    (dict(train_size=0), "--train-size"),
])
def test_bad_options(opts, msg, tmp_path):
    with pytest.raises(RunError, match=msg):
        relax(out=str(tmp_path / "r"), quiet=True, **dict(TINY, **opts))
    assert not os.path.exists(tmp_path / "r")


def test_bad_models_and_devices(tmp_path):
    out = str(tmp_path / "r")
    for model, msg in (("lenet9", "unknown model"), ("no_such_module:f", "cannot import"),
                       ("torch.nn:Identity", "no nn.Conv2d"), ("test_protocol:TINY", "returned dict|failed")):
        with pytest.raises(RunError, match=msg):
            relax(out=out, quiet=True, **dict(TINY, model=model))
    with pytest.raises(RunError, match="takes no width"):
        relax(out=out, quiet=True, model_fn=lambda in_channels, image_size, num_classes: tiny_cnn(),
              **dict(TINY, model=RelaxConfig.model))
    with pytest.raises(RunError, match="unknown option"):
        relax(out=out, quiet=True, epoch=3)
    if not torch.cuda.is_available():
        with pytest.raises(RunError, match="CUDA is not available"):
            relax(out=out, quiet=True, **dict(TINY, device="cuda"))


def test_training_helpers(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(50, 1, 12, 12), torch.randint(0, 4, (50,))
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        m = tiny_cnn()
        opt = T.make_optimizer(m.parameters(), "adam", 1e-2, weight_decay=1e-4)
        runs.append((T.train_epoch(m, opt, x, y, 16, seed=7), [p.detach().clone() for p in m.parameters()]))
    assert runs[0][0]["loss"] == runs[1][0]["loss"]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    ev = T.evaluate(m, x, y, batch_size=7)
    assert 0 <= ev["acc"] <= 1 and ev["loss"] > 0
    p = str(tmp_path / "c.pt")
    T.save_checkpoint({"model": m.state_dict(), "epoch": 3}, p)
    assert T.load_checkpoint(p)["epoch"] == 3
    with open(p, "wb") as f:
        f.write(b"garbage")
    with pytest.raises(RuntimeError, match="corrupt"):
        T.load_checkpoint(p)
    assert os.listdir(tmp_path) == ["c.pt"]
    with pytest.raises(ValueError, match="optimizer"):
        T.make_optimizer(m.parameters(), "lbfgs")
