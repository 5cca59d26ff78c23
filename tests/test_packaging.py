"""Importing works without the extension (one clear warning), and the CLI's demo runs."""

import os
import subprocess
import sys

import pytest
from test_cli import demo_errors


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
    errors = demo_errors(r.stdout)
    assert all(e < 1e-5 for e in errors.values()), errors


# A finder that makes one module of ours fail to import as a planted bug would (a typo such as
# `@triton.jitt` raises AttributeError at import), or hides triton as an uninstalled one would.
_BREAK = """
import sys, importlib.abc
class Broken(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == {name!r}:
            raise {exc}
sys.meta_path.insert(0, Broken())
"""


def test_a_bug_in_the_triton_kernels_fails_loudly_instead_of_hiding_as_unavailable():
    code = _BREAK.format(name="efcn_sparse.kernels.triton_bsr_kernels",
                         exc="AttributeError(\"module 'triton' has no attribute 'jitt'\")") + (
        "import efcn_sparse\n"
        "try:\n    efcn_sparse.available_backends('cpu')\nexcept AttributeError as e:\n    print('raised:', e)\n"
        "else:\n    print('hidden')\n")
    r = _run(code, TRITON_INTERPRET="1")
    assert r.returncode == 0, r.stderr
    assert "raised: module 'triton' has no attribute 'jitt'" in r.stdout, r.stdout


def test_without_triton_the_backend_is_unavailable_and_says_why():
    code = "import sys; sys.modules['triton'] = None\n" + (
        "import efcn_sparse, efcn_sparse.backends as b\n"
        "print(b.available_backends('cpu')); print(b.unavailable_reason('triton', 'cpu'))\n")
    r = _run(code, TRITON_INTERPRET="1")
    assert r.returncode == 0, r.stderr
    assert "'triton'" not in r.stdout.splitlines()[0] and "triton could not be imported (ModuleNotFoundError" in r.stdout
