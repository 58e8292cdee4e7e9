"""Federated LoRA runs: the public/private split, adapters-only rounds, resume; the bundled experiment end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from client.app import build_client_app
from models.lora import file_sha256
from server.app import run_server
from server.loop import payload_bytes
from server.setup import ServerSetup
from simulations.apps import lora_split, partition_data, public_data
from simulations.apps import test_data as held_out
from simulations.datasets import load_dataset
from simulations.experiments import resolve
from simulations.inprocess import InProcessGrid, run_in_process
from tests.conftest import requires_fashion

DIGITS_LORA = {"lora-rank": 4, "num-clients": 3, "num-rounds": 2, "optimizer": "lora-rite", "lr": 0.01,
               "lora-pretrain-epochs": 10, "lora-pretrain-lr": 0.003, "local-epochs": 2}


def _adapter_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def test_public_split_is_half_of_the_public_classes_and_clients_never_get_it() -> None:
    cfg = resolve(overrides=DIGITS_LORA)
    ds = load_dataset("digits")
    pub, priv = lora_split(ds.y_train, cfg.to_dict())
    assert len(np.intersect1d(pub, priv)) == 0 and len(pub) + len(priv) == len(ds.y_train)
    assert set(ds.y_train[pub].tolist()) == {0, 1, 2, 3, 4}
    for c in range(5):  # half of each public class's examples
        assert abs(np.sum(ds.y_train[pub] == c) - 0.5 * np.sum(ds.y_train == c)) <= 0.5
    public = public_data(cfg)
    assert public is not None and len(public.y) == len(pub)
    clients = [partition_data(cfg.to_dict(), i, 3) for i in range(3)]
    seen = np.concatenate([c.x.reshape(len(c.x), -1) for c in clients])
    assert len(seen) == len(priv)  # the clients hold exactly the private pool
    pub_rows = {row.tobytes() for row in public.x.reshape(len(public.x), -1)}
    priv_rows = {row.tobytes() for row in ds.x_train[priv].reshape(len(priv), -1)}
    assert not {row.tobytes() for row in seen} & (pub_rows - priv_rows)
    assert public_data(resolve()) is None  # no LoRA, no public split


def test_in_process_run_sends_only_adapters_learns_and_resumes(tmp_path) -> None:
    cfg = resolve(overrides=DIGITS_LORA)
    clients = [partition_data(cfg.to_dict(), i, 3) for i in range(3)]
    summary, rows, _ = run_in_process(cfg, clients, held_out(cfg), tmp_path, public_data(cfg))
    lora = summary["lora"]
    assert lora["adapter_params"] == 4 * ((64 + 128) + (128 + 128) + (128 + 10)) == 2344
    assert lora["public_classes"] == [0, 1, 2, 3, 4] and lora["base_test_accuracy"] < 0.6  # half the classes
    assert summary["final"]["test_accuracy"] > lora["base_test_accuracy"] + 0.2  # the adapters learn the rest
    saved = _adapter_arrays(tmp_path / "checkpoint" / "model.npz")
    assert sum(a.size for a in saved.values()) == lora["adapter_params"]
    assert all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in saved)
    for key in (k for k in saved if k.endswith("lora_A.weight")):  # lora-balance: equal norms after aggregation
        norm_b = np.linalg.norm(saved[key.replace("lora_A", "lora_B")])
        assert np.isclose(np.linalg.norm(saved[key]), norm_b, rtol=1e-4) and norm_b > 0
    # each reply is the adapters plus the metrics, nothing else
    reply = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in saved.items()}),
                        "metrics": MetricRecord({"train-loss": 0.5, "num-examples": 400, "unit-weight": 1})})
    for row in rows:
        assert abs(row["bytes_up"] / row["clients"] - payload_bytes(reply)) <= 8
        assert row["bytes_up"] < 4 * lora["base_params"]
    assert lora["base_sha256"] == file_sha256(tmp_path / "base" / "model.npz")

    # resume: one more round on the saved base (not pretrained again)
    more = resolve(overrides=DIGITS_LORA | {"num-rounds": 3})
    grid = InProcessGrid(build_client_app(lambda ctx, _cfg: clients[int(ctx.node_config["partition-id"])]), 3)
    resumed = run_server(grid, ServerSetup(config=more, test_data=held_out(more), run_dir=tmp_path, resume=True))
    assert resumed["rounds_completed"] == 3 and resumed["lora"]["base_sha256"] == lora["base_sha256"]
    assert resumed["lora"]["pretrain_s"] == lora["pretrain_s"]  # read back from base/info.json


@pytest.mark.slow
@requires_fashion
def test_fashion_lora_rite_end_to_end_moves_only_adapters(tmp_path) -> None:
    """The bundled experiment through `fedpriv simulate` (Flower's engine), shrunk: 3 sampled clients of 60, a
    600-image public split, one round."""
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "simulate", "fashion-lora-rite", "--set", "num-rounds=1",
         "num-clients=60", "fraction-train=0.05", "lora-public-fraction=0.02", "lora-pretrain-epochs=1",
         "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "federated LoRA: 14,928 adapter parameters travel" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    (row,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lora = summary["lora"]
    assert (lora["adapter_params"], lora["base_params"], lora["rank"]) == (14928, 72074, 8)
    assert lora["public_examples"] == 600 and lora["public_classes"] == [0, 1, 2, 3, 4]
    saved = _adapter_arrays(out / "checkpoint" / "model.npz")
    assert sum(a.size for a in saved.values()) == 14928 and len(saved) == 26
    reply = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in saved.items()}),
                        "metrics": MetricRecord({"train-loss": 0.5, "num-examples": 990, "unit-weight": 1})})
    assert row["clients"] == 3 and row["failures"] == row["rejected"] == 0
    assert abs(row["bytes_up"] / 3 - payload_bytes(reply)) <= 8  # payload = the adapters' 4 × 14,928 bytes + framing
    assert 4 * 14928 < row["bytes_up"] / 3 < 4 * 14928 + 6000 < 4 * 72074
    assert row["bytes_down"] / 3 < 4 * 14928 + 20000  # adapters + the config record, not the base
    # the clients read the base the server wrote; it is unchanged
    assert lora["base_sha256"] == file_sha256(out / "base" / "model.npz")
    with np.load(out / "base" / "model.npz") as z:
        assert sum(z[k].size for k in z.files) == 72074 and not any("lora" in k for k in z.files)


@pytest.mark.parametrize("dp", ["dpsgd", "dpfedavg"])
def test_dp_modes_train_adapters_only(tmp_path, dp: str) -> None:
    """Client DP-SGD on the adapters (Opacus-compatible LoRA layers) and central DP-FedAvg over the adapters: the
    ledger records the releases, and still only adapters travel."""
    cfg = resolve(overrides=DIGITS_LORA | {"dp": dp, "num-rounds": 1, "lora-pretrain-epochs": 2})
    clients = [partition_data(cfg.to_dict(), i, 3) for i in range(3)]
    summary, rows, _ = run_in_process(cfg, clients, held_out(cfg), tmp_path, public_data(cfg))
    assert summary["stopped_reason"] == "completed" and rows[0]["clients"] == 3
    assert summary["privacy"]["differentially_private"] and 0 < rows[0]["epsilon"] <= cfg.target_epsilon + 1e-6
    saved = _adapter_arrays(tmp_path / "checkpoint" / "model.npz")
    assert sum(a.size for a in saved.values()) == summary["lora"]["adapter_params"] == 2344
