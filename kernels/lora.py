"""LoRA adapters that Opacus can train with per-sample gradients.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (ICLR 2022): a frozen ``nn.Linear`` with
weight W (out, in) gets a trainable low-rank update, ``y = x Wᵀ + b + (alpha / r) · x Aᵀ Bᵀ``, i.e.
``ΔW = (alpha / r) · B A`` with A (r, in) and B (out, r). B starts at zero (the adapted model equals the base
model at step 0) and A is Kaiming-uniform, as in the paper and PEFT.

The adapter is two bias-free ``nn.Linear`` layers, ``lora_A`` (in → r, weight = A) and ``lora_B``
(r → out, weight = B), so Opacus's stock Linear grad sampler computes per-sample gradients of A and B (and the
frozen base layer needs none). In federated LoRA only the adapters travel: :func:`lora_state_dict` and
:func:`load_lora_state_dict`. :func:`lora_param_groups` builds the one-pair-per-group parameter groups that
:class:`kernels.lora_rite.LoRARITE` expects.

This module imports torch only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import nn

__all__ = ["LoRALinear", "apply_lora", "load_lora_state_dict", "lora_param_groups", "lora_state_dict"]


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable rank-``r`` update ``(alpha / r) · B A``.

    Parameters
    ----------
    base : nn.Linear
        The layer to adapt (in_features → out_features); its parameters are frozen (``requires_grad=False``).
    rank : int
        Adapter rank r, 1 <= r <= min(in_features, out_features).
    alpha : float, optional
        Scaling numerator; the update is scaled by ``alpha / rank``. Defaults to ``rank`` (scaling 1).

    Attributes
    ----------
    lora_A : nn.Linear
        in_features → r, no bias; ``lora_A.weight`` is A, shape (r, in_features), Kaiming-uniform.
    lora_B : nn.Linear
        r → out_features, no bias; ``lora_B.weight`` is B, shape (out_features, r), zeros.
    scaling : float
        ``alpha / rank``.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base: expected an nn.Linear, got {type(base).__name__}")
        limit = min(base.in_features, base.out_features)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
            raise ValueError(
                f"rank: must be an integer in [1, min(in_features, out_features)] = [1, {limit}] for a "
                f"Linear({base.in_features} -> {base.out_features}), got {rank!r}"
            )
        if alpha is not None and not (isinstance(alpha, (int, float)) and math.isfinite(alpha)):
            raise ValueError(f"alpha: expected None or a finite number, got {alpha!r}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scaling = self.alpha / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **factory)  # weight A (r, in)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **factory)  # weight B (out, r)
        self.reset_lora_parameters()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def reset_lora_parameters(self) -> None:
        """A ~ Kaiming-uniform (nn.Linear's default, a = √5), B = 0, so that ΔW = 0."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """The low-rank update ``scaling · B A``, shape (out_features, in_features)."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def merged_weight(self) -> torch.Tensor:
        """``W + scaling · B A``: the weight of an equivalent plain Linear (detached)."""
        with torch.no_grad():
            return self.base.weight + self.delta_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (..., in) -> (..., out)
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scaling

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float | None = None,
    target: Callable[[str, nn.Linear], bool] | None = None,
    *,
    freeze_base: bool = True,
) -> list[str]:
    """Replace the chosen ``nn.Linear`` layers of ``model`` in place by :class:`LoRALinear` wrappers.

    Parameters
    ----------
    model : nn.Module
        The model to adapt.
    rank, alpha : int, float
        Passed to :class:`LoRALinear`.
    target : callable, optional
        ``target(qualified_name, linear) -> bool`` selects the layers; by default every ``nn.Linear``
        (layers already inside a LoRALinear are never wrapped again).
    freeze_base : bool
        Also freeze every parameter that is not a LoRA factor (the usual LoRA fine-tuning setup).

    Returns
    -------
    list of str
        Qualified names of the wrapped layers.
    """
    chosen: list[tuple[nn.Module, str, str, nn.Linear]] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            if isinstance(child, LoRALinear):
                continue
            if isinstance(child, nn.Linear) and (target is None or target(name, child)):
                chosen.append((module, child_name, name, child))
            else:
                visit(child, name)

    visit(model, "")
    for parent, child_name, _, linear in chosen:
        setattr(parent, child_name, LoRALinear(linear, rank, alpha))
    if freeze_base:
        lora_ids = {id(p) for group in lora_param_groups(model) for p in group["params"]}
        for p in model.parameters():
            if id(p) not in lora_ids:
                p.requires_grad_(False)
    return [name for _, _, name, _ in chosen]


def _lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter factors only: ``{"<layer>.lora_A.weight": A, "<layer>.lora_B.weight": B, ...}`` (copies)."""
    out: dict[str, torch.Tensor] = {}
    for name, m in _lora_modules(model):
        prefix = f"{name}." if name else ""
        out[f"{prefix}lora_A.weight"] = m.lora_A.weight.detach().clone()
        out[f"{prefix}lora_B.weight"] = m.lora_B.weight.detach().clone()
    return out


def load_lora_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy adapter factors from :func:`lora_state_dict` output into ``model`` (same keys and shapes).

    Raises
    ------
    ValueError
        ``state``'s keys differ from the model's adapters, or a shape differs.
    """
    params: dict[str, nn.Parameter] = {}
    for name, m in _lora_modules(model):
        prefix = f"{name}." if name else ""
        params[f"{prefix}lora_A.weight"] = m.lora_A.weight
        params[f"{prefix}lora_B.weight"] = m.lora_B.weight
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(f"state: adapter keys differ from the model's: missing {missing}, unexpected {unexpected}")
    for key, p in params.items():
        value = state[key]
        if tuple(value.shape) != tuple(p.shape):
            raise ValueError(f"state: {key} has shape {tuple(value.shape)}, expected {tuple(p.shape)}")
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(state[key])


def lora_param_groups(model: nn.Module, **options: float) -> list[dict[str, object]]:
    """One parameter group per adapter, ``[{"params": [A, B], **options}, ...]``, for LoRA-RITE."""
    return [{"params": [m.lora_A.weight, m.lora_B.weight], **options} for _, m in _lora_modules(model)]
