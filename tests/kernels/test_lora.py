"""LoRA adapters: initialization, validation, replacement, adapter-only state dicts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kernels.lora import LoRALinear, apply_lora, load_lora_state_dict, lora_param_groups, lora_state_dict


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 16), nn.ReLU()), nn.Linear(16, 3))


@pytest.mark.parametrize("rank", [0, -1, 13, 2.0, True])
def test_rank_is_validated(rank: object) -> None:
    pattern = r"^rank: must be an integer in \[1, min\(in_features, out_features\)\] = \[1, 12\]"
    with pytest.raises(ValueError, match=pattern):
        LoRALinear(nn.Linear(12, 20), rank)  # type: ignore[arg-type]


def test_base_must_be_linear() -> None:
    with pytest.raises(TypeError, match=r"^base: expected an nn.Linear"):
        LoRALinear(nn.Conv1d(3, 3, 1), 1)  # type: ignore[arg-type]


def test_starts_as_the_base_layer_and_exposes_the_factors() -> None:
    base = nn.Linear(10, 6)
    layer = LoRALinear(base, rank=3, alpha=6.0)
    assert layer.lora_A.weight.shape == (3, 10) and layer.lora_B.weight.shape == (6, 3)
    assert torch.count_nonzero(layer.lora_B.weight) == 0 and torch.count_nonzero(layer.lora_A.weight) == 30
    assert layer.scaling == 2.0
    assert not any(p.requires_grad for p in layer.base.parameters())
    x = torch.randn(4, 5, 10)  # (batch, tokens, features)
    torch.testing.assert_close(layer(x), base(x))
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    expected = x @ (base.weight + 2.0 * layer.lora_B.weight @ layer.lora_A.weight).T + base.bias
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.merged_weight(), base.weight + layer.delta_weight())


def test_apply_lora_targets_and_freezes() -> None:
    model = _mlp()
    names = apply_lora(model, rank=2, target=lambda name, m: m.out_features == 16)
    assert names == ["0", "2.0"]
    assert isinstance(model[0], LoRALinear) and isinstance(model[2][0], LoRALinear)
    assert isinstance(model[3], nn.Linear) and not isinstance(model[3], LoRALinear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0.lora_A.weight", "0.lora_B.weight", "2.0.lora_A.weight", "2.0.lora_B.weight"}
    assert apply_lora(model, rank=2) == ["3"]  # existing adapters are not wrapped again
    groups = lora_param_groups(model, lr=0.1)
    assert len(groups) == 3 and all(len(g["params"]) == 2 and g["lr"] == 0.1 for g in groups)
    a, b = groups[0]["params"]
    assert a is model[0].lora_A.weight and b is model[0].lora_B.weight


def test_lora_state_dict_round_trip() -> None:
    model = _mlp()
    apply_lora(model, rank=3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    sd = lora_state_dict(model)
    assert set(sd) == {f"{m}.lora_{f}.weight" for m in ("0", "2.0", "3") for f in "AB"}
    x = torch.randn(7, 12)
    before = model(x)

    other = _mlp()  # same base weights (same seed), fresh adapters
    apply_lora(other, rank=3)
    assert not torch.allclose(other(x), before)
    load_lora_state_dict(other, sd)
    torch.testing.assert_close(other(x), before)
    sd["0.lora_A.weight"].zero_()  # the returned tensors are copies
    torch.testing.assert_close(model(x), before)


def test_load_lora_state_dict_rejects_mismatches() -> None:
    model = _mlp()
    apply_lora(model, rank=2)
    sd = lora_state_dict(model)
    with pytest.raises(ValueError, match=r"^state: adapter keys differ.*missing \['3.lora_B.weight'\]"):
        load_lora_state_dict(model, {k: v for k, v in sd.items() if k != "3.lora_B.weight"})
    sd["0.lora_A.weight"] = torch.zeros(3, 12)
    with pytest.raises(ValueError, match=r"^state: 0.lora_A.weight has shape \(3, 12\), expected \(2, 12\)"):
        load_lora_state_dict(model, sd)

