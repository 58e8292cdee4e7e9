"""Datasets: digits split, the IDX reader (on files written here), Fashion-MNIST when installed."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from simulations.datasets import (
    IMAGE_SIZES,
    NUM_CLASSES,
    TRAIN_SIZES,
    DataError,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    read_idx,
)
from tests.conftest import requires_fashion


def write_idx(path, array: np.ndarray, compress: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(data)


def test_digits_split_is_fixed_and_stratified() -> None:
    ds = load_digits()
    assert ds.x_train.shape == (1437, 1, 8, 8) and ds.x_test.shape == (360, 1, 8, 8)
    assert ds.x_train.dtype == np.float32 and ds.x_train.min() >= 0.0 and ds.x_train.max() <= 1.0
    assert set(np.bincount(ds.y_test)) <= {35, 36, 37}  # stratified: ~36 per class


@pytest.mark.parametrize("compress", [True, False])
def test_idx_round_trip(tmp_path, compress: bool) -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(5, 4, 3))
    path = tmp_path / ("x.idx.gz" if compress else "x.idx")
    write_idx(path, images, compress)
    np.testing.assert_array_equal(read_idx(path), images)


def test_idx_errors(tmp_path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(DataError, match="bad magic number"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(struct.pack(">BBBBI", 0, 0, 0x08, 1, 10) + b"\x00" * 3)
    with pytest.raises(DataError, match="truncated"):
        read_idx(short)


def test_fashion_from_a_directory_of_idx_files(tmp_path) -> None:
    rng = np.random.default_rng(1)
    for name, shape in [("train-images-idx3-ubyte", (20, 28, 28)), ("t10k-images-idx3-ubyte", (6, 28, 28))]:
        write_idx(tmp_path / f"{name}.gz", rng.integers(0, 256, shape), True)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 20), True)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", rng.integers(0, 10, 6), False)  # plain file works too
    ds = load_fashion_mnist(str(tmp_path))
    assert ds.x_train.shape == (20, 1, 28, 28) and ds.y_test.shape == (6,)
    assert ds.x_train.max() <= 1.0


def test_missing_fashion_says_how_to_install(tmp_path) -> None:
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path))


@requires_fashion
def test_installed_fashion_mnist() -> None:
    ds = load_fashion_mnist()
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert np.bincount(ds.y_train).tolist() == [6000] * 10


@pytest.mark.parametrize("name", ["digits", pytest.param("fashion-mnist", marks=requires_fashion)])
def test_recorded_dataset_facts_match_the_data(name: str) -> None:
    ds = load_dataset(name)
    assert ds.num_classes == NUM_CLASSES[name] == len(np.unique(ds.y_train))
    assert ds.image_size == IMAGE_SIZES[name]
    assert TRAIN_SIZES[name] in (None, len(ds.y_train))
