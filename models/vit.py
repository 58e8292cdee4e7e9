"""A small Vision Transformer for 28×28 grey images (Fashion-MNIST), with SDPA or LASER attention.

Dosovitskiy et al., "An Image is Worth 16x16 Words" (ICLR 2021), scaled down: non-overlapping patches
(7×7 on 28×28 images: 16 tokens) embedded by a strided convolution, a learned class token and learned position
embeddings, ``depth`` pre-norm Transformer blocks (LayerNorm → multi-head self-attention → residual, LayerNorm →
MLP → residual) and a LayerNorm + Linear head on the class token.

Built for DP-SGD: every layer is one Opacus computes per-sample gradients for — ``nn.Conv2d``, ``nn.Linear``
(the attention's q/k/v/output projections are separate Linear layers; ``nn.MultiheadAttention`` is refused by
Opacus) and ``nn.LayerNorm`` — plus :class:`TokenPrefix`, whose raw parameters (class token, position embedding)
get the grad sampler :func:`register_opacus_samplers` registers. That function imports Opacus, so it runs only
on demand: explicitly, or when a :class:`ViT` is built in a process that has already imported Opacus (as the
DP-SGD client does before it builds its model). No layer mixes examples (no BatchNorm), so per-example
gradients are well defined.

``attention="laser"`` replaces softmax attention by LASER attention (:func:`kernels.laser.laser_attention`,
``log(softmax(QKᵀ/√d)·exp(V))``).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from kernels.laser import laser_attention

__all__ = ["ATTENTIONS", "ViT", "register_opacus_samplers"]

ATTENTIONS = ("sdpa", "laser")


class TokenPrefix(nn.Module):
    """Prepend a learned class token and add learned position embeddings.

    Parameters
    ----------
    num_patches : int
        Number of patch tokens P.
    dim : int
        Embedding width.
    """

    def __init__(self, num_patches: int, dim: int) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embedding, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (N, P, dim) -> (N, P + 1, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self.pos_embedding


def _token_prefix_grad_sample(
    layer: TokenPrefix, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of :class:`TokenPrefix`: backprops (N, P + 1, dim) is dLoss_i/dOutput_i.

    ``output_i = [cls; x_i] + pos``, so dLoss_i/dpos = backprops_i and dLoss_i/dcls = backprops_i[0].
    """
    grads: dict[nn.Parameter, torch.Tensor] = {}
    if layer.cls_token.requires_grad:
        grads[layer.cls_token] = backprops[:, :1, :].unsqueeze(1)  # (N, 1, 1, dim)
    if layer.pos_embedding.requires_grad:
        grads[layer.pos_embedding] = backprops.unsqueeze(1)  # (N, 1, P + 1, dim)
    return grads


def register_opacus_samplers() -> None:
    """Register the :class:`TokenPrefix` grad sampler with Opacus (imports Opacus; idempotent)."""
    from opacus.grad_sample import GradSampleModule, register_grad_sampler

    if GradSampleModule.GRAD_SAMPLERS.get(TokenPrefix) is not _token_prefix_grad_sample:
        register_grad_sampler(TokenPrefix)(_token_prefix_grad_sample)


class SelfAttention(nn.Module):
    """Multi-head self-attention from four ``nn.Linear`` projections and SDPA or LASER attention."""

    def __init__(self, dim: int, heads: int, attention: str = "sdpa") -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads: must divide dim={dim}, got {heads}")
        if attention not in ATTENTIONS:
            raise ValueError(f"attention: must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
        self.heads, self.attention = heads, attention
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, dim = x.shape  # (N, T, dim)
        q, k, v = (p(x).view(n, t, self.heads, dim // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        # q, k, v: (N, heads, T, dim / heads)
        o = laser_attention(q, k, v) if self.attention == "laser" else F.scaled_dot_product_attention(q, k, v)
        return self.out(o.transpose(1, 2).reshape(n, t, dim))  # (N, T, dim)


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, attention: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, attention)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Vision Transformer for (N, 1, S, S) images in [0, 1] → logits (N, num_classes).

    Parameters
    ----------
    image_size : int
        Side S of the square input images.
    num_classes : int
        Number of output logits.
    patch : int, optional
        Patch side; must divide ``image_size``. Default: 7 if it divides S (28 → 16 tokens), else 4, 2 or 1.
    dim, depth, heads, mlp_ratio : int
        Width, number of blocks, attention heads, MLP expansion.
    attention : {"sdpa", "laser"}
        Softmax attention (``F.scaled_dot_product_attention``) or LASER attention.
    """

    def __init__(
        self,
        image_size: int,
        num_classes: int,
        *,
        patch: int | None = None,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: int = 2,
        attention: str = "sdpa",
    ) -> None:
        super().__init__()
        if patch is None:
            patch = next(p for p in (7, 4, 2, 1) if image_size % p == 0)
        if patch < 1 or image_size % patch:
            raise ValueError(f"patch: must divide image_size={image_size}, got {patch}")
        if attention not in ATTENTIONS:
            raise ValueError(f"attention: must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
        self.attention = attention
        num_patches = (image_size // patch) ** 2
        self.patch_embed = nn.Conv2d(1, dim, kernel_size=patch, stride=patch)  # (N, dim, S/p, S/p)
        self.tokens = TokenPrefix(num_patches, dim)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio, attention) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        if "opacus" in sys.modules:  # DP training in this process: make the custom layer's sampler known
            register_opacus_samplers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, P, dim)
        x = self.blocks(self.tokens(x))  # (N, P + 1, dim)
        return self.head(self.norm(x[:, 0]))  # class token -> (N, num_classes)
