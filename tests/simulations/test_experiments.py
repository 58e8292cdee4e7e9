"""Bundled experiments and the checks that need the data's facts."""

from __future__ import annotations

import pytest

from server.config import ConfigError
from simulations.experiments import list_experiments, load_experiment, resolve


def test_bundled_experiments_resolve() -> None:
    names = [n for n, _ in list_experiments()]
    assert {"digits-fedavg", "fashion-fedavg"} <= set(names)
    for name, description in list_experiments():
        assert description, f"{name} has no description"
        raw = load_experiment(name)
        assert raw["experiment"] == name


def test_default_experiment_is_digits_fedavg() -> None:
    cfg = resolve()
    assert (cfg.experiment, cfg.dataset, cfg.strategy, cfg.num_clients) == ("digits-fedavg", "digits", "fedavg", 10)


def test_unknown_experiment() -> None:
    with pytest.raises(ConfigError) as info:
        resolve("nope")
    assert info.value.errors == [
        "experiment: unknown experiment 'nope'; expected one of "
        + ", ".join(n for n, _ in list_experiments())
        + " or a path to a .toml file"
    ]


def test_experiment_from_a_path(tmp_path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text('description = "x"\nnum-rounds = 2\nnum-clients = 3\n')
    cfg = resolve(str(path))
    assert (cfg.num_rounds, cfg.num_clients, cfg.experiment) == (2, 3, str(path))


def test_malformed_experiment_file(tmp_path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("num-rounds = = 2\n")
    with pytest.raises(ConfigError) as info:
        resolve(str(path))
    assert info.value.errors[0].startswith(f"experiment: {path} is not valid TOML")


def test_more_clients_than_samples() -> None:
    with pytest.raises(ConfigError) as info:
        resolve(overrides={"num-clients": 5000})
    assert info.value.errors == ["num-clients: expected at most 1437 (training samples of digits), got 5000"]


def test_too_many_classes_per_client() -> None:
    with pytest.raises(ConfigError) as info:
        resolve(overrides={"partition": "pathological", "classes-per-client": 11})
    assert info.value.errors == ["classes-per-client: expected at most 10 (classes in digits), got 11"]


def test_missing_fashion_files_say_how_to_get_them(tmp_path) -> None:
    with pytest.raises(ConfigError) as info:
        resolve("fashion-fedavg", {"data-dir": str(tmp_path)})
    (line,) = info.value.errors
    assert line.startswith(f"data-dir: Fashion-MNIST not found in {tmp_path} (missing train-images-idx3-ubyte")
    assert "apt-get install dataset-fashion-mnist" in line
