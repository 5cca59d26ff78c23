"""Data sets for the relax protocol, read from local files: nothing is downloaded unless asked.

* ``fashion-mnist`` (default): the idx files of the Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist``), a repo-local ``data/fashion-mnist`` (what ``make data``
  extracts without root), or ``--data-dir`` (the idx files themselves, or torchvision's
  ``FashionMNIST/raw`` folder under it).
* ``mnist``, ``cifar10``: torchvision's folder formats (``MNIST/raw``, ``cifar-10-batches-py``)
  under a user-supplied ``data_dir``; ``download=True`` fetches them with torchvision first.
* ``synthetic``: a translation-structured task (a class template pasted at a random position
  into noise), generated from the seed, for fast tests: a CNN's prior fits it, an FCN must learn
  every position.

Every loader returns whole tensors (small enough to hold in memory), normalised per channel.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from dataclasses import asdict, dataclass
from typing import Optional, Tuple

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = ["DATASETS", "DataError", "DataInfo", "load_data", "read_idx", "synthetic", "canonical_name"]

DATASETS = ("fashion-mnist", "mnist", "cifar10", "synthetic")
_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist",
            "cifar-10": "cifar10", "cifar_10": "cifar10", "cifar": "cifar10"}
SYSTEM_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_STATS = {  # per-channel mean and std of the full training sets
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_HOW_TO_GET = {
    "fashion-mnist": ("install the Debian package (`sudo apt-get install dataset-fashion-mnist`, or `make data`, "
                      "which without root extracts it into data/fashion-mnist), or pass --data-dir with the four "
                      "idx files (train-images-idx3-ubyte.gz, ...), or add --download (needs torchvision)"),
    "mnist": ("pass --data-dir with torchvision's layout (DIR/MNIST/raw/*-idx?-ubyte[.gz]) or the four idx files "
              "themselves, or add --download (needs torchvision) to fetch them into --data-dir"),
    "cifar10": ("pass --data-dir holding torchvision's cifar-10-batches-py folder (from "
                "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz), or add --download (needs torchvision)"),
}


class DataError(RuntimeError):
    """A data set that is missing, corrupt, or asked for with bad options."""


@dataclass
class DataInfo:
    """What the model needs to know about a data set, and where it came from."""

    name: str
    in_channels: int
    image_size: int
    num_classes: int
    train_size: int
    test_size: int
    source: str

    @property
    def input_shape(self) -> Tuple[int, int, int]:
        return (self.in_channels, self.image_size, self.image_size)

    def to_dict(self) -> dict:
        return asdict(self)


def canonical_name(name: str) -> str:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise DataError(f"unknown data set {name!r}: expected one of {', '.join(DATASETS)}")
    return key


# ---------------------------------------------------------------------------------------- idx files
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str) -> torch.Tensor:
    """Read an idx file (gzip-compressed or not) into a tensor; a corrupt file raises DataError."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read {path}: {e} (the file is corrupt or truncated: delete it and get it again)") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an idx file (bad magic number {raw[:4].hex()}): delete it and get it again")
    ndim = raw[3]
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise DataError(f"{path}: truncated idx header")
    dims = struct.unpack(f">{ndim}I", raw[4:head])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    need = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - head != need:
        raise DataError(f"{path}: idx header says {dims} ({need} bytes of data), the file holds {len(raw) - head}; "
                        "it is corrupt or truncated: delete it and get it again")
    arr = np.frombuffer(raw, dtype=dtype, count=int(np.prod(dims)), offset=head).reshape(dims)
    return torch.from_numpy(arr.astype(dtype.newbyteorder("="), copy=True))


def _idx_path(folder: str, stem: str) -> Optional[str]:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            return p
    return None


def _idx_folder_ok(folder: str) -> bool:
    return all(_idx_path(folder, stem) for pair in _IDX_FILES.values() for stem in pair)


def _read_idx_split(folder: str, split: str) -> Tuple[torch.Tensor, torch.Tensor]:
    img_stem, lab_stem = _IDX_FILES[split]
    x = read_idx(_idx_path(folder, img_stem))
    y = read_idx(_idx_path(folder, lab_stem))
    if x.dim() != 3 or y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise DataError(f"{folder}: {split} images {tuple(x.shape)} and labels {tuple(y.shape)} do not match")
    return x.unsqueeze(1), y.long()  # [N, 1, H, W] uint8


# ---------------------------------------------------------------------------------------- locating files
def _candidates(name: str, data_dir: Optional[str]) -> list:
    tv = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}[name]
    if data_dir is not None:
        d = os.path.abspath(os.path.expanduser(data_dir))
        return [d, os.path.join(d, name), os.path.join(d, tv, "raw"), os.path.join(d, "usr/share/datasets", name)]
    if name != "fashion-mnist":
        return []
    out = []
    if os.environ.get("EFCN_DATA_DIR"):
        out += _candidates(name, os.environ["EFCN_DATA_DIR"])
    out.append(SYSTEM_FASHION_MNIST)
    for root in dict.fromkeys((os.getcwd(), _REPO_ROOT)):  # repo-local copies (make data without root)
        out += [os.path.join(root, "data", "fashion-mnist"), os.path.join(root, "data/usr/share/datasets/fashion-mnist")]
    return out


def _download(name: str, data_dir: Optional[str]) -> str:
    root = os.path.abspath(os.path.expanduser(data_dir or os.path.join(os.getcwd(), "data")))
    try:
        import torchvision  # noqa: F401  (lazy: only --download needs it)
        from torchvision import datasets as tvd
    except ImportError as e:
        raise DataError(f"--download needs torchvision, which is not installed ({e}); `pip install torchvision`, "
                        f"or get the files yourself: {_HOW_TO_GET[name]}") from e
    cls = {"fashion-mnist": tvd.FashionMNIST, "mnist": tvd.MNIST, "cifar10": tvd.CIFAR10}[name]
    os.makedirs(root, exist_ok=True)
    try:
        for train in (True, False):
            cls(root, train=train, download=True)
    except Exception as e:  # network errors, checksum errors
        raise DataError(f"downloading {name} into {root} failed: {e}") from e
    return root


def _load_idx_dataset(name: str, data_dir: Optional[str]):
    looked = _candidates(name, data_dir)
    if not looked:
        raise DataError(f"{name} needs --data-dir (nothing is downloaded unless --download is given); "
                        f"to get it: {_HOW_TO_GET[name]}")
    for folder in looked:
        if _idx_folder_ok(folder):
            return _read_idx_split(folder, "train"), _read_idx_split(folder, "test"), folder
    where = "\n  ".join(looked)
    raise DataError(f"{name} not found; looked for the four idx files in:\n  {where}\nTo get it: {_HOW_TO_GET[name]}")


def _load_cifar10(data_dir: Optional[str]):
    if data_dir is None:
        raise DataError(f"cifar10 needs --data-dir; to get it: {_HOW_TO_GET['cifar10']}")
    d = os.path.abspath(os.path.expanduser(data_dir))
    folder = next((f for f in (os.path.join(d, "cifar-10-batches-py"), d)
                   if os.path.isfile(os.path.join(f, "test_batch"))), None)
    if folder is None:
        raise DataError(f"cifar10 not found: looked for cifar-10-batches-py/{{data_batch_1..5,test_batch}} in "
                        f"{os.path.join(d, 'cifar-10-batches-py')} and {d}. To get it: {_HOW_TO_GET['cifar10']}")

    def batch(fname):
        p = os.path.join(folder, fname)
        try:
            with open(p, "rb") as f:
                entry = pickle.load(f, encoding="latin1")  # torchvision's format: a pickled dict
            x = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            y = np.asarray(entry.get("labels", entry.get("fine_labels")), dtype=np.int64)
        except FileNotFoundError as e:
            raise DataError(f"cifar10: {p} is missing; to get it: {_HOW_TO_GET['cifar10']}") from e
        except Exception as e:
            raise DataError(f"cifar10: cannot read {p} ({type(e).__name__}: {e}); the file is corrupt: "
                            f"delete the folder and get it again") from e
        if x.shape[0] != y.shape[0]:
            raise DataError(f"cifar10: {p} holds {x.shape[0]} images but {y.shape[0]} labels")
        return torch.from_numpy(x), torch.from_numpy(y)

    tr = [batch(f"data_batch_{i}") for i in range(1, 6)]
    train = (torch.cat([t[0] for t in tr]), torch.cat([t[1] for t in tr]))
    return train, batch("test_batch"), folder


# ---------------------------------------------------------------------------------------- synthetic
def synthetic(n: int, image_size: int = 16, num_classes: int = 4, template_size: int = 5, noise: float = 0.4,
              seed: int = 0, split: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """A translation-structured task: each class has a random template pasted at a random position.

    Templates depend on ``seed`` only; ``split`` selects an independent sample stream (0 train,
    1 test). Returns float images [n, 1, S, S] (unnormalised, roughly unit scale) and labels.
    """
    if image_size < template_size:
        raise DataError(f"synthetic: image_size {image_size} is smaller than the template ({template_size})")
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(num_classes, template_size, template_size, generator=g).sign()
    g = torch.Generator().manual_seed(seed * 1000003 + 7919 * (split + 1))
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = noise * torch.randn(n, 1, image_size, image_size, generator=g)
    span = image_size - template_size + 1
    r = torch.randint(0, span, (n,), generator=g)
    c = torch.randint(0, span, (n,), generator=g)
    t = template_size
    rows = (r[:, None] + torch.arange(t)[None, :])[:, :, None].expand(n, t, t)
    cols = (c[:, None] + torch.arange(t)[None, :])[:, None, :].expand(n, t, t)
    x[torch.arange(n)[:, None, None], 0, rows, cols] += templates[y]
    return x, y


# ---------------------------------------------------------------------------------------- entry point
def _subset(x: torch.Tensor, y: torch.Tensor, size: Optional[int], seed: int, what: str):
    n = x.shape[0]
    if size is None or size == n:
        return x, y
    if size <= 0 or size > n:
        raise DataError(f"{what} size {size} is out of range: the split holds {n} examples")
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).narrow(0, 0, size).sort().values
    return x[idx], y[idx]


def load_data(name: str = "fashion-mnist", data_dir: Optional[str] = None, train_size: Optional[int] = None,
              test_size: Optional[int] = None, download: bool = False, seed: int = 0,
              image_size: Optional[int] = None, num_classes: Optional[int] = None
              ) -> Tuple[TensorDataset, TensorDataset, DataInfo]:
    """Train and test sets as in-memory ``TensorDataset`` (float images [N, C, H, W], int64 labels).

    ``train_size``/``test_size`` take a random subset (fixed by ``seed``; the authors' ``data_size``).
    ``image_size``/``num_classes`` apply to ``synthetic`` only. ``download`` lets torchvision fetch
    a missing data set into ``data_dir`` (default ./data); without it nothing is downloaded.
    """
    name = canonical_name(name)
    if name == "synthetic":
        size = 16 if image_size is None else int(image_size)
        k = 4 if num_classes is None else int(num_classes)
        ntr, nte = train_size or 1000, test_size or 500
        if ntr <= 0 or nte <= 0 or k < 2:
            raise DataError(f"synthetic: sizes must be positive and classes >= 2, got {ntr}, {nte}, {k}")
        xtr, ytr = synthetic(ntr, size, k, seed=seed, split=0)
        xte, yte = synthetic(nte, size, k, seed=seed, split=1)
        info = DataInfo(name, 1, size, k, ntr, nte, f"synthetic(seed={seed})")
        return TensorDataset(xtr, ytr), TensorDataset(xte, yte), info
    if image_size is not None or num_classes is not None:
        raise DataError(f"image_size and num_classes apply to the synthetic data set only, not {name}")
    if download:
        data_dir = _download(name, data_dir)
    if name == "cifar10":
        (xtr, ytr), (xte, yte), source = _load_cifar10(data_dir)
    else:
        (xtr, ytr), (xte, yte), source = _load_idx_dataset(name, data_dir)
    xtr, ytr = _subset(xtr, ytr, train_size, seed, "train")
    xte, yte = _subset(xte, yte, test_size, seed + 1, "test")
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in _STATS[name])
    norm = lambda x: (x.float() / 255.0 - mean) / std  # noqa: E731
    num = int(max(ytr.max().item(), yte.max().item())) + 1
    info = DataInfo(name, xtr.shape[1], xtr.shape[2], max(num, 10), xtr.shape[0], xte.shape[0], source)
    return TensorDataset(norm(xtr), ytr), TensorDataset(norm(xte), yte), info

