"""FSDP2 sharding (efcn_sparse.sharding): 2 gloo processes against one, sharded checkpoints across
world sizes, the full state_dict, the memory plan and the refusal of plans that cannot fit."""

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from efcn_sparse import SparseEFCN, embed, sharding, summary
from efcn_sparse import training as T

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
    _launch("train", out)  # the worker checks sharded == unsharded, masks, gathering, mixed precision
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

    # one more epoch here, then 1 process -> 2 ranks
    x, y = W.data()
    T.train_epoch(net, opt, x, y, batch_size=10, seed=4)
    with torch.no_grad():
        assert not torch.equal(net[0].values, full["0.values"])
    sharding.save_checkpoint(os.path.join(out, "ckpt1"), net, opt, {"epoch": 7})
    assert sharding.checkpoint_meta(os.path.join(out, "ckpt1")) == {"epoch": 7, "world_size": 1}
    _launch("load", out)
    back = torch.load(os.path.join(out, "full_from1.pt"), weights_only=True)
    for k, v in net.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, back[k]), k

    # offline export: one state_dict file, loadable into the unsharded model
    sharding.export_checkpoint(os.path.join(out, "ckpt"), os.path.join(out, "model.pt"))
    exported = T.load_checkpoint(os.path.join(out, "model.pt"))
    assert exported["meta"]["epoch"] == 1
    fresh = W.model()
    fresh.load_state_dict(exported["model"])
    for k, v in fresh.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, full[k]), k
