"""Per-example gradients and the clipped, noised DP-SGD step (Abadi et al., CCS 2016, Algorithm 1, lines 4–7).

DP-SGD needs, per step, each example's gradient norm (to clip it to C) and the sum of the clipped gradients;
never the batch gradient that ordinary ``backward()`` computes. This module gets both with one forward and one
backward that stops at the layer outputs:

* forward hooks keep each trainable layer's input; ``autograd.grad`` of the summed per-example losses with respect
  to the layer *outputs* gives each layer's output gradients (per example, since example i's loss depends only on
  example i in a model without batch statistics — Opacus' ``ModuleValidator`` checks that);
* ``nn.Linear`` layers stay factored: example i's weight gradient is G_iᵀA_i (A_i: its T×in inputs, G_i: its T×out
  output gradients, T = 1 for flat inputs), so ‖G_iᵀA_i‖² = ⟨A_iA_iᵀ, G_iG_iᵀ⟩ ("ghost norm", Goodfellow 2015;
  Li et al. 2022) and Σ_i c_i G_iᵀA_i is one matrix product — the (B × out × in) tensor is never built;
* other layers (Conv, LayerNorm, Embedding, and any layer with a sampler registered through
  ``opacus.grad_sample.register_grad_sampler``) get materialized per-example gradients from Opacus' samplers;
* ``vmap`` mode instead materializes every per-example gradient with ``torch.func`` (any module, no sampler).

:func:`dp_sgd_step` then applies Opacus ``DPOptimizer``'s exact arithmetic — flat clipping factor
min(1, C / (‖g_i‖ + 1e-6)), Gaussian noise N(0, σ²C²) drawn per parameter in parameter order from the given
generator, division by the expected batch size — and a test checks the result equals ``DPOptimizer`` + Opacus'
``GradSampleModule`` bit for bit up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class PerExampleGrads:
    """One batch's per-example gradients: materialized tensors, plus factored Linear layers."""

    losses: torch.Tensor  # (B,) per-example losses
    full: dict[nn.Parameter, torch.Tensor] = field(default_factory=dict)  # p -> (B, *p.shape)
    # layer -> (A (B, T, in), G (B, T, out)); several calls of one layer are concatenated along T
    linear: dict[nn.Linear, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def squared_norms(self) -> torch.Tensor:
        """(B,) squared ℓ2 norm of each example's whole gradient (all parameters, flat clipping)."""
        total = self.losses.new_zeros(len(self.losses))
        for g in self.full.values():
            total += g.pow(2).flatten(1).sum(1)
        for layer, (a, g) in self.linear.items():
            if layer.weight.requires_grad:
                t, fan_in, fan_out = a.shape[1], a.shape[2], g.shape[2]
                if t == 1:  # ‖g aᵀ‖² = ‖g‖² ‖a‖²
                    total += a.pow(2).sum((1, 2)) * g.pow(2).sum((1, 2))
                elif t * t <= fan_in * fan_out:  # ghost norm: ⟨A Aᵀ, G Gᵀ⟩ over (T, T)
                    total += ((a @ a.transpose(1, 2)) * (g @ g.transpose(1, 2))).sum((1, 2))
                else:  # long sequences: the (B, out, in) gradient is smaller than the (B, T, T) Gram matrices
                    total += torch.einsum("bto,bti->boi", g, a).pow(2).sum((1, 2))
            if layer.bias is not None and layer.bias.requires_grad:
                total += g.sum(1).pow(2).sum(1)
        return total

    def clipped_sum(self, factors: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        """Σ_i factors_i · g_i for every parameter (factors: (B,) clipping factors)."""
        out = {p: torch.einsum("i,i...->...", factors, g) for p, g in self.full.items()}
        for layer, (a, g) in self.linear.items():
            scaled = g * factors[:, None, None]  # (B, T, out)
            if layer.weight.requires_grad:
                out[layer.weight] = scaled.flatten(0, 1).T @ a.flatten(0, 1)  # (out, in)
            if layer.bias is not None and layer.bias.requires_grad:
                out[layer.bias] = scaled.sum((0, 1))
        return out


def per_example_gradients(
    model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], mode: str = "layers"
) -> Callable[[torch.Tensor, torch.Tensor], PerExampleGrads]:
    """A function (x, y) -> :class:`PerExampleGrads` of ``loss_fn(model(x), y)``.

    ``loss_fn`` returns per-example losses, shape (B,) (e.g. ``CrossEntropyLoss(reduction="none")``). ``mode``
    is ``layers`` (hooks + Opacus samplers + factored Linear, see the module docstring) or ``vmap``.
    Frozen parameters (``requires_grad=False``) and buffers get no gradient. Registers forward hooks on
    ``model`` (for ``layers``); build it once per model.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if mode == "vmap":
        from torch.func import functional_call, grad_and_value, vmap

        def one_example(values: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            out = functional_call(model, values, (x.unsqueeze(0),))  # (1, num_classes)
            return loss_fn(out, y.unsqueeze(0))[0]

        batched = vmap(grad_and_value(one_example), in_dims=(None, 0, 0), randomness="different")

        def compute(x: torch.Tensor, y: torch.Tensor) -> PerExampleGrads:
            grads, losses = batched({n: p.detach() for n, p in params.items()}, x, y)
            return PerExampleGrads(losses, {params[n]: g for n, g in grads.items()})

    elif mode == "layers":
        from opacus.grad_sample import GradSampleModule

        samplers = GradSampleModule.GRAD_SAMPLERS
        layers = [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
        missing = sorted({type(m).__name__ for m in layers if type(m) is not nn.Linear and type(m) not in samplers})
        if missing:
            raise ValueError(f"grad-sample-mode 'layers' has no Opacus grad sampler for {', '.join(missing)}; "
                             "register one (opacus.grad_sample.register_grad_sampler) or use grad-sample-mode=vmap")
        seen: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []  # (layer, input, output), one per call
        for layer in layers:
            layer.register_forward_hook(lambda m, inputs, out: seen.append((m, inputs[0].detach(), out)))

        def compute(x: torch.Tensor, y: torch.Tensor) -> PerExampleGrads:
            seen.clear()
            with torch.enable_grad():
                losses = loss_fn(model(x), y)  # (B,)
                backprops = torch.autograd.grad(losses.sum(), [out for *_, out in seen])
            grads = PerExampleGrads(losses.detach())
            for (layer, inp, _), backprop in zip(seen, backprops, strict=True):
                if type(layer) is nn.Linear:
                    a = inp.reshape(len(inp), -1, inp.shape[-1])  # (B, T, in)
                    g = backprop.reshape(len(backprop), -1, backprop.shape[-1])  # (B, T, out)
                    if layer in grads.linear:  # a layer called twice: its gradient is the sum over both calls
                        a0, g0 = grads.linear[layer]
                        a, g = torch.cat([a0, a], 1), torch.cat([g0, g], 1)
                    grads.linear[layer] = (a, g)
                    continue
                for p, g in samplers[type(layer)](layer, [inp], backprop).items():
                    if p.requires_grad:
                        grads.full[p] = grads.full[p] + g if p in grads.full else g
            return grads

    else:
        raise ValueError(f"per-example gradient mode must be layers or vmap, got {mode!r}")

    def guarded(x: torch.Tensor, y: torch.Tensor) -> PerExampleGrads:
        if len(x) == 0:  # an empty Poisson batch: no examples, zero-size gradients
            return PerExampleGrads(x.new_zeros(0), {p: p.new_zeros((0, *p.shape)) for p in params.values()})
        return compute(x, y)

    return guarded


def dp_sgd_step(
    optimizer: torch.optim.Optimizer, grads: PerExampleGrads, *, clip_norm: float, noise_multiplier: float,
    expected_batch_size: int, generator: torch.Generator,
) -> None:
    """One DP-SGD update: clip each example's gradient to ``clip_norm``, sum, add N(0, (σC)²), average, step.

    Every trainable parameter of ``optimizer`` gets noise, even one without examples (an empty Poisson batch is a
    noise-only step: the mechanism must be the same at every step).
    """
    factors = (clip_norm / (grads.squared_norms().sqrt() + 1e-6)).clamp(max=1.0)  # (B,)
    sums = grads.clipped_sum(factors)
    std = noise_multiplier * clip_norm
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not p.requires_grad:
                continue
            summed = sums.get(p)
            if summed is None:
                summed = torch.zeros_like(p)
            noise = torch.normal(0.0, std, size=p.shape, generator=generator, dtype=p.dtype, device=p.device)
            p.grad = (summed.view_as(p) + noise) / expected_batch_size
    optimizer.step()
