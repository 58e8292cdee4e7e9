"""End-to-end federated runs on the real Flower simulation engine (slow: seconds each, Ray start-up)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import tomllib
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.app import local_fit
from server.loop import RunFailed
from simulations.apps import simulation_data_source
from simulations.experiments import resolve
from simulations.runner import simulate
from tests.conftest import requires_fashion

pytestmark = pytest.mark.slow


def test_cli_run_learns_and_writes_the_run_directory(tmp_path) -> None:
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "simulate", "--set", "num-rounds=2", "num-clients=4",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final test accuracy" in proc.stdout

    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert {"round", "test_accuracy", "test_loss", "bytes_up", "bytes_down", "clients", "wall_s"} <= set(row)
        assert row["clients"] == 4 and row["failures"] == 0 and row["rejected"] == 0
    # Real learning: chance is 0.1 on ten digits.
    assert summary["final"]["test_accuracy"] == rows[-1]["test_accuracy"] > 0.6
    assert summary["stopped_reason"] == "completed" and summary["rounds_completed"] == 2
    # Bytes are the serialized payloads: each direction carries 4 copies of the model (~100 KiB each).
    params = 64 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10
    for key in ("bytes_up", "bytes_down"):
        assert 4 * 4 * params < rows[0][key] < 4 * 4 * params * 1.1
    assert summary["total_bytes_up"] == sum(r["bytes_up"] for r in rows)
    with open(out / "config.toml", "rb") as f:
        config = tomllib.load(f)
    assert (config["num-rounds"], config["num-clients"], config["experiment"]) == (2, 4, "digits-fedavg")
    assert (out / "plots" / "accuracy.png").stat().st_size > 1000
    assert (out / "plots" / "bytes.png").stat().st_size > 1000
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["round"] == 2 and (out / "checkpoint" / "model.npz").exists()


def faulty_client_app() -> ClientApp:
    """Partition 0 replies NaN weights, 1 raises, 2 omits its example count; the rest behave."""
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        cfg = dict(msg.content["config"])
        pid = int(context.node_config["partition-id"])
        if pid == 1:
            raise RuntimeError("client crashed")
        content = local_fit(msg.content["arrays"], cfg, simulation_data_source(context, cfg), seed=pid)
        if pid == 0:
            state = content["arrays"].to_torch_state_dict()
            state["net.1.weight"] = torch.full_like(state["net.1.weight"], math.nan)
            content = RecordDict({"arrays": ArrayRecord(state), "metrics": content["metrics"]})
        if pid == 2:
            content = RecordDict({"arrays": content["arrays"], "metrics": MetricRecord({"train-loss": 0.0})})
        return Message(content=content, reply_to=msg)

    return app


def test_malformed_and_failing_clients_do_not_break_a_round(tmp_path) -> None:
    cfg = resolve(overrides={"num-rounds": 2, "num-clients": 5})
    summary = simulate(cfg, tmp_path, client_app=faulty_client_app())
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["clients"], r["failures"], r["rejected"]) for r in rows] == [(2, 1, 2)] * 2
    assert summary["stopped_reason"] == "completed"
    assert math.isfinite(summary["final"]["test_loss"]) and summary["final"]["test_accuracy"] > 0.3


def crashing_client_app() -> ClientApp:
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        raise RuntimeError("no data on this device")

    return app


def test_a_round_with_no_usable_reply_fails_the_run_and_records_why(tmp_path) -> None:
    cfg = resolve(overrides={"num-rounds": 3, "num-clients": 2})
    with pytest.raises(RunFailed, match="round 1: no client returned a usable update"):
        simulate(cfg, tmp_path, client_app=crashing_client_app())
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stopped_reason"].startswith("failed: round 1: no client returned a usable update")
    assert summary["rounds_completed"] == 0


def test_resume_continues_from_the_last_checkpoint(tmp_path) -> None:
    simulate(resolve(overrides={"num-rounds": 1, "num-clients": 3}), tmp_path)
    summary = simulate(resolve(overrides={"num-rounds": 2, "num-clients": 3}), tmp_path, resume=True)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert summary["rounds_completed"] == 2
    assert rows[1]["test_accuracy"] > rows[0]["test_accuracy"]


@requires_fashion
def test_fashion_cnn_round_trip(tmp_path) -> None:
    """The Fashion-MNIST path end to end: IDX files read in the clients, the CNN, Dirichlet partitions."""
    cfg = resolve("fashion-fedavg", {"num-rounds": 1, "num-clients": 2, "dirichlet-alpha": 5.0})
    summary = simulate(cfg, tmp_path)
    assert summary["stopped_reason"] == "completed"
    assert summary["final"]["test_accuracy"] > 0.6  # chance is 0.1
