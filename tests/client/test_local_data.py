"""A deployed node's own data file: NPZ and IDX read and checked, one-line errors for what is wrong."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from client.local_data import LocalDataError, load_local_data, write_npz


def images(n: int = 12, size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.uniform(0, 1, size=(n, 1, size, size)).astype(np.float32), (np.arange(n) % 10).astype(np.int64)


def write_idx(path: Path, values: np.ndarray, code: int) -> None:
    header = bytes([0, 0, code, values.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in values.shape)
    data = header + values.astype(values.dtype.newbyteorder(">") if values.dtype.itemsize > 1 else values.dtype)\
        .tobytes()
    with (gzip.open(path, "wb") if path.suffix == ".gz" else open(path, "wb")) as f:
        f.write(data)


def test_npz_round_trip(tmp_path: Path) -> None:
    x, y = images()
    data = load_local_data(write_npz(tmp_path / "d.npz", x, y), num_classes=10, image_size=8, client_id="3")
    assert data.x.dtype == np.float32 and data.x.shape == (12, 1, 8, 8) and np.array_equal(data.x, x)
    assert data.y.dtype == np.int64 and np.array_equal(data.y, y)
    assert (data.num_classes, data.client_id) == (10, "3")


@pytest.mark.parametrize("names", [("images.idx.gz", "labels.idx.gz"),
                                   ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")])
def test_idx_directory(tmp_path: Path, names: tuple[str, str]) -> None:
    raw = (np.arange(5 * 28 * 28) % 256).astype(np.uint8).reshape(5, 28, 28)
    write_idx(tmp_path / names[0], raw, 0x08)
    write_idx(tmp_path / names[1], np.array([0, 1, 2, 3, 9], np.uint8), 0x08)
    data = load_local_data(tmp_path, num_classes=10, image_size=28)
    assert data.x.shape == (5, 1, 28, 28) and data.x.max() <= 1.0
    assert np.allclose(data.x[:, 0] * 255, raw) and data.y.tolist() == [0, 1, 2, 3, 9]


def _npz(tmp_path: Path, **arrays: np.ndarray) -> Path:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "absent.npz", "no such file or directory"),
        (lambda p: (p / "x.csv").write_text("1,2") and p / "x.csv", "expected an .npz file or a directory"),
        (lambda p: (p / "junk.npz").write_bytes(b"not a zip") and p / "junk.npz", "not a readable NPZ file"),
        (lambda p: _npz(p, images=images()[0]), "NPZ file lacks array(s) x, y (has images)"),
        (lambda p: _npz(p, x=images()[0][:, 0], y=images()[1]), "images x must be shaped (N, 1, H, H)"),
        (lambda p: _npz(p, x=images(size=28)[0], y=images()[1]), "images are 28×28, the configured dataset's are 8×8"),
        (lambda p: _npz(p, x=(images()[0] * 255).astype(np.uint8), y=images()[1]), "must be float32 in [0, 1]"),
        (lambda p: _npz(p, x=images()[0] * 2, y=images()[1]), "image values must be finite and in [0, 1]"),
        (lambda p: _npz(p, x=images()[0], y=images()[1][:5]), "labels y must be shaped (12,)"),
        (lambda p: _npz(p, x=images()[0], y=images()[1] + 5), "labels must be in 0..9, got values in [5, 14]"),
        (lambda p: _npz(p, x=images()[0], y=images()[1].astype(np.float32)), "labels y must be integers"),
        (lambda p: p, "a directory must hold IDX files"),
    ],
)
def test_bad_files_fail_with_one_line_naming_the_path(tmp_path: Path, make, message: str) -> None:
    path = make(tmp_path)
    with pytest.raises(LocalDataError) as info:
        load_local_data(path, num_classes=10, image_size=8)
    text = str(info.value)
    assert message in text and "\n" not in text and text.startswith(f"data-path {path}")


def test_truncated_idx(tmp_path: Path) -> None:
    write_idx(tmp_path / "images.idx", np.zeros((4, 8, 8), np.uint8), 0x08)
    write_idx(tmp_path / "labels.idx", np.zeros(4, np.uint8), 0x08)
    (tmp_path / "images.idx").write_bytes((tmp_path / "images.idx").read_bytes()[:-10])
    with pytest.raises(LocalDataError, match=r"IDX header says shape \[4, 8, 8\] but the file holds 246 values"):
        load_local_data(tmp_path, num_classes=10)
