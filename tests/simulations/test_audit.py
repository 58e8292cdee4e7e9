"""`fedpriv audit`: ε recomputed from the ledger equals dp-accounting; bad input is one line and exit 2."""

from __future__ import annotations

import json

import dp_accounting as dpa
import pytest

from privacy.ledger import Ledger
from privacy.mechanisms import RandomizedResponse
from simulations.cli import main
from tests.oracles import dpa_rdp_epsilon

DELTA = 1e-5
SAMPLED = dpa.PoissonSampledDpEvent(0.02, dpa.GaussianDpEvent(0.9))


def rdp_eps(*events: dpa.DpEvent) -> float:
    return dpa_rdp_epsilon(*events, delta=DELTA)


@pytest.fixture
def ledger_path(tmp_path):
    path = tmp_path / "ledger.sqlite"
    with Ledger(path) as led:
        led.register_run("r1", "fixed", {"target-delta": DELTA})
        led.begin_release("r1", 1, ["gauss"], "example", dpa.GaussianDpEvent(1.7), "gaussian")
        for rnd in range(1, 6):  # sampled Gaussian, 50 steps a round for 5 rounds
            with led.release("r1", rnd, ["sgd"], "example", dpa.SelfComposedDpEvent(SAMPLED, 50), "dpsgd"):
                pass
        led.begin_release("r1", 0, ["rr"], "label", RandomizedResponse(2.0, 10).dp_event(), "rr")
        for event in (dpa.GaussianDpEvent(3.0), dpa.SelfComposedDpEvent(SAMPLED, 100),
                      RandomizedResponse(1.0, 10).dp_event()):
            led.begin_release("r1", 2, ["mixed"], "user", event, type(event).__name__)
    return path


def audit_json(capsys, *argv: str) -> dict:
    assert main(["audit", *argv, "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_audit_epsilons_equal_dp_accounting(ledger_path, capsys) -> None:
    report = audit_json(capsys, str(ledger_path))
    units = report["runs"][0]["units"]
    got = {r["participant"]: r for rows in units.values() for r in rows}
    assert got["gauss"]["epsilon"] == pytest.approx(rdp_eps(dpa.GaussianDpEvent(1.7)), rel=1e-6)
    assert got["sgd"]["epsilon"] == pytest.approx(rdp_eps(dpa.SelfComposedDpEvent(SAMPLED, 250)), rel=1e-6)
    assert got["rr"]["epsilon"] == pytest.approx(2.0, rel=1e-9)
    mixed = 1.0 + rdp_eps(dpa.GaussianDpEvent(3.0), dpa.SelfComposedDpEvent(SAMPLED, 100))
    assert got["mixed"]["epsilon"] == pytest.approx(mixed, rel=1e-6)
    # History: ε after each round of the sampled Gaussian, strictly increasing.
    series = [e for _, e in got["sgd"]["epsilon_by_round"]]
    assert series == sorted(series) and len(set(series)) == 5
    assert got["sgd"]["releases"] == 5 and got["sgd"]["pending"] == 0 and got["gauss"]["pending"] == 1


def test_budget_and_delta_options(ledger_path, capsys) -> None:
    report = audit_json(capsys, str(ledger_path), "--budget", "10", "--delta", "1e-6")
    row = next(r for r in report["runs"][0]["units"]["example"] if r["participant"] == "gauss")
    assert report["delta"] == 1e-6
    assert row["remaining"] == pytest.approx(10 - row["epsilon"])


def test_table_and_html(ledger_path, capsys) -> None:
    assert main(["audit", str(ledger_path)]) == 0
    assert "sgd" in capsys.readouterr().out
    assert main(["audit", str(ledger_path), "--format", "html"]) == 0
    page = capsys.readouterr().out
    assert page.startswith("<!doctype html>") and "data:image/png;base64," in page and "dpsgd" in page


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["/nonexistent/run"], "fedpriv: error: no run directory or ledger at /nonexistent/run"),
        (["LEDGER", "--delta", "1.5"], "fedpriv: error: --delta: expected a value > 0 and < 1, got 1.5"),
        (["LEDGER", "--delta", "-0.1"], "fedpriv: error: --delta: expected a value > 0 and < 1, got -0.1"),
        (["LEDGER", "--budget", "-2"], "fedpriv: error: --budget: expected a value > 0, got -2.0"),
        (["LEDGER", "--format", "pdf"], "fedpriv: error: --format: expected one of table, json, html, got 'pdf'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(ledger_path, capsys, argv: list[str], line: str) -> None:
    argv = [str(ledger_path) if a == "LEDGER" else a for a in argv]
    assert main(["audit", *argv]) == 2
    assert capsys.readouterr().err.strip() == line


def test_corrupt_ledger_and_non_dp_run(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"\x00garbage" * 64)
    assert main(["audit", str(bad)]) == 2
    assert capsys.readouterr().err.strip().startswith(f"fedpriv: error: {bad} is not a readable fedpriv ledger")
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text('{"privacy": {"differentially_private": false}}')
    assert main(["audit", str(run)]) == 2
    assert "holds no privacy ledger" in capsys.readouterr().err
