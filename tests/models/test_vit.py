"""The ViT: shapes, SDPA/LASER training, and Opacus per-sample gradients equal per-example autograd."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kernels.lora import LoRALinear, apply_lora
from models import MODEL_NAMES, build_model
from models.vit import TokenPrefix, ViT, register_opacus_samplers

ATTENTIONS = ["sdpa", "laser"]


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize(("size", "tokens"), [(28, 17), (8, 5)])
def test_shapes(attention: str, size: int, tokens: int) -> None:
    model = build_model("vit", size, 10, seed=0, attention=attention)
    assert isinstance(model, ViT) and model.attention == attention
    assert model.tokens.pos_embedding.shape == (1, tokens, 64)  # patches + class token
    assert model(torch.rand(3, 1, size, size)).shape == (3, 10)
    assert "vit" in MODEL_NAMES


def test_configuration_errors() -> None:
    with pytest.raises(ValueError, match=r"^attention: must be one of sdpa, laser, got 'flash'"):
        build_model("vit", 28, 10, attention="flash")
    with pytest.raises(ValueError, match=r"^patch: must divide image_size=28, got 5"):
        ViT(28, 10, patch=5)
    with pytest.raises(ValueError, match=r"^heads: must divide dim=64, got 3"):
        ViT(28, 10, heads=3)


def test_seeded_build_is_reproducible_and_attention_changes_outputs() -> None:
    a, b = build_model("vit", 28, 10, seed=1), build_model("vit", 28, 10, seed=1, attention="laser")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    x = torch.rand(4, 1, 28, 28)
    assert not torch.allclose(a(x), b(x))  # same weights, different attention


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_trains_on_random_data(attention: str) -> None:
    """Random images whose brightness gives the class: a few Adam steps must bring the loss well down."""
    torch.manual_seed(0)
    model = build_model("vit", 28, 2, seed=0, attention=attention)
    y = torch.arange(16) % 2
    x = 0.25 + 0.5 * y[:, None, None, None] + 0.25 * (torch.rand(16, 1, 28, 28) - 0.5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def _per_example_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[list[torch.Tensor]]:
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in range(len(x)):
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum")
        out.append(list(torch.autograd.grad(loss, params)))
    return out


def _opacus_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    assert ModuleValidator.validate(model, strict=False) == []
    gsm = GradSampleModule(model, loss_reduction="sum")
    nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    grads = [p.grad_sample for p in model.parameters() if p.requires_grad]
    gsm.remove_hooks()
    return grads


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_opacus_per_sample_gradients_equal_per_example_autograd(attention: str) -> None:
    pytest.importorskip("opacus")
    register_opacus_samplers()
    from opacus.grad_sample import GradSampleModule

    assert TokenPrefix in GradSampleModule.GRAD_SAMPLERS
    model = build_model("vit", 14, 10, seed=0, attention=attention).double()  # 7×7 patches: 4 + 1 tokens
    torch.manual_seed(1)
    x, y = torch.rand(4, 1, 14, 14, dtype=torch.float64), torch.randint(0, 10, (4,))
    want = _per_example_grads(model, x, y)
    got = _opacus_grads(model, x, y)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "tokens.cls_token" in names and "tokens.pos_embedding" in names
    for k, name in enumerate(names):
        expected = torch.stack([want[i][k] for i in range(len(x))])  # (N, *param.shape)
        torch.testing.assert_close(got[k], expected, rtol=1e-8, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_lora_vit_per_sample_gradients_with_opacus() -> None:
    """LoRA adapters are plain Linear layers: Opacus's stock sampler gives their per-sample gradients."""
    pytest.importorskip("opacus")
    model = build_model("vit", 14, 10, seed=0, attention="laser").double()
    names = apply_lora(model, rank=4, target=lambda name, m: name.endswith((".q", ".v")))
    assert len(names) == 4  # q and v of both blocks
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(std=0.1)
    torch.manual_seed(2)
    x, y = torch.rand(4, 1, 14, 14, dtype=torch.float64), torch.randint(0, 10, (4,))
    want = _per_example_grads(model, x, y)
    got = _opacus_grads(model, x, y)
    assert len(got) == 8  # only the adapters train
    for k in range(len(got)):
        for i in range(len(x)):
            torch.testing.assert_close(got[k][i], want[i][k], rtol=1e-8, atol=1e-10)
