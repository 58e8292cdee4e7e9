"""LoRA-RITE: transformation invariance (vs Adam), state_dict round trip, convergence, validation — each for both
implementations (the batched torch route and the fused C kernel, see test_lora_rite_cpu.py for their agreement)."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch

from kernels.lora_rite import LoRARITE, _escaped_mass, make_fused_adamw

OUT, IN, R = 12, 10, 3
IMPLEMENTATIONS = ["torch", "fused"]


def _problem(dtype: torch.dtype = torch.float64, seed: int = 0):
    """A least-squares loss of W = W0 + B A, with random (nonzero) B and A."""
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(OUT, IN, generator=g, dtype=dtype)
    target = torch.randn(OUT, IN, generator=g, dtype=dtype)
    x = torch.randn(40, IN, generator=g, dtype=dtype)
    b = torch.randn(OUT, R, generator=g, dtype=dtype)
    a = torch.randn(R, IN, generator=g, dtype=dtype)

    def loss(b_: torch.Tensor, a_: torch.Tensor) -> torch.Tensor:
        return ((x @ (w0 + b_ @ a_).T - x @ target.T) ** 2).mean()

    return loss, b, a


def _trajectory(make_opt, loss, b, a, steps: int) -> list[torch.Tensor]:
    b, a = b.clone().requires_grad_(), a.clone().requires_grad_()
    opt = make_opt(a, b)
    products = []
    for _ in range(steps):
        opt.zero_grad()
        loss(b, a).backward()
        opt.step()
        products.append((b @ a).detach().clone())
    return products


def _rite(a: torch.Tensor, b: torch.Tensor, implementation: str = "auto") -> torch.optim.Optimizer:
    return LoRARITE([{"params": [a, b]}], lr=0.05, weight_decay=0.1, implementation=implementation)


def _adam(a: torch.Tensor, b: torch.Tensor) -> torch.optim.Optimizer:
    return torch.optim.Adam([a, b], lr=0.05)


def _transform(b: torch.Tensor, a: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B S, S⁻¹ A) for a random, invertible, non-orthogonal S with a spread of scales."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(R, R, generator=g, dtype=b.dtype) @ torch.diag(torch.tensor([0.2, 1.0, 5.0], dtype=b.dtype))
    s = s + 0.5 * torch.eye(R, dtype=b.dtype)
    assert torch.linalg.cond(s) > 3
    return b @ s, torch.linalg.solve(s, a)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("seed", [1, 2])
def test_lora_rite_updates_are_invariant_and_adams_are_not(seed: int, implementation: str) -> None:
    loss, b, a = _problem()
    b2, a2 = _transform(b, a, seed)
    torch.testing.assert_close(b2 @ a2, b @ a)  # the same W, factored differently
    w0 = b @ a
    rite_ = functools.partial(_rite, implementation=implementation)
    rite, rite2 = _trajectory(rite_, loss, b, a, 4), _trajectory(rite_, loss, b2, a2, 4)
    adam, adam2 = _trajectory(_adam, loss, b, a, 4), _trajectory(_adam, loss, b2, a2, 4)
    for step in range(4):
        moved = (rite[step] - w0).abs().max()
        assert moved > 1e-2  # the optimizer does move W
        assert (rite[step] - rite2[step]).abs().max() < 1e-9 * moved  # ΔW identical up to rounding
        adam_moved = (adam[step] - w0).abs().max()
        assert (adam[step] - adam2[step]).abs().max() > 0.1 * adam_moved  # Adam's ΔW depends on the factoring


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_invariance_holds_from_the_standard_zero_init_of_b(implementation: str) -> None:
    loss, _, a = _problem(seed=3)
    b = torch.zeros(OUT, R, dtype=torch.float64)  # LoRA init: B = 0 (singular Gram: pseudo-inverse path)
    b2, a2 = _transform(b, a, seed=4)
    rite_ = functools.partial(_rite, implementation=implementation)
    rite, rite2 = _trajectory(rite_, loss, b, a, 5), _trajectory(rite_, loss, b2, a2, 5)
    for w, w2 in zip(rite, rite2, strict=True):
        assert w.abs().max() > 1e-3
        torch.testing.assert_close(w, w2, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_state_dict_round_trip_gives_identical_next_step(dtype: torch.dtype, implementation: str) -> None:
    loss, b, a = _problem(dtype)
    b, a = b.requires_grad_(), a.requires_grad_()
    opt = LoRARITE([{"params": [a, b]}], lr=0.05, weight_decay=0.01, implementation=implementation)
    for _ in range(2):
        opt.zero_grad()
        loss(b, a).backward()
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    saved_params = (b.detach().clone(), a.detach().clone())

    opt.zero_grad()
    loss(b, a).backward()
    opt.step()
    expected = (b.detach().clone(), a.detach().clone())

    b2, a2 = (t.clone().requires_grad_() for t in saved_params)
    fresh = LoRARITE([{"params": [a2, b2]}], lr=0.05, weight_decay=0.01, implementation=implementation)
    fresh.load_state_dict(saved)
    assert fresh.state[a2]["exp_avg_sq"].dtype == torch.float64  # not rounded to the parameter dtype
    loss(b2, a2).backward()
    fresh.step()
    torch.testing.assert_close(b2.detach(), expected[0], rtol=0, atol=0)
    torch.testing.assert_close(a2.detach(), expected[1], rtol=0, atol=0)


def test_reduces_a_least_squares_loss_from_lora_init() -> None:
    loss, _, a = _problem(seed=5)
    b = torch.zeros(OUT, R, dtype=torch.float64, requires_grad=True)
    a = a.requires_grad_()
    opt = LoRARITE([a, b], lr=0.2)  # flat [A, B] list
    start = loss(b, a).item()
    for _ in range(60):
        opt.zero_grad()
        value = loss(b, a)
        value.backward()
        opt.step()
    # the best rank-3 correction: truncated SVD of the residual in the x-metric (mean over x of |x Δᵀ|²)
    g = torch.Generator().manual_seed(5)
    w0, target, x = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((OUT, IN), (OUT, IN), (40, IN)))
    cov = x.T @ x / x.shape[0]
    root = torch.linalg.cholesky(cov)  # loss(ΔW) = |(W0 + ΔW - T) root|_F² / OUT
    sv = torch.linalg.svdvals((target - w0) @ root)
    best = (sv[R:] ** 2).sum().item() / OUT
    assert value.item() < start / 2
    assert value.item() < best * 1.01  # reaches the optimum over rank-3 corrections


def test_escaped_mass() -> None:
    v = torch.diag(torch.tensor([1.0, 2.0], dtype=torch.float64))[None]  # (1, 2, 2)
    lam = torch.linalg.eigvalsh(v)
    c, s_ = 0.6, 0.8
    rotation = torch.tensor([[[c, -s_], [s_, c]]], dtype=torch.float64)
    moved = rotation @ v @ rotation.mT  # the basis turned within the span: nothing escapes
    assert _escaped_mass(lam, v, moved).item() == pytest.approx(0.0, abs=1e-12)
    drop = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)  # the second direction left the span
    # eigenvalues (1, 2) -> (0, 1): largest drop 1, trace drop 2 -> d = min(1, 2) = 1
    assert _escaped_mass(lam, v, drop @ v @ drop.mT).item() == pytest.approx(1.0)


def test_escaped_mass_accumulates_when_the_spans_rotate() -> None:
    loss, b, a = _problem()
    b, a = b.requires_grad_(), a.requires_grad_()
    opt = LoRARITE([{"params": [a, b]}], lr=0.05)
    for _ in range(5):
        opt.zero_grad()
        loss(b, a).backward()
        opt.step()
    rho = [opt.state[p]["escaped"].item() for p in (a, b)]
    assert all(math.isfinite(x) and x >= 0 for x in rho) and max(rho) > 0


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_many_pairs_with_different_shapes_and_missing_grads(implementation: str) -> None:
    torch.manual_seed(0)
    shapes = [(8, 6, 2), (8, 6, 2), (5, 5, 2), (7, 9, 3)]  # (out, in, r); in == out exercises the merged layout
    pairs = [(torch.randn(r, i, requires_grad=True), torch.randn(o, r, requires_grad=True)) for o, i, r in shapes]
    singles = [LoRARITE([{"params": [a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()]}],
                        lr=0.01, implementation=implementation) for a, b in pairs]
    batched = LoRARITE([{"params": [a, b]} for a, b in pairs], lr=0.01, implementation=implementation)
    targets = [torch.randn(o, i) for o, i, _ in shapes]
    for step in range(3):
        batched.zero_grad()
        for k, ((a, b), t) in enumerate(zip(pairs, targets, strict=True)):
            if step == 1 and k == 1:
                continue  # pair 1 gets no gradient at step 1: skipped, its step count lags
            ((b @ a - t) ** 2).sum().backward()
        batched.step()
        for k, (opt, t) in enumerate(zip(singles, targets, strict=True)):
            if step == 1 and k == 1:
                continue
            a1, b1 = opt.param_groups[0]["params"]
            opt.zero_grad()
            ((b1 @ a1 - t) ** 2).sum().backward()
            opt.step()
    for (a, b), opt in zip(pairs, singles, strict=True):
        a1, b1 = opt.param_groups[0]["params"]
        torch.testing.assert_close(a, a1, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b, b1, rtol=1e-5, atol=1e-6)
    assert batched.state[pairs[1][0]]["step"].item() == 2 and batched.state[pairs[0][0]]["step"].item() == 3


def test_invalid_arguments() -> None:
    a, b = torch.zeros(2, 5, requires_grad=True), torch.zeros(4, 2, requires_grad=True)
    with pytest.raises(ValueError, match=r"^lr: "):
        LoRARITE([a, b], lr=-1.0)
    with pytest.raises(ValueError, match=r"^betas: "):
        LoRARITE([a, b], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match=r"^eps: "):
        LoRARITE([a, b], eps=0.0)
    with pytest.raises(ValueError, match=r"^weight_decay: "):
        LoRARITE([a, b], weight_decay=-0.1)
    with pytest.raises(ValueError, match=r"^params: expected \[A \(r, in\), B \(out, r\)\] with the same r"):
        LoRARITE([{"params": [a, torch.zeros(4, 3, requires_grad=True)]}])
    with pytest.raises(ValueError, match=r"^params: each group must hold one LoRA pair"):
        LoRARITE([{"params": [a, b, b]}])
    with pytest.raises(ValueError, match=r"^params: a flat list must alternate"):
        LoRARITE([a, b, a])
    with pytest.raises(ValueError, match=r"^implementation: expected one of auto, fused, torch, got 'cuda'"):
        LoRARITE([a, b], implementation="cuda")


def test_make_fused_adamw_is_fused_on_cpu_and_steps_like_foreach() -> None:
    gen = torch.Generator().manual_seed(0)
    fused_params = [torch.randn(n, generator=gen, requires_grad=True) for n in (3, 50, 7)]
    foreach_params = [p.detach().clone().requires_grad_() for p in fused_params]
    initial = [p.detach().clone() for p in fused_params]
    fused = make_fused_adamw(fused_params, lr=0.1)
    foreach = make_fused_adamw(foreach_params, lr=0.1, implementation="foreach")
    assert isinstance(fused, torch.optim.AdamW) and fused.defaults["fused"] is True
    assert foreach.defaults["foreach"] is True and not foreach.defaults["fused"]
    for _ in range(10):
        for p, q in zip(fused_params, foreach_params, strict=True):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        fused.step()
        foreach.step()
    for p, q in zip(fused_params, foreach_params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert all((p - p0).abs().mean() > 0.05 for p, p0 in zip(fused_params, initial, strict=True))  # they moved
    with pytest.raises(ValueError, match=r"^implementation: expected 'fused' or 'foreach', got 'apex'"):
        make_fused_adamw(fused_params, implementation="apex")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_gpu_lora_rite_matches_cpu_and_fused_adamw() -> None:
    loss, b, a = _problem(torch.float64)
    cpu = _trajectory(_rite, loss, b, a, 3)
    loss_gpu, bg, ag = _problem(torch.float64)
    w = _trajectory(_rite, lambda b_, a_: loss_gpu(b_.cpu(), a_.cpu()), bg.cuda(), ag.cuda(), 3)
    for x, y in zip(cpu, w, strict=True):
        torch.testing.assert_close(x, y.cpu(), rtol=1e-9, atol=1e-12)
    p = torch.zeros(3, device="cuda", requires_grad=True)
    assert make_fused_adamw([p]).defaults["fused"] is True


def _reference_trajectory(pairs, grads_fn, steps: int, lr: float, wd: float, betas=(0.9, 0.999), eps=1e-6):
    """A direct, unbatched float64 transcription of the algorithm in kernels/lora_rite.py's docstring, with the
    symmetric basis R = (Y Yᵀ)^{1/2} instead of Cholesky (the step does not depend on the basis): per pair and
    factor, wide Z (A, and Bᵀ), partner's R⁻¹, transported moments, escaped mass."""
    b1, b2 = betas
    rel_tol = 10 * torch.finfo(torch.float64).eps

    def rinv_of(z: torch.Tensor) -> torch.Tensor:  # R⁻¹ with Zᵀ = U R, R = (Z Zᵀ)^{1/2}, pseudo-inverse
        lam, q = torch.linalg.eigh(z @ z.T)
        keep = lam > lam[-1].clamp_min(0.0) * rel_tol
        inv_sqrt = torch.where(keep, lam.clamp_min(1e-300).rsqrt(), torch.zeros_like(lam))
        return (q * inv_sqrt) @ q.T

    zs = [[a.clone(), b.T.clone()] for a, b in pairs]  # per pair: [Z_A, Z_B]
    st = [[{"m": torch.zeros_like(z), "v": torch.zeros(z.shape[0], z.shape[0], dtype=z.dtype), "rho": 0.0,
            "rinv_o_prev": torch.zeros(z.shape[0], z.shape[0], dtype=z.dtype), "z_o_prev": torch.zeros_like(zo)}
           for z, zo in ((za, zb), (zb, za))] for za, zb in zs]
    out = []
    for t in range(1, steps + 1):
        grads = grads_fn([(za, zb.T) for za, zb in zs])  # [(∇A, ∇B)]
        new = []
        for k, (za, zb) in enumerate(zs):
            gw = [grads[k][0], grads[k][1].T]
            pair_new = []
            for side, (z, zo) in enumerate(((za, zb), (zb, za))):
                s = st[k][side]
                rinv_o = rinv_of(zo)
                p = rinv_o.T @ (zo @ s["z_o_prev"].T) @ s["rinv_o_prev"]
                g = gw[side]
                sbar = rinv_o.T @ (g @ g.T) @ rinv_o / z.shape[1]
                v_moved = p @ s["v"] @ p.T
                gap = (torch.linalg.eigvalsh(s["v"]) - torch.linalg.eigvalsh(v_moved)).max().clamp_min(0.0)
                tr_gap = (torch.trace(s["v"]) - torch.trace(v_moved)).clamp_min(0.0)
                s["rho"] = b2 * (s["rho"] + float(torch.minimum(gap, tr_gap)))
                v = b2 * v_moved + (1 - b2) * sbar
                s["v"] = 0.5 * (v + v.T)
                lam, q = torch.linalg.eigh(s["v"])
                k_mat = (q / (((lam.clamp_min(0.0) + s["rho"]) / (1 - b2**t)).sqrt() + eps)) @ q.T
                c = rinv_o @ k_mat
                s["m"] = b1 * p @ s["m"] + (1 - b1) * c.T @ g
                delta = lr / (1 - b1**t) * rinv_o @ s["m"]
                s["rinv_o_prev"], s["z_o_prev"] = rinv_o, zo.clone()
                pair_new.append((1 - lr * wd) * z - delta)
            new.append(pair_new)
        zs = new
        out.append([(za.clone(), zb.T.clone()) for za, zb in zs])
    return out


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("zero_b", [False, True])
def test_batched_implementation_matches_a_direct_transcription(zero_b: bool, implementation: str) -> None:
    """Both layout-optimized steps equal the textbook per-pair algorithm (float64, rounding level)."""
    g = torch.Generator().manual_seed(7)
    shapes = [(7, 5, 3), (7, 5, 3), (6, 6, 2)]  # (out, in, r): a two-pair bucket with in != out, an in == out one
    pairs = [(torch.randn(r, i, generator=g, dtype=torch.float64),
              torch.zeros(o, r, dtype=torch.float64) if zero_b else torch.randn(o, r, generator=g, dtype=torch.float64))
             for o, i, r in shapes]
    targets = [torch.randn(o, i, generator=g, dtype=torch.float64) for o, i, _ in shapes]
    xs = [torch.randn(9, i, generator=g, dtype=torch.float64) for _, i, _ in shapes]

    def grads_fn(current):
        out = []
        for (a, b), t, x in zip(current, targets, xs, strict=True):
            a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
            ((x @ (b @ a - t).T) ** 2).mean().backward()
            out.append((a.grad, b.grad))
        return out

    lr, wd = 0.05, 0.1
    expected = _reference_trajectory(pairs, grads_fn, 5, lr, wd)
    params = [(a.clone().requires_grad_(), b.clone().requires_grad_()) for a, b in pairs]
    opt = LoRARITE([{"params": [a, b]} for a, b in params], lr=lr, weight_decay=wd, implementation=implementation)
    for step in range(5):
        for (a, b), (ga, gb) in zip(params, grads_fn([(a.detach(), b.detach()) for a, b in params]), strict=True):
            a.grad, b.grad = ga, gb
        opt.step()
        for (a, b), (ea, eb) in zip(params, expected[step], strict=True):
            torch.testing.assert_close(a.detach(), ea, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(b.detach(), eb, rtol=1e-9, atol=1e-12)
