"""Paths between two models of the same structure, as in the authors' code: linear and norm-preserving
("curvilinear") interpolation of the weights, and output-space averaging; ``interpolate``
evaluates loss and accuracy along the path.

Curvilinear, per parameter tensor: w(a) = v * ((1-a)|w0| + a|w1|) / |v| with v = (1-a) w0 + a w1,
so the norm of each tensor moves linearly between the two ends. Floating buffers (BatchNorm
statistics) are interpolated linearly in both modes; integer buffers (eFCN layouts, counters)
must agree.
"""

from __future__ import annotations

import copy
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn as nn

__all__ = ["interpolate_linear", "interpolate_curvilinear", "OutputAverage", "interpolated_model", "interpolate",
           "MODES"]

MODES = ("linear", "curvilinear", "output")


def _check_same(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        extra = sorted(set(sa) ^ set(sb))[:5]
        raise ValueError(f"the two models differ in structure (state_dict keys {extra} are in only one)")
    for k, ta in sa.items():
        tb = sb[k]
        if not isinstance(ta, torch.Tensor):
            continue
        if ta.shape != tb.shape:
            raise ValueError(f"the two models differ at {k}: shape {tuple(ta.shape)} vs {tuple(tb.shape)}")
        if not ta.is_floating_point() and k.rsplit(".", 1)[-1] != "num_batches_tracked" and not torch.equal(ta, tb.to(ta.device)):
            raise ValueError(f"the two models differ at {k} (an index/layout buffer): interpolation needs the same layout")


def _interp(a: nn.Module, b: nn.Module, alpha: float, curvilinear: bool) -> nn.Module:
    _check_same(a, b)
    out = copy.deepcopy(a)
    pb = dict(b.named_parameters())
    bb = dict(b.named_buffers())
    with torch.no_grad():
        for name, p in out.named_parameters():
            w0, w1 = p.detach().clone(), pb[name].detach().to(p.device)
            v = (1 - alpha) * w0 + alpha * w1
            if curvilinear:
                n = v.norm()
                if n > 0:
                    v = v * (((1 - alpha) * w0.norm() + alpha * w1.norm()) / n)
            p.copy_(v)
        for name, t in out.named_buffers():
            if t is not None and t.is_floating_point():
                t.copy_((1 - alpha) * t + alpha * bb[name].to(t.device))
    return out


def interpolate_linear(a: nn.Module, b: nn.Module, alpha: float) -> nn.Module:
    """A new model with weights (1 - alpha) a + alpha b."""
    return _interp(a, b, float(alpha), curvilinear=False)


def interpolate_curvilinear(a: nn.Module, b: nn.Module, alpha: float) -> nn.Module:
    """A new model on the norm-preserving path: each tensor is the linear mix rescaled to the
    linearly interpolated norm."""
    return _interp(a, b, float(alpha), curvilinear=True)


class OutputAverage(nn.Module):
    """Output-space average: ``(1 - alpha) a(x) + alpha b(x)`` (the two models are shared, not copied)."""

    def __init__(self, a: nn.Module, b: nn.Module, alpha: float):
        super().__init__()
        self.a, self.b, self.alpha = a, b, float(alpha)

    def forward(self, x):
        return (1 - self.alpha) * self.a(x) + self.alpha * self.b(x)


def interpolated_model(a: nn.Module, b: nn.Module, alpha: float, mode: str = "linear") -> nn.Module:
    """The model at ``alpha`` on the path of ``mode`` ("linear", "curvilinear" or "output")."""
    if mode == "linear":
        return interpolate_linear(a, b, alpha)
    if mode == "curvilinear":
        return interpolate_curvilinear(a, b, alpha)
    if mode == "output":
        return OutputAverage(a, b, alpha)
    raise ValueError(f"unknown interpolation mode {mode!r}: expected one of {', '.join(MODES)}")


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, loss_fn: Optional[Callable] = None, device=None):
    """(mean loss, accuracy in [0, 1]) of ``model`` in eval mode over ``loader``'s (x, y) batches.

    ``loss_fn(out, y)`` gives the batch mean (as ``nn.CrossEntropyLoss()``), or the sum when it has
    ``reduction == "sum"``; the train/eval flags of every module are restored afterwards.
    """
    loss_fn = loss_fn or nn.CrossEntropyLoss(reduction="sum")
    modes = {m: m.training for m in model.modules()}
    model.eval()
    total, loss_sum, correct = 0, 0.0, 0
    try:
        for x, y in loader:
            if device is not None:
                x, y = x.to(device), y.to(device)
            out = model(x)
            loss = loss_fn(out, y)
            if getattr(loss_fn, "reduction", "mean") != "sum":
                loss = loss * x.shape[0]
            loss_sum += float(loss)
            correct += int((out.argmax(1) == y).sum())
            total += x.shape[0]
    finally:
        for m, t in modes.items():
            m.training = t
    if total == 0:
        raise ValueError("evaluate: the loader yielded no samples")
    return loss_sum / total, correct / total


def interpolate(a: nn.Module, b: nn.Module, alphas: Sequence[float], loader: Iterable, mode: str = "linear",
                device=None, loss_fn: Optional[Callable] = None) -> dict:
    """Evaluate the path from ``a`` (alpha = 0) to ``b`` (alpha = 1) at each of ``alphas``.

    Returns ``{"alpha": [...], "loss": [...], "accuracy": [...]}`` (mean loss per sample, accuracy
    in [0, 1]; ``loss_fn`` defaults to cross-entropy). Models are moved to ``device`` when given;
    ``a`` and ``b`` themselves are not modified.
    """
    if mode not in MODES:
        raise ValueError(f"unknown interpolation mode {mode!r}: expected one of {', '.join(MODES)}")
    if device is not None:
        a, b = copy.deepcopy(a).to(device), copy.deepcopy(b).to(device)
    if mode != "output":
        _check_same(a, b)
    res = {"alpha": [], "loss": [], "accuracy": []}
    for alpha in alphas:
        net = interpolated_model(a, b, float(alpha), mode)
        loss, acc = evaluate(net, loader, loss_fn, device)
        res["alpha"].append(float(alpha))
        res["loss"].append(loss)
        res["accuracy"].append(acc)
    return res
