"""Federated LoRA on the client: the frozen base from the server's file, adapters in and out, DP-SGD on adapters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, RecordDict

from client.app import local_evaluate, local_fit
from client.data import ClientData
from client.model import client_model
from kernels.lora import LoRALinear, lora_state_dict
from models import TrainConfig, build_model, train
from models.lora import adapter_count, build_lora_model, save_base
from models.training import make_optimizer
from server.config import RunConfig

RANK = 4


def _data(n: int = 96, seed: int = 0) -> ClientData:
    rng = np.random.default_rng(seed)
    return ClientData(rng.random((n, 1, 8, 8), dtype=np.float32), rng.integers(0, 10, n), 10, "0")


def _cfg(base_path, sha: str, **kw) -> dict:
    cfg = RunConfig(model="mlp", lora_rank=RANK, optimizer="lora-rite", lr=0.01, batch_size=16).to_dict()
    return cfg | {"lora-base-path": str(base_path), "lora-base-sha256": sha, "server-round": 1} | kw


@pytest.fixture()
def base(tmp_path):
    state = build_model("mlp", image_size=8, num_classes=10, seed=3).state_dict()
    path = tmp_path / "base" / "model.npz"
    return path, save_base(state, path), {k: v.clone() for k, v in state.items()}


def _adapters(seed: int = 0) -> ArrayRecord:
    return ArrayRecord(lora_state_dict(build_lora_model("mlp", 8, 10, RANK, seed=seed)))


def test_fit_replies_only_the_adapters_and_changes_them(base) -> None:
    path, sha, _ = base
    sent = _adapters()
    reply = local_fit(sent, _cfg(path, sha), _data(), seed=0)
    arrays = reply["arrays"]
    assert set(arrays.keys()) == set(sent.keys())
    assert all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in arrays)
    assert sum(a.numpy().size for a in arrays.values()) == RANK * ((64 + 128) + (128 + 128) + (128 + 10))
    moved = [k for k in arrays if not np.array_equal(arrays[k].numpy(), sent[k].numpy())]
    assert any(k.endswith("lora_B.weight") for k in moved)  # B starts at zero and leaves it
    assert reply["metrics"]["num-examples"] == 96
    ev = local_evaluate(arrays, _cfg(path, sha), _data())
    assert 0.0 <= ev["metrics"]["eval-accuracy"] <= 1.0


@pytest.mark.parametrize("optimizer", ["lora-rite", "adamw", "sgd"])
def test_local_training_leaves_the_base_bitwise_unchanged(base, optimizer: str) -> None:
    path, sha, state = base
    model = client_model(_adapters(), _cfg(path, sha, optimizer=optimizer), _data())
    before = lora_state_dict(model)
    data = _data()
    train(model, data.x, data.y, TrainConfig(epochs=2, batch_size=16, lr=0.01, optimizer=optimizer,
                                             weight_decay=0.01))
    for name, p in model.named_parameters():
        if ".lora_" in name:
            assert p.requires_grad
            continue
        assert not p.requires_grad, name
        base_name = name.replace(".base.", ".")  # LoRALinear keeps the adapted layer as `.base`
        assert torch.equal(p.detach(), state[base_name]), name
    assert any(not torch.equal(before[k], v) for k, v in lora_state_dict(model).items())


def test_a_different_base_file_is_refused(base, tmp_path) -> None:
    path, sha, _ = base
    other = tmp_path / "other.npz"
    save_base(build_model("mlp", image_size=8, num_classes=10, seed=4).state_dict(), other)
    with pytest.raises(ValueError, match=r"^lora-base-path: .* has SHA-256 .*expected the server's base"):
        local_fit(_adapters(), _cfg(other, sha), _data(), seed=0)
    with pytest.raises(ValueError, match=r"^lora-base-path: no base model file"):
        local_fit(_adapters(), _cfg(tmp_path / "missing.npz", sha + "0"), _data(), seed=0)
    cfg = _cfg(path, sha)
    del cfg["lora-base-sha256"]
    with pytest.raises(ValueError, match=r"^lora-base-path: "):
        local_fit(_adapters(), cfg, _data(), seed=0)


def test_lora_rite_needs_adapters() -> None:
    with pytest.raises(ValueError, match=r"^optimizer: lora-rite trains LoRA adapters, and this model has none"):
        make_optimizer(build_model("mlp", 8, 10), TrainConfig(optimizer="lora-rite"))
    model = build_lora_model("mlp", 8, 10, RANK)
    model.net[1].base.bias.requires_grad_(True)  # a trainable non-adapter tensor
    with pytest.raises(ValueError, match=r"^optimizer: lora-rite trains LoRA adapter pairs only"):
        make_optimizer(model, TrainConfig(optimizer="lora-rite"))


def test_vit_adapters_cover_every_linear_layer() -> None:
    model = build_lora_model("vit", 28, 10, 8, seed=0)
    wrapped = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 2 * 6 + 1  # q, k, v, out, fc1, fc2 per block, and the head
    assert adapter_count(model) == 8 * (2 * (4 * (64 + 64) + 2 * (64 + 128)) + (64 + 10)) == 14928


@pytest.mark.parametrize("mode", ["layers", "hooks"])
def test_dpsgd_on_adapters_keeps_the_base_and_replies_adapters(base, mode: str) -> None:
    """Client DP-SGD trains the adapters through Opacus-compatible layers (hooks: Opacus' GradSampleModule)."""
    pytest.importorskip("opacus")
    from client.dpsgd import dpsgd_fit

    path, sha, _ = base
    cfg = _cfg(path, sha, **{"dp-noise-multiplier": 1.0, "clip-norm": 1.0, "grad-sample-mode": mode,
                             "target-delta": 1e-5, "local-epochs": 1})
    sent = _adapters()
    reply = dpsgd_fit(sent, cfg, _data(), seed=0, state=RecordDict())
    assert set(reply["arrays"].keys()) == set(sent.keys())
    assert reply["metrics"]["dp-steps"] > 0 and reply["metrics"]["dp-client-epsilon"] > 0
