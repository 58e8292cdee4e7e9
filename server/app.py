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
from typing import Any

from flwr.app import Array, ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from privacy.budget import BudgetPolicy
from privacy.ledger import Ledger
from privacy.mechanisms import calibrate_gaussian
from server.config import RunConfig
from server.histogram import run_histogram
from server.loop import RunFailed, run_rounds, wait_for_nodes
from server.privacy import PRIVACY_UNIT, open_ledger, privacy_epsilons, privacy_mode, privacy_summary
from server.rundir import RunDir
from server.setup import ServerSetup, TestData
from strategies.budget_guard import LedgerGuard
from strategies.dp_fedavg import CentralDpFedAvg
from strategies.dp_sgd import LocalDpSgd
from strategies.fedavg import make_fedavg
from strategies.label_dp import LabelDpConsensus

logger = logging.getLogger("fedpriv")


def make_strategy(
    cfg: RunConfig, ledger: Ledger | None = None, run_id: str = "", initial: ArrayRecord | None = None,
    num_classes: int = 10,
) -> Strategy:
    """The strategy named by ``cfg.strategy``, wrapped for ``cfg.dp`` and guarded by the ledger.

    DP is added by wrapping: FedAvg → LocalDpSgd (client DP-SGD), CentralDpFedAvg (Flower's server-side
    fixed clipping) or LabelDpConsensus (label DP) → LedgerGuard (write-ahead ledger records, optional budget).
    """
    mode = privacy_mode(cfg)
    if mode is None:
        return make_fedavg(cfg.num_clients, cfg.fraction_train, cfg.fraction_evaluate)
    if ledger is None:
        raise ValueError("a differentially private run needs a ledger")
    inner: Strategy
    if mode == "label-dp":
        if initial is None:
            raise ValueError("label-dp needs the initial model (retrain = scratch restarts from it)")
        inner = LabelDpConsensus(
            make_fedavg(cfg.num_clients, cfg.fraction_train, cfg.fraction_evaluate),
            epsilon=cfg.label_epsilon, num_classes=num_classes, mechanism=cfg.label_mechanism,
            stages=cfg.label_stages, num_rounds=cfg.num_rounds, retrain_rounds=cfg.retrain_rounds,
            consensus=cfg.consensus, retrain=cfg.retrain, initial_arrays=initial,
        )
    elif mode == "dpsgd":
        inner = LocalDpSgd(
            make_fedavg(cfg.num_clients, cfg.fraction_train, cfg.fraction_evaluate),
            target_epsilon=cfg.target_epsilon, target_delta=cfg.target_delta, num_rounds=cfg.num_rounds,
            clip_norm=cfg.clip_norm, batch_size=cfg.batch_size, local_epochs=cfg.local_epochs,
            noise_multiplier=cfg.noise_multiplier,
        )
    elif mode == "dpfedavg":
        base = make_fedavg(cfg.num_clients, cfg.fraction_train, cfg.fraction_evaluate, weighted_by_key="unit-weight")
        sigma = cfg.noise_multiplier or calibrate_gaussian(
            cfg.target_epsilon, cfg.target_delta, steps=cfg.num_rounds, accountant=cfg.accountant)
        logger.info("dpfedavg: noise multiplier %.4f for ε=%g, δ=%g over %d rounds", sigma, cfg.target_epsilon,
                    cfg.target_delta, cfg.num_rounds)
        inner = CentralDpFedAvg(base, noise_multiplier=sigma, clip_norm=cfg.clip_norm,
                                num_sampled_clients=base.min_train_nodes)
    else:
        raise ValueError(f"dp must be one of none, dpsgd, dpfedavg, got {cfg.dp!r}")
    policy = None
    if cfg.budget_epsilon > 0:
        policy = BudgetPolicy(cfg.budget_epsilon, cfg.target_delta, PRIVACY_UNIT[mode], cfg.budget_scope,
                              cfg.accountant)
    return LedgerGuard(inner, ledger, run_id, policy)


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
    ledger, run_id = open_ledger(cfg, run_dir)
    strategy = make_strategy(cfg, ledger, run_id, initial_arrays(cfg, setup.test_data), setup.test_data.num_classes)

    def epsilon_so_far(_round: int) -> dict[str, Any]:
        eps = privacy_epsilons(cfg, ledger, run_id) if ledger is not None else {}
        return {"epsilon": max(eps.values(), default=0.0)}

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
            _, rows, early = run_rounds(
                grid, strategy, arrays, cfg.to_dict(), num_rounds=cfg.num_rounds, round_timeout=cfg.round_timeout,
                central_eval=central_eval, run_dir=run_dir, reporter=setup.reporter, first_round=first_round,
                round_metrics=epsilon_so_far if ledger is not None else None,
            )
            stopped = early or stopped
    except RunFailed as exc:
        stopped = f"failed: {exc}"
        raise
    except BaseException as exc:
        stopped = f"failed: {type(exc).__name__}: {exc}"
        raise
    finally:
        all_rows = previous + rows
        setup.summary = summarize(cfg, all_rows, stopped, time.perf_counter() - t0)
        if (phases := getattr(strategy, "phase_summary", None)) is not None:
            setup.summary["phases"] = phases(all_rows)
        if ledger is not None:
            setup.summary["privacy"] = privacy_summary(cfg, ledger, run_id, getattr(strategy, "excluded", []))
            ledger.close()
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
        setup = make_setup(grid, context)
        if setup.config.strategy == "histogram":
            run_histogram(grid, setup)
        else:
            run_server(grid, setup)

    return app
