"""LoRA-RITE vs AdamW: optimizer step time on a realistic set of LoRA pairs.

12 layers × 4 adapted projections (q, k, v, o) of width d = 768 with rank r = 8: 48 pairs A (8, 768),
B (768, 8), 0.59 M trainable parameters, random fixed gradients. Times ``optimizer.step()`` of
:class:`kernels.lora_rite.LoRARITE` and of :func:`kernels.lora_rite.make_fused_adamw` (``fused=True`` on CUDA,
``foreach=True`` on CPU), interleaved, median over the repeats (float32). Goals: time ratio LoRA-RITE ÷ AdamW
≤ 1.5 on CPU, ≤ 1.3 on GPU.

Imports torch (and the kernels package) only; results are written through ``_common`` when it imports, else
printed as JSON.

    python benchmarks/optimizers.py [--repeats 50] [--threads N ...] [--device cpu|cuda|all]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

try:  # only for writing results/<name>.json and the README table (it also puts the checkout on sys.path)
    from _common import write_results
except Exception:  # any failure: print the JSON instead
    write_results = None
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.lora_rite import LoRARITE, make_fused_adamw

LAYERS, PROJECTIONS, WIDTH, RANK = 12, 4, 768, 8
GOALS = {"cpu": 1.5, "cuda": 1.3}


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


def run(device: torch.device, repeats: int) -> dict[str, object]:
    rite_pairs, adam_pairs = lora_pairs(device), lora_pairs(device)
    rite = LoRARITE([{"params": [a, b]} for a, b in rite_pairs], lr=1e-3)
    adam = make_fused_adamw([p for pair in adam_pairs for p in pair], lr=1e-3)
    adam_kind = "fused" if adam.defaults.get("fused") else "foreach"
    for _ in range(5):  # warm-up: state allocation, kernels
        rite.step()
        adam.step()
    times: dict[str, list[float]] = {"lora_rite": [], "adamw": []}
    for _ in range(repeats):
        times["lora_rite"].append(step_seconds(rite, device))
        times["adamw"].append(step_seconds(adam, device))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {
        "device": device.type, "threads": torch.get_num_threads(), "adamw": adam_kind,
        "median_ms": {n: 1e3 * t for n, t in med.items()},
        "min_ms": {n: 1e3 * min(ts) for n, ts in times.items()},
        "ratio": med["lora_rite"] / med["adamw"],
    }


def table(rows: list[dict[str, object]]) -> str:
    lines = [
        f"**Optimizer step**, {LAYERS} layers × {PROJECTIONS} LoRA pairs, d = {WIDTH}, r = {RANK} "
        f"({LAYERS * PROJECTIONS * 2 * WIDTH * RANK / 1e6:.2f} M parameters, float32), median of interleaved steps. "
        "Goals: time ratio LoRA-RITE ÷ AdamW ≤ 1.5 (CPU), ≤ 1.3 (GPU).",
        "",
        "| device | threads | AdamW (ms) | LoRA-RITE (ms) | **ratio LoRA-RITE ÷ AdamW** |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        ms = row["median_ms"]
        lines.append(f"| {row['device']} | {row['threads'] if row['device'] == 'cpu' else '—'} | "
                     f"{ms['adamw']:.2f} ({row['adamw']}) | {ms['lora_rite']:.2f} | **{row['ratio']:.2f}** |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, nargs="*", default=[], help="CPU thread counts (default: torch's)")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--note", default="", help="a remark appended to the README table (e.g. machine load)")
    args = parser.parse_args()
    rows = []
    if args.device in ("cpu", "all"):
        for threads in args.threads or [torch.get_num_threads()]:
            torch.set_num_threads(threads)
            rows.append(run(torch.device("cpu"), args.repeats))
            print(json.dumps(rows[-1]), flush=True)
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        rows.append(run(torch.device("cuda"), max(args.repeats, 100)))
        print(json.dumps(rows[-1]), flush=True)
    payload = {"pairs": LAYERS * PROJECTIONS, "width": WIDTH, "rank": RANK, "rows": rows,
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    md = table(rows) + (f"\n\n{args.note}" if args.note else "")
    if write_results is None:
        print(json.dumps(payload, indent=2))
    else:
        print(write_results("optimizers", payload, md))
    print(md)


if __name__ == "__main__":
    main()
