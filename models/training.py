"""Local training and evaluation loops (plain torch, CPU or GPU)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one local training call."""

    epochs: int = 1  # passes over the local data
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9  # SGD momentum (ignored by adam/adamw)
    weight_decay: float = 0.0
    optimizer: str = "sgd"  # sgd | adam | adamw


def set_torch_threads(n: int) -> None:
    """Limit intra-op threads (several clients share the cores in a simulation)."""
    n = max(1, int(n))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Build the optimizer named by ``cfg.optimizer`` over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":  # fused kernel on CUDA, foreach (multi-tensor) on CPU
        from kernels import make_fused_adamw

        return make_fused_adamw(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer must be one of sgd, adam, adamw, got {cfg.optimizer!r}")


def _loader(x: np.ndarray, y: np.ndarray, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    data = TensorDataset(torch.from_numpy(x), torch.from_numpy(y).long())
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=gen)


def train(
    model: nn.Module, x: np.ndarray, y: np.ndarray, cfg: TrainConfig, seed: int = 0, device: str = "cpu"
) -> float:
    """Train ``model`` in place on (x, y) and return the mean training loss of the last epoch.

    Parameters
    ----------
    x : np.ndarray
        float32 images, shape (N, 1, H, W).
    y : np.ndarray
        int64 labels, shape (N,).
    """
    if len(x) == 0:
        raise ValueError("cannot train on an empty dataset")
    model.to(device).train()
    opt = make_optimizer(model, cfg)
    loss_fn = nn.CrossEntropyLoss()
    last = 0.0
    for epoch in range(cfg.epochs):
        total, count = 0.0, 0
        for xb, yb in _loader(x, y, cfg.batch_size, shuffle=True, seed=seed + epoch):
            xb, yb = xb.to(device), yb.to(device)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            total += loss.item() * len(yb)
            count += len(yb)
        last = total / count
    return last


@torch.no_grad()
def evaluate(
    model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 1024, device: str = "cpu"
) -> tuple[float, float]:
    """Return (mean cross-entropy loss, accuracy) of ``model`` on (x, y)."""
    model.to(device).eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    loss, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        xb = torch.from_numpy(x[start : start + batch_size]).to(device)
        yb = torch.from_numpy(y[start : start + batch_size]).long().to(device)
        logits = model(xb)
        loss += loss_fn(logits, yb).item()
        correct += (logits.argmax(1) == yb).sum().item()
    n = max(len(x), 1)
    return loss / n, correct / n


@torch.no_grad()
def predict_proba(model: nn.Module, x: np.ndarray, batch_size: int = 1024, device: str = "cpu") -> np.ndarray:
    """Class probabilities (N, K) float64 of ``model`` on images ``x`` (N, 1, H, W); rows sum to 1."""
    model.to(device).eval()
    out = []
    for start in range(0, len(x), batch_size):
        logits = model(torch.from_numpy(x[start : start + batch_size]).to(device))
        out.append(torch.softmax(logits.double(), dim=1).cpu().numpy())
    if not out:
        raise ValueError("cannot predict on an empty dataset")
    return np.concatenate(out)
