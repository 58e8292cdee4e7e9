"""A deployed client's own data: the file (or directory) its SuperNode's ``data-path`` names.

Start a SuperNode with ``--node-config 'data-path="/data/mine.npz"'``; its ClientApp reads the data on each
message (a SuperNode starts a fresh ClientApp process per message, and reading is fast). Two formats:

* **NPZ** (``.npz``, written by :func:`write_npz` or ``numpy.savez``): ``x`` — float32 images shaped
  (N, 1, H, W) with values in [0, 1]; ``y`` — int64 labels shaped (N,) in 0..K−1.
* **IDX** (the MNIST file format, plain or ``.gz``): a directory holding ``images.idx`` and ``labels.idx``
  (or Fashion-MNIST's ``train-images-idx3-ubyte`` and ``train-labels-idx1-ubyte``) — uint8 images (N, H, W)
  scaled to [0, 1] (or float images already in [0, 1]) and integer labels (N,).

H and W must be the configured dataset's image size and K its number of classes (10 for digits and
Fashion-MNIST). Anything else raises :class:`LocalDataError` with a one-line message naming the path and what is
wrong; the server receives it as the node's error reply.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from client.data import ClientData, IdxError, read_idx

IDX_NAMES = (("images.idx", "labels.idx"), ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"))


class LocalDataError(ValueError):
    """The node's data file is missing or malformed; the message is one line naming the path."""


def write_npz(path: str | Path, x: np.ndarray, y: np.ndarray) -> Path:
    """Write images (N, 1, H, W) in [0, 1] and labels (N,) in the NPZ format above; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.savez(f, x=np.ascontiguousarray(x, dtype=np.float32), y=np.ascontiguousarray(y, dtype=np.int64))
    return path


def _read_idx(path: Path) -> np.ndarray:
    try:
        return read_idx(path)
    except IdxError as exc:
        raise LocalDataError(f"data-path {exc}") from None


def _find_idx(directory: Path) -> tuple[Path, Path]:
    for images, labels in IDX_NAMES:
        found = []
        for name in (images, labels):
            candidates = [directory / f"{name}.gz", directory / name]
            found.append(next((c for c in candidates if c.is_file()), None))
        if all(found):
            return found[0], found[1]  # type: ignore[return-value]
    names = " or ".join(f"{a}[.gz] + {b}[.gz]" for a, b in IDX_NAMES)
    raise LocalDataError(f"data-path {directory}: a directory must hold IDX files {names}")


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("x", "y") if k not in z.files]
            if missing:
                raise LocalDataError(f"data-path {path}: NPZ file lacks array(s) {', '.join(missing)} "
                                     f"(has {', '.join(z.files) or 'none'}); expected x (N,1,H,W) and y (N,)")
            return z["x"], z["y"]
    except LocalDataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise LocalDataError(f"data-path {path}: not a readable NPZ file ({type(exc).__name__}: {exc})") from None


def _load_idx(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    images_path, labels_path = _find_idx(directory)
    images, labels = _read_idx(images_path), _read_idx(labels_path)
    if images.ndim == 3:
        images = images[:, None]
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255.0
    return images, labels


def load_local_data(path: str | Path, num_classes: int, image_size: int | None = None,
                    client_id: str = "local") -> ClientData:
    """Read and check a node's data (format: see the module docstring).

    Parameters
    ----------
    path : str or Path
        An ``.npz`` file or a directory of IDX files.
    num_classes : int
        K; labels must lie in 0..K−1.
    image_size : int, optional
        H = W the configured model expects (checked when given).
    client_id : str
        Stable id of this client (its node id).

    Raises
    ------
    LocalDataError
        One line: the path and what is missing or wrong.
    """
    path = Path(path).expanduser()
    if not str(path).strip() or not path.exists():
        raise LocalDataError(f"data-path {path}: no such file or directory")
    if path.is_dir():
        x, y = _load_idx(path)
    elif path.suffix == ".npz":
        x, y = _load_npz(path)
    else:
        raise LocalDataError(f"data-path {path}: expected an .npz file or a directory of IDX files")
    if x.ndim != 4 or x.shape[1] != 1 or x.shape[2] != x.shape[3]:
        raise LocalDataError(f"data-path {path}: images x must be shaped (N, 1, H, H), got {list(x.shape)}")
    if image_size is not None and x.shape[-1] != image_size:
        raise LocalDataError(f"data-path {path}: images are {x.shape[-1]}×{x.shape[-1]}, the configured dataset's "
                             f"are {image_size}×{image_size}")
    if not np.issubdtype(x.dtype, np.floating):
        raise LocalDataError(f"data-path {path}: images x must be float32 in [0, 1], got dtype {x.dtype}")
    if y.ndim != 1 or len(y) != len(x):
        raise LocalDataError(f"data-path {path}: labels y must be shaped ({len(x)},) like the images, got "
                             f"{list(y.shape)}")
    if not np.issubdtype(y.dtype, np.integer):
        raise LocalDataError(f"data-path {path}: labels y must be integers, got dtype {y.dtype}")
    if len(y) == 0:
        raise LocalDataError(f"data-path {path}: holds no examples")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all() or x.min() < 0.0 or x.max() > 1.0:
        raise LocalDataError(f"data-path {path}: image values must be finite and in [0, 1], got "
                             f"[{np.nanmin(x):.4g}, {np.nanmax(x):.4g}]")
    if y.min() < 0 or y.max() >= num_classes:
        raise LocalDataError(f"data-path {path}: labels must be in 0..{num_classes - 1}, got values in "
                             f"[{y.min()}, {y.max()}]")
    return ClientData(x, y.astype(np.int64), num_classes, client_id)
