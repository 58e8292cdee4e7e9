"""Label-DP strategy: phase schedule, one charge per client, and reply checks."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict

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


@pytest.fixture(autouse=True)
def _server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a ServerApp process has set when a strategy builds messages."""
    from flwr.supercore.task_identity import TaskIdentity

    for key, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, key, value)


class _Grid:
    """The two nodes a FedAvg round samples (no messages are sent: the nodes' sizes are known)."""

    def get_node_ids(self) -> list[int]:
        return [1, 2]


def _arrays(value: float) -> ArrayRecord:
    return ArrayRecord(array_dict={"w": Array(np.full((3, 2), value, np.float32))})


def _counts(node: int, size: object, agree: object) -> Message:
    content = RecordDict({"metrics": MetricRecord({"holdout-size": size, "holdout-agree": agree, "num-examples": 1})})
    md = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id=f"e{node}",
                  group_id="", created_at=0.0, ttl=60.0, message_type="evaluate")
    return Message(content=content, metadata=md)


def test_holdout_selects_the_best_model_for_prior_and_judge() -> None:
    s = strategy(mechanism="rr-prior", stages=2, num_rounds=6, retrain_rounds=2, holdout=0.1, num_classes=3)
    s.info = {1: ClientInfo("a", 10), 2: ClientInfo("b", 10)}
    models = {r: _arrays(r) for r in range(1, 5)}
    assert list(s.configure_evaluate(1, models[1], ConfigRecord(), _Grid())) == []  # nobody holds labels yet
    s.charged = {1, 2}
    for rnd, agree in ((1, 5), (2, 9), (3, 6), (4, 7)):  # round 2's model agrees most with the held-out labels
        msgs = list(s.configure_evaluate(rnd, models[rnd], ConfigRecord(), _Grid()))
        assert [m.metadata.dst_node_id for m in msgs] == [1, 2]
        assert all(m.content["config"]["client-task"] == "label-dp" for m in msgs)
        # a malformed count is rejected with a logged reason; the estimate uses the other node
        got = s.aggregate_evaluate(rnd, [_counts(1, 10, agree), _counts(2, 3, 4)])
        assert got["holdout-size"] == 10 and got["holdout-agreement"] == agree / 10
        if rnd == 2:  # stage 2 starts at round 3: its prior is the best model scored so far (round 2's)
            msgs = list(s.configure_train(3, models[2], ConfigRecord(), _Grid()))
            assert all("prior-arrays" not in m.content for m in msgs)  # the latest model is the best one
    assert s.best is not None and s.best[1] == 2 and got["selected-round"] == 2
    a = RandomizedResponse(1.0, 3).keep_probability
    assert s.best[0] == pytest.approx((0.9 - (1 - a) / 2) / (a - (1 - a) / 2))
    # the first retraining round continues from, and judges with, the selected model, not the latest
    (msg, _) = s.configure_train(5, models[4], ConfigRecord(), _Grid())
    assert msg.content["arrays"] is models[2]
    assert list(s.configure_evaluate(5, models[4], ConfigRecord(), _Grid())) == []  # retraining: no scoring


def test_stage_prior_is_the_selected_model_when_the_latest_scores_lower() -> None:
    s = strategy(mechanism="rr-prior", stages=2, num_rounds=6, retrain_rounds=2, holdout=0.1, num_classes=3)
    s.info, s.charged = {1: ClientInfo("a", 10), 2: ClientInfo("b", 10)}, {1, 2}
    first, second = _arrays(1), _arrays(2)
    for rnd, model, agree in ((1, first, 9), (2, second, 4)):
        list(s.configure_evaluate(rnd, model, ConfigRecord(), _Grid()))
        s.aggregate_evaluate(rnd, [_counts(1, 10, agree)])
    msgs = list(s.configure_train(3, second, ConfigRecord(), _Grid()))
    assert all(m.content["prior-arrays"] is first and m.content["arrays"] is second for m in msgs)
    assert all("prior-arrays" not in m.content for m in s.configure_train(4, second, ConfigRecord(), _Grid()))
