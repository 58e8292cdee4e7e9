"""The local data a client trains on (or, for histogram jobs, its users' item counts), and the IDX reader
shared by deployed nodes (:mod:`client.local_data`) and the bundled datasets (:mod:`simulations.datasets`)."""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class IdxError(ValueError):
    """An unreadable or malformed IDX file; the message is one line starting with the path."""


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (the MNIST format, gzip'd or plain) into a numpy array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise IdxError(f"{path}: cannot read IDX file ({exc})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise IdxError(f"{path} is not an IDX file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code not in IDX_DTYPES:
        raise IdxError(f"{path}: unknown IDX element type 0x{dtype_code:02x}")
    if len(data) < 4 + 4 * ndim:
        raise IdxError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    values = np.frombuffer(data, dtype=IDX_DTYPES[dtype_code], offset=4 + 4 * ndim)
    if values.size != int(np.prod(shape)):
        raise IdxError(f"{path}: IDX header says shape {list(shape)} but the file holds {values.size} values "
                       "(truncated?)")
    return values.reshape(shape)


@dataclass(frozen=True)
class ClientData:
    """A node's local data: images (N, 1, S, S) float32 and labels (N,) int64; for histogram jobs, ``x`` holds
    its users' item counts (users × k) int64 and ``y`` is empty."""

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    client_id: str
