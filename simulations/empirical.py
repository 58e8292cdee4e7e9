"""``fedpriv audit RUN --empirical``: attack the mechanism a run was charged for, report a measured lower bound
on ε beside the ledger's accounted ε.

The ledger records, per participant, the exact DpEvents of every release. The audit takes the participant with
the largest accounted ε in the run, rebuilds its mechanism from those events (and the run's config) and attacks
the *implementation* the run used:

* ``dpsgd`` — one-run audit with white-box gradient canaries (Steinke, Nasr, Jagielski, NeurIPS 2023, §3 and
  Appendix D; Dirac canaries as in their white-box experiments): m canaries, each included with probability
  1/2; included canaries join every step's Poisson sample with the run's rate q and contribute a per-example
  gradient of norm C along their own coordinate; every step goes through :func:`client.per_sample.dp_sgd_step`
  (the clipping, noise and averaging of the run) with the run's σ, for the run's number of steps. The score
  of a canary is the total descent along its coordinate.
  :func:`audit_dpsgd_runs` is the classic many-run distinguishing test for small models.
* ``dpfedavg`` — many-run distinguishing game through :class:`strategies.dp_fedavg.CentralDpFedAvg`'s own
  aggregation (Flower's server-side clipping and noise): one sampled client sends an update of norm ≥ C along
  a fixed direction (D′) or no change (D), over the run's rounds; score = the summed released coordinate.
* ``feddm-dp`` — many-run distinguishing game through the client's noised per-class statistics
  (:func:`audit_feddm_dp`), one canary example added or not.
* ``label-dp`` — the label attack on the run's randomized response (or RR-with-prior) from
  :mod:`privacy.audit`: guess the true label from the released one.
* ``histogram`` — neighbouring populations differing in one user's whole data (:mod:`privacy.audit`).

A lower bound above the accounted ε proves the implementation leaks more than it is charged for.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import dp_accounting as dpa
import numpy as np

from privacy import accounting
from privacy import audit as pa
from simulations.datasets import NUM_CLASSES

AUDITED = ("dpsgd", "dpfedavg", "feddm-dp", "label-dp", "histogram")


class EmpiricalAuditError(Exception):
    """The run cannot be audited empirically (one line: what is missing)."""


@dataclass(frozen=True)
class EmpiricalResult:
    """One audited mechanism of a run."""

    run_id: str
    mechanism: str  # what ran, with its parameters
    participant: str  # whose releases were rebuilt (the largest accounted ε)
    unit: str
    attack: str
    accounted_epsilon: float
    epsilon_lb: float
    confidence: float
    delta: float
    details: dict[str, Any]

    @property
    def violation(self) -> bool:
        return self.epsilon_lb > self.accounted_epsilon


# ---------------------------------------------------------------------------------------------------------
# DP-SGD: one run, white-box gradient canaries
# ---------------------------------------------------------------------------------------------------------
def _sampled_gaussian_steps(events: Sequence[dpa.DpEvent]) -> list[tuple[float, float, int]]:
    """[(σ, q, steps)] of a DP-SGD participant's ledger events (SelfComposed(PoissonSampled(Gaussian)))."""
    out = []
    for event in events:
        count = 1
        if isinstance(event, dpa.SelfComposedDpEvent):
            event, count = event.event, event.count
        if not (isinstance(event, dpa.PoissonSampledDpEvent) and isinstance(event.event, dpa.GaussianDpEvent)):
            raise EmpiricalAuditError(f"a dpsgd release holds {event!r}, not a Poisson-sampled Gaussian: the "
                                      "ledger was not written by fedpriv's DP-SGD")
        out.append((float(event.event.noise_multiplier), float(event.sampling_probability), int(count)))
    return out


def audit_dpsgd(
    steps: Sequence[tuple[float, float, int]], *, delta: float, confidence: float = 0.95, num_canaries: int = 1000,
    clip_norm: float = 1.0, seed: int = 0, accountant: str = "rdp",
) -> tuple[float, pa.OneRunAudit]:
    """One-run canary audit of :func:`client.per_sample.dp_sgd_step` over ``steps`` = [(σ, q, count)].

    Returns (accounted ε of those steps, the audit). Under :func:`privacy.audit._broken_for_tests` the steps run
    with σ divided by the leak factor (a simulated bug), while the accounted ε stays that of the given σ.
    """
    import torch

    from client.per_sample import PerExampleGrads, dp_sgd_step

    accounted = accounting.epsilon(
        [dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(s)), n) for s, q, n in steps],
        delta, accountant)
    leak = pa.current_leak_factor()
    rng = np.random.default_rng(seed)
    included = rng.random(num_canaries) < 0.5  # (m,)
    members = np.flatnonzero(included)
    theta = torch.nn.Parameter(torch.zeros(num_canaries, dtype=torch.float64))  # one coordinate per canary
    optimizer = torch.optim.SGD([theta], lr=1.0)
    noise = torch.Generator().manual_seed(seed + 1)
    for sigma, q, count in steps:
        expected = max(1, round(q * len(members)))  # the averaging denominator (cancels out of the scores)
        for _ in range(count):
            batch = members[rng.random(len(members)) < q]
            grads = torch.zeros((len(batch), num_canaries), dtype=torch.float64)  # (B, m): Dirac gradients
            grads[torch.arange(len(batch)), torch.from_numpy(batch)] = clip_norm
            dp_sgd_step(optimizer, PerExampleGrads(grads.new_zeros(len(batch)), {theta: grads}),
                        clip_norm=clip_norm, noise_multiplier=sigma / leak, expected_batch_size=expected,
                        generator=noise)
    scores = -theta.detach().numpy()  # descent along each canary's coordinate
    half = num_canaries // 2
    pairs = [(k, k) for k in (10, 25, 50, 100, 200, 400) if 2 * k <= num_canaries] or [(half // 2, half // 2)]
    return accounted, pa.one_run_audit(scores, included, delta, confidence, pairs)


def audit_dpsgd_runs(
    steps: Sequence[tuple[float, float, int]], *, delta: float, trials: int = 1000, confidence: float = 0.95,
    num_examples: int = 32, dim: int = 16, clip_norm: float = 1.0, seed: int = 0, accountant: str = "rdp",
) -> tuple[float, pa.DistinguishingAudit]:
    """The classic many-run distinguishing test (Jagielski et al. 2020; Nasr et al. 2021) on a small model.

    Each run trains a ``dim``-parameter model with :func:`client.per_sample.dp_sgd_step` for ``steps`` on
    ``num_examples`` fixed examples whose gradients are random directions of norm 2C off coordinate 0 (D), or on
    the same examples plus one canary whose gradient is 2C along coordinate 0 (D′); Poisson sampling at each
    step's rate. Score = descent along coordinate 0. Returns (accounted ε of the steps, the audit).
    """
    import torch

    from client.per_sample import PerExampleGrads, dp_sgd_step

    accounted = accounting.epsilon(
        [dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(s)), n) for s, q, n in steps],
        delta, accountant)
    leak = pa.current_leak_factor()
    data_rng = np.random.default_rng(seed)
    base = data_rng.normal(size=(num_examples, dim))
    base[:, 0] = 0.0
    base *= 2 * clip_norm / np.linalg.norm(base, axis=1, keepdims=True)  # (n, d), clipped to C by the step
    canary = np.zeros((1, dim))
    canary[0, 0] = 2 * clip_norm
    datasets = (torch.from_numpy(base), torch.from_numpy(np.vstack([base, canary])))
    noise = torch.Generator().manual_seed(seed + 1)

    def run(changed: bool, rng: np.random.Generator) -> float:
        grads_all = datasets[int(changed)]
        theta = torch.nn.Parameter(torch.zeros(dim, dtype=torch.float64))
        optimizer = torch.optim.SGD([theta], lr=1.0)
        for sigma, q, count in steps:
            for _ in range(count):
                batch = grads_all[torch.from_numpy(rng.random(len(grads_all)) < q)]  # Poisson sample (B, d)
                dp_sgd_step(optimizer, PerExampleGrads(batch.new_zeros(len(batch)), {theta: batch}),
                            clip_norm=clip_norm, noise_multiplier=sigma / leak,
                            expected_batch_size=max(1, round(q * num_examples)), generator=noise)
        return -float(theta.detach()[0])

    return accounted, pa.distinguishing_audit(run, trials, delta, confidence, np.random.default_rng(seed + 2))


# ---------------------------------------------------------------------------------------------------------
# DP-FedAvg: many runs through the strategy's own aggregation
# ---------------------------------------------------------------------------------------------------------
@contextmanager
def _offline_flower(seed: int) -> Iterator[None]:
    """Flower's strategies outside a ServerApp: a task identity for Messages, quiet logs, seeded global numpy
    (Flower draws its DP noise from ``np.random``); everything restored afterwards."""
    from flwr.supercore.task_identity import TaskIdentity

    flwr_logger = logging.getLogger("flwr")
    level, identity = flwr_logger.level, (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    flwr_logger.setLevel(logging.ERROR)  # Flower logs every clipping and noising at INFO
    if identity[0] is None:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 0, 0, 0
    np_state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(np_state)
        flwr_logger.setLevel(level)
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = identity


def audit_dpfedavg(
    noise_multipliers: Sequence[float], *, clip_norm: float, num_sampled_clients: int, delta: float,
    trials: int = 2000, confidence: float = 0.95, seed: int = 0, accountant: str = "rdp", dim: int = 8,
) -> tuple[float, pa.DistinguishingAudit]:
    """Distinguishing game through :meth:`CentralDpFedAvg.aggregate_train`, one round per σ in
    ``noise_multipliers``: the audited client's update is 2C along coordinate 0 (D′, clipped to C) or a tiny step
    along coordinate 1 (D, like every other client); score = Σ over rounds of the released coordinate 0.
    Returns (accounted ε of those rounds, the audit)."""
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    from strategies.dp_fedavg import CentralDpFedAvg
    from strategies.fedavg import make_fedavg

    accounted = accounting.epsilon([dpa.GaussianDpEvent(s) for s in noise_multipliers], delta, accountant)
    leak = pa.current_leak_factor()
    zero = ArrayRecord({"w": Array(np.zeros(dim, dtype=np.float64))})
    canary = np.zeros(dim)
    canary[0] = 2.0 * clip_norm  # clipped to norm C by the strategy
    idle = np.zeros(dim)
    idle[1] = 1e-3 * clip_norm  # "no change" off the audited coordinate (Flower's clipping divides by the norm)

    def reply(update: np.ndarray) -> Message:
        content = RecordDict({"arrays": ArrayRecord({"w": Array(update)}),
                              "metrics": MetricRecord({"unit-weight": 1})})
        return Message(content=content, dst_node_id=0, message_type="train")

    # The released average is (Σ clipped updates)/m + N(0, (σC/m)²): signal and noise both scale with 1/m, so the
    # game is the same for any m; two clients keep it fast (Flower Messages cost ~1 ms each).
    m = min(num_sampled_clients, 2)

    def run(changed: bool, _rng: np.random.Generator) -> float:
        total = 0.0
        for r, strategy in enumerate(strategies, start=1):
            replies = [reply(canary if changed else idle)]
            replies += [reply(idle) for _ in range(m - 1)]
            arrays, _ = strategy.aggregate_train(r, replies)
            total += float(arrays["w"].numpy()[0])
        return total

    with _offline_flower(seed):
        strategies = [CentralDpFedAvg(make_fedavg(m, weighted_by_key="unit-weight"), noise_multiplier=s / leak,
                                      clip_norm=clip_norm, num_sampled_clients=m) for s in noise_multipliers]
        for strategy in strategies:
            strategy.strategy.current_arrays = zero  # the round's global model (set by configure_train in a run)
        result = pa.distinguishing_audit(run, trials, delta, confidence, np.random.default_rng(seed))
    return accounted, result


# ---------------------------------------------------------------------------------------------------------
# FedDM-DP: many runs through the client's own noised statistics
# ---------------------------------------------------------------------------------------------------------
def audit_feddm_dp(
    noise_multiplier: float, *, releases: int, rounds: int = 1, clip_norm: float = 1.0, delta: float,
    trials: int = 1000, confidence: float = 0.95, seed: int = 0, accountant: str = "rdp", num_examples: int = 20,
) -> tuple[float, pa.DistinguishingAudit]:
    """Distinguishing game through :func:`client.feddm.noisy_statistics` (the only code that reads real data).

    D: ``num_examples`` digits; D′: the same plus one canary example of class c. Per round the client releases
    noisy class counts and, for each of ``releases`` model perturbations, noisy per-class sums of clipped
    feature vectors. The white-box attacker knows the model, the perturbations, D and the canary, so it scores
    Σ_t ⟨S̃_t[c] − S_t^D[c], f_t / ‖f_t‖⟩ / C + (ñ_c − n_c^D) — the likelihood-ratio direction of every release.
    Returns (accounted ε of rounds × (releases + 1) Gaussian releases, the audit).
    """
    from client.feddm import Perturbation, class_sums, clip_rows, features, noisy_statistics, split_model
    from models import build_model
    from simulations.datasets import load_digits

    accounted = accounting.epsilon(
        [dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(noise_multiplier), releases + 1)] * rounds, delta, accountant)
    leak = pa.current_leak_factor()
    import torch

    ds = load_digits()
    x, y = ds.x_train[:num_examples], ds.y_train[:num_examples].astype(np.int64)
    cls = int(y[0])
    neighbours = ((x, y), (np.concatenate([x, ds.x_train[num_examples:num_examples + 1]]),
                           np.concatenate([y, [cls]]).astype(np.int64)))
    neighbours[1][1][-1] = cls
    model = build_model("mlp", x.shape[-1], ds.num_classes, seed=seed)
    perturb = Perturbation(model, rho=5.0)
    body, head = split_model(model)
    seeds = [seed * 1_000_003 + r * (releases + 1) for r in range(rounds)]
    directions, base_sums = [], []  # per (round, release): canary's unit clipped feature, D's noise-free sum
    for first in seeds:
        for t in range(releases):
            perturb.apply(torch.Generator().manual_seed(first + t))
            with torch.no_grad():
                f = clip_rows(features(body, head, torch.from_numpy(neighbours[1][0][-1:])).double(), clip_norm)[0]
            directions.append((f / f.norm()).numpy())
            base_sums.append(class_sums(model, x, y, ds.num_classes, clip_norm)[cls])
    perturb.reset()
    base_count = float(np.sum(y == cls))

    def run(changed: bool, rng: np.random.Generator) -> float:
        xs, ys = neighbours[int(changed)]
        score, i = 0.0, 0
        for first in seeds:
            stats = noisy_statistics(model, perturb, xs, ys, ds.num_classes, releases=releases, clip=clip_norm,
                                     noise_multiplier=noise_multiplier / leak, rng=rng, perturbation_seed=first)
            score += float(stats.counts[cls]) - base_count
            for noisy in stats.sums:
                score += float((noisy[cls] - base_sums[i]) @ directions[i]) / clip_norm
                i += 1
        return score

    return accounted, pa.distinguishing_audit(run, trials, delta, confidence, np.random.default_rng(seed + 2))


# ---------------------------------------------------------------------------------------------------------
# a run directory or ledger → the right attack
# ---------------------------------------------------------------------------------------------------------
def _largest(ledger: Any, run_id: str, unit: str, delta: float, accountant: str) -> tuple[str, float, list]:
    best = None
    for participant, _ in ledger.participants(run_id=run_id, unit=unit):
        eps = ledger.spent_epsilon(participant, unit, delta, accountant, run_id=run_id)
        if best is None or eps > best[1]:
            best = (participant, eps)
    if best is None:
        raise EmpiricalAuditError(f"run {run_id} has no {unit}-level releases in its ledger: nothing to audit")
    rows = ledger.charged_rows(best[0], unit, run_id)
    return best[0], best[1], rows


def audit_run(
    ledger: Any, run: dict[str, Any], *, delta: float, confidence: float = 0.95, trials: int | None = None,
    seed: int = 0, accountant: str = "rdp",
) -> EmpiricalResult:
    """Audit one run of ``ledger`` (a :class:`privacy.ledger.Ledger`); ``run`` is one of ``ledger.runs()``."""
    cfg, run_id = run["config"], run["run_id"]
    strategy, dp = cfg.get("strategy", "fedavg"), cfg.get("dp", "none")
    kind = "label-dp" if strategy == "label-dp" else "histogram" if strategy == "histogram" else dp
    if kind not in AUDITED:
        raise EmpiricalAuditError(f"run {run_id} is not differentially private (strategy {strategy}, dp {dp}): "
                                  "there is no privacy claim to audit")
    unit = {"dpsgd": "example", "dpfedavg": "user", "feddm-dp": "example", "label-dp": "label",
            "histogram": "user"}[kind]
    participant, spent, rows = _largest(ledger, run_id, unit, delta, accountant)
    rng = np.random.default_rng(seed)
    if kind == "dpsgd":
        steps = _sampled_gaussian_steps([r.event for r in rows])
        accounted, one = audit_dpsgd(steps, delta=delta, confidence=confidence, seed=seed,
                                     clip_norm=float(cfg.get("clip-norm", 1.0)), accountant=accountant)
        sigma = sorted({s for s, _, _ in steps})
        mechanism = (f"dpsgd(σ={', '.join(f'{s:.4g}' for s in sigma)}, q={steps[0][1]:.4g}, "
                     f"steps={sum(n for *_, n in steps)})")
        attack = f"one run, {one.num_canaries} white-box gradient canaries, {one.num_guesses} guesses"
        return EmpiricalResult(run_id, mechanism, participant, unit, attack, spent, one.epsilon_lb, confidence,
                               delta, {**asdict(one), "mechanism_epsilon": accounted})
    if kind == "dpfedavg":
        sigmas = [float(r.event.noise_multiplier) for r in rows if isinstance(r.event, dpa.GaussianDpEvent)]
        if len(sigmas) != len(rows):
            raise EmpiricalAuditError(f"run {run_id}: dpfedavg rows must be Gaussian events")
        sampled = max(1, math.ceil(float(cfg.get("fraction-train", 1.0)) * int(cfg.get("num-clients", 1))))
        accounted, game = audit_dpfedavg(sigmas, clip_norm=float(cfg.get("clip-norm", 1.0)),
                                         num_sampled_clients=sampled, delta=delta, trials=trials or 2000,
                                         confidence=confidence, seed=seed, accountant=accountant)
        return EmpiricalResult(run_id, f"dpfedavg(σ={sigmas[0]:.4g}, rounds={len(sigmas)}, clients={sampled})",
                               participant, unit, f"distinguishing game, {game.n_neg}+{game.n_pos} counted runs",
                               spent, game.epsilon_lb, confidence, delta,
                               {**asdict(game), "mechanism_epsilon": accounted})
    if kind == "feddm-dp":
        rounds = [r.event for r in rows]
        if not all(isinstance(e, dpa.SelfComposedDpEvent) and isinstance(e.event, dpa.GaussianDpEvent)
                   for e in rounds):
            raise EmpiricalAuditError(f"run {run_id}: feddm-dp rows must be self-composed Gaussian events")
        sigma, count = float(rounds[0].event.noise_multiplier), int(rounds[0].count)
        accounted, game = audit_feddm_dp(sigma, releases=count - 1, rounds=len(rounds), delta=delta,
                                         clip_norm=float(cfg.get("clip-norm", 1.0)), trials=trials or 1000,
                                         confidence=confidence, seed=seed, accountant=accountant)
        return EmpiricalResult(run_id, f"feddm-dp(σ={sigma:.4g}, releases/round={count}, rounds={len(rounds)})",
                               participant, unit, f"distinguishing game, {game.n_neg}+{game.n_pos} counted runs",
                               spent, game.epsilon_lb, confidence, delta,
                               {**asdict(game), "mechanism_epsilon": accounted})
    if kind == "label-dp":
        eps, k = float(cfg["label-epsilon"]), NUM_CLASSES.get(str(cfg.get("dataset")), 10)
        if cfg.get("label-mechanism") == "rr-prior":
            prior = np.full(k, 0.2 / (k - 2))
            prior[:2] = 0.4  # a confident prior on the two audited labels: the strongest case for the attacker
            result = pa.audit_rr_with_prior(eps, prior / prior.sum(), delta=delta, trials=trials or 20000, rng=rng,
                                            confidence=confidence, accountant=accountant)
        else:
            result = pa.audit_randomized_response(eps, k, delta=delta, trials=trials or 20000, rng=rng,
                                                  confidence=confidence, accountant=accountant)
    else:
        result = pa.audit_histogram(str(cfg["histogram-method"]), float(cfg["target-epsilon"]), delta,
                                    trials=trials or 2000, rng=rng, confidence=confidence, accountant=accountant)
    # The label/histogram attacks rebuild one participant's mechanism; the ledger charges it once per participant.
    return EmpiricalResult(run_id, result.mechanism, participant, unit, "distinguishing game "
                           f"({result.audit.n_neg}+{result.audit.n_pos} counted releases)", spent, result.epsilon_lb,
                           confidence, delta, {**asdict(result.audit), "mechanism_epsilon": result.accounted_epsilon})


def empirical_audit(ledger: Any, run_id: str | None, *, delta: float, confidence: float, trials: int | None,
                    seed: int, accountant: str) -> list[EmpiricalResult]:
    """Audit every run of an open ledger (or only ``run_id``); raises EmpiricalAuditError with what is missing."""
    runs = [r for r in ledger.runs() if run_id is None or r["run_id"] == run_id]
    if not runs:
        raise EmpiricalAuditError(f"the ledger records no run{f' {run_id}' if run_id else ''}: nothing to audit")
    return [audit_run(ledger, run, delta=delta, confidence=confidence, trials=trials, seed=seed,
                      accountant=accountant) for run in runs]


def results_json(results: Sequence[EmpiricalResult]) -> str:
    return json.dumps([{**asdict(r), "violation": r.violation} for r in results], indent=2, default=float)
