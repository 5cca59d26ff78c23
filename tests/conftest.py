"""Shared test helpers: tolerances, the seed, and the optional paths CI requires.

``EFCN_REQUIRE`` (comma-separated; ``make test`` sets it) names optional paths that must run
here: a test that would skip for lack of one fails instead (see :func:`require_or_skip`), and
``test_required_paths.py`` checks each named path is present. Names: see ``OPTIONAL_PATHS``.
"""

import os

# Triton kernels run on CPU tensors through the interpreter; it must be set before triton loads.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Two cores: OpenMP spinning across concurrent processes inflates runtimes; tests that care set threads.
torch.set_num_threads(1)

OPTIONAL_PATHS = {
    "triton": "the triton backend on CPU tensors (triton installed, kernels run under TRITON_INTERPRET=1)",
    "triton-compiler": "Triton's CUDA compiler (ptxas), which compiles the kernels for sm_90 without a GPU",
    "cpu-ext": "the compiled C++ extension with its CPU kernels (the cpu backend)",
    "cuda-emulator": "csrc/cuda compiled for the CPU emulator (CUDA headers, ninja, a C++ compiler)",
    "fashion-mnist": "the Fashion-MNIST idx files (`make data`: Debian package dataset-fashion-mnist)",
}


def required_paths() -> set:
    """The optional paths named in ``EFCN_REQUIRE`` (unknown names are an error)."""
    names = {n.strip() for n in os.environ.get("EFCN_REQUIRE", "").split(",") if n.strip()}
    unknown = names - set(OPTIONAL_PATHS)
    if unknown:
        raise pytest.UsageError(f"EFCN_REQUIRE: unknown path(s) {sorted(unknown)}; expected some of {sorted(OPTIONAL_PATHS)}")
    return names


def require_or_skip(path: str, reason: str) -> None:
    """Skip for lack of optional ``path`` (with ``reason``), or fail where ``EFCN_REQUIRE`` names it."""
    assert path in OPTIONAL_PATHS, path
    if path in required_paths():
        pytest.fail(f"EFCN_REQUIRE names {path!r} ({OPTIONAL_PATHS[path]}), but it is missing: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def path_missing(path: str):
    """Why optional ``path`` cannot run here, or None when it can. Decided by looking for what it
    needs, never by reading a failure's message (an error of ours must fail, not skip)."""
    import importlib.util
    import shutil
    import sys
    from pathlib import Path

    from efcn_sparse import backends

    if path == "triton":
        return backends.unavailable_reason("triton", "cpu")
    if path == "cpu-ext":
        return backends.unavailable_reason("cpu", "cpu")
    if path == "triton-compiler":
        if importlib.util.find_spec("triton") is None or importlib.util.find_spec("triton.backends.nvidia") is None:
            return "triton, or its NVIDIA backend (triton.backends.nvidia), is not installed"
        from triton.backends.nvidia.compiler import get_ptxas
        try:
            ptxas = get_ptxas(90)
        except TypeError:  # older triton: get_ptxas() takes no architecture
            ptxas = get_ptxas()
        exe = getattr(ptxas, "path", ptxas)
        return None if exe and os.access(exe, os.X_OK) else f"no executable ptxas (got {exe!r})"
    if path == "cuda-emulator":
        if os.environ.get("EFCN_SKIP_CUDA_EMULATION") == "1":
            return "EFCN_SKIP_CUDA_EMULATION=1"
        cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
        if not (Path(cuda_home) / "include" / "cuda_runtime_api.h").exists():
            return f"no CUDA headers under {cuda_home} (the emulator takes dim3/uint4 from them)"
        if shutil.which("ninja") is None and shutil.which("ninja", path=os.path.dirname(sys.executable)) is None:
            return "ninja not found"
        return None
    if path == "fashion-mnist":
        from efcn_sparse import data

        looked = data._candidates("fashion-mnist", None)
        return None if any(data._idx_folder_ok(d) for d in looked) else f"no idx files in {', '.join(looked)}"
    raise ValueError(f"unknown optional path {path!r}; expected one of {sorted(OPTIONAL_PATHS)}")


def pytest_configure(config):
    required_paths()  # reject a misspelt EFCN_REQUIRE before anything runs


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


# The backends that run CPU tensors, and the optional path each needs.
CPU_BACKENDS = {"reference": None, "cpu": "cpu-ext", "triton": "triton"}


def require_cpu_backend(name: str) -> str:
    """``name`` when that backend runs CPU tensors here; else skip, or fail under EFCN_REQUIRE."""
    from efcn_sparse import backends

    reason = backends.unavailable_reason(name, "cpu")
    if reason is not None:
        require_or_skip(CPU_BACKENDS[name], f"backend {name!r} unavailable: {reason}")
    return name


@pytest.fixture(params=list(CPU_BACKENDS))
def cpu_backend(request):
    """Each backend that runs CPU tensors (skipped, or failed under EFCN_REQUIRE, where it cannot)."""
    return require_cpu_backend(request.param)


def poison_one_sample(x: torch.Tensor) -> torch.Tensor:
    """``x`` with every feature of sample 0 set to +inf, so every product dy[0, r] * x[0, c] is
    non-finite, at masked entries too: a kernel that masks grad_weight by multiplying (NaN * 0 is
    NaN) instead of selecting leaks NaN there."""
    x = x.clone()
    x[0] = float("inf")
    return x

