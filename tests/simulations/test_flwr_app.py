"""The `flwr run .` face of the project: pyproject's app config and how overrides are read."""

from __future__ import annotations

import tomllib

from server.config import KEYS
from simulations.apps import flwr_run_overrides
from simulations.experiments import resolve
from tests.conftest import ROOT


def app_config() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["flwr"]["app"]["config"]


def test_pyproject_lists_every_key_with_the_default_experiments_values() -> None:
    cfg = app_config()
    assert set(cfg) == set(KEYS)
    assert cfg == resolve().to_dict()


def test_components_point_at_the_simulation_apps() -> None:
    with open(ROOT / "pyproject.toml", "rb") as f:
        components = tomllib.load(f)["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "simulations.apps:server_app", "clientapp": "simulations.apps:client_app"}
    from simulations import apps

    assert apps.server_app is not None and apps.client_app is not None


def test_only_user_changes_override_the_selected_experiment() -> None:
    run_config = app_config() | {"experiment": "fashion-fedavg", "num-rounds": 3}
    overrides = flwr_run_overrides(run_config, {"experiment": "fashion-fedavg", "num-rounds": 3})
    assert overrides == {"experiment": "fashion-fedavg", "num-rounds": 3}
    # A value edited in pyproject (not passed with --run-config) counts as an override too.
    assert flwr_run_overrides(app_config() | {"lr": 0.2}, {}) == {"lr": 0.2}
