"""Crash consistency of a differentially private run: SIGKILL at 20 seeded random points, audit after each kill,
``--resume`` after each kill, and the run finishes (slow: about 8–13 minutes on 2 cores).

How the kill points are chosen. An uninterrupted reference run of the same tiny DP-SGD configuration measures
T0 (start-up until the first round ends) and the time per round. Then one run is driven as a chain: start
(``fedpriv simulate``; after a kill ``fedpriv simulate --resume``, or a fresh start when the kill came before
``config.toml`` existed), SIGKILL the ``fedpriv`` process at ``u · T`` seconds with ``u ~ U(0.02, 1)`` from a
seeded generator and ``T`` the expected time the segment needs to finish (T0 + remaining rounds × round time;
T0 shrinks to what a segment that trained and finished before its kill time took),
then SIGKILL what is left of its process group (Ray's workers and agents, which outlive their parent). Kill
points therefore fall over start-up, ledger writes, training and checkpointing. A segment that finishes before
its kill time ends the chain; the next kill starts a new run. After the 20th kill the last run is resumed
without a kill and must complete.

After every kill: ``fedpriv audit RUN --format json`` must succeed and agree with the ledger file read directly
— every row counted, pending rows included in ε — and every round the run directory records as done (its
metrics row and checkpoint) has a ``released`` row for every client.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from privacy.accounting import epsilon
from privacy.ledger import Ledger
from simulations.cli import main as fedpriv

pytestmark = pytest.mark.slow

KILLS = 20
SEED = 20261123
ROUNDS = 4
CLIENTS = ("0", "1")
CONFIG = ["digits-dpsgd", "--set", f"num-rounds={ROUNDS}", "num-clients=2", "local-epochs=1", "batch-size=64",
          "client-cpus=2", "node-wait-timeout=300"]


def _start(out: Path, resume: bool, log: Path) -> tuple[subprocess.Popen, float]:
    args = ["simulate", "--resume", str(out)] if resume else ["simulate", *CONFIG, "--out", str(out)]
    with open(log, "ab") as f:
        proc = subprocess.Popen([sys.executable, "-m", "simulations.cli", *args], stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc, time.monotonic()


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the fedpriv process (the crash), then whatever of its process group survived it."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    time.sleep(0.5)


def _done_rounds(out: Path) -> int:
    state = out / "checkpoint" / "state.json"
    return int(json.loads(state.read_text())["round"]) if state.is_file() else 0


def _metric_rounds(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    rounds = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rounds.append(int(json.loads(line)["round"]))
    return rounds


def _audit(out: Path) -> dict:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = fedpriv(["audit", str(out), "--format", "json"])
    assert code == 0, buf.getvalue()
    return json.loads(buf.getvalue())


def check_after_kill(out: Path) -> dict:
    """What a crash may leave, checked: the audit agrees with the ledger, done rounds are all recorded."""
    done, metric_rounds = _done_rounds(out), _metric_rounds(out)
    assert set(metric_rounds) <= set(range(1, done + 2))  # at most the round being checkpointed is ahead
    ledger_path = out / "ledger.sqlite"
    if not ledger_path.is_file():  # killed before the first release was even planned
        assert done == 0 and not metric_rounds
        return {"done": 0, "rows": 0, "pending": 0}
    with Ledger(ledger_path, create=False) as led:
        rows = led.releases()
    report = _audit(out)
    (run,) = report["runs"]
    by_participant = {e["participant"]: e for e in run["units"].get("example", [])}
    for participant in {r.participant for r in rows}:
        mine = [r for r in rows if r.participant == participant]
        entry = by_participant[participant]
        assert entry["releases"] == len(mine)
        assert entry["pending"] == sum(r.status == "pending" for r in mine)
        # Pending rows count as spent: the audited ε is that of every row, never less than the released ones'.
        assert entry["epsilon"] == pytest.approx(epsilon([r.event for r in mine], 1e-5), rel=1e-9)
        released = [r.event for r in mine if r.status == "released"]
        if released:
            assert entry["epsilon"] >= epsilon(released, 1e-5) - 1e-9
    # Every round the run directory has as done was released by every client, and recorded before that.
    for rnd in set(range(1, done + 1)) | set(metric_rounds):
        for client in CLIENTS:
            assert any(r.round == rnd and r.participant == client and r.status == "released" for r in rows), \
                (rnd, client)
    assert {r.round for r in rows} <= set(range(1, done + 2))  # nothing is charged beyond the round in flight
    return {"done": done, "rows": len(rows), "pending": sum(r.status == "pending" for r in rows)}


def test_sigkill_at_random_points_then_audit_and_resume(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    t_start = time.monotonic()

    # Reference: the same run, uninterrupted — its timing places the kill points, its ε is the floor.
    ref = tmp_path / "reference"
    proc, t0 = _start(ref, False, tmp_path / "reference.log")
    assert proc.wait(timeout=600) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    total = time.monotonic() - t0
    ref_rows = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    per_round = max(0.5, sum(r["wall_s"] for r in ref_rows[1:]) / max(1, len(ref_rows) - 1))
    startup = max(1.0, total - per_round * (ROUNDS - 1))
    ref_eps = json.loads((ref / "summary.json").read_text())["privacy"]["epsilon"]

    kills: list[dict] = []
    chain, out, resume = 0, tmp_path / "run-0", False
    while len(kills) < KILLS:
        remaining = ROUNDS - _done_rounds(out)
        expected = startup + per_round * max(remaining - 1, 0)
        at = rng.uniform(0.02, 1.0) * expected
        proc, t0 = _start(out, resume, tmp_path / f"run-{chain}.log")
        try:
            proc.wait(timeout=at)
        except subprocess.TimeoutExpired:
            _kill(proc)
            state = check_after_kill(out)
            kills.append({"chain": chain, "at_s": round(at, 2), "resumed": resume, **state})
            print(f"kill {len(kills):2d}: run-{chain} at {at:5.1f}s ({'resume' if resume else 'fresh'}) → "
                  f"{state['done']} rounds done, {state['rows']} ledger rows ({state['pending']} pending)")
            resume = (out / "config.toml").is_file()  # killed before the config existed: start afresh
            continue
        assert proc.returncode == 0, (tmp_path / f"run-{chain}.log").read_text()[-3000:]
        assert json.loads((out / "summary.json").read_text())["stopped_reason"] == "completed"
        if remaining >= 1:  # it trained and finished before its kill time: the machine is faster than it was
            startup = min(startup, max(1.0, time.monotonic() - t0 - per_round * (remaining - 1)))
        chain, out, resume = chain + 1, tmp_path / f"run-{chain + 1}", False

    # The last run finishes with --resume (or a fresh start when its only kill came before config.toml).
    proc, _ = _start(out, resume, tmp_path / f"run-{chain}.log")
    assert proc.wait(timeout=900) == 0, (tmp_path / f"run-{chain}.log").read_text()[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_reason"] == "completed" and summary["rounds_completed"] == ROUNDS
    assert _metric_rounds(out) == list(range(1, ROUNDS + 1))  # every round once, none lost or doubled
    final = check_after_kill(out)
    assert final["done"] == ROUNDS
    # Crashes can only over-charge: ε of the crashed-and-resumed run is at least the uninterrupted run's.
    assert summary["privacy"]["epsilon"] >= ref_eps - 1e-9

    resumed = sum(k["resumed"] for k in kills)
    mid_run = sum(k["rows"] > 0 for k in kills)
    print(f"{len(kills)} kills over {chain + 1} run(s): {resumed} during a resumed segment, {mid_run} after the "
          f"ledger had rows, {sum(k['pending'] > 0 for k in kills)} left pending rows; reference run {total:.1f}s, "
          f"test {time.monotonic() - t_start:.0f}s")
    assert len(kills) == KILLS
    assert mid_run >= 1  # at least some kills landed after releases began (the kill points spread over the run)
