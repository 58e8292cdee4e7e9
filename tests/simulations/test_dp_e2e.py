"""Differentially private runs end to end on Flower's simulation engine (slow)."""

from __future__ import annotations

import json
import subprocess
import sys

import dp_accounting as dpa
import pytest

from privacy.accounting import epsilon
from privacy.ledger import Ledger
from simulations.experiments import resolve
from simulations.runner import simulate

pytestmark = pytest.mark.slow


def rows_of(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_dpsgd_accumulates_epsilon_across_rounds_in_the_ledger(tmp_path) -> None:
    cfg = resolve("digits-dpsgd", {"num-rounds": 2, "num-clients": 3})
    summary = simulate(cfg, tmp_path)
    privacy = summary["privacy"]
    assert privacy["differentially_private"] and privacy["unit"] == "example"
    assert 0.9 * 8.0 < privacy["epsilon"] <= 8.0  # calibrated for 2 rounds, spent them all
    rows = rows_of(tmp_path)
    assert 0 < rows[0]["epsilon"] < rows[1]["epsilon"] == pytest.approx(privacy["epsilon"])
    # Opacus' own accountant on each client (history kept across rounds) accumulates too and agrees with the ledger;
    # it is evaluated at integer RDP orders only, so it may be slightly looser, never much tighter.
    assert 0 < rows[0]["dp_client_epsilon_max"] < rows[1]["dp_client_epsilon_max"]
    assert rows[1]["epsilon"] * 0.99 <= rows[1]["dp_client_epsilon_max"] <= rows[1]["epsilon"] * 1.05
    assert summary["final"]["test_accuracy"] > 0.3
    with Ledger(tmp_path / "ledger.sqlite", create=False) as led:
        releases = led.releases()
        assert len(releases) == 6 and {r.status for r in releases} == {"released"}
        assert {r.participant for r in releases} == {"0", "1", "2"}
        mine = [r.event for r in releases if r.participant == "0"]
        assert led.spent_epsilon("0", "example", 1e-5) == pytest.approx(epsilon(mine, 1e-5))
    assert (tmp_path / "plots" / "epsilon.png").exists()


def test_budget_guard_stops_the_run_before_exceeding_it(tmp_path) -> None:
    out = tmp_path / "run"
    # Calibrated for 6 rounds to ε = 8, but only ε = 5 may be spent: the guard must stop the run early.
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "simulate", "digits-dpsgd", "--set", "num-rounds=6",
         "num-clients=2", "local-epochs=1", "budget-epsilon=5", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_reason"].startswith("privacy budget exhausted before round")
    assert 1 <= summary["rounds_completed"] < 6
    with Ledger(out / "ledger.sqlite", create=False) as led:
        for participant in ("0", "1"):
            assert led.spent_epsilon(participant, "example", 1e-5) <= 5.0
        assert max(r.round for r in led.releases()) == summary["rounds_completed"]


def test_central_dpfedavg_charges_every_user_each_round(tmp_path) -> None:
    cfg = resolve(overrides={"dp": "dpfedavg", "num-rounds": 2, "num-clients": 3, "target-epsilon": 4.0,
                             "clip-norm": 2.0})
    summary = simulate(cfg, tmp_path)
    assert summary["privacy"]["unit"] == "user" and summary["privacy"]["epsilon"] <= 4.0
    with Ledger(tmp_path / "ledger.sqlite", create=False) as led:
        releases = led.releases()
        assert [(r.participant, r.round, r.status) for r in releases] == [("all", 1, "released"),
                                                                          ("all", 2, "released")]
        sigma = releases[0].event.noise_multiplier
        assert isinstance(releases[0].event, dpa.GaussianDpEvent)
        assert led.spent_epsilon("all", "user", 1e-5) == pytest.approx(
            epsilon([dpa.GaussianDpEvent(sigma)] * 2, 1e-5))
    assert all(r["clients"] == 3 for r in rows_of(tmp_path))


@pytest.mark.parametrize(("mechanism", "retrain", "holdout"), [("rr", "continue", 0.0), ("rr-prior", "scratch", 0.2)])
def test_label_dp_charges_each_client_once_across_phases(tmp_path, mechanism: str, retrain: str,
                                                         holdout: float) -> None:
    cfg = resolve("digits-labeldp", {"num-rounds": 4, "retrain-rounds": 2, "num-clients": 3, "local-epochs": 1,
                                     "label-epsilon": 2.0, "label-mechanism": mechanism, "retrain": retrain,
                                     "label-holdout": holdout})
    summary = simulate(cfg, tmp_path)
    with Ledger(tmp_path / "ledger.sqlite", create=False) as led:
        releases = led.releases()
    assert sorted((r.participant, r.round, r.unit, r.status) for r in releases) == [
        (p, 1, "label", "released") for p in ("0", "1", "2")]
    phases = summary["phases"]
    assert phases["noisy_phase"]["rounds"] == 2 and phases["retrain_phase"]["rounds"] == 2
    assert 0 < phases["retrain_phase"]["kept_fraction"] < 1
    # Consensus keeps mostly correct labels: far more precise than the noisy labels themselves.
    assert phases["retrain_phase"]["kept_precision"] > phases["noisy_phase"]["noisy_label_accuracy"] + 0.1
    rows = rows_of(tmp_path)
    assert [r["label_retrain"] for r in rows] == [0, 0, 1, 1]
    if mechanism == "rr-prior":
        assert [r["label_stage"] for r in rows] == [1, 2, 2, 2]
    # With held-out labels every noisy round's model is scored in a federated evaluation (RR labels only, so no
    # further ledger row); the selection is reported. Without, no federated evaluation runs.
    scored = [r.get("federated_holdout_size", 0) for r in rows]
    assert scored == ([scored[0]] * 2 + [0, 0] if holdout else [0] * 4) and (scored[0] > 0) == (holdout > 0)
    assert (phases["noisy_phase"].get("selected_round") in (1, 2)) == (holdout > 0)
    proc = subprocess.run([sys.executable, "-m", "simulations.cli", "audit", str(tmp_path), "--format", "json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    (run,) = report["runs"]
    charged = {e["participant"]: e for e in run["units"]["label"]}
    assert set(charged) == {"0", "1", "2"} and all(e["releases"] == 1 for e in charged.values())
    # The audit's ε is the charged mechanism's: ≤ ε_label (pure ε-DP), and never 0.
    assert all(1.0 < e["epsilon"] <= 2.0 + 1e-9 for e in charged.values())
