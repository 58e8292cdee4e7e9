"""Client-side fault injection: seeded and reproducible, at the configured rates, and every corruption it makes is
rejected by the server's reply checks."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from client.faults import (
    CORRUPTIONS,
    CRASH_EXIT_CODE,
    InjectedCrash,
    InjectedDrop,
    after_training,
    before_training,
    corrupt,
    faults_enabled,
    plan_fault,
)
from server.config import ConfigError, resolve_config
from server.loop import check_reply, short_reason
from strategies.fedavg import make_fedavg
from strategies.feddm import make_feddm

REF = ArrayRecord(array_dict={"w": Array(np.zeros((4, 3), np.float32)), "b": Array(np.zeros(4, np.float32))})


def update() -> RecordDict:
    return RecordDict({"arrays": ArrayRecord(array_dict={"w": Array(np.ones((4, 3), np.float32)),
                                                         "b": Array(np.ones(4, np.float32))}),
                       "metrics": MetricRecord({"train-loss": 0.5, "num-examples": 10, "unit-weight": 1})})


def synthetic() -> RecordDict:
    return RecordDict({"synthetic": ArrayRecord(array_dict={
        "images": Array(np.full((3, 1, 8, 8), 0.5, np.float32)), "labels": Array(np.array([0, 1, 2]))}),
        "metrics": MetricRecord({"num-examples": 3, "train-loss": 0.1})})


def test_faults_are_seeded_per_client_and_round_at_the_configured_rates() -> None:
    cfg = {"seed": 4, "fault-drop-rate": 0.3, "fault-crash-rate": 0.1, "fault-malformed-rate": 0.2, "fault-delay": 2.0}
    assert faults_enabled(cfg) and not faults_enabled({"seed": 4, "fault-drop-rate": 0.0})
    plans = [plan_fault(cfg, client, rnd) for client in range(100) for rnd in range(1, 41)]
    assert plans == [plan_fault(cfg, client, rnd) for client in range(100) for rnd in range(1, 41)]  # reproducible
    share = {k: sum(p.kind == k for p in plans) / len(plans) for k in ("drop", "crash", "malformed", "none")}
    assert share["drop"] == pytest.approx(0.3, abs=0.02) and share["crash"] == pytest.approx(0.1, abs=0.015)
    assert share["malformed"] == pytest.approx(0.2, abs=0.02) and share["none"] == pytest.approx(0.4, abs=0.02)
    assert all(0 <= p.delay <= 2.0 for p in plans) and np.mean([p.delay for p in plans]) == pytest.approx(1.0, abs=0.05)
    assert {p.corruption for p in plans if p.kind == "malformed"} == set(CORRUPTIONS)
    other_seed = [plan_fault({**cfg, "seed": 5}, client, 1).kind for client in range(100)]
    assert other_seed != [plan_fault(cfg, client, 1).kind for client in range(100)]


def test_drop_and_simulated_crash_become_error_replies() -> None:
    drop = plan_fault({"seed": 0, "fault-drop-rate": 1.0}, 3, 2)
    with pytest.raises(InjectedDrop, match="client 3 drops out of round 2"):
        before_training(drop, 3, 2)
    crash = plan_fault({"seed": 0, "fault-crash-rate": 1.0}, 3, 2)
    before_training(crash, 3, 2)  # a crash happens after the work
    with pytest.raises(InjectedCrash):
        after_training(crash, update(), simulated=True)
    # Flower's simulation wraps the exception; the round's failure reasons keep its message.
    wrapped = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()\x1b[39m "
               "(pid=1, ip=1.2.3.4)\n  File x, line 1\nflwr.clientapp.client_app.ClientAppException: \nException "
               "ClientAppException occurred. Message: injected fault: the client crashed after training'>")
    assert short_reason(wrapped) == "injected fault: the client crashed after training"


def test_deployed_crash_ends_the_process_without_a_reply() -> None:
    code = ("from client.faults import plan_fault, after_training; from tests.client.test_faults import update; "
            "after_training(plan_fault({'fault-crash-rate': 1.0}, 1, 1), update(), simulated=False); print('replied')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == CRASH_EXIT_CODE and "replied" not in proc.stdout


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_every_corruption_is_rejected_by_the_server(how: str) -> None:
    fedavg = make_fedavg(2)
    bad = corrupt(update(), how, seed=1)
    assert check_reply(update(), fedavg.validate_reply, REF, 1) is None
    reason = check_reply(bad, fedavg.validate_reply, REF, 1)
    assert reason is not None and not reason.startswith("reply could not be checked"), how
    feddm = make_feddm(2, 1.0, 0.0, model="mlp", input_shape=(1, 8, 8), num_classes=10, max_images=50,
                       server_epochs=1, server_lr=0.1, server_batch_size=4)
    assert check_reply(synthetic(), feddm.validate_reply, REF, 1) is None
    reason = check_reply(corrupt(synthetic(), how, seed=1), feddm.validate_reply, REF, 1)
    assert reason is not None and not reason.startswith("reply could not be checked"), how


def test_malformed_fault_corrupts_and_delay_waits() -> None:
    cfg = {"seed": 1, "fault-malformed-rate": 1.0, "fault-delay": 0.2}
    fault = plan_fault(cfg, 0, 1)
    assert fault.kind == "malformed"
    out = after_training(fault, update(), simulated=True)
    assert check_reply(out, make_fedavg(2).validate_reply, REF, 1) is not None


def test_fault_config_is_validated() -> None:
    cfg = resolve_config({"fault-drop-rate": 0.3, "fault-delay": 1.5, "min-available-clients": 7})
    assert (cfg.fault_drop_rate, cfg.fault_delay, cfg.min_available_clients) == (0.3, 1.5, 7)
    with pytest.raises(ConfigError) as info:
        resolve_config({"fault-drop-rate": 0.6, "fault-crash-rate": 0.3, "fault-malformed-rate": 0.2,
                        "min-available-clients": 11, "num-clients": 10, "fault-delay": -1})
    assert info.value.errors == ["fault-delay: expected a value >= 0, got -1.0"]
    with pytest.raises(ConfigError) as info:
        resolve_config({"fault-drop-rate": 0.6, "fault-crash-rate": 0.3, "fault-malformed-rate": 0.2,
                        "min-available-clients": 11, "num-clients": 10})
    assert info.value.errors == [
        "min-available-clients: expected at most num-clients=10, got 11",
        "fault-drop-rate: drop, crash and malformed rates are shares of the same replies and must add up to at "
        "most 1, got 1.1",
    ]
