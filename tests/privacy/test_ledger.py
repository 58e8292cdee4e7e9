"""The ledger: write-ahead rule, sharing, errors, and ε recomputed from the stored events."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3

import dp_accounting as dpa
import pytest

from privacy.accounting import epsilon
from privacy.budget import BudgetPolicy
from privacy.ledger import SCHEMA_VERSION, Ledger, LedgerError
from privacy.mechanisms import RandomizedResponse

DELTA = 1e-5
STEP = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(0.05, dpa.GaussianDpEvent(1.0)), 20)


@pytest.fixture
def ledger(tmp_path):
    with Ledger(tmp_path / "ledger.sqlite") as led:
        led.register_run("run-a", "digits-dpsgd", {"num-rounds": 3})
        yield led


def test_a_crash_between_pending_and_released_is_still_charged(ledger: Ledger) -> None:
    with pytest.raises(RuntimeError, match="upload failed"), \
            ledger.release("run-a", 1, ["client-0"], "example", STEP, "dpsgd"):
        raise RuntimeError("upload failed")
    (row,) = ledger.releases()
    assert row.status == "pending" and row.event == STEP
    assert ledger.spent_epsilon("client-0", "example", DELTA) == pytest.approx(epsilon([STEP], DELTA))
    with ledger.release("run-a", 2, ["client-0"], "example", STEP, "dpsgd"):
        pass
    assert [r.status for r in ledger.releases()] == ["pending", "released"]
    assert ledger.spent_epsilon("client-0", "example", DELTA) == pytest.approx(epsilon([STEP, STEP], DELTA))


def test_pending_rows_are_durable_before_release_returns(ledger: Ledger, tmp_path) -> None:
    ledger.begin_release("run-a", 1, ["c1", "c2"], "example", STEP, "dpsgd")
    # Another connection (another process would be the same) already sees both rows.
    rows = sqlite3.connect(tmp_path / "ledger.sqlite").execute("SELECT participant, status FROM releases").fetchall()
    assert sorted(rows) == [("c1", "pending"), ("c2", "pending")]


def test_central_releases_count_for_every_participant_of_the_unit(ledger: Ledger) -> None:
    central = dpa.GaussianDpEvent(3.0)
    ledger.begin_release("run-a", 1, ["all"], "user", central, "dpfedavg")
    ledger.begin_release("run-a", 1, ["u7"], "user", central, "other")
    assert ledger.spent_epsilon("u7", "user", DELTA) == pytest.approx(epsilon([central, central], DELTA))
    assert ledger.spent_epsilon("u8", "user", DELTA) == pytest.approx(epsilon([central], DELTA))
    assert ledger.spent_epsilon("u7", "example", DELTA) == 0.0


def test_runs_share_a_ledger_and_epsilon_composes_across_them(ledger: Ledger, tmp_path) -> None:
    rr = RandomizedResponse(1.0, 10).dp_event()
    ledger.begin_release("run-a", 0, ["c"], "label", rr, "rr")
    with Ledger(tmp_path / "ledger.sqlite") as second:  # a second handle on the same file
        second.register_run("run-b", "digits-labeldp", {})
        second.begin_release("run-b", 0, ["c"], "label", rr, "rr")
    assert ledger.spent_epsilon("c", "label", DELTA) == pytest.approx(2.0)
    assert ledger.spent_epsilon("c", "label", DELTA, run_id="run-b") == pytest.approx(1.0)
    assert [r["run_id"] for r in ledger.runs()] == ["run-a", "run-b"]


def _writer(path: str, name: str) -> None:
    with Ledger(path) as led:
        led.register_run(name, "x", {})
        for rnd in range(20):
            with led.release(name, rnd, [name], "example", STEP, "dpsgd"):
                pass


def test_concurrent_processes_lose_no_row(tmp_path) -> None:
    path = str(tmp_path / "shared.sqlite")
    Ledger(path).close()
    procs = [mp.get_context("spawn").Process(target=_writer, args=(path, f"w{i}")) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    with Ledger(path) as led:
        assert len(led.releases(status="released")) == 60


def test_epsilon_by_round_accumulates(ledger: Ledger) -> None:
    for rnd in (1, 2, 3):
        ledger.begin_release("run-a", rnd, ["c"], "example", STEP, "dpsgd")
    series = ledger.epsilon_by_round("c", "example", DELTA, "run-a")
    assert [r for r, _ in series] == [1, 2, 3]
    assert series[0][1] < series[1][1] < series[2][1]
    assert series[2][1] == pytest.approx(epsilon([STEP] * 3, DELTA))


def test_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(LedgerError, match=f"no ledger at {tmp_path / 'missing.sqlite'}"):
        Ledger(tmp_path / "missing.sqlite", create=False)
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(LedgerError, match="is not a readable fedpriv ledger"):
        Ledger(garbage)
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(LedgerError, match="not a fedpriv ledger"):
        Ledger(other)
    newer = tmp_path / "newer.sqlite"
    Ledger(newer).close()
    con = sqlite3.connect(newer)
    con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    con.commit()
    con.close()
    with pytest.raises(LedgerError, match=f"schema version {SCHEMA_VERSION + 1}"):
        Ledger(newer)


def test_bad_release_arguments(ledger: Ledger) -> None:
    with pytest.raises(ValueError, match="unit must be one of example, label, user"):
        ledger.begin_release("run-a", 1, ["c"], "row", STEP, "x")
    with pytest.raises(ValueError, match="is not registered"):
        ledger.begin_release("run-z", 1, ["c"], "example", STEP, "x")


def test_budget_refuses_what_would_exceed_and_allows_what_fits(ledger: Ledger) -> None:
    one = epsilon([STEP], DELTA)
    two = epsilon([STEP, STEP], DELTA)
    policy = BudgetPolicy(epsilon=(one + two) / 2, delta=DELTA, unit="example")
    first = policy.check(ledger, "c", STEP, "run-a")
    assert first.allowed and first.spent == 0.0 and first.would_spend == pytest.approx(one)
    ledger.begin_release("run-a", 1, ["c"], "example", STEP, "dpsgd")
    second = policy.check(ledger, "c", STEP, "run-a")
    assert not second.allowed and second.would_spend == pytest.approx(two)
    assert "budget" in second.reason
    with pytest.raises(ValueError, match="budget epsilon must be a finite number > 0"):
        BudgetPolicy(epsilon=-1.0, delta=DELTA, unit="example")
    with pytest.raises(ValueError, match="budget delta must be in"):
        BudgetPolicy(epsilon=1.0, delta=1.0, unit="example")
