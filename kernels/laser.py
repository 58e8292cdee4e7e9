r"""LASER attention: attention with an exponential transformation of the values.

Duvvuri & Dhillon, "LASER: Attention with Exponential Transformation" (arXiv:2411.03493, 2024):

.. math::

    O = \log\big(\operatorname{softmax}(Q K^\top / \sqrt{d}) \cdot \exp(V)\big),
    \qquad O_{id} = \log \sum_j P_{ij}\, e^{V_{jd}}.

Attention is computed on ``exp(V)`` and the output is mapped back with ``log``, so each output is a
log-sum-exp (a soft maximum) of the values instead of their average; the paper shows that this enlarges the
gradients that reach Q, K and the layers below (softmax attention back-propagates gradients scaled by the
attention probabilities, which are mostly tiny).

Numerically stable form (the "log-weighted-sum-exp trick" of the paper)::

    m   = max_j V_jd                       (per batch, head and value column; detached)
    O   = log(SDPA(Q, K, exp(V - m))) + m

``O`` does not depend on ``m`` (∂O/∂m = -1 + 1 = 0), so treating ``m`` as a constant gives exact gradients,
and ``exp(V - m) ≤ 1`` can never overflow. ``m`` is the maximum over the keys that at least one query may
attend (keys hidden by the mask from every query, e.g. padding, would otherwise set ``m`` for no reason).

What the column shift cannot prevent is *underflow*: when every key a query attends has ``V_jd`` far below
the column maximum (``P·exp(V - m) < 2^-94`` in float32, e.g. a causal query that sees only small values
while a later key holds a large one), the weighted sum loses its precision or becomes 0 and ``log`` gives
``-inf``. Those (rare) query rows are detected and recomputed exactly in the log domain,
``O_id = logsumexp_j(log P_ij + V_jd)``, which costs O(S·D) memory per recomputed row; the result is exact
for any finite V (values of ±1000, for which ``exp`` overflows even in float64, included).

Routes: ``"sdpa"`` composes :func:`torch.nn.functional.scaled_dot_product_attention` (any device, any mask);
``"triton"`` is a fused flash-attention-style kernel (:mod:`kernels.laser_triton`, CUDA, no ``attn_mask``);
``"auto"`` takes the Triton kernel when it applies and the SDPA route otherwise.

This module imports torch only (triton lazily, on CUDA).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from functools import cache
from types import ModuleType
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = [
    "ROUTES",
    "laser_attention",
    "laser_attention_backward_reference",
    "laser_attention_reference",
    "triton_route_supported",
]

Route = Literal["auto", "sdpa", "triton"]
ROUTES: tuple[str, ...] = ("auto", "sdpa", "triton")

# A query row is recomputed exactly when some weighted sum  Σ_j P_ij exp(V_jd - m_d)  falls below this
# multiple of the smallest normal number of the accumulation dtype: above it, products that underflowed to
# subnormals or zero (absolute error ≤ 2^-149 each in float32) change the sum by < S·2^-149 / (tiny·2^32),
# i.e. < 1e-12 relatively for S ≤ 10^5 keys.
_UNDERFLOW_MARGIN = 2.0**32
# Rows recomputed exactly are processed in chunks of at most this many (row, key, column) elements.
_EXACT_CHUNK_ELEMENTS = 1 << 24
_TRITON_DTYPES = (torch.float32, torch.bfloat16)
_TRITON_HEAD_DIMS = (16, 32, 64, 128)


def _shape(x: torch.Tensor | torch.Size | tuple[int, ...]) -> str:
    dims = tuple(x.shape) if isinstance(x, torch.Tensor) else tuple(x)
    return "(" + ", ".join(str(d) for d in dims) + ("," if len(dims) == 1 else "") + ")"


def _validate(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
) -> None:
    """Raise a one-line :class:`ValueError` naming the offending argument."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor of shape (..., L, D), got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"{name}: expected at least 2 dims (..., seq, dim), got shape {_shape(t)}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point dtype, got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name}: dtype {t.dtype} does not match q's dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: device {t.device} does not match q's device {q.device}")
        if t.shape[:-2] != q.shape[:-2]:
            raise ValueError(
                f"{name}: shape {_shape(t)} has leading (batch, head) dims {_shape(t.shape[:-2])}, "
                f"expected q's {_shape(q.shape[:-2])}"
            )
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k: shape {_shape(k)} has head dim {k.shape[-1]}, expected q's head dim {q.shape[-1]}")
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(f"v: shape {_shape(v)} has {v.shape[-2]} keys, expected k's {k.shape[-2]}")
    if k.shape[-2] == 0:
        raise ValueError(f"k: shape {_shape(k)} has no keys, expected at least one")
    if not isinstance(is_causal, bool):
        raise ValueError(f"is_causal: expected a bool, got {type(is_causal).__name__}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale: expected None or a finite float, got {scale!r}")
    if attn_mask is None:
        return
    if not isinstance(attn_mask, torch.Tensor):
        raise ValueError(f"attn_mask: expected None or a torch.Tensor, got {type(attn_mask).__name__}")
    if is_causal:
        raise ValueError(f"attn_mask: must be None when is_causal=True, got a mask of shape {_shape(attn_mask)}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise ValueError(f"attn_mask: expected a bool or floating-point dtype, got {attn_mask.dtype}")
    if attn_mask.device != q.device:
        raise ValueError(f"attn_mask: device {attn_mask.device} does not match q's device {q.device}")
    target = (*q.shape[:-1], k.shape[-2])
    try:
        ok = torch.broadcast_shapes(attn_mask.shape, target) == torch.Size(target)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"attn_mask: shape {_shape(attn_mask)} is not broadcastable to (..., L, S) = {_shape(target)}"
        )


def _scores(
    q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool, scale: float | None
) -> torch.Tensor:
    """Masked attention logits ``Q Kᵀ·scale`` (..., L, S) exactly as SDPA's math definition."""
    L, S = q.shape[-2], k.shape[-2]
    s = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)  # (..., L, S)
    if is_causal:  # top-left aligned, like SDPA: query i attends keys j <= i
        keep = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    elif attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask.to(s.dtype)
    return s


def laser_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Float64 reference of :func:`laser_attention`: explicit masks and softmax, O(L·S·D) memory.

    ``O_id = log Σ_j P_ij exp(V_jd)`` is evaluated as ``logsumexp_j(log P_ij + V_jd)``, which is the same
    number but is exact for any V (``exp(V)`` itself overflows float64 once V > 709).

    Parameters
    ----------
    q, k, v : torch.Tensor
        Shapes (..., L, D), (..., S, D) and (..., S, Dv).
    attn_mask : torch.Tensor, optional
        Boolean (True = attend) or additive float mask broadcastable to (..., L, S).
    is_causal : bool
        Query i attends keys j <= i (top-left aligned, as in SDPA).
    scale : float, optional
        Logit scale; ``1/sqrt(D)`` by default.

    Returns
    -------
    torch.Tensor
        (..., L, Dv), float64. A query that attends no key gets NaN, like SDPA's math backend.
    """
    _validate(q, k, v, attn_mask, is_causal, scale)
    q64, k64, v64 = q.double(), k.double(), v.double()
    s = _scores(q64, k64, attn_mask, is_causal, scale)  # (..., L, S)
    logp = torch.log_softmax(s, dim=-1)  # explicit (log-)softmax (..., L, S); -inf where masked
    terms = logp.unsqueeze(-1) + v64.unsqueeze(-3)  # (..., L, S, Dv): log P_ij + V_jd
    return torch.logsumexp(terms, dim=-2)  # (..., L, Dv)


def laser_attention_backward_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad_out: torch.Tensor,
    *,
    is_causal: bool = False,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Closed-form LASER gradients, the formulas the fused Triton backward implements (plain torch, O(L·S)).

    With ``P = softmax(S)``, ``S = scale·QKᵀ``, ``E = exp(V - m)``, ``A = P E = exp(O - m)`` and ``G = dL/dO``::

        G̃   = G / A = G ⊙ exp(m - O)           (L, Dv)
        dV  = E ⊙ (Pᵀ G̃)                        (S, Dv)
        dP  = G̃ Eᵀ                              (L, S)
        Δ_i = Σ_j P_ij dP_ij = Σ_d G̃_id A_id = Σ_d G_id     (row sums of G: no O needed, unlike softmax attention)
        dS  = P ⊙ (dP - Δ)                      (L, S)
        dQ  = scale · dS K,   dK = scale · dSᵀ Q

    Returns
    -------
    tuple of torch.Tensor
        ``(dq, dk, dv)`` in float64.
    """
    _validate(q, k, v, None, is_causal, scale)
    sc = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q64, k64, v64, g = q.double(), k.double(), v.double(), grad_out.double()
    p = torch.softmax(_scores(q64, k64, None, is_causal, scale), dim=-1)  # (..., L, S)
    m = v64.amax(dim=-2, keepdim=True)  # (..., 1, Dv)
    e = torch.exp(v64 - m)  # (..., S, Dv)
    a = p @ e  # (..., L, Dv) = exp(O - m)
    gt = g / a  # G̃ (..., L, Dv)
    dv = e * (p.transpose(-2, -1) @ gt)  # (..., S, Dv)
    dp = gt @ e.transpose(-2, -1)  # (..., L, S)
    delta = g.sum(dim=-1, keepdim=True)  # (..., L, 1)
    ds = p * (dp - delta)  # (..., L, S)
    return sc * (ds @ k64), sc * (ds.transpose(-2, -1) @ q64), dv


@cache
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


@cache
def _laser_triton() -> ModuleType:
    return importlib.import_module("kernels.laser_triton")


def _triton_unsupported_reason(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None
) -> str:
    """Why the fused kernel cannot run these inputs ('' when it can)."""
    if not q.is_cuda:
        return f"tensors are on {q.device}, the kernel needs CUDA"
    if not _triton_importable():
        return "triton is not installed"
    if attn_mask is not None:
        return "attn_mask is not supported by the kernel (is_causal is)"
    if q.dtype not in _TRITON_DTYPES:
        return f"dtype {q.dtype} is not one of float32, bfloat16"
    if q.dim() != 4:
        return f"q has {q.dim()} dims, the kernel needs (B, H, L, D)"
    if not (q.shape[-1] == v.shape[-1] and q.shape[-1] in _TRITON_HEAD_DIMS):
        return f"head dims D={q.shape[-1]}, Dv={v.shape[-1]}: the kernel needs D == Dv in {_TRITON_HEAD_DIMS}"
    return ""


def triton_route_supported(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> bool:
    """Whether ``route="auto"`` would run the fused Triton kernel on these inputs."""
    return not _triton_unsupported_reason(q, k, v, attn_mask)


def _attendable_keys(
    attn_mask: torch.Tensor | None, is_causal: bool, L: int, S: int
) -> tuple[torch.Tensor | None, int]:
    """Keys that at least one query may attend.

    Returns ``(allowed, n_keys)``: ``allowed`` is a bool tensor (..., S) broadcastable against the batch dims
    or None (no per-key restriction), and only the first ``n_keys`` keys can be attended (causal with L < S).
    """
    if is_causal:
        return None, min(L, S)
    if attn_mask is None:
        return None, S
    visible = attn_mask if attn_mask.dtype == torch.bool else attn_mask > float("-inf")
    allowed = visible.any(dim=-2) if visible.dim() >= 2 else visible  # (..., S): some query attends key j
    return (None if bool(allowed.all()) else allowed), S


def _column_max(v: torch.Tensor, allowed: torch.Tensor | None, n_keys: int) -> torch.Tensor:
    """Detached max over attendable keys, (..., 1, Dv); 0 where no key is attendable."""
    with torch.no_grad():
        vv = v[..., :n_keys, :] if n_keys < v.shape[-2] else v
        if allowed is not None:
            vv = vv.masked_fill(~allowed.unsqueeze(-1), float("-inf"))
        m = vv.amax(dim=-2, keepdim=True)  # (..., 1, Dv)
        return torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)


def _exact_rows(
    out: torch.Tensor,
    rows: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
) -> torch.Tensor:
    """Replace the query rows flagged in ``rows`` (..., L) by their exact log-domain values (differentiable).

    ``out`` is (..., L, Dv) in the working dtype; the recomputation uses that dtype too.
    """
    lead, L, S, dv = q.shape[:-2], q.shape[-2], k.shape[-2], v.shape[-1]
    sc = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    flat = rows.reshape(-1, L).nonzero()  # (n, 2): flattened batch index, query index
    batch = torch.unravel_index(flat[:, 0], tuple(lead)) if len(lead) else ()
    qi = flat[:, 1]
    wd = out.dtype
    mask = None if attn_mask is None else attn_mask.expand(*lead, L, S)
    chunk = max(1, _EXACT_CHUNK_ELEMENTS // (S * max(dv, 1)))
    pieces = []
    for start in range(0, qi.numel(), chunk):
        b = tuple(ix[start : start + chunk] for ix in batch)
        i = qi[start : start + chunk]
        q_rows = q[(*b, i)].to(wd)  # (n, D)
        k_rows = k[b].to(wd) if b else k.to(wd).expand(i.numel(), S, -1)  # (n, S, D)
        v_rows = v[b].to(wd) if b else v.to(wd).expand(i.numel(), S, -1)  # (n, S, Dv)
        s = torch.einsum("nd,nsd->ns", q_rows, k_rows) * sc  # (n, S)
        if is_causal:
            s = s.masked_fill(torch.arange(S, device=s.device)[None, :] > i[:, None], float("-inf"))
        elif mask is not None:
            m_rows = mask[(*b, i)]  # (n, S)
            s = s.masked_fill(~m_rows, float("-inf")) if m_rows.dtype == torch.bool else s + m_rows.to(wd)
        logp = torch.log_softmax(s, dim=-1)  # (n, S)
        pieces.append(torch.logsumexp(logp.unsqueeze(-1) + v_rows, dim=1))  # (n, Dv)
    return out.index_put((*batch, qi), torch.cat(pieces))


def _laser_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
) -> torch.Tensor:
    """``log(SDPA(Q, K, exp(V - m))) + m`` with exact recomputation of underflowed rows."""
    dtype = q.dtype
    ew = torch.promote_types(dtype, torch.float32)  # exp/log dtype: float32 for half inputs
    # bfloat16 has float32's exponent range, so exp(V - m) keeps its magnitude in bf16 and the GEMMs stay bf16;
    # float16 cannot hold weights below 6e-8, so its attention runs in float32.
    gemm = torch.float32 if dtype == torch.float16 else dtype
    L, S = q.shape[-2], k.shape[-2]
    allowed, n_keys = _attendable_keys(attn_mask, is_causal, L, S)
    vw = v.to(ew)
    m = _column_max(vw, allowed, n_keys)  # (..., 1, Dv), detached
    shifted = vw - m
    if allowed is not None or n_keys < S:  # keys outside the max are never attended: keep exp(.) <= 1 there
        shifted = shifted.clamp_max(0.0)
    e = shifted.exp_().to(gemm)  # (..., S, Dv) in (0, 1]
    mask = attn_mask.to(gemm) if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
    acc = F.scaled_dot_product_attention(
        q.to(gemm), k.to(gemm), e, attn_mask=mask, is_causal=is_causal, scale=scale
    ).to(ew)  # (..., L, Dv) = P·exp(V - m) in (0, 1]
    low = acc < torch.finfo(ew).tiny * _UNDERFLOW_MARGIN  # NaN (query attends no key) stays NaN
    if not bool(low.any()):
        return torch.log(acc).add_(m).to(dtype)
    rows = low.any(dim=-1)  # (..., L)
    acc = torch.where(rows.unsqueeze(-1), torch.ones_like(acc), acc)  # finite log and zero gradient there
    out = torch.log(acc) + m
    return _exact_rows(out, rows, q, k, v, attn_mask, is_causal, scale).to(dtype)


def _laser_triton_route(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, scale: float | None
) -> torch.Tensor:
    sc = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, low = _laser_triton().laser_attention_triton(q, k, v, is_causal, sc)  # q's dtype (B, H, L, D), (B, H, L)
    if bool(low.any()):  # the exact rows are computed in float32 at least
        out = _exact_rows(out.to(torch.promote_types(out.dtype, torch.float32)), low, q, k, v, None, is_causal, scale)
    return out.to(q.dtype)


def laser_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    route: Route = "auto",
) -> torch.Tensor:
    """LASER attention ``log(softmax(QKᵀ·scale + mask) · exp(V))``, with SDPA's calling convention.

    Parameters
    ----------
    q : torch.Tensor
        Queries (B, H, L, D) (any number of leading dims).
    k : torch.Tensor
        Keys (B, H, S, D).
    v : torch.Tensor
        Values (B, H, S, Dv).
    attn_mask : torch.Tensor, optional
        Boolean (True = attend) or additive float mask broadcastable to (B, H, L, S).
    is_causal : bool
        Query i attends keys j <= i (top-left aligned, as in SDPA); excludes ``attn_mask``.
    scale : float, optional
        Logit scale; ``1/sqrt(D)`` by default.
    route : {"auto", "sdpa", "triton"}
        ``"auto"`` runs the fused Triton kernel on CUDA when triton is importable and the inputs fit it
        (float32/bfloat16, (B, H, L, D) with D == Dv in {16, 32, 64, 128}, no ``attn_mask``), else the SDPA
        composition. ``"triton"`` raises ValueError when the kernel cannot run the inputs.

    Returns
    -------
    torch.Tensor
        (B, H, L, Dv) in q's dtype. exp/log run in float32 for float16/bfloat16 inputs. A query that attends
        no key gets NaN (as with SDPA's math backend).

    Raises
    ------
    ValueError
        Mismatched shapes, dtypes or devices, a mask of the wrong shape or dtype, or an unusable route.
    """
    _validate(q, k, v, attn_mask, is_causal, scale)
    if route not in ROUTES:
        raise ValueError(f"route: expected one of {', '.join(ROUTES)}, got {route!r}")
    if route == "auto":
        route = "triton" if triton_route_supported(q, k, v, attn_mask) else "sdpa"
    elif route == "triton" and (reason := _triton_unsupported_reason(q, k, v, attn_mask)):
        raise ValueError(f"route: 'triton' cannot run these inputs: {reason}")
    if route == "triton":
        return _laser_triton_route(q, k, v, is_causal, scale)
    return _laser_sdpa(q, k, v, attn_mask, is_causal, scale)
