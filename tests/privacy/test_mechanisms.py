"""Mechanisms: sampling statistics with fixed seeds and stated tolerances, exact RR-with-prior privacy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy.mechanisms import (
    GaussianMechanism,
    LaplaceMechanism,
    RandomizedResponse,
    RRWithPrior,
    calibrate_gaussian,
    poisson_sampled,
    self_composed,
)

N = 200_000  # samples per statistical test; tolerances below are ≥ 5 standard errors


def test_gaussian_noise_scale() -> None:
    mech = GaussianMechanism(noise_multiplier=1.5, sensitivity=2.0)
    noise = mech.apply(np.zeros(N), np.random.default_rng(0))
    assert mech.std == 3.0
    assert abs(noise.mean()) < 5 * 3.0 / math.sqrt(N)
    assert abs(noise.std() / 3.0 - 1) < 5 / math.sqrt(2 * N)  # sd of the sample sd ≈ σ/√(2N)


def test_laplace_noise_scale() -> None:
    mech = LaplaceMechanism(epsilon=0.5, sensitivity=1.0)
    noise = mech.apply(np.zeros(N), np.random.default_rng(1))
    assert mech.scale == 2.0
    assert abs(np.abs(noise).mean() / 2.0 - 1) < 5 / math.sqrt(N)  # E|X| = b, sd(|X|) = b


@pytest.mark.parametrize(("eps", "k"), [(1.0, 10), (2.0, 10), (0.5, 3), (4.0, 100)])
def test_rr_keep_rate_and_uniform_other_classes(eps: float, k: int) -> None:
    rr = RandomizedResponse(eps, k)
    assert rr.keep_probability == pytest.approx(math.exp(eps) / (math.exp(eps) + k - 1), rel=1e-12)
    labels = np.random.default_rng(2).integers(0, k, N)
    out = rr.apply(labels, np.random.default_rng(3))
    kept = out == labels
    p = rr.keep_probability
    assert abs(kept.mean() - p) < 5 * math.sqrt(p * (1 - p) / N)
    # Among flipped labels, the offset (out − label) mod K is uniform over 1..K−1.
    offsets = (out[~kept] - labels[~kept]) % k
    counts = np.bincount(offsets, minlength=k)
    assert counts[0] == 0
    expected = (~kept).sum() / (k - 1)
    assert np.abs(counts[1:] - expected).max() < 5 * math.sqrt(expected) + 1
    # The transition matrix is what was sampled, and its worst likelihood ratio is e^ε.
    m = rr.transition_matrix()
    assert np.allclose(m.sum(1), 1) and m.max() / m.min() == pytest.approx(math.exp(eps))


def test_rr_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="epsilon must be a finite number > 0, got -1"):
        RandomizedResponse(-1.0, 10)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
        RandomizedResponse(1.0, 1)
    with pytest.raises(ValueError, match="labels"):
        RandomizedResponse(1.0, 3).apply(np.array([0, 3]), np.random.default_rng(0))


@pytest.mark.parametrize(("eps", "k"), [(1.0, 10), (4.0, 3), (0.1, 2)])
def test_rr_denoise_inverts_the_transition_matrix(eps: float, k: int) -> None:
    rr = RandomizedResponse(eps, k)
    p = np.random.default_rng(0).dirichlet(np.ones(k), size=50)
    q = p @ rr.transition_matrix()  # the released label's distribution, what a model trained on RR labels fits
    np.testing.assert_allclose(rr.denoise(q), p, atol=1e-12)
    # Entries estimated below the flip probability are clipped; a row clipped entirely becomes uniform.
    a, b = rr.keep_probability, (1 - rr.keep_probability) / (k - 1)
    low = np.full(k, b * 0.5)
    low[0] = 1 - low[1:].sum()
    assert rr.denoise(low)[0] == 1.0 and rr.denoise(np.full(k, 1.0 / k)) == pytest.approx(np.full(k, 1.0 / k))
    assert a > b
    with pytest.raises(ValueError, match=rf"noisy_proba must have shape \(K,\) or \(n, K\) with K={k}"):
        rr.denoise(np.ones(k + 1) / (k + 1))


@pytest.mark.parametrize(("eps", "k"), [(1.0, 10), (2.0, 3)])
def test_rr_accuracy_estimate_from_agreement_is_unbiased(eps: float, k: int) -> None:
    """A classifier right w.p. acc on examples whose RR labels it never saw: its agreement with those labels,
    inverted through RR's channel, recovers acc within 4 standard errors (statistical, fixed seed)."""
    rng, rr, n = np.random.default_rng(0), RandomizedResponse(eps, k), 200_000
    a, b = rr.keep_probability, rr.flip_probability
    assert b == pytest.approx((1 - a) / (k - 1)) and rr.estimate_accuracy(b) == 0.0 and rr.estimate_accuracy(a) == 1.0
    for acc in (0.2, 0.55, 0.9):
        y = rng.integers(0, k, n)
        pred = np.where(rng.random(n) < acc, y, (y + rng.integers(1, k, n)) % k)  # right w.p. acc, else any other
        agreement = float((pred == rr.apply(y, rng)).mean())
        se = math.sqrt(agreement * (1 - agreement) / n) / (a - b)
        assert abs(rr.estimate_accuracy(agreement) - acc) < 4 * se, acc
    with pytest.raises(ValueError, match=r"agreement must be a rate in \[0, 1\], got 1.5"):
        rr.estimate_accuracy(1.5)

@settings(max_examples=60, deadline=None)
@given(
    eps=st.floats(0.05, 6.0),
    k=st.integers(2, 12),
    weights=st.lists(st.floats(0.0, 1.0), min_size=12, max_size=12),
)
def test_rr_with_prior_is_eps_dp_for_every_prior(eps: float, k: int, weights: list[float]) -> None:
    w = np.asarray(weights[:k]) + 1e-9
    prior = w / w.sum()
    mech = RRWithPrior(eps, k)
    table = np.stack([mech.output_distribution(y, prior) for y in range(k)])  # P(y' | y)
    assert np.allclose(table.sum(1), 1.0)
    for y1 in range(k):
        for y2 in range(k):
            assert np.all(table[y1] <= math.exp(eps) * table[y2] + 1e-12)


def test_rr_with_prior_samples_its_output_distribution() -> None:
    mech = RRWithPrior(1.0, 6)
    prior = np.array([0.5, 0.3, 0.1, 0.05, 0.03, 0.02])
    for label in (0, 4):
        out = mech.apply(np.full(N, label), prior, np.random.default_rng(label))
        freq = np.bincount(out, minlength=6) / N
        exact = mech.output_distribution(label, prior)
        assert np.abs(freq - exact).max() < 5 * math.sqrt(0.25 / N)


def test_calibration_meets_the_target_tightly() -> None:
    from privacy.accounting import epsilon

    sigma = calibrate_gaussian(2.0, 1e-5, steps=200, sampling_probability=0.02)
    eps = epsilon([self_composed(poisson_sampled(GaussianMechanism(sigma).dp_event(), 0.02), 200)], 1e-5)
    assert 0.97 * 2.0 <= eps <= 2.0
