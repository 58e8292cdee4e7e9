"""LASER attention: SDPA route vs the float64 reference, stability for large |V|, validation, Triton on GPU.

Imports torch and the kernels package only (runs where flwr/opacus are absent).
"""

from __future__ import annotations

import math

import pytest
import torch

import kernels.laser as laser_module
from kernels.laser import (
    laser_attention,
    laser_attention_backward_reference,
    laser_attention_reference,
    triton_route_supported,
)

B, H, L, S, D = 2, 3, 7, 9, 5


def _qkv(dtype: torch.dtype = torch.float64, seed: int = 0, v_scale: float = 1.0, L: int = L, S: int = S):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, S, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, S, D + 1, generator=g, dtype=torch.float64) * v_scale  # Dv != D on purpose
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


def _masks(L: int = L, S: int = S, B: int = B, H: int = H) -> dict[str, dict[str, object]]:
    g = torch.Generator().manual_seed(1)
    padding = torch.ones(B, 1, 1, S, dtype=torch.bool)
    padding[0, ..., -3:] = False  # batch 0: the last 3 keys are padding
    general = torch.rand(L, S, generator=g) > 0.4
    general[:, 0] = True  # every query attends at least one key
    additive = torch.randn(B, H, L, S, generator=g, dtype=torch.float64)
    additive[..., 1::3] = float("-inf")
    return {
        "none": {},
        "causal": {"is_causal": True},
        "bool-padding": {"attn_mask": padding},
        "bool-general": {"attn_mask": general},
        "float-additive": {"attn_mask": additive},
    }


MASKS = list(_masks())


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], seed: int = 2) -> tuple[torch.Tensor, ...]:
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    return torch.autograd.grad(out, inputs, g)


@pytest.mark.parametrize("mask", MASKS)
def test_sdpa_route_matches_reference_values_and_grads(mask: str) -> None:
    kw = _masks()[mask]
    q, k, v = _qkv()
    out = laser_attention(q, k, v, route="sdpa", **kw)
    ref = laser_attention_reference(q, k, v, **kw)
    assert out.shape == (B, H, L, D + 1) and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(_grads(out, [q, k, v]), _grads(ref, [q, k, v]), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("mask", ["none", "causal", "bool-padding"])
def test_float32_route_matches_reference(mask: str) -> None:
    kw = _masks()[mask]
    q, k, v = _qkv(torch.float32)
    out = laser_attention(q, k, v, **kw)  # auto -> sdpa on CPU
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), laser_attention_reference(q, k, v, **kw), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_keep_their_dtype_and_match_reference(dtype: torch.dtype) -> None:
    q, k, v = _qkv(dtype)
    out = laser_attention(q, k, v, is_causal=True)
    assert out.dtype == dtype
    ref = laser_attention_reference(q, k, v, is_causal=True)
    torch.testing.assert_close(out.double(), ref, rtol=3e-2, atol=3e-2)


def _count_exact_fallbacks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = laser_module._exact_rows

    def spy(out, rows, *args, **kwargs):
        calls.append(int(rows.sum()))
        return original(out, rows, *args, **kwargs)

    monkeypatch.setattr(laser_module, "_exact_rows", spy)
    return calls


def test_padding_keys_do_not_set_the_column_max(monkeypatch: pytest.MonkeyPatch) -> None:
    """Padded keys hold huge values: they must neither leak into the output nor force the exact fallback."""
    calls = _count_exact_fallbacks(monkeypatch)
    q, k, v = _qkv()
    pad = torch.ones(B, 1, 1, S, dtype=torch.bool)
    pad[..., -2:] = False
    with torch.no_grad():
        v[..., -2:, :] = 1e4  # padding garbage
    out = laser_attention(q, k, v, attn_mask=pad, route="sdpa")
    torch.testing.assert_close(out, laser_attention_reference(q, k, v, attn_mask=pad), rtol=1e-10, atol=1e-10)
    assert out.abs().max() < 10
    assert calls == []  # the column max ignored the padding, so nothing underflowed


@pytest.mark.parametrize("mask", ["none", "causal", "bool-padding", "float-additive"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_values_are_stable_where_the_naive_formula_overflows(mask: str, dtype: torch.dtype) -> None:
    kw = _masks()[mask]
    q, k, v = _qkv(dtype, v_scale=1.0)
    with torch.no_grad():  # V uniform in [-1000, 1000]: exp(V) overflows even in float64 (> e^709)
        v.copy_(torch.rand(v.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2000 - 1000)
    naive = torch.log(torch.softmax(q @ k.mT / math.sqrt(D), dim=-1) @ torch.exp(v))
    assert not torch.isfinite(naive).all()  # the formula itself is unusable here
    out = laser_attention(q, k, v, **kw)
    ref = laser_attention_reference(q, k, v, **kw)
    assert torch.isfinite(out).all()
    tol = 1e-9 if dtype == torch.float64 else 2e-4  # |O| ~ 1000: float32 is ~1e-7 relative
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    grads, ref_grads = _grads(out, [q, k, v]), _grads(ref, [q, k, v])
    for got, want in zip(grads, ref_grads, strict=True):
        assert torch.isfinite(got).all()
        if dtype == torch.float64:
            torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-8)


def test_underflowed_rows_are_recomputed_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Causal query 0 sees only key 0 (V = -1000) while the column max is +1000 at key 1: exp(-2000) = 0."""
    calls = _count_exact_fallbacks(monkeypatch)
    q, k, v = (t.detach() for t in _qkv(torch.float32))
    v[..., 0, :] = -1000.0
    v[..., 1, :] = 1000.0
    out = laser_attention(q, k, v, is_causal=True)
    assert calls == [B * H]  # exactly the query-0 rows of every (batch, head)
    torch.testing.assert_close(out[..., 0, :], torch.full_like(out[..., 0, :], -1000.0))
    torch.testing.assert_close(out.double(), laser_attention_reference(q, k, v, is_causal=True), rtol=1e-6, atol=2e-4)


@pytest.mark.parametrize("mask", ["none", "causal", "bool-padding", "float-additive"])
def test_gradcheck(mask: str) -> None:
    kw = _masks(L=3, S=4, B=1, H=1)[mask]
    q, k, v = (t[:1, :1, : (3 if i == 0 else 4), :3].detach().requires_grad_() for i, t in enumerate(_qkv()))
    assert torch.autograd.gradcheck(lambda a, b, c: laser_attention(a, b, c, **kw), (q, k, v))


def test_gradcheck_through_the_exact_fallback() -> None:
    q, k, v = (t[:1, :1, :3, :3].detach() for t in _qkv(L=3, S=3))
    v = v.clone()
    v[..., 0, :] = -800.0  # query 0 (causal) only sees this key; key 1 sets the column max
    v[..., 1, :] = 800.0
    args = tuple(t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: laser_attention(a, b, c, is_causal=True), args)


@pytest.mark.parametrize("causal", [False, True])
def test_closed_form_backward_matches_autograd(causal: bool) -> None:
    """The formulas of the fused Triton backward (G̃ = G·exp(m - O), Δ = rowsum(G), dV = E ⊙ PᵀG̃, ...)."""
    q, k, v = _qkv(S=L)
    v = v[..., :D].detach().requires_grad_()
    out = laser_attention_reference(q, k, v, is_causal=causal)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    want = torch.autograd.grad(out, (q, k, v), g)
    got = laser_attention_backward_reference(q, k, v, g, is_causal=causal)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_explicit_scale_is_used() -> None:
    q, k, v = _qkv()
    out = laser_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(out, laser_attention_reference(q, k, v, scale=0.3), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(out, laser_attention(q, k, v))


def test_invalid_inputs_raise_value_errors_naming_the_argument() -> None:
    q, k, v = (t.detach() for t in _qkv(torch.float32))
    cases = [
        ((q, k[..., :4], v), {}, r"^k: .*head dim 4.*expected q's head dim 5"),
        ((q, k, v[..., :4, :]), {}, r"^v: .*4 keys, expected k's 9"),
        ((q, k[:1], v), {}, r"^k: .*leading"),
        ((q, k.double(), v), {}, r"^k: dtype torch.float64 does not match q's dtype torch.float32"),
        ((q, k, v.to("meta")), {}, r"^v: device meta does not match"),
        ((q, k, v), {"attn_mask": torch.ones(3, S, dtype=torch.bool)}, r"^attn_mask: shape \(3, 9\) is not broad"),
        ((q, k, v), {"attn_mask": torch.ones(L, S, dtype=torch.int64)}, r"^attn_mask: expected a bool or float"),
        ((q, k, v), {"attn_mask": torch.ones(L, S, dtype=torch.bool), "is_causal": True}, r"^attn_mask: must be None"),
        ((q, k, v), {"route": "cuda"}, r"^route: expected one of auto, sdpa, triton, got 'cuda'"),
        ((q, k, v), {"scale": float("nan")}, r"^scale: "),
        ((q[0, 0, 0], k, v), {}, r"^q: expected at least 2 dims"),
    ]
    for args, kw, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            laser_attention(*args, **kw)


def test_triton_route_is_refused_off_cuda() -> None:
    q, k, v = (t.detach() for t in _qkv(torch.float32))
    assert not triton_route_supported(q, k, v)
    with pytest.raises(ValueError, match=r"^route: 'triton' cannot run these inputs: tensors are on cpu"):
        laser_attention(q, k, v, route="triton")


def _triton_ready() -> str:
    if not torch.cuda.is_available():
        return "no CUDA device"
    import importlib.util

    return "" if importlib.util.find_spec("triton") is not None else "triton is not installed"


@pytest.mark.skipif(bool(_triton_ready()), reason=_triton_ready() or "ready")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("seq_q", "seq_k", "head_dim"), [(128, 128, 64), (100, 77, 32), (65, 130, 128)])
def test_triton_route_matches_reference_on_gpu(
    dtype: torch.dtype, causal: bool, seq_q: int, seq_k: int, head_dim: int
) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, head_dim, generator=g, device="cuda", dtype=torch.float32)
               for n in (seq_q, seq_k, seq_k))
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    assert triton_route_supported(q, k, v)
    out = laser_attention(q, k, v, is_causal=causal, route="triton")
    assert out.dtype == dtype and out.shape == (2, 3, seq_q, head_dim)
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]  # the reference's own fp64 leaves
    ref = laser_attention_reference(*exact, is_causal=causal)
    tol = {"rtol": 2e-4, "atol": 2e-4} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-2}
    torch.testing.assert_close(out.double(), ref, **tol)
    grad = torch.randn(out.shape, generator=g, device="cuda", dtype=torch.float32).to(dtype)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, exact, grad.double())
    for a, b in zip(got, want, strict=True):
        scale = b.abs().max().item() + 1e-6
        torch.testing.assert_close(a.double() / scale, b / scale, **tol)
    auto = laser_attention(q, k, v, is_causal=causal)  # auto picks the kernel on CUDA
    torch.testing.assert_close(auto, out, rtol=0, atol=0)


@pytest.mark.skipif(bool(_triton_ready()), reason=_triton_ready() or "ready")
def test_triton_route_handles_large_values_on_gpu() -> None:
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k = (torch.randn(1, 2, 96, 64, generator=g, device="cuda") for _ in range(2))
    v = torch.rand(1, 2, 96, 64, generator=g, device="cuda") * 2000 - 1000
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = laser_attention(q, k, v, is_causal=True, route="triton")
    assert torch.isfinite(out).all()
    ref = laser_attention_reference(q, k, v, is_causal=True)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=5e-3)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(x).all() for x in grads)
