"""Why consensus retraining does not beat RR here: what the kept set can teach, with and without its noise.

A diagnostic, not a private algorithm: it trains on TRUE labels to bound what any filter choosing the same
samples could reach. It mirrors the label-DP protocol outside Flower (FedAvg over the simulation's partitions,
clients one after the other, the project's RandomizedResponse, models and training loop, one torch thread):

1. RR labels (ε), FedAvg for ``--judge-round`` rounds — the consensus judge; RR goes on to ``--rounds``;
2. consensus: each client keeps the samples whose predicted label equals its RR label;
3. ``--rounds − --judge-round`` retraining rounds (continue from the judge, matched local steps) on
   (a) the kept samples with their RR labels — consensus retraining;
   (b) the kept samples with their TRUE labels — a perfect filter of the same samples (oracle);
   (c) a uniformly random subset of the same size per client with TRUE labels (no selection bias).

    python benchmarks/label_dp_oracle.py [--epsilon 1] [--partition dirichlet] [--rounds 12] [--judge-round 9]
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

from _common import RESULTS, machine


def main() -> None:
    import json

    import numpy as np
    import torch

    from models import TrainConfig, build_model, evaluate, predict_proba, set_torch_threads, train
    from privacy.mechanisms import RandomizedResponse
    from server.config import resolve_config
    from simulations.apps import partition_data, test_data

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epsilon", type=float, default=1.0)
    ap.add_argument("--partition", default="dirichlet", choices=["iid", "dirichlet"])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--judge-round", type=int, default=9)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--clients", type=int, default=10)
    args = ap.parse_args()

    set_torch_threads(1)
    cfg = resolve_config({"dataset": "fashion-mnist", "partition": args.partition, "dirichlet-alpha": 0.5,
                          "num-clients": args.clients, "model": "mlp", "lr": args.lr})
    clients = [partition_data(cfg.to_dict(), i, cfg.num_clients) for i in range(cfg.num_clients)]
    test = test_data(cfg)
    k = test.num_classes
    noisy = [RandomizedResponse(args.epsilon, k).apply(c.y, np.random.default_rng([17, i]))
             for i, c in enumerate(clients)]

    def model_of(state: dict[str, Any]) -> torch.nn.Module:
        m = build_model("mlp", 28, k)
        m.load_state_dict(state)
        return m

    def fedavg_round(state: dict[str, Any], data: list[tuple[np.ndarray, np.ndarray, int]], rnd: int) -> dict:
        total, acc = 0, None
        for i, (x, y, epochs) in enumerate(data):
            if len(x) == 0:
                continue
            m = model_of(state)
            train(m, x, y, TrainConfig(epochs=epochs, batch_size=32, lr=args.lr, momentum=0.9), seed=1009 * i + rnd)
            s = {n: v.double() * len(x) for n, v in m.state_dict().items()}
            acc = s if acc is None else {n: acc[n] + s[n] for n in acc}
            total += len(x)
        return {n: (v / total).float() for n, v in acc.items()}

    def accuracy(state: dict[str, Any]) -> float:
        return evaluate(model_of(state), test.x, test.y)[1]

    t0 = time.perf_counter()
    state = build_model("mlp", 28, k, seed=cfg.seed).state_dict()
    rr_curve = []
    judge = None
    for rnd in range(1, args.rounds + 1):
        state = fedavg_round(state, [(c.x, yn, 1) for c, yn in zip(clients, noisy, strict=True)], rnd)
        rr_curve.append(accuracy(state))
        if rnd == args.judge_round:
            judge = copy.deepcopy(state)
    assert judge is not None
    jm = model_of(judge)
    kept = [predict_proba(jm, c.x).argmax(1) == yn for c, yn in zip(clients, noisy, strict=True)]
    all_kept = np.concatenate(kept)
    all_y, all_noisy = np.concatenate([c.y for c in clients]), np.concatenate(noisy)
    rng = np.random.default_rng(5)
    random_subsets = [np.isin(np.arange(len(m)), rng.choice(len(m), int(m.sum()), replace=False)) for m in kept]

    def retrain(masks: list[np.ndarray], labels: str) -> list[float]:
        data = []
        for c, yn, m in zip(clients, noisy, masks, strict=True):
            y = c.y if labels == "true" else yn
            data.append((c.x[m], y[m], max(1, round(len(m) / max(int(m.sum()), 1)))))
        s, curve = copy.deepcopy(judge), []
        for rnd in range(args.judge_round + 1, args.rounds + 1):
            s = fedavg_round(s, data, rnd)
            curve.append(accuracy(s))
        return curve

    out = {
        "config": vars(args), "machine": machine(),
        "rr_accuracy_per_round": rr_curve, "judge_accuracy": rr_curve[args.judge_round - 1],
        "kept_fraction": float(all_kept.mean()),
        "kept_precision": float((all_noisy[all_kept] == all_y[all_kept]).mean()),
        "kept_per_class": np.bincount(all_noisy[all_kept], minlength=k).tolist(),
        "kept_precision_per_class": [float((all_y[all_kept & (all_noisy == c)] == c).mean()) for c in range(k)],
        "consensus_rr_labels": retrain(kept, "rr"),
        "oracle_kept_true_labels": retrain(kept, "true"),
        "random_subset_true_labels": retrain(random_subsets, "true"),
    }
    out["wall_s"] = time.perf_counter() - t0
    path = RESULTS / "label_dp_oracle.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    pct = lambda v: f"{100 * v:.2f}"  # noqa: E731
    print(f"ε={args.epsilon:g} {args.partition}: RR after {args.rounds} rounds {pct(rr_curve[-1])}; judge (round "
          f"{args.judge_round}) {pct(out['judge_accuracy'])}; kept {out['kept_fraction']:.3f} at precision "
          f"{out['kept_precision']:.3f}; per class {out['kept_per_class']}")
    for key in ("consensus_rr_labels", "oracle_kept_true_labels", "random_subset_true_labels"):
        print(f"  {key:<28} " + " ".join(pct(v) for v in out[key]))
    print(f"wrote {path} ({out['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
