"""FedDM end to end: the `fedpriv` command on Flower's simulation engine (slow: Ray start-up)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_cli_feddm_run_learns_from_synthetic_sets_and_reports_bytes(tmp_path) -> None:
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "simulate", "digits-feddm", "--set", "num-rounds=2",
         "num-clients=4", "feddm-iterations=10", "feddm-images-per-class=5", "server-epochs=20", "server-lr=0.05",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["strategy"] == "feddm" and summary["stopped_reason"] == "completed"
    assert [r["clients"] for r in rows] == [4, 4] and summary["total_rejected"] == summary["total_failures"] == 0
    assert summary["final"]["test_accuracy"] > 0.6  # chance is 0.1
    for row in rows:
        # The uplink is the synthetic sets (≤ 4 clients × 10 classes × 5 images of 8×8 float32), far below the
        # model (≈ 26k float32 parameters) each client receives.
        assert row["feddm_images"] <= 200 and row["feddm_bytes_up"] < row["bytes_up"] < row["bytes_down"] / 2
        assert row["feddm_bytes_down"] == 4 * row["feddm_model_bytes"]
    assert rows[1]["feddm_bytes_up_cum"] == rows[0]["feddm_bytes_up"] + rows[1]["feddm_bytes_up"]
    assert (out / "plots" / "accuracy.png").exists()
