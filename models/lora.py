"""Federated LoRA building blocks: the pretrained base model, its LoRA-adapted copy, the adapters that travel.

The base network (any of :data:`models.MODEL_NAMES`) is trained once on a public split (by the server), saved as
an ``.npz`` file with its SHA-256, and frozen everywhere; every ``nn.Linear`` of it gets a rank-r LoRA adapter
(:class:`kernels.lora.LoRALinear`), and only the adapter factors — ``<layer>.lora_A.weight`` (r, in) and
``<layer>.lora_B.weight`` (out, r) — are trained and exchanged.

torch and numpy only (no Flower), like the rest of :mod:`models`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kernels.lora import apply_lora, lora_state_dict
from models.nets import build_model
from models.training import TrainConfig, train

__all__ = [
    "adapter_count",
    "build_lora_model",
    "file_sha256",
    "load_base",
    "lora_rank_limit",
    "pretrain_base",
    "save_base",
]


def lora_rank_limit(name: str, image_size: int, num_classes: int) -> tuple[int, str]:
    """The largest LoRA rank every ``nn.Linear`` of model ``name`` admits, min(in, out) over them, and which
    layer sets it (``"head: 64 -> 10"``)."""
    model = build_model(name, image_size=image_size, num_classes=num_classes)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not layers:
        raise ValueError(f"model: {name!r} has no Linear layer to adapt")
    layer_name, layer = min(layers, key=lambda item: min(item[1].in_features, item[1].out_features))
    return min(layer.in_features, layer.out_features), f"{layer_name}: {layer.in_features} -> {layer.out_features}"


def build_lora_model(
    name: str, image_size: int, num_classes: int, rank: int, alpha: float | None = None,
    base_state: Mapping[str, torch.Tensor] | None = None, seed: int | None = None,
) -> nn.Module:
    """Model ``name`` with ``base_state`` loaded (if given), every ``nn.Linear`` wrapped by a rank-``rank``
    LoRA adapter and everything but the adapters frozen.

    ``seed`` seeds the base initialization and then the adapters' (A Kaiming-uniform, B = 0), so every process
    builds the same initial adapters. ``alpha`` None or 0 means ``alpha = rank``.
    """
    model = build_model(name, image_size=image_size, num_classes=num_classes, seed=seed)
    if base_state is not None:
        model.load_state_dict(base_state)
    apply_lora(model, rank, alpha or None)
    return model


def adapter_count(model: nn.Module) -> int:
    """Number of adapter parameters (the entries of :func:`kernels.lora.lora_state_dict`)."""
    return sum(t.numel() for t in lora_state_dict(model).values())


def pretrain_base(
    name: str, x: np.ndarray, y: np.ndarray, num_classes: int, *, epochs: int, lr: float, batch_size: int,
    weight_decay: float, seed: int,
) -> tuple[dict[str, torch.Tensor], float]:
    """Train a fresh (seeded) model ``name`` on the public split (x, y) with AdamW; return its state and the last
    epoch's mean training loss."""
    model = build_model(name, image_size=int(x.shape[-1]), num_classes=num_classes, seed=seed)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, optimizer="adamw")
    loss = train(model, x, y, cfg, seed=seed)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, loss


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_base(state: Mapping[str, torch.Tensor], path: str | Path) -> str:
    """Write the base model's state to ``path`` (``.npz``, atomically) and return the file's SHA-256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **{k: v.detach().cpu().numpy() for k, v in state.items()})
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return file_sha256(path)


_BASES: dict[tuple[str, str], dict[str, torch.Tensor]] = {}


def load_base(path: str | Path, sha256: str) -> dict[str, torch.Tensor]:
    """The base model state saved at ``path``, checked against ``sha256`` (cached per process once verified).

    Raises
    ------
    ValueError
        The file is missing or its SHA-256 differs from ``sha256`` (another base than the server's).
    """
    key = (str(Path(path).resolve()), sha256)
    if key not in _BASES:
        if not Path(path).is_file():
            raise ValueError(f"lora-base-path: no base model file at {path}")
        actual = file_sha256(path)
        if actual != sha256:
            raise ValueError(f"lora-base-path: {path} has SHA-256 {actual[:16]}…, expected the server's base "
                             f"{sha256[:16]}…")
        with np.load(path) as z:
            _BASES[key] = {k: torch.from_numpy(z[k].copy()) for k in z.files}
    return _BASES[key]
