"""The fused kernels of LoRA-RITE (kernels/lora_rite_cpu.c, and kernels/lora_rite_cuda.cu on a CUDA device)
against their reference, the batched torch route: the same trajectories and state over many steps, ranks and
shapes (vector tails included), from the singular B = 0 start, with weight decay and lagging pairs; state_dicts
that move between the routes; the build cache; and the fallback where no C compiler exists."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import cbuild
from kernels.lora_rite import LoRARITE

ROOT = Path(__file__).resolve().parents[2]
SHAPES = [(12, 10, 3), (12, 10, 3), (40, 33, 8), (9, 17, 1), (19, 19, 4), (37, 21, 16), (6, 6, 2), (64, 48, 5)]
# (out, in, r): a two-pair bucket, rank 8 with vector tails (33 = 4·8 + 1), rank 1, in == out, rank 16, odd ranks
ROWS = 24  # inputs per loss: more than any rank, so that no gradient is rank-deficient (see the float32 test)
ON_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=ON_CUDA)]


def _pairs(dtype: torch.dtype, zero_b: bool, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)  # drawn in float64, then cast: the same values for every dtype
    f64 = torch.float64
    return [((torch.randn(r, i, generator=g, dtype=f64) / i**0.5).to(dtype),
             torch.zeros(o, r, dtype=dtype) if zero_b and k % 2 == 0
             else torch.randn(o, r, generator=g, dtype=f64).to(dtype))
            for k, (o, i, r) in enumerate(SHAPES)]


def _grads(pairs, targets, xs):
    out = []
    for (a, b), t, x in zip(pairs, targets, xs, strict=True):
        a, b = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        x, t = x.to(a.device, a.dtype), t.to(a.device, a.dtype)
        ((x @ (b @ a - t).T) ** 2).mean().backward()
        out.append((a.grad, b.grad))
    return out


def _run(implementation: str, dtype: torch.dtype, zero_b: bool, wd: float, steps: int, skip=lambda step, k: False,
         device: str = "cpu"):
    g = torch.Generator().manual_seed(1)
    targets = [torch.randn(o, i, generator=g, dtype=torch.float64) for o, i, _ in SHAPES]
    xs = [torch.randn(ROWS, i, generator=g, dtype=torch.float64) for _, i, _ in SHAPES]
    params = [(a.to(device).requires_grad_(), b.to(device).requires_grad_()) for a, b in _pairs(dtype, zero_b)]
    opt = LoRARITE([{"params": [a, b]} for a, b in params], lr=0.02, weight_decay=wd, implementation=implementation)
    for step in range(steps):
        for k, ((a, b), (ga, gb)) in enumerate(zip(params, _grads(params, targets, xs), strict=True)):
            a.grad, b.grad = (None, None) if skip(step, k) else (ga, gb)
        opt.step()
    return params, opt


def _lags(step: int, k: int) -> bool:
    return step in (2, 3) and k == 1  # pair 1 gets no gradient twice: it lags two steps behind the others


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("zero_b", [False, True])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_fused_kernel_matches_the_torch_route_in_float64(zero_b: bool, wd: float, device: str) -> None:
    """Factors to rounding after 12 steps. The state too where it is unique: R⁻¹ from the eigendecomposition
    pseudo-inverse (B = 0 at the start) is defined up to an orthogonal basis change (eigenvector signs), which
    the algorithm is invariant to but the basis-dependent moments are not; there only ρ (basis-free) is compared."""
    ref_params, ref = _run("torch", torch.float64, zero_b, wd, 12, _lags, device)
    params, opt = _run("fused", torch.float64, zero_b, wd, 12, _lags, device)
    assert opt.routes == frozenset({"fused"})
    moved = 0.0
    keys = ("step", "history", "escaped") if zero_b else ("step", "exp_avg", "exp_avg_sq", "escaped", "history",
                                                          "prev_rinv")
    for (a, b), (ra, rb), (a0, b0) in zip(params, ref_params, _pairs(torch.float64, zero_b), strict=True):
        assert a.device.type == device
        torch.testing.assert_close(a.detach(), ra.detach(), rtol=1e-8, atol=1e-9)
        torch.testing.assert_close(b.detach(), rb.detach(), rtol=1e-8, atol=1e-9)
        moved = max(moved, (a.detach().cpu() - a0).abs().max().item(), (b.detach().cpu() - b0).abs().max().item())
        for p, rp in ((a, ra), (b, rb)):
            v_scale = ref.state[rp]["exp_avg_sq"].abs().max().item()
            for key in keys:
                x, y = opt.state[p][key], ref.state[rp][key]
                assert x.dtype == y.dtype and x.shape == y.shape, key
                # the r×r moments are tiny: relative to their size (ρ, often rounding noise, to V's)
                scale = v_scale if key == "escaped" else (y.abs().max().item() or 1.0)
                torch.testing.assert_close(x / scale, y / scale, rtol=1e-8, atol=1e-9, msg=key)
    assert moved > 0.05  # the factors did move
    assert opt.state[params[1][0]]["step"].item() == 10 and opt.state[params[0][0]]["step"].item() == 12


@pytest.mark.parametrize(("threads", "device"), [(1, "cpu"), (2, "cpu"), pytest.param(1, "cuda", marks=ON_CUDA)])
@pytest.mark.parametrize("zero_b", [False, True])
def test_fused_kernel_in_float32_is_as_accurate_as_the_torch_route(zero_b: bool, threads: int, device: str) -> None:
    """float32 (Grams accumulated in float32 by both routes): each route's distance to the float64 trajectory
    from the same start, measured on W = B A (the factors of an ill-conditioned pair may drift apart in
    equivalent ways). With fewer inputs than the rank the gradients are exactly rank-deficient, and float32
    noise in their null directions is what Adam-like preconditioners amplify, in either route: ROWS > r here."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # the gradients' rounding, hence the trajectories, depend on it
    try:
        exact, _ = _run("torch", torch.float64, zero_b, 0.01, 12, _lags, device)
        errors = {}
        for implementation in ("torch", "fused"):
            params, _ = _run(implementation, torch.float32, zero_b, 0.01, 12, _lags, device)
            errors[implementation] = [
                ((b.detach().double() @ a.detach().double()) - eb.detach() @ ea.detach()).abs().max().item()
                / (eb.detach() @ ea.detach()).abs().max().item()
                for (a, b), (ea, eb) in zip(params, exact, strict=True)]
    finally:
        torch.set_num_threads(before)
    for k, (mine, ref) in enumerate(zip(errors["fused"], errors["torch"], strict=True)):
        assert mine <= 5 * ref + 2e-6, (SHAPES[k], mine, ref)
        assert mine < 1e-4, (SHAPES[k], mine)


@pytest.mark.parametrize("device", DEVICES)
def test_a_state_dict_moves_between_the_routes(device: str) -> None:
    """Trained with the torch route, saved, loaded into the fused kernel (and back): the same next steps."""
    dtype = torch.float64
    params, opt = _run("torch", dtype, zero_b=True, wd=0.05, steps=3, device=device)
    saved = copy.deepcopy(opt.state_dict())
    start = [(a.detach().clone(), b.detach().clone()) for a, b in params]
    g = torch.Generator().manual_seed(5)
    grads = [[(torch.randn(a.shape, generator=g, dtype=dtype).to(device),
               torch.randn(b.shape, generator=g, dtype=dtype).to(device)) for a, b in params] for _ in range(3)]
    results = {}
    for first, second in (("torch", "fused"), ("fused", "torch"), ("torch", "torch")):
        ps = [(a.clone().requires_grad_(), b.clone().requires_grad_()) for a, b in start]
        o = LoRARITE([{"params": [a, b]} for a, b in ps], lr=0.02, weight_decay=0.05, implementation=first)
        o.load_state_dict(copy.deepcopy(saved))
        for step, gs in enumerate(grads):
            if step == 2:  # switch routes mid-way through its own state_dict
                o2 = LoRARITE([{"params": [a, b]} for a, b in ps], lr=0.02, weight_decay=0.05,
                              implementation=second)
                o2.load_state_dict(copy.deepcopy(o.state_dict()))
                o = o2
            for (a, b), (ga, gb) in zip(ps, gs, strict=True):
                a.grad, b.grad = ga.clone(), gb.clone()
            o.step()
        results[(first, second)] = ps
    for key in (("torch", "fused"), ("fused", "torch")):
        for (a, b), (ra, rb) in zip(results[key], results[("torch", "torch")], strict=True):
            torch.testing.assert_close(a.detach(), ra.detach(), rtol=1e-10, atol=1e-13)
            torch.testing.assert_close(b.detach(), rb.detach(), rtol=1e-10, atol=1e-13)


def test_without_a_compiler_auto_falls_back_with_a_warning_and_fused_says_why(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(cbuild, "_compiler", lambda: (None, "no C compiler found (set CC, or install gcc)"))
    monkeypatch.setenv("FEDPRIV_KERNEL_CACHE", str(tmp_path))
    cbuild.load.cache_clear()
    monkeypatch.setattr("kernels.lora_rite._warned", set())
    try:
        a = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
        b = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
        a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
        ref_a, ref_b = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        ref_a.grad, ref_b.grad = a.grad.clone(), b.grad.clone()
        with pytest.warns(RuntimeWarning, match=r"the CPU kernel could not be built \(no C compiler found"):
            auto = LoRARITE([a, b], lr=0.1)
            auto.step()
        assert auto.routes == frozenset({"torch"})
        LoRARITE([ref_a, ref_b], lr=0.1, implementation="torch").step()
        torch.testing.assert_close(a.detach(), ref_a.detach(), rtol=0, atol=0)  # it took the torch route
        with pytest.raises(RuntimeError, match=r"^implementation: 'fused' LoRA-RITE is unavailable: no C compiler"):
            LoRARITE([a, b], lr=0.1, implementation="fused").step()
        assert not list(tmp_path.iterdir())
    finally:
        cbuild.load.cache_clear()


def test_a_cc_that_does_not_exist_is_named_not_replaced(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("CC", "no-such-cc-1.0")
    monkeypatch.setenv("FEDPRIV_KERNEL_CACHE", str(tmp_path))
    cbuild.load.cache_clear()
    try:
        a = torch.randn(3, 7, requires_grad=True)
        b = torch.randn(5, 3, requires_grad=True)
        a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
        with pytest.raises(RuntimeError, match=r"unavailable: CC='no-such-cc-1.0' is not an executable on PATH"):
            LoRARITE([a, b], implementation="fused").step()
        assert not list(tmp_path.iterdir())
    finally:
        cbuild.load.cache_clear()


def test_the_build_is_cached_for_later_processes(tmp_path) -> None:
    env = {**os.environ, "FEDPRIV_KERNEL_CACHE": str(tmp_path)}
    script = ("import torch; from kernels.lora_rite import LoRARITE\n"
              "a = torch.randn(2, 9, requires_grad=True); b = torch.randn(4, 2, requires_grad=True)\n"
              "a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)\n"
              "LoRARITE([a, b], implementation='fused').step()\n")
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        built = sorted(tmp_path.iterdir())
        assert len(built) == 1 and built[0].name.startswith("lora_rite_cpu-") and built[0].suffix == ".so"
    mtime = built[0].stat().st_mtime_ns
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, check=True, timeout=300)
    assert built[0].stat().st_mtime_ns == mtime  # loaded, not rebuilt


def test_a_state_that_does_not_fit_the_factors_is_refused_not_written_through() -> None:
    """The kernel writes through raw pointers, so a state of the wrong size must never reach it."""
    a = torch.randn(2, 9, requires_grad=True)
    b = torch.randn(4, 2, requires_grad=True)
    opt = LoRARITE([a, b], implementation="fused")
    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
    opt.step()
    a.data, b.data = torch.randn(2, 12), torch.randn(4, 2)  # resized behind the optimizer's back
    a.grad = torch.ones_like(a)
    with pytest.raises(ValueError, match=r"^state: 'exp_avg' of a factor of shape \(2, 12\) has shape \(2, 9\)"):
        opt.step()


def _same_shape_pairs(n: int, seed: int, device: str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 33, generator=g).to(device).requires_grad_(),
             torch.randn(40, 8, generator=g).to(device).requires_grad_()) for _ in range(n)]


def _fresh_grads(pairs, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + step)  # new tensors every step, as backward() makes them
    return [(torch.randn(a.shape, generator=g).to(a.device), torch.randn(b.shape, generator=g).to(b.device))
            for a, b in pairs]


HYPER = [{"lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.0},
         {"lr": 0.03, "betas": (0.8, 0.99), "eps": 1e-8, "weight_decay": 0.1},
         {"lr": 0.002, "betas": (0.95, 0.9999), "eps": 1e-4, "weight_decay": 0.01}]


@pytest.mark.parametrize("device", DEVICES)
def test_pairs_with_their_own_hyper_parameters_share_one_call_and_step_as_they_would_alone(device: str) -> None:
    """Per-pair lr, betas, eps and weight decay (an lr schedule included) in one kernel call: bit-for-bit the
    steps of each pair in an optimizer of its own (the lanes of the kernel's r×r algebra are independent)."""
    together = _same_shape_pairs(3, seed=3, device=device)
    alone = [(a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()) for a, b in together]
    opt = LoRARITE([{"params": [a, b], **h} for (a, b), h in zip(together, HYPER, strict=True)],
                   implementation="fused")
    opts = [LoRARITE([{"params": [a, b], **h}], implementation="fused") for (a, b), h in
            zip(alone, HYPER, strict=True)]
    for step in range(6):
        grads = _fresh_grads(together, step)
        for pairs in (together, alone):
            for (a, b), (ga, gb) in zip(pairs, grads, strict=True):
                a.grad, b.grad = ga.clone(), gb.clone()
        opt.step()
        for o in opts:
            o._plan = None  # the general path: hyper-parameters read afresh
            o.step()
        for o in (opt, *opts):  # an lr schedule: the next step must use the new values
            for group in o.param_groups:
                group["lr"] *= 0.7
    assert opt._plan is not None and len(opt._plan.calls) == 1  # one call for the three pairs, repeated
    assert opt.routes == frozenset({"fused"})
    for (a, b), (ra, rb) in zip(together, alone, strict=True):
        assert torch.equal(a, ra) and torch.equal(b, rb)


@pytest.mark.parametrize("device", DEVICES)
def test_the_repeated_call_gives_way_whenever_what_it_relies_on_changes(device: str) -> None:
    """Steps with a missing gradient, a factor whose storage was replaced, a non-contiguous gradient: the same
    factors, bit for bit, as an optimizer that takes the general path at every step."""
    pairs = _same_shape_pairs(3, seed=4, device=device)
    ref_pairs = [(a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()) for a, b in pairs]
    opt, ref = (LoRARITE([p for pair in ps for p in pair], lr=0.01, implementation="fused")
                for ps in (pairs, ref_pairs))
    for step in range(8):
        grads = _fresh_grads(pairs, step)
        for ps in (pairs, ref_pairs):
            for k, ((a, b), (ga, gb)) in enumerate(zip(ps, grads, strict=True)):
                a.grad, b.grad = ga.clone(), gb.clone()
                if step == 4 and k == 1:
                    a.grad = None  # pair 1 sits this step out
                if step == 6 and k == 2:  # the same values, strided
                    a.grad = torch.empty(a.shape[::-1], device=a.device).t().copy_(ga)
                    assert not a.grad.is_contiguous()
            if step == 2:
                ps[0][0].data = ps[0][0].data.clone()  # new storage, same values
        if step in (2, 4, 6):
            assert opt._plan is not None  # made by the step before, and about to give way
        ref._plan = None
        opt.step()
        ref.step()
        for (a, b), (ra, rb) in zip(pairs, ref_pairs, strict=True):
            assert torch.equal(a, ra) and torch.equal(b, rb), step
    assert opt._plan is not None
