"""Fault tolerance: FedAvg with clients that drop out, crash or send corrupt replies, against the fault-free run.

Every configuration runs the same experiment (default ``digits-fedavg``: 10 IID clients, 10 rounds) through
Flower's simulation engine with the faults injected on the client side of the ClientApp (``fault-*`` keys, see
``client/faults.py``), for several seeds; the table reports whether each run completed, the final test
accuracy (mean over seeds and its difference to the fault-free mean), and what the server counted. Goal: with
30 % of the clients dropping out each round the run completes and ends within 2 accuracy points of the
fault-free run.

    python benchmarks/faults.py [--experiment digits-fedavg] [--seeds 0 1 2] [--rounds 10] [--clients 10]

Results: ``results/faults.json`` and the ``faults`` table in ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings

from _common import write_results

CONFIGS = [
    ("no faults", {}),
    ("30% drop out", {"fault-drop-rate": 0.3}),
    ("30% crash", {"fault-crash-rate": 0.3}),
    ("30% corrupt replies", {"fault-malformed-rate": 0.3}),
    ("mixed: 15% drop, 5% crash, 10% corrupt, delay ≤ 1 s", {"fault-drop-rate": 0.15, "fault-crash-rate": 0.05,
                                                             "fault-malformed-rate": 0.1, "fault-delay": 1.0}),
]
GOAL_POINTS = 2.0


def run(experiment: str, seeds: list[int], rounds: int, clients: int) -> list[dict]:
    from server.progress import LogReporter
    from simulations.experiments import resolve
    from simulations.runner import simulate

    rows = []
    for label, faults in CONFIGS:
        for seed in seeds:
            cfg = resolve(experiment, {"num-rounds": rounds, "num-clients": clients, "seed": seed, **faults})
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                try:
                    summary = simulate(cfg, tmp, reporter=LogReporter())
                except Exception as exc:  # a failed run is a result here
                    summary = {"stopped_reason": f"failed: {exc}", "final": {"test_accuracy": float("nan")},
                               "rounds_completed": 0, "total_failures": 0, "total_rejected": 0}
                wall = time.perf_counter() - t0
            row = {"config": label, "faults": faults, "seed": seed, "stopped_reason": summary["stopped_reason"],
                   "rounds_completed": summary["rounds_completed"], "accuracy": summary["final"]["test_accuracy"],
                   "failures": summary["total_failures"], "rejected": summary["total_rejected"],
                   "failure_reasons": summary.get("failure_reasons", {}),
                   "rejected_reasons": summary.get("rejected_reasons", {}), "wall_s": round(wall, 1)}
            rows.append(row)
            print(f"{label:<52} seed {seed}: {row['stopped_reason']:<10} accuracy {row['accuracy']:.4f} "
                  f"failures {row['failures']:>3} rejected {row['rejected']:>3} ({wall:.0f}s)", flush=True)
    return rows


def table(rows: list[dict], experiment: str, seeds: list[int], rounds: int, clients: int) -> tuple[str, dict]:
    base = statistics.mean(r["accuracy"] for r in rows if r["config"] == "no faults")
    lines = [
        f"**{experiment}**, {clients} clients, {rounds} rounds, seeds {', '.join(map(str, seeds))}; faults injected "
        "in the ClientApp (Flower simulation engine). Accuracy: final test accuracy, mean over seeds; Δ: points "
        f"against the fault-free mean. Goal: 30 % drop-out completes within {GOAL_POINTS:g} points.\n",
        "| faults | completed | accuracy | Δ (points) | failures / rejected per run | wall (s) |",
        "|---|---|---|---|---|---|",
    ]
    summary = {}
    for label, _ in CONFIGS:
        mine = [r for r in rows if r["config"] == label]
        done = sum(r["stopped_reason"] == "completed" for r in mine)
        acc = statistics.mean(r["accuracy"] for r in mine)
        delta = 100 * (acc - base)
        summary[label] = {"completed": done, "runs": len(mine), "accuracy": acc, "delta_points": delta}
        lines.append(f"| {label} | {done}/{len(mine)} | {acc:.4f} | {delta:+.2f} | "
                     f"{statistics.mean(r['failures'] for r in mine):.1f} / "
                     f"{statistics.mean(r['rejected'] for r in mine):.1f} | "
                     f"{statistics.mean(r['wall_s'] for r in mine):.0f} |")
    drop = summary["30% drop out"]
    goal_met = drop["completed"] == drop["runs"] and abs(drop["delta_points"]) <= GOAL_POINTS
    lines.append(f"\n30 % drop-out goal ({drop['completed']}/{drop['runs']} completed, "
                 f"{drop['delta_points']:+.2f} points): **{'met' if goal_met else 'not met'}**.")
    return "\n".join(lines), {"by_config": summary, "goal_met": goal_met, "baseline_accuracy": base}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiment", default="digits-fedavg")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--clients", type=int, default=10)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("fedpriv").setLevel(logging.WARNING)
    warnings.simplefilter("ignore")
    rows = run(args.experiment, args.seeds, args.rounds, args.clients)
    md, summary = table(rows, args.experiment, args.seeds, args.rounds, args.clients)
    print(md)
    payload = {"experiment": args.experiment, "seeds": args.seeds, "rounds": args.rounds, "clients": args.clients,
               "goal_points": GOAL_POINTS, **summary, "runs": rows}
    print(f"wrote {write_results('faults', payload, md)}")


if __name__ == "__main__":
    main()
