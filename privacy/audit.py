"""Empirical privacy auditing: measured lower bounds on ε, reported beside the accounted ε.

An accountant gives an *upper* bound on ε for a mechanism as specified; an audit runs the mechanism as
implemented and derives, from what an attacker can observe, a *lower* bound that holds with a stated
confidence. A lower bound above the accounted ε proves a bug (in the code or in its analysis); a lower bound
below it proves nothing, except that this attack found no violation.

References
----------
- L. Wasserman, S. Zhou, "A Statistical Framework for Differential Privacy", JASA 2010, and P. Kairouz,
  S. Oh, P. Viswanath, "The Composition Theorem for Differential Privacy", ICML 2015, Theorem 2.1
  (hypothesis-testing characterization): a mechanism is (ε, δ)-DP iff every test between neighbouring inputs
  D, D' has FPR + e^ε·FNR ≥ 1 − δ and FNR + e^ε·FPR ≥ 1 − δ.
- C. J. Clopper, E. S. Pearson, "The Use of Confidence or Fiducial Limits Illustrated in the Case of the
  Binomial", Biometrika 1934 (exact binomial intervals, from Beta quantiles).
- M. Jagielski, J. Ullman, A. Oprea, "Auditing Differentially Private Machine Learning: How Private is
  Private SGD?", NeurIPS 2020 (ε lower bound from Clopper–Pearson bounds on a test's FPR and FNR);
  M. Nasr, S. Song, A. Thakurta, N. Papernot, N. Carlini, "Adversary Instantiation: Lower Bounds for
  Differentially Private Machine Learning", IEEE S&P 2021 (the distinguishing game).
- T. Steinke, M. Nasr, M. Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023
  (arXiv:2305.08846): the main theorem of §3 (numbered Theorem 3.1 there) and the p-value / ε-search procedure
  of Appendix D. Setting: m canaries, each included independently with probability 1/2; an auditor makes r
  guesses from the output alone (abstaining on the others) and gets W of them right. If the mechanism is
  (ε, δ)-DP then for every v,
  P[W ≥ v] ≤ f(v) + 2mδ · max_{1≤i≤v} (f(v − i) − f(v)) / i, with f(v) = P[Binomial(r, e^ε/(1 + e^ε)) ≥ v]
  (for δ = 0: W is stochastically dominated by Binomial(r, e^ε/(1 + e^ε))). The ε lower bound is the largest
  ε whose p-value is below 1 − confidence, found by search. Implemented here from this statement (the tests
  check it against a direct evaluation with exact binomial sums), not copied.

Statistical care
----------------
- ``epsilon_lower_bound_from_rates`` uses *one-sided upper* Clopper–Pearson bounds on FPR and FNR, each at
  level 1 − (1 − confidence)/2 (Bonferroni), so both hold together with probability ≥ confidence; on that event
  the true rates satisfy both DP inequalities with smaller-or-equal FPR, FNR, so the reported ε is ≤ the true
  ε. Trials must be independent, and the test (threshold) must not depend on the trials that are counted.
- ``distinguishing_audit`` chooses the threshold on a held-out half of the trials and counts on the other
  half (or takes a threshold fixed in advance and counts on all trials).
- ``one_run_audit`` searches over (k₊, k₋) guess counts only with a Bonferroni correction over the grid; a
  grid of one pair is a choice fixed in advance.
- :func:`_broken_for_tests` deliberately weakens the mechanisms *inside the audit drivers of this module* (never
  the mechanism classes, never production code paths) so tests can prove the audit catches a violation.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import special, stats

from privacy import accounting
from privacy.histogram import METHODS as HISTOGRAM_METHODS
from privacy.histogram import CountProfile, HistogramEstimator
from privacy.mechanisms import GaussianMechanism, RandomizedResponse, RRWithPrior, _check_rng

__all__ = [
    "DistinguishingAudit",
    "MechanismAudit",
    "OneRunAudit",
    "ProportionInterval",
    "audit_from_scores",
    "audit_gaussian_mechanism",
    "audit_histogram",
    "audit_randomized_response",
    "audit_rr_with_prior",
    "clopper_pearson",
    "clopper_pearson_lower",
    "clopper_pearson_upper",
    "distinguishing_audit",
    "epsilon_lower_bound_from_rates",
    "one_run_audit",
    "one_run_epsilon_lower_bound",
    "one_run_guesses",
    "one_run_p_value",
]

ALTERNATIVES = ("two-sided", "less", "greater")
_MAX_THRESHOLD_CANDIDATES = 2048
_EPS_SEARCH_TOL = 1e-7
_EPS_SEARCH_MAX = 1e3


# ---------------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------------
def _is_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))


def _check_confidence(value: object) -> float:
    if not _is_number(value) or not 0.0 < float(value) < 1.0:  # type: ignore[arg-type]
        raise ValueError(f"confidence must be a number in (0, 1), e.g. 0.95, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def _check_delta(value: object) -> float:
    if not _is_number(value) or not 0.0 <= float(value) < 1.0:  # type: ignore[arg-type]
        raise ValueError(f"delta must be a number in [0, 1), got {value!r}")
    return float(value)  # type: ignore[arg-type]


def _check_count(name: str, value: object, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_scores(name: str, scores: ArrayLike) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty one-dimensional array of scores, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must hold finite scores, got {int((~np.isfinite(arr)).sum())} non-finite")
    return arr


# ---------------------------------------------------------------------------------------------------------
# Clopper–Pearson
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProportionInterval:
    """An exact (Clopper–Pearson) confidence interval for a binomial proportion.

    Attributes
    ----------
    successes, trials : int
        The observed count k out of n.
    confidence : float
        Coverage probability of the interval.
    alternative : {"two-sided", "less", "greater"}
        ``"less"``: one-sided upper bound, ``low = 0``; ``"greater"``: one-sided lower bound, ``high = 1``
        (the convention of ``scipy.stats.binomtest``).
    low, high : float
        The interval's ends.
    """

    successes: int
    trials: int
    confidence: float
    alternative: str
    low: float
    high: float


def _cp_upper(k: np.ndarray, n: np.ndarray, level: float) -> np.ndarray:
    """One-sided upper Clopper–Pearson bounds at ``level`` (vectorized): 1 where k = n."""
    k, n = np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64)
    safe_b = np.where(k < n, n - k, 1.0)
    return np.where(k < n, stats.beta.ppf(level, k + 1.0, safe_b), 1.0)


def _cp_lower(k: np.ndarray, n: np.ndarray, level: float) -> np.ndarray:
    """One-sided lower Clopper–Pearson bounds at ``level`` (vectorized): 0 where k = 0."""
    k, n = np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64)
    safe_a = np.where(k > 0, k, 1.0)
    return np.where(k > 0, stats.beta.ppf(1.0 - level, safe_a, n - k + 1.0), 0.0)


def _check_binomial(successes: object, trials: object) -> tuple[int, int]:
    n = _check_count("trials", trials, minimum=1)
    k = _check_count("successes", successes)
    if k > n:
        raise ValueError(f"successes must be <= trials={n}, got {k}")
    return k, n


def clopper_pearson_upper(successes: int, trials: int, confidence: float = 0.95) -> float:
    """One-sided upper Clopper–Pearson bound: P(p ≤ bound) ≥ ``confidence`` for every true p.

    Parameters
    ----------
    successes : int
        k, with 0 ≤ k ≤ n.
    trials : int
        n ≥ 1.
    confidence : float, default 0.95
        In (0, 1).

    Returns
    -------
    float
        The ``confidence`` quantile of Beta(k + 1, n − k), or 1 when k = n.
    """
    k, n = _check_binomial(successes, trials)
    return float(_cp_upper(np.array(k), np.array(n), _check_confidence(confidence)))


def clopper_pearson_lower(successes: int, trials: int, confidence: float = 0.95) -> float:
    """One-sided lower Clopper–Pearson bound: P(p ≥ bound) ≥ ``confidence`` for every true p.

    Parameters
    ----------
    successes : int
        k, with 0 ≤ k ≤ n.
    trials : int
        n ≥ 1.
    confidence : float, default 0.95
        In (0, 1).

    Returns
    -------
    float
        The 1 − ``confidence`` quantile of Beta(k, n − k + 1), or 0 when k = 0.
    """
    k, n = _check_binomial(successes, trials)
    return float(_cp_lower(np.array(k), np.array(n), _check_confidence(confidence)))


def clopper_pearson(
    successes: int, trials: int, confidence: float = 0.95, alternative: str = "two-sided"
) -> ProportionInterval:
    """Exact Clopper–Pearson confidence interval for a binomial proportion.

    Equal to ``scipy.stats.binomtest(k, n, alternative=alternative).proportion_ci(confidence, "exact")``.

    Parameters
    ----------
    successes : int
        k, with 0 ≤ k ≤ n.
    trials : int
        n ≥ 1.
    confidence : float, default 0.95
        Coverage, in (0, 1).
    alternative : {"two-sided", "less", "greater"}, default "two-sided"
        ``"two-sided"`` puts (1 − confidence)/2 in each tail; ``"less"`` gives [0, upper bound],
        ``"greater"`` gives [lower bound, 1].

    Returns
    -------
    ProportionInterval
        The interval.
    """
    k, n = _check_binomial(successes, trials)
    conf = _check_confidence(confidence)
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {', '.join(ALTERNATIVES)}, got {alternative!r}")
    level = (1.0 + conf) / 2.0 if alternative == "two-sided" else conf
    low = 0.0 if alternative == "less" else float(_cp_lower(np.array(k), np.array(n), level))
    high = 1.0 if alternative == "greater" else float(_cp_upper(np.array(k), np.array(n), level))
    return ProportionInterval(k, n, conf, alternative, low, high)


# ---------------------------------------------------------------------------------------------------------
# ε lower bound from the error rates of one test
# ---------------------------------------------------------------------------------------------------------
def _epsilon_from_rate_bounds(fpr_hi: np.ndarray, fnr_hi: np.ndarray, delta: float) -> np.ndarray:
    """max(log((1 − δ − FNR̄)/FPR̄), log((1 − δ − FPR̄)/FNR̄), 0), vectorized; terms with a non-positive
    numerator contribute nothing."""
    fpr_hi, fnr_hi = np.asarray(fpr_hi, dtype=np.float64), np.asarray(fnr_hi, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.log(np.maximum(1.0 - delta - fnr_hi, 0.0)) - np.log(fpr_hi)
        b = np.log(np.maximum(1.0 - delta - fpr_hi, 0.0)) - np.log(fnr_hi)
    a = np.where(np.isnan(a), -np.inf, a)
    b = np.where(np.isnan(b), -np.inf, b)
    return np.maximum(np.maximum(a, b), 0.0)


def _rate_upper_bounds(fp: int, n_neg: int, fn: int, n_pos: int, confidence: float) -> tuple[float, float]:
    level = 1.0 - (1.0 - confidence) / 2.0  # Bonferroni: both bounds hold together w.p. >= confidence
    fpr_hi = float(_cp_upper(np.array(fp), np.array(n_neg), level))
    fnr_hi = float(_cp_upper(np.array(fn), np.array(n_pos), level))
    return fpr_hi, fnr_hi


def epsilon_lower_bound_from_rates(
    fp: int, n_neg: int, fn: int, n_pos: int, delta: float, confidence: float = 0.95
) -> float:
    """Lower bound on ε from one test's false-positive and false-negative counts, valid w.p. ≥ ``confidence``.

    If the mechanism is (ε, δ)-DP, every test between neighbouring inputs D (negative) and D' (positive) has
    FPR + e^ε·FNR ≥ 1 − δ and FNR + e^ε·FPR ≥ 1 − δ (Kairouz et al. 2015, Thm. 2.1). With one-sided
    Clopper–Pearson upper bounds FPR̄, FNR̄, each at level 1 − (1 − confidence)/2,

        ε ≥ max(log((1 − δ − FNR̄) / FPR̄), log((1 − δ − FPR̄) / FNR̄), 0)

    with probability ≥ ``confidence`` over the trials (which must be independent of the choice of test).

    Parameters
    ----------
    fp : int
        Trials on D the test called positive, 0 ≤ fp ≤ n_neg.
    n_neg : int
        Trials on D, ≥ 1.
    fn : int
        Trials on D' the test called negative, 0 ≤ fn ≤ n_pos.
    n_pos : int
        Trials on D', ≥ 1.
    delta : float
        The δ at which ε is bounded, in [0, 1).
    confidence : float, default 0.95
        In (0, 1).

    Returns
    -------
    float
        ε_lb ≥ 0.
    """
    n_neg_i = _check_count("n_neg", n_neg, minimum=1)
    n_pos_i = _check_count("n_pos", n_pos, minimum=1)
    fp_i = _check_count("fp", fp)
    fn_i = _check_count("fn", fn)
    if fp_i > n_neg_i:
        raise ValueError(f"fp must be <= n_neg={n_neg_i}, got {fp_i}")
    if fn_i > n_pos_i:
        raise ValueError(f"fn must be <= n_pos={n_pos_i}, got {fn_i}")
    d, conf = _check_delta(delta), _check_confidence(confidence)
    fpr_hi, fnr_hi = _rate_upper_bounds(fp_i, n_neg_i, fn_i, n_pos_i, conf)
    return float(_epsilon_from_rate_bounds(np.array(fpr_hi), np.array(fnr_hi), d))


# ---------------------------------------------------------------------------------------------------------
# the distinguishing game
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistinguishingAudit:
    """Result of a distinguishing game between neighbouring inputs D (negative) and D' (positive).

    The test says "D'" when score ≥ ``threshold``.

    Attributes
    ----------
    epsilon_lb : float
        Lower bound on ε at ``delta``, valid with probability ≥ ``confidence``.
    confidence, delta : float
        As requested.
    threshold : float
        The test's threshold (chosen on the calibration trials, or given).
    fp, n_neg : int
        False positives among the counted trials on D, and their number.
    fn, n_pos : int
        False negatives among the counted trials on D', and their number.
    fpr_upper, fnr_upper : float
        The Bonferroni-split one-sided Clopper–Pearson upper bounds used for ``epsilon_lb``.
    calibration_trials : int
        Trials per side spent choosing the threshold (0 when it was given).
    """

    epsilon_lb: float
    confidence: float
    delta: float
    threshold: float
    fp: int
    n_neg: int
    fn: int
    n_pos: int
    fpr_upper: float
    fnr_upper: float
    calibration_trials: int


def _error_counts(
    neg_sorted: np.ndarray, pos_sorted: np.ndarray, thresholds: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(fp, fn) of the tests "positive iff score ≥ t" for every t; inputs sorted ascending."""
    fp = neg_sorted.size - np.searchsorted(neg_sorted, thresholds, side="left")
    fn = np.searchsorted(pos_sorted, thresholds, side="left")
    return fp, fn


def _choose_threshold(neg: np.ndarray, pos: np.ndarray, delta: float, confidence: float) -> float:
    """The threshold maximizing the (conservative) bound on these calibration trials."""
    candidates = np.unique(np.concatenate([neg, pos]))
    if candidates.size > _MAX_THRESHOLD_CANDIDATES:
        candidates = np.unique(np.quantile(candidates, np.linspace(0.0, 1.0, _MAX_THRESHOLD_CANDIDATES)))
    neg_s, pos_s = np.sort(neg), np.sort(pos)
    fp, fn = _error_counts(neg_s, pos_s, candidates)
    level = 1.0 - (1.0 - confidence) / 2.0
    bounds = _epsilon_from_rate_bounds(_cp_upper(fp, neg.size, level), _cp_upper(fn, pos.size, level), delta)
    return float(candidates[int(np.argmax(bounds))])


def audit_from_scores(
    negative_scores: ArrayLike,
    positive_scores: ArrayLike,
    delta: float,
    confidence: float = 0.95,
    threshold: float | None = None,
) -> DistinguishingAudit:
    """ε lower bound from attack scores of independent runs on D (negative) and D' (positive).

    Higher scores should indicate D'. With ``threshold=None`` the first half of each score array chooses the
    threshold (the one with the best bound on that half) and the second half is counted; with a threshold
    fixed in advance, every score is counted.

    Parameters
    ----------
    negative_scores : array_like of float
        Scores of runs on D, one-dimensional, finite; independent trials.
    positive_scores : array_like of float
        Scores of runs on D', likewise.
    delta : float
        In [0, 1).
    confidence : float, default 0.95
        In (0, 1).
    threshold : float, optional
        A threshold chosen without looking at these scores.

    Returns
    -------
    DistinguishingAudit
        The bound and the counts behind it.
    """
    neg = _check_scores("negative_scores", negative_scores)
    pos = _check_scores("positive_scores", positive_scores)
    d, conf = _check_delta(delta), _check_confidence(confidence)
    calibration = 0
    if threshold is None:
        if neg.size < 2 or pos.size < 2:
            raise ValueError(
                "negative_scores and positive_scores need >= 2 scores each to hold out a calibration half, "
                f"got {neg.size} and {pos.size}; pass a threshold fixed in advance instead"
            )
        cal_neg, cal_pos = neg.size // 2, pos.size // 2
        t = _choose_threshold(neg[:cal_neg], pos[:cal_pos], d, conf)
        neg, pos = neg[cal_neg:], pos[cal_pos:]
        calibration = min(cal_neg, cal_pos)
    else:
        if not _is_number(threshold) or not math.isfinite(float(threshold)):
            raise ValueError(f"threshold must be a finite number or None, got {threshold!r}")
        t = float(threshold)
    fp = int(np.count_nonzero(neg >= t))
    fn = int(np.count_nonzero(pos < t))
    fpr_hi, fnr_hi = _rate_upper_bounds(fp, neg.size, fn, pos.size, conf)
    eps = float(_epsilon_from_rate_bounds(np.array(fpr_hi), np.array(fnr_hi), d))
    return DistinguishingAudit(eps, conf, d, t, fp, int(neg.size), fn, int(pos.size), fpr_hi, fnr_hi, calibration)


def distinguishing_audit(
    mechanism_run: Callable[[bool, np.random.Generator], float],
    trials: int,
    delta: float,
    confidence: float,
    rng: np.random.Generator,
    threshold: float | None = None,
) -> DistinguishingAudit:
    """Play the distinguishing game: run the mechanism ``trials`` times on D and on D', bound ε from the scores.

    Parameters
    ----------
    mechanism_run : callable (bool, numpy.random.Generator) -> float
        ``mechanism_run(False, rng)`` runs the mechanism on D, ``mechanism_run(True, rng)`` on D', and returns
        the attacker's score of the output (higher means "D'"). Every call must use only ``rng`` for its
        randomness, so that runs are independent.
    trials : int
        Runs per input, ≥ 2 (≥ 1 with a given threshold). Without a threshold, half of them choose it.
    delta : float
        In [0, 1).
    confidence : float
        In (0, 1).
    rng : numpy.random.Generator
        Source of all randomness.
    threshold : float, optional
        A threshold fixed in advance; otherwise chosen on a held-out half.

    Returns
    -------
    DistinguishingAudit
        The bound and the counts behind it.
    """
    if not callable(mechanism_run):
        raise ValueError(
            f"mechanism_run must be callable (bool, Generator) -> float, got {type(mechanism_run).__name__}"
        )
    n = _check_count("trials", trials, minimum=1 if threshold is not None else 2)
    gen = _check_rng(rng)
    _check_delta(delta)
    _check_confidence(confidence)
    neg, pos = np.empty(n), np.empty(n)
    for i in range(n):  # interleaved, so a drifting source of randomness affects both sides alike
        neg[i] = float(mechanism_run(False, gen))
        pos[i] = float(mechanism_run(True, gen))
    return audit_from_scores(neg, pos, delta, confidence, threshold)


# ---------------------------------------------------------------------------------------------------------
# the test-only switch
# ---------------------------------------------------------------------------------------------------------
_LEAK_FACTOR: ContextVar[float] = ContextVar("fedpriv_audit_leak_factor", default=1.0)


def current_leak_factor() -> float:
    """1.0, or the factor of an active :func:`_broken_for_tests` block (read by audit drivers only)."""
    return _LEAK_FACTOR.get()


@contextmanager
def _broken_for_tests(leak_factor: float = 4.0) -> Iterator[float]:
    """TEST ONLY: make this module's audit drivers run *weaker* mechanisms than the ε they account.

    Inside the ``with`` block every ``audit_*`` driver of this module runs its mechanism with ε multiplied by
    ``leak_factor`` (RR, RR-with-prior, histograms) or the Gaussian noise multiplier divided by it, while still
    reporting the accounted ε of the original parameters — a simulated implementation bug ("wrong parameter
    passed to the sampler"), which the audit must catch. It changes nothing outside this module's drivers: the
    mechanism classes, the histogram estimator, training and the ledger never read it. Entering it emits a
    ``RuntimeWarning``, and every result produced inside records ``leak_factor``.

    Parameters
    ----------
    leak_factor : float, default 4.0
        > 1.

    Yields
    ------
    float
        The active leak factor.
    """
    if not _is_number(leak_factor) or not math.isfinite(float(leak_factor)) or float(leak_factor) <= 1.0:
        raise ValueError(f"leak_factor must be a finite number > 1, got {leak_factor!r}")
    warnings.warn(
        f"privacy.audit._broken_for_tests is active: audit drivers run mechanisms {float(leak_factor):g}x less "
        "private than the epsilon they report (for tests of the audit only)",
        RuntimeWarning,
        stacklevel=3,
    )
    token = _LEAK_FACTOR.set(float(leak_factor))
    try:
        yield float(leak_factor)
    finally:
        _LEAK_FACTOR.reset(token)


# ---------------------------------------------------------------------------------------------------------
# drivers for fedpriv's mechanisms
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MechanismAudit:
    """An audited mechanism: the measured lower bound beside the accounted upper bound, at the same δ.

    Attributes
    ----------
    mechanism : str
        What was audited, with its parameters.
    accounted_epsilon : float
        ε at ``delta`` from :func:`privacy.accounting.epsilon` on the mechanism's own DpEvent(s).
    delta : float
        The δ of both figures.
    accountant : str
        Accountant used for ``accounted_epsilon``.
    audit : DistinguishingAudit
        The game's result (``audit.epsilon_lb`` is the lower bound).
    leak_factor : float
        1.0, except for results produced under :func:`_broken_for_tests`.
    """

    mechanism: str
    accounted_epsilon: float
    delta: float
    accountant: str
    audit: DistinguishingAudit
    leak_factor: float = 1.0

    @property
    def epsilon_lb(self) -> float:
        """The empirical lower bound on ε (valid with probability ≥ ``audit.confidence``)."""
        return self.audit.epsilon_lb

    @property
    def violation(self) -> bool:
        """True when the lower bound exceeds the accounted ε: the implementation is not as private as charged."""
        return self.audit.epsilon_lb > self.accounted_epsilon


def _check_trials(trials: object) -> int:
    return _check_count("trials", trials, minimum=2)


def _labels_pair(labels: object, num_classes: int) -> tuple[int, int]:
    if not isinstance(labels, (tuple, list)) or len(labels) != 2:
        raise ValueError(f"labels must be a pair (label on D, label on D'), got {labels!r}")
    a, b = (_check_count("labels", v) for v in labels)
    if a == b or max(a, b) >= num_classes:
        raise ValueError(f"labels must be two different classes in [0, {num_classes - 1}], got {labels!r}")
    return a, b


def audit_gaussian_mechanism(
    noise_multiplier: float,
    *,
    delta: float,
    trials: int,
    rng: np.random.Generator,
    confidence: float = 0.95,
    accountant: str = "rdp",
) -> MechanismAudit:
    """Audit :class:`~privacy.mechanisms.GaussianMechanism` on a sensitivity-1 query (answer 0 on D, 1 on D').

    The attacker's score is the released value; the threshold is chosen on half of the trials.

    Parameters
    ----------
    noise_multiplier : float
        σ of the mechanism (sensitivity 1).
    delta : float
        In (0, 1): the δ of the accounted ε and of the audit.
    trials : int
        Releases per input, ≥ 2.
    rng : numpy.random.Generator
        Source of randomness.
    confidence : float, default 0.95
        In (0, 1).
    accountant : {"rdp", "pld"}, default "rdp"

    Returns
    -------
    MechanismAudit
        Lower bound beside ε from ``GaussianDpEvent(noise_multiplier)``.
    """
    claimed = GaussianMechanism(noise_multiplier, sensitivity=1.0)
    n, gen, leak = _check_trials(trials), _check_rng(rng), _LEAK_FACTOR.get()
    accounted = accounting.epsilon([claimed.dp_event()], delta, accountant)
    run = dataclasses.replace(claimed, noise_multiplier=claimed.noise_multiplier / leak)
    neg = run.apply(np.zeros(n), gen)
    pos = run.apply(np.ones(n), gen)
    result = audit_from_scores(neg, pos, delta, confidence)
    return MechanismAudit(f"gaussian(noise_multiplier={claimed.noise_multiplier:g}, sensitivity=1)", accounted,
                          float(delta), accountant, result, leak)


def audit_randomized_response(
    epsilon: float,
    num_classes: int,
    *,
    delta: float,
    trials: int,
    rng: np.random.Generator,
    confidence: float = 0.95,
    labels: tuple[int, int] = (0, 1),
    accountant: str = "rdp",
) -> MechanismAudit:
    """Audit :class:`~privacy.mechanisms.RandomizedResponse` with a label attack.

    Neighbouring inputs: one example whose true label is ``labels[0]`` (D) or ``labels[1]`` (D'). The attacker
    guesses the true label from the released noisy label (guess = noisy label), i.e. it says D' iff the
    release is ``labels[1]`` — a test fixed in advance, so every trial is counted.

    Parameters
    ----------
    epsilon : float
        ε of the mechanism.
    num_classes : int
        K ≥ 2.
    delta : float
        In (0, 1).
    trials : int
        Releases per input, ≥ 2.
    rng : numpy.random.Generator
    confidence : float, default 0.95
    labels : (int, int), default (0, 1)
        True label on D and on D'.
    accountant : {"rdp", "pld"}, default "rdp"

    Returns
    -------
    MechanismAudit
        Lower bound beside ε from the mechanism's ``RandomizedResponseDpEvent``.
    """
    claimed = RandomizedResponse(epsilon, num_classes)
    a, b = _labels_pair(labels, claimed.num_classes)
    n, gen, leak = _check_trials(trials), _check_rng(rng), _LEAK_FACTOR.get()
    accounted = accounting.epsilon([claimed.dp_event()], delta, accountant)
    run = dataclasses.replace(claimed, epsilon=claimed.epsilon * leak)
    neg = (run.apply(np.full(n, a), gen) == b).astype(np.float64)
    pos = (run.apply(np.full(n, b), gen) == b).astype(np.float64)
    result = audit_from_scores(neg, pos, delta, confidence, threshold=0.5)
    return MechanismAudit(f"randomized_response(epsilon={claimed.epsilon:g}, K={claimed.num_classes})", accounted,
                          float(delta), accountant, result, leak)


def audit_rr_with_prior(
    epsilon: float,
    prior: ArrayLike,
    *,
    delta: float,
    trials: int,
    rng: np.random.Generator,
    confidence: float = 0.95,
    labels: tuple[int, int] = (0, 1),
    accountant: str = "rdp",
) -> MechanismAudit:
    """Audit :class:`~privacy.mechanisms.RRWithPrior` with a fixed prior and the label attack.

    As :func:`audit_randomized_response`: true label ``labels[0]`` (D) or ``labels[1]`` (D'), the same prior
    for both (the prior must not depend on the label), and the attacker says D' iff the release is
    ``labels[1]``. Choose labels the prior keeps in its top-k* set, or the game is trivially uninformative.

    Parameters
    ----------
    epsilon : float
        ε of the mechanism.
    prior : array_like of float
        Length-K prior summing to 1 (K = number of classes).
    delta : float
        In (0, 1).
    trials : int
        Releases per input, ≥ 2.
    rng : numpy.random.Generator
    confidence : float, default 0.95
    labels : (int, int), default (0, 1)
    accountant : {"rdp", "pld"}, default "rdp"

    Returns
    -------
    MechanismAudit
        Lower bound beside ε from the mechanism's DpEvent (binary RR with parameter ε).
    """
    p = np.asarray(prior, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"prior must be one vector of class probabilities, got shape {p.shape}")
    claimed = RRWithPrior(epsilon, int(p.size))
    a, b = _labels_pair(labels, claimed.num_classes)
    n, gen, leak = _check_trials(trials), _check_rng(rng), _LEAK_FACTOR.get()
    accounted = accounting.epsilon([claimed.dp_event()], delta, accountant)
    run = dataclasses.replace(claimed, epsilon=claimed.epsilon * leak)
    neg = (run.apply(np.full(n, a), p, gen) == b).astype(np.float64)
    pos = (run.apply(np.full(n, b), p, gen) == b).astype(np.float64)
    result = audit_from_scores(neg, pos, delta, confidence, threshold=0.5)
    prior_text = ", ".join(f"{x:g}" for x in p)
    return MechanismAudit(f"rr_with_prior(epsilon={claimed.epsilon:g}, prior=[{prior_text}])", accounted,
                          float(delta), accountant, result, leak)


def audit_histogram(
    method: str,
    epsilon: float,
    delta: float,
    *,
    trials: int,
    rng: np.random.Generator,
    confidence: float = 0.95,
    num_users: int = 200,
    samples_per_user: int = 8,
    num_items: int = 2,
    accountant: str = "rdp",
    **options: float,
) -> MechanismAudit:
    """Audit the user-level DP histogram estimator (:class:`~privacy.histogram.HistogramEstimator`).

    Neighbouring populations differ in ONE user's entire data: ``num_users − 1`` users drawn once from
    p ∝ (1, 2, …, k) (``samples_per_user`` samples each; not uniform, so that no item's Binomial(m − 1, p_j) has
    two modes and liu2020's intervals do not flip between trials on coarse noise alone), plus a user whose
    samples are all item 0 (D) or all item 1 (D'). Each trial is a full release on the population's
    :class:`~privacy.histogram.CountProfile`; the score is the estimated frequency of item 1 minus that of
    item 0. The threshold is chosen on half of the trials. With ``num_items = 2`` (the default) this user's
    change attains the sensitivity of every method: ‖ΔS‖₁ = 2 (laplace), ‖ΔS‖₂ = √2 (gaussian), and for
    liu2020's fine phase the clipped counts (U₀, L₁) vs (L₀, U₁) move by the full interval widths, so
    ‖ΔT‖₂ = ‖w‖₂ = Δ₂ (the knapsack bound is larger here).

    Parameters
    ----------
    method : {"laplace", "gaussian", "liu2020"}
    epsilon : float
        ε of the estimator.
    delta : float
        In (0, 1): the estimator's δ (ignored by laplace) and the δ of both figures.
    trials : int
        Releases per population, ≥ 2.
    rng : numpy.random.Generator
        Draws the population, then every release.
    confidence : float, default 0.95
    num_users : int, default 200
        n ≥ 2.
    samples_per_user : int, default 8
        m ≥ 1.
    num_items : int, default 2
        k ≥ 2.
    accountant : {"rdp", "pld"}, default "rdp"
    **options
        ``coarse_share`` and ``coverage`` of the estimator.

    Returns
    -------
    MechanismAudit
        Lower bound beside ε from the estimator's ``dp_events()``.
    """
    if method not in HISTOGRAM_METHODS:
        raise ValueError(f"method must be one of {', '.join(HISTOGRAM_METHODS)}, got {method!r}")
    n_users = _check_count("num_users", num_users, minimum=2)
    m = _check_count("samples_per_user", samples_per_user, minimum=1)
    k = _check_count("num_items", num_items, minimum=2)
    claimed = HistogramEstimator(method, epsilon, delta, k, accountant, **options)  # type: ignore[arg-type]
    n, gen, leak = _check_trials(trials), _check_rng(rng), _LEAK_FACTOR.get()
    accounted = accounting.epsilon(claimed.dp_events(), delta, accountant)
    run = dataclasses.replace(claimed, epsilon=float(claimed.epsilon) * leak)
    others = gen.multinomial(m, np.arange(1, k + 1) / (k * (k + 1) / 2), size=n_users - 1)
    user = np.zeros((2, k), dtype=np.int64)
    user[0, 0] = user[1, 1] = m
    profiles = (CountProfile.from_user_counts(np.vstack([others, user[:1]])),
                CountProfile.from_user_counts(np.vstack([others, user[1:]])))

    def release(changed: bool, g: np.random.Generator) -> float:
        estimate = run.release(profiles[int(changed)], g).distribution
        return float(estimate[1] - estimate[0])

    result = distinguishing_audit(release, n, delta, confidence, gen)
    return MechanismAudit(f"histogram(method={method}, epsilon={claimed.epsilon:g}, delta={delta:g}, n={n_users}, "
                          f"m={m}, k={k})", accounted, float(delta), accountant, result, leak)


# ---------------------------------------------------------------------------------------------------------
# one training run (Steinke, Nasr, Jagielski 2023)
# ---------------------------------------------------------------------------------------------------------
def _check_one_run_counts(correct: object, guesses: object, canaries: object) -> tuple[int, int, int]:
    v = _check_count("num_canaries_guessed_right", correct)
    r = _check_count("num_guesses", guesses)
    m = _check_count("num_canaries", canaries, minimum=1)
    if v > r:
        raise ValueError(f"num_canaries_guessed_right must be <= num_guesses={r}, got {v}")
    if r > m:
        raise ValueError(f"num_guesses must be <= num_canaries={m}, got {r}")
    return v, r, m


def _one_run_p_value(v: int, r: int, m: int, eps: float, delta: float) -> float:
    if v == 0:
        return 1.0
    q = float(special.expit(eps))  # e^ε / (1 + e^ε): accuracy of ε-DP randomized response
    tail = float(stats.binom.sf(v - 1, r, q))  # f(v) = P[Binomial(r, q) ≥ v]
    if delta == 0.0:
        return min(tail, 1.0)
    i = np.arange(1, v + 1)
    between = stats.binom.sf(v - i - 1, r, q) - tail  # f(v − i) − f(v) = P[v − i ≤ Binomial(r, q) < v]
    alpha = float(np.max(np.maximum(between, 0.0) / i))
    return min(tail + 2.0 * m * delta * alpha, 1.0)


def one_run_p_value(
    num_canaries_guessed_right: int, num_guesses: int, num_canaries: int, epsilon: float, delta: float
) -> float:
    """Upper bound on P[W ≥ v] for an (ε, δ)-DP mechanism in the one-run game (Steinke et al. 2023, §3).

    Parameters
    ----------
    num_canaries_guessed_right : int
        v, the observed number of correct guesses, 0 ≤ v ≤ r.
    num_guesses : int
        r, guesses made (abstentions excluded), r ≤ m.
    num_canaries : int
        m ≥ 1, canaries each included independently with probability 1/2.
    epsilon : float
        ε ≥ 0 of the null hypothesis.
    delta : float
        δ in [0, 1) of the null hypothesis.

    Returns
    -------
    float
        min(1, f(v) + 2mδ · max_{1≤i≤v} (f(v − i) − f(v)) / i), f(v) = P[Binomial(r, e^ε/(1 + e^ε)) ≥ v].
    """
    v, r, m = _check_one_run_counts(num_canaries_guessed_right, num_guesses, num_canaries)
    if not _is_number(epsilon) or not float(epsilon) >= 0.0 or math.isnan(float(epsilon)):
        raise ValueError(f"epsilon must be a number >= 0, got {epsilon!r}")
    return _one_run_p_value(v, r, m, float(epsilon), _check_delta(delta))


def one_run_epsilon_lower_bound(
    num_canaries_guessed_right: int, num_guesses: int, num_canaries: int, delta: float, confidence: float = 0.95
) -> float:
    """ε lower bound from one run with m randomized canaries (Steinke, Nasr, Jagielski 2023).

    The largest ε (up to 1e-7) whose p-value :func:`one_run_p_value` is below β = 1 − ``confidence``; 0 when
    even ε = 0 is not rejected. Valid with probability ≥ ``confidence``: the search only returns an ε whose
    p-value it evaluated below β, and an (ε*, δ)-DP mechanism is (ε, δ)-DP for every ε ≥ ε*, so reporting an
    ε above ε* requires the observed tail to be below β under the truth.

    Parameters
    ----------
    num_canaries_guessed_right : int
        v, correct guesses, 0 ≤ v ≤ r.
    num_guesses : int
        r, guesses made (abstentions excluded), r ≤ m.
    num_canaries : int
        m ≥ 1.
    delta : float
        In [0, 1).
    confidence : float, default 0.95
        In (0, 1).

    Returns
    -------
    float
        ε_lb ≥ 0.
    """
    v, r, m = _check_one_run_counts(num_canaries_guessed_right, num_guesses, num_canaries)
    d, beta = _check_delta(delta), 1.0 - _check_confidence(confidence)

    def rejected(eps: float) -> bool:
        return _one_run_p_value(v, r, m, eps, d) < beta

    if not rejected(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejected(hi):  # p-value -> 1 as ε grows (q -> 1), so this ends
        lo, hi = hi, 2.0 * hi
        if hi > _EPS_SEARCH_MAX:
            return lo
    while hi - lo > _EPS_SEARCH_TOL:
        mid = (lo + hi) / 2.0
        if rejected(mid):
            lo = mid
        else:
            hi = mid
    return lo


def one_run_guesses(scores: ArrayLike, k_pos: int, k_neg: int) -> np.ndarray:
    """The auditor's guesses from canary scores only: +1 for the ``k_pos`` highest, −1 for the ``k_neg`` lowest.

    Parameters
    ----------
    scores : array_like of float
        One score per canary (higher means "included"), computed from the output alone.
    k_pos, k_neg : int
        Numbers of "included" and "excluded" guesses, k_pos + k_neg ≤ m.

    Returns
    -------
    numpy.ndarray
        int8 array of guesses in {−1, 0, +1} (0 = abstain); ties broken by canary index.
    """
    s = _check_scores("scores", scores)
    kp, kn = _check_count("k_pos", k_pos), _check_count("k_neg", k_neg)
    if kp + kn > s.size:
        raise ValueError(f"k_pos + k_neg must be <= the number of canaries {s.size}, got {kp} + {kn}")
    order = np.argsort(s, kind="stable")
    guesses = np.zeros(s.size, dtype=np.int8)
    guesses[order[:kn]] = -1
    if kp:
        guesses[order[s.size - kp:]] = 1
    return guesses


@dataclass(frozen=True)
class OneRunAudit:
    """Result of a one-run audit.

    Attributes
    ----------
    epsilon_lb : float
        Lower bound on ε at ``delta``, valid with probability ≥ ``confidence`` (Bonferroni over the grid).
    confidence, delta : float
        As requested.
    num_canaries : int
        m.
    num_guesses, num_correct : int
        r and v for the chosen pair.
    k_pos, k_neg : int
        The chosen pair.
    grid_size : int
        Number of (k_pos, k_neg) pairs tried; each was tested at level 1 − (1 − confidence)/grid_size.
    """

    epsilon_lb: float
    confidence: float
    delta: float
    num_canaries: int
    num_guesses: int
    num_correct: int
    k_pos: int
    k_neg: int
    grid_size: int


def one_run_audit(
    scores: ArrayLike,
    included: ArrayLike,
    delta: float,
    confidence: float,
    k_pairs: Sequence[tuple[int, int]],
) -> OneRunAudit:
    """One-run audit from canary scores and the true inclusion bits, over a grid of guess counts.

    For each (k_pos, k_neg) the auditor guesses from the scores alone (:func:`one_run_guesses`), the bits only
    count its correct guesses, and :func:`one_run_epsilon_lower_bound` is evaluated at confidence
    1 − (1 − confidence)/len(k_pairs) (Bonferroni: the best of the grid is then valid at ``confidence``).
    Pass one pair to fix the choice in advance.

    Parameters
    ----------
    scores : array_like of float
        One score per canary, higher meaning "included"; m = len(scores).
    included : array_like of bool
        Whether each canary was included (each independently with probability 1/2).
    delta : float
        In [0, 1).
    confidence : float
        In (0, 1).
    k_pairs : sequence of (int, int)
        Non-empty grid of (k_pos, k_neg), each with k_pos + k_neg ≤ m.

    Returns
    -------
    OneRunAudit
        The best bound over the grid, with its counts.
    """
    s = _check_scores("scores", scores)
    bits = np.asarray(included)
    if bits.shape != s.shape or bits.dtype.kind not in "biu" or (bits.size and not np.isin(bits, (0, 1)).all()):
        raise ValueError(
            f"included must be {s.size} booleans (one per score), got dtype {bits.dtype}, shape {bits.shape}"
        )
    d, conf = _check_delta(delta), _check_confidence(confidence)
    pairs = list(k_pairs) if isinstance(k_pairs, Sequence) and not isinstance(k_pairs, str) else None
    if not pairs:
        raise ValueError(f"k_pairs must be a non-empty sequence of (k_pos, k_neg) pairs, got {k_pairs!r}")
    truth = np.where(bits.astype(bool), 1, -1)
    per_pair_conf = 1.0 - (1.0 - conf) / len(pairs)
    best: OneRunAudit | None = None
    for pair in pairs:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"k_pairs must hold (k_pos, k_neg) pairs, got {pair!r}")
        guesses = one_run_guesses(s, pair[0], pair[1])
        r = int(np.count_nonzero(guesses))
        v = int(np.count_nonzero(guesses == truth))
        eps = one_run_epsilon_lower_bound(v, r, s.size, d, per_pair_conf)
        if best is None or eps > best.epsilon_lb:
            best = OneRunAudit(eps, conf, d, int(s.size), r, v, int(pair[0]), int(pair[1]), len(pairs))
    assert best is not None
    return best
