"""Flower ServerApp: resolved config → strategy → rounds → evaluation, run directory and checkpoints.

``build_server_app`` takes a *setup* function that turns the ServerApp's :class:`~flwr.app.Context` into a
:class:`ServerSetup` (resolved config, held-out test data, run directory, progress reporter). The simulation
layer supplies it — from ``context.run_config`` under ``flwr run``, or already resolved by
``fedpriv simulate`` — so this module knows nothing of where data or experiments come from.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from server.config import RunConfig
from server.loop import RunFailed, run_rounds, wait_for_nodes
from server.progress import LogReporter, Reporter
from server.rundir import RunDir
from strategies.fedavg import make_fedavg

logger = logging.getLogger("fedpriv")


@dataclass(frozen=True)
class TestData:
    """The held-out test set the server evaluates the global model on each round."""

    x: np.ndarray  # (N, 1, S, S) float32
    y: np.ndarray  # (N,) int64
    num_classes: int


@dataclass
class ServerSetup:
    """Everything the ServerApp needs besides the grid."""

    config: RunConfig
    test_data: TestData
    run_dir: Path
    reporter: Reporter = field(default_factory=LogReporter)
    resume: bool = False
    summary: dict[str, Any] = field(default_factory=dict)  # filled in by run_server


def make_strategy(cfg: RunConfig) -> Strategy:
    """The strategy named by ``cfg.strategy``."""
    if cfg.strategy == "fedavg":
        return make_fedavg(cfg.num_clients, cfg.fraction_train, cfg.fraction_evaluate)
    raise ValueError(f"strategy must be one of fedavg, got {cfg.strategy!r}")


def make_central_eval(cfg: RunConfig, test: TestData) -> Callable[[ArrayRecord], tuple[float, float]]:
    """Evaluate an ArrayRecord of the configured model on the held-out test set."""
    from models import build_model, evaluate

    model = build_model(cfg.model, image_size=test.x.shape[-1], num_classes=test.num_classes)

    def central_eval(arrays: ArrayRecord) -> tuple[float, float]:
        model.load_state_dict(arrays.to_torch_state_dict())
        return evaluate(model, test.x, test.y)

    return central_eval


def initial_arrays(cfg: RunConfig, test: TestData) -> ArrayRecord:
    """The seeded initial global model."""
    from models import build_model

    model = build_model(cfg.model, image_size=test.x.shape[-1], num_classes=test.num_classes, seed=cfg.seed)
    return ArrayRecord(model.state_dict())


def run_server(grid: Grid, setup: ServerSetup) -> dict[str, Any]:
    """Run the configured federation on ``grid`` and write the run directory; return the summary.

    The summary is written even when the run fails (``stopped_reason`` says why) and the exception is
    re-raised, so callers can exit non-zero.
    """
    cfg, run_dir = setup.config, RunDir(setup.run_dir)
    random.seed(cfg.seed)  # Flower's node sampling uses the `random` module
    central_eval = make_central_eval(cfg, setup.test_data)
    strategy = make_strategy(cfg)

    first_round, arrays = 1, initial_arrays(cfg, setup.test_data)
    previous = run_dir.read_metrics() if setup.resume else []
    if setup.resume and (ckpt := run_dir.load_checkpoint()) is not None:
        done, saved, _ = ckpt
        arrays = ArrayRecord(array_dict={k: Array(v) for k, v in saved.items()})
        first_round = done + 1
        previous = [r for r in previous if r["round"] <= done]
        logger.info("resuming %s after round %d", run_dir.path, done)
    else:
        run_dir.write_config(cfg.to_dict())
        run_dir.metrics_path.unlink(missing_ok=True)
        _, acc = central_eval(arrays)
        logger.info("initial test accuracy %.4f", acc)

    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    stopped = "completed"
    try:
        if first_round <= cfg.num_rounds:
            wait_for_nodes(grid, cfg.num_clients, cfg.node_wait_timeout)
            _, rows = run_rounds(
                grid, strategy, arrays, cfg.to_dict(), num_rounds=cfg.num_rounds, round_timeout=cfg.round_timeout,
                central_eval=central_eval, run_dir=run_dir, reporter=setup.reporter, first_round=first_round,
            )
    except RunFailed as exc:
        stopped = f"failed: {exc}"
        raise
    except BaseException as exc:
        stopped = f"failed: {type(exc).__name__}: {exc}"
        raise
    finally:
        all_rows = previous + rows
        setup.summary = summarize(cfg, all_rows, stopped, time.perf_counter() - t0)
        run_dir.write_summary(setup.summary)
        run_dir.write_plots(all_rows)
        setup.reporter.finish(setup.summary)
    return setup.summary


def summarize(cfg: RunConfig, rows: list[dict[str, Any]], stopped: str, wall_s: float) -> dict[str, Any]:
    """summary.json: final metrics, totals, wall time, why the run stopped, and the privacy summary."""
    last = rows[-1] if rows else {}
    return {
        "experiment": cfg.experiment,
        "strategy": cfg.strategy,
        "stopped_reason": stopped,
        "rounds_completed": int(last.get("round", 0)),
        "num_rounds": cfg.num_rounds,
        "final": {
            "test_accuracy": last.get("test_accuracy", float("nan")),
            "test_loss": last.get("test_loss", float("nan")),
        },
        "best_test_accuracy": max((r["test_accuracy"] for r in rows), default=float("nan")),
        "total_bytes_up": sum(r["bytes_up"] for r in rows),
        "total_bytes_down": sum(r["bytes_down"] for r in rows),
        "total_failures": sum(r["failures"] for r in rows),
        "total_rejected": sum(r["rejected"] for r in rows),
        "wall_s": round(wall_s, 3),
        # Privacy summary per privacy unit; this strategy makes no differentially private release.
        "privacy": {"differentially_private": False, "units": {}},
    }


def build_server_app(make_setup: Callable[[Grid, Context], ServerSetup]) -> ServerApp:
    """A ServerApp whose main resolves its setup from the grid and context and calls :func:`run_server`."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_server(grid, make_setup(grid, context))

    return app
