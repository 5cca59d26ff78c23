"""The optional paths CI requires (``EFCN_REQUIRE``, set by ``make test``) are present here, and
the mechanism turns a missing required path into a failure instead of a skip."""

import importlib.util
from types import SimpleNamespace

import pytest
from conftest import OPTIONAL_PATHS, path_missing, require_or_skip, required_paths


@pytest.mark.parametrize("path", sorted(OPTIONAL_PATHS))
def test_optional_path_is_present(path):
    """Fails for a path EFCN_REQUIRE names that cannot run here; skips (saying why) for the others."""
    missing = path_missing(path)
    if missing:
        require_or_skip(path, f"{path} unavailable: {missing}")


def test_a_missing_required_path_fails_instead_of_skipping(monkeypatch):
    monkeypatch.setenv("EFCN_REQUIRE", "triton, cpu-ext")
    assert required_paths() == {"triton", "cpu-ext"}
    with pytest.raises(pytest.fail.Exception, match="EFCN_REQUIRE names 'triton'.*broken on purpose"):
        require_or_skip("triton", "broken on purpose")
    with pytest.raises(pytest.skip.Exception, match="no headers"):
        require_or_skip("cuda-emulator", "no headers")  # not required: a skip
    monkeypatch.setenv("EFCN_REQUIRE", "triton,cuda-emu")
    with pytest.raises(pytest.UsageError, match=r"unknown path\(s\) \['cuda-emu'\]"):
        required_paths()


def test_presence_checks_see_a_missing_path(monkeypatch, tmp_path):
    """Each check must be able to say "missing": hide what it looks for and ask again."""
    from efcn_sparse import backends, data

    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert "no CUDA headers" in path_missing("cuda-emulator")
    monkeypatch.setattr(data, "SYSTEM_FASHION_MNIST", str(tmp_path / "none"))
    monkeypatch.setattr(data, "_REPO_ROOT", str(tmp_path / "none"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EFCN_DATA_DIR", raising=False)
    assert "no idx files" in path_missing("fashion-mnist")
    tb = backends.kernels("triton")
    monkeypatch.setattr(tb, "triton", None)
    assert "triton could not be imported" in path_missing("triton")
    if importlib.util.find_spec("triton.backends.nvidia") is not None:
        from triton.backends.nvidia import compiler

        monkeypatch.setattr(compiler, "get_ptxas", lambda *arch: SimpleNamespace(path=str(tmp_path / "no-ptxas")))
        assert "no executable ptxas" in path_missing("triton-compiler")
