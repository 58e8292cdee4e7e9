"""LoRA-RITE vs AdamW, and LASER vs softmax attention: step time, federated LoRA loss, ViT accuracy.

Three parts, each skippable (``--skip step federated laser``):

1. **step** — optimizer step time on a realistic set of LoRA pairs: 12 layers × 4 adapted projections (q, k, v,
   o) of width d = 768 with rank r = 8 (48 pairs A (8, 768), B (768, 8), 0.59 M trainable parameters), random
   fixed gradients, the same learning rate and weight decay for all. Times ``optimizer.step()`` of
   :class:`kernels.lora_rite.LoRARITE`, of the default AdamW :func:`kernels.lora_rite.make_fused_adamw` (torch's
   fused kernel, on CPU too) and of the multi-tensor (``foreach``) AdamW, interleaved, median over the repeats
   (float32). Goals: time ratio LoRA-RITE ÷ fused AdamW ≤ 1.5 on CPU, ≤ 1.3 on GPU. Imports torch and the
   kernels package only.
2. **federated** — loss after N federated rounds of LoRA adapters trained with LoRA-RITE vs AdamW (the same
   clients, public split, pretrained base and initial adapters; a small learning-rate sweep for each): the
   ``fashion-lora-rite`` experiment's settings, driven in-process through the real ServerApp/ClientApp code
   (:func:`simulations.inprocess.run_in_process`) on a subset (clients capped, fewer rounds, a fixed 2000-image
   test subset). Needs the fedpriv simulation stack (Flower); skipped with a note where it does not import.
3. **laser** — LASER-ViT vs SDPA-ViT test accuracy on Fashion-MNIST: the small ViT (``model = vit | vit-laser``)
   trained centrally on a training subset for a few epochs with AdamW, the same seeds, data order and initial
   weights for both, evaluated on the full 10k test set. Imports torch, numpy and fedpriv's torch-only
   ``models`` package; needs the Fashion-MNIST files.

Results go to ``results/optimizers.json`` and the README table through ``_common`` when it imports (else the JSON
is printed); a skipped part keeps its previous figures (with their own date).

    python benchmarks/optimizers.py [--skip step federated laser] [--threads 1] [--repeats 100] [--device cpu|cuda|all]
        [--rounds 5 --clients 5 --per-client 600 --public 6000 --rite-lrs ... --adamw-lrs ... --seeds 0]
        [--laser-train 10000 --laser-epochs 3 --laser-seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

try:  # only for writing results/<name>.json and the README table (it also puts the checkout on sys.path)
    from _common import RESULTS, write_results
except Exception:  # any failure: print the JSON instead
    write_results = None
    RESULTS = Path(__file__).resolve().parent / "results"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.lora_rite import LoRARITE, make_fused_adamw

LAYERS, PROJECTIONS, WIDTH, RANK = 12, 4, 768, 8
GOALS = {"cpu": 1.5, "cuda": 1.3}
PARTS = ("step", "federated", "laser")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------------------------------
# 1. step time
# ---------------------------------------------------------------------------------------------------------------
def lora_pairs(device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator(device=device).manual_seed(0)
    pairs = []
    for _ in range(LAYERS * PROJECTIONS):
        a = (torch.randn(RANK, WIDTH, generator=g, device=device) / WIDTH**0.5).requires_grad_()
        b = (torch.randn(WIDTH, RANK, generator=g, device=device) * 1e-2).requires_grad_()
        a.grad = torch.randn(RANK, WIDTH, generator=g, device=device) * 1e-3
        b.grad = torch.randn(WIDTH, RANK, generator=g, device=device) * 1e-3
        pairs.append((a, b))
    return pairs


def step_seconds(opt: torch.optim.Optimizer, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def run_step(device: torch.device, repeats: int, weight_decay: float) -> dict[str, object]:
    """Interleaved step times of LoRA-RITE (its default route, and the batched torch route), the default AdamW
    (fused) and the multi-tensor AdamW (foreach)."""
    # on CUDA the kernel is measured although "auto" still takes the torch route there (the next column)
    routes = (("lora_rite", "fused" if device.type == "cuda" else "auto"), ("lora_rite_torch", "torch"))
    rites = {name: LoRARITE([{"params": [a, b]} for a, b in lora_pairs(device)], lr=1e-3, weight_decay=weight_decay,
                            implementation=impl) for name, impl in routes}
    adams = {kind: make_fused_adamw([p for pair in lora_pairs(device) for p in pair], lr=1e-3,
                                    weight_decay=weight_decay, implementation=kind) for kind in ("fused", "foreach")}
    opts = rites | {f"adamw_{kind}": opt for kind, opt in adams.items()}
    adam_kind = "fused" if adams["fused"].defaults.get("fused") else "foreach"  # what the default resolved to
    for _ in range(5):  # warm-up: state allocation, kernels (the fused kernel is compiled, or loaded, here)
        for opt in opts.values():
            opt.step()
    rite_route = "+".join(sorted(rites["lora_rite"].routes))  # what the default resolved to
    times: dict[str, list[float]] = {name: [] for name in opts}
    for _ in range(repeats):
        for name, opt in opts.items():
            times[name].append(step_seconds(opt, device))
    med = {name: statistics.median(ts) for name, ts in times.items()}

    def paired(base: str) -> float:  # median ratio of back-to-back steps (robust to the machine's drift)
        return statistics.median(r / a for r, a in zip(times["lora_rite"], times[base], strict=True))

    return {
        "device": device.type, "threads": torch.get_num_threads(), "adamw": adam_kind, "lora_rite": rite_route,
        "repeats": repeats,
        "weight_decay": weight_decay,
        "median_ms": {n: 1e3 * t for n, t in med.items()},
        "min_ms": {n: 1e3 * min(ts) for n, ts in times.items()},
        "ratio": med["lora_rite"] / med["adamw_fused"],
        "paired_ratio": paired("adamw_fused"),
        "ratio_foreach": med["lora_rite"] / med["adamw_foreach"],
        "paired_ratio_foreach": paired("adamw_foreach"),
        "ratio_torch_route": med["lora_rite_torch"] / med["adamw_fused"],
    }


def step_part(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    if args.device in ("cpu", "all"):
        for threads in args.threads or [torch.get_num_threads()]:
            torch.set_num_threads(threads)
            for _ in range(args.runs):
                rows.append(run_step(torch.device("cpu"), args.repeats, args.weight_decay))
                print(json.dumps(rows[-1]), flush=True)
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        rows.append(run_step(torch.device("cuda"), max(args.repeats, 100), args.weight_decay))
        print(json.dumps(rows[-1]), flush=True)
    return {"measured": _now(), "pairs": LAYERS * PROJECTIONS, "width": WIDTH, "rank": RANK, "rows": rows,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def step_table(part: dict[str, Any]) -> str:
    lines = [
        f"**Optimizer step**, {LAYERS} layers × {PROJECTIONS} LoRA pairs, d = {WIDTH}, r = {RANK} "
        f"({LAYERS * PROJECTIONS * 2 * WIDTH * RANK / 1e6:.2f} M parameters, float32), the same lr and weight decay "
        "for all, median of interleaved steps (one row per run). Baselines: the default AdamW "
        "(`make_fused_adamw`: torch's fused kernel, on CPU too) and the multi-tensor (`foreach`) AdamW. LoRA-RITE "
        "runs the fused kernel (`implementation=\"fused\"`: C on CPUs, CUDA on GPUs, where \"auto\" takes it on "
        "CPUs only; route column) and, beside it, the batched torch route (`implementation=\"torch\"`). Goals: time "
        "ratio LoRA-RITE ÷ fused AdamW ≤ 1.5 (CPU), ≤ 1.3 (GPU). Ratio of medians, and in brackets the median over "
        "repeats of the ratio of back-to-back steps (robust to the machine's speed drifting during a run). "
        f"Measured {part.get('measured', '?')}.",
        "",
        "| device | threads | weight decay | AdamW fused (ms) | AdamW foreach (ms) | LoRA-RITE route | LoRA-RITE (ms) "
        "| **ratio LoRA-RITE ÷ fused AdamW** | ratio LoRA-RITE ÷ foreach AdamW | LoRA-RITE torch route (ms) "
        "| ratio torch route ÷ fused AdamW |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in part["rows"]:
        ms = row["median_ms"]
        if "adamw_fused" not in ms:  # a row from before the fused CPU baseline (AdamW foreach only)
            continue
        torch_ms = f"{ms['lora_rite_torch']:.2f}" if "lora_rite_torch" in ms else "—"
        torch_ratio = f"{row['ratio_torch_route']:.2f}" if "ratio_torch_route" in row else "—"
        lines.append(f"| {row['device']} | {row['threads'] if row['device'] == 'cpu' else '—'} | "
                     f"{row.get('weight_decay', '?')} | {ms['adamw_fused']:.2f} | {ms['adamw_foreach']:.2f} | "
                     f"{row.get('lora_rite', 'torch')} | {ms['lora_rite']:.2f} | "
                     f"**{row['ratio']:.2f}** ({row['paired_ratio']:.2f}) | "
                     f"{row['ratio_foreach']:.2f} ({row['paired_ratio_foreach']:.2f}) | {torch_ms} | {torch_ratio} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# 2. federated LoRA: loss after N rounds, LoRA-RITE vs AdamW adapters
# ---------------------------------------------------------------------------------------------------------------
def federated_part(args: argparse.Namespace) -> dict[str, Any]:
    try:
        import logging
        import tempfile

        import numpy as np

        from client.data import ClientData
        from server.setup import TestData
        from simulations.apps import lora_split
        from simulations.datasets import DataError, load_dataset
        from simulations.experiments import resolve
        from simulations.inprocess import run_in_process
        from simulations.partition import partition_indices
    except ImportError as exc:  # a machine with torch only (no Flower)
        return {"skipped": f"the fedpriv simulation stack does not import here ({exc})", "measured": _now()}
    logging.getLogger("flwr").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    base_cfg = resolve(args.experiment)
    try:
        ds = load_dataset(base_cfg.dataset, data_dir=base_cfg.data_dir, test_fraction=base_cfg.test_fraction)
    except DataError as exc:
        return {"skipped": str(exc), "measured": _now()}
    te = np.sort(np.random.default_rng(1234).choice(len(ds.y_test), min(args.test, len(ds.y_test)), replace=False))
    test = TestData(ds.x_test[te], ds.y_test[te], ds.num_classes)
    runs = []
    for seed in args.seeds:
        overrides = {"num-clients": args.clients, "num-rounds": args.rounds, "seed": seed, "client-cpus": 1.0}
        cfg0 = resolve(args.experiment, overrides)
        pub, priv = lora_split(ds.y_train, cfg0.to_dict())
        rng = np.random.default_rng([seed, 77])
        pub = np.sort(rng.permutation(pub)[: args.public])
        parts = partition_indices(ds.y_train[priv], args.clients, cfg0.partition, alpha=cfg0.dirichlet_alpha,
                                  classes_per_client=cfg0.classes_per_client, seed=seed)
        clients = []
        for i, part in enumerate(parts):
            idx = priv[np.sort(rng.permutation(part)[: args.per_client])]
            clients.append(ClientData(ds.x_train[idx], ds.y_train[idx], ds.num_classes, str(i)))
        public = TestData(ds.x_train[pub], ds.y_train[pub], ds.num_classes)
        for optimizer, lrs in (("lora-rite", args.rite_lrs), ("adamw", args.adamw_lrs)):
            for lr in lrs:
                cfg = resolve(args.experiment, overrides | {"optimizer": optimizer, "lr": lr})
                t0 = time.perf_counter()
                with tempfile.TemporaryDirectory() as tmp:
                    summary, rows, grid = run_in_process(cfg, clients, test, tmp, public)
                wall = time.perf_counter() - t0
                train_s = sum(s for kind, _, s in grid.client_seconds if kind == "train")
                run = {
                    "seed": seed, "optimizer": optimizer, "lr": lr, "wall_s": round(wall, 1),
                    "client_train_s_per_round": round(train_s / max(len(rows), 1), 2),
                    "base_test_accuracy": summary["lora"]["base_test_accuracy"],
                    "adapter_params": summary["lora"]["adapter_params"],
                    "rounds": [{k: r.get(k) for k in ("round", "train_loss", "test_loss", "test_accuracy",
                                                         "bytes_up")} for r in rows],
                    "final": {k: rows[-1].get(k) for k in ("train_loss", "test_loss", "test_accuracy")},
                }
                runs.append(run)
                print(json.dumps({k: run[k] for k in ("seed", "optimizer", "lr", "final", "wall_s")}), flush=True)
    some = runs[0] if runs else {}
    return {
        "measured": _now(), "experiment": args.experiment, "clients": args.clients, "rounds": args.rounds,
        "per_client": args.per_client, "public": args.public, "test_examples": len(te),
        "model": base_cfg.model, "lora_rank": base_cfg.lora_rank, "partition": base_cfg.partition,
        "dirichlet_alpha": base_cfg.dirichlet_alpha, "local_epochs": base_cfg.local_epochs,
        "batch_size": base_cfg.batch_size, "weight_decay": base_cfg.weight_decay, "lora_balance": base_cfg.lora_balance,
        "adapter_params": some.get("adapter_params"), "runs": runs,
    }


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def federated_table(part: dict[str, Any]) -> str:
    if "skipped" in part:
        return f"**Federated LoRA, LoRA-RITE vs AdamW**: skipped ({part['skipped']})."
    runs = part["runs"]
    keys = sorted({(r["optimizer"], r["lr"]) for r in runs}, key=lambda k: (k[0] != "lora-rite", k[1]))
    seeds = sorted({r["seed"] for r in runs})
    lines = [
        f"**Federated LoRA, LoRA-RITE vs AdamW adapters** — `{part['experiment']}` settings ({part['model']}, "
        f"LoRA rank {part['lora_rank']}, {part['adapter_params']} adapter parameters travel), {part['clients']} "
        f"clients × ≤ {part['per_client']} private images ({part['partition']}"
        + (f" α = {part['dirichlet_alpha']}" if part["partition"] == "dirichlet" else "")
        + f"), base pretrained on {part['public']} public images of classes 0–4, {part['rounds']} rounds of "
        f"{part['local_epochs']} local epoch(s), batch {part['batch_size']}, weight decay {part['weight_decay']}, "
        f"lora-balance {str(part.get('lora_balance', False)).lower()}; "
        f"test loss/accuracy on a fixed {part['test_examples']}-image test subset; in-process driver of the real "
        f"Server/ClientApp code, 1 thread; seeds {', '.join(map(str, seeds))} (means). Base alone: test accuracy "
        f"{_mean([r['base_test_accuracy'] for r in runs]):.4f}. Measured {part['measured']}.",
        "",
        "| optimizer | lr | train loss, last round | test loss after " + f"{part['rounds']} rounds | test accuracy | "
        "best-lr | client training s / round |",
        "|---|---|---|---|---|---|---|",
    ]
    final = {k: _mean([r["final"]["test_loss"] for r in runs if (r["optimizer"], r["lr"]) == k]) for k in keys}
    best = {opt: min((k for k in keys if k[0] == opt), key=lambda k: final[k]) for opt, _ in keys}
    for key in keys:
        sel = [r for r in runs if (r["optimizer"], r["lr"]) == key]
        lines.append(
            f"| {key[0]} | {key[1]:g} | {_mean([r['final']['train_loss'] for r in sel]):.4f} | "
            f"{final[key]:.4f} | {_mean([r['final']['test_accuracy'] for r in sel]):.4f} | "
            f"{'**best**' if best[key[0]] == key else ''} | "
            f"{_mean([r['client_train_s_per_round'] for r in sel]):.1f} |")
    rite, adam = best.get("lora-rite"), best.get("adamw")
    if rite and adam:
        lines += ["", f"Best learning rates: LoRA-RITE {rite[1]:g} → test loss {final[rite]:.4f}, AdamW {adam[1]:g} → "
                      f"{final[adam]:.4f} after {part['rounds']} rounds (per-round curves in results/optimizers.json)."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# 3. LASER-ViT vs SDPA-ViT accuracy
# ---------------------------------------------------------------------------------------------------------------
def laser_part(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from models import TrainConfig, build_model, evaluate, train

    try:
        from simulations.datasets import DataError, load_fashion_mnist

        ds = load_fashion_mnist()
    except (ImportError, DataError) as exc:  # numpy-only module; the files may be absent
        return {"skipped": str(exc), "measured": _now()}
    torch.set_num_threads(1)
    idx = np.sort(np.random.default_rng(0).permutation(len(ds.y_train))[: args.laser_train])
    x, y = ds.x_train[idx], ds.y_train[idx]
    tcfg = TrainConfig(epochs=args.laser_epochs, batch_size=64, lr=1e-3, optimizer="adamw", weight_decay=0.01)
    runs = []
    for seed in args.laser_seeds:
        for model_name in ("vit", "vit-laser"):
            model = build_model(model_name, image_size=28, num_classes=10, seed=seed)
            t0 = time.perf_counter()
            loss = train(model, x, y, tcfg, seed=seed)
            seconds = time.perf_counter() - t0
            test_loss, acc = evaluate(model, ds.x_test, ds.y_test)
            runs.append({"seed": seed, "model": model_name, "train_loss": loss, "test_loss": test_loss,
                         "test_accuracy": acc, "train_s": round(seconds, 1)})
            print(json.dumps(runs[-1]), flush=True)
    return {"measured": _now(), "train_examples": len(y), "epochs": args.laser_epochs, "batch_size": 64,
            "lr": 1e-3, "weight_decay": 0.01, "test_examples": len(ds.y_test), "runs": runs}


def laser_table(part: dict[str, Any]) -> str:
    if "skipped" in part:
        return f"**LASER-ViT vs SDPA-ViT**: skipped ({part['skipped']})."
    runs = part["runs"]
    seeds = sorted({r["seed"] for r in runs})
    lines = [
        f"**LASER-ViT vs SDPA-ViT, Fashion-MNIST**: the small ViT (dim 64, depth 2, 4 heads, 7×7 patches) trained "
        f"centrally on {part['train_examples']} training images for {part['epochs']} epochs (AdamW lr {part['lr']}, "
        f"weight decay {part['weight_decay']}, batch {part['batch_size']}), the same initial weights and data order "
        f"per seed for both attentions; accuracy on the full {part['test_examples']}-image test set; CPU, 1 thread. "
        f"Measured {part['measured']}.",
        "",
        "| attention | " + " | ".join(f"seed {s}" for s in seeds) + " | mean accuracy | mean test loss | "
        "training s / run |",
        "|---|" + "---|" * (len(seeds) + 3),
    ]
    for name in ("vit", "vit-laser"):
        sel = {r["seed"]: r for r in runs if r["model"] == name}
        accs = [sel[s]["test_accuracy"] for s in seeds]
        lines.append(f"| {'LASER' if name == 'vit-laser' else 'softmax (SDPA)'} | "
                     + " | ".join(f"{a:.4f}" for a in accs)
                     + f" | **{_mean(accs):.4f}** | {_mean([sel[s]['test_loss'] for s in seeds]):.4f} | "
                     f"{_mean([sel[s]['train_s'] for s in seeds]):.1f} |")
    diffs = [next(r["test_accuracy"] for r in runs if r["seed"] == s and r["model"] == "vit-laser")
             - next(r["test_accuracy"] for r in runs if r["seed"] == s and r["model"] == "vit") for s in seeds]
    lines += ["", f"LASER − SDPA accuracy per seed: {', '.join(f'{d:+.4f}' for d in diffs)} "
                  f"(mean {_mean(diffs):+.4f})."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
def previous_results(name: str) -> dict[str, Any]:
    path = RESULTS / f"{name}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if "step" not in data and "rows" in data:  # the layout before the federated and laser parts
        data = {"step": {k: data[k] for k in ("pairs", "width", "rank", "rows", "gpu") if k in data}}
    return {k: data[k] for k in PARTS if k in data}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip", nargs="*", default=[], choices=PARTS, help="parts not to run (kept from before)")
    parser.add_argument("--no-write", action="store_true", help="print the results; write no files")
    parser.add_argument("--note", default="", help="a remark appended to the README table (e.g. machine load)")
    parser.add_argument("--results-name", default=None,
                        help="results/<name>.json and README section (default: optimizers, optimizers_cuda for "
                             "--device cuda, so GPU figures taken elsewhere do not replace the CPU ones)")
    step = parser.add_argument_group("step time")
    step.add_argument("--repeats", type=int, default=100)
    step.add_argument("--runs", type=int, default=1, help="independent step-time runs per thread count")
    step.add_argument("--threads", type=int, nargs="*", default=[1], help="CPU thread counts")
    step.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    step.add_argument("--weight-decay", type=float, default=0.01, help="for both optimizers")
    fed = parser.add_argument_group("federated LoRA")
    fed.add_argument("--experiment", default="fashion-lora-rite")
    fed.add_argument("--rounds", type=int, default=5)
    fed.add_argument("--clients", type=int, default=5)
    fed.add_argument("--per-client", type=int, default=600)
    fed.add_argument("--public", type=int, default=6000, help="public images the base is pretrained on (at most)")
    fed.add_argument("--test", type=int, default=2000, help="test images (a fixed random subset)")
    fed.add_argument("--rite-lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    fed.add_argument("--adamw-lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    fed.add_argument("--seeds", type=int, nargs="+", default=[0])
    las = parser.add_argument_group("LASER vs SDPA")
    las.add_argument("--laser-train", type=int, default=10000)
    las.add_argument("--laser-epochs", type=int, default=3)
    las.add_argument("--laser-seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    name = args.results_name or ("optimizers_cuda" if args.device == "cuda" else "optimizers")

    payload = previous_results(name)
    runners = {"step": step_part, "federated": federated_part, "laser": laser_part}
    for part in PARTS:
        if part not in args.skip:
            payload[part] = runners[part](args)
    tables = {"step": step_table, "federated": federated_table, "laser": laser_table}
    md = "\n\n".join(tables[p](payload[p]) for p in PARTS if p in payload)
    md += f"\n\n{args.note}" if args.note else ""
    if args.no_write or write_results is None:
        print(json.dumps(payload, indent=2))
    else:
        print(write_results(name, payload, md))
    print(md)


if __name__ == "__main__":
    main()
