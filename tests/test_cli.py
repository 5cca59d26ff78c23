"""The ``efcn`` command line: relax through ``python -m efcn_sparse``, summary, plot, merge, demo,
and clear errors (exit status 2, one message) for bad options."""

import os
import subprocess
import sys

import pytest
import torch

from efcn_sparse.cli import main
from efcn_sparse.plots import FIGURES
from efcn_sparse.protocol import load_run

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# the tiny model of test_protocol.py, through the module:function form
TINY = ["--model", "test_protocol:tiny_cnn", "--dataset", "synthetic", "--image-size", "12", "--train-size", "30",
        "--test-size", "20", "--epochs", "1", "--relax-times", "0,1", "--batch-size", "16", "--width", "4",
        "--device", "cpu", "--lr", "0.05", "--threads", "1"]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cli") / "run")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, ROOT, os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-m", "efcn_sparse", "relax", *TINY, "--out", out, "--no-plots"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return out, p


def test_relax_via_python_m(cli_run):
    out, p = cli_run
    # one log line per epoch and the summary table on stdout; stderr is no terminal here: no progress bars
    assert "[      cnn] epoch   1" in p.stdout and "[ efcn_tw0] epoch   1" in p.stdout
    assert "| efcn_tw1 | 1 |" in p.stdout and "Best relax time" in p.stdout and "The paper's claims" in p.stdout
    assert "epoch/s" not in p.stderr + p.stdout and "ex/s" not in p.stderr + p.stdout and "\r" not in p.stderr
    meta, rows = load_run(out)
    assert meta["config"]["model"] == "test_protocol:tiny_cnn" and meta["config"]["fcn"] is True
    assert {r["arm"] for r in rows} == {"cnn", "efcn_tw0", "efcn_tw1", "fcn"}
    assert not os.path.exists(os.path.join(out, "figures"))  # --no-plots


def test_summary_plot_merge(cli_run, tmp_path, capsys):
    out, _ = cli_run
    assert main(["summary", out]) == 0
    assert capsys.readouterr().out == open(os.path.join(out, "summary.md")).read()
    figs = str(tmp_path / "figs")
    assert main(["plot", out, "-o", figs]) == 0
    assert sorted(os.listdir(figs)) == sorted(FIGURES)
    merged = str(tmp_path / "merged")
    assert main(["merge", out, "-o", merged, "--no-plots"]) == 0
    assert load_run(merged)[1] == load_run(out)[1]
    assert main(["merge", out, "-o", merged]) == 2
    assert "not empty" in capsys.readouterr().err


def test_seeds_options_and_summary_last_k(tmp_path, capsys):
    out = str(tmp_path / "s")
    assert main(["relax", *TINY, "--relax-times", "1", "--n-seeds", "2", "--seed", "3", "--last-k", "1", "--out", out,
                 "--no-plots"]) == 0
    cap = capsys.readouterr()
    assert "[   s3 cnn] epoch   1" in cap.out and "[s4 efcn_tw1] epoch   1" in cap.out
    meta, rows = load_run(out)
    assert meta["seeds"] == [3, 4] and {r["seed"] for r in rows} == {3, 4} and meta["config"]["last_k"] == 1
    assert "last 1 epochs" in open(os.path.join(out, "summary.md")).read()
    assert main(["summary", out, "--last-k", "2"]) == 0
    assert "last 2 epochs" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["relax", *TINY, "--seeds", "0,1", "--n-seeds", "2"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_preset_paper_sets_the_paper_setting_and_explicit_options_win(monkeypatch):
    import efcn_sparse.protocol as P
    from efcn_sparse import cli

    seen = {}
    monkeypatch.setattr(P, "relax", lambda cfg, **kw: seen.update(cfg=cfg) or {"markdown": ""})
    assert cli.main(["relax", "--preset", "paper", "--quiet"]) == 0
    c = seen["cfg"]
    assert (c.model, c.width, c.dataset, c.train_size, c.halo) == ("skinny", 64, "fashion-mnist", None, "full")
    assert (c.optimizer, c.lr, c.batch_size, c.momentum, c.lr_schedule) == ("sgd", 0.1, 250, 0.0, "constant")
    assert c.seeds == [0, 1, 2] and c.relax_times is None and c.resolved_relax_times()[:3] == [0, 1, 2]
    assert c.epochs == P.PRESETS["paper"]["epochs"]
    assert cli.main(["relax", "--preset", "paper", "--width", "8", "--seeds", "5", "--epochs", "3", "--quiet"]) == 0
    c = seen["cfg"]
    assert (c.width, c.seeds, c.epochs, c.lr) == (8, [5], 3, 0.1)
    assert cli.main(["relax", "--preset", "paper", "--n-seeds", "5", "--quiet"]) == 0
    assert seen["cfg"].seeds == [0, 1, 2, 3, 4]
    assert P.RelaxConfig.preset("paper", width=16).width == 16


def test_corrupt_checkpoint_is_one_line(cli_run, tmp_path, capsys):
    import shutil

    out = str(tmp_path / "c")
    shutil.copytree(cli_run[0], out)
    with open(os.path.join(out, "checkpoints", "seed0", "fcn.pt"), "wb") as f:
        f.write(b"\0garbage")
    assert main(["relax", *TINY, "--out", out, "--resume", "--quiet", "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("efcn relax: error: checkpoint") and "fcn.pt is corrupt" in err and "--from-older" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["relax", *TINY, "--out", out, "--resume", "--from-older", "--quiet", "--no-plots"]) == 0
    untimed = [[{k: v for k, v in r.items() if k not in ("epoch_time_s", "eval_time_s", "peak_mem_mb")} for r in rows]
               for rows in (load_run(out)[1], load_run(cli_run[0])[1])]
    assert untimed[0] == untimed[1]  # the FCN was trained again from its start, identically


def test_quiet_prints_nothing(tmp_path, capsys):
    assert main(["relax", *TINY, "--relax-times", "1", "--no-fcn", "--out", str(tmp_path / "q"), "--quiet",
                 "--no-plots"]) == 0
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err == ""


@pytest.mark.parametrize("args, msg", [
    (["--halo", "wide"], "expected 'full' or an integer"),
    (["--relax-times", "1,x"], "comma-separated integers"),
    (["--epochs", "0"], "expected a value > 0"),
    (["--lr", "-1"], "expected a value > 0"),
    (["--optimizer", "rmsprop"], "invalid choice"),
    (["--block-shape", "16"], "BR,BC"),
])
def test_argument_errors(args, msg, capsys):
    with pytest.raises(SystemExit) as e:
        main(["relax", *args])
    assert e.value.code == 2 and msg in capsys.readouterr().err


@pytest.mark.parametrize("args, msg", [
    (["--relax-times", "0,5"], "--relax-times must be integers in [0, 1]"),
    (["--dataset", "imagenet"], "unknown data set"),
    (["--model", "lenet9"], "unknown model"),
    (["--device", "cuda:7"], "CUDA is not available"),
])
def test_run_errors_are_one_line(args, msg, tmp_path, capsys):
    if "cuda" in args[-1] and torch.cuda.is_available():
        pytest.skip("CUDA is present")
    assert main(["relax", *TINY, *args, "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("efcn relax: error:") and msg in err and "Traceback" not in err


def test_missing_data_and_existing_dir(tmp_path, capsys, cli_run):
    assert main(["relax", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "fashion-mnist not found" in err and str(tmp_path / "nowhere") in err
    out, _ = cli_run
    assert main(["relax", *TINY, "--out", out, "--quiet"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["summary", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_help_and_demo(capsys):
    with pytest.raises(SystemExit) as e:
        main(["relax", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--model", "--width", "--dataset", "--data-dir", "--train-size", "--test-size", "--epochs",
                "--relax-times", "--after", "--halo", "--optimizer", "--lr", "--momentum", "--weight-decay",
                "--batch-size", "--seed", "--seeds", "--n-seeds", "--last-k", "--preset", "--device", "--backend", "--out", "--resume", "--force", "--quiet"):
        assert opt in out, opt
    assert main(["demo", "--channels", "2", "--size", "5", "--batch", "1"]) == 0
    errors = demo_errors(capsys.readouterr().out)
    assert all(e < 1e-5 for e in errors.values()), errors


def demo_errors(out: str) -> dict:
    """{halo: relative error} read from the demo's table; every halo must have its row."""
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[-2:] == ["rel.", "error"])
    rows = {line.split()[0]: float(line.split()[-1]) for line in lines[header + 1:] if line.strip()}
    assert set(rows) == {"0", "1", "2", "full"}, out
    return rows


def test_demo_reports_a_broken_equivalence(capsys, monkeypatch):
    """The demo's error column is computed, not printed as a constant: a perturbed eFCN shows up."""
    from efcn_sparse import SparseEFCN

    forward = SparseEFCN.forward
    monkeypatch.setattr(SparseEFCN, "forward", lambda self, x: forward(self, x) * 1.01)
    assert main(["demo", "--channels", "2", "--size", "5", "--batch", "1"]) == 0
    errors = demo_errors(capsys.readouterr().out)
    assert all(5e-3 < e < 2e-2 for e in errors.values()), errors
