"""Client DP-SGD: Opacus history persists across rounds in the node state; noise and clipping are applied."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, RecordDict

from client.app import ClientData
from client.dpsgd import batches_per_epoch, dpsgd_fit, load_history
from models import build_model
from simulations.datasets import load_digits


def cfg(**kw) -> dict:
    base = {"model": "mlp", "lr": 0.1, "momentum": 0.0, "weight-decay": 0.0, "optimizer": "sgd",
            "batch-size": 32, "local-epochs": 1, "clip-norm": 1.0, "dp-noise-multiplier": 1.0,
            "target-delta": 1e-5, "client-cpus": 1}
    return base | kw


@pytest.fixture(scope="module")
def data() -> ClientData:
    ds = load_digits()
    return ClientData(ds.x_train[:300], ds.y_train[:300], 10, "0")


def test_history_accumulates_across_rounds(data: ClientData) -> None:
    state = RecordDict()
    arrays = ArrayRecord(build_model("mlp", 8, 10, seed=0).state_dict())
    eps = []
    for _ in range(3):
        reply = dpsgd_fit(arrays, cfg(), data, seed=1, state=state)
        arrays = reply["arrays"]
        eps.append(reply["metrics"]["dp-client-epsilon"])
    k = batches_per_epoch(300, 32)
    history = load_history(state)
    assert {(s, round(q, 12)) for s, q, _ in history} == {(1.0, round(1 / k, 12))}
    assert sum(steps for *_, steps in history) == reply["metrics"]["dp-steps"] >= 3 * (k - 1)
    assert eps[0] < eps[1] < eps[2], "client epsilon must accumulate, not reset"


def test_update_is_noised_and_clipped(data: ClientData) -> None:
    arrays = ArrayRecord(build_model("mlp", 8, 10, seed=0).state_dict())
    start = {k: v.numpy() for k, v in arrays.items()}

    def update(**kw) -> dict[str, np.ndarray]:
        out = dpsgd_fit(arrays, cfg(**kw), data, seed=2, state=RecordDict())["arrays"]
        return {k: v.numpy() - start[k] for k, v in out.items()}

    a, b = update(), update()
    assert all(np.array_equal(a[k], b[k]) for k in a), "same seed, same update"
    # With lr 0.1, clip 1e-3 and no noise, every step moves the weights by at most lr * clip.
    tiny = update(**{"clip-norm": 1e-3, "dp-noise-multiplier": 0.0})
    norm = np.sqrt(sum(float((d**2).sum()) for d in tiny.values()))
    assert norm <= 0.1 * 1e-3 * batches_per_epoch(300, 32) * 1.0001
    noisy = update(**{"clip-norm": 1e-3, "dp-noise-multiplier": 5.0})
    assert np.sqrt(sum(float((d**2).sum()) for d in noisy.values())) > 10 * norm


def test_noise_is_reproducible_only_when_seeded(data: ClientData) -> None:
    arrays = ArrayRecord(build_model("mlp", 8, 10, seed=0).state_dict())

    def weights(seed: int | None) -> np.ndarray:
        out = dpsgd_fit(arrays, cfg(), data, seed=seed, state=RecordDict())["arrays"]
        return np.concatenate([a.numpy().ravel() for a in out.values()])

    np.testing.assert_array_equal(weights(3), weights(3))  # simulation: reproducible
    assert not np.array_equal(weights(None), weights(None))  # deployed: OS entropy, not torch's fixed default


@pytest.mark.parametrize("mode", ["layers", "vmap"])
def test_fast_engines_give_opacus_hooks_private_update(data: ClientData, mode: str) -> None:
    arrays = ArrayRecord(build_model("mlp", 8, 10, seed=0).state_dict())
    out = {m: dpsgd_fit(arrays, cfg(**{"grad-sample-mode": m}), data, seed=4, state=RecordDict())
           for m in (mode, "hooks")}
    for name, a in out[mode]["arrays"].items():
        np.testing.assert_allclose(a.numpy(), out["hooks"]["arrays"][name].numpy(), rtol=1e-4, atol=1e-6)
    assert out[mode]["metrics"]["train-loss"] == pytest.approx(out["hooks"]["metrics"]["train-loss"], rel=1e-4)
    assert out[mode]["metrics"]["dp-client-epsilon"] == out["hooks"]["metrics"]["dp-client-epsilon"]
