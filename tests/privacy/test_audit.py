"""Empirical privacy auditing: exact statistics, validity (coverage) checks, and every driver on correct and
deliberately broken mechanisms. Fixed seeds throughout; each measured figure's margin is stated beside it."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import stats

from privacy import audit
from privacy.audit import (
    audit_from_scores,
    audit_gaussian_mechanism,
    audit_histogram,
    audit_randomized_response,
    audit_rr_with_prior,
    clopper_pearson,
    clopper_pearson_lower,
    clopper_pearson_upper,
    distinguishing_audit,
    epsilon_lower_bound_from_rates,
    one_run_audit,
    one_run_epsilon_lower_bound,
    one_run_guesses,
    one_run_p_value,
)
from privacy.mechanisms import GaussianMechanism, RandomizedResponse, calibrate_gaussian

DELTA = 1e-5
CONF = 0.95


# ---------------------------------------------------------------------------------------------------------
# Clopper–Pearson
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 10), (10, 10), (0, 1), (1, 1), (17, 250), (249, 250)])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
@pytest.mark.parametrize("alternative", ["two-sided", "less", "greater"])
def test_clopper_pearson_matches_scipy_exact_interval(k: int, n: int, confidence: float, alternative: str) -> None:
    ours = clopper_pearson(k, n, confidence, alternative)
    ref = stats.binomtest(k, n, alternative=alternative).proportion_ci(confidence_level=confidence, method="exact")
    assert ours.low == pytest.approx(ref.low, abs=1e-12)
    assert ours.high == pytest.approx(ref.high, abs=1e-12)
    assert (ours.successes, ours.trials, ours.confidence, ours.alternative) == (k, n, confidence, alternative)


def test_clopper_pearson_known_values_and_one_sided_helpers() -> None:
    # k = 0 of n: the upper end solves (1 − p)^n = α/2 in closed form.
    assert clopper_pearson(0, 10).high == pytest.approx(1 - 0.025 ** (1 / 10), rel=1e-12)  # 0.3084971...
    assert clopper_pearson(0, 10).high == pytest.approx(0.30849710, abs=1e-8)
    assert clopper_pearson(10, 10).low == pytest.approx(0.025 ** (1 / 10), rel=1e-12)
    # One-sided bounds are the "less"/"greater" intervals' finite ends.
    for k, n in [(0, 20), (7, 20), (20, 20)]:
        assert clopper_pearson_upper(k, n, 0.95) == clopper_pearson(k, n, 0.95, "less").high
        assert clopper_pearson_lower(k, n, 0.95) == clopper_pearson(k, n, 0.95, "greater").low
    assert clopper_pearson_upper(0, 50, 0.95) == pytest.approx(1 - 0.05 ** (1 / 50), rel=1e-12)


# ---------------------------------------------------------------------------------------------------------
# the rate bound
# ---------------------------------------------------------------------------------------------------------
def test_rate_bound_is_the_stated_formula() -> None:
    fp, n_neg, fn, n_pos = 12, 1000, 300, 800
    level = 1 - (1 - CONF) / 2  # Bonferroni split between the two rates
    fpr_hi = stats.beta.ppf(level, fp + 1, n_neg - fp)
    fnr_hi = stats.beta.ppf(level, fn + 1, n_pos - fn)
    expected = max(math.log((1 - DELTA - fnr_hi) / fpr_hi), math.log((1 - DELTA - fpr_hi) / fnr_hi), 0.0)
    assert expected > 2.5
    assert epsilon_lower_bound_from_rates(fp, n_neg, fn, n_pos, DELTA, CONF) == pytest.approx(expected, rel=1e-12)
    # Symmetric in the roles of the two error types.
    assert epsilon_lower_bound_from_rates(fn, n_pos, fp, n_neg, DELTA, CONF) == pytest.approx(expected, rel=1e-12)
    # No errors at all: limited only by the sample size, log((1 − δ − u)/u) with u = 1 − (α/2)^(1/n).
    u = 1 - ((1 - CONF) / 2) ** (1 / 500)
    assert epsilon_lower_bound_from_rates(0, 500, 0, 500, DELTA, CONF) == pytest.approx(
        math.log((1 - DELTA - u) / u), rel=1e-9)


@pytest.mark.parametrize(("fp", "n", "fn"), [(50, 100, 50), (0, 100, 100), (100, 100, 0), (31, 100, 69), (1, 3, 2)])
def test_rate_bound_is_zero_when_the_test_does_no_better_than_chance(fp: int, n: int, fn: int) -> None:
    assert epsilon_lower_bound_from_rates(fp, n, fn, n, DELTA, CONF) == 0.0


def test_rate_bound_is_zero_for_identical_distributions() -> None:
    rng = np.random.default_rng(11)
    same = distinguishing_audit(lambda _flag, g: float(g.normal()), 4000, DELTA, CONF, rng)
    assert same.epsilon_lb == 0.0
    scores = np.random.default_rng(12).laplace(size=6000)
    assert audit_from_scores(scores[:3000], scores[3000:], DELTA, CONF).epsilon_lb == 0.0


def test_rate_bound_exact_coverage_on_randomized_response() -> None:
    """P[ε_lb > ε] ≤ 1 − confidence, computed exactly over every (fp, fn) outcome of binary RR with ε = 1."""
    eps, n = 1.0, 40
    err = 1 / (1 + math.e)  # binary RR: FPR = FNR = 1/(1 + e^ε), a test that meets e^ε exactly
    pmf = stats.binom.pmf(np.arange(n + 1), n, err)
    miss = 0.0
    for fp in range(n + 1):
        for fn in range(n + 1):
            if epsilon_lower_bound_from_rates(fp, n, fn, n, 0.0, CONF) > eps:
                miss += pmf[fp] * pmf[fn]
    assert 0.0 < miss <= 1 - CONF


# ---------------------------------------------------------------------------------------------------------
# the distinguishing game
# ---------------------------------------------------------------------------------------------------------
def test_distinguishing_audit_holds_out_half_for_the_threshold() -> None:
    mech = GaussianMechanism(0.3)

    def run(changed: bool, g: np.random.Generator) -> float:
        return float(mech.apply(np.array([float(changed)]), g)[0])

    result = distinguishing_audit(run, 2000, DELTA, CONF, np.random.default_rng(5))
    assert (result.calibration_trials, result.n_neg, result.n_pos) == (1000, 1000, 1000)
    assert 0 < result.threshold < 1.5
    assert result.epsilon_lb == pytest.approx(
        epsilon_lower_bound_from_rates(result.fp, result.n_neg, result.fn, result.n_pos, DELTA, CONF))
    assert result.epsilon_lb > 2.0  # N(0, .3²) vs N(1, .3²) are far apart
    fixed = distinguishing_audit(run, 2000, DELTA, CONF, np.random.default_rng(5), threshold=0.5)
    assert (fixed.calibration_trials, fixed.n_neg, fixed.threshold) == (0, 2000, 0.5)
    # Same seed, same answer.
    assert distinguishing_audit(run, 2000, DELTA, CONF, np.random.default_rng(5)) == result


def test_audit_from_scores_says_positive_at_or_above_the_threshold() -> None:
    result = audit_from_scores([0, 0, 1, 1, 2], [1, 1, 1, 0, 2, 2], 0.0, CONF, threshold=1)
    assert (result.fp, result.n_neg, result.fn, result.n_pos) == (3, 5, 1, 6)
    # Calibration picks, on the first halves, the threshold separating them; the second halves are counted.
    result = audit_from_scores([0] * 20 + [5] * 20, [1] * 20 + [0] * 19 + [9], 0.0, CONF)
    assert (result.threshold, result.calibration_trials) == (1.0, 20)
    assert (result.fp, result.n_neg, result.fn, result.n_pos) == (20, 20, 19, 20)
    assert result.epsilon_lb == 0.0


# ---------------------------------------------------------------------------------------------------------
# drivers: correct mechanisms stay below the accounted ε, broken ones exceed it
# ---------------------------------------------------------------------------------------------------------
SIGMA_EPS1 = calibrate_gaussian(1.0, DELTA)  # ≈ 4.05: GaussianDpEvent(σ) is (1, 1e-5)-DP


def _check_correct(result: audit.MechanismAudit, accounted: float) -> None:
    assert result.leak_factor == 1.0
    assert result.accounted_epsilon == pytest.approx(accounted, rel=1e-3, abs=1e-3)
    assert result.accounted_epsilon <= 1.0 + 1e-9
    assert 0.0 <= result.epsilon_lb <= result.accounted_epsilon
    assert not result.violation
    assert result.audit.confidence == CONF and result.delta == DELTA


def _check_broken(result: audit.MechanismAudit, leak_factor: float, minimum: float) -> None:
    assert result.leak_factor == leak_factor
    assert result.accounted_epsilon <= 1.0 + 1e-9  # still the claimed parameters' ε
    assert result.violation
    assert result.epsilon_lb > minimum


def test_gaussian_mechanism_audit() -> None:
    # Measured: ε_lb 0.32 (20 seeds: 0–0.39) vs accounted 1.0; broken (σ ÷ 10): 5.1 (20 seeds: ≥ 5.0).
    ok = audit_gaussian_mechanism(SIGMA_EPS1, delta=DELTA, trials=20_000, rng=np.random.default_rng(0))
    _check_correct(ok, 1.0)
    with pytest.warns(RuntimeWarning, match="_broken_for_tests"), audit._broken_for_tests(10.0):
        bad = audit_gaussian_mechanism(SIGMA_EPS1, delta=DELTA, trials=20_000, rng=np.random.default_rng(0))
    _check_broken(bad, 10.0, minimum=3.0)


def test_randomized_response_label_attack() -> None:
    # The test "guess = noisy label" meets e^ε exactly, so the bound approaches ε: measured 0.93 (0.87–0.99).
    ok = audit_randomized_response(1.0, 10, delta=DELTA, trials=20_000, rng=np.random.default_rng(1))
    _check_correct(ok, 1.0)
    assert ok.epsilon_lb > 0.8
    assert ok.audit.threshold == 0.5 and ok.audit.calibration_trials == 0
    with pytest.warns(RuntimeWarning, match="_broken_for_tests"), audit._broken_for_tests(4.0):
        bad = audit_randomized_response(1.0, 10, delta=DELTA, trials=20_000, rng=np.random.default_rng(1))
    _check_broken(bad, 4.0, minimum=3.0)  # keep probability of ε = 4: measured 3.9 (3.8–4.0)
    assert bad.epsilon_lb <= 4.0 + 0.1


def test_rr_with_prior_label_attack() -> None:
    # Prior (.5, .3, .1, .1) at ε = 1 keeps k* = 2 classes: binary RR on {0, 1}, tight at ε; measured 0.97.
    prior = [0.5, 0.3, 0.1, 0.1]
    ok = audit_rr_with_prior(1.0, prior, delta=DELTA, trials=20_000, rng=np.random.default_rng(2))
    _check_correct(ok, 1.0)
    assert ok.epsilon_lb > 0.8
    with pytest.warns(RuntimeWarning, match="_broken_for_tests"), audit._broken_for_tests(4.0):
        bad = audit_rr_with_prior(1.0, prior, delta=DELTA, trials=20_000, rng=np.random.default_rng(2))
    _check_broken(bad, 4.0, minimum=3.0)  # measured 3.9 (3.8–4.0)


@pytest.mark.parametrize(
    ("method", "trials", "leak_factor", "minimum"),
    [
        # Seed 3: laplace 0.43 / ×4 2.87, gaussian 0.09 / ×10 3.11, liu2020 0.0 / ×20 1.94 (accounted 1.0).
        # Over 8 seeds: laplace 0–0.62 / ×4 2.2–2.9; gaussian 0–0.18 / ×10 2.97–4.1; liu2020 (≈20 ms a release,
        # hence fewer trials) ×20 over seeds 3/4/5 1.94/2.72/2.58 (unit-width intervals). Gaussian noise needs a
        # larger leak than pure-DP mechanisms: its ε at δ = 1e-5 lives in tails a few thousand trials cannot reach.
        ("laplace", 4000, 4.0, 1.5),
        ("gaussian", 4000, 10.0, 1.5),
        ("liu2020", 200, 20.0, 1.5),
    ],
)
def test_histogram_one_user_changed(method: str, trials: int, leak_factor: float, minimum: float) -> None:
    ok = audit_histogram(method, 1.0, DELTA, trials=min(trials, 150) if method == "liu2020" else trials,
                         rng=np.random.default_rng(3))
    _check_correct(ok, 1.0)
    with pytest.warns(RuntimeWarning, match="_broken_for_tests"), audit._broken_for_tests(leak_factor):
        bad = audit_histogram(method, 1.0, DELTA, trials=trials, rng=np.random.default_rng(3))
    _check_broken(bad, leak_factor, minimum)


def test_broken_switch_is_scoped_and_validated() -> None:
    rng = np.random.default_rng(4)
    with pytest.warns(RuntimeWarning, match="_broken_for_tests"), audit._broken_for_tests(3.0) as factor:
        assert factor == 3.0
        assert audit_randomized_response(1.0, 2, delta=DELTA, trials=10, rng=rng).leak_factor == 3.0
    assert audit_randomized_response(1.0, 2, delta=DELTA, trials=10, rng=rng).leak_factor == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all outside the switch
        audit_randomized_response(1.0, 2, delta=DELTA, trials=10, rng=rng)
    for bad in (1.0, 0.5, math.inf, "4"):
        with pytest.raises(ValueError, match="leak_factor"), audit._broken_for_tests(bad):  # type: ignore[arg-type]
            pass


# ---------------------------------------------------------------------------------------------------------
# one training run (Steinke, Nasr, Jagielski 2023)
# ---------------------------------------------------------------------------------------------------------
def _p_value_oracle(v: int, r: int, m: int, eps: float, delta: float) -> float:
    """The one-run p-value written directly from the theorem with exact binomial sums (independent of scipy)."""
    q = math.exp(eps) / (1 + math.exp(eps))

    def f(x: int) -> float:  # P[Binomial(r, q) ≥ x]
        return sum(math.comb(r, j) * q**j * (1 - q) ** (r - j) for j in range(max(x, 0), r + 1))

    if v == 0:
        return 1.0
    alpha = max((f(v - i) - f(v)) / i for i in range(1, v + 1))
    return min(1.0, f(v) + 2 * m * delta * alpha)


def _perfect_guess_maximum(r: int, confidence: float) -> float:
    """Largest bound any auditor can certify with r guesses (all right, δ = 0): q^r = β, ε = log(q / (1 − q))."""
    q = (1 - confidence) ** (1 / r)
    return math.log(q / (1 - q))


@pytest.mark.parametrize(("v", "r", "m", "eps", "delta"),
                         [(60, 100, 1000, 0.3, 1e-5), (100, 100, 1000, 3.0, 1e-5), (45, 50, 200, 2.0, 1e-3),
                          (10, 10, 10, 0.0, 0.0), (0, 5, 5, 1.0, 0.1), (30, 80, 100, 0.5, 0.0)])
def test_one_run_p_value_matches_the_theorem(v: int, r: int, m: int, eps: float, delta: float) -> None:
    assert one_run_p_value(v, r, m, eps, delta) == pytest.approx(_p_value_oracle(v, r, m, eps, delta), rel=1e-9,
                                                                 abs=1e-14)


def test_one_run_perfect_guesses() -> None:
    # m = 1000 canaries, r = 100 guesses, all right: the bound is positive and at most the δ = 0 maximum for
    # r = 100 at 95% (log(q/(1 − q)), q = 0.05^(1/100): 3.4930); with δ = 1e-5 the 2mδ term costs a little.
    best = _perfect_guess_maximum(100, CONF)
    assert best == pytest.approx(3.49297, abs=1e-5)
    bound = one_run_epsilon_lower_bound(100, 100, 1000, DELTA, CONF)
    assert 3.0 < bound <= best
    assert one_run_epsilon_lower_bound(100, 100, 1000, 0.0, CONF) == pytest.approx(best, abs=1e-6)
    assert one_run_p_value(100, 100, 1000, bound, DELTA) < 1 - CONF  # the returned ε is itself rejected
    # More δ, fewer correct guesses, or fewer guesses: never a larger bound.
    assert one_run_epsilon_lower_bound(100, 100, 1000, 1e-3, CONF) < bound
    assert one_run_epsilon_lower_bound(95, 100, 1000, DELTA, CONF) < bound
    assert one_run_epsilon_lower_bound(50, 50, 1000, DELTA, CONF) < bound


def test_one_run_random_guesses_give_nothing() -> None:
    rng = np.random.default_rng(21)
    included = rng.random(1000) < 0.5
    scores = rng.normal(size=1000)  # independent of the inclusion bits
    result = one_run_audit(scores, included, DELTA, CONF, [(50, 50)])
    assert (result.num_canaries, result.num_guesses, result.grid_size) == (1000, 100, 1)
    assert result.epsilon_lb == 0.0
    assert one_run_epsilon_lower_bound(50, 100, 1000, DELTA, CONF) == 0.0


@pytest.mark.parametrize(("eps", "delta"), [(0.0, 0.0), (0.0, 1e-5), (1.0, 0.0), (1.0, 1e-5), (2.0, 1e-4)])
def test_one_run_bound_exact_coverage(eps: float, delta: float) -> None:
    """For ε-DP randomized response on every canary (W ~ Binomial(r, e^ε/(1 + e^ε)), the worst case of the
    theorem), P[ε_lb > ε] ≤ 1 − confidence, computed exactly over all outcomes."""
    r, m = 100, 1000
    q = math.exp(eps) / (1 + math.exp(eps))
    miss = sum(stats.binom.pmf(v, r, q) for v in range(r + 1)
               if one_run_epsilon_lower_bound(v, r, m, delta, CONF) > eps)
    assert miss <= 1 - CONF


def test_one_run_grid_is_bonferroni_corrected() -> None:
    rng = np.random.default_rng(8)
    included = rng.random(1000) < 0.5
    scores = included + rng.normal(0, 0.6, size=1000)
    grid = [(k, k) for k in (25, 50, 100, 200)]
    result = one_run_audit(scores, included, DELTA, CONF, grid)
    per_pair = []
    for kp, kn in grid:
        guesses = one_run_guesses(scores, kp, kn)
        v = int(np.count_nonzero(guesses == np.where(included, 1, -1)))
        per_pair.append(one_run_epsilon_lower_bound(v, kp + kn, 1000, DELTA, 1 - (1 - CONF) / len(grid)))
    assert result.grid_size == 4 and result.epsilon_lb == max(per_pair) > 0
    assert (result.k_pos, result.k_neg) == grid[int(np.argmax(per_pair))]
    # The uncorrected bound of the same pair would be larger: the correction is really applied.
    assert one_run_epsilon_lower_bound(result.num_correct, result.num_guesses, 1000, DELTA, CONF) > result.epsilon_lb


def test_one_run_guesses_use_scores_only() -> None:
    guesses = one_run_guesses([0.3, 0.9, -1.0, 0.5, 0.1], 2, 1)
    assert guesses.tolist() == [0, 1, -1, 1, 0]
    assert one_run_guesses([1.0, 1.0, 1.0], 1, 1).tolist() == [-1, 0, 1]  # ties by index


@pytest.mark.parametrize(("leak", "low", "high"), [(1.0, 0.5, 1.0), (4.0, 2.5, 4.0)])
def test_one_run_audit_of_randomized_response(leak: float, low: float, high: float) -> None:
    """m = 1000 canary labels, each bit included w.p. 1/2, released by binary RR at ε = 1 (leak 1) or at
    ε = 4 while claiming 1 (leak 4); guesses from the released bits. Measured 0.85 and 3.31."""
    rng = np.random.default_rng(7)
    included = rng.random(1000) < 0.5
    released = RandomizedResponse(1.0 * leak, 2).apply(included.astype(np.int64), rng)
    result = one_run_audit(released.astype(float), included, DELTA, CONF, [(k, k) for k in (100, 200, 300, 400)])
    assert low < result.epsilon_lb <= high
    assert (result.epsilon_lb > 1.0) == (leak > 1.0)


# ---------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: epsilon_lower_bound_from_rates(1, 10, 1, 10, DELTA, 0.0), r"confidence must be .*\(0, 1\)"),
        (lambda: epsilon_lower_bound_from_rates(1, 10, 1, 10, DELTA, 1.0), r"confidence must be .*\(0, 1\)"),
        (lambda: epsilon_lower_bound_from_rates(1, 10, 1, 10, DELTA, True), r"confidence must be"),
        (lambda: epsilon_lower_bound_from_rates(1, 10, 1, 10, -0.1, CONF), r"delta must be .*\[0, 1\)"),
        (lambda: epsilon_lower_bound_from_rates(1, 10, 1, 10, 1.0, CONF), r"delta must be .*\[0, 1\)"),
        (lambda: epsilon_lower_bound_from_rates(-1, 10, 1, 10, DELTA, CONF), r"fp must be an integer >= 0"),
        (lambda: epsilon_lower_bound_from_rates(1, 10, -2, 10, DELTA, CONF), r"fn must be an integer >= 0"),
        (lambda: epsilon_lower_bound_from_rates(11, 10, 1, 10, DELTA, CONF), r"fp must be <= n_neg=10"),
        (lambda: epsilon_lower_bound_from_rates(1, 10, 11, 10, DELTA, CONF), r"fn must be <= n_pos=10"),
        (lambda: epsilon_lower_bound_from_rates(0, 0, 1, 10, DELTA, CONF), r"n_neg must be an integer >= 1"),
        (lambda: epsilon_lower_bound_from_rates(1.5, 10, 1, 10, DELTA, CONF), r"fp must be an integer"),
        (lambda: clopper_pearson(3, 2), r"successes must be <= trials=2"),
        (lambda: clopper_pearson(1, 0), r"trials must be an integer >= 1"),
        (lambda: clopper_pearson(1, 5, 1.5), r"confidence must be"),
        (lambda: clopper_pearson(1, 5, 0.9, "both"), r"alternative must be one of"),
        (lambda: one_run_epsilon_lower_bound(11, 10, 100, DELTA, CONF),
         r"num_canaries_guessed_right must be <= num_guesses=10"),
        (lambda: one_run_epsilon_lower_bound(5, 101, 100, DELTA, CONF), r"num_guesses must be <= num_canaries=100"),
        (lambda: one_run_epsilon_lower_bound(-1, 10, 100, DELTA, CONF), r"num_canaries_guessed_right must be .*>= 0"),
        (lambda: one_run_epsilon_lower_bound(5, 10, 100, DELTA, 0.0), r"confidence must be"),
        (lambda: one_run_epsilon_lower_bound(5, 10, 100, 1.5, CONF), r"delta must be .*\[0, 1\)"),
        (lambda: one_run_p_value(5, 10, 100, -1.0, DELTA), r"epsilon must be a number >= 0"),
        (lambda: one_run_guesses([1.0, 2.0], 2, 1), r"k_pos \+ k_neg must be <= the number of canaries 2"),
        (lambda: one_run_audit([1.0, 2.0], [True], DELTA, CONF, [(1, 1)]), r"included must be 2 booleans"),
        (lambda: one_run_audit([1.0, 2.0], [True, False], DELTA, CONF, []), r"k_pairs must be a non-empty"),
        (lambda: audit_from_scores([0.0], [1.0], DELTA, CONF), r"calibration half"),
        (lambda: audit_from_scores([0.0, np.nan], [1.0, 2.0], DELTA, CONF), r"negative_scores must hold finite"),
        (lambda: distinguishing_audit(lambda f, g: 0.0, 1, DELTA, CONF, np.random.default_rng(0)),
         r"trials must be an integer >= 2"),
        (lambda: distinguishing_audit(lambda f, g: 0.0, 10, DELTA, CONF, 0), r"rng must be a numpy.random.Generator"),
        (lambda: audit_randomized_response(1.0, 3, delta=DELTA, trials=10, rng=np.random.default_rng(0),
                                           labels=(1, 1)), r"labels must be two different classes"),
        (lambda: audit_histogram("exact", 1.0, DELTA, trials=10, rng=np.random.default_rng(0)),
         r"method must be one of laplace, gaussian, liu2020"),
        (lambda: audit_gaussian_mechanism(1.0, delta=DELTA, trials=1, rng=np.random.default_rng(0)),
         r"trials must be an integer >= 2"),
    ],
)
def test_bad_input_is_rejected_with_a_message_naming_the_argument(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()
