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

Implementation. Pairs with equal shapes and hyper-parameters are one batch, with both factors in the "wide"
layout Z (r×n): Z = A and Z = Bᵀ, in which the algorithm is symmetric and the r×n products are fast. The
stacked state is the canonical storage (per-parameter state entries are views of it): the last two
factor values (alternating halves, so that the Gram and the cross product ``Z_t Z_{t-1}ᵀ`` are one bmm and
nothing is copied), and ``[Mᵀ; G]`` (2r×n) so that ``Mᵀ ← β₁ P Mᵀ + (1-β₁) Cᵀ G`` and the step ``R⁻¹ Mᵀ``
are a single bmm with a 2r×2r left factor (written into a second buffer, and the two swap roles). A step
costs about eight passes over the factors plus two batched r×r eigendecompositions.

This module imports torch only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["LoRARITE", "make_fused_adamw"]


def make_fused_adamw(
    params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
) -> torch.optim.AdamW:
    """AdamW with the fastest stock implementation: ``fused=True`` for CUDA parameters, ``foreach=True`` else.

    Parameters
    ----------
    params : iterable
        Tensors or parameter groups (all on one device type).
    lr, betas, eps, weight_decay : float
        As in :class:`torch.optim.AdamW`.
    """
    params = list(params)
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    on_cuda = bool(tensors) and all(p.is_cuda for p in tensors)
    kind = {"fused": True} if on_cuda else {"foreach": True}
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kind)


def _inv_factor_eigh(gram: torch.Tensor, rel_tol: float) -> torch.Tensor:
    """Pseudo-inverse factor ``R⁻¹ = Q Λ^{-1/2}`` (directions with λ ≤ rel_tol·λ_max dropped), ``gram = Q Λ Qᵀ``."""
    lam, q = torch.linalg.eigh(gram)  # ascending
    keep = lam > lam[..., -1:].clamp_min(0.0) * rel_tol
    inv_sqrt = torch.where(keep, lam.clamp_min(torch.finfo(lam.dtype).tiny).rsqrt(), torch.zeros_like(lam))
    return q * inv_sqrt.unsqueeze(-2)


def _inv_factor(gram: torch.Tensor, rel_tol: float) -> torch.Tensor:
    """``R⁻¹`` for a factorization ``Zᵀ = U R`` (U orthonormal) given the Gram ``Z Zᵀ = RᵀR``, (M, r, r) f64.

    Cholesky (``R = Lᵀ``, upper triangular — the R of a QR factorization up to signs) where the Gram is safely
    positive definite; the eigendecomposition pseudo-inverse for (near-)singular Grams, e.g. B = 0 at init.
    """
    chol, info = torch.linalg.cholesky_ex(gram)
    pivots = chol.diagonal(dim1=-2, dim2=-1).square()  # (M, r)
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True)
    ok = (info == 0) & (pivots > rel_tol * trace).all(dim=-1)  # (M,)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device).expand_as(gram)
    rinv = torch.linalg.solve_triangular(chol.mT, eye, upper=True)  # R⁻¹ = L⁻ᵀ
    if not bool(ok.all()):
        bad = ~ok
        rinv[bad] = _inv_factor_eigh(gram[bad], rel_tol)
    return rinv


def _escaped_mass(lam_old: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``min(max_i (λ_i(old) - λ_i(new))₊, (tr old - tr new)₊)``; λ ascending; (M, r, r) → (M,)."""
    lam_new = torch.linalg.eigvalsh(new)
    eig_gap = (lam_old - lam_new).amax(dim=-1).clamp_min(0.0)
    trace_gap = (old.diagonal(dim1=-2, dim2=-1).sum(-1) - new.diagonal(dim1=-2, dim2=-1).sum(-1)).clamp_min(0.0)
    return torch.minimum(eig_gap, trace_gap)


def _sym(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (x + x.mT)


_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "escaped", "history", "prev_rinv")


class _Bucket:
    """Stacked state of N LoRA pairs with equal shapes; the canonical storage between steps.

    Row i < N is the A factor of pair i, row N + i its B factor, in the wide layout Z (r×n): Z = A, Z = Bᵀ.
    ``blocks`` are the row ranges that share n (one block when in == out). Per block:

    * ``hist`` (rows, 2r, n): ``hist[j, (t % 2)·r : (t % 2 + 1)·r]`` is Z at the last step t of that parity,
      so Z_t and Z_{t-1} are both there and their Grams are one bmm;
    * two buffers (rows, 2r, n) used alternately: the current one holds ``[Mᵀ; G]`` (the first moment and
      this step's gradient), and one bmm writes ``[Mᵀ_new; ΔZ]`` into the other, which becomes current.

    Per row: ``step``, ``v`` (V̄), ``rho`` (ρ), ``rinv_prev`` (R⁻¹ of the previous step). The per-parameter state
    entries are views of these buffers (B's in its (out, r) layout), so ``state_dict()`` sees the values; after
    ``load_state_dict`` (new tensors) the bucket is rebuilt from the state.
    """

    def __init__(self, params: list[torch.Tensor], states: list[dict[str, Any]], n: int, blocks: list[slice],
                 state_dtype: torch.dtype) -> None:
        r = params[0].shape[0]
        self.n, self.r, self.blocks = n, r, blocks

        def wide(x: torch.Tensor, row: int) -> torch.Tensor:  # (…, out, r) -> (…, r, out) for B rows
            return x if row < n else x.mT

        self.step = torch.stack([st["step"] for st in states]).float()  # (2N,)
        self.t = [int(x) for x in self.step.tolist()]  # the same, on the host
        self.v = torch.stack([st["exp_avg_sq"] for st in states]).double()  # (2N, r, r)
        self.rho = torch.stack([st["escaped"] for st in states]).double()  # (2N,)
        self.rinv_prev = torch.stack([st["prev_rinv"] for st in states]).double()  # (2N, r, r)
        self.lam: torch.Tensor | None = None  # eigenvalues of v when known
        self.hist: list[torch.Tensor] = []
        self.mg: list[list[torch.Tensor]] = []  # per block, two buffers (rows, 2r, n_s), used alternately
        self.views: list[dict[str, torch.Tensor]] = []
        self.z_dst: list[list[torch.Tensor]] = [[], []]  # per parity: where this step's Z goes
        self.m_view: list[list[torch.Tensor]] = [[], []]  # per buffer: Mᵀ rows, in each parameter's layout
        self.g_dst: list[list[torch.Tensor]] = [[], []]  # per buffer: where this step's gradient goes
        self.delta: list[list[torch.Tensor]] = [[], []]  # per buffer: ΔZ rows, in each parameter's layout
        for b in blocks:
            rows = range(b.start, b.stop)
            hist = torch.stack([wide(states[i]["history"], i).reshape(2 * r, -1) for i in rows]).to(state_dtype)
            m = torch.stack([wide(states[i]["exp_avg"], i) for i in rows]).to(state_dtype)  # (rows, r, n_s)
            self.hist.append(hist)
            mg = torch.cat([m, torch.zeros_like(m)], dim=1)  # (rows, 2r, n_s)
            self.mg.append([mg, torch.empty_like(mg)])
            for j in range(len(rows)):
                for parity in (0, 1):
                    self.z_dst[parity].append(hist[j, parity * r : (parity + 1) * r])
        for cur in (0, 1):  # buffer `cur` holds [Mᵀ; G] and buffer 1 - cur receives [Mᵀ_new; ΔZ]
            self.m_view[cur] = [wide(mg[cur][j, :r], i) for b, mg in zip(blocks, self.mg, strict=True)
                                for j, i in enumerate(range(b.start, b.stop))]
            self.g_dst[cur] = [mg[cur][j, r:] for mg in self.mg for j in range(mg[cur].shape[0])]
            self.delta[cur] = [wide(mg[cur][j, r:], i) for b, mg in zip(blocks, self.mg, strict=True)
                               for j, i in enumerate(range(b.start, b.stop))]
        self.cur = 0
        for i, st in enumerate(states):
            b = 0 if len(blocks) == 1 or i < n else 1
            j = i - blocks[b].start
            view = {
                "step": self.step[i],
                "exp_avg": self.m_view[0][i],
                "exp_avg_sq": self.v[i],
                "escaped": self.rho[i],
                "history": wide(self.hist[b][j].view(2, r, -1), i),
                "prev_rinv": self.rinv_prev[i],
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
    ) -> None:
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
        self._buckets: dict[tuple[int, ...], _Bucket] = {}
        super().__init__(items, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_buckets", {})

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
        buckets: dict[tuple[Any, ...], list[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]] = {}
        for group in self.param_groups:
            a, b = group["params"]
            if a.grad is None or b.grad is None:
                continue
            if a.grad.is_sparse or b.grad.is_sparse:
                raise ValueError("params: LoRA-RITE does not support sparse gradients")
            if "history" not in self.state[a] or "history" not in self.state[b]:  # state is created whole
                self._init_state(a, b)
            key = (tuple(a.shape), tuple(b.shape), a.dtype, a.device, float(group["lr"]), tuple(group["betas"]),
                   float(group["eps"]), float(group["weight_decay"]))
            buckets.setdefault(key, []).append((a, b, group))
        for pairs in buckets.values():
            self._step_bucket(pairs)
        return loss

    def _bucket(self, params: list[torch.Tensor], states: list[dict[str, Any]], n: int, blocks: list[slice],
                state_dtype: torch.dtype) -> _Bucket:
        key = tuple(id(p) for p in params)
        bucket = self._buckets.get(key)
        if bucket is None or not bucket.owns(states):
            ids = set(key)
            for other in [k for k in self._buckets if ids.intersection(k)]:
                del self._buckets[other]
            bucket = self._buckets[key] = _Bucket(params, states, n, blocks, state_dtype)
        return bucket

    def _step_bucket(self, pairs: list[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]) -> None:
        """One step for N pairs of equal shapes and hyper-parameters, batched.

        In the wide layout, side s ∈ {A, B} with partner o: ``P_s = R_o⁻ᵀ (Z_o Z_o,prevᵀ) R_o,prev⁻¹``,
        ``ḡ_sᵀ ḡ_s = R_o⁻ᵀ (G_s G_sᵀ) R_o⁻¹``, ``Mᵀ ← β₁ P_s Mᵀ + (1-β₁) C_sᵀ G_s`` with ``C_s = R_o⁻¹ K_s``, and
        ``ΔZ_s = lr/bc₁ · R_o⁻¹ Mᵀ``. The r×r tensors are (2N, r, r), A rows first; the partner of row i is
        row (i + N) mod 2N.
        """
        group = pairs[0][2]
        lr, (beta1, beta2), eps, wd = float(group["lr"]), group["betas"], float(group["eps"]), group["weight_decay"]
        As = [a for a, _, _ in pairs]
        Bs = [b for _, b, _ in pairs]
        params = As + Bs
        states = [self.state[p] for p in params]  # A rows, then B rows
        n = len(As)
        r, n_in = As[0].shape
        n_out = Bs[0].shape[0]
        f64 = torch.float64
        state_dtype = torch.promote_types(As[0].dtype, torch.float32)
        rel_tol = 10 * torch.finfo(state_dtype).eps  # Gram eigenvalues below rel_tol·λ_max are rounding noise
        blocks = [slice(0, 2 * n)] if n_in == n_out else [slice(0, n), slice(n, 2 * n)]
        bk = self._bucket(params, states, n, blocks, state_dtype)

        def partner(x: torch.Tensor) -> torch.Tensor:  # (2N, ...) A rows <-> B rows
            return torch.cat([x[n:], x[:n]])

        # this step's factors and gradients into the stacked buffers, wide layout
        bk.step.add_(1)
        bk.t = [t + 1 for t in bk.t]
        parity = [t % 2 for t in bk.t]
        cur = bk.cur
        # A rows: per-tensor copies; B rows: one stack and one transposing block copy (faster than per-tensor
        # transposed copies) when the B rows share their parity
        torch._foreach_copy_([bk.z_dst[h][i] for i, h in enumerate(parity[:n])], As)
        torch._foreach_copy_(bk.g_dst[cur][:n], [a.grad for a in As])
        b_block, b0 = (0, n) if len(blocks) == 1 else (1, 0)
        mg_b = bk.mg[b_block][cur][b0 : b0 + n]  # (N, 2r, out): B rows of the current buffer
        mg_b[:, r:].copy_(torch.stack([b.grad for b in Bs]).mT)
        if all(h == parity[n] for h in parity[n:]):
            h = parity[n]
            bk.hist[b_block][b0 : b0 + n, h * r : (h + 1) * r].copy_(torch.stack(Bs).mT)
        else:
            torch._foreach_copy_([bk.z_dst[h][n + i] for i, h in enumerate(parity[n:])], [b.mT for b in Bs])
        t = bk.step.to(f64)  # (2N,)
        bc1, bc2 = 1.0 - beta1**t, 1.0 - beta2**t

        # 1.+3. Gram Z_t Z_tᵀ and cross product Z_t Z_{t-1}ᵀ from one bmm over both history halves
        grams, crosses = [], []
        for blk, hist in zip(blocks, bk.hist, strict=True):
            hb = parity[blk]
            if all(h == hb[0] for h in hb):
                h = hb[0]
                prod = hist[:, h * r : (h + 1) * r] @ hist.mT  # (rows, r, 2r)
                grams.append(prod[..., h * r : (h + 1) * r])
                crosses.append(prod[..., (1 - h) * r : (2 - h) * r])
            else:  # pairs at different step counts: full 2r×2r Gram, then pick per row
                full = (hist @ hist.mT).view(-1, 2, r, 2, r)  # (rows, half, r, half, r)
                idx = torch.tensor(hb, device=hist.device)
                rows = torch.arange(len(hb), device=hist.device)
                grams.append(full[rows, idx, :, idx])
                crosses.append(full[rows, idx, :, 1 - idx])
        rinv = _inv_factor(torch.cat(grams).to(f64), rel_tol)  # (2N, r, r): Zᵀ = U R
        rinv_o = partner(rinv)
        p = rinv_o.mT @ partner(torch.cat(crosses).to(f64)) @ partner(bk.rinv_prev)  # P_s = U_o,tᵀ U_o,t-1
        # 2. second moment of the unmagnified gradient, ḡᵀḡ / n_s
        ggram = torch.cat([mg[cur][:, r:] @ mg[cur][:, r:].mT for mg in bk.mg]).to(f64)  # (2N, r, r)
        size = torch.tensor([n_in] * n + [n_out] * n, dtype=f64, device=rinv.device)[:, None, None]
        s_new = rinv_o.mT @ ggram @ rinv_o / size

        # 4. transport V, escaped mass, EMA
        lam_old = torch.linalg.eigvalsh(bk.v) if bk.lam is None else bk.lam
        v_moved = _sym(p @ bk.v @ p.mT)
        rho = beta2 * (bk.rho + _escaped_mass(lam_old, bk.v, v_moved))  # (2N,)
        v_new = _sym(beta2 * v_moved + (1.0 - beta2) * s_new)
        # 5. K = (V̂ + ρ̂ I)^{-1/2} with ε on the square roots; C = R_o⁻¹ K so that S̄ᵀ = Cᵀ G
        lam, q = torch.linalg.eigh(v_new)
        inv = 1.0 / ((lam.clamp_min(0.0) + rho[:, None]) / bc2[:, None]).sqrt().add_(eps)  # (2N, r)
        c = rinv_o @ ((q * inv.unsqueeze(-2)) @ q.mT)

        # 6.+7. [Mᵀ_new; ΔZ] = [[β₁P, (1-β₁)Cᵀ], [s R_o⁻¹ β₁P, s R_o⁻¹ (1-β₁)Cᵀ]] @ [Mᵀ; G],  s = lr/bc₁
        top = torch.cat([beta1 * p, (1.0 - beta1) * c.mT], dim=-1)  # (2N, r, 2r)
        left = torch.cat([top, (rinv_o * (lr / bc1)[:, None, None]) @ top], dim=-2).to(state_dtype)  # (2N, 2r, 2r)
        for blk, mg in zip(blocks, bk.mg, strict=True):
            torch.bmm(left[blk], mg[cur], out=mg[1 - cur])
        bk.cur = cur = 1 - cur
        for st, m_view in zip(states, bk.m_view[cur], strict=True):
            st["exp_avg"] = m_view
        for view, m_view in zip(bk.views, bk.m_view[cur], strict=True):
            view["exp_avg"] = m_view
        deltas = bk.delta[cur]
        if params[0].dtype != state_dtype:
            deltas = [d.to(params[0].dtype) for d in deltas]
        if wd:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        torch._foreach_sub_(params, deltas)

        bk.v.copy_(v_new)
        bk.rho.copy_(rho)
        bk.rinv_prev.copy_(rinv)
        bk.lam = lam
