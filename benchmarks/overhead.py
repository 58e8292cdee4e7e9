"""fedpriv's FedAvg vs a minimal plain-Flower FedAvg: same model, data, partitions, clients and rounds.

Both run in this process on Flower's simulation engine, interleaved (A B A B ...), and use the same local
training and evaluation functions, so the ratio measures what fedpriv adds around Flower: configuration,
reply validation, byte metering, metrics/checkpoint writes and progress. Goal: wall-time ratio ≤ 1.10.

    python benchmarks/overhead.py [--rounds 10] [--clients 10] [--repeats 2]
"""

from __future__ import annotations

import argparse
import itertools
import logging
import statistics
import tempfile
import time
import warnings

from _common import write_results


def plain_flower_run(cfg) -> dict[str, float]:
    """The Flower quickstart pattern: FedAvg.start with a central evaluate_fn."""
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from models import TrainConfig, build_model, evaluate, train
    from simulations.apps import partition_data, test_data

    test = test_data(cfg)
    flat = cfg.to_dict()
    stamps: list[float] = []

    client = ClientApp()

    @client.train()
    def _train(msg: Message, context: Context) -> Message:
        node = context.node_config
        data = partition_data(flat, int(node["partition-id"]), int(node["num-partitions"]))
        model = build_model(cfg.model, data.x.shape[-1], data.num_classes)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        tc = TrainConfig(cfg.local_epochs, cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.optimizer)
        loss = train(model, data.x, data.y, tc, seed=int(context.node_config["partition-id"]))
        metrics = MetricRecord({"train-loss": loss, "num-examples": len(data.y)})
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)

    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        model = build_model(cfg.model, test.x.shape[-1], test.num_classes, seed=cfg.seed)

        def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model.load_state_dict(arrays.to_torch_state_dict())
            loss, acc = evaluate(model, test.x, test.y)
            stamps.append(time.perf_counter())
            return MetricRecord({"accuracy": acc, "loss": loss})

        strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=cfg.num_clients, min_available_nodes=cfg.num_clients)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=cfg.num_rounds,
                       evaluate_fn=central)

    t0 = time.perf_counter()
    run_simulation(server_app=server, client_app=client, num_supernodes=cfg.num_clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"include_dashboard": False, "log_to_driver": False}})
    wall = time.perf_counter() - t0
    rounds = [b - a for a, b in itertools.pairwise(stamps[1:])]  # steady state: rounds 2..R
    return {"wall_s": wall, "round_s": statistics.median(rounds)}


def fedpriv_run(cfg) -> dict[str, float]:
    from server.progress import LogReporter
    from simulations.runner import simulate

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        simulate(cfg, tmp, reporter=LogReporter())
        wall = time.perf_counter() - t0
        from server.rundir import RunDir

        rows = RunDir(tmp).read_metrics()
    return {"wall_s": wall, "round_s": statistics.median(r["wall_s"] for r in rows[1:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    from simulations.experiments import resolve
    from simulations.runner import flower_environment

    flower_environment()
    logging.getLogger("flwr").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    cfg = resolve(overrides={"num-rounds": args.rounds, "num-clients": args.clients})
    runs: dict[str, list[dict[str, float]]] = {"flower": [], "fedpriv": []}
    for i in range(args.repeats):
        for name, fn in (("flower", plain_flower_run), ("fedpriv", fedpriv_run)) if i % 2 == 0 else (
                ("fedpriv", fedpriv_run), ("flower", plain_flower_run)):
            runs[name].append(fn(cfg))
            print(f"repeat {i + 1}: {name:<8} wall {runs[name][-1]['wall_s']:.1f}s  "
                  f"round {runs[name][-1]['round_s'] * 1000:.0f}ms", flush=True)

    med = {n: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "round_s")} for n, rs in runs.items()}
    wall_ratio = med["fedpriv"]["wall_s"] / med["flower"]["wall_s"]
    round_ratio = med["fedpriv"]["round_s"] / med["flower"]["round_s"]
    table = (
        f"digits-fedavg, {args.clients} clients × {args.rounds} rounds, median of {args.repeats} interleaved runs "
        f"(CPU, {__import__('os').cpu_count()} cores). Goal: wall-time ratio ≤ 1.10.\n\n"
        "| system | wall time (s) | steady-state round (ms) |\n|---|---|---|\n"
        f"| plain Flower FedAvg | {med['flower']['wall_s']:.1f} | {med['flower']['round_s'] * 1000:.0f} |\n"
        f"| fedpriv FedAvg | {med['fedpriv']['wall_s']:.1f} | {med['fedpriv']['round_s'] * 1000:.0f} |\n"
        f"| **ratio fedpriv ÷ Flower** | **{wall_ratio:.3f}** | **{round_ratio:.3f}** |\n"
    )
    path = write_results("overhead", {
        "config": {"experiment": cfg.experiment, "clients": args.clients, "rounds": args.rounds,
                   "repeats": args.repeats},
        "runs": runs, "median": med, "wall_ratio": wall_ratio, "round_ratio": round_ratio, "goal_wall_ratio": 1.10,
    }, table)
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
