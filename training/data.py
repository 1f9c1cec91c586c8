"""Datasets as in-memory uint8 tensors, with augmentation; the model's input spec normalises.

Every dataset is small enough to hold in memory (CIFAR-10's 50,000 training images are
150 MB as uint8), which makes batches a tensor gather instead of a DataLoader of PIL images:
that is most of the per-epoch overhead for models this small.

* ``mnist``: IDX files (gzipped or not) under ``--data-dir``/MNIST/raw, else torchvision
  (``--download`` to fetch).
* ``svhn``, ``cifar10``: torchvision, from ``--data-dir`` (``--download`` to fetch).
* ``fashion-mnist``: torchvision's layout under ``--data-dir`` or plain IDX files there, else
  Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``).
* ``synthetic``: class-conditional random patterns of any shape, for smoke tests only.
"""

from __future__ import annotations

import gzip
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
CIFAR_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip
DIGITS = [str(i) for i in range(10)]

# name -> (C, H, W), class names
DATASETS: dict[str, tuple[tuple[int, int, int], list[str]]] = {
    "mnist": ((1, 28, 28), DIGITS),
    "fashion-mnist": ((1, 28, 28), FASHION_CLASSES),
    "svhn": ((3, 32, 32), DIGITS),
    "cifar10": ((3, 32, 32), CIFAR_CLASSES),
}
ALIASES = {"fmnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "cifar": "cifar10"}


class DataError(Exception):
    """A dataset that cannot be found or read; the message says what to pass."""


@dataclass
class Data:
    """A dataset held as uint8 images ``(N, C, H, W)`` and int64 labels ``(N,)``."""

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    class_names: list[str]
    source: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the training split, on the [0, 1] scale."""
        x = self.train_x.transpose(0, 1).flatten(1).double() / 255.0  # (C, N·H·W)
        return x.mean(1).tolist(), x.std(1).tolist()


def canonical_name(name: str) -> str:
    key = name.lower()
    key = ALIASES.get(key, key)
    if key not in DATASETS and key != "synthetic":
        raise DataError(
            f"unknown dataset {name!r}; choose from {', '.join([*DATASETS, 'synthetic'])}"
        )
    return key


# ---- IDX (Fashion-MNIST offline) ----------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        # zlib.error (not an OSError) is a gzip stream damaged inside its compressed data.
        raise DataError(f"cannot read {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(raw) - offset != math.prod(dims):  # exact: np.prod wraps at 2**63
        raise DataError(f"{path} is truncated: header says {dims}, file has {len(raw)} bytes")
    return np.frombuffer(raw, np.uint8, offset=offset).reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


# Folders under --data-dir searched for the IDX files of the datasets read without
# torchvision. torchvision's MNIST finds only unpacked files (``…-ubyte``) and, offline, answers
# the ``.gz`` files that its own layout names with "Dataset not found".
_IDX_FOLDERS = {
    "fashion-mnist": ("FashionMNIST/raw", "fashion-mnist", "."),
    "mnist": ("MNIST/raw",),
}


def _idx_folder_candidates(name: str, data_dir: Path | None) -> list[Path]:
    # A folder the user names is the only place looked: falling back to Debian's copy would
    # train on other data than the one asked for.
    if data_dir is not None:
        return [data_dir / sub for sub in _IDX_FOLDERS[name]]
    return [DEBIAN_FASHION_MNIST] if name == "fashion-mnist" else []


def check_data(data: Data) -> Data:
    """Refuse a dataset whose files disagree with each other or with what it is.

    Images must be ``(N, C, H, W)`` with the dataset's ``(C, H, W)`` (:data:`DATASETS`) in both
    splits, at least one image in each, labels ``(N,)`` with one per image and each in
    ``[0, classes)``. A label out of
    range fails only when a batch draws it (the cross-entropy's index error, mid-run or at
    the end-of-epoch evaluation); a shorter label file pairs the wrong labels with images;
    images of another size build a model the served dataset cannot feed.

    Raises:
        DataError: one line naming the split and what is wrong.
    """
    want = DATASETS[data.name][0] if data.name in DATASETS else data.shape
    classes = len(data.class_names)
    for split, x, y in (("training", data.train_x, data.train_y),
                        ("test", data.test_x, data.test_y)):  # fmt: skip
        where = f"{data.name} from {data.source}, {split} split"
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(want):
            got = "x".join(map(str, x.shape[1:])) if x.ndim == 4 else f"{x.ndim - 1}-d"
            raise DataError(
                f"{where}: images are {got}, {data.name} has {'x'.join(map(str, want))}"
            )
        if len(x) == 0:
            # An empty test split was met only by the end-of-epoch evaluation, after a
            # whole epoch of training ("evaluation set is empty").
            raise DataError(f"{where}: holds no images")
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(
                f"{where}: {len(x):,} images but labels of shape {list(y.shape)} (one per image)"
            )
        if len(y) and not (int(y.min()) >= 0 and int(y.max()) < classes):
            bad = int(y.max()) if int(y.max()) >= classes else int(y.min())
            raise DataError(f"{where}: label {bad} is outside 0..{classes - 1}")
    return data


def _load_idx(name: str, data_dir: Path | None) -> Data | None:
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]  # fmt: skip
    for folder in _idx_folder_candidates(name, data_dir):
        files = [_find_idx(folder, s) for s in stems]
        if all(files):
            xtr, ytr, xte, yte = (read_idx(f) for f in files)
            for f, a, ndim in zip(files, (xtr, ytr, xte, yte), (3, 1, 3, 1), strict=True):
                if a.ndim != ndim:
                    what = "images (N, H, W)" if ndim == 3 else "labels (N,)"
                    raise DataError(f"{f} holds a {a.ndim}-d array, not {what}")
            return Data(
                name,
                torch.from_numpy(xtr.copy()).unsqueeze(1),
                torch.from_numpy(ytr.astype(np.int64)),
                torch.from_numpy(xte.copy()).unsqueeze(1),
                torch.from_numpy(yte.astype(np.int64)),
                DATASETS[name][1],
                str(folder),
            )
    return None


# ---- torchvision --------------------------------------------------------------------------

_LAYOUT = {
    "mnist": "DIR/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]",
    "fashion-mnist": "DIR/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]",
    "svhn": "DIR/train_32x32.mat and DIR/test_32x32.mat",
    "cifar10": "DIR/cifar-10-batches-py/{data_batch_1..5,test_batch}",
}


def _torchvision(name: str, data_dir: Path, download: bool) -> Data:
    from torchvision import datasets

    root = str(data_dir)
    if name == "svhn":
        tr = datasets.SVHN(root, split="train", download=download)
        te = datasets.SVHN(root, split="test", download=download)
        xtr, ytr, xte, yte = tr.data, tr.labels, te.data, te.labels  # already (N, 3, 32, 32)
    else:
        cls = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST,
               "cifar10": datasets.CIFAR10}[name]  # fmt: skip
        tr, te = cls(root, train=True, download=download), cls(root, train=False, download=download)
        xtr, ytr, xte, yte = tr.data, tr.targets, te.data, te.targets

    def images(a) -> Tensor:
        t = torch.as_tensor(np.asarray(a), dtype=torch.uint8)
        if t.ndim == 3:
            return t.unsqueeze(1)
        return t.permute(0, 3, 1, 2).contiguous() if t.shape[-1] == 3 else t

    def labels(a) -> Tensor:
        return torch.as_tensor(np.asarray(a), dtype=torch.int64)

    return Data(name, images(xtr), labels(ytr), images(xte), labels(yte), DATASETS[name][1], root)


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    download: bool = False,
    shape: tuple[int, int, int] = (1, 28, 28),
    synthetic_size: int = 2048,
    seed: int = 0,
) -> Data:
    """Load ``name`` fully into memory.

    Args:
        name: ``mnist``, ``fashion-mnist`` (``fmnist``), ``svhn``, ``cifar10`` or ``synthetic``.
        data_dir: torchvision root (``--data-dir``), an existing folder unless ``download``;
            without it Fashion-MNIST comes from Debian's package.
        download: let torchvision fetch missing files (needs the internet).
        shape, synthetic_size, seed: for ``synthetic`` only (test split is a quarter the size).

    Raises:
        DataError: unknown name, ``data_dir`` empty or not a folder, files missing /
            unreadable, with what to pass instead, or files that disagree (:func:`check_data`).
    """
    name = canonical_name(name)
    if name == "synthetic":
        try:
            return synthetic(shape, synthetic_size, max(synthetic_size // 4, 1), seed=seed)
        except (MemoryError, RuntimeError) as e:  # torch's allocator raises RuntimeError
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(
                f"--synthetic-size {synthetic_size:,} does not fit in memory ({first[:120]})"
            ) from None
    if data_dir is not None and not str(data_dir).strip():
        raise DataError("--data-dir is empty: name a folder, or leave the flag out")
    root = Path(data_dir).expanduser() if data_dir is not None else None
    if root is not None and not download and not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DataError(f"--data-dir {root} {what} (--download creates it and fetches {name})")
    if name in _IDX_FOLDERS and not download:
        found = _load_idx(name, root)
        if found is not None:
            return check_data(found)
    if root is None and not download:
        hint = (
            f" or install the Debian package dataset-fashion-mnist ({DEBIAN_FASHION_MNIST})"
            if name == "fashion-mnist"
            else ""
        )
        raise DataError(
            f"dataset {name!r} not found: pass --data-dir DIR holding {_LAYOUT[name]}, "
            f"or --download to fetch it{hint}"
        )
    root = root or Path("data")
    try:
        data = _torchvision(name, root, download)
    except Exception as e:  # torchvision raises RuntimeError, URLError, OSError, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        what = "download failed" if download else "not found"
        raise DataError(
            f"dataset {name!r} {what} under {root} ({first}); expected {_LAYOUT[name]}"
            + ("" if download else ", or pass --download to fetch it")
        ) from None
    return check_data(data)


def synthetic(
    shape: tuple[int, int, int], n_train: int, n_test: int, *, classes: int = 10, seed: int = 0
) -> Data:
    """Class-conditional smooth patterns plus noise: learnable, deterministic, any shape."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    coarse = torch.rand(classes, c, max(h // 4, 1), max(w // 4, 1), generator=g)
    protos = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear")

    def draw(n: int) -> tuple[Tensor, Tensor]:
        y = torch.randint(classes, (n,), generator=g)
        x = 0.45 * protos[y] + 0.55 * torch.rand(n, c, h, w, generator=g)
        return (x * 255).round().clamp(0, 255).to(torch.uint8), y

    xtr, ytr = draw(n_train)
    xte, yte = draw(n_test)
    names = [f"class{i}" for i in range(classes)]
    return Data("synthetic", xtr, ytr, xte, yte, names, f"synthetic(seed={seed})")


# ---- augmentation ---------------------------------------------------------------------------


def augment(
    x: Tensor,
    generator: torch.Generator,
    *,
    positions: Tensor | None = None,
    global_batch: int | None = None,
    pad: int = 4,
) -> Tensor:
    """Random crop with zero padding ``pad`` and random horizontal flip, per sample.

    The random draws are made for the whole global batch and each process takes its
    ``positions``, so a sharded batch is augmented exactly as the unsharded one.

    Args:
        x: uint8 ``(b, C, H, W)`` on the CPU.
        generator: CPU generator, seeded per step by the caller.
        positions: ``(b,)`` positions of ``x``'s rows in the global batch (default: all).
        global_batch: size of the global batch (default: ``b``).
    """
    b, _, h, w = x.shape
    n = global_batch or b
    pick = positions if positions is not None else torch.arange(b)
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)[pick]
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator)[pick]
    flip = (torch.rand(n, generator=generator) < 0.5)[pick]
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = (oy[:, None] + torch.arange(h))[:, :, None]  # (b, H, 1)
    cols = ox[:, None] + torch.arange(w)  # (b, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, :]  # (b, 1, W)
    out = padded[torch.arange(b)[:, None, None], :, rows, cols]  # (b, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()
