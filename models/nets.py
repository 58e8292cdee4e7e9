"""Small image classifiers for the bundled datasets.

* ``mlp``: a two-hidden-layer perceptron, the default for scikit-learn digits (8×8).
* ``cnn``: a LeNet-style convolutional net for Fashion-MNIST (28×28).
* ``vit``: a small Vision Transformer (:mod:`models.vit`) with softmax (SDPA) attention; ``vit-laser``: the same
  with LASER attention (a model name, so every strategy and experiment can pick it with ``model = ...``).

All take images shaped (N, 1, H, W) with values in [0, 1] and return logits (N, num_classes). All use
GroupNorm-free, BatchNorm-free layers so that Opacus can compute per-sample gradients of every parameter.
"""

from __future__ import annotations

import torch
from torch import nn

MODEL_NAMES = ("mlp", "cnn", "vit", "vit-laser")


class MLP(nn.Module):
    """Flatten → Linear → ReLU → Linear → ReLU → Linear."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),  # (N, 1, H, W) -> (N, H*W)
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    """Two 5×5 conv blocks with max-pooling, then two linear layers (about 0.1 M parameters)."""

    def __init__(self, image_size: int, num_classes: int, channels: tuple[int, int] = (16, 32)) -> None:
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, kernel_size=5, padding=2),  # (N, c1, S, S)
            nn.ReLU(),
            nn.MaxPool2d(2),  # (N, c1, S/2, S/2)
            nn.Conv2d(c1, c2, kernel_size=5, padding=2),  # (N, c2, S/2, S/2)
            nn.ReLU(),
            nn.MaxPool2d(2),  # (N, c2, S/4, S/4)
        )
        side = image_size // 4
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * side * side, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_model(
    name: str, image_size: int, num_classes: int, seed: int | None = None, *, attention: str = "sdpa"
) -> nn.Module:
    """Build a fresh model by name.

    Parameters
    ----------
    name : str
        One of :data:`MODEL_NAMES`.
    image_size : int
        Side of the square input images (8 for digits, 28 for Fashion-MNIST).
    num_classes : int
        Number of output logits.
    seed : int, optional
        Seeds the weight initialization, so every process builds the same initial model.
    attention : {"sdpa", "laser"}
        Attention of the ``vit`` model (ignored by the others; ``vit-laser`` is ``vit`` with ``laser``).
    """
    if seed is not None:
        torch.manual_seed(seed)
    if name == "mlp":
        return MLP(image_size * image_size, num_classes)
    if name == "cnn":
        if image_size % 4:
            raise ValueError(f"model 'cnn' needs an image side divisible by 4, got {image_size}")
        return CNN(image_size, num_classes)
    if name in ("vit", "vit-laser"):
        from models.vit import ViT

        return ViT(image_size, num_classes, attention="laser" if name == "vit-laser" else attention)
    raise ValueError(f"model must be one of {', '.join(MODEL_NAMES)}, got {name!r}")
