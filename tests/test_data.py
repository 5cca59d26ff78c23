"""Data loading: idx and CIFAR folder formats from fake files, clear errors for missing or corrupt
data (saying where it looked and how to get it), subsets, the synthetic task, no silent downloads."""

import gzip
import os
import pickle
import struct
import sys

import numpy as np
import pytest
import torch

from conftest import require_or_skip
from efcn_sparse import data as D
from efcn_sparse.data import DataError, load_data, read_idx

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _idx_bytes(arr: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def _write_idx_set(folder, n_train=30, n_test=12, size=28, compress=True, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    arrays = [rng.integers(0, 256, (n_train, size, size), dtype=np.uint8), np.arange(n_train, dtype=np.uint8) % 10,
              rng.integers(0, 256, (n_test, size, size), dtype=np.uint8), np.arange(n_test, dtype=np.uint8) % 10]
    for name, arr in zip(IDX_NAMES, arrays):
        raw = _idx_bytes(arr)
        if compress:
            with gzip.open(os.path.join(folder, name + ".gz"), "wb") as f:
                f.write(raw)
        else:
            with open(os.path.join(folder, name), "wb") as f:
                f.write(raw)
    return arrays


@pytest.fixture
def no_system_data(monkeypatch, tmp_path):
    """Hide the Debian package and repo-local copies, so only what a test provides is found."""
    monkeypatch.setattr(D, "SYSTEM_FASHION_MNIST", str(tmp_path / "no-system"))
    monkeypatch.setattr(D, "_REPO_ROOT", str(tmp_path / "no-repo"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EFCN_DATA_DIR", raising=False)


def test_read_idx_roundtrip_and_corruption(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    p = tmp_path / "x-idx3-ubyte"
    p.write_bytes(_idx_bytes(arr))
    assert torch.equal(read_idx(str(p)), torch.from_numpy(arr))
    g = tmp_path / "x.gz"
    g.write_bytes(gzip.compress(_idx_bytes(arr)))
    assert torch.equal(read_idx(str(g)), torch.from_numpy(arr))
    p.write_bytes(_idx_bytes(arr)[:-5])
    with pytest.raises(DataError, match="truncated"):
        read_idx(str(p))
    p.write_bytes(b"\x12\x34\x56\x78" + b"\0" * 20)
    with pytest.raises(DataError, match="magic"):
        read_idx(str(p))
    g.write_bytes(gzip.compress(_idx_bytes(arr))[:-12])
    with pytest.raises(DataError, match="corrupt|truncated"):
        read_idx(str(g))


@pytest.mark.parametrize("layout", ["flat", "torchvision", "debian"])
def test_fashion_mnist_from_data_dir(tmp_path, layout):
    sub = {"flat": "", "torchvision": "FashionMNIST/raw", "debian": "usr/share/datasets/fashion-mnist"}[layout]
    arrays = _write_idx_set(str(tmp_path / sub), compress=layout != "flat")
    tr, te, info = load_data("fashion-mnist", data_dir=str(tmp_path))
    assert info.input_shape == (1, 28, 28) and info.num_classes == 10 and (info.train_size, info.test_size) == (30, 12)
    x, y = tr.tensors
    assert x.dtype == torch.float32 and x.shape == (30, 1, 28, 28) and y.dtype == torch.int64
    expect = (torch.from_numpy(arrays[0]).float() / 255 - 0.2860) / 0.3530
    assert torch.allclose(x[:, 0], expect)
    assert torch.equal(te.tensors[1], torch.from_numpy(arrays[3]).long())


def test_subsets_are_seeded_and_checked(tmp_path):
    _write_idx_set(str(tmp_path))
    a = load_data("fmnist", data_dir=str(tmp_path), train_size=10, test_size=5, seed=3)
    b = load_data("Fashion_MNIST", data_dir=str(tmp_path), train_size=10, test_size=5, seed=3)
    c = load_data("fashion-mnist", data_dir=str(tmp_path), train_size=10, test_size=5, seed=4)
    assert torch.equal(a[0].tensors[0], b[0].tensors[0]) and not torch.equal(a[0].tensors[0], c[0].tensors[0])
    assert a[2].train_size == 10 and a[2].test_size == 5
    with pytest.raises(DataError, match="out of range"):
        load_data("fashion-mnist", data_dir=str(tmp_path), train_size=31)


def test_missing_fashion_mnist_says_where_and_how(no_system_data, tmp_path):
    with pytest.raises(DataError) as e:
        load_data("fashion-mnist")
    msg = str(e.value)
    assert str(tmp_path / "no-system") in msg and "data/fashion-mnist" in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "--data-dir" in msg
    with pytest.raises(DataError, match=str(tmp_path / "empty")):
        load_data("fashion-mnist", data_dir=str(tmp_path / "empty"))


def test_repo_local_copy_is_found(no_system_data, tmp_path):
    _write_idx_set(str(tmp_path / "data" / "fashion-mnist"))  # what `make data` extracts without root
    _, _, info = load_data("fashion-mnist")
    assert info.source == str(tmp_path / "data" / "fashion-mnist")


def test_corrupt_fashion_mnist(tmp_path):
    _write_idx_set(str(tmp_path))
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        load_data("fashion-mnist", data_dir=str(tmp_path))


def test_mnist_needs_a_data_dir(no_system_data, tmp_path):
    with pytest.raises(DataError, match="mnist needs --data-dir"):
        load_data("mnist")
    _write_idx_set(str(tmp_path / "mnist-root" / "MNIST" / "raw"))
    _, _, info = load_data("mnist", data_dir=str(tmp_path / "mnist-root"))
    assert info.name == "mnist" and info.train_size == 30


def _write_cifar(folder, n=6):
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(range(n))}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(entry, f)


def test_cifar10_folder_format(tmp_path):
    _write_cifar(str(tmp_path / "cifar-10-batches-py"))
    tr, te, info = load_data("cifar-10", data_dir=str(tmp_path), train_size=20)
    assert info.input_shape == (3, 32, 32) and tr.tensors[0].shape == (20, 3, 32, 32) and te.tensors[0].shape[0] == 6
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        f.write(b"\x80\x04garbage")
    with pytest.raises(DataError, match="data_batch_3.*corrupt"):
        load_data("cifar10", data_dir=str(tmp_path))
    with pytest.raises(DataError, match="cifar10 needs --data-dir"):
        load_data("cifar10")
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_data("cifar10", data_dir=str(tmp_path / "nothing"))


def test_download_needs_torchvision(no_system_data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import fails
    with pytest.raises(DataError, match="--download needs torchvision"):
        load_data("fashion-mnist", data_dir=str(tmp_path), download=True)


def test_never_downloads_without_asking(no_system_data, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("download attempted")

    monkeypatch.setattr(D, "_download", boom)
    with pytest.raises(DataError):
        load_data("mnist")


def test_synthetic_task():
    tr, te, info = load_data("synthetic", train_size=64, test_size=32, image_size=12, seed=5)
    assert info.input_shape == (1, 12, 12) and info.num_classes == 4
    x, y = tr.tensors
    assert x.shape == (64, 1, 12, 12) and int(y.min()) >= 0 and int(y.max()) < 4
    again = load_data("synthetic", train_size=64, test_size=32, image_size=12, seed=5)[0].tensors[0]
    assert torch.equal(x, again)
    assert not torch.equal(x[:32], te.tensors[0])  # train and test are independent draws
    # the label is carried by a class template at a random position: the clean image correlates with it
    clean, labels = D.synthetic(8, 12, 4, noise=0.0, seed=5)
    assert set(torch.unique(clean).tolist()) <= {-1.0, 0.0, 1.0} and (clean != 0).flatten(1).sum(1).eq(25).all()
    with pytest.raises(DataError, match="smaller than the template"):
        load_data("synthetic", image_size=3)
    with pytest.raises(DataError, match="synthetic data set only"):
        load_data("mnist", image_size=12)
    with pytest.raises(DataError, match="unknown data set"):
        load_data("imagenet")


def test_installed_fashion_mnist():
    """The real data set where `make data` puts it (the Debian package, or data/fashion-mnist)."""
    try:
        tr, te, info = load_data("fashion-mnist", train_size=100, test_size=50)
    except DataError as e:
        require_or_skip("fashion-mnist", f"Fashion-MNIST not installed: {str(e).splitlines()[0]}")
    assert os.path.isdir(info.source), info.source
    assert tr.tensors[0].shape == (100, 1, 28, 28) and te.tensors[0].shape == (50, 1, 28, 28)
    assert abs(float(tr.tensors[0].mean())) < 0.3
