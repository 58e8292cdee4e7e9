"""LASER attention vs softmax attention (SDPA): forward + backward time, per available route.

Times ``out = attn(q, k, v); out.backward(g)`` for ``F.scaled_dot_product_attention`` and for
:func:`kernels.laser.laser_attention` through each route available on the device ("sdpa" everywhere, "triton" on
CUDA when triton is installed), B=8 H=16 D=64, L = S ∈ {512, 2048}, no mask. CPU: float32 (B reduced for
L=2048 to keep the run short, as the table says); GPU: bfloat16. The runs are interleaved (SDPA, LASER, SDPA,
...) and the median is reported. Goals: CPU time ratio laser ÷ SDPA ≤ 1.3; GPU throughput ratio
SDPA time ÷ laser time ≥ 0.95.

Imports torch (and the kernels package) only; results are written through ``_common`` when it imports, else
printed as JSON.

    python benchmarks/attention.py [--repeats 5] [--threads N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

try:  # only for writing results/<name>.json and the README table (it also puts the checkout on sys.path)
    from _common import write_results
except Exception:  # any failure: print the JSON instead
    write_results = None
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.laser import laser_attention, triton_route_supported

GOAL_CPU_RATIO = 1.3  # laser time ÷ SDPA time
GOAL_GPU_THROUGHPUT = 0.95  # SDPA time ÷ laser time


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fwd_bwd(fn: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 grad: torch.Tensor) -> float:
    """Seconds for one forward + backward."""
    _sync(q.device)
    t0 = time.perf_counter()
    out = fn(q, k, v)
    out.backward(grad)
    _sync(q.device)
    elapsed = time.perf_counter() - t0
    q.grad = k.grad = v.grad = None
    return elapsed


def run_case(device: torch.device, dtype: torch.dtype, batch: int, heads: int, seq: int, dim: int,
             repeats: int) -> dict[str, object]:
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq, dim, generator=g, device=device, dtype=dtype).requires_grad_()
               for _ in range(3))
    grad = torch.randn(batch, heads, seq, dim, generator=g, device=device, dtype=dtype)
    fns: dict[str, Callable[..., torch.Tensor]] = {"sdpa": F.scaled_dot_product_attention}
    fns["laser[sdpa]"] = lambda a, b, c: laser_attention(a, b, c, route="sdpa")
    if triton_route_supported(q, k, v):
        fns["laser[triton]"] = lambda a, b, c: laser_attention(a, b, c, route="triton")
    for fn in fns.values():  # warm-up (kernel compilation, allocator)
        time_fwd_bwd(fn, q, k, v, grad)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_fwd_bwd(fn, q, k, v, grad))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    best = {name: min(ts) for name, ts in times.items()}
    return {
        "device": str(device), "dtype": str(dtype).removeprefix("torch."), "B": batch, "H": heads, "L": seq,
        "D": dim, "median_ms": {n: 1e3 * t for n, t in med.items()}, "min_ms": {n: 1e3 * t for n, t in best.items()},
        "all_ms": {n: [1e3 * t for t in ts] for n, ts in times.items()},
        "ratio_time_laser_over_sdpa": {n: med[n] / med["sdpa"] for n in fns if n != "sdpa"},
        "ratio_min_time_laser_over_sdpa": {n: best[n] / best["sdpa"] for n in fns if n != "sdpa"},
    }


def table(rows: list[dict[str, object]], threads: int) -> str:
    lines = [
        "**LASER vs softmax attention**, forward + backward, H=16 D=64 L=S, no mask; median of interleaved "
        f"runs (CPU: float32, {threads} thread(s); GPU: bfloat16). Goals: CPU time ratio LASER ÷ SDPA ≤ "
        f"{GOAL_CPU_RATIO}; GPU throughput ratio SDPA time ÷ LASER time ≥ {GOAL_GPU_THROUGHPUT}.",
        "",
        "| device | B | L | SDPA median / min (ms) | LASER route | LASER median / min (ms) "
        "| time ratio LASER ÷ SDPA, medians | same, minima | throughput ratio (medians) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ms, lo = row["median_ms"], row["min_ms"]
        for route, ratio in row["ratio_time_laser_over_sdpa"].items():
            note = " (B reduced on CPU)" if row["device"] == "cpu" and row["B"] != 8 else ""
            lines.append(f"| {row['device']} | {row['B']}{note} | {row['L']} | {ms['sdpa']:.1f} / {lo['sdpa']:.1f} | "
                         f"{route.removeprefix('laser[').removesuffix(']')} | {ms[route]:.1f} / {lo[route]:.1f} | "
                         f"**{ratio:.3f}** | {row['ratio_min_time_laser_over_sdpa'][route]:.3f} | {1 / ratio:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--cpu-batch-2048", type=int, default=2, help="B for L=2048 on CPU (8 is minutes)")
    parser.add_argument("--note", default="", help="a remark appended to the README table (e.g. machine load)")
    parser.add_argument("--results-name", default=None,
                        help="results/<name>.json and README section (default: attention, attention_cuda for --device "
                             "cuda, so GPU figures taken elsewhere do not replace the CPU ones)")
    args = parser.parse_args()
    name = args.results_name or ("attention_cuda" if args.device == "cuda" else "attention")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    if args.device in ("cpu", "all"):
        for seq, batch in ((512, 8), (2048, args.cpu_batch_2048)):
            rows.append(run_case(torch.device("cpu"), torch.float32, batch, 16, seq, 64, args.repeats))
            print(json.dumps({k: rows[-1][k] for k in ("device", "B", "L", "median_ms")}), flush=True)
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        for seq in (512, 2048):
            rows.append(run_case(torch.device("cuda"), torch.bfloat16, 8, 16, seq, 64, max(args.repeats, 20)))
            print(json.dumps({k: rows[-1][k] for k in ("device", "B", "L", "median_ms")}), flush=True)
    payload = {"threads": torch.get_num_threads(), "rows": rows,
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    md = table(rows, torch.get_num_threads()) + (f"\n\n{args.note}" if args.note else "")
    if write_results is None:
        print(json.dumps(payload, indent=2))
    else:
        print(write_results(name, payload, md))
    print(md)


if __name__ == "__main__":
    main()
