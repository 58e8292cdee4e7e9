"""Reply validation: every malformed shape of reply gets a reason; a good reply gets None."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from strategies.fedavg import make_fedavg
from strategies.replies import check_model_update

REF = ArrayRecord(array_dict={"w": Array(np.zeros((3, 2), np.float32)), "b": Array(np.zeros(2, np.float32))})


def reply(arrays: dict[str, np.ndarray] | None = None, metrics: dict | None = None, **extra) -> RecordDict:
    arrays = {"w": np.ones((3, 2), np.float32), "b": np.ones(2, np.float32)} if arrays is None else arrays
    content = {"arrays": ArrayRecord(array_dict={k: Array(v) for k, v in arrays.items()}),
               "metrics": MetricRecord({"num-examples": 5} if metrics is None else metrics)}
    content.update(extra)
    return RecordDict(content)


def test_good_reply_passes() -> None:
    assert check_model_update(reply(), REF) is None
    assert make_fedavg(4).validate_reply(reply(), REF) is None


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (reply(arrays={"w": np.ones((3, 2), np.float32)}),
         "array names differ from the global model (missing ['b'], unexpected [])"),
        (reply(arrays={"w": np.ones((2, 3), np.float32), "b": np.ones(2, np.float32)}),
         "array 'w': expected float32[3, 2], got float32[2, 3]"),
        (reply(arrays={"w": np.ones((3, 2), np.float64), "b": np.ones(2, np.float32)}),
         "array 'w': expected float32[3, 2], got float64[3, 2]"),
        (reply(arrays={"w": np.full((3, 2), np.inf, np.float32), "b": np.ones(2, np.float32)}),
         "array 'w' has non-finite values"),
        (reply(metrics={"loss": 1.0}), "metric 'num-examples': expected a positive integer, got None"),
        (reply(metrics={"num-examples": 0}), "metric 'num-examples': expected a positive integer, got 0"),
        (reply(metrics={"num-examples": 2.5}), "metric 'num-examples': expected a positive integer, got 2.5"),
        (RecordDict({"metrics": MetricRecord({"num-examples": 1})}), "expected exactly one ArrayRecord, got 0"),
        (reply(extra_metrics=MetricRecord({"x": 1})), "expected exactly one MetricRecord, got 2"),
    ],
)
def test_malformed_replies_are_rejected_with_a_reason(content: RecordDict, reason: str) -> None:
    assert check_model_update(content, REF) == reason


def test_fedavg_node_minimums_follow_the_federation() -> None:
    s = make_fedavg(10, fraction_train=0.25, fraction_evaluate=0.0)
    assert (s.min_train_nodes, s.min_available_nodes, s.min_evaluate_nodes) == (3, 10, 0)
    assert isinstance(s.configure_train, object) and ConfigRecord  # Flower's own FedAvg underneath
