"""FedDM vs FedAvg on Fashion-MNIST: accuracy per round, cumulative uplink bytes, rounds and bytes to FedAvg's final
accuracy; FedDM-DP vs DP-FedAvg at equal ε.

Same partitions and model for every method: Fashion-MNIST's 60k training images split over 20 clients by
Dirichlet(α) label proportions (flwr-datasets' partitioner, seed 0), then each client's share subsampled to at most
``--per-client`` images (seeded; the 2-core budget) — the identical client data sets for every method; the
``cnn`` model from the same seeded initialization; the full 10k test set. Every run goes through the real
ServerApp logic (strategy, DP wrappers, ledger, round loop with reply checks and payload byte counts) and the
real ClientApp, driven **in-process** (:mod:`simulations.inprocess`: one client after the other, protobuf
round trip per message) instead of Flower's Ray engine, one torch thread. Uplink bytes are the serialized reply
payloads the round loop measures (``bytes_up``), cumulated over rounds.

DP comparison (α = ``--dp-alpha``): FedDM-DP (``fashion-feddm-dp``) against FedAvg with client DP-SGD
(``fashion-dpsgd``), both example-level (ε, 1e-5)-DP per client over their planned rounds — the same privacy
unit, so the same guarantee. (Central DP-FedAvg protects whole clients, a different unit.)

    python benchmarks/feddm.py [--alphas 0.1 0.5] [--per-client 300] [--fedavg-rounds 50] [--feddm-rounds 10]
                               [--epsilons 2 8] [--dp-alpha 0.1] [--dp-rounds 5]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from _common import RESULTS, write_results

# CPU-sized FedDM on this 2-core machine (the paper's settings are experiment fashion-feddm-paper).
FEDDM_CPU = {"feddm-iterations": 30, "feddm-real-batch": 16, "server-epochs": 20}


def client_data(alpha: float, per_client: int, num_clients: int) -> tuple[list[Any], Any]:
    """The 20 clients' data (Dirichlet(α) partition of the training set, each capped at ``per_client``) and the
    test set."""
    import numpy as np

    from client.data import ClientData
    from server.setup import TestData
    from simulations.datasets import load_fashion_mnist
    from simulations.partition import partition_indices

    ds = load_fashion_mnist()
    parts = partition_indices(ds.y_train, num_clients, "dirichlet", alpha=alpha, seed=0)
    rng = np.random.default_rng(0)
    clients = []
    for i, idx in enumerate(parts):
        take = np.sort(rng.choice(idx, min(per_client, len(idx)), replace=False))
        clients.append(ClientData(ds.x_train[take], ds.y_train[take], ds.num_classes, str(i)))
    return clients, TestData(ds.x_test, ds.y_test, ds.num_classes)


def run(label: str, experiment: str, overrides: dict[str, Any], clients: list[Any], test: Any,
        cache: dict[str, Any], cache_path: Path | None) -> dict[str, Any]:
    """One federated run in-process; returns its rows, summary and client timings (cached by label+config)."""
    from simulations.experiments import resolve
    from simulations.inprocess import run_in_process

    cfg = resolve(experiment, overrides)
    key = f"{label}|{json.dumps(cfg.to_dict(), sort_keys=True)}|{sum(len(c.y) for c in clients)}"
    if key in cache:
        return cache[key]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        summary, rows, grid = run_in_process(cfg, clients, test, tmp)
    train_calls = [s for kind, _node, s in grid.client_seconds if kind.startswith("train")]
    out = {"label": label, "experiment": experiment, "overrides": overrides, "rows": rows,
           "final_accuracy": summary["final"]["test_accuracy"], "privacy": summary.get("privacy", {}),
           "client_seconds_per_call": sum(train_calls) / max(len(train_calls), 1),
           "client_seconds_per_round": sum(train_calls) / max(len(rows), 1),
           "wall_s": time.perf_counter() - t0}
    print(f"{label:<28} rounds={len(rows):<3} final={out['final_accuracy']:.4f} "
          f"up={rows[-1]['cum_bytes_up'] if 'cum_bytes_up' in rows[-1] else sum(r['bytes_up'] for r in rows)} "
          f"wall={out['wall_s']:.0f}s", flush=True)
    cache[key] = out
    if cache_path is not None:
        cache_path.write_text(json.dumps(cache))
    return out


def reach(rows: list[dict[str, Any]], target: float) -> tuple[int | None, int | None]:
    """First round whose test accuracy is ≥ ``target`` and the cumulative uplink bytes up to it."""
    total = 0
    for r in rows:
        total += r["bytes_up"]
        if r["test_accuracy"] >= target:
            return r["round"], total
    return None, None


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for alpha, runs in results["non_private"].items():
        for name, style in (("fedavg", "-"), ("feddm", "--")):
            rows = runs[name]["rows"]
            acc = [r["test_accuracy"] for r in rows]
            ax1.plot([r["round"] for r in rows], acc, style, marker=".", label=f"{name} α={alpha}")
            ax2.plot(np.cumsum([r["bytes_up"] for r in rows]) / 2**20, acc, style, marker=".",
                     label=f"{name} α={alpha}")
    ax1.set(xlabel="round", ylabel="test accuracy", title="Fashion-MNIST, 20 clients, CNN")
    ax2.set(xlabel="cumulative uplink (MiB, serialized replies)", ylabel="test accuracy", xscale="log",
            title="accuracy vs uplink bytes")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.5])
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--per-client", type=int, default=300)
    ap.add_argument("--fedavg-rounds", type=int, default=50)
    ap.add_argument("--feddm-rounds", type=int, default=10)
    ap.add_argument("--epsilons", type=float, nargs="*", default=[2.0, 8.0])
    ap.add_argument("--dp-alpha", type=float, default=0.1)
    ap.add_argument("--dp-rounds", type=int, default=5)
    ap.add_argument("--cache", type=Path, default=None, help="JSON file to keep finished runs in (resumable)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    cache: dict[str, Any] = json.loads(args.cache.read_text()) if args.cache and args.cache.exists() else {}
    common = {"num-clients": args.clients, "partition": "dirichlet", "client-cpus": 1.0, "seed": 0}
    results: dict[str, Any] = {"non_private": {}, "dp": {}}
    t_start = time.perf_counter()
    for alpha in args.alphas:
        clients, test = client_data(alpha, args.per_client, args.clients)
        base = common | {"dirichlet-alpha": alpha}
        results["non_private"][str(alpha)] = {
            "fedavg": run(f"fedavg α={alpha}", "fashion-fedavg", base | {"num-rounds": args.fedavg_rounds},
                          clients, test, cache, args.cache),
            "feddm": run(f"feddm α={alpha}", "fashion-feddm", base | FEDDM_CPU | {"num-rounds": args.feddm_rounds},
                         clients, test, cache, args.cache),
        }
    if args.epsilons:
        clients, test = client_data(args.dp_alpha, args.per_client, args.clients)
        base = common | {"dirichlet-alpha": args.dp_alpha, "num-rounds": args.dp_rounds}
        for eps in args.epsilons:
            results["dp"][str(eps)] = {
                "dpsgd": run(f"dp-fedavg(dpsgd) ε={eps:g}", "fashion-dpsgd", base | {"target-epsilon": eps},
                             clients, test, cache, args.cache),
                "feddm-dp": run(f"feddm-dp ε={eps:g}", "fashion-feddm-dp",
                                base | FEDDM_CPU | {"target-epsilon": eps}, clients, test, cache, args.cache),
            }
    wall = time.perf_counter() - t_start

    # ---- table ------------------------------------------------------------------------------------------------
    def mib(b: float | None) -> str:
        return "—" if b is None else f"{b / 2**20:.2f}"

    verdicts = []
    table = (f"**FedDM vs FedAvg**, Fashion-MNIST, CNN, {args.clients} clients, Dirichlet(α) partition of the "
             f"training set with each client capped at {args.per_client} images (same client data, same initial "
             "model for every method), full 10k test set. Driven in-process (real ServerApp/ClientApp code, one "
             "client after the other, 1 torch thread) instead of Flower's Ray engine. Uplink = serialized reply "
             f"payloads. FedDM: {FEDDM_CPU['feddm-iterations']} matching steps, {FEDDM_CPU['feddm-real-batch']} real "
             f"images per class per step, 10 images per class, {FEDDM_CPU['server-epochs']} server epochs per "
             "round (CPU-sized; the paper uses ~1000 steps). Client s/round = sum over the round's clients "
             "(sequential).\n\n"
             "| α | method | rounds | final acc % | best acc % | uplink total MiB | uplink / round MiB | "
             "rounds to FedAvg final | uplink to FedAvg final MiB | client s/round |\n"
             "|---|---|---|---|---|---|---|---|---|---|\n")
    for alpha, runs in results["non_private"].items():
        target = runs["fedavg"]["final_accuracy"]
        for name in ("fedavg", "feddm"):
            r = runs[name]
            rows = r["rows"]
            up = sum(x["bytes_up"] for x in rows)
            got_round, got_bytes = reach(rows, target)
            r["rounds_to_fedavg_final"], r["bytes_to_fedavg_final"] = got_round, got_bytes
            table += (f"| {alpha} | {name} | {len(rows)} | {100 * r['final_accuracy']:.2f} | "
                      f"{100 * max(x['test_accuracy'] for x in rows):.2f} | {mib(up)} | {mib(up / len(rows))} | "
                      f"{got_round if got_round else 'not reached'} | {mib(got_bytes)} | "
                      f"{r['client_seconds_per_round']:.1f} |\n")
        fd, fa = runs["feddm"], runs["fedavg"]
        verdicts.append({
            "alpha": float(alpha), "fedavg_final": fa["final_accuracy"], "feddm_final": fd["final_accuracy"],
            "feddm_rounds_to_fedavg_final": fd["rounds_to_fedavg_final"],
            "rounds_goal_met": fd["rounds_to_fedavg_final"] is not None
            and fd["rounds_to_fedavg_final"] <= len(fa["rows"]) / 5,
            "accuracy_gain_points": 100 * (fd["final_accuracy"] - fa["final_accuracy"]),
            "bytes_ratio_to_fedavg_final": (fd["bytes_to_fedavg_final"] / sum(x["bytes_up"] for x in fa["rows"])
                                            if fd["bytes_to_fedavg_final"] else None),
        })
    if results["dp"]:
        table += (f"\n**DP at equal ε** (δ = 1e-5, example-level per client, α = {args.dp_alpha}, {args.dp_rounds} "
                  "rounds each; DP-FedAvg = FedAvg with client DP-SGD, the same privacy unit as FedDM-DP). ε spent "
                  "is the ledger's (RDP).\n\n"
                  "| ε | method | final acc % | best acc % | ε spent (ledger) | uplink total MiB | client s/round |\n"
                  "|---|---|---|---|---|---|---|\n")
        for eps, runs in results["dp"].items():
            for name in ("dpsgd", "feddm-dp"):
                r = runs[name]
                rows = r["rows"]
                table += (f"| {float(eps):g} | {'DP-FedAvg (DP-SGD)' if name == 'dpsgd' else 'FedDM-DP'} | "
                          f"{100 * r['final_accuracy']:.2f} | {100 * max(x['test_accuracy'] for x in rows):.2f} | "
                          f"{r['privacy'].get('epsilon', float('nan')):.3f} | "
                          f"{mib(sum(x['bytes_up'] for x in rows))} | {r['client_seconds_per_round']:.1f} |\n")
    low = [v for v in verdicts if v["alpha"] == min(args.alphas)]
    table += "\nGoal at α = 0.1: FedDM reaches FedAvg's final accuracy in ≤ ⅕ of its rounds and ends ≥ +2 points. "
    table += "Measured: " + "; ".join(
        f"α={v['alpha']:g}: FedDM {'reached' if v['feddm_rounds_to_fedavg_final'] else 'did not reach'} FedAvg's "
        f"final {100 * v['fedavg_final']:.2f} %"
        + (f" in round {v['feddm_rounds_to_fedavg_final']}" if v["feddm_rounds_to_fedavg_final"] else "")
        + f", final gain {v['accuracy_gain_points']:+.2f} points" for v in verdicts) + ". "
    if low:
        v = low[0]
        met = v["rounds_goal_met"] and v["accuracy_gain_points"] >= 2.0
        table += f"Goal {'met' if met else 'NOT met'} at α = {v['alpha']:g}. "
    table += f"Whole benchmark: {wall / 60:.1f} min. Plot: `results/feddm.png`.\n"

    RESULTS.mkdir(exist_ok=True)
    plot(results, RESULTS / "feddm.png")
    payload = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "feddm_cpu_overrides": FEDDM_CPU, "in_process": True, "results": results, "verdicts": verdicts,
               "wall_s": wall}
    path = write_results("feddm", payload, table)
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
