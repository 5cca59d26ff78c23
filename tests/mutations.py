"""Mutation spot-checks: plant each known kind of bug in a temporary copy of the repository and
check that the tests fail. Not part of ``make test`` (a few minutes); see TESTING.md.

    python tests/mutations.py              # every mutant, each against the test files that guard it
    python tests/mutations.py NAME ...     # some of them (names: --list)
    python tests/mutations.py --full       # each mutant against the whole suite (tests benchmarks)
    python tests/mutations.py --all NAME   # list every failing test, not only the first (no -x)

First the unmutated copy must pass the same tests (else a failure proves nothing). A mutant is
"caught" when pytest then exits with failures (1) or a collection error (2); "MISSED" when the
tests still pass; "stale" when its pattern no longer occurs in the source (update it here).
``EFCN_REQUIRE`` is set as ``make test`` sets it, unless already in the environment.
Exit status 0 only when every mutant is caught.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parent.parent
REQUIRE = "triton,triton-compiler,cpu-ext,cuda-emulator,fashion-mnist"  # as the Makefile's REQUIRE


@dataclass
class Mutant:
    name: str
    what: str
    edits: List[Tuple[str, str, str]]  # (file, old text, new text): old must occur exactly once
    tests: List[str]
    env: Dict[str, str] = field(default_factory=dict)


MUTANTS = [
    Mutant("triton-jit-typo", "a one-character typo in the Triton kernels (@triton.jitt)",
           [("efcn_sparse/kernels/triton_bsr_kernels.py", "@triton.jit\ndef bsr_forward_kernel",
             "@triton.jitt\ndef bsr_forward_kernel")],
           ["tests/test_triton_backend.py", "tests/test_required_paths.py"]),
    Mutant("grad-weight-mask-by-multiply", "reference grad_weight masks by multiplying: NaN * 0 leaks NaN",
           [("efcn_sparse/kernels/reference.py",
             "out = torch.where(mask_patterns[mask_ids[s:e].long()], out, out.new_zeros(()))",
             "out = out * mask_patterns[mask_ids[s:e].long()]")],
           ["tests/test_ops.py", "tests/test_module.py", "tests/test_embedding.py"]),
    Mutant("masked-grad-7", "reference grad_weight writes 7 at masked entries (hidden by to_dense)",
           [("efcn_sparse/kernels/reference.py", "out, out.new_zeros(())", "out, out.new_full((), 7.0)")],
           ["tests/test_ops.py", "tests/test_conv_embedding.py", "tests/test_embedding.py"]),
    Mutant("masked-values-7", "SparseEFCN stores 7 at masked entries (hidden by to_dense)",
           [("efcn_sparse/module.py", "values = layout.apply_mask(values.detach().to(device=layout.device)).clone()",
             "values = (values.detach().to(device=layout.device) + 7 * (~layout.block_mask()).to(values.dtype)).clone()"),
            ("efcn_sparse/module.py", "return layout.apply_mask(vals.to(layout.device))",
             "return vals.to(layout.device) + 7 * (~layout.block_mask()).to(dtype)")],
           ["tests/test_examples.py", "tests/test_embedding.py", "tests/test_conv_embedding.py"]),
    Mutant("ptxas-error", "the Triton compile for sm_90 fails with a message naming ptxas",
           [("efcn_sparse/kernels/triton_aot.py", "    import triton\n    from triton.backends.compiler import GPUTarget",
             "    raise RuntimeError('ptxas fatal: planted failure')\n    import triton\n"
             "    from triton.backends.compiler import GPUTarget")],
           ["tests/test_triton_backend.py::test_kernels_compile_for_sm90"]),
    Mutant("triton-ops-unregistered", "the triton_op registration silently falls back to plain functions",
           [("efcn_sparse/kernels/triton_bsr.py", 'if not (hasattr(lib, "triton_op") and hasattr(lib, "wrap_triton")):',
             "if True:")],
           ["tests/test_triton_backend.py::test_registered_ops_opcheck"]),
    Mutant("no-cuda-headers", "CUDA headers missing: the CUDA emulator cannot build",
           [], ["tests/test_cuda_backend.py::test_emulated_glue_checks_preconditions", "tests/test_required_paths.py"],
           env={"CUDA_HOME": "/nonexistent-cuda"}),
    Mutant("demo-constant-error", "the CLI demo prints a constant instead of the measured error",
           [("efcn_sparse/cli.py", "err = ((y - ref).abs().max() / ref.abs().max()).item()", "err = 1e-8")],
           ["tests/test_cli.py", "tests/test_packaging.py"]),
    Mutant("tune-records-slowest", "tune records the slowest backend per op",
           [("efcn_sparse/backends.py", "best[op] = min(times, key=times.get)", "best[op] = max(times, key=times.get)")],
           ["tests/test_cuda_backend.py::test_tune_records_the_fastest_per_op_and_auto_then_runs_it"]),
    Mutant("projection-bias-not-averaged", "project() keeps the bias instead of its per-channel mean",
           [("efcn_sparse/subspace.py", "reshape(-1, mp.Cout).mean(0).repeat(", "reshape(-1, mp.Cout)[0].repeat(")],
           ["tests/test_subspace.py"]),
]


def copy_repo(dest: Path) -> None:
    """The tracked files (as in the working tree) plus the built extension."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.decode()
    for rel in filter(None, files.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    for so in (ROOT / "efcn_sparse").glob("_C*.so"):
        shutil.copy2(so, dest / "efcn_sparse" / so.name)


def apply(dest: Path, m: Mutant) -> str:
    """Plant the mutant's edits; '' when done, else why not (stale pattern)."""
    for rel, old, new in m.edits:
        p = dest / rel
        text = p.read_text()
        if text.count(old) != 1:
            return f"{rel}: pattern found {text.count(old)} times, expected once: {old!r}"
        p.write_text(text.replace(old, new))
    return ""


def run_tests(dest: Path, tests: List[str], env: Dict[str, str], log: Path, first_only: bool = True) -> int:
    full_env = {**os.environ, "EFCN_REQUIRE": os.environ.get("EFCN_REQUIRE", REQUIRE), "PYTHONDONTWRITEBYTECODE": "1",
                "PYTHONPATH": os.pathsep.join([str(dest), os.environ.get("PYTHONPATH", "")]), **env}
    check = subprocess.run([sys.executable, "-c", "import efcn_sparse; print(efcn_sparse.__file__)"], cwd=dest,
                           env=full_env, capture_output=True, text=True)
    if not check.stdout.startswith(str(dest)):
        raise SystemExit(f"the copy is not the package imported: {check.stdout or check.stderr}")
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(["-x"] if first_only else []),
                            *tests], cwd=dest,
                           env=full_env, stdout=f, stderr=subprocess.STDOUT)
    return r.returncode


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help="mutants to run (default: all)")
    p.add_argument("--full", action="store_true", help="run the whole suite (tests benchmarks) for each mutant")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--keep", action="store_true", help="keep the temporary copies and logs")
    p.add_argument("--all", action="store_true", help="run every test and list each failure (no -x)")
    args = p.parse_args(argv)
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:32s} {m.what}")
        return 0
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        p.error(f"unknown mutant(s) {sorted(unknown)}; see --list")
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    tests_of = (lambda m: ["tests", "benchmarks"]) if args.full else (lambda m: m.tests)
    work = Path(tempfile.mkdtemp(prefix="efcn-mutants-"))
    try:
        base = work / "baseline"
        copy_repo(base)
        baseline_tests = sorted({t for m in chosen for t in tests_of(m)})
        t0 = time.time()
        rc = run_tests(base, baseline_tests, {}, work / "baseline.log")
        print(f"baseline (unmutated): rc={rc} in {time.time() - t0:.0f}s")
        if rc != 0:
            print((work / "baseline.log").read_text()[-3000:])
            print("the unmutated copy fails these tests: fix that first")
            return 1
        results = {}
        for m in chosen:
            dest = work / m.name
            copy_repo(dest)
            stale = apply(dest, m)
            if stale:
                results[m.name] = f"stale ({stale})"
            else:
                t0 = time.time()
                rc = run_tests(dest, tests_of(m), m.env, work / f"{m.name}.log", not args.all)
                verdict = "caught" if rc in (1, 2) else ("MISSED" if rc == 0 else f"error (pytest exit {rc})")
                failed = [ln.split(" - ")[0] for ln in (work / f"{m.name}.log").read_text().splitlines()
                          if ln.startswith(("FAILED", "ERROR"))]
                results[m.name] = f"{verdict} in {time.time() - t0:.0f}s" + (
                    ("".join(f"\n    {f}" for f in failed) if args.all else f": {failed[0]}") if failed else "")
            if not args.keep:
                shutil.rmtree(dest, ignore_errors=True)
            print(f"{m.name:32s} {results[m.name]}", flush=True)
        return 0 if all(r.startswith("caught") for r in results.values()) else 1
    finally:
        if args.keep:
            print(f"copies and logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
