"""Networks and the local training loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import TrainConfig, build_model, evaluate, train
from simulations.datasets import load_digits


@pytest.mark.parametrize(("name", "size"), [("mlp", 8), ("cnn", 8), ("cnn", 28), ("mlp", 28)])
def test_shapes(name: str, size: int) -> None:
    model = build_model(name, size, 10)
    assert model(torch.zeros(3, 1, size, size)).shape == (3, 10)


def test_seeded_initialization_is_reproducible() -> None:
    a, b = build_model("mlp", 8, 10, seed=1), build_model("mlp", 8, 10, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_unknown_model_and_optimizer_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="model must be one of mlp, cnn, vit, vit-laser, got 'resnet'"):
        build_model("resnet", 8, 10)
    with pytest.raises(ValueError, match="optimizer must be one of sgd, adam, adamw, lora-rite, got 'lion'"):
        train(build_model("mlp", 8, 10), np.zeros((2, 1, 8, 8), np.float32), np.zeros(2, np.int64),
              TrainConfig(optimizer="lion"))


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_training_learns_digits(optimizer: str) -> None:
    ds = load_digits()
    model = build_model("mlp", 8, 10, seed=0)
    _, before = evaluate(model, ds.x_test, ds.y_test)
    lr = 0.05 if optimizer == "sgd" else 0.003
    train(model, ds.x_train, ds.y_train, TrainConfig(epochs=3, lr=lr, optimizer=optimizer), seed=0)
    loss, after = evaluate(model, ds.x_test, ds.y_test)
    assert before < 0.2 and after > 0.85 and loss < 0.6
