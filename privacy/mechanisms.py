"""Differentially private noise mechanisms, their dp_accounting events, and Gaussian calibration.

References
----------
- C. Dwork, F. McSherry, K. Nissim, A. Smith, "Calibrating Noise to Sensitivity in Private Data Analysis",
  TCC 2006 (Laplace mechanism: scale = Δ₁ / ε).
- C. Dwork, A. Roth, "The Algorithmic Foundations of Differential Privacy", 2014, §3.3 (Laplace),
  App. A (Gaussian).
- I. Mironov, "Rényi Differential Privacy", CSF 2017 (Gaussian RDP α / (2σ²)).
- S. L. Warner, "Randomized Response", JASA 1965; P. Kairouz, S. Oh, P. Viswanath, "Extremal Mechanisms for
  Local Differential Privacy", NeurIPS 2014 (k-ary RR: keep with e^ε / (e^ε + K − 1)).
- B. Ghazi, N. Golowich, R. Kumar, P. Manurangsi, C. Zhang, "Deep Learning with Label Differential
  Privacy", NeurIPS 2021, Algorithm 2 (RRWithPrior).
- P. Kairouz, S. Oh, P. Viswanath, "The Composition Theorem for Differential Privacy", ICML 2015 (binary RR
  with parameter ε dominates every ε-DP mechanism; used by :func:`pure_dp_event`).
- M. Abadi et al., "Deep Learning with Differential Privacy", CCS 2016; I. Mironov, K. Talwar, L. Zhang,
  "Rényi Differential Privacy of the Sampled Gaussian Mechanism", 2019 (Poisson-sampled Gaussian).

Accounting events
-----------------
- ``GaussianMechanism`` -> ``GaussianDpEvent(noise_multiplier)``.
- ``LaplaceMechanism`` -> ``LaplaceDpEvent(1 / ε)``.
- ``RandomizedResponse`` -> ``RandomizedResponseDpEvent(K / (e^ε + K − 1), K)``: exactly the same mechanism
  (keep w.p. 1 − p + p/K = e^ε / (e^ε + K − 1), else a uniform other class), accounted under REPLACE_ONE.
- ``RRWithPrior`` -> :func:`pure_dp_event` (binary RR with parameter ε). The RR event with K buckets would
  be optimistic: the prior may shrink the output set to k* = 2 classes, and binary RR has a larger privacy
  profile than K-ary RR at the same ε. RRWithPrior is ε-DP for every prior (Ghazi et al., Thm. 3), and
  binary RR_ε dominates any ε-DP mechanism (Kairouz et al. 2015), so this charge is valid and tight in the
  worst case. dp_accounting 0.6.0 has no ``EpsilonDeltaDpEvent``; its PLD accountant in later versions
  represents (ε, 0) by the very same two-point privacy-loss distribution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import dp_accounting
import numpy as np
from numpy.typing import ArrayLike

from privacy import accounting

__all__ = [
    "GaussianMechanism",
    "LaplaceMechanism",
    "RRWithPrior",
    "RandomizedResponse",
    "calibrate_gaussian",
    "composed",
    "poisson_sampled",
    "pure_dp_event",
    "self_composed",
]

_PRIOR_ATOL = 1e-6


# ---------------------------------------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------------------------------------
def _is_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))


def _positive(name: str, value: object) -> float:
    if not _is_number(value) or not math.isfinite(float(value)) or float(value) <= 0:  # type: ignore[arg-type]
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def _num_classes(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {value!r}")
    return int(value)


def _check_rng(rng: object) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise ValueError(
            f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), got {type(rng).__name__}"
        )
    return rng


def _labels(labels: ArrayLike, num_classes: int) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"labels must be an integer array, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        raise ValueError(
            f"labels must be in [0, {num_classes - 1}] for num_classes={num_classes}, "
            f"got values in [{arr.min()}, {arr.max()}]"
        )
    return arr.astype(np.int64, copy=False)


def _keep_probability(epsilon: float, k: np.ndarray | int) -> np.ndarray | float:
    """e^ε / (e^ε + k − 1), written without overflow for large ε."""
    return 1.0 / (1.0 + (np.asarray(k, dtype=np.float64) - 1.0) * math.exp(-epsilon))


# ---------------------------------------------------------------------------------------------------------
# event helpers
# ---------------------------------------------------------------------------------------------------------
def pure_dp_event(epsilon: float) -> dp_accounting.RandomizedResponseDpEvent:
    """Accounting event for an arbitrary pure ε-DP mechanism: binary randomized response with parameter ε.

    ``RandomizedResponseDpEvent(noise_parameter=2 / (e^ε + 1), num_buckets=2)`` keeps its input with
    probability e^ε / (e^ε + 1). Its output pair dominates that of every ε-DP mechanism (Kairouz, Oh,
    Viswanath 2015), so RDP and PLD accounting of this event upper-bound any ε-DP mechanism, under any
    neighbouring relation for which that mechanism is ε-DP.

    Parameters
    ----------
    epsilon : float
        Pure DP parameter, finite and > 0.

    Returns
    -------
    dp_accounting.RandomizedResponseDpEvent
        The binary RR event.
    """
    eps = _positive("epsilon", epsilon)
    return dp_accounting.RandomizedResponseDpEvent(noise_parameter=2.0 / (math.exp(eps) + 1.0), num_buckets=2)


def poisson_sampled(event: dp_accounting.DpEvent, sampling_probability: float) -> dp_accounting.PoissonSampledDpEvent:
    """Wrap ``event`` in Poisson subsampling (each record included independently with probability q).

    Parameters
    ----------
    event : dp_accounting.DpEvent
        The mechanism applied to the sample.
    sampling_probability : float
        q in (0, 1].

    Returns
    -------
    dp_accounting.PoissonSampledDpEvent
        The sampled event.
    """
    if not isinstance(event, dp_accounting.DpEvent):
        raise ValueError(f"event must be a dp_accounting DpEvent, got {type(event).__name__}")
    if not _is_number(sampling_probability) or not 0.0 < float(sampling_probability) <= 1.0:
        raise ValueError(f"sampling_probability must be in (0, 1], got {sampling_probability!r}")
    return dp_accounting.PoissonSampledDpEvent(sampling_probability=float(sampling_probability), event=event)


def self_composed(event: dp_accounting.DpEvent, count: int) -> dp_accounting.SelfComposedDpEvent:
    """``count`` adaptive repetitions of ``event``.

    Parameters
    ----------
    event : dp_accounting.DpEvent
        The repeated event.
    count : int
        Number of repetitions, >= 1.

    Returns
    -------
    dp_accounting.SelfComposedDpEvent
        The composed event.
    """
    if not isinstance(event, dp_accounting.DpEvent):
        raise ValueError(f"event must be a dp_accounting DpEvent, got {type(event).__name__}")
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or int(count) < 1:
        raise ValueError(f"count must be an integer >= 1, got {count!r}")
    return dp_accounting.SelfComposedDpEvent(event=event, count=int(count))


def composed(events: Sequence[dp_accounting.DpEvent]) -> dp_accounting.ComposedDpEvent:
    """Adaptive composition of several events.

    Parameters
    ----------
    events : sequence of dp_accounting.DpEvent
        At least one event.

    Returns
    -------
    dp_accounting.ComposedDpEvent
        The composed event (its ``events`` is a list).
    """
    if isinstance(events, dp_accounting.DpEvent) or not isinstance(events, Sequence) or isinstance(events, str):
        raise ValueError(f"events must be a sequence of DpEvents, got {type(events).__name__}")
    if not events:
        raise ValueError("events must contain at least one DpEvent, got an empty sequence")
    for i, event in enumerate(events):
        if not isinstance(event, dp_accounting.DpEvent):
            raise ValueError(f"events[{i}] must be a dp_accounting DpEvent, got {type(event).__name__}")
    return dp_accounting.ComposedDpEvent(events=list(events))


# ---------------------------------------------------------------------------------------------------------
# additive noise
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GaussianMechanism:
    """Gaussian mechanism: x + N(0, (noise_multiplier · sensitivity)²).

    Parameters
    ----------
    noise_multiplier : float
        σ / Δ₂, finite and > 0.
    sensitivity : float, default 1.0
        ℓ2 sensitivity Δ₂ of the query under the privacy unit's neighbouring relation.
    """

    name: ClassVar[str] = "gaussian"
    noise_multiplier: float
    sensitivity: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "noise_multiplier", _positive("noise_multiplier", self.noise_multiplier))
        object.__setattr__(self, "sensitivity", _positive("sensitivity", self.sensitivity))

    @property
    def std(self) -> float:
        """Standard deviation of the added noise, ``noise_multiplier * sensitivity``."""
        return self.noise_multiplier * self.sensitivity

    def apply(self, x: ArrayLike, rng: np.random.Generator) -> np.ndarray:
        """Return ``x`` plus independent N(0, std²) noise in every coordinate.

        Parameters
        ----------
        x : array_like of float
            The exact query answer.
        rng : numpy.random.Generator
            Source of randomness.

        Returns
        -------
        numpy.ndarray
            float64 array of the same shape as ``x``.
        """
        values = np.asarray(x, dtype=np.float64)
        return values + _check_rng(rng).normal(0.0, self.std, size=values.shape)

    def dp_event(self) -> dp_accounting.GaussianDpEvent:
        """``GaussianDpEvent(noise_multiplier)``."""
        return dp_accounting.GaussianDpEvent(noise_multiplier=self.noise_multiplier)


@dataclass(frozen=True)
class LaplaceMechanism:
    """Laplace mechanism: x + Lap(sensitivity / epsilon); ε-DP.

    Parameters
    ----------
    epsilon : float
        Pure DP parameter, finite and > 0.
    sensitivity : float, default 1.0
        ℓ1 sensitivity Δ₁ of the query under the privacy unit's neighbouring relation.
    """

    name: ClassVar[str] = "laplace"
    epsilon: float
    sensitivity: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "epsilon", _positive("epsilon", self.epsilon))
        object.__setattr__(self, "sensitivity", _positive("sensitivity", self.sensitivity))

    @property
    def scale(self) -> float:
        """Laplace scale b = sensitivity / epsilon."""
        return self.sensitivity / self.epsilon

    def apply(self, x: ArrayLike, rng: np.random.Generator) -> np.ndarray:
        """Return ``x`` plus independent Lap(0, scale) noise in every coordinate.

        Parameters
        ----------
        x : array_like of float
            The exact query answer.
        rng : numpy.random.Generator
            Source of randomness.

        Returns
        -------
        numpy.ndarray
            float64 array of the same shape as ``x``.
        """
        values = np.asarray(x, dtype=np.float64)
        return values + _check_rng(rng).laplace(0.0, self.scale, size=values.shape)

    def dp_event(self) -> dp_accounting.LaplaceDpEvent:
        """``LaplaceDpEvent(noise_multiplier = scale / sensitivity = 1 / epsilon)``."""
        return dp_accounting.LaplaceDpEvent(noise_multiplier=self.scale / self.sensitivity)


# ---------------------------------------------------------------------------------------------------------
# label mechanisms
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RandomizedResponse:
    """K-ary randomized response on labels; ε-DP with respect to changing one label.

    Keeps each label with probability e^ε / (e^ε + K − 1), otherwise outputs a uniformly random *other*
    class.

    Parameters
    ----------
    epsilon : float
        Pure DP parameter, finite and > 0.
    num_classes : int
        Number of classes K >= 2.
    """

    name: ClassVar[str] = "randomized_response"
    epsilon: float
    num_classes: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "epsilon", _positive("epsilon", self.epsilon))
        object.__setattr__(self, "num_classes", _num_classes(self.num_classes))

    @property
    def keep_probability(self) -> float:
        """Probability e^ε / (e^ε + K − 1) of outputting the true label."""
        return float(_keep_probability(self.epsilon, self.num_classes))

    @property
    def flip_probability(self) -> float:
        """Probability (1 − a)/(K − 1) of outputting one given other label (a: the keep probability)."""
        return (1.0 - self.keep_probability) / (self.num_classes - 1)

    def estimate_accuracy(self, agreement: float) -> float:
        """Accuracy of a classifier estimated from how often it agrees with RR outputs of examples it never saw.

        For a prediction independent of the noise, P(prediction = RR label) = b + (a − b)·P(prediction = true
        label), so ``(agreement − b)/(a − b)`` is an unbiased estimate (Natarajan et al., NeurIPS 2013: learning
        with a known noise transition). Post-processing of the RR outputs; the estimate can leave [0, 1] by
        sampling error and is not clipped. Its standard error is √(agreement·(1 − agreement)/n)/(a − b).
        """
        if not 0.0 <= agreement <= 1.0:
            raise ValueError(f"agreement must be a rate in [0, 1], got {agreement!r}")
        keep, flip = self.keep_probability, self.flip_probability
        return (agreement - flip) / (keep - flip)

    @property
    def noise_parameter(self) -> float:
        """dp_accounting's RR parameter p = K / (e^ε + K − 1): probability of a uniform draw over all K."""
        k = self.num_classes
        return k * math.exp(-self.epsilon) / (1.0 + (k - 1) * math.exp(-self.epsilon))

    def transition_matrix(self) -> np.ndarray:
        """K×K matrix M with M[y, y'] = P(output y' | label y); rows sum to 1."""
        k = self.num_classes
        keep = self.keep_probability
        matrix = np.full((k, k), (1.0 - keep) / (k - 1))
        np.fill_diagonal(matrix, keep)
        return matrix

    def denoise(self, noisy_proba: ArrayLike) -> np.ndarray:
        """Estimate P(true label | x) from P(released label | x) by inverting the transition matrix.

        A model trained with cross-entropy on RR labels estimates q = Mᵀp, the distribution of the *released*
        label (for K = 10 at ε = 1 every q_c lies in [0.085, 0.232]). With keep probability a and flip
        probability b = (1 − a)/(K − 1) per other class, Mᵀp = (a − b)p + b, so p = (q − b)/(a − b); estimation
        error can push entries below 0, which are clipped before each row is renormalized. Post-processing:
        no privacy cost, and it uses only the mechanism's public parameters.

        Parameters
        ----------
        noisy_proba : array_like of float
            Shape (n, K) or (K,), rows of non-negative probabilities.

        Returns
        -------
        numpy.ndarray
            float64 array of the same shape, rows summing to 1 (uniform where every entry was clipped).
        """
        q = np.asarray(noisy_proba, dtype=np.float64)
        if q.shape[-1:] != (self.num_classes,) or q.ndim not in (1, 2):
            raise ValueError(f"noisy_proba must have shape (K,) or (n, K) with K={self.num_classes}, got {q.shape}")
        if not np.all(np.isfinite(q)) or np.any(q < 0):
            raise ValueError("noisy_proba must be finite and non-negative")
        keep, flip = self.keep_probability, self.flip_probability
        p = np.clip((q - flip) / (keep - flip), 0.0, None)
        total = p.sum(axis=-1, keepdims=True)
        return np.where(total > 0, p / np.where(total > 0, total, 1.0), 1.0 / self.num_classes)

    def apply(self, labels: ArrayLike, rng: np.random.Generator) -> np.ndarray:
        """Privatize integer labels independently.

        Parameters
        ----------
        labels : array_like of int
            Labels in [0, K − 1], any shape.
        rng : numpy.random.Generator
            Source of randomness.

        Returns
        -------
        numpy.ndarray
            int64 array of noisy labels, same shape as ``labels``.
        """
        y = _labels(labels, self.num_classes)
        gen = _check_rng(rng)
        keep = gen.random(y.shape) < self.keep_probability
        offset = gen.integers(1, self.num_classes, size=y.shape)
        return np.where(keep, y, (y + offset) % self.num_classes)

    def dp_event(self) -> dp_accounting.RandomizedResponseDpEvent:
        """``RandomizedResponseDpEvent(noise_parameter = K / (e^ε + K − 1), num_buckets = K)``."""
        return dp_accounting.RandomizedResponseDpEvent(
            noise_parameter=self.noise_parameter, num_buckets=self.num_classes
        )


@dataclass(frozen=True)
class RRWithPrior:
    """Randomized response with a prior (Ghazi et al. 2021, Algorithm 2); ε-DP for every prior.

    For each example, with prior p sorted in decreasing order, pick k* maximizing
    e^ε / (e^ε + k − 1) · (mass of the top-k classes) (the smallest such k on ties), let Y be the top-k*
    classes (ties in p broken by class index), then run k*-ary RR on Y: a label in Y is kept with
    probability e^ε / (e^ε + k* − 1), else replaced by a uniform other element of Y; a label outside Y is
    replaced by a uniform element of Y. The prior must not depend on the labels being privatized.

    Parameters
    ----------
    epsilon : float
        Pure DP parameter, finite and > 0.
    num_classes : int
        Number of classes K >= 2.
    """

    name: ClassVar[str] = "rr_with_prior"
    epsilon: float
    num_classes: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "epsilon", _positive("epsilon", self.epsilon))
        object.__setattr__(self, "num_classes", _num_classes(self.num_classes))

    def _prior(self, prior: ArrayLike, n: int) -> np.ndarray:
        k = self.num_classes
        arr = np.asarray(prior, dtype=np.float64)
        if arr.ndim == 1:
            if arr.shape != (k,):
                raise ValueError(f"prior must have length num_classes={k}, got shape {arr.shape}")
            arr = arr[None, :]
        elif arr.shape != (n, k):
            raise ValueError(f"prior must have shape ({k},) or (n, {k}) = ({n}, {k}), got shape {arr.shape}")
        if not np.all(np.isfinite(arr)) or np.any(arr < 0):
            raise ValueError("prior must be finite and non-negative")
        sums = arr.sum(axis=1)
        bad = np.flatnonzero(np.abs(sums - 1.0) > _PRIOR_ATOL)
        if bad.size:
            raise ValueError(f"prior rows must sum to 1 (±{_PRIOR_ATOL}); row {bad[0]} sums to {sums[bad[0]]!r}")
        return arr

    def _top_k(self, prior: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per row: classes in decreasing prior order (stable) and the chosen k*."""
        order = np.argsort(-prior, axis=1, kind="stable")
        mass = np.cumsum(np.take_along_axis(prior, order, axis=1), axis=1)
        ks = np.arange(1, self.num_classes + 1)
        score = mass * _keep_probability(self.epsilon, ks)
        return order, np.argmax(score, axis=1) + 1

    def apply(self, labels: ArrayLike, prior: ArrayLike, rng: np.random.Generator) -> np.ndarray:
        """Privatize labels using a per-example (or shared) prior.

        Parameters
        ----------
        labels : array_like of int
            One-dimensional labels in [0, K − 1], length n.
        prior : array_like of float
            Shape (n, K) with rows summing to 1, or shape (K,) shared by all examples.
        rng : numpy.random.Generator
            Source of randomness.

        Returns
        -------
        numpy.ndarray
            int64 array of n noisy labels.
        """
        y = _labels(labels, self.num_classes)
        if y.ndim != 1:
            raise ValueError(f"labels must be one-dimensional, got shape {y.shape}")
        gen = _check_rng(rng)
        n = y.shape[0]
        p = self._prior(prior, n)
        order, kstar = self._top_k(p)
        if order.shape[0] == 1:
            order = np.broadcast_to(order, (n, self.num_classes))
            kstar = np.broadcast_to(kstar, (n,))
        rows = np.arange(n)
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.broadcast_to(np.arange(self.num_classes), order.shape), axis=1)
        r = rank[rows, y]
        in_set = r < kstar
        keep = in_set & (gen.random(n) < _keep_probability(self.epsilon, kstar))
        u = gen.random(n)
        others = np.maximum(kstar - 1, 1)
        flip_pos = (r + 1 + np.minimum((u * others).astype(np.int64), others - 1)) % kstar
        uniform_pos = np.minimum((u * kstar).astype(np.int64), kstar - 1)
        pos = np.where(keep, r, np.where(in_set, flip_pos, uniform_pos))
        return order[rows, pos].astype(np.int64)

    def output_distribution(self, label: int, prior: ArrayLike) -> np.ndarray:
        """Exact distribution of the output for one label and prior.

        Parameters
        ----------
        label : int
            True label in [0, K − 1].
        prior : array_like of float
            Length-K prior summing to 1.

        Returns
        -------
        numpy.ndarray
            Length-K probability vector.
        """
        (y,) = _labels(np.array([label]), self.num_classes)
        p = self._prior(prior, 1)
        if p.shape[0] != 1:
            raise ValueError(f"prior must be one vector of length {self.num_classes}")
        order, kstar = self._top_k(p)
        k = int(kstar[0])
        top = order[0, :k]
        dist = np.zeros(self.num_classes)
        if y in top:
            keep = float(_keep_probability(self.epsilon, k))
            if k > 1:
                dist[top] = (1.0 - keep) / (k - 1)
            dist[y] = keep
        else:
            dist[top] = 1.0 / k
        return dist

    def dp_event(self) -> dp_accounting.RandomizedResponseDpEvent:
        """ε-DP accounting event: :func:`pure_dp_event` (binary RR with parameter ε), see module notes."""
        return pure_dp_event(self.epsilon)


# ---------------------------------------------------------------------------------------------------------
# calibration
# ---------------------------------------------------------------------------------------------------------
def _gaussian_training_event(sigma: float, steps: int, q: float) -> dp_accounting.DpEvent:
    event: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(noise_multiplier=sigma)
    if q < 1.0:
        event = dp_accounting.PoissonSampledDpEvent(sampling_probability=q, event=event)
    return event if steps == 1 else dp_accounting.SelfComposedDpEvent(event=event, count=steps)


def calibrate_gaussian(
    target_epsilon: float,
    target_delta: float,
    steps: int = 1,
    sampling_probability: float = 1.0,
    accountant: str = "rdp",
    *,
    rtol: float = 1e-3,
) -> float:
    """Smallest noise multiplier (up to ``rtol``) whose ``steps``-fold (Poisson-sampled) Gaussian meets ε.

    Bisection on log σ over :func:`privacy.accounting.epsilon`. The returned σ was evaluated and gives
    ε ≤ ``target_epsilon`` (never optimistic); it is within a factor (1 + rtol) of the smallest such σ.

    Parameters
    ----------
    target_epsilon : float
        Target ε, finite and > 0.
    target_delta : float
        Target δ in (0, 1).
    steps : int, default 1
        Number of compositions (training steps or rounds).
    sampling_probability : float, default 1.0
        Poisson sampling probability q in (0, 1]; 1 means no sampling.
    accountant : {"rdp", "pld"}
        Accountant used for ε.
    rtol : float, default 1e-3
        Relative width of the final bracket on σ.

    Returns
    -------
    float
        Noise multiplier σ.

    Raises
    ------
    ValueError
        For invalid arguments, or when no σ in [1e-3, 1e6] meets the target.
    """
    eps_target = _positive("target_epsilon", target_epsilon)
    delta_target = accounting._check_probability("target_delta", target_delta)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or int(steps) < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not _is_number(sampling_probability) or not 0.0 < float(sampling_probability) <= 1.0:
        raise ValueError(f"sampling_probability must be in (0, 1], got {sampling_probability!r}")
    accounting._check_accountant(accountant)
    if not _is_number(rtol) or not 0.0 < float(rtol) < 1.0:
        raise ValueError(f"rtol must be in (0, 1), got {rtol!r}")
    n_steps, q = int(steps), float(sampling_probability)

    def eps_of(sigma: float) -> float:
        event = _gaussian_training_event(sigma, n_steps, q)
        return accounting.epsilon([event], delta_target, accountant)

    sigma_min, sigma_max = 1e-3, 1e6
    lo, hi = 1.0, 1.0
    eps_hi = eps_of(hi)
    if eps_hi > eps_target:
        while eps_hi > eps_target:
            lo, hi = hi, hi * 4.0
            if hi > sigma_max:
                raise ValueError(
                    f"no noise multiplier <= {sigma_max:g} reaches epsilon {eps_target} at delta {delta_target}"
                )
            eps_hi = eps_of(hi)
    else:
        while True:
            candidate = lo / 4.0
            if candidate < sigma_min:
                raise ValueError(
                    f"target_epsilon {eps_target} is met by noise multipliers below {sigma_min:g}; "
                    f"calibration is not meaningful there"
                )
            eps_c = eps_of(candidate)
            if eps_c > eps_target:
                lo = candidate
                break
            hi, eps_hi, lo = candidate, eps_c, candidate
    while hi / lo > 1.0 + float(rtol) and eps_hi < eps_target * (1.0 - float(rtol)):
        mid = math.sqrt(lo * hi)
        eps_mid = eps_of(mid)
        if eps_mid <= eps_target:
            hi, eps_hi = mid, eps_mid
        else:
            lo = mid
    return hi
