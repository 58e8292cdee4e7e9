"""FedDM's server: reply checks, training on the union, bytes, and the DP wrapper's calibration and ledger rows.

The federated tests run the real ServerApp logic and ClientApp in-process (:mod:`simulations.inprocess`) on
digits: seconds, no Ray.
"""

from __future__ import annotations

import logging
import re

import dp_accounting as dpa
import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.app import build_client_app
from client.data import ClientData
from privacy.accounting import epsilon
from privacy.ledger import Ledger
from privacy.mechanisms import self_composed
from server import setup as server_setup
from server.app import initial_arrays, make_central_eval, run_server
from simulations.datasets import load_digits
from simulations.experiments import resolve
from simulations.inprocess import InProcessGrid, run_in_process
from strategies.feddm import check_synthetic_set, make_feddm
from strategies.feddm_dp import FedDMDp
from tests.oracles import dpa_rdp_epsilon

SHAPE = (1, 8, 8)
FAST = {"strategy": "feddm", "num-clients": 4, "num-rounds": 1, "feddm-iterations": 20, "feddm-images-per-class": 5,
        "server-epochs": 40, "server-lr": 0.05, "partition": "iid"}


def reply(images: np.ndarray | None = None, labels: np.ndarray | None = None, **metrics) -> RecordDict:
    images = np.full((4, *SHAPE), 0.5, np.float32) if images is None else images
    labels = np.array([0, 1, 2, 9]) if labels is None else labels
    return RecordDict({"synthetic": ArrayRecord(array_dict={"images": Array(images), "labels": Array(labels)}),
                       "metrics": MetricRecord({"num-examples": len(labels)} | metrics)})


def nan_images() -> np.ndarray:
    x = np.full((4, *SHAPE), 0.5, np.float32)
    x[1, 0, 2, 3] = np.nan
    return x


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (reply(nan_images()), "synthetic images have non-finite values"),
        (reply(np.full((4, *SHAPE), np.inf, np.float32)), "synthetic images have non-finite values"),
        (reply(np.full((4, 1, 7, 8), 0.5, np.float32)), "synthetic images: expected float32[M, 1, 8, 8], got "
                                                         "float32[4, 1, 7, 8]"),
        (reply(np.full((4, *SHAPE), 0.5)), "synthetic images: expected float32[M, 1, 8, 8], got float64[4, 1, 8, 8]"),
        (reply(labels=np.array([0, 1, 10, 3])), "synthetic labels: expected classes 0..9, got values in [0, 10]"),
        (reply(labels=np.array([0, -1, 2, 3])), "synthetic labels: expected classes 0..9, got values in [-1, 3]"),
        (reply(labels=np.array([0, 1, 2])), "synthetic labels: expected int64[4] (one per image), got int64[3]"),
        (reply(np.full((12, *SHAPE), 0.5, np.float32), np.zeros(12, np.int64)),
         "synthetic set: 12 images, more than feddm-max-images=10"),
        (reply(np.full((4, *SHAPE), 1.5, np.float32)),
         "synthetic images: expected pixel values in [0, 1], got values in [1.5, 1.5]"),
        (reply(np.zeros((0, *SHAPE), np.float32), np.zeros(0, np.int64)),
         "synthetic set: expected at least one image, got 0"),
        (reply(**{"num-examples": 5}), "metric 'num-examples': expected 4 (the number of synthetic images), got 5"),
        (RecordDict({"arrays": ArrayRecord(array_dict={"w": Array(np.zeros(3, np.float32))}),
                     "metrics": MetricRecord({"num-examples": 3})}),
         "expected exactly one ArrayRecord 'synthetic', got ['arrays']"),
    ],
)
def test_malformed_synthetic_sets_are_rejected_with_a_reason(content: RecordDict, reason: str) -> None:
    assert check_synthetic_set(reply(), SHAPE, 10, max_images=10) is None
    assert check_synthetic_set(content, SHAPE, 10, max_images=10) == reason


@pytest.fixture(scope="module")
def digits_clients() -> tuple[list[ClientData], server_setup.TestData]:
    ds = load_digits()
    parts = np.array_split(np.random.default_rng(0).permutation(len(ds.y_train)), 4)
    clients = [ClientData(ds.x_train[p], ds.y_train[p], 10, str(i)) for i, p in enumerate(parts)]
    return clients, server_setup.TestData(ds.x_test, ds.y_test, 10)


def test_server_training_on_the_union_beats_the_starting_model(tmp_path, digits_clients) -> None:
    clients, test = digits_clients
    cfg = resolve("digits-feddm", FAST | {"num-rounds": 2})
    summary, rows, grid = run_in_process(cfg, clients, test, tmp_path)
    _, start = make_central_eval(cfg, test)(initial_arrays(cfg, test))
    assert start < 0.2 and rows[0]["test_accuracy"] > 0.6 and summary["final"]["test_accuracy"] > 0.7
    assert [r["clients"] for r in rows] == [4, 4] and all(r["rejected"] == r["failures"] == 0 for r in rows)
    # Bytes from the real payloads: 4 sets of ≤ 10 classes × 5 images × (8·8 float32 + int64 label) + npy headers.
    one = rows[0]
    assert one["feddm_images"] <= 4 * 50
    assert one["feddm_images"] * (64 * 4 + 8) < one["feddm_bytes_up"] < one["feddm_images"] * (64 * 4 + 8) + 4 * 512
    assert one["feddm_bytes_up"] < one["bytes_up"] < one["feddm_bytes_up"] + 4 * 2048  # plus the message envelope
    assert rows[1]["feddm_bytes_up_cum"] == rows[0]["feddm_bytes_up"] + rows[1]["feddm_bytes_up"]
    assert one["feddm_bytes_down"] == 4 * one["feddm_model_bytes"] and one["feddm_bytes_up"] < one["feddm_bytes_down"]
    assert len(grid.client_seconds) == 8 and one["feddm_client_seconds_mean"] > 0


def faulty_client_app(clients: list[ClientData]) -> ClientApp:
    """Partition 0 replies NaN images, 1 labels out of range, 2 too many images, 3 raises; the rest behave."""
    real = build_client_app(lambda ctx, _cfg: clients[int(ctx.node_config["partition-id"])])
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        if pid == 3:
            raise RuntimeError("client crashed")
        out = real(msg, context)
        syn = out.content["synthetic"]
        x, y = syn["images"].numpy().copy(), syn["labels"].numpy().copy()
        if pid == 0:
            x[0, 0, 0, 0] = np.nan
        elif pid == 1:
            y[-1] = 10
        elif pid == 2:
            x, y = np.concatenate([x] * 30), np.concatenate([y] * 30)
        content = RecordDict({"synthetic": ArrayRecord(array_dict={"images": Array(x), "labels": Array(y)}),
                              "metrics": MetricRecord({**dict(out.content["metrics"]), "num-examples": len(y)})})
        return Message(content=content, reply_to=msg)

    return app


def test_malformed_replies_are_rejected_and_the_round_goes_on(tmp_path, caplog, digits_clients) -> None:
    clients, test = digits_clients
    clients = clients + [ClientData(c.x[::2], c.y[::2], 10, f"{i + 4}") for i, c in enumerate(clients)]
    cfg = resolve("digits-feddm", FAST | {"num-clients": 6, "feddm-max-images": 500})
    grid = InProcessGrid(faulty_client_app(clients[:6]), 6)
    with caplog.at_level(logging.WARNING, logger="fedpriv"):
        summary = run_server(grid, server_setup.ServerSetup(config=cfg, test_data=test, run_dir=tmp_path))
    assert summary["stopped_reason"] == "completed" and summary["total_rejected"] == 3
    assert summary["total_failures"] == 1 and summary["final"]["test_accuracy"] > 0.5
    log = caplog.text
    assert re.search(r"rejected reply: node 1: .*non-finite values", log)  # the loop's generic payload check
    assert "rejected reply: node 2: synthetic labels: expected classes 0..9, got values in [0, 10]" in log
    assert re.search(r"rejected reply: node 3: synthetic set: \d{3,} images, more than feddm-max-images=500", log)
    assert "client failure: node 4: RuntimeError: client crashed" in log


# -- DP ---------------------------------------------------------------------------------------------------------
def test_dp_calibration_meets_the_target_over_rounds_times_releases() -> None:
    base = make_feddm(4, 1.0, 0.0, model="mlp", input_shape=SHAPE, num_classes=10, max_images=100, server_epochs=1,
                      server_lr=0.1, server_batch_size=8)
    dp = FedDMDp(base, target_epsilon=4.0, target_delta=1e-5, num_rounds=3, releases=5, clip_norm=1.0)
    assert dp.round_event() == self_composed(dpa.GaussianDpEvent(dp.sigma), 6)
    spent = epsilon([dp.round_event()] * 3, 1e-5)
    assert 0.99 * 4.0 < spent <= 4.0  # calibrated for 3 rounds × 6 releases, and tight
    assert dpa_rdp_epsilon(dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(dp.sigma), 18), delta=1e-5) == pytest.approx(
        spent, rel=1e-6)
    fixed = FedDMDp(base, target_epsilon=4.0, target_delta=1e-5, num_rounds=3, releases=5, clip_norm=1.0,
                    noise_multiplier=7.0)
    assert fixed.sigma == 7.0
    bad = reply(**{"feddm-dp-releases": 5})
    assert dp.validate_reply(bad, ArrayRecord(), 1) == ("metric 'feddm-dp-releases': expected 6 (the planned "
                                                        "releases), got 5")
    assert dp.validate_reply(reply(**{"feddm-dp-releases": 6}), ArrayRecord(), 1) is None


def test_dp_run_records_every_release_before_upload_and_matches_dp_accounting(tmp_path, digits_clients) -> None:
    clients, test = digits_clients
    cfg = resolve("digits-feddm", FAST | {"dp": "feddm-dp", "num-rounds": 2, "num-clients": 3, "feddm-dp-releases": 3,
                                          "target-epsilon": 6.0, "clip-norm": 1.0})
    ledger_path = tmp_path / "ledger.sqlite"
    seen: list[tuple[str, int, str]] = []  # what the ledger held when each client ran
    real = build_client_app(lambda ctx, _cfg: clients[int(ctx.node_config["partition-id"])])
    app = ClientApp()

    @app.query()
    def _query(msg: Message, context: Context) -> Message:
        return real(msg, context)

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        with Ledger(ledger_path, create=False) as led:
            mine = [r for r in led.releases() if r.participant == str(context.node_config["partition-id"])
                    and r.round == int(msg.content["config"]["server-round"])]
        seen.extend((r.participant, r.round, r.status) for r in mine)
        return real(msg, context)

    summary = run_server(InProcessGrid(app, 3), server_setup.ServerSetup(config=cfg, test_data=test, run_dir=tmp_path))
    assert sorted(seen) == [(p, r, "pending") for p in "012" for r in (1, 2)]  # written before the client ran
    privacy = summary["privacy"]
    assert privacy["unit"] == "example" and privacy["mechanism"] == "feddm-dp"
    with Ledger(ledger_path, create=False) as led:
        rows = led.releases()
        assert len(rows) == 6 and {r.status for r in rows} == {"released"}
        sigma = rows[0].event.event.noise_multiplier
        assert all(r.event == dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(sigma), 4) for r in rows)
        for p in "012":
            spent = led.spent_epsilon(p, "example", 1e-5)
            assert spent == pytest.approx(dpa_rdp_epsilon(*[r.event for r in rows if r.participant == p],
                                                          delta=1e-5), rel=1e-9)
            assert 0.99 * 6.0 < spent <= 6.0
    assert privacy["epsilon"] == pytest.approx(max(led_eps for led_eps in privacy["epsilon_by_participant"].values()))
    assert summary["final"]["test_accuracy"] > 0.2  # learns something through the noise
