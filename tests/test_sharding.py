"""FSDP2 sharding (efcn_sparse.sharding): 2 gloo processes against one, sharded checkpoints across
world sizes, the full state_dict, the memory plan and the refusal of plans that cannot fit."""

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from efcn_sparse import ConvGeometry, SparseEFCN, embed, get_model, sharding, summary
from efcn_sparse import training as T
from efcn_sparse.protocol import RunError, load_run, relax

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

needs_fsdp = pytest.mark.skipif(not sharding.fsdp_available(), reason="FSDP2 is not in this torch")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(mode: str, out: str, world: int = 2, timeout: float = 120) -> None:
    """``world`` processes of fsdp_worker.py as torchrun would start them (RANK, LOCAL_RANK, ...)."""
    port = _free_port()
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen([sys.executable, os.path.join(HERE, "fsdp_worker.py"), mode, out], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), "\n".join(l[-4000:] for l in logs)


@needs_fsdp
def test_two_ranks_train_like_one_and_checkpoints_move_across_world_sizes(tmp_path):
    import fsdp_worker as W

    out = str(tmp_path)
    # 1 process -> 2 ranks: a checkpoint written here (no process group), loaded by the workers
    one = W.model()
    opt1 = W.optimizer(one)
    x, y = W.data()
    T.train_epoch(one, opt1, x, y, batch_size=10, seed=4)
    sharding.save_checkpoint(os.path.join(out, "ckpt1"), one, opt1, {"epoch": 7})
    assert sharding.checkpoint_meta(os.path.join(out, "ckpt1")) == {"epoch": 7, "world_size": 1}
    torch.save(one.state_dict(), os.path.join(out, "full1.pt"))

    _launch("train", out)  # the workers check sharded == unsharded, masks, gathering, mixed precision, ckpt1
    full = torch.load(os.path.join(out, "full.pt"), weights_only=True)

    # 2 ranks -> 1 process: the sharded checkpoint loads into the unsharded model and optimizer
    net = W.model()
    for m in net.modules():
        if isinstance(m, SparseEFCN):
            m.halo = None
    opt = W.optimizer(net)
    meta = sharding.load_checkpoint(os.path.join(out, "ckpt"), net, opt)
    assert meta == {"epoch": 1, "world_size": 2}
    assert all(m.halo == 1 for m in net.modules() if isinstance(m, SparseEFCN))  # extra_state came back
    for k, v in net.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, full[k]), k
    assert all(int(s["step"]) == 4 for s in opt.state.values()) and len(opt.state) == len(list(net.parameters()))

    # offline export (efcn export): one state_dict file, loadable into the unsharded model
    from efcn_sparse.cli import main

    assert main(["export", os.path.join(out, "ckpt"), "-o", os.path.join(out, "model.pt")]) == 0
    assert main(["export", os.path.join(out, "nothing"), "-o", os.path.join(out, "x.pt")]) == 2
    exported = T.load_checkpoint(os.path.join(out, "model.pt"))
    assert exported["meta"]["epoch"] == 1
    fresh = W.model()
    fresh.load_state_dict(exported["model"])
    for k, v in fresh.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, full[k]), k


# ---------------------------------------------------------------------------------------- the relax protocol
@needs_fsdp
def test_relax_fsdp_two_ranks_then_resume_on_one(tmp_path):
    """--fsdp on 2 ranks matches the unsharded run; killed mid-way, it resumes on 1 process from the
    sharded checkpoints to the same metrics."""
    from test_protocol import TINY, _assert_same, _cli_args, _env

    TINY = dict(TINY, seeds=[0])  # one seed: its checkpoints in checkpoints/seed0
    ref = str(tmp_path / "ref")
    relax(out=ref, quiet=True, plots=False, **TINY)
    out = str(tmp_path / "fsdp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "efcn_sparse", "relax", *_cli_args(TINY), "--fsdp", "--out", out, "--quiet", "--no-plots"]
    # 2 batches per epoch: the CNN takes 4, the kill lands in the 2nd epoch of efcn_tw0 (sharded)
    p = subprocess.run(cmd, env=dict(_env(), OMP_NUM_THREADS="1", EFCN_FAULT_AFTER_BATCHES="7"),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0, p.stdout[-2000:] + p.stderr[-2000:]
    meta, partial = load_run(out)
    assert meta["world_size"] == 2 and meta["config"]["fsdp"] is True
    assert ("efcn_tw0", 1) in {(r["arm"], r["epochs_trained"]) for r in partial}
    ckpts = os.listdir(os.path.join(out, "checkpoints", "seed0"))
    assert "efcn_tw0.dcp" in ckpts and "efcn_tw0.pt" not in ckpts and "cnn.pt" in ckpts
    assert sharding.checkpoint_meta(os.path.join(out, "checkpoints", "seed0", "efcn_tw0.dcp")) == \
        {"epoch": 1, "done": False, "world_size": 2}
    # sharded on 2 ranks == unsharded on 1, to float rounding
    done = {(r["arm"], r["epochs_trained"]) for r in partial}
    _assert_same(partial, [r for r in load_run(ref)[1] if (r["arm"], r["epochs_trained"]) in done],
                 rel=1e-4, acc_slack=1.0 / 40 + 1e-12)
    relax(out=out, resume=True, quiet=True, plots=False, fsdp=True, **TINY)  # 1 process
    _assert_same(load_run(out)[1], load_run(ref)[1], rel=1e-4, acc_slack=1.0 / 40 + 1e-12)
    assert not [n for n in os.listdir(os.path.join(out, "checkpoints", "seed0")) if n.endswith((".tmp", ".old"))]


def test_relax_refuses_a_plan_that_cannot_fit(tmp_path, monkeypatch, capsys):
    from efcn_sparse.cli import main

    monkeypatch.setenv("EFCN_DEVICE_MEMORY_GIB", "80")
    args = ["relax", "--model", "resnet18", "--dataset", "synthetic", "--image-size", "32", "--train-size", "8",
            "--test-size", "8", "--halo", "full", "--optimizer", "adam", "--device", "cpu", "--quiet",
            "--out", str(tmp_path / "r")]
    assert main(args + ["--fsdp"]) == 2
    err = capsys.readouterr().err
    assert "over this device's 80.00 GiB" in err and "--fsdp on at least" in err
    need = int(err.split("--fsdp on at least ")[1].split()[0])
    assert need > 1
    assert main(args) == 2  # replicated (DDP) says the same, and that it needs sharding
    assert "replicated (DDP) it cannot fit" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "r" / "checkpoints")
    monkeypatch.setenv("EFCN_DEVICE_MEMORY_GIB", "40")  # a float32 layer of 16 GiB, 3 in flight: no world size helps
    assert main(args + ["--fsdp"]) == 2
    assert "FSDP cannot split a layer" in capsys.readouterr().err


def test_cli_plan_prints_the_plan_and_the_ranks_needed(capsys):
    from efcn_sparse.cli import main

    args = ["plan", "--model", "skinny", "--width", "8", "--in-channels", "1", "--image-size", "28", "--halo", "full",
            "--world-size", "2", "--optimizer", "adam"]
    cnn = get_model("skinny", width=8, in_channels=1, image_size=28)
    plan = summary(cnn, (1, 28, 28), halo="full", world_size=2, optimizer="adam", dtype=torch.float32).plan
    floor = min(plan.at(n)["peak_bytes"] for n in range(1, 65))
    gib = f"{(floor + plan.at(1)['peak_bytes']) / 2 / 2**30:.6f}"  # fits some world size > 1, not 1
    need = plan.needed_world_size(int(float(gib) * 2**30))
    assert need is not None and need > 1
    assert main(args + ["--device-memory", gib]) == 0
    out = capsys.readouterr().out
    assert str(plan) in out and out.count("\n") == 2
    assert f"ranks needed with {float(gib):g} GiB each: {need}" in out
    assert main(args + ["--layers"]) == 0
    assert "dense eFCN" in capsys.readouterr().out
    assert main(args[:-8] + ["--image-size", "4"]) == 2
    assert "too small" in capsys.readouterr().err


def test_param_dtype_needs_fsdp(tmp_path):
    from test_protocol import TINY

    with pytest.raises(RunError, match="--param-dtype needs --fsdp"):
        relax(out=str(tmp_path / "r"), quiet=True, param_dtype="bfloat16", **TINY)


# ---------------------------------------------------------------------------------------- memory plan
def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, stride=2),
                         nn.BatchNorm2d(32), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 16, 5))


@pytest.mark.parametrize("halo", [0, 1, "full"])
def test_plan_counts_what_the_built_model_holds(halo):
    cnn = _cnn()
    net = embed(cnn, (3, 8, 8), halo=halo)
    params = sum(p.numel() * p.element_size() for p in net.parameters())
    buffers = sum(b.numel() * b.element_size() for b in net.buffers())
    for world in (1, 2, 3):
        counted = summary(cnn, (3, 8, 8), halo=halo, world_size=world, optimizer="adam").plan
        built = summary(net, world_size=world, optimizer="adam").plan
        assert counted.at(world) == built.at(world)
        # each parameter split along dim 0 in chunks of ceil(d0 / world)
        shard = sum(-(-p.shape[0] // world) * (p.numel() // p.shape[0]) * p.element_size() for p in net.parameters())
        assert built.gradients == shard and built.optimizer_state == 2 * shard
        assert built.weights == shard + buffers
    plan1 = summary(net, world_size=1).plan
    assert plan1.weights == params + buffers and plan1.optimizer_state == 0 and plan1.largest_gathered == 0
    plan2 = summary(net, world_size=2, param_dtype=torch.bfloat16).plan
    biggest = max((m for m in net.modules() if isinstance(m, SparseEFCN)), key=lambda m: m.values.numel())
    assert plan2.largest_gathered == (-(-biggest.nnzb // 2) * 2 * biggest.values[0].numel() + biggest.bias.numel()) * 2
    assert summary(net, world_size=2, optimizer="sgd").plan.optimizer_state == plan2.gradients


def test_plan_needed_world_size_is_the_smallest_that_fits():
    plan = summary(_cnn(), (3, 8, 8), halo="full", world_size=1, optimizer="adam").plan
    peaks = [plan.at(n)["peak_bytes"] for n in range(1, 9)]
    for cap in (peaks[0], peaks[2] + 1, peaks[5]):
        need = plan.needed_world_size(cap)
        assert plan.at(need)["peak_bytes"] <= cap and (need == 1 or plan.at(need - 1)["peak_bytes"] > cap)
    # three gathered copies of the largest layer plus the replicated layout are the floor: FSDP cannot go lower
    floor = min((plan.at(n) for n in range(1, 4097)), key=lambda d: d["peak_bytes"])
    assert floor["peak_bytes"] > 3 * floor["largest_gathered"] > 0
    cap = floor["peak_bytes"] - 1
    assert plan.needed_world_size(cap) is None
    with pytest.raises(MemoryError, match="cannot split a layer"):
        sharding.check_plan(_cnn(), (3, 8, 8), "full", 2, True, "adam", capacity=cap)
    assert sharding.check_plan(_cnn(), (3, 8, 8), "full", 2, True, "adam", capacity=peaks[1]).world_size == 2


def test_plan_of_resnet18_full_is_counted_without_building_it():
    from efcn_sparse.embedding import conv_input_sizes
    from efcn_sparse.models import get_model

    m = get_model("resnet18", in_channels=3, image_size=32, num_classes=10)
    s = summary(m, (3, 32, 32), halo="full", world_size=8, optimizer="adam", param_dtype=torch.bfloat16)
    sizes = conv_input_sizes(m, (3, 32, 32))
    dense = 0
    for path, conv in m.named_modules():
        if isinstance(conv, nn.Conv2d):
            geo = ConvGeometry.from_conv(conv, sizes[path])
            dense += geo.out_features * geo.in_features + (geo.out_features if conv.bias is not None else 0)
    assert s.total["stored"] - s.rows[-1]["stored"] == dense  # halo "full" stores the dense eFCN
    assert dense > 2.7e10
    assert s.plan.largest_gathered == 65536 * 65536 * 2 and s.plan.largest_layer == "layer1.0.conv1"
    assert "largest gathered layer 8.00 GiB (layer1.0.conv1)" in str(s)


def test_bad_plan_options():
    with pytest.raises(ValueError, match="optimizer"):
        summary(_cnn(), (3, 8, 8), optimizer="rmsprop")
    with pytest.raises(ValueError, match="world_size"):
        summary(_cnn(), (3, 8, 8), world_size=0)
    with pytest.raises(ValueError, match="dtype"):
        summary(_cnn(), (3, 8, 8), world_size=2, dtype=torch.int8)


# ---------------------------------------------------------------------------------------- devices, errors
def test_rank_device_from_local_rank():
    cuda = torch.device("cuda")
    assert T.rank_device(cuda, 3, device_count=4) == torch.device("cuda", 3)
    assert T.rank_device(cuda, 3, device_count=1) == torch.device("cuda", 0)  # one GPU visible per task (SLURM)
    with pytest.raises(ValueError, match="LOCAL_RANK=5, but this process sees 4 GPU"):
        T.rank_device(cuda, 5, device_count=4)
    assert T.rank_device(torch.device("cpu"), 5, device_count=0) == torch.device("cpu")


def test_shard_needs_a_process_group_and_efcn_layers():
    if not sharding.fsdp_available():
        with pytest.raises(sharding.ShardingError, match="torch >= 2.4"):
            sharding.shard(embed(_cnn(), (3, 8, 8)))
        return
    with pytest.raises(sharding.ShardingError, match="no process group"):
        sharding.shard(embed(_cnn(), (3, 8, 8)))
    with pytest.raises(ValueError, match="bfloat17"):
        sharding.mixed_precision("bfloat17")


def test_multinode_examples_launch_what_they_say(tmp_path):
    """examples/slurm_relax.sbatch -> multinode_relax.sh -> torchrun, run with srun, scontrol and
    python stubbed: the launch line parses with torchrun's and efcn relax's own parsers, each array
    task gets its seed and relax times, and the groups together are the authors' grid."""
    import argparse
    import shlex
    import stat

    from torch.distributed.run import get_args_parser

    from efcn_sparse import cli
    from efcn_sparse.protocol import relax_grid

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {"srun": '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n',
             "scontrol": "#!/bin/bash\nprintf 'node007\\nnode008\\n'\n",
             "fakepython": '#!/bin/bash\nprintf "%q " "$@" > "$LAUNCH_LOG"\n'}
    for name, text in stubs.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    sub = argparse.ArgumentParser().add_subparsers()
    cli._add_relax(sub)
    relax_parser = sub.choices["relax"]
    times, fcn_jobs = {}, []
    for task in range(6):
        log = tmp_path / f"launch{task}"
        env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_ARRAY_TASK_ID=str(task),
                   SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="node[007-008]", PYTHON=str(bin_dir / "fakepython"),
                   LAUNCH_LOG=str(log))
        p = subprocess.run(["bash", os.path.join("examples", "slurm_relax.sbatch")], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        argv = shlex.split(log.read_text())
        assert argv[:2] == ["-m", "torch.distributed.run"]
        split = argv.index("efcn_sparse")
        launch = get_args_parser().parse_args(argv[2:split - 1] + ["x"])
        assert (launch.nnodes, launch.nproc_per_node, launch.rdzv_endpoint) == ("2", "8", "node007:29500")
        assert argv[split + 1] == "relax"
        args = relax_parser.parse_args(argv[split + 2:])
        assert args.fsdp and args.resume and args.param_dtype == "bfloat16"
        assert args.out.endswith(f"cifar-s{args.seed}-{'ab'[task % 2]}") and launch.rdzv_id == os.path.basename(args.out)
        times.setdefault(args.seed, []).extend(args.relax_times)
        if args.fcn:
            fcn_jobs.append(args.seed)
    assert {s: sorted(t) for s, t in times.items()} == {s: relax_grid(100, 12) for s in (0, 1, 2)}
    assert sorted(fcn_jobs) == [0, 1, 2]  # the FCN baseline once per seed


def test_sharded_checkpoint_swap_survives_a_crash_at_any_point(tmp_path):
    """One process (no process group): the temporary directory and the rename keep a good checkpoint."""
    torch.manual_seed(0)
    net = embed(_cnn(), (3, 8, 8), halo=1)
    path = str(tmp_path / "arm.dcp")
    assert sharding.checkpoint_meta(path) is None and sharding.load_checkpoint(path, net) is None
    sharding.save_checkpoint(path, net, None, {"epoch": 1})
    first = {k: v.clone() for k, v in net.state_dict().items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    # a crash while writing: a torn temporary directory is never read, and the next save clears it
    os.makedirs(path + ".tmp")
    open(os.path.join(path + ".tmp", "__0_0.distcp"), "wb").write(b"torn")
    assert sharding.checkpoint_meta(path)["epoch"] == 1
    # a crash between the two renames: only path.old is left, and it is the last good checkpoint
    os.rename(path, path + ".old")
    fresh = embed(_cnn(), (3, 8, 8), halo=1)
    assert sharding.load_checkpoint(path, fresh)["epoch"] == 1
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in first.items())
    sharding.save_checkpoint(path, net, None, {"epoch": 2})
    assert sorted(os.listdir(tmp_path)) == ["arm.dcp"]
    assert sharding.load_checkpoint(path, fresh)["epoch"] == 2
    now = fresh.state_dict()
    assert all(torch.equal(now[k], v) for k, v in net.state_dict().items() if isinstance(v, torch.Tensor))
    # a checkpoint of another model is refused clearly
    other = embed(_cnn(), (3, 8, 8), halo=0)
    with pytest.raises(RuntimeError, match="cannot be loaded"):
        sharding.load_checkpoint(path, other)
