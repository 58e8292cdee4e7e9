r"""Fused Triton kernels for LASER attention (forward and backward), flash-attention style.

LASER (Duvvuri & Dhillon, arXiv:2411.03493): ``O = log(softmax(Q Kᵀ·scale) · exp(V))``. The kernels follow
the structure of Triton's fused-attention tutorial (Flash-Attention 2: one program per query block in the
forward pass, online softmax, recomputation of P from the saved row log-sum-exp in the backward pass). The
LASER-specific parts are fused around the tiles:

Forward, per (batch·head, query block)::

    m_d  = max_j V_jd                     column max over the attendable keys (torch, beforehand)
    E_jd = exp(min(V_jd - m_d, 0))        once per key by an elementwise kernel, stored in the GEMM dtype, so
                                          that the attention kernels read it as a plain (pipelined) operand
    acc  = Σ_j p̃_ij E_jd,  l_i = Σ_j p̃_ij  online softmax (p̃ = exp(s - running max), rescaled by alpha)
    O    = log(acc / l) + m               stored in float32 (kept for backward) and in the input dtype;
                                          lse_i = running max + log2(l_i) for backward; a row flag where
                                          min_d acc/l underflowed (the caller recomputes those rows exactly)

Backward. With ``A = P E = exp(O - m)`` (so ``O = log(P E) + m``) and ``G = dL/dO``::

    dL/dA_id = G_id / A_id =: G̃_id  = G_id · exp(m_d - O_id)
    dL/dE_jd = Σ_i P_ij G̃_id   ->  dV_jd = E_jd · Σ_i P_ij G̃_id         (dE/dV = E; m is a constant, ∂O/∂m = 0)
    dL/dP_ij = Σ_d G̃_id E_jd   =: dP_ij
    softmax:  dS_ij = P_ij (dP_ij - Δ_i),  Δ_i = Σ_j P_ij dP_ij = Σ_d G̃_id Σ_j P_ij E_jd = Σ_d G̃_id A_id
                                                = Σ_d G_id   (row sums of G; softmax attention needs rowsum(O·dO))
    dQ = scale · dS K,   dK = scale · dSᵀ Q

so the backward kernels are the flash-attention backward with V replaced by E, dO replaced by G̃, Δ = rowsum(G),
and dV multiplied by E at the end. G̃ and Δ are prepared by an elementwise kernel (O(L·D) work, G̃ in the GEMM
dtype); the gradients are written in the input dtype. A row whose weighted sum
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
from typing import NamedTuple

import torch
import triton
import triton.language as tl

__all__ = ["laser_attention_triton"]

_LOG2E = 1.4426950408889634  # 1 / ln 2
# Rows whose weighted sum A = exp(O - m) is below tiny(fp32)·2^32 are flagged for exact recomputation
# (the same threshold as the SDPA route in kernels.laser).
_LOG_UNDERFLOW = math.log(torch.finfo(torch.float32).tiny) + 32 * math.log(2.0)


@triton.jit
def _exp_shift_kernel(
    V, Mcol, E,  # (BH, S, D), (BH, D) f32, (BH, S, D) in the GEMM dtype
    S, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
):
    """E = exp(min(V - m, 0)), once per key (the attention kernels read E as a plain GEMM operand)."""
    off_hz = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = rows < S
    ptr = off_hz * S * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :]
    v = tl.load(V + ptr, mask=ok[:, None], other=0.0).to(tl.float32)
    mcol = tl.load(Mcol + off_hz * HEAD_DIM + offs_d)
    # E <= 1 for every attendable key; the clamp only touches keys no query attends (causal keys >= L)
    tl.store(E + ptr, tl.exp(tl.minimum(v - mcol[None, :], 0.0)).to(E.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _laser_fwd_kernel(
    Q, K, E, Mcol, Out, OutC, Lse, Low,  # (BH, L, D), (BH, S, D), (BH, S, D), (BH, D) f32, (BH, L, D) f32,
    sm_scale, low_log, L, S,  # (BH, L, D) input dtype (CAST only), (BH, L) f32, (BH, L) int8
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, IEEE: tl.constexpr, CAST: tl.constexpr,
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
        # out-of-range keys load E = 0 (their p is 0 too: no 0·garbage in the dot)
        e = tl.load(E + kv_base + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        acc = acc * alpha[:, None]
        if IEEE:
            acc = tl.dot(p, e, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(e.dtype), e, acc)
        m_i = m_ij

    # l_i >= 1 (the running max contributes exp2(0)); acc / l_i = Σ_j P_ij E_jd = exp(O - m)
    log_a = tl.log(acc / l_i[:, None])
    out = log_a + mcol[None, :]
    out_off = q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(Out + out_off, out, mask=row_ok[:, None])
    if CAST:
        tl.store(OutC + out_off, out.to(OutC.dtype.element_ty), mask=row_ok[:, None])
    tl.store(Lse + off_hz * L + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)
    # rows with an underflowed weighted sum (A < tiny·2^32, or 0) are recomputed exactly by the caller
    tl.store(Low + off_hz * L + offs_m, (tl.min(log_a, 1) < low_log).to(tl.int8), mask=row_ok)


@triton.jit
def _laser_bwd_prep_kernel(
    G, Out, Mcol, Gt, Delta,  # (BH, L, D) any float, (BH, L, D) f32, (BH, D) f32, (BH, L, D) GEMM dtype, (BH, L) f32
    L, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
):
    """G̃ = G·exp(m - O) (0 where G = 0: rows recomputed exactly upstream may hold O = -inf) and Δ = Σ_d G."""
    off_hz = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = rows < L
    ptr = off_hz * L * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :]
    g = tl.load(G + ptr, mask=ok[:, None], other=0.0).to(tl.float32)
    o = tl.load(Out + ptr, mask=ok[:, None], other=0.0)
    mcol = tl.load(Mcol + off_hz * HEAD_DIM + offs_d)
    gt = tl.where(g == 0.0, 0.0, g * tl.exp(mcol[None, :] - o))
    tl.store(Gt + ptr, gt.to(Gt.dtype.element_ty), mask=ok[:, None])
    tl.store(Delta + off_hz * L + rows, tl.sum(g, 1), mask=ok)


@triton.jit
def _laser_bwd_dkdv_kernel(
    Q, K, E, Gt, Lse, Delta, DK, DV,  # Gt (BH, L, D) GEMM dtype, Delta (BH, L) f32, DK/DV (BH, S, D) input dtype
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
    e = tl.load(E + kv_base + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=col_ok[:, None], other=0.0)
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
            de = tl.dot(pT.to(gt.dtype), gt, de)
            dpT = tl.dot(e, tl.trans(gt))
        dsT = pT * (dpT - delta[None, :])  # dS_ijᵀ = P_ij (dP_ij - Δ_i)
        if IEEE:
            dk = tl.dot(dsT, q, dk, input_precision="ieee")
        else:
            dk = tl.dot(dsT.to(q.dtype), q, dk)

    out_off = kv_base + cols[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DV + out_off, (de * e.to(tl.float32)).to(DV.dtype.element_ty), mask=col_ok[:, None])  # dV = E ⊙ dL/dE
    tl.store(DK + out_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _laser_bwd_dq_kernel(
    Q, K, E, Gt, Lse, Delta, DQ,  # DQ (BH, L, D) input dtype
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
        e = tl.load(E + kv_base + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=col_ok[:, None], other=0.0)
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
            dp = tl.dot(gt, tl.trans(e))
        ds = p * (dp - delta[:, None])
        if IEEE:
            dq = tl.dot(ds, k, dq, input_precision="ieee")
        else:
            dq = tl.dot(ds.to(q.dtype), k, dq)

    tl.store(DQ + q_base + rows[:, None] * HEAD_DIM + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None])


class _Tiles(NamedTuple):
    """Launch shape of one kernel: query rows × key columns per tile, warps, software-pipelining stages."""

    block_m: int
    block_n: int
    warps: int
    stages: int


def _tiles(head_dim: int, dtype: torch.dtype) -> dict[str, _Tiles]:
    """Tiles of the forward, dK/dV and dQ kernels. bfloat16, D ≤ 64: the fastest of a sweep on an H100
    (benchmarks/results/attention_cuda.json, ``tile_sweep``); otherwise conservative shapes whose shared memory
    fits every GPU from sm_80 on, consumer parts (≤ 99 KB a block) included."""
    if dtype == torch.float32:
        t = _Tiles(32, 32, 4, 3) if head_dim <= 64 else _Tiles(32, 32, 8, 2)
        return {"fwd": t, "dkdv": t, "dq": t}
    if head_dim <= 64:
        return {"fwd": _Tiles(128, 64, 8, 3), "dkdv": _Tiles(32, 128, 4, 3), "dq": _Tiles(128, 32, 8, 3)}
    t = _Tiles(64, 32, 8, 3)
    return {"fwd": t, "dkdv": t, "dq": t}


def _launch(t: _Tiles) -> dict[str, int]:
    return {"BLOCK_M": t.block_m, "BLOCK_N": t.block_n, "num_warps": t.warps, "num_stages": t.stages}


def _column_max(v: torch.Tensor, L: int, causal: bool) -> torch.Tensor:
    """Float32 (B, H, D) max of V over the keys some query attends (causal, L < S: the first L keys)."""
    keys = min(L, v.shape[2]) if causal else v.shape[2]
    return v[:, :, :keys, :].amax(dim=2).float().contiguous()


_ELEMENTWISE_BLOCK = 64  # rows per program of the elementwise kernels


class _LaserTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float):  # type: ignore[override]
        B, H, L, D = q.shape
        S = k.shape[2]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        m = _column_max(v, L, causal)  # (B, H, D) f32
        e = torch.empty_like(v)  # E = exp(V - m) in the GEMM dtype (float32 or bfloat16: q's)
        _exp_shift_kernel[(triton.cdiv(S, _ELEMENTWISE_BLOCK), B * H)](v, m, e, S, HEAD_DIM=D,
                                                                         BLOCK=_ELEMENTWISE_BLOCK)
        out = torch.empty((B, H, L, D), device=q.device, dtype=torch.float32)  # kept for the backward pass
        cast = q.dtype != torch.float32
        out_c = torch.empty_like(q) if cast else out  # what the caller gets, in q's dtype
        lse = torch.empty((B * H, L), device=q.device, dtype=torch.float32)
        low = torch.empty((B, H, L), device=q.device, dtype=torch.int8)
        t = _tiles(D, q.dtype)["fwd"]
        _laser_fwd_kernel[(triton.cdiv(L, t.block_m), B * H)](
            q, k, e, m, out, out_c, lse, low, scale, _LOG_UNDERFLOW, L, S,
            HEAD_DIM=D, CAUSAL=causal, IEEE=not cast, CAST=cast, **_launch(t),
        )
        ctx.save_for_backward(q, k, e, m, out, lse)
        ctx.causal, ctx.scale = causal, scale
        low = low.view(torch.bool)
        ctx.mark_non_differentiable(low)
        return out_c, low

    @staticmethod
    def backward(ctx, g_out, _g_low):  # type: ignore[override]
        q, k, e, m, out, lse = ctx.saved_tensors
        B, H, L, D = q.shape
        S = k.shape[2]
        g = g_out.contiguous()
        gt = torch.empty_like(q)  # G̃ = dL/dA in the GEMM dtype
        delta = torch.empty((B * H, L), device=q.device, dtype=torch.float32)  # Δ_i = Σ_d G_id
        _laser_bwd_prep_kernel[(triton.cdiv(L, _ELEMENTWISE_BLOCK), B * H)](g, out, m, gt, delta, L, HEAD_DIM=D,
                                                                             BLOCK=_ELEMENTWISE_BLOCK)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(e)
        tiles = _tiles(D, q.dtype)
        common = {"HEAD_DIM": D, "CAUSAL": ctx.causal, "IEEE": q.dtype == torch.float32}
        t = tiles["dkdv"]
        _laser_bwd_dkdv_kernel[(triton.cdiv(S, t.block_n), B * H)](
            q, k, e, gt, lse, delta, dk, dv, ctx.scale, L, S, **common, **_launch(t)
        )
        t = tiles["dq"]
        _laser_bwd_dq_kernel[(triton.cdiv(L, t.block_m), B * H)](
            q, k, e, gt, lse, delta, dq, ctx.scale, L, S, **common, **_launch(t)
        )
        return dq, dk, dv, None, None


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
        (B, H, L, D) LASER output in q's dtype (differentiable w.r.t. q, k, v).
    low : torch.Tensor
        (B, H, L) bool: rows whose weighted sum underflowed; the caller recomputes them exactly.
    """
    return _LaserTriton.apply(q, k, v, causal, scale)
