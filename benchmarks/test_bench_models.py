"""One SGD training step of the paper's small CNN and of AlexNet (3x32x32 inputs, batch 128):
the CNN against its sparse eFCN (halo 0) on every available backend and the authors' dense
eFCN (nn.Linear); and the CNN against the sparse eFCN in a bfloat16 ``torch.autocast`` step.
Before timing, each eFCN is checked to compute the CNN's function."""

from __future__ import annotations

import pytest
import torch

from . import benchlib as bl

from . import modelkit


def _params():
    out = []
    # smoke: AlexNet's training step already runs in test_bench_memory
    for model in ("paper_cnn", "alexnet") if bl.FULL else ("paper_cnn",):
        out.append(pytest.param(model, "cnn", None, None, id=f"{model}-cnn"))
        out += [pytest.param(model, "efcn_sparse", b, None, id=f"{model}-efcn_{b}") for b in bl.backends_to_run()]
        out.append(pytest.param(model, "efcn_dense", None, None, id=f"{model}-efcn_dense"))
        out.append(pytest.param(model, "cnn", None, "bf16", id=f"{model}-cnn-bf16_autocast"))
        out += [pytest.param(model, "efcn_sparse", b, "bf16", id=f"{model}-efcn_{b}-bf16_autocast")
                for b in bl.backends_to_run() if b != "reference"]
    return out


@pytest.mark.parametrize("model,variant,backend,autocast", _params())
def test_train_step(benchmark, model, variant, backend, autocast):
    bl.release_state()
    cfg = modelkit.model_config(model, bl.FULL)
    bl.seed(model)
    cnn = modelkit.build_cnn(model, cfg["kwargs"]).to(bl.DEVICE)
    counts = modelkit.model_entries(model, cfg["kwargs"], cfg["input_shape"][1], 0)
    if variant == "efcn_dense" and counts["dense"] * 4 * 4 > bl.ANCHOR_BUDGET:
        pytest.skip(f"dense eFCN of {model}: {counts['dense'] * 4 / bl.GiB:.1f} GiB of weights")
    B = cfg["batch"]
    x = torch.randn(B, *cfg["input_shape"], device=bl.DEVICE)
    y = torch.randint(0, cfg["kwargs"]["num_classes"], (B,), device=bl.DEVICE)
    m = modelkit.make_variant(variant, cnn, cfg["input_shape"], backend)
    with torch.no_grad():
        cnn.eval(), m.eval()
        bl.assert_close(m(x[:8]), cnn(x[:8]), f"{model} {variant} output vs the CNN")
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)

    def check(loss):
        assert torch.isfinite(loss), f"{model} {variant}: non-finite loss"
    flops = 3 * 2 * B * (counts["stored"] if variant != "efcn_dense" else counts["dense"])
    dtype = torch.bfloat16 if autocast == "bf16" else None
    impl = variant if variant != "efcn_sparse" else f"efcn[{backend}]"
    bl.measure(benchmark, lambda: modelkit.train_step(m, opt, x, y, dtype), check, group=f"{model} train_step",
               info=dict(model=model, variant=variant, backend=backend, batch=B, op="train_step",
                         precision="bf16 autocast" if dtype else "fp32",
                         impl=impl + (", bf16 autocast" if dtype else ""),
                         kind="efcn" if variant == "efcn_sparse" else "anchor",
                         conv_flops=3 * 2 * B * counts["stored"], executed_conv_flops=flops,
                         stored=counts["stored"], dense_entries=counts["dense"], config=cfg))
