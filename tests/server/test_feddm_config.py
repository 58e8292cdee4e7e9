"""FedDM's configuration keys: one exact line per invalid value, and the strategy/DP combinations."""

from __future__ import annotations

import pytest

from server.app import make_strategy
from server.config import ConfigError, resolve_config
from simulations.experiments import resolve
from strategies.feddm import FedDM


def errors_of(*layers) -> list[str]:
    with pytest.raises(ConfigError) as info:
        resolve_config(*layers)
    return info.value.errors


def test_invalid_hyperparameters_are_one_line_errors() -> None:
    assert errors_of({
        "strategy": "feddm", "feddm-iterations": 0, "feddm-lr": 0, "feddm-rho": -1, "feddm-images-per-class": 0,
        "feddm-real-batch": "many", "server-epochs": 0, "server-lr": -0.1, "server-batch-size": 0,
        "feddm-optimizer": "rmsprop", "feddm-momentum": 1.0, "feddm-dp-releases": 0, "feddm-max-images": 0,
    }) == [
        "feddm-iterations: expected a value >= 1, got 0",
        "feddm-lr: expected a value > 0, got 0.0",
        "feddm-rho: expected a value >= 0, got -1.0",
        "feddm-images-per-class: expected a value >= 1, got 0",
        "feddm-real-batch: expected an integer, got 'many'",
        "server-epochs: expected a value >= 1, got 0",
        "server-lr: expected a value > 0, got -0.1",
        "server-batch-size: expected a value >= 1, got 0",
        "feddm-optimizer: expected one of sgd, adam, got 'rmsprop'",
        "feddm-momentum: expected a value >= 0 and < 1, got 1.0",
        "feddm-dp-releases: expected a value >= 1, got 0",
        "feddm-max-images: expected a value >= 1, got 0",
    ]


def test_feddm_combines_only_with_its_own_dp() -> None:
    assert errors_of({"strategy": "feddm", "dp": "dpsgd"}) == [
        "dp: feddm uploads synthetic sets, not model updates; expected 'none' or 'feddm-dp', got 'dpsgd'"]
    assert errors_of({"dp": "feddm-dp"}) == [
        "dp: feddm-dp privatizes FedDM's matching statistics; expected strategy 'feddm', got strategy='fedavg'"]
    assert resolve_config({"strategy": "feddm", "dp": "feddm-dp"}).dp == "feddm-dp"


def test_max_images_must_fit_a_client_holding_every_class() -> None:
    with pytest.raises(ConfigError) as info:
        resolve("digits-feddm", {"feddm-max-images": 50})
    assert info.value.errors == [
        "feddm-max-images: expected at least feddm-images-per-class × classes = 10 × 10 = 100 (a client holding "
        "every class uploads that many), got 50"]


def test_make_strategy_builds_feddm_and_wraps_its_dp_variant(tmp_path) -> None:
    from privacy.ledger import Ledger

    plain = make_strategy(resolve("digits-feddm"), input_shape=(1, 8, 8))
    assert isinstance(plain, FedDM) and plain.input_shape == (1, 8, 8) and plain.max_images == 100
    with pytest.raises(ValueError, match="image shape"):
        make_strategy(resolve("digits-feddm"))
    with Ledger(tmp_path / "l.sqlite") as led:
        guarded = make_strategy(resolve("digits-feddm", {"dp": "feddm-dp"}), led, "run", input_shape=(1, 8, 8))
        assert type(guarded).__name__ == "LedgerGuard"
        assert type(guarded.strategy).__name__ == "FedDMDp" and guarded.strategy.strategy is not None
        assert isinstance(guarded.strategy.strategy, FedDM)  # the algorithm itself is unchanged


def test_feddm_needs_a_model_it_can_split() -> None:
    from server.config import RunConfig, cross_checks

    assert cross_checks(RunConfig(strategy="feddm", model="vit")) == [
        "model: feddm matches the penultimate features of mlp or cnn; expected one of mlp, cnn, got 'vit'"]
