"""Empirical privacy audit: accounted ε vs a measured lower bound, for each DP experiment at ε ∈ {1, 4, 8}.

Each experiment's mechanism is rebuilt with the parameters its run would use (noise calibrated from the
experiment's config for the target ε, as the strategy does) and attacked through the implementation
(:mod:`simulations.empirical`, :mod:`privacy.audit`): DP-SGD by a one-run white-box canary audit through the
client's DP-SGD step, DP-FedAvg by a distinguishing game through the strategy's own aggregation, FedDM-DP
through the client's noised per-class statistics (a small digits model: the mechanism does not depend on the
data), label DP by guessing true labels from released ones, histograms by distinguishing populations that
differ in one user.
A lower bound above the accounted ε would prove a bug; the gap below it is the attacks' looseness.

    python benchmarks/audit.py [--epsilons 1 4 8] [--trials 2000]
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import numpy as np
from _common import write_results


def rows_for(eps: float, trials: int, seed: int) -> list[dict]:
    from privacy import audit as pa
    from privacy.mechanisms import calibrate_gaussian
    from simulations.empirical import audit_dpfedavg, audit_dpsgd, audit_feddm_dp
    from simulations.experiments import resolve

    out = []

    def add(experiment: str, mechanism: str, attack: str, accounted: float, lb: float, t0: float) -> None:
        out.append({"experiment": experiment, "epsilon": eps, "mechanism": mechanism, "attack": attack,
                    "accounted": accounted, "empirical_lb": lb, "seconds": time.perf_counter() - t0})
        print(f"ε={eps:g} {experiment:<18} {mechanism:<40} accounted {accounted:.3f}  lower bound {lb:.3f}",
              flush=True)

    cfg = resolve("fashion-dpsgd", {"target-epsilon": eps})
    t0 = time.perf_counter()
    batches = math.ceil(60000 / cfg.num_clients / cfg.batch_size)  # an average client's Poisson rate 1/batches
    steps = cfg.num_rounds * cfg.local_epochs * batches
    sigma = calibrate_gaussian(eps, cfg.target_delta, steps=steps, sampling_probability=1 / batches, rtol=1e-2)
    accounted, one = audit_dpsgd([(sigma, 1 / batches, steps)], delta=cfg.target_delta, seed=seed)
    add("fashion-dpsgd", f"DP-SGD σ={sigma:.3f} q=1/{batches} T={steps}",
        f"one run, 1000 gradient canaries, {one.num_guesses} guesses", accounted, one.epsilon_lb, t0)

    cfg = resolve("fashion-dpfedavg", {"target-epsilon": eps})
    t0 = time.perf_counter()
    sigma = calibrate_gaussian(eps, cfg.target_delta, steps=cfg.num_rounds)
    accounted, game = audit_dpfedavg([sigma] * cfg.num_rounds, clip_norm=cfg.clip_norm,
                                     num_sampled_clients=cfg.num_clients, delta=cfg.target_delta, trials=trials,
                                     seed=seed)
    add("fashion-dpfedavg", f"DP-FedAvg σ={sigma:.3f} × {cfg.num_rounds} rounds",
        f"distinguishing game, {trials} runs per side", accounted, game.epsilon_lb, t0)

    cfg = resolve("fashion-feddm-dp", {"target-epsilon": eps})
    t0 = time.perf_counter()
    releases = cfg.num_rounds * (cfg.feddm_dp_releases + 1)
    sigma = calibrate_gaussian(eps, cfg.target_delta, steps=releases)
    accounted, game = audit_feddm_dp(sigma, releases=cfg.feddm_dp_releases, rounds=cfg.num_rounds,
                                     clip_norm=cfg.clip_norm, delta=cfg.target_delta, trials=max(trials // 10, 100),
                                     seed=seed)
    add("fashion-feddm-dp", f"FedDM-DP σ={sigma:.3f} × {releases} releases",
        f"one example added (digits MLP), {max(trials // 10, 100)} runs per side", accounted, game.epsilon_lb, t0)

    rng = np.random.default_rng(seed)
    for mech in ("rr", "rr-prior"):
        cfg = resolve("fashion-labeldp", {"label-epsilon": eps, "label-mechanism": mech})
        t0 = time.perf_counter()
        if mech == "rr":
            res = pa.audit_randomized_response(eps, 10, delta=cfg.target_delta, trials=20 * trials, rng=rng)
        else:
            prior = np.array([0.4, 0.4] + [0.025] * 8)
            res = pa.audit_rr_with_prior(eps, prior, delta=cfg.target_delta, trials=20 * trials, rng=rng)
        add(f"fashion-labeldp ({mech})", res.mechanism, "label guess from the released label",
            res.accounted_epsilon, res.epsilon_lb, t0)

    for method in ("laplace", "gaussian", "liu2020"):
        cfg = resolve("words-histogram", {"target-epsilon": eps, "histogram-method": method})
        t0 = time.perf_counter()
        n = trials if method != "liu2020" else max(trials // 4, 100)  # liu2020's release costs ~8 ms
        res = pa.audit_histogram(method, eps, cfg.target_delta, trials=n, rng=rng)
        add(f"words-histogram ({method})", res.mechanism, f"one user changed, {n} releases per side",
            res.accounted_epsilon, res.epsilon_lb, t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 8.0])
    ap.add_argument("--trials", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    import torch

    torch.set_num_threads(1)  # the audited models are tiny; more threads only spin
    rows = [r for eps in args.epsilons for r in rows_for(eps, args.trials, args.seed)]
    table = ("**Accounted vs empirical ε** (lower bounds at 95 % confidence; δ of each experiment). A lower bound "
             "above the accounted ε would prove a privacy bug; every row must read lb ≤ accounted.\n\n"
             "| experiment | target ε | mechanism | attack | accounted ε | empirical lower bound |\n"
             "|---|---|---|---|---|---|\n")
    table += "".join(f"| {r['experiment']} | {r['epsilon']:g} | {r['mechanism']} | {r['attack']} | "
                     f"{r['accounted']:.3f} | {r['empirical_lb']:.3f} |\n" for r in rows)
    violations = [r for r in rows if r["empirical_lb"] > r["accounted"]]
    table += f"\nViolations: {len(violations)} of {len(rows)} rows.\n"
    path = write_results("audit", {"rows": rows, "violations": len(violations)}, table)
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
