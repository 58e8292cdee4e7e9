"""Fault injection through Flower's simulation engine, and resuming after a crash left the run directory
half-written (slow: Ray start-up)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from client.faults import plan_fault
from simulations.experiments import resolve
from simulations.runner import simulate

pytestmark = pytest.mark.slow


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_dropouts_crashes_and_corrupt_replies_are_counted_and_the_run_completes(tmp_path: Path) -> None:
    overrides = {"num-rounds": 3, "num-clients": 6, "fault-drop-rate": 0.2, "fault-crash-rate": 0.1,
                 "fault-malformed-rate": 0.25, "seed": 2}
    cfg = resolve(overrides=overrides)
    # The faults are a function of (seed, client, round): the server's counts are known in advance.
    expected = []
    for rnd in range(1, 4):
        kinds = [plan_fault(cfg.to_dict(), client, rnd).kind for client in range(6)]
        expected.append((kinds.count("none"), kinds.count("drop") + kinds.count("crash"), kinds.count("malformed")))
    assert all(ok for ok, _, _ in expected) and sum(f + r for _, f, r in expected) >= 4  # a test with faults in it

    summary = simulate(cfg, tmp_path)
    rows = rows_of(tmp_path)
    assert [(r["clients"], r["failures"], r["rejected"]) for r in rows] == expected
    for row, (_, failures, rejected) in zip(rows, expected, strict=True):
        assert sum(row.get("failure_reasons", {}).values()) == failures
        assert sum(row.get("rejected_reasons", {}).values()) == rejected
        assert all(reason.startswith("injected fault: ") for reason in row.get("failure_reasons", {}))
    assert summary["stopped_reason"] == "completed" and summary["rounds_completed"] == 3
    assert summary["total_rejected"] == sum(r for _, _, r in expected)
    assert sum(summary["rejected_reasons"].values()) == summary["total_rejected"]
    assert math.isfinite(summary["final"]["test_loss"]) and summary["final"]["test_accuracy"] > 0.5


def test_resume_drops_rows_after_the_checkpoint_and_torn_lines(tmp_path: Path) -> None:
    simulate(resolve(overrides={"num-rounds": 1, "num-clients": 3}), tmp_path)
    # What a crash between "append the metrics row" and "save the checkpoint" leaves, plus a torn last line.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"round": 2, "test_accuracy": -1.0}) + "\n" + '{"round": 3, "test_acc')
    summary = simulate(resolve(overrides={"num-rounds": 2, "num-clients": 3}), tmp_path, resume=True)
    rows = rows_of(tmp_path)
    assert [r["round"] for r in rows] == [1, 2] and rows[1]["test_accuracy"] > 0.5
    assert summary["rounds_completed"] == 2 and summary["stopped_reason"] == "completed"
