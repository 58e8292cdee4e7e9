"""Configuration: defaults, coercion of --set strings, and one exact line per error."""

from __future__ import annotations

import pytest

from server.config import KEYS, ConfigError, RunConfig, resolve_config


def errors_of(*layers, **kw) -> list[str]:
    with pytest.raises(ConfigError) as info:
        resolve_config(*layers, **kw)
    return info.value.errors


def test_defaults_and_kebab_round_trip() -> None:
    cfg = resolve_config()
    assert cfg == RunConfig()
    assert set(cfg.to_dict()) == set(KEYS)
    assert resolve_config(cfg.to_dict()) == cfg


def test_command_line_strings_are_typed() -> None:
    cfg = resolve_config({"num-rounds": "3", "lr": "0.1", "partition": "dirichlet", "dirichlet-alpha": "0.1"})
    assert (cfg.num_rounds, cfg.lr, cfg.partition, cfg.dirichlet_alpha) == (3, 0.1, "dirichlet", 0.1)
    assert resolve_config({"lr": 1}).lr == 1.0  # an int is a valid float


def test_later_layers_win() -> None:
    assert resolve_config({"num-rounds": 4}, {"num-rounds": "7"}).num_rounds == 7


def test_every_error_is_collected_with_key_value_and_expectation() -> None:
    errors = errors_of({
        "num-round": 3, "lr": "fast", "num-clients": 0, "partition": "random", "dirichlet-alpha": 0,
        "num-rounds": 0, "fraction-train": 1.5, "seed": 1.5, "model": True,
    })
    assert errors == [
        "unknown key 'num-round' (did you mean 'num-rounds'?)",
        "lr: expected a number, got 'fast'",
        "num-clients: expected a value >= 1, got 0",
        "partition: expected one of iid, dirichlet, pathological, got 'random'",
        "dirichlet-alpha: expected a value > 0, got 0.0",
        "num-rounds: expected a value >= 1, got 0",
        "fraction-train: expected a value > 0 and <= 1, got 1.5",
        "seed: expected an integer, got 1.5",
        "model: expected a string, got True",
    ]


def test_unknown_key_without_a_close_match_points_to_the_key_list() -> None:
    assert errors_of({"zzz": 1}) == ["unknown key 'zzz'; `fedpriv experiments --keys` lists the keys"]


def test_non_finite_numbers_are_rejected() -> None:
    assert errors_of({"lr": "nan"}) == ["lr: expected a finite number, got 'nan'"]


def test_extra_checks_run_after_values_are_valid() -> None:
    assert errors_of({"num-clients": 5}, extra_checks=lambda c: [f"num-clients: too many ({c.num_clients})"]) == [
        "num-clients: too many (5)"
    ]


def test_label_dp_cross_field_errors_are_collected() -> None:
    with pytest.raises(ConfigError) as err:
        resolve_config({"strategy": "label-dp", "dp": "dpsgd", "num-rounds": 3, "retrain-rounds": 3})
    assert err.value.errors == [
        "dp: label-dp privatizes labels only and cannot be combined with dp='dpsgd'; expected 'none'",
        "retrain-rounds: expected fewer than num-rounds=3 (the noisy phase needs a round), got 3",
    ]
    with pytest.raises(ConfigError, match=r"^label-stages: expected at most 2 \(rounds of the noisy phase\), got 3$"):
        resolve_config({"strategy": "label-dp", "label-mechanism": "rr-prior", "label-stages": 3, "num-rounds": 4,
                        "retrain-rounds": 2})
    with pytest.raises(ConfigError, match=r"^label-epsilon: expected a value > 0, got 0.0$"):
        resolve_config({"strategy": "label-dp", "label-epsilon": 0})
    # rr ignores label-stages; without consensus every round is a noisy-label round.
    assert resolve_config({"strategy": "label-dp", "label-stages": 9, "num-rounds": 2, "retrain-rounds": 1})
    assert resolve_config({"strategy": "label-dp", "consensus": "false", "num-rounds": 2, "retrain-rounds": 5})


def test_label_prior_and_matched_steps_keys() -> None:
    cfg = resolve_config({"strategy": "label-dp"})
    assert (cfg.label_prior, cfg.label_matched_steps) == ("denoised", True)
    assert resolve_config({"label-prior": "softmax", "label-matched-steps": "false"}).label_matched_steps is False
    assert errors_of({"label-prior": "uniform", "label-matched-steps": "sometimes"}) == [
        "label-prior: expected one of denoised, softmax, got 'uniform'",
        "label-matched-steps: expected true or false, got 'sometimes'",
    ]


def test_config_error_survives_pickling() -> None:
    import pickle

    err = pickle.loads(pickle.dumps(ConfigError(["lr: expected > 0, got -1", "num-rounds: expected >= 1, got 0"])))
    assert err.errors == ["lr: expected > 0, got -1", "num-rounds: expected >= 1, got 0"]
    assert str(err) == "lr: expected > 0, got -1\nnum-rounds: expected >= 1, got 0"


@pytest.mark.parametrize("private", [{"strategy": "label-dp"}, {"dp": "dpsgd"}, {"dp": "dpfedavg"}])
def test_federated_evaluation_is_refused_where_it_would_release_private_data(private: dict) -> None:
    with pytest.raises(ConfigError, match=r"^fraction-evaluate: federated evaluation reports metrics computed on the "
                                          r"clients' private data, .* got 0.5$"):
        resolve_config(private | {"fraction-evaluate": 0.5})
    assert resolve_config({"fraction-evaluate": 0.5}).fraction_evaluate == 0.5  # a non-private run may


def test_label_holdout_is_a_share_up_to_a_half() -> None:
    assert resolve_config({"strategy": "label-dp", "label-holdout": "0.1"}).label_holdout == 0.1
    with pytest.raises(ConfigError, match=r"^label-holdout: expected a value >= 0 and <= 0.5, got 0.7$"):
        resolve_config({"strategy": "label-dp", "label-holdout": 0.7})
