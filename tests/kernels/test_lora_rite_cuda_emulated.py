"""The CUDA kernel of LoRA-RITE (kernels/lora_rite_cuda.cu) on machines without a GPU: its device code compiled
for the host under a small CUDA emulation (tests/kernels/cuda_emulation: one OS thread per CUDA thread, real
barriers for __syncthreads and the warp shuffles) and driven by LoRARITE in place of the CPU kernel, against the
batched torch route — the CPU kernel's tests, run on the GPU kernel's arithmetic, indexing and reductions.

What this cannot check (the CUDA tests in test_lora_rite_cpu.py do, on a GPU): the host entry point (copies,
launch, streams), and anything that depends on the hardware's scheduling beyond what the barriers order.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from kernels import cbuild
from tests.kernels.test_lora_rite_cpu import (
    SHAPES,
    _fresh_grads,
    _lags,
    _pairs,
    _run,
    _same_shape_pairs,
)

ROOT = Path(__file__).resolve().parents[2]
EMULATION = Path(__file__).resolve().parent / "cuda_emulation"
THREADS = 64  # the kernel's block size is a compile-time constant; two warps keep the emulation's threads few

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ (C++20) is needed to emulate the kernel")


@pytest.fixture(scope="module")
def emulated(tmp_path_factory: pytest.TempPathFactory):
    """A replacement for cbuild.load that returns the emulated CUDA kernel for lora_rite_cpu.c requests."""
    build = tmp_path_factory.mktemp("cuda_emulation")
    source = (ROOT / "kernels" / "lora_rite_cuda.cu").read_text()
    entry, include, dynamic = ("static cudaError_t launch(", "#include <cuda_runtime.h>\n",
                               "extern __shared__ double s_ws[];")
    assert entry in source and include in source and dynamic in source  # the anchors this harness relies on
    body = source[: source.index(entry)].replace(include, "")
    body = body.replace(dynamic, "static double s_ws[2 * WS_MATS * R * R];")  # dynamic shared memory, static here
    (build / "kernel_body.inc").write_text(body)
    libraries: dict[tuple[str, str], ctypes.CDLL] = {}

    def load(name: str, defines: tuple[tuple[str, str], ...], arch: str = "") -> tuple[ctypes.CDLL | None, str]:
        assert name == "lora_rite_cpu.c", name
        d = dict(defines)
        key = (d["RANK"], d["REAL"])
        if key not in libraries:
            out = build / f"emulated_{key[0]}_{key[1]}.so"
            proc = subprocess.run(["g++", "-std=c++20", "-O1", "-fPIC", "-shared", f"-DRANK={key[0]}",
                                   f"-DREAL={key[1]}", f"-DTHREADS={THREADS}", f"-I{build}", f"-I{EMULATION}",
                                   str(EMULATION / "harness.cpp"), "-o", str(out), "-lpthread"],
                                  capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, proc.stderr[-2000:]
            libraries[key] = ctypes.CDLL(str(out))
        return libraries[key], ""

    return load


@pytest.fixture
def cuda_kernel_on_host(emulated, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cbuild, "load", emulated)


def test_emulated_cuda_kernel_matches_the_torch_route_in_float64(cuda_kernel_on_host) -> None:
    """Every shape of SHAPES (ranks 1–16, odd ranks, a two-pair bucket), 12 steps with weight decay and a lagging
    pair, half the pairs from the singular B = 0 start (the pseudo-inverse path), half from a regular one (the
    Cholesky path): the factors to rounding."""
    zero_b = True
    ref_params, _ = _run("torch", torch.float64, zero_b, 0.1, 12, _lags)
    params, opt = _run("fused", torch.float64, zero_b, 0.1, 12, _lags)
    assert opt.routes == frozenset({"fused"})
    moved = 0.0
    for (a, b), (ra, rb), (a0, b0) in zip(params, ref_params, _pairs(torch.float64, zero_b), strict=True):
        torch.testing.assert_close(a.detach(), ra.detach(), rtol=1e-8, atol=1e-9)
        torch.testing.assert_close(b.detach(), rb.detach(), rtol=1e-8, atol=1e-9)
        moved = max(moved, (a.detach() - a0).abs().max().item(), (b.detach() - b0).abs().max().item())
    assert moved > 0.05
    assert opt.state[params[1][0]]["step"].item() == 10


def test_emulated_cuda_kernel_in_float32_is_as_accurate_as_the_torch_route(cuda_kernel_on_host) -> None:
    """float32 factors (Grams reduced in float32 across the block): distance of W = B A to the float64
    trajectory, as test_lora_rite_cpu.py measures the CPU kernel's."""
    exact, _ = _run("torch", torch.float64, True, 0.01, 12, _lags)
    errors = {}
    for implementation in ("torch", "fused"):
        params, _ = _run(implementation, torch.float32, True, 0.01, 12, _lags)
        errors[implementation] = [
            ((b.detach().double() @ a.detach().double()) - eb.detach() @ ea.detach()).abs().max().item()
            / (eb.detach() @ ea.detach()).abs().max().item()
            for (a, b), (ea, eb) in zip(params, exact, strict=True)]
    for k, (mine, ref) in enumerate(zip(errors["fused"], errors["torch"], strict=True)):
        assert mine <= 5 * ref + 2e-6, (SHAPES[k], mine, ref)
        assert mine < 1e-4, (SHAPES[k], mine)


def test_emulated_cuda_kernel_steps_pairs_independently(cuda_kernel_on_host) -> None:
    """One block per pair: three pairs in one launch step bit for bit as each pair in a launch of its own."""
    from kernels.lora_rite import LoRARITE

    together = _same_shape_pairs(3, seed=3)
    alone = [(a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()) for a, b in together]
    opt = LoRARITE([{"params": [a, b], "lr": 0.01 * (k + 1)} for k, (a, b) in enumerate(together)],
                   implementation="fused")
    opts = [LoRARITE([{"params": [a, b], "lr": 0.01 * (k + 1)}], implementation="fused")
            for k, (a, b) in enumerate(alone)]
    for step in range(4):
        grads = _fresh_grads(together, step)
        for pairs in (together, alone):
            for (a, b), (ga, gb) in zip(pairs, grads, strict=True):
                a.grad, b.grad = ga.clone(), gb.clone()
        opt.step()
        for o in opts:
            o.step()
    for (a, b), (ra, rb) in zip(together, alone, strict=True):
        assert torch.equal(a, ra) and torch.equal(b, rb)
