"""User-level differentially private distribution (histogram) estimation.

n users each hold m samples from an unknown distribution p over k items; we release an estimate p̂ while
protecting *all* samples of any one user. Neighbouring datasets replace one user's entire data (n is public).
Error is ℓ1: ‖p̂ − p‖₁.

References
----------
- Y. Liu, A. T. Suresh, F. Yu, S. Kumar, M. Riley, "Learning discrete distributions: user vs item-level
  privacy", NeurIPS 2020. Laplace/Gaussian on the aggregate need n = O(k/(mα²) + k/(εα)) users; their
  mechanism needs Õ(k/(mα²) + k/(√m εα)): a private *coarse* estimate first, then every user's count of each
  item is clipped to a binomial-width interval around it, so one user moves the aggregate ~√m times less.
- C. Dwork, F. McSherry, K. Nissim, A. Smith, TCC 2006 (Laplace); Dwork & Roth 2014, App. A (Gaussian).
- J. Duchi, S. Shalev-Shwartz, Y. Singer, T. Chandra, ICML 2008 (Euclidean projection onto the simplex).

Methods and their sensitivities (user u's counts c_u ∈ ℕᵏ, m_u = Σ_j c_uj)
---------------------------------------------------------------------------
``laplace`` / ``gaussian``: each user contributes its empirical distribution h_u = c_u / m_u; the aggregate is
S = Σ_u h_u. Replacing user u by u' changes S by h_u − h_u', two probability vectors, so
‖ΔS‖₁ ≤ ‖h_u‖₁ + ‖h_u'‖₁ = 2 and ‖ΔS‖₂ ≤ √(‖h_u‖₂² + ‖h_u'‖₂²) ≤ √2 (equality: all mass on one item, then
on another). Laplace adds Lap(2/ε) per item (ε-DP, event ``LaplaceDpEvent(1/ε)``); Gaussian adds
N(0, (σ√2)²) with σ calibrated so that ``GaussianDpEvent(σ)`` is (ε, δ)-DP. Neither error term shrinks with m.

``liu2020`` — a Gaussian two-phase variant of Liu et al.'s construction (all users take part in both phases;
the budget is split between them):

1. *Coarse*: the ``gaussian`` method with noise multiplier σ₁ gives p̃ (projected onto the simplex).
2. *Fine*: for each item j an interval of counts [L_j, U_j] (integers, width W_j = U_j − L_j ≥ 1) at the
   most likely counts of Binomial(m − 1, p̃_j): grown from the mode, one count at a time towards the more
   probable neighbour, until it holds ``coverage`` of the probability (``coverage = 0``: W_j = 1, the mode
   alone). Each user contributes g_u = clip(c_u, L, U) / m, the aggregate T = Σ_u g_u gets N(0, (σ₂Δ₂)²) noise
   per item. L, U depend only on the private p̃ (post-processing). When n is so small that p̃_j is off by
   several counts / m (k = 1000, n = 1000 in the benchmark), the intervals miss the true counts and the fine
   phase gains little or loses (m = 256, ε ≤ 1 there); its gain needs σ₁√2/n ≲ 1/m.
3. *Debias*: under the model (every user's count of item j is Binomial(m, p_j)), E[g_uj] = G_j(p_j) with
   G_j(p) = E[clip(X, L_j, U_j)]/m, X ~ Bin(m, p), strictly increasing in p with slope
   G_j'(p) = P(L_j ≤ Bin(m − 1, p) < U_j) (the interval's mass); the estimate solves G_j(p̂_j) = T̃_j/n by
   bisection, kept within ``COARSE_Z`` = 5 standard deviations σ₁√2/n of p̃_j (where the interval sits in
   the tail of item j's counts G_j is flat and the inversion would amplify the noise without bound: see
   :meth:`HistogramEstimator.finish`), then projected onto the simplex. Users whose data are not i.i.d. from
   one p make the debiasing approximate (the privacy guarantee does not depend on it).

Sensitivity of the fine phase (:meth:`HistogramQuery.l2_sensitivity`). Write a_j = clip(c_j, L_j, U_j) − L_j,
so g_u = (L + a_u)/m and g_u − g_u' = (a_u − a_u')/m. Three bounds, the smallest is used:

- clipping is 1-Lipschitz per coordinate: ‖a_u − a_u'‖₂ ≤ ‖c_u − c_u'‖₂ ≤ √2·m;
- each coordinate moves by at most W_j: ‖a_u − a_u'‖₂ ≤ ‖W‖₂;
- a, a' ≥ 0, so ‖a − a'‖₂² ≤ ‖a‖₂² + ‖a'‖₂² ≤ 2M with M = max ‖a‖₂² over one user. A user with a_j > 0 holds
  c_j ≥ L_j + a_j copies of item j and Σ_j c_j = m, so M ≤ max {Σ_j a_j² : 0 ≤ a_j ≤ W_j,
  Σ_{a_j>0} (L_j + a_j) ≤ m}. Since a_j² ≤ (L_j + a_j)·W_j²/(L_j + W_j) for 0 ≤ a_j ≤ W_j, M is at most the
  fractional knapsack of capacity m with item values W_j² and costs L_j + W_j (greedy by W_j²/(L_j + W_j)).

With W_j = 1 every value/cost ratio is 1/(L_j + 1) ≤ 1, so M ≤ m and Δ₂ ≤ √(2/m): √m times below the
baseline's √2 (the ℓ1 analogue, values W_j, gives :meth:`HistogramQuery.l1_sensitivity`). Privacy error of
item j: σ₂Δ₂/(n·G_j'(p_j)); the mass G_j' is ≈ 1 for rare items (m·p_j ≪ 1, L_j = 0) and ≥ ~1/√(2πm·p_j) at
the mode of frequent ones, so the ℓ1 privacy error is O(σ/n·(k/√m + √k)): for m ≤ k this is the Õ(k/(√m εα))
privacy term of Liu et al.'s user complexity (their main upper bound, as stated in the abstract and §1), where the
baselines pay O(σk/n). This is a variant, not the paper's exact algorithm (which clips to √(p/m)-scale
intervals with logarithmic safety factors); our unit-width intervals plus debiasing have smaller constants at the
k, m of ``benchmarks/histogram.py``. ``coverage`` trades sensitivity (wider intervals) for mass (steeper G_j).

Accounting: two Gaussian mechanisms with noise multipliers σ₁, σ₂ compose (RDP, and exactly for GDP) like one
with 1/σ² = 1/σ₁² + 1/σ₂²; σ is calibrated for (ε, δ) and split by ``coarse_share`` of 1/σ². The events are
``[GaussianDpEvent(σ₁), GaussianDpEvent(σ₂)]``. liu2020 needs every user to hold the same m (the intervals
are binomial(m) quantiles) and δ > 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache

import dp_accounting
import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from privacy import accounting
from privacy.mechanisms import GaussianMechanism, LaplaceMechanism, calibrate_gaussian

__all__ = [
    "METHODS",
    "CountProfile",
    "HistogramEstimator",
    "HistogramQuery",
    "HistogramRelease",
    "estimate_distribution",
    "project_to_simplex",
]

METHODS = ("laplace", "gaussian", "liu2020")
SQRT2 = math.sqrt(2.0)
COARSE_Z = 5.0  # liu2020: the fine estimate stays within this many s.d. of the coarse one (see finish)
UserCounts = np.ndarray | Callable[[], Iterable[np.ndarray]]  # (n, k) counts, or a replayable source of chunks


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------
def project_to_simplex(v: ArrayLike) -> np.ndarray:
    """Euclidean projection of ``v`` onto {p : p ≥ 0, Σ p = 1} (Duchi et al. 2008, Fig. 1)."""
    x = np.asarray(v, dtype=np.float64)
    u = np.sort(x)[::-1]
    css = np.cumsum(u) - 1.0
    idx = np.arange(1, x.size + 1)
    rho = np.nonzero(u - css / idx > 0)[0][-1]
    return np.maximum(x - css[rho] / (rho + 1), 0.0)


def _chunks(user_counts: UserCounts) -> Iterator[np.ndarray]:
    if callable(user_counts):
        yield from user_counts()
    else:
        yield user_counts


def check_counts(chunk: object, num_items: int | None = None) -> np.ndarray:
    """Validate one (users × k) block of counts; return it as an int64 array."""
    arr = np.asarray(chunk)
    if arr.ndim != 2:
        raise ValueError(f"user_counts must be a 2-d (users × items) array, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"user_counts must hold integer counts, got dtype {arr.dtype}")
    if num_items is not None and arr.shape[1] != num_items:
        raise ValueError(f"user_counts must have {num_items} columns (items), got {arr.shape[1]}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"user_counts must be non-negative, got a minimum of {arr.min()}")
    return arr.astype(np.int64, copy=False)


def _binomial_clip_mean(m: int, p: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """E[clip(X, L_j, U_j)] for X ~ Bin(m, p_j), vectorized over j: L + Σ_{t=L}^{U−1} P(X > t)."""
    t = np.arange(m + 1)
    logc = np.concatenate([[0.0], np.cumsum(np.log(m - t[:-1]) - np.log(t[1:]))])  # log C(m, t)
    pc = np.clip(p, 1e-300, 1 - 1e-16)[:, None]
    logpmf = logc[None, :] + t[None, :] * np.log(pc) + (m - t[None, :]) * np.log1p(-pc)
    pmf = np.exp(logpmf)
    pmf[p <= 0, :] = 0.0
    pmf[p <= 0, 0] = 1.0
    survival = 1.0 - np.cumsum(pmf, axis=1)  # P(X > t)
    inside = (t[None, :] >= lower[:, None]) & (t[None, :] < upper[:, None])
    return lower + np.sum(np.where(inside, np.clip(survival, 0.0, 1.0), 0.0), axis=1)


def _knapsack_bound(values: np.ndarray, costs: np.ndarray, capacity: float) -> float:
    """Fractional knapsack: max Σ θ_j·values_j subject to Σ θ_j·costs_j ≤ capacity, θ ∈ [0, 1]ᵏ (greedy by ratio)."""
    order = np.argsort(-values / costs, kind="stable")
    v, c = values[order], costs[order]
    spent = np.cumsum(c)
    full = int(np.searchsorted(spent, capacity, side="right"))  # items that fit whole
    total = float(v[:full].sum())
    if full < v.size:
        total += float(v[full]) * (capacity - (float(spent[full - 1]) if full else 0.0)) / float(c[full])
    return total


def _likely_counts(m: int, p: np.ndarray, coverage: float) -> tuple[np.ndarray, np.ndarray]:
    """Per item, the integer interval [L, U) of the most likely values of Binomial(m − 1, p): the mode, grown one
    count at a time towards the more probable neighbour until it holds ``coverage`` of the mass (≥ one count)."""
    k, t = p.size, np.arange(m)
    pmf = stats.binom.pmf(t[None, :], m - 1, np.clip(p, 0.0, 1.0)[:, None])  # (k, m); m = 1: all ones
    rows = np.arange(k)
    lo = hi = np.argmax(pmf, axis=1)
    mass = pmf[rows, lo]
    while (need := mass < coverage).any():
        left = np.where(lo > 0, pmf[rows, np.maximum(lo - 1, 0)], -1.0)
        right = np.where(hi < m - 1, pmf[rows, np.minimum(hi + 1, m - 1)], -1.0)
        go_left, go_right = need & (left >= right) & (left >= 0), need & (right > left)
        if not (go_left | go_right).any():
            break
        lo, hi = lo - go_left, hi + go_right
        mass = mass + np.where(go_left, left, 0.0) + np.where(go_right, right, 0.0)
    return lo.astype(np.int64), (hi + 1).astype(np.int64)


# ---------------------------------------------------------------------------------------------------------
# the per-user statistic
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HistogramQuery:
    """What each user computes and the aggregate's sensitivity; the server sends it to clients.

    ``kind = "frequency"``: h_u = c_u / m_u. ``kind = "clipped"``: clip(c_u, lower, upper) / m, for users with
    exactly m samples. The aggregate is the sum over users.
    """

    kind: str
    num_items: int
    m: int = 0
    lower: np.ndarray | None = field(default=None, compare=False)
    upper: np.ndarray | None = field(default=None, compare=False)

    @property
    def l1_sensitivity(self) -> float:
        """Bound on ‖ΔS‖₁ when one user's data is replaced (derivation in the module docstring)."""
        if self.kind == "frequency":
            return 2.0
        lower, width = self._clip_geometry()
        return min(2.0, float(width.sum()) / self.m, 2.0 * _knapsack_bound(width, lower + width, self.m) / self.m)

    @property
    def l2_sensitivity(self) -> float:
        """Bound on ‖ΔS‖₂ when one user's data is replaced (derivation in the module docstring)."""
        if self.kind == "frequency":
            return SQRT2
        lower, width = self._clip_geometry()
        knapsack = math.sqrt(2.0 * _knapsack_bound(width**2, lower + width, self.m))
        return min(SQRT2, float(np.linalg.norm(width)) / self.m, knapsack / self.m)

    def _clip_geometry(self) -> tuple[np.ndarray, np.ndarray]:
        assert self.lower is not None and self.upper is not None
        lower = self.lower.astype(np.float64)
        return lower, self.upper.astype(np.float64) - lower

    def contribution(self, counts: np.ndarray) -> np.ndarray:
        """Sum over the users in ``counts`` (users × k) of their statistic; float64 length k."""
        c = check_counts(counts, self.num_items)
        if self.kind == "frequency":
            m_u = c.sum(axis=1, keepdims=True)
            return np.divide(c, m_u, out=np.zeros(c.shape), where=m_u > 0).sum(axis=0)
        m_u = c.sum(axis=1)
        if c.shape[0] and (m_u.min() != self.m or m_u.max() != self.m):
            raise ValueError(f"user_counts: this query needs every user to hold m={self.m} samples, "
                             f"got users with {m_u.min()} to {m_u.max()}")
        return np.clip(c, self.lower, self.upper).sum(axis=0) / self.m

    def check_report(self, total: object, num_users: object) -> str | None:
        """Why a client's reported aggregate over ``num_users`` users is impossible for this query, or None."""
        if isinstance(num_users, bool) or not isinstance(num_users, (int, np.integer)) or num_users < 1:
            return f"num-users: expected a positive integer, got {num_users!r}"
        arr = np.asarray(total, dtype=np.float64) if isinstance(total, (list, np.ndarray)) else None
        if arr is None or arr.shape != (self.num_items,):
            shape = None if arr is None else arr.shape
            return f"histogram: expected a vector of {self.num_items} values, got {shape or type(total).__name__}"
        if not np.isfinite(arr).all():
            return "histogram: non-finite values"
        tol = 1e-6 * max(1, int(num_users))
        if self.kind == "frequency":
            lo, hi = np.zeros(self.num_items), np.full(self.num_items, float(num_users))
        else:
            lo = num_users * self.lower / self.m  # type: ignore[operator]
            hi = num_users * self.upper / self.m  # type: ignore[operator]
        bad = np.flatnonzero((arr < lo - tol) | (arr > hi + tol))
        if bad.size:
            j = int(bad[0])
            return (f"histogram: item {j} is {arr[j]:.6g}, outside the clipping interval [{lo[j]:.6g}, {hi[j]:.6g}] "
                    f"for {num_users} users ({bad.size} items out of range)")
        if self.kind == "frequency" and arr.sum() > num_users + tol:
            return f"histogram: frequencies sum to {arr.sum():.6g}, more than num-users={num_users}"
        return None


# ---------------------------------------------------------------------------------------------------------
# the estimator
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HistogramRelease:
    """A private estimate, the noisy aggregates it came from and the events to charge."""

    distribution: np.ndarray
    events: list[dp_accounting.DpEvent]
    coarse: np.ndarray | None = None


@dataclass(frozen=True)
class HistogramEstimator:
    """User-level DP distribution estimation by ``method`` at (epsilon, delta).

    Parameters
    ----------
    method : {"laplace", "gaussian", "liu2020"}
    epsilon : float
        > 0.
    delta : float
        In (0, 1) for gaussian and liu2020; ignored by laplace (pure ε-DP).
    num_items : int
        k ≥ 2.
    accountant : {"rdp", "pld"}
        Used to calibrate σ.
    coarse_share : float
        liu2020: share of the 1/σ² budget spent on the coarse phase (0.1 measured best among 0.05/0.1/0.2 in
        ``benchmarks/histogram.py``'s setting).
    coverage : float
        liu2020: in [0, 1), the Binomial(m − 1, p̃_j) mass each clipping interval holds (at least one count).
        0 (unit intervals at the mode) measured best among 0/0.3/0.5/0.7 for k = 1000 words, m ∈ {16, 64, 256}.
    """

    method: str
    epsilon: float
    delta: float
    num_items: int
    accountant: str = "rdp"
    coarse_share: float = 0.1
    coverage: float = 0.0

    def __post_init__(self) -> None:
        errors = []
        if self.method not in METHODS:
            errors.append(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not isinstance(self.epsilon, (int, float)) or isinstance(self.epsilon, bool) or not (
                math.isfinite(self.epsilon) and self.epsilon > 0):
            errors.append(f"epsilon must be a finite number > 0, got {self.epsilon!r}")
        if self.method != "laplace" and (not isinstance(self.delta, (int, float)) or not 0 < self.delta < 1):
            errors.append(f"delta must be in (0, 1) for method {self.method!r}, got {self.delta!r}")
        if isinstance(self.num_items, bool) or not isinstance(self.num_items, (int, np.integer)) or self.num_items < 2:
            errors.append(f"num_items (k) must be an integer >= 2, got {self.num_items!r}")
        if not 0 < self.coarse_share < 1:
            errors.append(f"coarse_share must be in (0, 1), got {self.coarse_share!r}")
        if not 0 <= self.coverage < 1:
            errors.append(f"coverage must be in [0, 1), got {self.coverage!r}")
        if errors:
            raise ValueError("; ".join(errors))
        accounting._check_accountant(self.accountant)

    @property
    def phases(self) -> int:
        return 2 if self.method == "liu2020" else 1

    def noise_multipliers(self) -> list[float]:
        """σ of each phase (Gaussian methods), calibrated so their composition is (ε, δ)-DP."""
        if self.method == "laplace":
            return []
        sigma = _calibrated(float(self.epsilon), float(self.delta), self.accountant)
        if self.method == "gaussian":
            return [sigma]
        return [sigma / math.sqrt(self.coarse_share), sigma / math.sqrt(1.0 - self.coarse_share)]

    def dp_events(self) -> list[dp_accounting.DpEvent]:
        """The events of all phases (what the ledger charges to every user)."""
        if self.method == "laplace":
            return [LaplaceMechanism(float(self.epsilon), 2.0).dp_event()]
        return [dp_accounting.GaussianDpEvent(s) for s in self.noise_multipliers()]

    def query(self, phase: int, coarse: np.ndarray | None = None, num_users: int = 0, m: int = 0) -> HistogramQuery:
        """The statistic users compute in ``phase`` (0-based); phase 1 of liu2020 needs the coarse estimate."""
        if phase == 0:
            return HistogramQuery("frequency", self.num_items)
        if self.method != "liu2020" or phase != 1 or coarse is None or num_users < 1 or m < 1:
            raise ValueError(f"{self.method} has no phase {phase} (or the coarse estimate, n or m is missing)")
        lower, upper = _likely_counts(m, np.asarray(coarse, dtype=np.float64), float(self.coverage))
        return HistogramQuery("clipped", self.num_items, m, lower, upper)

    def add_noise(self, phase: int, total: np.ndarray, query: HistogramQuery, rng: np.random.Generator) -> np.ndarray:
        """The aggregate of ``phase`` plus its calibrated noise."""
        if self.method == "laplace":
            return LaplaceMechanism(float(self.epsilon), query.l1_sensitivity).apply(total, rng)
        return GaussianMechanism(self.noise_multipliers()[phase], query.l2_sensitivity).apply(total, rng)

    def finish(self, noisy_total: np.ndarray, num_users: int, query: HistogramQuery,
               coarse: tuple[np.ndarray, int] | None = None) -> np.ndarray:
        """Turn a noisy aggregate into a distribution (post-processing only).

        ``coarse``: for the fine phase of liu2020, the first phase's estimate and its number of users. Each
        debiased fine estimate is then kept within ``COARSE_Z`` standard deviations σ₁√2/n of the coarse one:
        about a confidence interval for p_j that fails with probability ~6e-7 per item (p̃ is the projection onto
        the simplex, shifted by a fraction of an s.d. in the settings measured). The fine estimate inverts G_j,
        which is flat where the interval sits far in the tail of item j's counts (a coarse estimate off by a few
        counts / m: about 1 % of releases at n = 1600, k = 200, m = 64), so noise there moved p̂_j almost
        anywhere — a target just above sup G_j sent it to 1 (ℓ1 error 1.8 instead of ~0.15); inside the interval
        nothing changes.
        """
        mean = np.asarray(noisy_total, dtype=np.float64) / num_users
        if query.kind == "frequency":
            return project_to_simplex(mean)
        assert query.lower is not None and query.upper is not None
        lo, hi = np.zeros(self.num_items), np.ones(self.num_items)
        target = mean * query.m
        for _ in range(50):  # bisection on the increasing G_j(p) = E[clip(Bin(m, p), L_j, U_j)]
            mid = (lo + hi) / 2
            above = _binomial_clip_mean(query.m, mid, query.lower, query.upper) > target
            hi, lo = np.where(above, mid, hi), np.where(above, lo, mid)
        fine = (lo + hi) / 2
        if coarse is not None and self.method == "liu2020":
            estimate, users = coarse
            half = COARSE_Z * self.noise_multipliers()[0] * self.query(0).l2_sensitivity / users
            fine = np.clip(fine, np.asarray(estimate) - half, np.asarray(estimate) + half)
        return project_to_simplex(fine)

    def release(self, user_counts: UserCounts | CountProfile, rng: np.random.Generator) -> HistogramRelease:
        """Run every phase on ``user_counts``: an (n, k) array, a callable yielding chunks (replayable), or a
        :class:`CountProfile` (the vectorized path for large populations)."""
        if not isinstance(rng, np.random.Generator):
            raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        pop = user_counts if isinstance(user_counts, CountProfile) else _Chunked(user_counts, self.num_items)
        if pop.num_items != self.num_items:
            raise ValueError(f"user_counts must have {self.num_items} columns (items), got {pop.num_items}")
        n, (m_lo, m_hi) = pop.num_users, pop.m_range
        if n == 0:
            raise ValueError("user_counts must hold at least one user, got 0")
        if self.method == "liu2020" and (m_lo != m_hi or m_lo < 1):
            raise ValueError(f"user_counts: liu2020 needs every user to hold the same number m >= 1 of samples "
                             f"(its intervals are Binomial(m) quantiles), got m from {m_lo} to {m_hi}; subsample "
                             "users to a common m or use method='gaussian'")
        query = self.query(0)
        coarse = self.finish(self.add_noise(0, pop.total(query), query, rng), n, query)
        if self.phases == 1:
            return HistogramRelease(coarse, self.dp_events())
        fine_query = self.query(1, coarse, n, int(m_lo))
        estimate = self.finish(self.add_noise(1, pop.total(fine_query), fine_query, rng), n, fine_query, (coarse, n))
        return HistogramRelease(estimate, self.dp_events(), coarse)


class _Chunked:
    """Users given as an (n, k) array or a replayable source of such blocks."""

    def __init__(self, user_counts: UserCounts, num_items: int) -> None:
        self.source = user_counts
        n, k, m_lo, m_hi = 0, num_items, math.inf, -math.inf
        for chunk in _chunks(user_counts):
            c = check_counts(chunk)
            k = c.shape[1]
            n += c.shape[0]
            if c.shape[0]:
                m_u = c.sum(axis=1)
                m_lo, m_hi = min(m_lo, int(m_u.min())), max(m_hi, int(m_u.max()))
        self.num_users, self.num_items, self.m_range = n, k, (m_lo, m_hi)

    def total(self, query: HistogramQuery) -> np.ndarray:
        out = np.zeros(query.num_items)
        for chunk in _chunks(self.source):
            out += query.contribution(chunk)
        return out


@dataclass(frozen=True)
class CountProfile:
    """Sufficient statistic of a population where every user holds m samples: ``counts[j, t]`` is the number of
    users holding item j exactly t times (k × (m + 1)). Every query's aggregate is a function of it, so a
    release costs O(k·m) whatever the number of users (the vectorized simulation path).
    """

    counts: np.ndarray  # (k, m + 1) int64

    @classmethod
    def from_user_counts(cls, user_counts: UserCounts) -> CountProfile:
        """Profile of users with equal m (raises otherwise); a callable source is read once, block by block."""
        profile: np.ndarray | None = None
        for chunk in _chunks(user_counts):
            c = check_counts(chunk)
            if not c.shape[0]:
                continue
            m_u = c.sum(axis=1)
            m = int(m_u[0])
            if m_u.min() != m_u.max() or (profile is not None and profile.shape[1] != m + 1):
                got = f"{m_u.min()} to {m_u.max()}" if profile is None else f"{profile.shape[1] - 1} and {m}"
                raise ValueError(f"user_counts: a count profile needs every user to hold the same m, got {got}")
            k = c.shape[1]
            if profile is None:
                profile = np.zeros((k, m + 1), dtype=np.int64)
            # profile[j, t] += number of users in the block holding item j exactly t times, all j at once
            profile += np.bincount((np.arange(k)[None, :] * (m + 1) + c).ravel(), minlength=k * (m + 1)).reshape(
                k, m + 1)
        if profile is None:
            raise ValueError("user_counts must hold at least one user, got 0")
        return cls(profile)

    @property
    def num_items(self) -> int:
        return int(self.counts.shape[0])

    @property
    def num_users(self) -> int:
        return int(self.counts[0].sum())

    @property
    def m_range(self) -> tuple[int, int]:
        m = self.counts.shape[1] - 1
        return m, m

    def total(self, query: HistogramQuery) -> np.ndarray:
        m = self.counts.shape[1] - 1
        t = np.arange(m + 1)[None, :]
        if query.kind == "frequency":
            return (self.counts * t).sum(axis=1) / max(m, 1)
        clipped = np.clip(t, query.lower[:, None], query.upper[:, None])  # type: ignore[index]
        return (self.counts * clipped).sum(axis=1) / m


@lru_cache(maxsize=128)
def _calibrated(epsilon: float, delta: float, accountant: str) -> float:
    """σ of one Gaussian release at (ε, δ) (cached: benchmarks call it for every seed)."""
    return calibrate_gaussian(epsilon, delta, steps=1, accountant=accountant, rtol=1e-4)


def estimate_distribution(
    user_counts: UserCounts, epsilon: float, delta: float, method: str, rng: np.random.Generator, **options: float
) -> np.ndarray:
    """User-level (ε, δ)-DP estimate of the item distribution from per-user counts.

    Parameters
    ----------
    user_counts : np.ndarray, callable or CountProfile
        (n_users × k) integer counts, a zero-argument callable yielding such blocks (read once per phase), or
        the :class:`CountProfile` of an equal-m population.
    epsilon, delta : float
        Privacy parameters (delta is ignored by ``laplace``).
    method : {"liu2020", "gaussian", "laplace"}
    rng : numpy.random.Generator
    **options
        ``accountant``, ``coarse_share``, ``coverage`` of :class:`HistogramEstimator`.

    Returns
    -------
    np.ndarray
        Length-k probability vector (non-negative, sums to 1).
    """
    pop = user_counts if isinstance(user_counts, CountProfile) else _Chunked(user_counts, 0)
    estimator = HistogramEstimator(method, epsilon, delta, pop.num_items, **options)  # type: ignore[arg-type]
    return estimator.release(user_counts, rng).distribution
