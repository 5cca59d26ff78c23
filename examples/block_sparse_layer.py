"""``SparseEFCN`` as a generic block-sparse linear layer inside another model, trained.

A banded block pattern (each output block sees its neighbours' input blocks) replaces a dense
``nn.Linear`` in an MLP; gradients reach only the stored blocks, so the layer keeps its sparsity.

    python examples/block_sparse_layer.py --steps 200
"""

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from efcn_sparse import BSRLayout, SparseEFCN


def banded_layout(features: int, block: int, bandwidth: int) -> BSRLayout:
    """Blocks (i, j) with |i - j| <= bandwidth on a (features x features) grid of block x block tiles
    (when ``block`` does not divide ``features``, the last tiles stick out: those entries are masked)."""
    n = -(-features // block)
    rows, cols = zip(*[(i, j) for i in range(n) for j in range(max(0, i - bandwidth), min(n, i + bandwidth + 1))])
    return BSRLayout.from_block_coords((features, features), (block, block), rows, cols)


def masked_nonzero(layer: SparseEFCN) -> tuple:
    """(masked entries in the stored blocks, how many of them hold a non-zero value), read from the
    raw values (``to_dense`` re-applies the mask, so it could not show them)."""
    masked = ~layer.layout.block_mask()
    return int(masked.sum()), int((layer.values.detach()[masked] != 0).sum())


class SparseMLP(nn.Module):
    def __init__(self, d_in: int, hidden: int, classes: int, block: int = 16, bandwidth: int = 1):
        super().__init__()
        self.inp = nn.Linear(d_in, hidden)
        self.sparse = SparseEFCN(banded_layout(hidden, block, bandwidth))  # nn.Linear-style init, trainable bias
        self.out = nn.Linear(hidden, classes)

    def forward(self, x):
        h = F.relu(self.inp(x))
        h = F.relu(self.sparse(h))  # flat [B, hidden] in, flat out
        return self.out(h)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=250)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    d_in, classes = 32, 4
    teacher = torch.randn(d_in, classes)
    model = SparseMLP(d_in, args.hidden, classes)
    print(model.sparse)  # shape, blocks, stored entries, density, bytes
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(args.steps):
        x = torch.randn(args.batch, d_in)
        y = (x @ teacher).argmax(1)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    n_masked, nonzero = masked_nonzero(model.sparse)
    print(f"masked entries in the stored blocks: {n_masked}, non-zero after training: {nonzero}")
    return losses, n_masked, nonzero


if __name__ == "__main__":
    main()
