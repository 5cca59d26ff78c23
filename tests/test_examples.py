"""The scripts in examples/ run at tiny sizes and do what they claim."""

import os
import runpy

import pytest
import torch

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread avoids OpenMP threads spinning against other jobs on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _run(name, *args):
    """Run examples/NAME's main(ARGS) in this process (importing is cheaper than a subprocess)."""
    mod = runpy.run_path(os.path.join(EXAMPLES, name), run_name="example")
    return mod["main"](list(args))


def test_relax_protocol_example(tmp_path, capsys):
    result = _run("relax_protocol.py", "--tiny", "--out", str(tmp_path / "run"))
    assert set(result["arms"]) == {"cnn", "efcn_tw0", "efcn_tw2", "fcn"}
    assert result["arms"]["efcn_tw2"]["deviation"].mean == 0.0  # t_w = T: no FCN-space step
    assert result["arms"]["efcn_tw0"]["deviation"].mean > 0
    out = capsys.readouterr().out
    assert "relaxed at t_w=0" in out and "claim: the eFCN ends above the FCN at every relax time: undecided" in out and os.path.isfile(tmp_path / "run" / "figures" / "relax_final_acc.png")


def test_embed_resnet18_example(capsys):
    dev = _run("embed_resnet18.py", "--width", "2", "--image-size", "8", "--batch", "2")
    out = capsys.readouterr().out
    err = float(out.split("max relative difference eFCN vs CNN (eval mode):")[1].split()[0])
    assert err < 1e-5
    assert "layer4.1.conv2" in out and "total" in out
    assert dev["total"]["deviation"] > 0 and dev["total"]["offlocal_ratio"] == 0.0  # halo 0: locality kept


def test_block_sparse_layer_example(capsys):
    losses, n_masked, nonzero = _run("block_sparse_layer.py", "--steps", "60", "--hidden", "60")
    assert n_masked > 0 and nonzero == 0  # masked entries (edge tiles) stay exactly zero under Adam
    assert f"masked entries in the stored blocks: {n_masked}, non-zero after training: 0" in capsys.readouterr().out
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10


def test_block_sparse_layer_example_counts_planted_masked_values():
    """The example's check reads raw values: planted non-zeros at masked entries are counted."""
    ex = runpy.run_path(os.path.join(EXAMPLES, "block_sparse_layer.py"), run_name="example")
    layer = ex["SparseEFCN"](ex["banded_layout"](60, 16, 1))
    n_masked, nonzero = ex["masked_nonzero"](layer)
    assert n_masked > 0 and nonzero == 0
    with torch.no_grad():
        layer.values.masked_fill_(~layer.layout.block_mask(), 7.0)
    assert ex["masked_nonzero"](layer) == (n_masked, n_masked)
    assert (layer.to_dense() != 7).all()  # what a check through to_dense would have seen
