"""One rank of the FSDP tests (tests/test_sharding.py starts it in 2 processes, gloo on 127.0.0.1).

``python fsdp_worker.py train OUT``: a tiny embedded CNN trained sharded (FSDP2) and unsharded from
the same seed; rank 0 checks they agree and masked entries are zero, then the sharded run writes a
DCP checkpoint (OUT/ckpt) and its full state_dict (OUT/full.pt). Last, OUT/ckpt1 (written by one
process) is loaded into the sharded model and compared with OUT/full1.pt.
Exit status 0 when every check passed; an assertion error otherwise.
"""

import datetime
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from efcn_sparse import SparseEFCN, embed, sharding  # noqa: E402
from efcn_sparse import training as T  # noqa: E402


def tiny_cnn(width=16):
    """3 -> 16 -> 16 channels on 8x8: a few-channel layer (tight one-pixel tiles) and a grouped one
    (masked entries inside its tiles)."""
    torch.manual_seed(0)
    # the in-place ReLU writes into the layer's output (a channels_last view, copied under shard(): FSDP2 warns
    # that an in-place op on a view output may drop its backward hook)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(width, width, 3, padding=1, stride=2, groups=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(width * 16, 5))


def model():
    return embed(tiny_cnn(), (3, 8, 8), halo=1)


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(37, 3, 8, 8, generator=g), torch.randint(0, 5, (37,), generator=g)


def optimizer(m):
    return T.make_optimizer(m.parameters(), "adam", lr=1e-2, weight_decay=1e-3)


def masks(m):
    """path -> bool mask of the entries each SparseEFCN may hold (values shape)."""
    return {p: l.layout.block_mask(torch.bool) for p, l in m.named_modules() if isinstance(l, SparseEFCN)}


def train(out):
    info = T.setup_distributed("cpu")
    assert info.world == 2 and info.local_rank == int(os.environ["LOCAL_RANK"]) and info.device.type == "cpu"
    x, y = data()
    ref = model()
    T.train_epoch(ref, optimizer(ref), x, y, batch_size=10, seed=3)  # one process, the whole batches

    # each layer sharded as soon as it is built, then the root (what relax --fsdp does)
    net = sharding.shard(embed(tiny_cnn(), (3, 8, 8), halo=1, finish_layer=sharding.shard_layer))
    assert sharding.is_sharded(net)
    seen = []
    for m in net.modules():
        if isinstance(m, SparseEFCN):
            c = -(-m.nnzb // 2)  # FSDP2 splits dim 0 (blocks) in chunks of ceil(nnzb / world)
            assert type(m.values).__name__ == "DTensor"
            assert m.values.to_local().shape[0] == min(c, m.nnzb - info.rank * c)
            assert isinstance(m.crow_ptr, torch.Tensor) and type(m.crow_ptr).__name__ != "DTensor"  # replicated
            m.register_forward_pre_hook(lambda mod, a: seen.append(type(mod.values).__name__))
    opt = optimizer(net)
    T.train_epoch(net, opt, x, y, batch_size=10, seed=3, info=info)  # 4 batches, the last split 4/3
    assert seen and set(seen) == {"Parameter"}, seen  # the layers compute on gathered, ordinary tensors

    full = sharding.full_state_dict(net)
    mk = masks(ref)
    if info.rank == 0:
        want = ref.state_dict()
        assert set(full) == set(want), set(full) ^ set(want)
        for k, v in want.items():  # float tolerance: the reductions sum in another order, and Adam's
            if isinstance(v, torch.Tensor):  # division by sqrt(v) magnifies that for near-zero gradients
                torch.testing.assert_close(full[k], v, rtol=1e-4, atol=2e-5, msg=lambda s: f"{k}: {s}")
        n_masked = 0
        for p, mask in mk.items():
            v = full[f"{p}.values"]
            assert (v[~mask] == 0).all(), p  # masked entries stayed exactly zero
            assert (v[mask] != 0).float().mean() > 0.5
            n_masked += int((~mask).sum())
        assert n_masked > 0
        torch.save(full, os.path.join(out, "full.pt"))

    # evaluation: ranks run the same number of forwards even when one has fewer examples
    ev = T.evaluate(net, x[:3], y[:3], batch_size=1, info=info)
    ev_ref = T.evaluate(ref, x[:3], y[:3], batch_size=1)
    assert abs(ev["loss"] - ev_ref["loss"]) < 1e-4 * ev_ref["loss"], (ev, ev_ref)

    # the projected CNN and the deviation, gathered one layer at a time
    from efcn_sparse.subspace import deviation, to_cnn

    cnn = sharding.unsharded_cnn(net, tiny_cnn())
    for (k, a), b in zip(cnn.state_dict().items(), to_cnn(ref).state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda s: f"{k}: {s}")
    d, d_ref = deviation(net)["total"], deviation(ref)["total"]
    assert abs(d["deviation"] - d_ref["deviation"]) < 1e-5, (d, d_ref)

    sharding.save_checkpoint(os.path.join(out, "ckpt"), net, opt, {"epoch": 1})
    assert os.path.isdir(os.path.join(out, "ckpt")) and not os.path.exists(os.path.join(out, "ckpt.tmp"))

    # mixed precision is passed through: layers gathered and computed in bfloat16, shards stay float32
    mp = sharding.shard(model(), param_dtype="bfloat16")
    dts = []
    for m in mp.modules():
        if isinstance(m, SparseEFCN):
            m.register_forward_pre_hook(lambda mod, a: dts.append((mod.values.dtype, a[0].dtype)))
    out_mp = mp(x[:4])
    assert set(dts) == {(torch.bfloat16, torch.bfloat16)}, dts
    assert all(p.dtype == torch.float32 for p in mp.parameters())
    with torch.no_grad():
        want = model()(x[:4])
    assert out_mp.dtype == torch.bfloat16 and (out_mp.float() - want).abs().max() < 0.05 * want.abs().max()

    # BatchNorm: every rank normalises its own examples; rank 0's running statistics reach every rank
    torch.manual_seed(0)
    bn = sharding.shard(embed(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                            nn.Flatten(), nn.Linear(16 * 64, 5)), (3, 8, 8)))
    bn(x[info.rank * 5:(info.rank + 1) * 5]).sum().backward()  # other examples on each rank
    bn.eval()
    bn(x[:2])
    stats = [None, None]
    dist.all_gather_object(stats, [b.clone() for b in bn[1].buffers()])
    assert all(torch.equal(a, b) for a, b in zip(*stats)) and stats[0][0].abs().sum() > 0

    load(out, info)
    T.cleanup_distributed(info)


def load(out, info):
    """OUT/ckpt1, written by one process, into the sharded model: equal to OUT/full1.pt."""
    net = sharding.shard(model())
    for m in net.modules():
        if isinstance(m, SparseEFCN):
            m.halo = None  # extra_state (halo, geometry, shapes) must come back from the checkpoint
    opt = optimizer(net)
    meta = sharding.load_checkpoint(os.path.join(out, "ckpt1"), net, opt)
    assert meta["epoch"] == 7 and meta["world_size"] == 1, meta
    assert all(m.halo == 1 for m in net.modules() if isinstance(m, SparseEFCN))
    assert opt.state and all(int(s["step"]) == 4 for s in opt.state.values())
    full = sharding.full_state_dict(net)
    if info.rank == 0:
        want = torch.load(os.path.join(out, "full1.pt"), weights_only=True)
        assert set(full) == set(want)
        for k, v in want.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(full[k], v), k


if __name__ == "__main__":
    # a hung collective fails after a minute instead of blocking the test run
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    {"train": train}[sys.argv[1]](sys.argv[2])
    # the group was made here, not by setup_distributed (whose cleanup leaves it alone): left to
    # interpreter teardown, gloo's threads were once destroyed joinable ("terminate called without
    # an active exception", both ranks aborting after every check had passed)
    dist.destroy_process_group()
