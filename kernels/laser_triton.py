r"""Fused Triton kernels for LASER attention (forward and backward), flash-attention style.

LASER (Duvvuri & Dhillon, arXiv:2411.03493): ``O = log(softmax(Q Kᵀ·scale) · exp(V))``. The kernels follow
the structure of Triton's fused-attention tutorial (Flash-Attention 2: one program per query block in the
forward pass, online softmax, recomputation of P from the saved row log-sum-exp in the backward pass). The
LASER-specific parts are fused into the tiles:

Forward, per (batch·head, query block)::

    m_d  = max_j V_jd                     column max over the attendable keys, computed by torch beforehand
    E_jd = exp(min(V_jd - m_d, 0))        computed per key tile from V in registers (never stored)
    acc  = Σ_j p̃_ij E_jd,  l_i = Σ_j p̃_ij  online softmax (p̃ = exp(s - running max), rescaled by alpha)
    O    = log(acc / l) + m               stored in float32; lse_i = running max + log2(l_i) for backward

Backward. With ``A = P E = exp(O - m)`` (so ``O = log(P E) + m``) and ``G = dL/dO``::

    dL/dA_id = G_id / A_id =: G̃_id  = G_id · exp(m_d - O_id)
    dL/dE_jd = Σ_i P_ij G̃_id   ->  dV_jd = E_jd · Σ_i P_ij G̃_id         (dE/dV = E; m is a constant, ∂O/∂m = 0)
    dL/dP_ij = Σ_d G̃_id E_jd   =: dP_ij
    softmax:  dS_ij = P_ij (dP_ij - Δ_i),  Δ_i = Σ_j P_ij dP_ij = Σ_d G̃_id Σ_j P_ij E_jd = Σ_d G̃_id A_id
                                                = Σ_d G_id   (row sums of G; softmax attention needs rowsum(O·dO))
    dQ = scale · dS K,   dK = scale · dSᵀ Q

so the backward kernels are the flash-attention backward with V replaced by E, dO replaced by G̃, Δ = rowsum(G),
and dV multiplied by E at the end. G̃ and Δ are prepared by torch (O(L·D) work); a row whose weighted sum
underflowed (O = -inf) is recomputed exactly by :mod:`kernels.laser`, which makes its G zero, and G̃ is set to 0
wherever G is 0, so such rows contribute nothing here. The closed form is checked against autograd on CPU by
:func:`kernels.laser.laser_attention_backward_reference` (same formulas, plain torch).

Supported: CUDA, float32 (IEEE dots) and bfloat16 (bf16 dots, float32 accumulation), contiguous
(B, H, L, D) with D == Dv in {16, 32, 64, 128}, is_causal (top-left aligned like SDPA), no attn_mask.

This module imports triton at import time; :mod:`kernels.laser` imports it lazily, only for CUDA inputs.
"""

# Inside @triton.jit functions, branches on constexpr flags stay if/else blocks (resolved at compile time).
# ruff: noqa: SIM108
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

__all__ = ["laser_attention_triton"]

_LOG2E = 1.4426950408889634  # 1 / ln 2
# Rows whose weighted sum A = exp(O - m) is below tiny(fp32)·2^32 are flagged for exact recomputation
# (the same threshold as the SDPA route in kernels.laser).
_LOG_UNDERFLOW = math.log(torch.finfo(torch.float32).tiny) + 32 * math.log(2.0)


@triton.jit
def _laser_fwd_kernel(
    Q, K, V, Mcol, Out, Lse,  # (BH, L, D), (BH, S, D), (BH, S, D), (BH, D) f32, (BH, L, D) f32, (BH, L) f32
    sm_scale, L, S,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, IEEE: tl.constexpr,
):
    start_m = tl.program_id(0)
    off_hz = tl.program_id(1).to(tl.int64)
    q_base = off_hz * L * HEAD_DIM
    kv_base = off_hz * S * HEAD_DIM
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows of this program
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < L

    q = tl.load(Q + q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    mcol = tl.load(Mcol + off_hz * HEAD_DIM + offs_d)  # (D,) f32 column max of V
    qk_scale = sm_scale * 1.4426950408889634  # exp(x) = exp2(x·log2 e)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max of the scaled logits (base 2)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running Σ_j p̃_ij
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)  # running Σ_j p̃_ij E_jd

    if CAUSAL:
        hi = tl.minimum(S, (start_m + 1) * BLOCK_M)  # keys beyond the last query of the block are masked
    else:
        hi = S
    # Every row has a valid key in the first tile (key 0: non-causal, or causal with i >= 0), so m_i is finite
    # after the first iteration and exp2(-inf - m_i) = 0 handles fully masked tiles later.
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < S
        k = tl.load(K + kv_base + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = qk * qk_scale  # (BLOCK_M, BLOCK_N)
        if CAUSAL:
            valid = col_ok[None, :] & (offs_m[:, None] >= cols[None, :])
        else:
            valid = col_ok[None, :] & (offs_m[:, None] >= 0)  # (BLOCK_M, BLOCK_N); rows >= L are never stored
        qk = tl.where(valid, qk, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + kv_base + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        # E = exp(V - m) <= 1 for every attendable key; the clamp only touches keys no query attends
        # (causal keys >= L), whose p is 0, and keeps 0·inf out of the dot. Out-of-range keys get E = 0.
        e = tl.exp(tl.minimum(v.to(tl.float32) - mcol[None, :], 0.0))
        e = tl.where(col_ok[:, None], e, 0.0)
        acc = acc * alpha[:, None]
        if IEEE:
            acc = tl.dot(p, e, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(q.dtype), e.to(q.dtype), acc)
        m_i = m_ij

    # l_i >= 1 (the running max contributes exp2(0)); acc / l_i = Σ_j P_ij E_jd = exp(O - m)
    out = tl.log(acc / l_i[:, None]) + mcol[None, :]
    tl.store(Out + q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], out, mask=row_ok[:, None])
    tl.store(Lse + off_hz * L + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)


@triton.jit
def _laser_bwd_dkdv_kernel(
    Q, K, V, Mcol, Gt, Lse, Delta, DK, DV,  # Gt (BH, L, D) f32, Delta (BH, L) f32, DK/DV (BH, S, D) f32
    sm_scale, L, S,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, IEEE: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    off_hz = tl.program_id(1).to(tl.int64)
    q_base = off_hz * L * HEAD_DIM
    kv_base = off_hz * S * HEAD_DIM
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    cols = start_n + tl.arange(0, BLOCK_N)  # keys of this program
    col_ok = cols < S

    k = tl.load(K + kv_base + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(V + kv_base + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    mcol = tl.load(Mcol + off_hz * HEAD_DIM + offs_d)
    e = tl.exp(tl.minimum(v.to(tl.float32) - mcol[None, :], 0.0))  # (BLOCK_N, D) f32, E = exp(V - m)
    e = tl.where(col_ok[:, None], e, 0.0)
    qk_scale = sm_scale * 1.4426950408889634

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)  # Σ_i dS_ij q_i  (scaled at the end)
    de = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)  # Σ_i P_ij G̃_id = dL/dE

    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M  # queries i < start_n attend none of these keys
    else:
        lo = 0
    for start_m in range(lo, L, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < L
        q = tl.load(Q + q_base + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        gt = tl.load(Gt + q_base + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(Lse + off_hz * L + rows, mask=row_ok, other=0.0)
        delta = tl.load(Delta + off_hz * L + rows, mask=row_ok, other=0.0)
        if IEEE:
            qkT = tl.dot(k, tl.trans(q), input_precision="ieee")  # (BLOCK_N, BLOCK_M)
        else:
            qkT = tl.dot(k, tl.trans(q))
        pT = tl.math.exp2(qkT * qk_scale - lse[None, :])  # P_ij transposed
        valid = col_ok[:, None] & row_ok[None, :]
        if CAUSAL:
            valid = valid & (rows[None, :] >= cols[:, None])
        pT = tl.where(valid, pT, 0.0)
        if IEEE:
            de = tl.dot(pT, gt, de, input_precision="ieee")  # += Pᵀ G̃
            dpT = tl.dot(e, tl.trans(gt), input_precision="ieee")  # dP_ijᵀ = Σ_d E_jd G̃_id
        else:
            de = tl.dot(pT.to(q.dtype), gt.to(q.dtype), de)
            dpT = tl.dot(e.to(q.dtype), tl.trans(gt.to(q.dtype)))
        dsT = pT * (dpT - delta[None, :])  # dS_ijᵀ = P_ij (dP_ij - Δ_i)
        if IEEE:
            dk = tl.dot(dsT, q, dk, input_precision="ieee")
        else:
            dk = tl.dot(dsT.to(q.dtype), q, dk)

    out_off = kv_base + cols[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DV + out_off, de * e, mask=col_ok[:, None])  # dV = E ⊙ dL/dE
    tl.store(DK + out_off, dk * sm_scale, mask=col_ok[:, None])


@triton.jit
def _laser_bwd_dq_kernel(
    Q, K, V, Mcol, Gt, Lse, Delta, DQ,  # DQ (BH, L, D) f32
    sm_scale, L, S,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, IEEE: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    off_hz = tl.program_id(1).to(tl.int64)
    q_base = off_hz * L * HEAD_DIM
    kv_base = off_hz * S * HEAD_DIM
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = start_m + tl.arange(0, BLOCK_M)  # queries of this program
    row_ok = rows < L

    q = tl.load(Q + q_base + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    gt = tl.load(Gt + q_base + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse = tl.load(Lse + off_hz * L + rows, mask=row_ok, other=0.0)
    delta = tl.load(Delta + off_hz * L + rows, mask=row_ok, other=0.0)
    mcol = tl.load(Mcol + off_hz * HEAD_DIM + offs_d)
    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    if CAUSAL:
        hi = tl.minimum(S, start_m + BLOCK_M)
    else:
        hi = S
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < S
        k = tl.load(K + kv_base + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(V + kv_base + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        e = tl.exp(tl.minimum(v.to(tl.float32) - mcol[None, :], 0.0))
        e = tl.where(col_ok[:, None], e, 0.0)  # (BLOCK_N, D)
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        p = tl.math.exp2(qk * qk_scale - lse[:, None])  # (BLOCK_M, BLOCK_N)
        valid = row_ok[:, None] & col_ok[None, :]
        if CAUSAL:
            valid = valid & (rows[:, None] >= cols[None, :])
        p = tl.where(valid, p, 0.0)
        if IEEE:
            dp = tl.dot(gt, tl.trans(e), input_precision="ieee")  # dP = G̃ Eᵀ
        else:
            dp = tl.dot(gt.to(q.dtype), tl.trans(e.to(q.dtype)))
        ds = p * (dp - delta[:, None])
        if IEEE:
            dq = tl.dot(ds, k, dq, input_precision="ieee")
        else:
            dq = tl.dot(ds.to(q.dtype), k, dq)

    tl.store(DQ + q_base + rows[:, None] * HEAD_DIM + offs_d[None, :], dq * sm_scale, mask=row_ok[:, None])


def _blocks(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): conservative tiles that fit registers/shared memory on sm80+."""
    if dtype == torch.float32:
        return (32, 32, 4) if head_dim <= 64 else (32, 32, 8)
    return (64, 64, 4) if head_dim <= 64 else (64, 32, 8)


def _column_max(v: torch.Tensor, L: int, causal: bool) -> torch.Tensor:
    """Float32 (B, H, D) max of V over the keys some query attends (causal, L < S: the first L keys)."""
    keys = min(L, v.shape[2]) if causal else v.shape[2]
    return v[:, :, :keys, :].amax(dim=2).float().contiguous()


class _LaserTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float):  # type: ignore[override]
        B, H, L, D = q.shape
        S = k.shape[2]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        m = _column_max(v, L, causal)  # (B, H, D) f32
        out = torch.empty((B, H, L, D), device=q.device, dtype=torch.float32)
        lse = torch.empty((B * H, L), device=q.device, dtype=torch.float32)
        block_m, block_n, warps = _blocks(D, q.dtype)
        ieee = q.dtype == torch.float32
        grid = (triton.cdiv(L, block_m), B * H)
        _laser_fwd_kernel[grid](
            q, k, v, m, out, lse, scale, L, S,
            HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal, IEEE=ieee, num_warps=warps,
        )
        # rows with an underflowed weighted sum (A < tiny·2^32, or -inf); NaN compares False
        low = ((out - m[:, :, None, :]) < _LOG_UNDERFLOW).any(dim=-1)  # (B, H, L)
        ctx.save_for_backward(q, k, v, m, out, lse)
        ctx.causal, ctx.scale = causal, scale
        ctx.mark_non_differentiable(low)
        return out, low

    @staticmethod
    def backward(ctx, g_out, _g_low):  # type: ignore[override]
        q, k, v, m, out, lse = ctx.saved_tensors
        B, H, L, D = q.shape
        S = k.shape[2]
        g = g_out.float().contiguous()
        # G̃ = G·exp(m - O) = dL/dA; 0 where G = 0 (rows recomputed exactly upstream may hold O = -inf)
        gt = torch.where(g == 0, torch.zeros_like(g), g * torch.exp(m[:, :, None, :] - out)).contiguous()
        delta = g.sum(dim=-1).reshape(B * H, L).contiguous()  # Δ_i = Σ_d G_id
        dq = torch.empty((B, H, L, D), device=q.device, dtype=torch.float32)
        dk = torch.empty((B, H, S, D), device=q.device, dtype=torch.float32)
        dv = torch.empty((B, H, S, D), device=q.device, dtype=torch.float32)
        block_m, block_n, warps = _blocks(D, q.dtype)
        ieee = q.dtype == torch.float32
        common = dict(HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=ctx.causal, IEEE=ieee, num_warps=warps)
        _laser_bwd_dkdv_kernel[(triton.cdiv(S, block_n), B * H)](
            q, k, v, m, gt, lse, delta, dk, dv, ctx.scale, L, S, **common
        )
        _laser_bwd_dq_kernel[(triton.cdiv(L, block_m), B * H)](
            q, k, v, m, gt, lse, delta, dq, ctx.scale, L, S, **common
        )
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def laser_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused LASER attention on CUDA; inputs already validated by :func:`kernels.laser.laser_attention`.

    Parameters
    ----------
    q, k, v : torch.Tensor
        (B, H, L, D), (B, H, S, D), (B, H, S, D); float32 or bfloat16; D in {16, 32, 64, 128}.
    causal : bool
        Top-left aligned causal masking (query i attends keys j <= i).
    scale : float
        Logit scale.

    Returns
    -------
    out : torch.Tensor
        (B, H, L, D) float32 LASER output (differentiable w.r.t. q, k, v).
    low : torch.Tensor
        (B, H, L) bool: rows whose weighted sum underflowed; the caller recomputes them exactly.
    """
    return _LaserTriton.apply(q, k, v, causal, scale)
