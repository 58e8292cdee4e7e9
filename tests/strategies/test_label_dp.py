"""Label-DP strategy: phase schedule, one charge per client, and reply checks."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from privacy.mechanisms import RandomizedResponse, pure_dp_event
from strategies.clients import ClientInfo
from strategies.fedavg import make_fedavg
from strategies.label_dp import LabelDpConsensus

REF = ArrayRecord(array_dict={"w": Array(np.zeros((3, 2), np.float32))})


def strategy(**kw) -> LabelDpConsensus:
    args = {"epsilon": 1.0, "num_classes": 3, "mechanism": "rr", "stages": 1, "num_rounds": 10, "retrain_rounds": 4,
            "consensus": True, "retrain": "continue", "initial_arrays": REF} | kw
    return LabelDpConsensus(make_fedavg(2), **args)


def reply(**metrics) -> RecordDict:
    base = {"num-examples": 6, "data-size": 10, "labelled-size": 10, "label-counts": [1, 2, 3], "train-loss": 0.5}
    return RecordDict({"arrays": ArrayRecord(array_dict={"w": Array(np.ones((3, 2), np.float32))}),
                       "metrics": MetricRecord(base | metrics)})


def test_phase_schedule() -> None:
    s = strategy()
    assert [s.phase(r) for r in (1, 6, 7, 10)] == [("noisy", 1), ("noisy", 1), ("retrain", 1), ("retrain", 1)]
    s = strategy(mechanism="rr-prior", stages=3, num_rounds=8, retrain_rounds=2)
    assert [s.phase(r)[1] for r in range(1, 9)] == [1, 1, 2, 2, 3, 3, 3, 3]
    assert strategy(consensus=False).phase(10) == ("noisy", 1)
    with pytest.raises(ValueError, match="fewer than label-stages=5"):
        strategy(mechanism="rr-prior", stages=5, num_rounds=5, retrain_rounds=2)


def test_charged_event_matches_the_mechanism() -> None:
    assert strategy().label.dp_event() == RandomizedResponse(1.0, 3).dp_event()
    assert strategy(mechanism="rr-prior", stages=2).label.dp_event() == pure_dp_event(1.0)


@pytest.mark.parametrize(
    ("metrics", "reason"),
    [
        ({"kept-size": 11}, "metric 'kept-size': expected an integer in [0, data-size=10], got 11"),
        ({"num-examples": 12, "label-counts": [4, 4, 4]},
         "metric 'num-examples': expected an integer in [0, data-size=10], got 12"),
        ({"label-counts": [1, 2, 3, 0]}, "metric 'label-counts': expected 3 counts (labels 0..2), got 4 entries"),
        ({"label-counts": [1, 2, 2]},
         "metric 'label-counts': expected non-negative counts summing to num-examples, got [1, 2, 2]"),
        ({"data-size": 9}, "metric 'data-size': expected 10 (its reported dataset size), got 9"),
        ({"data-size": -1}, "metric 'data-size': expected 10 (its reported dataset size), got -1"),
    ],
)
def test_malformed_label_replies_are_rejected(metrics: dict, reason: str) -> None:
    s = strategy()
    s.info[7] = ClientInfo("c7", 10)
    assert s.validate_reply(reply(), REF, 7) is None
    assert s.validate_reply(reply(**metrics), REF, 7) == reason
