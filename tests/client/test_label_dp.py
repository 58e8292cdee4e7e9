"""Client label DP: labels privatized once per stage and kept in the node state; consensus keeps agreeing samples."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from client.app import ClientData
from client.label_dp import STATE_KEY, label_dp_fit
from models import build_model, predict_proba
from simulations.datasets import load_digits
from strategies.fedavg import make_fedavg
from strategies.label_dp import LabelDpConsensus


def cfg(**kw) -> dict:
    base = {"model": "mlp", "lr": 0.05, "momentum": 0.9, "weight-decay": 0.0, "optimizer": "sgd", "batch-size": 32,
            "local-epochs": 1, "client-cpus": 1, "label-epsilon": 1.0, "label-mechanism": "rr", "label-stages": 1,
            "label-phase": "noisy", "label-stage": 1}
    return base | kw


@pytest.fixture(scope="module")
def data() -> ClientData:
    ds = load_digits()
    return ClientData(ds.x_train[:400], ds.y_train[:400], 10, "0")


def message(arrays: ArrayRecord, c: dict, **extra: ArrayRecord) -> RecordDict:
    return RecordDict({"arrays": arrays, "config": ConfigRecord(c), **extra})


def noisy_of(state: RecordDict) -> np.ndarray:
    return state.array_records[STATE_KEY]["noisy"].numpy()


def test_labels_are_privatized_once_and_reused(data: ClientData) -> None:
    arrays = ArrayRecord(build_model("mlp", 8, 10, seed=0).state_dict())
    state = RecordDict()
    label_dp_fit(message(arrays, cfg()), cfg(), data, seed=1, state=state, rr_seed=7, diagnostics=True)
    first = noisy_of(state).copy()
    # A later round with a different training seed and a fresh rr_seed must not redraw the labels.
    label_dp_fit(message(arrays, cfg()), cfg(), data, seed=2, state=state, rr_seed=99, diagnostics=True)
    np.testing.assert_array_equal(noisy_of(state), first)
    keep = float(np.exp(1.0) / (np.exp(1.0) + 9))
    assert abs((first == data.y).mean() - keep) < 4 * np.sqrt(keep * (1 - keep) / len(first))


def test_rr_prior_stages_privatize_their_part_when_announced(data: ClientData) -> None:
    arrays = ArrayRecord(build_model("mlp", 8, 10, seed=0).state_dict())
    c1 = cfg(**{"label-mechanism": "rr-prior", "label-stages": 2})
    state = RecordDict()
    reply = label_dp_fit(message(arrays, c1), c1, data, seed=1, state=state, rr_seed=3, diagnostics=False)
    noisy = noisy_of(state)
    assert 150 < (noisy >= 0).sum() < 250 and reply["metrics"]["num-examples"] == (noisy >= 0).sum()
    assert "noisy-correct" not in reply["metrics"]  # no true-label diagnostics outside simulation
    c2 = c1 | {"label-stage": 2}
    label_dp_fit(message(reply["arrays"], c2), c2, data, seed=2, state=state, rr_seed=3, diagnostics=False)
    after = noisy_of(state)
    assert (after >= 0).all() and np.array_equal(after[noisy >= 0], noisy[noisy >= 0])


def test_consensus_keeps_exactly_the_agreeing_samples(data: ClientData) -> None:
    judge_model = build_model("mlp", 8, 10, seed=5)
    judge, start = ArrayRecord(judge_model.state_dict()), ArrayRecord(build_model("mlp", 8, 10, seed=0).state_dict())
    state = RecordDict()
    label_dp_fit(message(judge, cfg(**{"label-epsilon": 3.0})), cfg(**{"label-epsilon": 3.0}), data, 1, state, 4, True)
    retrain = cfg(**{"label-epsilon": 3.0, "label-phase": "retrain"})
    reply = label_dp_fit(message(start, retrain, **{"consensus-arrays": judge}), retrain, data, 2, state, 4, True)
    kept = state.array_records[STATE_KEY]["kept"].numpy().astype(bool)
    expected = predict_proba(judge_model, data.x).argmax(1) == noisy_of(state)
    np.testing.assert_array_equal(kept, expected)
    m = reply["metrics"]
    assert m["kept-size"] == m["num-examples"] == kept.sum() and m["data-size"] == len(data.y)
    assert m["kept-correct"] == (noisy_of(state)[kept] == data.y[kept]).sum()
    assert sum(m["label-counts"]) == kept.sum()
    # The reply passes the server's check; the same reply claiming more kept samples than data does not.
    strategy = LabelDpConsensus(make_fedavg(1), epsilon=3.0, num_classes=10, mechanism="rr", stages=1, num_rounds=3,
                                retrain_rounds=1, consensus=True, retrain="scratch", initial_arrays=start)
    assert strategy.validate_reply(reply, start) is None
    reply["metrics"]["kept-size"] = len(data.y) + 1
    assert strategy.validate_reply(reply, start) == (
        f"metric 'kept-size': expected an integer in [0, data-size={len(data.y)}], got {len(data.y) + 1}")


def _captured_epochs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    import models

    seen: list[int] = []
    real = models.train

    def spy(model, x, y, tcfg, seed=0, device="cpu"):
        seen.append(tcfg.epochs)
        return real(model, x, y, tcfg, seed=seed, device=device)

    monkeypatch.setattr(models, "train", spy)
    return seen


def test_matched_steps_scale_local_epochs_to_the_subset(data: ClientData, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _captured_epochs(monkeypatch)
    arrays = ArrayRecord(build_model("mlp", 8, 10, seed=0).state_dict())
    stage1 = cfg(**{"label-mechanism": "rr-prior", "label-stages": 2, "local-epochs": 2, "label-matched-steps": True})
    state = RecordDict()
    label_dp_fit(message(arrays, stage1), stage1, data, 1, state, 3, True)  # half the data labelled: 2 × 2 passes
    assert seen == [4]
    retrain = stage1 | {"label-phase": "retrain", "label-stage": 2}
    reply = label_dp_fit(message(arrays, retrain), retrain, data, 2, state, 3, True)
    kept = int(reply["metrics"]["kept-size"])
    assert seen[1] == 2 * round(len(data.y) / kept) and seen[1] > 2
    off = stage1 | {"label-matched-steps": False}
    label_dp_fit(message(arrays, off), off, data, 3, RecordDict(), 3, True)
    assert seen[2] == 2


@pytest.mark.parametrize("prior", ["denoised", "softmax"])
def test_rr_prior_uses_the_denoised_softmax(data: ClientData, prior: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from privacy.mechanisms import RandomizedResponse, RRWithPrior

    priors: list[np.ndarray] = []
    real = RRWithPrior.apply
    monkeypatch.setattr(RRWithPrior, "apply", lambda self, y, p, rng: priors.append(p) or real(self, y, p, rng))
    model = build_model("mlp", 8, 10, seed=2)
    arrays = ArrayRecord(model.state_dict())
    c = cfg(**{"label-mechanism": "rr-prior", "label-stages": 2, "label-stage": 2, "label-prior": prior})
    state = RecordDict()
    label_dp_fit(message(arrays, c), c, data, 1, state, 3, False)
    stage2 = state.array_records[STATE_KEY]["stage"].numpy() == 2
    q = predict_proba(model, data.x[stage2])
    expected = RandomizedResponse(1.0, 10).denoise(q) if prior == "denoised" else q
    (got,) = priors
    np.testing.assert_allclose(got, expected / expected.sum(1, keepdims=True), atol=1e-12)


def test_holdout_is_left_out_of_noisy_training_and_scored_against_rr_labels(data: ClientData) -> None:
    from client.label_dp import label_dp_evaluate

    model = build_model("mlp", 8, 10, seed=0)
    arrays = ArrayRecord(model.state_dict())
    c = cfg(**{"label-holdout": 0.2})
    state = RecordDict()
    assert dict(label_dp_evaluate(message(arrays, c), c, data, state)["metrics"]) == {
        "holdout-size": 0, "holdout-agree": 0, "num-examples": 0}  # nothing privatized yet: nothing to score
    reply = label_dp_fit(message(arrays, c), c, data, seed=1, state=state, rr_seed=5, diagnostics=True)
    held = state.array_records[STATE_KEY]["holdout"].numpy().astype(bool)
    assert held.sum() == 80 and reply["metrics"]["num-examples"] == len(data.y) - 80  # trained on the rest
    m = label_dp_evaluate(message(reply["arrays"], c), c, data, state)["metrics"]
    trained = build_model("mlp", 8, 10)
    trained.load_state_dict(reply["arrays"].to_torch_state_dict())
    agree = (predict_proba(trained, data.x[held]).argmax(1) == noisy_of(state)[held]).sum()
    assert (m["holdout-size"], m["holdout-agree"]) == (80, agree)
    # retraining: consensus runs over every labelled example, the held-out ones included
    retrain = c | {"label-phase": "retrain"}
    label_dp_fit(message(arrays, retrain, **{"consensus-arrays": arrays}), retrain, data, 2, state, 5, True)
    kept = state.array_records[STATE_KEY]["kept"].numpy().astype(bool)
    np.testing.assert_array_equal(kept, predict_proba(model, data.x).argmax(1) == noisy_of(state))
    assert kept[held].any()


def test_rr_prior_stage_takes_the_prior_the_server_selected(data: ClientData, monkeypatch: pytest.MonkeyPatch) -> None:
    from privacy.mechanisms import RandomizedResponse, RRWithPrior

    priors: list[np.ndarray] = []
    real = RRWithPrior.apply
    monkeypatch.setattr(RRWithPrior, "apply", lambda self, y, p, rng: priors.append(p) or real(self, y, p, rng))
    latest, selected = build_model("mlp", 8, 10, seed=2), build_model("mlp", 8, 10, seed=3)
    c = cfg(**{"label-mechanism": "rr-prior", "label-stages": 2, "label-stage": 2})
    state = RecordDict()
    msg = message(ArrayRecord(latest.state_dict()), c, **{"prior-arrays": ArrayRecord(selected.state_dict())})
    label_dp_fit(msg, c, data, 1, state, 3, False)
    stage2 = state.array_records[STATE_KEY]["stage"].numpy() == 2
    expected = RandomizedResponse(1.0, 10).denoise(predict_proba(selected, data.x[stage2]))
    np.testing.assert_allclose(priors[0], expected / expected.sum(1, keepdims=True), atol=1e-12)
