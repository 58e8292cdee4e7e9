"""Federated LoRA's configuration keys: bad values are one-line errors naming the key."""

from __future__ import annotations

import pytest

from server.config import ConfigError, resolve_config
from simulations.experiments import resolve


def _errors(**overrides) -> list[str]:
    with pytest.raises(ConfigError) as info:
        resolve(overrides={k.replace("_", "-"): v for k, v in overrides.items()})
    return info.value.errors


def test_bundled_lora_experiments_resolve() -> None:
    rite, adam = resolve("fashion-lora-rite"), resolve("fashion-lora-adam")
    assert (rite.optimizer, adam.optimizer) == ("lora-rite", "adamw")
    assert rite.lora_rank == adam.lora_rank == 8 and rite.model == "vit"
    different = {k for k, v in rite.to_dict().items() if adam.to_dict()[k] != v}
    assert different <= {"experiment", "description", "optimizer", "lr"}


def test_types_and_ranges() -> None:
    errors = _errors(lora_rank=-1, lora_alpha="wide", lora_public_classes=0, lora_public_fraction=0,
                     lora_pretrain_epochs=0, lora_pretrain_lr=0)
    assert errors == [
        "lora-rank: expected a value >= 0, got -1",
        "lora-alpha: expected a number, got 'wide'",
        "lora-public-classes: expected a value >= 1, got 0",
        "lora-public-fraction: expected a value > 0 and <= 1, got 0.0",
        "lora-pretrain-epochs: expected a value >= 1, got 0",
        "lora-pretrain-lr: expected a value > 0, got 0.0",
    ]
    assert _errors(lora_public_fraction=1.5) == ["lora-public-fraction: expected a value > 0 and <= 1, got 1.5"]
    assert _errors(lora_rank="two") == ["lora-rank: expected an integer, got 'two'"]
    assert _errors(optimizer="rite") == ["optimizer: expected one of sgd, adam, adamw, lora-rite, got 'rite'"]


def test_cross_field_checks() -> None:
    assert _errors(optimizer="lora-rite") == [
        "optimizer: lora-rite optimizes LoRA adapter pairs; expected lora-rank > 0 with it, got lora-rank=0"]
    assert _errors(lora_rank=4, strategy="feddm", model="cnn") == [
        "lora-rank: federated LoRA runs with strategy 'fedavg' and dp none, dpsgd or dpfedavg; expected lora-rank=0 "
        "with strategy='feddm', dp='none', got 4"]
    assert _errors(lora_rank=4, strategy="label-dp") == [
        "lora-rank: federated LoRA runs with strategy 'fedavg' and dp none, dpsgd or dpfedavg; expected lora-rank=0 "
        "with strategy='label-dp', dp='none', got 4"]
    # a flat key table without the data checks still catches the cross-field ones
    with pytest.raises(ConfigError, match=r"^optimizer: lora-rite"):
        resolve_config({"optimizer": "lora-rite"})


def test_checks_that_need_the_model_and_the_data() -> None:
    assert _errors(lora_rank=11, model="vit") == [
        "lora-rank: expected at most 10 (min(in, out) of the smallest Linear layer of model 'vit', head: 64 -> 10), "
        "got 11"]
    assert _errors(lora_rank=4, lora_public_classes=11) == [
        "lora-public-classes: expected at most 10 (classes in digits), got 11"]
    assert _errors(lora_rank=4, lora_public_classes=10, lora_public_fraction=1.0) == [
        "lora-public-fraction: with all 10 classes public, expected a share below 1 (the clients need private "
        "data), got 1.0"]
    ok = resolve(overrides={"lora-rank": 10, "model": "mlp", "optimizer": "lora-rite", "dp": "dpsgd"})
    assert ok.lora_rank == 10


def test_balancing_the_aggregated_adapters_keeps_the_product() -> None:
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from server.lora import balance_adapters

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 9)).astype(np.float32) * 7.0, rng.normal(size=(5, 4)).astype(np.float32) * 0.1
    zero_b = np.zeros((5, 4), np.float32)
    other = rng.normal(size=(3,)).astype(np.float32)
    arrays = ArrayRecord({"l.lora_A.weight": Array(a), "l.lora_B.weight": Array(b), "m.lora_A.weight": Array(a),
                          "m.lora_B.weight": Array(zero_b), "bias": Array(other)})
    out = {k: v.numpy() for k, v in balance_adapters(arrays).items()}
    assert list(out) == list(arrays.keys())
    np.testing.assert_allclose(out["l.lora_B.weight"] @ out["l.lora_A.weight"], b @ a, rtol=1e-5, atol=1e-6)
    assert np.isclose(np.linalg.norm(out["l.lora_A.weight"]), np.linalg.norm(out["l.lora_B.weight"]), rtol=1e-5)
    assert np.array_equal(out["m.lora_A.weight"], a) and np.array_equal(out["m.lora_B.weight"], zero_b)  # B = 0
    assert np.array_equal(out["bias"], other) and out["l.lora_A.weight"].dtype == np.float32
    assert resolve(overrides={"lora-balance": "false"}).lora_balance is False
    assert _errors(lora_balance="maybe") == ["lora-balance: expected true or false, got 'maybe'"]
