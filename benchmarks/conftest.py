"""pytest set-up of the benchmark suite.

``pytest benchmarks/ --benchmark`` runs the full-size suite, timed by pytest-benchmark, and saves
its JSON (every round's timing plus machine, versions and the memory results) to
``benchmarks/results/bench-<date>.json`` unless ``--benchmark-json PATH`` is given;
``python benchmarks/report.py`` turns the newest one into BENCHMARKS.md.

Without ``--benchmark`` the same benchmarks run at tiny sizes with pytest-benchmark disabled:
each benchmarked function runs and is checked against the conv or the reference, so CI's
``pytest tests benchmarks -q`` is a real, quick test. ``--benchmark`` is an exact option name;
pytest-benchmark's own options all start with ``--benchmark-`` and keep working.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

import pytest

from . import benchlib as bl

RESULTS = Path(__file__).resolve().parent / "results"
_SESSION = {}


def pytest_addoption(parser):
    parser.addoption(
        "--benchmark", action="store_true", default=False, dest="efcn_full_benchmark",
        help="efcn_sparse: run benchmarks/ at full size, timed, saving the JSON under benchmarks/results/ "
             "(without it the benchmarks run once each at tiny sizes, as a check)")


def pytest_configure(config):
    config.addinivalue_line("markers", "efcn_run_last: run this benchmark after all others (calibration drift)")
    full = bool(config.getoption("efcn_full_benchmark", False))
    bl.FULL = full
    if full:
        if config.getoption("benchmark_disable", False) and not config.getoption("benchmark_enable", False):
            raise pytest.UsageError("--benchmark times the suite; it cannot be combined with --benchmark-disable")
        if config.getoption("benchmark_json", None) is None:
            RESULTS.mkdir(parents=True, exist_ok=True)
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            config.option.benchmark_json = RESULTS / f"bench-{stamp}.json"
        if config.getoption("benchmark_columns", None) is None:
            config.option.benchmark_columns = ["median", "iqr", "min", "max", "rounds"]
        if config.getoption("benchmark_sort", "min") == "min":
            config.option.benchmark_sort = "name"
    elif not config.getoption("benchmark_enable", False):
        config.option.benchmark_disable = True  # smoke: run each benchmarked function once


def pytest_collection_modifyitems(session, config, items):
    """Calibrations marked 'end' run last, so the report can show drift over the run."""
    late = [it for it in items if it.get_closest_marker("efcn_run_last")]
    if late:
        items[:] = [it for it in items if it not in late] + late


def pytest_runtest_logreport(report):
    """Keep why each benchmark was skipped (an anchor that does not fit, ...) for the report."""
    if report.skipped and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        bl.RECORDS.setdefault("skipped", {})[report.nodeid.split("::")[-1]] = reason.replace("Skipped: ", "")


def pytest_sessionstart(session):
    _SESSION["t0"] = time.time()
    _SESSION["load_start"] = os.getloadavg()


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + (" (uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def session_info() -> dict:
    """Machine, versions, date, backends and load: what the report prints above the tables."""
    import torch

    import efcn_sparse
    from efcn_sparse import backends

    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        mem = None
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_bytes": mem,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {d: _version(d) for d in ("torch", "numpy", "scipy", "triton", "pytest", "pytest-benchmark")},
        "efcn_sparse": getattr(efcn_sparse, "__version__", "?"),
        "git": _git(),
        "device": str(bl.DEVICE),
        "cuda_device": torch.cuda.get_device_name() if bl.DEVICE.type == "cuda" else None,
        "backends_available": efcn_sparse.available_backends(bl.DEVICE),
        "backends_benchmarked": bl.backends_to_run(),
        "backends_unavailable": {b: backends.unavailable_reason(b, bl.DEVICE) for b in backends.BACKENDS
                                 if backends.unavailable_reason(b, bl.DEVICE)},
        "full": bl.FULL,
    }


def pytest_benchmark_update_json(config, benchmarks, output_json):
    info = session_info()
    info.update(load_start=_SESSION.get("load_start"), load_end=os.getloadavg(),
                wall_s=time.time() - _SESSION.get("t0", time.time()))
    output_json["efcn"] = {"session": info, "records": bl.RECORDS}
