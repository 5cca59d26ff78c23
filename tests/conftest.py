"""Shared test helpers: random inputs, tolerances, and a poisoned-output guard."""

import os

# Triton kernels run on CPU tensors through the interpreter; it must be set before triton loads.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Two cores: OpenMP spinning across concurrent processes inflates runtimes; tests that care set threads.
torch.set_num_threads(1)

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def assert_close_rel(actual, expected, rel, what=""):
    """max |a - e| <= rel * max |e| (relative to the output's scale), and no NaN introduced."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all() == torch.isfinite(expected).all(), f"{what}: non-finite values differ"
    scale = expected.abs().max().clamp(min=1e-30)
    err = (actual - expected).abs().max() / scale
    assert err <= rel, f"{what}: relative error {err.item():.3e} > {rel:.1e}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(int(os.environ.get("EFCN_TEST_SEED", "1234")))
    yield
