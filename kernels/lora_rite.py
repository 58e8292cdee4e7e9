r"""LoRA-RITE: a transformation-invariant adaptive optimizer for LoRA factors, and a fused-AdamW helper.

Yen, Si, Meng, Yu, Duvvuri, Dhillon, Hsieh & Kumar, "LoRA Done RITE: Robust Invariant Transformation
Equilibration for LoRA Optimization" (ICLR 2025, arXiv:2410.20625).

Why. A LoRA update ``W = B A`` (B: out×r, A: r×in) is unchanged by ``(B, A) -> (B S, S⁻¹ A)`` for any invertible
S (r×r), but Adam and friends produce different ΔW for the two parametrizations (they are not even
scale-invariant). LoRA-RITE makes the update of W depend on W's factorization only through span(B) and
span(Aᵀ), so equivalent factorizations follow equivalent trajectories.

Notation (this module's convention ``W = B A``; the paper writes ``Z = A Bᵀ`` with its A = our B and its
B = our Aᵀ). Each factor is handled as a tall n×r matrix X with "other" factor Y: for B, X = B (n = out) and
Y = Aᵀ; for A, X = Aᵀ (n = in) and Y = B. Per step t and per factor:

1. Basis of the other factor: ``Y = U R`` with U orthonormal (n_Y×r) and R (r×r). Any such factorization
   works (QR in the paper). Here R comes from the r×r Gram ``YᵀY = RᵀR``: its Cholesky factor (R = Lᵀ, which
   is QR's R up to signs), or, when the Gram is (near-)singular — e.g. B = 0 at initialization —
   ``R⁻¹ = Q Λ^{-1/2}`` from ``YᵀY = Q Λ Qᵀ`` with directions λ ≤ 10·eps·λ_max dropped (a pseudo-inverse, as
   the authors' ``pinv``; eps of the Gram's accumulation dtype, below which λ is rounding noise).
2. Unmagnified gradient ``ḡ = ∇X R⁻¹``. Since ``∇X = ∇W_X U R`` (``∇B = ∇W Aᵀ``, ``∇Aᵀ = ∇Wᵀ B``),
   ``ḡ = ∇W_X U`` depends on the factorization only through the basis U.
3. Basis change ``P = U_tᵀ U_{t-1}`` (r×r), computed as ``R_t⁻ᵀ (Y_tᵀ Y_{t-1}) R_{t-1}⁻¹``.
4. Second moment (r×r, in the current basis), with escaped mass::

       Ṽ = P V_{t-1} Pᵀ
       V_t = β₂ Ṽ + (1-β₂) ḡᵀḡ / n
       ρ_t = β₂ (ρ_{t-1} + d_λ(V_{t-1}, Ṽ)),   d_λ(V, Ṽ) = min(max_i (λ_i(V) - λ_i(Ṽ))₊, (tr V - tr Ṽ)₊)

   (λ_i ascending). The projection can only lose mass when span(Y) rotates; ρ adds it back as an isotropic
   term so that the preconditioner never becomes too aggressive in directions that just entered the span.
5. Preconditioned step ``S̄ = ḡ (V̂ + ρ̂ I)^{-1/2}`` with Adam's bias correction ``V̂ = V/(1-β₂ᵗ)``,
   ``ρ̂ = ρ/(1-β₂ᵗ)``, and ε added to the square roots of the eigenvalues (as in the authors' code).
6. First moment ``M_t = β₁ M_{t-1} Pᵀ + (1-β₁) S̄`` (transported like V), ``M̂ = M_t/(1-β₁ᵗ)``.
7. ``X ← (1 - lr·wd) X - lr · M̂ R⁻ᵀ`` (decoupled weight decay).

Invariance (why ΔW is the same for (B, A) and (B S, S⁻¹ A)): the other factor's basis changes to ``U O`` for
an orthogonal O (r×r) and R to ``Oᵀ R S`` (or ``Oᵀ R S⁻ᵀ``), so ḡ → ḡ O, P → O_tᵀ P O_{t-1}, V → Oᵀ V O,
ρ and the eigenvalues are unchanged, S̄ → S̄ O, M → M O, and the step ``M̂ R⁻ᵀ`` → ``M̂ R⁻ᵀ S`` (resp. S⁻ᵀ)
— exactly the transformed step of the transformed factor. So ``(B, A)_{t+1}`` and ``(B S, S⁻¹ A)_{t+1}`` are
again equivalent, at every step, including the second-order term ΔB ΔA. Decoupled weight decay multiplies
both factors by ``(1 - lr·wd)``, which also preserves the equivalence (W shrinks by ``(1 - lr·wd)²``).

Deviations from the paper / authors' code, all invariance-preserving: R from the Gram (Cholesky, or the
eigendecomposition pseudo-inverse when singular) instead of QR + pinv; moments use Adam's bias correction
``1/(1-βᵗ)`` (equal to the authors' bias-corrected decay); the escaped mass is always on (the authors' code
has it off by default); the authors' optional gradient clipping, update capping/skipping and factor balancing
are not implemented (DP training clips per-sample gradients already).

Precision: the Grams ``Z Zᵀ`` (n-long dot products) are accumulated in the state dtype — float32 for
float32/bfloat16 factors, float64 for float64 ones — and everything r×r (factorizations, P, V̄, ρ, K) runs in
float64. A float32 Gram perturbs the smallest eigenvalue of a factor with condition number κ by roughly
1e-8·κ² relatively (measured for n = 768: 6e-5 at κ = 100, 2e-2 at κ = 1000), which only perturbs the
preconditioner slightly; directions with λ < 10·eps·λ_max (κ ≳ 900 in float32) count as outside the span.
Exact invariance is a property of the arithmetic, tested in float64. Moments of the factors' size are kept
in the state dtype.

Implementation. Pairs with equal shapes and hyper-parameters are one batch (the CPU kernel below takes
hyper-parameters per pair: its batches are the pairs of equal shapes). The algebra is written in the
"wide" layout Z (r×n): Z = A and Z = Bᵀ, in which it is symmetric; the A factors are stored that way and the B
factors in their own (n×r) layout, so nothing is ever transposed in memory (a bmm reads Bᵀ through a transposed
operand). The stacked state is the canonical storage (per-parameter state entries are views of it): the last
two factor values (alternating halves, so that the Gram and the cross product ``Z_t Z_{t-1}ᵀ`` are one bmm per
side), and ``[Mᵀ; G]`` (``[M, G]`` for B) so that ``Mᵀ ← β₁ P Mᵀ + (1-β₁) Cᵀ G`` and the step ``R⁻¹ Mᵀ`` are a
single bmm with a 2r×2r left factor (written into a second buffer, and the two swap roles). Per step the
factors are read by one multi-tensor copy (with the gradients) and written by one multi-tensor lerp, which also
applies the decoupled weight decay (``X + w (E - X)`` with ``w = lr·wd``, ``E = -ΔZ / w``, for float32/float64
factors). Every r×r quantity of the 2N factors is one batched tensor, float64; the partner's ``R⁻¹`` is what
every formula uses, so the products are gathered in partner order once. A step costs about seven passes over
the factors, two bmms per side, and two batched r×r eigendecompositions; its fixed cost is about 60 small
batched r×r ops (on a CPU each costs ~10 µs of dispatch, so fewer, larger buckets are cheaper).

CPU kernel. On a CPU that batched route is bound by dispatch and by GEMMs with an inner dimension of r or 2r,
which BLAS runs far below peak (12.5 ms a step for 48 pairs r = 8, d = 768 on this project's VM, 4.5× torch's
fused AdamW). ``implementation="fused"`` (the default on CPUs, ``"auto"``) runs the whole step in one C call per
bucket instead (kernels/lora_rite_cpu.c, compiled at first use by :mod:`kernels.cbuild` for the pairs' rank and
dtype): per two pairs, a pass per factor for its Grams, the r×r algebra of the four factors in the lanes of one
float64 vector (Jacobi eigensolver), and a pass per factor for the moment and factor update; the per-parameter
state tensors are its storage (4.1 ms, 1.6× fused AdamW; benchmarks/README.md). The batched torch route is its
reference (tests/kernels/test_lora_rite_cpu.py) and is used for other dtypes, for ranks above 32, and where no C
compiler is available. Once a step has run every pair on the kernel, later steps repeat its calls
(:class:`_FusedPlan`) after checking only what the kernel trusts, which takes the Python side of a step from
~0.45 to ~0.24 ms for 48 pairs.

CUDA kernel. On a GPU the batched route is a few hundred small launches and three waits for the device (two
eigendecompositions, one singularity check): 3.6 ms a step for the 48 pairs above on an H100, bound by the host,
7.2× torch's fused AdamW there (0.50 ms, itself bound by the host; benchmarks/results/optimizers_cuda.json).
``"fused"`` on CUDA launches one kernel per bucket instead (kernels/lora_rite_cuda.cu, compiled at first use by nvcc
for the device's architecture, ranks up to 16): one block per pair does the Grams (all threads), the r×r algebra of
both factors (one thread each, float64, the CPU kernel's algorithm) and the updates. It takes the same arguments and
state as the CPU kernel, so :class:`_FusedBucket`, :class:`_FusedCall` and :class:`_FusedPlan` serve both. Its
device code is tested against the torch route on every machine, compiled for the host under a CUDA emulation
(tests/kernels/test_lora_rite_cuda_emulated.py), and on CUDA devices by tests/kernels/test_lora_rite_cpu.py; it has
not yet run on a GPU, so ``"auto"`` keeps the torch route on CUDA until it has been measured there.

This module imports torch (and the standard library) only.
"""

from __future__ import annotations

import ctypes
import math
import warnings
from array import array
from collections.abc import Iterable
from typing import Any

import torch

from kernels import cbuild

__all__ = ["LoRARITE", "make_fused_adamw"]

IMPLEMENTATIONS = ("auto", "fused", "torch")
FUSED_MAX_RANK = 32  # the C kernel keeps its r×r work on the stack (~14 matrices of r×r×4 doubles); larger: torch
CUDA_MAX_RANK = 16  # the CUDA kernel keeps it in shared memory (26 r×r doubles per pair: 53 KB at r = 16)
_C_TYPES = {torch.float32: "float", torch.float64: "double"}
_warned: set[str] = set()


def make_fused_adamw(
    params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    implementation: str = "fused",
) -> torch.optim.AdamW:
    """AdamW with the fastest stock implementation: one fused kernel per tensor (``fused=True``).

    torch has fused AdamW kernels for CUDA and, since 2.4, for CPU; on a CPU it is ~3× faster than the
    multi-tensor (``foreach``) loop (0.59 M LoRA parameters in 96 tensors, 1 thread: 3.5 ms vs 11 ms a step on
    this project's VM), with the same arithmetic. Where the build has no fused kernel for the parameters'
    device (e.g. MPS on an old torch), ``foreach`` is used.

    Parameters
    ----------
    params : iterable
        Tensors or parameter groups (all on one device type).
    lr, betas, eps, weight_decay : float
        As in :class:`torch.optim.AdamW`.
    implementation : {"fused", "foreach"}
        ``foreach`` forces the multi-tensor implementation (a baseline for benchmarks).
    """
    if implementation not in ("fused", "foreach"):
        raise ValueError(f"implementation: expected 'fused' or 'foreach', got {implementation!r}")
    params = list(params)
    kwargs = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
    if implementation == "fused":
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except RuntimeError:  # "`fused=True` requires all the params to be floating point Tensors of supported devices"
            pass
    return torch.optim.AdamW(params, foreach=True, **kwargs)


def _inv_factor_eigh(gram: torch.Tensor, rel_tol: float) -> torch.Tensor:
    """Pseudo-inverse factor ``R⁻¹ = Q Λ^{-1/2}`` (directions with λ ≤ rel_tol·λ_max dropped), ``gram = Q Λ Qᵀ``."""
    lam, q = torch.linalg.eigh(gram)  # ascending
    keep = lam > lam[..., -1:].clamp_min(0.0) * rel_tol
    inv_sqrt = torch.where(keep, lam.clamp_min(torch.finfo(lam.dtype).tiny).rsqrt(), torch.zeros_like(lam))
    return q * inv_sqrt.unsqueeze(-2)


def _inv_factor(gram: torch.Tensor, rel_tol: float, eye: torch.Tensor) -> torch.Tensor:
    """``R⁻¹`` for a factorization ``Zᵀ = U R`` (U orthonormal) given the Gram ``Z Zᵀ = RᵀR``, (M, r, r) f64.

    Cholesky (``R = Lᵀ``, upper triangular — the R of a QR factorization up to signs) where the Gram is safely
    positive definite; the eigendecomposition pseudo-inverse for (near-)singular Grams, e.g. B = 0 at init.
    ``eye`` is the r×r identity (broadcast over M).
    """
    chol, info = torch.linalg.cholesky_ex(gram)
    pivots = chol.diagonal(dim1=-2, dim2=-1)  # (M, r)
    small = pivots * pivots <= gram.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True) * rel_tol  # (M, r)
    rinv = torch.linalg.solve_triangular(chol.mT, eye.expand_as(gram), upper=True)  # R⁻¹ = L⁻ᵀ
    if bool(small.any() | info.any()):
        bad = small.any(-1) | (info != 0)
        rinv[bad] = _inv_factor_eigh(gram[bad], rel_tol)
    return rinv


def _escaped_mass(lam_old: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``min(max_i (λ_i(old) - λ_i(new))₊, (tr old - tr new)₊)``; λ ascending; (M, r, r) → (M,)."""
    eig_gap = (lam_old - torch.linalg.eigvalsh(new)).amax(dim=-1)
    trace_gap = (old - new).diagonal(dim1=-2, dim2=-1).sum(-1)
    return torch.minimum(eig_gap, trace_gap).clamp_min_(0.0)  # min(a₊, b₊) = (min(a, b))₊


_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "escaped", "history", "prev_rinv")


def _fused_library(rank: int, dtype: torch.dtype, device: torch.device) -> tuple[Any, str]:
    """The fused kernel for this rank, dtype and device (compiled at first use) and ``""``, or ``None`` and why
    not: the C kernel on CPUs, the CUDA kernel on CUDA devices."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        lib, why = cbuild.load("lora_rite_cuda.cu", (("RANK", str(rank)), ("REAL", _C_TYPES[dtype])),
                               arch=f"{major}{minor}")
        if lib is not None and lib.lora_rite_step_cuda.argtypes is None:
            lib.lora_rite_step_cuda.argtypes = ([ctypes.c_int64] * 3 + [ctypes.c_void_p] * 6 + [ctypes.c_int64]
                                                + [ctypes.c_double, ctypes.c_void_p, ctypes.c_int64])
            lib.lora_rite_step_cuda.restype = ctypes.c_int
            lib.lora_rite_cuda_error.argtypes = [ctypes.c_int]
            lib.lora_rite_cuda_error.restype = ctypes.c_char_p
        return lib, why
    itemsize = torch.finfo(dtype).bits // 8
    lanes = math.gcd(rank, 32 // itemsize)  # a row of B as vectors of ≤ 32 bytes
    lib, why = cbuild.load("lora_rite_cpu.c", (("RANK", str(rank)), ("REAL", _C_TYPES[dtype]), ("TLANES", str(lanes))))
    if lib is not None and lib.lora_rite_step.argtypes is None:
        lib.lora_rite_step.argtypes = ([ctypes.c_int64] * 3 + [ctypes.c_void_p] * 4 + [ctypes.c_int64]
                                       + [ctypes.c_double])
        lib.lora_rite_step.restype = ctypes.c_int
    return lib, why


def _kernel_name(device: torch.device) -> str:
    return "the CUDA kernel" if device.type == "cuda" else "the CPU kernel"


def _fused_unsupported(pairs: list[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]) -> str:
    """Why the fused kernel does not apply to this bucket, or ``""``."""
    a = pairs[0][0]
    if a.device.type not in ("cpu", "cuda"):
        return f"the fused kernels run on CPU and CUDA tensors, not {a.device.type}"
    name = _kernel_name(a.device)
    if a.dtype not in _C_TYPES:
        return f"{name} handles float32 and float64 factors, got {a.dtype}"
    limit = CUDA_MAX_RANK if a.device.type == "cuda" else FUSED_MAX_RANK
    if not a.shape[0] <= limit:
        return f"{name} handles ranks up to {limit}, got {a.shape[0]}"
    return ""


class _FusedBucket:
    """State addresses of N LoRA pairs for the fused kernel: 12 int64 per pair (see lora_rite_cpu.c), filled once,
    on the pairs' device.

    The per-parameter state tensors are the kernel's storage (made contiguous, in the dtypes the kernel expects,
    on the pairs' device, when the bucket is built)."""

    def __init__(self, params: list[torch.Tensor], states: list[dict[str, Any]]) -> None:
        n = len(params) // 2
        r = params[0].shape[0]
        wide = params[0].dtype
        device = params[0].device
        for p, st in zip(params, states, strict=True):
            expected = {"step": ((), torch.float32), "exp_avg": (p.shape, wide), "history": ((2, *p.shape), wide),
                        "exp_avg_sq": ((r, r), torch.float64), "escaped": ((), torch.float64),
                        "prev_rinv": ((r, r), torch.float64)}
            for key, (shape, dtype) in expected.items():
                value = st[key]
                if tuple(value.shape) != tuple(shape):  # the kernel writes through raw pointers: never guess
                    raise ValueError(f"state: '{key}' of a factor of shape {tuple(p.shape)} has shape "
                                     f"{tuple(value.shape)}, expected {tuple(shape)} (a state_dict of other params?)")
                if value.dtype != dtype or not value.is_contiguous() or value.device != device:
                    st[key] = value.to(device=device, dtype=dtype, memory_format=torch.contiguous_format,
                                       copy=True)
        # the kernel's storage (in lora_rite_cpu.c's order, _STATE_KEYS): referenced here too, so that no address in
        # the table can outlive its tensor
        self.storage = [[states[side * n + i][key] for side in (0, 1) for key in _STATE_KEYS] for i in range(n)]
        self.state_table = torch.tensor([[x.data_ptr() for x in row] for row in self.storage], dtype=torch.int64,
                                        device=device)
        self.views = [st["exp_avg_sq"] for st in states]
        # eigenvalues of each V as the kernel's last eigendecomposition left them (recomputed on the first step)
        self.lam = torch.zeros(2 * n, r, dtype=torch.float64, device=device)
        self.lam_known = 0

    def owns(self, states: list[dict[str, Any]]) -> bool:
        return len(states) == len(self.views) and all(
            st.get("exp_avg_sq") is view for st, view in zip(states, self.views, strict=True))


class _Bucket:
    """Stacked state of N LoRA pairs with equal shapes; the canonical storage between steps.

    Row i < N is the A factor of pair i, row N + i its B factor. The algebra is written in the wide layout
    Z (r×n): Z = A, Z = Bᵀ; the A rows are stored that way (A's own layout) and the B rows in B's own (n×r)
    layout, so that nothing is ever transposed in memory (a bmm reads a transposed operand for free). Per side:

    * ``hist`` — A: (N, 2r, in), ``hist[j, h·r:(h+1)·r]``; B: (N, out, 2r), ``hist[j, :, h·r:(h+1)·r]`` — the
      factor at the last step of parity h = t % 2, so Z_t and Z_{t-1} are both there and the Gram and the cross
      product ``Z_t Z_{t-1}ᵀ`` are one bmm;
    * ``mg`` — two buffers used alternately, A: (N, 2r, in) = ``[Mᵀ; G]``, B: (N, out, 2r) = ``[M, G]``: the
      current one holds the first moment and this step's gradient, and one bmm writes ``[Mᵀ_new; ΔZ]``
      (``[M_new, ΔB]`` for B) into the other, which becomes current.

    Per row: ``step``, ``v`` (V̄), ``rho`` (ρ); ``rinv_o_prev`` holds, in row i, R⁻¹ of the *partner* row (i + N)
    mod 2N at the previous step — the order every use needs. The per-parameter state entries are views of these
    buffers in each parameter's layout, so ``state_dict()`` sees the values; after ``load_state_dict`` (new
    tensors) the bucket is rebuilt from the state.
    """

    def __init__(self, params: list[torch.Tensor], states: list[dict[str, Any]], n: int,
                 state_dtype: torch.dtype) -> None:
        r = params[0].shape[0]
        self.n, self.r = n, r
        device = params[0].device
        partner = [(i + n) % (2 * n) for i in range(2 * n)]
        a_states, b_states = states[:n], states[n:]

        self.step = torch.stack([st["step"] for st in states]).float()  # (2N,)
        self.t = [int(x) for x in self.step.tolist()]  # the same, on the host
        self.v = torch.stack([st["exp_avg_sq"] for st in states]).double()  # (2N, r, r)
        self.rho = torch.stack([st["escaped"] for st in states]).double()  # (2N,)
        self.rinv_o_prev = torch.stack([states[j]["prev_rinv"] for j in partner]).double()  # (2N, r, r)
        self.lam: torch.Tensor | None = None  # eigenvalues of v when known
        self.eye = torch.eye(r, dtype=torch.float64, device=device)
        self.sizes = torch.tensor([float(params[0].shape[1])] * n + [float(params[n].shape[0])] * n,
                                  dtype=torch.float64, device=device)[:, None, None]  # n_s per row
        # A: (N, 2r, in); B: (N, out, 2r) with history (2, out, r) -> (out, 2r)
        self.hist_a = torch.stack([st["history"].reshape(2 * r, -1) for st in a_states]).to(state_dtype)
        self.hist_b = torch.stack([st["history"].permute(1, 0, 2).reshape(-1, 2 * r) for st in b_states]
                                  ).to(state_dtype)
        m_a = torch.stack([st["exp_avg"] for st in a_states]).to(state_dtype)  # (N, r, in)
        m_b = torch.stack([st["exp_avg"] for st in b_states]).to(state_dtype)  # (N, out, r)
        mg_a = torch.cat([m_a, torch.zeros_like(m_a)], dim=1)
        mg_b = torch.cat([m_b, torch.zeros_like(m_b)], dim=2)
        self.mg_a, self.mg_b = [mg_a, torch.empty_like(mg_a)], [mg_b, torch.empty_like(mg_b)]
        # per-tensor views, in each parameter's own layout (A rows, then B rows)
        self.z_dst = [[self.hist_a[j, h * r : (h + 1) * r] for j in range(n)]
                      + [self.hist_b[j, :, h * r : (h + 1) * r] for j in range(n)] for h in (0, 1)]
        self.m_view = [[self.mg_a[c][j, :r] for j in range(n)] + [self.mg_b[c][j, :, :r] for j in range(n)]
                       for c in (0, 1)]
        self.g_view = [[self.mg_a[c][j, r:] for j in range(n)] + [self.mg_b[c][j, :, r:] for j in range(n)]
                       for c in (0, 1)]  # G in the current buffer, ΔZ (ΔB) after the bmm wrote it
        self.cur = 0
        self.views: list[dict[str, torch.Tensor]] = []
        for i, st in enumerate(states):
            history = (self.hist_a[i].view(2, r, -1) if i < n
                       else self.hist_b[i - n].view(-1, 2, r).permute(1, 0, 2))
            view = {
                "step": self.step[i],
                "exp_avg": self.m_view[0][i],
                "exp_avg_sq": self.v[i],
                "escaped": self.rho[i],
                "history": history,
                "prev_rinv": self.rinv_o_prev[partner[i]],
            }
            st.update(view)
            self.views.append(view)

    def owns(self, states: list[dict[str, Any]]) -> bool:
        """Whether the per-parameter state still consists of this bucket's views.

        The state is replaced as a whole (``_init_state``, ``load_state_dict``, which also drops the buckets),
        so one entry per parameter is checked.
        """
        return len(states) == len(self.views) and all(
            st.get("exp_avg_sq") is view["exp_avg_sq"] for st, view in zip(states, self.views, strict=True)
        )


def _cached_bucket(cache: dict[tuple[Any, ...], Any], params: list[torch.Tensor], states: list[dict[str, Any]],
                   build: Any, tag: tuple[Any, ...] = ()) -> Any:
    """The bucket of ``cache`` for these parameters (and ``tag``) while it still owns their state, else
    ``build()``'s, evicting every bucket that shares a parameter: a parameter's state has one storage."""
    key = (tag, *map(id, params))
    bucket = cache.get(key)
    if bucket is None or not bucket.owns(states):
        ids = set(key[1:])
        for other in [k for k in cache if ids.intersection(k[1:])]:
            del cache[other]
        bucket = cache[key] = build()
    return bucket


class _FusedCall:
    """One fused-kernel call over a bucket: its arrays of addresses (4 per pair) and hyper-parameters (5 per
    pair), host arrays (a CUDA call copies them into device buffers of its own, in stream order)."""

    def __init__(self, lib: Any, bucket: _FusedBucket, addresses: array, hyper: array, n: int, n_in: int,
                 n_out: int, rel_tol: float) -> None:
        self.lib, self.bucket, self.addresses, self.hyper = lib, bucket, addresses, hyper
        self.n, self.n_in, self.n_out, self.rel_tol = n, n_in, n_out, rel_tol
        self.groups: list[int] = []  # the bucket's pairs as indices into param_groups (set by the plan's maker)
        self.device = bucket.lam.device
        if self.device.type == "cuda":
            self.addresses_dev = torch.empty(4 * n, dtype=torch.int64, device=self.device)
            self.hyper_dev = torch.empty(5 * n, dtype=torch.float64, device=self.device)

    def run(self) -> None:
        bk = self.bucket
        if self.device.type == "cuda":
            code = self.lib.lora_rite_step_cuda(
                self.n, self.n_in, self.n_out, self.addresses.buffer_info()[0], self.addresses_dev.data_ptr(),
                bk.state_table.data_ptr(), self.hyper.buffer_info()[0], self.hyper_dev.data_ptr(), bk.lam.data_ptr(),
                bk.lam_known, self.rel_tol, torch.cuda.current_stream(self.device).cuda_stream, self.device.index)
            if code:
                why = self.lib.lora_rite_cuda_error(code).decode()
                raise RuntimeError(f"LoRA-RITE: the CUDA kernel failed ({why}); implementation='torch' runs without it")
        else:
            self.lib.lora_rite_step(self.n, self.n_in, self.n_out, self.addresses.buffer_info()[0],
                                    bk.state_table.data_ptr(), self.hyper.buffer_info()[0], bk.lam.data_ptr(),
                                    bk.lam_known, self.rel_tol)
        bk.lam_known = 1


class _FusedPlan:
    """The kernel calls of the last step, repeated while nothing they rely on changed.

    The general path of :meth:`LoRARITE.step` reads ~15 tensor attributes per pair and rebuilds its buckets
    (~0.5 ms a step for 48 pairs, 10 % of the step); a plan re-checks what the kernel trusts — the same
    parameter objects with unchanged data pointers (so unchanged storage: shapes and layout are checked whenever
    a pointer changes, by the general path; an in-place ``resize_`` that keeps the storage goes unnoticed, but
    every write stays inside that storage), both gradients present and contiguous (their dtype, shape and device
    are the parameter's: torch enforces it) — gathers the gradients' addresses and the groups' hyper-parameters
    (an lr schedule changes nothing else), and makes the calls. Anything else falls back to the general path.
    """

    def __init__(self, opt: LoRARITE, calls: list[_FusedCall]) -> None:
        self.calls, self.state, self.ngroups, self.nstate = calls, opt.state, len(opt.param_groups), len(opt.state)
        self.implementation = opt.implementation
        self.params = [[p for i in c.groups for p in opt.param_groups[i]["params"]] for c in calls]

    def step(self, opt: LoRARITE) -> bool:
        """Make the calls and return True, or return False having stepped nothing (only this plan's own address
        and hyper-parameter scratch arrays may have been rewritten; the general path builds new ones)."""
        groups = opt.param_groups
        if (len(groups) != self.ngroups or opt.state is not self.state or len(opt.state) != self.nstate
                or opt.implementation != self.implementation):
            return False
        for call, params in zip(self.calls, self.params, strict=True):
            addresses, hyper = call.addresses, call.hyper
            for k, i in enumerate(call.groups):
                group = groups[i]
                a, b = group["params"]
                ga, gb = a.grad, b.grad
                if (a is not params[2 * k] or b is not params[2 * k + 1] or ga is None or gb is None
                        or a.data_ptr() != addresses[4 * k] or b.data_ptr() != addresses[4 * k + 1]
                        or not ga.is_contiguous() or not gb.is_contiguous()):
                    return False
                addresses[4 * k + 2] = ga.data_ptr()
                addresses[4 * k + 3] = gb.data_ptr()
                beta1, beta2 = group["betas"]
                j = 5 * k
                hyper[j], hyper[j + 1], hyper[j + 2] = group["lr"], beta1, beta2
                hyper[j + 3], hyper[j + 4] = group["eps"], group["weight_decay"]
        for call in self.calls:
            call.run()
        return True


class LoRARITE(torch.optim.Optimizer):
    """LoRA-RITE (Yen et al., ICLR 2025) over LoRA pairs; see the module docstring for the algorithm.

    Parameters
    ----------
    params : iterable
        Parameter groups ``{"params": [A, B], ...}`` with A (r, in) and B (out, r) — one LoRA pair per group,
        e.g. :func:`kernels.lora.lora_param_groups` — or a flat sequence ``[A1, B1, A2, B2, ...]``.
    lr : float
        Learning rate.
    betas : tuple of float
        Decay rates of the first and second moments.
    eps : float
        Added to the square roots of the preconditioner's eigenvalues (> 0).
    weight_decay : float
        Decoupled weight decay: both factors are multiplied by ``1 - lr·weight_decay`` each step.
    implementation : {"auto", "fused", "torch"}
        ``"fused"``: the fused kernel for pairs of float32/float64 factors — the C kernel on CPUs (rank ≤ 32),
        the CUDA kernel on CUDA devices (rank ≤ 16) — (an error where it cannot be built or does not apply);
        ``"torch"``: the batched torch route everywhere; ``"auto"``: on CUDA the torch route (the CUDA kernel
        is opt-in until measured on hardware), elsewhere the
        kernel where it applies and builds, else (with one warning if the build failed) the torch route. The
        routes agree to rounding and share the state format, so a state_dict moves between them.

    Notes
    -----
    State per factor (standard ``Optimizer.state``, so ``state_dict``/``load_state_dict`` round-trip):
    ``step``; ``exp_avg`` (M, the factor's shape); ``exp_avg_sq`` (V̄, r×r float64, in the partner's basis);
    ``escaped`` (ρ, float64); ``history`` (2, *shape), the factor at the last even and odd step; and
    ``prev_rinv`` (R⁻¹ of the factor at the previous step, float64). As with the stock
    optimizers, ``state_dict()`` returns references to live tensors: deep-copy it to keep a snapshot.

    Raises
    ------
    ValueError
        Invalid hyper-parameters or a group that is not one (A, B) pair of matching rank, dtype and device.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        implementation: str = "auto",
    ) -> None:
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation: expected one of {', '.join(IMPLEMENTATIONS)}, got {implementation!r}")
        if not lr >= 0.0:
            raise ValueError(f"lr: must be >= 0, got {lr}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas: must be two numbers in [0, 1), got {betas}")
        if not eps > 0.0:
            raise ValueError(f"eps: must be > 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay: must be >= 0, got {weight_decay}")
        items = list(params)
        if items and all(isinstance(p, torch.Tensor) for p in items):
            if len(items) % 2:
                raise ValueError(f"params: a flat list must alternate A, B factors, got {len(items)} tensors")
            items = [{"params": [items[i], items[i + 1]]} for i in range(0, len(items), 2)]
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        self.implementation = implementation
        self._buckets: dict[tuple[Any, ...], _Bucket] = {}
        self._fused_buckets: dict[tuple[Any, ...], _FusedBucket] = {}
        self._plan: _FusedPlan | None = None
        self._routes: frozenset[str] = frozenset()
        super().__init__(items, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_buckets", {})
        self.__dict__.setdefault("_fused_buckets", {})
        self.__dict__.setdefault("implementation", "auto")
        self.__dict__.setdefault("_routes", frozenset())
        self._plan = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        if len(params) != 2:
            raise ValueError(f"params: each group must hold one LoRA pair [A, B], got {len(params)} tensors")
        a, b = params
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"params: expected [A (r, in), B (out, r)] with the same r, got shapes {tuple(a.shape)} and "
                f"{tuple(b.shape)}"
            )
        if a.dtype != b.dtype or a.device != b.device:
            raise ValueError(f"params: A and B must share dtype and device, got {a.dtype}/{a.device} and "
                             f"{b.dtype}/{b.device}")
        super().add_param_group(param_group)
        self._plan = None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`, keeping the saved dtypes of the state (torch casts floating-point
        state to the parameter's dtype, which would round the float64 r×r moments of float32 factors)."""
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, saved in state_dict["state"].items():
            p = params[index]
            for key, value in saved.items():
                if isinstance(value, torch.Tensor):
                    self.state[p][key] = value.detach().to(device=p.device, copy=True)
        self._buckets.clear()
        self._fused_buckets.clear()
        self._plan = None

    def _init_state(self, a: torch.Tensor, b: torch.Tensor) -> None:
        r = a.shape[0]
        wide = torch.promote_types(a.dtype, torch.float32)
        f64 = {"dtype": torch.float64, "device": a.device}
        for p in (a, b):
            st = self.state[p]
            st["step"] = torch.zeros((), dtype=torch.float32, device=a.device)
            st["exp_avg"] = torch.zeros(p.shape, dtype=wide, device=a.device)  # M (param shape)
            st["exp_avg_sq"] = torch.zeros((r, r), **f64)  # V̄ (r×r, basis of the other factor)
            st["escaped"] = torch.zeros((), **f64)  # ρ
            st["history"] = torch.zeros((2, *p.shape), dtype=wide, device=a.device)  # factor at last even/odd step
            st["prev_rinv"] = torch.zeros((r, r), **f64)  # its R⁻¹ at the previous step (zero: P = 0 at t = 1)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """Perform one optimization step; pairs whose A or B has no gradient are skipped."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._plan is None or not self._plan.step(self):
            self._plan = self._step_general()
        return loss

    @property
    def routes(self) -> frozenset[str]:
        """The routes the last step took: ``{"fused"}`` (the CPU or CUDA kernel), ``{"torch"}``, both (buckets of
        different kinds), or empty (no step yet, or no pair had gradients)."""
        return self._routes

    def _step_general(self) -> _FusedPlan | None:
        """One step, bucketing the pairs that have gradients; returns the plan that repeats it on the fused kernel
        when every pair took part, on the kernel, with contiguous factors and gradients (else None)."""
        buckets: dict[tuple[Any, ...], list[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]] = {}
        index: dict[int, int] = {}
        for i, group in enumerate(self.param_groups):
            a, b = group["params"]
            ga, gb = a.grad, b.grad
            if ga is None or gb is None:
                continue
            if ga.is_sparse or gb.is_sparse:
                raise ValueError("params: LoRA-RITE does not support sparse gradients")
            buckets.setdefault((a.shape, b.shape, a.dtype, a.device), []).append((a, b, group))
            index[id(group)] = i
        plans: list[_FusedCall] | None = [] if len(index) == len(self.param_groups) else None
        routes = set()
        for pairs in buckets.values():
            lib = self._kernel(pairs)
            routes.add("torch" if lib is None else "fused")
            if lib is None:  # the torch route batches pairs of equal hyper-parameters
                plans = None
                same: dict[tuple[Any, ...], list[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]] = {}
                for pair in pairs:
                    g = pair[2]
                    same.setdefault((float(g["lr"]), *map(float, g["betas"]), float(g["eps"]),
                                     float(g["weight_decay"])), []).append(pair)
                for sub in same.values():
                    self._step_bucket(sub)
                continue
            call = self._step_fused(pairs, lib)
            if plans is not None and call is not None:
                call.groups = [index[id(g)] for _, _, g in pairs]
                plans.append(call)
            else:
                plans = None
        self._routes = frozenset(routes)
        return _FusedPlan(self, plans) if plans else None

    def _kernel(self, pairs: list[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]) -> Any:
        """The fused kernel for this bucket, or None for the torch route (see ``implementation``)."""
        if self.implementation == "torch" or (self.implementation == "auto" and pairs[0][0].device.type == "cuda"):
            return None  # "auto" on CUDA: the torch route until the CUDA kernel has run on hardware (module docs)
        why = _fused_unsupported(pairs)
        lib = None
        if not why:
            a = pairs[0][0]
            lib, why = _fused_library(a.shape[0], a.dtype, a.device)
            if lib is None and self.implementation == "auto" and why not in _warned:
                _warned.add(why)
                warnings.warn(f"LoRA-RITE: {_kernel_name(a.device)} could not be built ({why}); using the slower "
                              "torch route", RuntimeWarning, stacklevel=3)
        if lib is None and self.implementation == "fused":
            raise RuntimeError(f"implementation: 'fused' LoRA-RITE is unavailable: {why}")
        return lib

    def _step_fused(self, pairs: list[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]],
                    lib: Any) -> _FusedCall | None:
        """One step of the fused kernel for N pairs of equal shapes (lora_rite_cpu.c, lora_rite_cuda.cu); returns
        the call, ready to
        be repeated by a :class:`_FusedPlan`, if the factors and gradients were contiguous (else None)."""
        a0, b0 = pairs[0][0], pairs[0][1]
        dtype, n = a0.dtype, len(pairs)
        params = [a for a, _, _ in pairs] + [b for _, b, _ in pairs]
        states = [self.state[p] for p in params]

        def build() -> _FusedBucket:
            for i, (a, b, _) in enumerate(pairs):
                if "history" not in states[i] or "history" not in states[n + i]:  # the state is created whole
                    self._init_state(a, b)
            return _FusedBucket(params, [self.state[p] for p in params])

        # the shapes are part of the key: the kernel trusts the state's sizes (a resized factor rebuilds, and the
        # rebuild refuses a state that does not fit)
        bucket = _cached_bucket(self._fused_buckets, params, states, build, (a0.shape, b0.shape))
        addresses = array("q")  # per pair: A, B, grad A, grad B (contiguous, in the factors' dtype)
        hyper = array("d")  # per pair: lr, β₁, β₂, ε, weight decay
        for _, _, g in pairs:
            beta1, beta2 = g["betas"]
            hyper.extend((g["lr"], beta1, beta2, g["eps"], g["weight_decay"]))
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []  # (strided factor, contiguous copy): copied back after
        operands = []  # converted gradients: they must outlive the call
        for a, b, _ in pairs:
            ga, gb = a.grad, b.grad
            if (a.is_contiguous() and b.is_contiguous() and ga.is_contiguous() and gb.is_contiguous()
                    and ga.dtype is dtype and gb.dtype is dtype):
                addresses.extend((a.data_ptr(), b.data_ptr(), ga.data_ptr(), gb.data_ptr()))
                continue
            xs = []
            for x in (a, b):
                if not x.is_contiguous():
                    copies.append((x, x.contiguous()))
                    x = copies[-1][1]
                xs.append(x)
            gs = [g if g.is_contiguous() and g.dtype is dtype else g.to(dtype).contiguous() for g in (ga, gb)]
            operands += gs
            addresses.extend((xs[0].data_ptr(), xs[1].data_ptr(), gs[0].data_ptr(), gs[1].data_ptr()))
        call = _FusedCall(lib, bucket, addresses, hyper, n, a0.shape[1], b0.shape[0], 10 * torch.finfo(dtype).eps)
        call.run()
        for x, copy in copies:
            x.copy_(copy)
        return None if copies or operands else call

    def _step_bucket(self, pairs: list[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]) -> None:
        """One step for N pairs of equal shapes and hyper-parameters, batched.

        In the wide layout, side s ∈ {A, B} with partner o: ``P_s = R_o⁻ᵀ (Z_o Z_o,prevᵀ) R_o,prev⁻¹``,
        ``ḡ_sᵀ ḡ_s = R_o⁻ᵀ (G_s G_sᵀ) R_o⁻¹``, ``Mᵀ ← β₁ P_s Mᵀ + (1-β₁) C_sᵀ G_s`` with ``C_s = R_o⁻¹ K_s``, and
        ``ΔZ_s = lr/bc₁ · R_o⁻¹ Mᵀ``. The r×r tensors are (2N, r, r), A rows first; the partner of row i is
        row (i + N) mod 2N, and the partner's R⁻¹ (``rinv_o``) is what every formula uses, so the Grams are
        reordered once (before the r×r algebra) and nothing else is. The B side's products read B's layout
        through transposed operands: Z_B Yᵀ = Bᵀ Y'.
        """
        group = pairs[0][2]
        lr, (beta1, beta2), eps, wd = float(group["lr"]), group["betas"], float(group["eps"]), group["weight_decay"]
        As = [a for a, _, _ in pairs]
        Bs = [b for _, b, _ in pairs]
        params = As + Bs
        states = [self.state[p] for p in params]  # A rows, then B rows
        n = len(As)
        for i in range(n):
            if "history" not in states[i] or "history" not in states[n + i]:  # the state is created whole
                self._init_state(As[i], Bs[i])
        r, n_in = As[0].shape
        n_out = Bs[0].shape[0]
        f64 = torch.float64
        dtype = params[0].dtype
        state_dtype = torch.promote_types(dtype, torch.float32)
        rel_tol = 10 * torch.finfo(state_dtype).eps  # Gram eigenvalues below rel_tol·λ_max are rounding noise
        bk = _cached_bucket(self._buckets, params, states,
                            lambda: _Bucket(params, states, len(params) // 2, state_dtype))
        hist_a, hist_b = bk.hist_a, bk.hist_b

        # this step's gradients into [Mᵀ; G] / [M, G] of the current buffer, the factors into their history half
        bk.step.add_(1)
        t = bk.t = [x + 1 for x in bk.t]
        cur = bk.cur
        grads = [p.grad for p in params]
        if min(t) == max(t):  # every pair at the same step count (pairs lag when they miss gradients)
            h = t[0] % 2
            torch._foreach_copy_(bk.g_view[cur] + bk.z_dst[h], grads + params)
            bc1, bc2 = 1.0 - beta1 ** t[0], 1.0 - beta2 ** t[0]
            scale2: float | torch.Tensor = bc2
            scale1: float | torch.Tensor = lr / bc1
            # 1.+3. Gram Z_t Z_tᵀ and cross product Z_t Z_{t-1}ᵀ from one bmm over both history halves
            # partner order (row i gets the products of row (i + N) mod 2N): the B side's first
            prod_o = torch.cat([hist_b[:, :, h * r : (h + 1) * r].mT @ hist_b,
                                hist_a[:, h * r : (h + 1) * r] @ hist_a.mT])  # (2N, r, 2r)
        else:
            parity = [x % 2 for x in t]
            torch._foreach_copy_(bk.g_view[cur] + [bk.z_dst[h][i] for i, h in enumerate(parity)], grads + params)
            tt = bk.step.to(f64)  # (2N,)
            scale2 = (1.0 - beta2**tt)[:, None]
            scale1 = (lr / (1.0 - beta1**tt))[:, None, None]
            h = 0  # full 2r×2r Grams, then per row [Gram, cross] in that order
            full = torch.cat([hist_b.mT @ hist_b, hist_a @ hist_a.mT]).view(-1, 2, r, 2, r)  # partner order
            idx = torch.tensor(parity[n:] + parity[:n], device=full.device)
            rows = torch.arange(2 * n, device=full.device)
            prod_o = torch.cat([full[rows, idx, :, idx], full[rows, idx, :, 1 - idx]], dim=-1)
        # 2. second moment of the unmagnified gradient, ḡᵀḡ / n_s (own order)
        g_a, g_b = bk.mg_a[cur][:, r:], bk.mg_b[cur][:, :, r:]
        # (B: Gᵀ [M, G] and keep Gᵀ G: an r×2r product runs faster than the r×r one in this layout)
        gg_b = (g_b.mT @ bk.mg_b[cur])[..., r:]
        prods = torch.cat([prod_o, torch.cat([g_a @ g_a.mT, gg_b])], dim=-1).to(f64)  # (2N, r, 3r)
        rinv_o = _inv_factor(prods[..., h * r : (h + 1) * r], rel_tol, bk.eye)  # (2N, r, r): Zᵀ = U R (partner)
        x = rinv_o.mT @ prods[..., r:] if h == 0 else rinv_o.mT @ prods  # (2N, r, 2r | 3r), [cross, G Gᵀ] at the end
        p = x[..., -2 * r : -r] if h == 0 else x[..., :r]
        p = p @ bk.rinv_o_prev  # P_s = U_o,tᵀ U_o,t-1
        s_new = x[..., -r:] @ rinv_o  # ḡᵀḡ
        # (the halves: V_new = sym(S + β₂ X) = H + Hᵀ with H = ½S + ½β₂X, exactly, as ½ scales without rounding)
        s_new = s_new * (0.5 * (1.0 - beta2) / n_in) if n_in == n_out else s_new * (0.5 * (1.0 - beta2) / bk.sizes)

        # 4. transport V, escaped mass, EMA
        # λ(V) as the last step's eigh left it; recomputed with the same routine after a reload (eigvalsh may
        # differ in the last bit, and a reloaded optimizer must take exactly the step the original would)
        lam_old = torch.linalg.eigh(bk.v)[0] if bk.lam is None else bk.lam
        v_moved = p @ bk.v @ p.mT  # symmetric up to rounding (eigvalsh reads one triangle; V_new is symmetrized)
        rho = beta2 * (bk.rho + _escaped_mass(lam_old, bk.v, v_moved))  # (2N,)
        half = torch.add(s_new, v_moved, alpha=0.5 * beta2)
        v_new = half + half.mT  # sym((1-β₂) ḡᵀḡ / n_s + β₂ P V Pᵀ)
        # 5. K = (V̂ + ρ̂ I)^{-1/2} with ε on the square roots; C' = (1-β₁) R_o⁻¹ K so that (1-β₁) S̄ᵀ = C'ᵀ G
        lam, q = torch.linalg.eigh(v_new)
        inv = (1.0 - beta1) / lam.clamp_min(0.0).add_(rho[:, None]).div_(scale2).sqrt_().add_(eps)  # (2N, r)
        c = rinv_o @ ((q * inv.unsqueeze(-2)) @ q.mT)

        # 6.+7. [Mᵀ_new; ΔZ] = [[β₁P, C'ᵀ], [s R_o⁻¹ β₁P, s R_o⁻¹ C'ᵀ]] @ [Mᵀ; G],  s = lr/bc₁ (the B side: its
        # transpose, [M_new, ΔB] = [M, G] @ leftᵀ). With decoupled weight decay, X ← (1 - w) X - ΔZ (w = lr·wd) is
        # one lerp pass, X + w (E - X) with E = -ΔZ / w: the rows receive E instead of ΔZ (for float32/float64
        # factors; lower precisions take two passes).
        decay = float(lr * wd)
        lerp = decay > 0.0 and dtype == state_dtype
        top = torch.cat([beta1 * p, c.mT], dim=-1)  # (2N, r, 2r)
        bottom = (rinv_o @ top).mul_(scale1 / -decay if lerp else scale1)
        left = torch.cat([top, bottom], dim=-2).to(state_dtype)  # (2N, 2r, 2r)
        torch.bmm(left[:n], bk.mg_a[cur], out=bk.mg_a[1 - cur])
        torch.bmm(bk.mg_b[cur], left[n:].mT, out=bk.mg_b[1 - cur])
        bk.cur = cur = 1 - cur
        for st, view, m_view in zip(states, bk.views, bk.m_view[cur], strict=True):
            st["exp_avg"] = view["exp_avg"] = m_view
        deltas = bk.g_view[cur]
        if dtype != state_dtype:
            deltas = [d.to(dtype) for d in deltas]
        if lerp:
            torch._foreach_lerp_(params, deltas, decay)
        else:
            if decay:
                torch._foreach_mul_(params, 1.0 - decay)
            torch._foreach_sub_(params, deltas)

        bk.v.copy_(v_new)
        bk.rho.copy_(rho)
        bk.rinv_o_prev.copy_(rinv_o)
        bk.lam = lam
