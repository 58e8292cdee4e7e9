"""Offline datasets: scikit-learn digits (embedded) and Fashion-MNIST from IDX files.

Nothing here downloads. Fashion-MNIST is read from gzip'd (or plain) IDX files, by default those of the
Debian package ``dataset-fashion-mnist`` under ``/usr/share/datasets/fashion-mnist``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from client import data as client_data

DATASET_NAMES = ("digits", "fashion-mnist")
FASHION_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_ENV = "FEDPRIV_FASHION_DIR"
FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
HOW_TO_GET_FASHION = (
    "install the Debian package (as root: apt-get install dataset-fashion-mnist) or set data-dir "
    f"(or ${FASHION_ENV}) to a directory holding {', '.join(f + '.gz' for f in FASHION_FILES.values())}"
)
# Facts of the image datasets, so configuration checks need not load the data (tests/simulations/test_datasets.py
# checks them against the loaded data).
TRAIN_SIZES = {"digits": None, "fashion-mnist": 60_000}
NUM_CLASSES = {"digits": 10, "fashion-mnist": 10}
IMAGE_SIZES = {"digits": 8, "fashion-mnist": 28}  # S of the (N, 1, S, S) images
DIGITS_TOTAL = 1797


class DataError(Exception):
    """A dataset is missing or malformed; the message says how to fix it."""


@dataclass(frozen=True)
class ImageDataset:
    """Train and held-out test images, float32 in [0, 1], shaped (N, 1, S, S)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[-1])


def digits_train_size(test_fraction: float) -> int:
    """Number of digits training samples for a given held-out fraction (matches the split below)."""
    return DIGITS_TOTAL - _num_test(DIGITS_TOTAL, test_fraction)


def _num_test(total: int, test_fraction: float) -> int:
    return int(np.ceil(total * test_fraction))


@lru_cache(maxsize=4)
def load_digits(test_fraction: float = 0.2) -> ImageDataset:
    """scikit-learn's 8×8 digits with a fixed stratified held-out test split.

    The split uses a fixed seed (not the experiment seed) so every run is evaluated on the same test set.
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]  # (1797, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=_num_test(len(y), test_fraction), stratify=y, random_state=0
    )
    return ImageDataset("digits", x_tr, y_tr, x_te, y_te, num_classes=10)


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (gzip'd or plain) into a numpy array of its declared shape; raises :class:`DataError`."""
    try:
        return client_data.read_idx(path)
    except client_data.IdxError as exc:
        raise DataError(str(exc)) from None


def fashion_dir(data_dir: str = "") -> Path:
    """The directory to read Fashion-MNIST from: config value, then $FEDPRIV_FASHION_DIR, then Debian's."""
    return Path(data_dir or os.environ.get(FASHION_ENV, "") or FASHION_DEFAULT_DIR)


def missing_fashion_files(data_dir: str = "") -> list[str]:
    """Names of the Fashion-MNIST files absent from :func:`fashion_dir` (empty when all are there)."""
    root = fashion_dir(data_dir)
    return [
        name
        for name in FASHION_FILES.values()
        if not (root / f"{name}.gz").is_file() and not (root / name).is_file()
    ]


@lru_cache(maxsize=2)
def load_fashion_mnist(data_dir: str = "") -> ImageDataset:
    """Fashion-MNIST (60k train / 10k test, 28×28) from IDX files; raises :class:`DataError` if missing."""
    root = fashion_dir(data_dir)
    missing = missing_fashion_files(data_dir)
    if missing:
        raise DataError(f"Fashion-MNIST not found in {root} (missing {', '.join(missing)}): {HOW_TO_GET_FASHION}")

    def read(key: str) -> np.ndarray:
        name = FASHION_FILES[key]
        path = root / f"{name}.gz"
        return read_idx(path if path.is_file() else root / name)

    x_tr, y_tr = read("train_images"), read("train_labels")
    x_te, y_te = read("test_images"), read("test_labels")
    if len(x_tr) != len(y_tr) or len(x_te) != len(y_te):
        raise DataError(f"Fashion-MNIST in {root}: image and label counts differ")

    def images(a: np.ndarray) -> np.ndarray:
        return (a.astype(np.float32) / 255.0)[:, None, :, :]  # (N, 1, 28, 28)

    return ImageDataset(
        "fashion-mnist", images(x_tr), y_tr.astype(np.int64), images(x_te), y_te.astype(np.int64), 10
    )


def load_dataset(name: str, *, data_dir: str = "", test_fraction: float = 0.2) -> ImageDataset:
    """Load a bundled dataset by name (see :data:`DATASET_NAMES`)."""
    if name == "digits":
        return load_digits(test_fraction)
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir)
    raise DataError(f"dataset must be one of {', '.join(DATASET_NAMES)}, got {name!r}")
