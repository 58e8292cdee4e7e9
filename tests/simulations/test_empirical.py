"""Empirical audits of each DP strategy: lower bound ≤ accounted ε on correct code, > claimed ε when broken."""

from __future__ import annotations

import json
import warnings

import dp_accounting as dpa
import pytest

from privacy.audit import _broken_for_tests
from privacy.ledger import Ledger
from privacy.mechanisms import calibrate_gaussian
from simulations.cli import main
from simulations.empirical import audit_dpfedavg, audit_dpsgd, audit_dpsgd_runs, audit_feddm_dp

DELTA = 1e-5


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.filterwarnings("ignore", message=".*_broken_for_tests is active.*", category=RuntimeWarning)


def test_dpsgd_canary_audit_bounds_and_catches_weaker_noise() -> None:
    steps = 10
    sigma = calibrate_gaussian(1.0, DELTA, steps=steps)  # full-batch DP-SGD, ε = 1 over 10 steps
    accounted, ok = audit_dpsgd([(sigma, 1.0, steps)], delta=DELTA, seed=0)
    assert accounted == pytest.approx(1.0, rel=1e-2)
    assert ok.epsilon_lb <= accounted
    with _broken_for_tests(10.0):
        claimed, broken = audit_dpsgd([(sigma, 1.0, steps)], delta=DELTA, seed=0)
    assert claimed == accounted
    assert broken.epsilon_lb > claimed + 1.0, broken


def test_dpsgd_many_run_game_bounds_and_catches_weaker_noise() -> None:
    steps = [(calibrate_gaussian(1.0, DELTA, steps=5, sampling_probability=0.5), 0.5, 5)]
    accounted, ok = audit_dpsgd_runs(steps, delta=DELTA, trials=600)
    assert ok.epsilon_lb <= accounted
    with _broken_for_tests(20.0):
        claimed, broken = audit_dpsgd_runs(steps, delta=DELTA, trials=600)
    assert broken.epsilon_lb > claimed, broken


def test_dpfedavg_game_bounds_and_catches_weaker_noise() -> None:
    sigma = calibrate_gaussian(1.0, DELTA, steps=1)
    accounted, ok = audit_dpfedavg([sigma], clip_norm=1.0, num_sampled_clients=10, delta=DELTA, trials=400)
    assert ok.epsilon_lb <= accounted
    with _broken_for_tests(20.0):
        claimed, broken = audit_dpfedavg([sigma], clip_norm=1.0, num_sampled_clients=10, delta=DELTA, trials=400)
    assert broken.epsilon_lb > claimed, broken


@pytest.mark.slow
def test_feddm_dp_game_bounds_and_catches_weaker_noise() -> None:
    sigma = calibrate_gaussian(1.0, DELTA, steps=3)  # one round of 2 noised sums + the noised counts
    accounted, ok = audit_feddm_dp(sigma, releases=2, delta=DELTA, trials=300)
    assert ok.epsilon_lb <= accounted
    with _broken_for_tests(20.0):
        claimed, broken = audit_feddm_dp(sigma, releases=2, delta=DELTA, trials=300)
    assert broken.epsilon_lb > claimed, broken


def _label_ledger(tmp_path, epsilon: float, k: int = 10):
    path = tmp_path / "ledger.sqlite"
    cfg = {"strategy": "label-dp", "dp": "none", "dataset": "digits", "label-epsilon": epsilon,
           "label-mechanism": "rr", "target-delta": DELTA}
    with Ledger(path) as ledger:
        ledger.register_run("lbl", "digits-labeldp", cfg)
        for client in ("0", "1"):
            with ledger.release("lbl", 1, [client], "label", dpa.RandomizedResponseDpEvent(
                    noise_parameter=k / (k - 1 + 2.718281828459045 ** epsilon), num_buckets=k), "rr"):
                pass
    return path


def test_cli_empirical_json_reports_lower_bound_beside_accounted(tmp_path, capsys) -> None:
    path = _label_ledger(tmp_path, epsilon=1.0)
    assert main(["audit", str(path), "--empirical", "--format", "json", "--trials", "4000"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["accounted_epsilon"] == pytest.approx(1.0, rel=1e-6)
    assert 0.0 < row["epsilon_lb"] <= row["accounted_epsilon"]
    assert row["violation"] is False and row["unit"] == "label"


def test_cli_empirical_refuses_non_dp_runs_and_missing_records(tmp_path, capsys) -> None:
    path = tmp_path / "ledger.sqlite"
    with Ledger(path) as ledger:
        ledger.register_run("plain", "digits-fedavg", {"strategy": "fedavg", "dp": "none"})
    assert main(["audit", str(path), "--empirical"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not differentially private" in err
    with Ledger(path) as ledger:
        ledger.register_run("dp", "digits-dpsgd", {"strategy": "fedavg", "dp": "dpsgd"})
    run_dir = tmp_path / "dp"
    run_dir.mkdir()
    (run_dir / "ledger.sqlite").write_bytes(path.read_bytes())
    assert main(["audit", str(run_dir), "--empirical"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no example-level releases" in err
    assert main(["audit", str(path), "--empirical", "--confidence", "1.5"]) == 2
    assert "--confidence" in capsys.readouterr().err
