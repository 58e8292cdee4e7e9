"""Run directory files and payload metering."""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from server.loop import contents_bytes, payload_bytes
from server.rundir import RunDir, default_run_dir


def test_default_run_dir_is_unique(tmp_path) -> None:
    a = default_run_dir("digits-fedavg", tmp_path)
    a.mkdir()
    b = default_run_dir("digits-fedavg", tmp_path)
    assert a != b and a.name.startswith("digits-fedavg-") and a.name.endswith("Z")
    assert default_run_dir("exp/mine.toml", tmp_path).name.startswith("mine-")


def test_metrics_summary_checkpoint_round_trip(tmp_path) -> None:
    rd = RunDir(tmp_path / "r")
    rows = [{"round": i, "test_accuracy": 0.5 + i / 10, "test_loss": 1.0 / i, "bytes_up": 10 * i,
             "bytes_down": 20 * i} for i in (1, 2)]
    for row in rows:
        rd.append_metrics(row)
    assert rd.read_metrics() == rows
    rd.write_summary({"x": 1})
    assert json.loads((rd.path / "summary.json").read_text()) == {"x": 1}
    rd.write_config({"num-rounds": 2, "lr": 0.1})
    assert "num-rounds = 2" in (rd.path / "config.toml").read_text()
    assert rd.load_checkpoint() is None
    rd.save_checkpoint(2, {"w": np.arange(3.0)}, {})
    done, arrays, state = rd.load_checkpoint()
    assert done == 2 and state == {} and np.array_equal(arrays["w"], np.arange(3.0))
    rd.write_plots(rows)
    assert (rd.path / "plots" / "accuracy.png").exists() and (rd.path / "plots" / "bytes.png").exists()


def test_payload_bytes_counts_the_serialized_arrays() -> None:
    content = RecordDict({"arrays": ArrayRecord(array_dict={"w": Array(np.zeros(1000, np.float32))}),
                          "config": ConfigRecord({"lr": 0.1})})
    size = payload_bytes(content)
    assert 4000 < size < 4300
    assert contents_bytes([content, content, content]) == 3 * size
