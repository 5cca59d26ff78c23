"""A training step of an embedded network captured in a CUDA graph and replayed (GPU only).

The step (forward, backward, SGD update) must need no host synchronisation and no allocation that
varies from step to step; replays must match the same steps run eagerly.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import efcn_sparse

GPU = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
BACKENDS = [b for b in ("cuda", "triton") if GPU and b in efcn_sparse.available_backends("cuda")]


def _models(backend):
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, stride=2, padding=1),
                        nn.ReLU(), nn.Flatten(), nn.Linear(32 * 8 * 8, 10))
    fc = efcn_sparse.embed(cnn, (3, 16, 16), halo=1).cuda()
    for m in fc.modules():
        if isinstance(m, efcn_sparse.SparseEFCN):
            m.backend = backend
    return fc, copy.deepcopy(fc)


def _step(model, opt, x, y):
    opt.zero_grad(set_to_none=False)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x).float(), y)
    loss.backward()
    opt.step()
    return loss


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_step_replays_in_a_cuda_graph_as_it_runs_eagerly(backend):
    graphed, eager = _models(backend)
    opt_g = torch.optim.SGD(graphed.parameters(), lr=0.05, momentum=0.9)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05, momentum=0.9)
    data = [(torch.randn(64, 3, 16, 16, device="cuda"), torch.randint(0, 10, (64,), device="cuda")) for _ in range(6)]
    static_x, static_y = data[0][0].clone(), data[0][1].clone()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (autotuning, lazy state) outside the capture
        for x, y in data[:3]:
            static_x.copy_(x), static_y.copy_(y)
            _step(graphed, opt_g, static_x, static_y)
    torch.cuda.current_stream().wait_stream(side)
    for x, y in data[:3]:
        _step(eager, opt_e, x, y)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = _step(graphed, opt_g, static_x, static_y)
    for x, y in data[3:]:
        static_x.copy_(x), static_y.copy_(y)
        graph.replay()
        loss = _step(eager, opt_e, x, y)
        torch.testing.assert_close(static_loss, loss, rtol=1e-4, atol=1e-5)
    for (name, pg), pe in zip(graphed.named_parameters(), eager.parameters()):
        torch.testing.assert_close(pg, pe, rtol=1e-4, atol=1e-5, msg=name)
    for m in graphed.modules():
        if isinstance(m, efcn_sparse.SparseEFCN):  # raw values at masked entries
            assert (m.values.detach()[~m.layout.block_mask()] == 0).all()
