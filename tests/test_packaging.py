"""Importing works without the extension (one clear warning), and the CLI's demo runs."""

import os
import subprocess
import sys

import pytest


def _run(code, **env):
    return subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_import_without_extension_falls_back_with_one_warning():
    r = _run("import efcn_sparse, efcn_sparse.backends as b; print(b.resolve(None, 'cpu'))", EFCN_NO_EXT="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "reference"
    assert r.stderr.count("compiled extension is not available") == 1, r.stderr
    assert "EFCN_NO_EXT=1" in r.stderr


def test_readme_example_runs():
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    code = readme.split("## Usage")[1].split("```python")[1].split("```")[0]
    r = _run(code)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(os.environ.get("EFCN_NO_EXT") == "1", reason="extension disabled")
def test_cli_demo_prints_equivalence_and_memory():
    r = subprocess.run([sys.executable, "-m", "efcn_sparse", "demo", "--channels", "8", "--size", "6"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "rel. error" in r.stdout and "full" in r.stdout
