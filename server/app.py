"""Flower ServerApp: resolved config → strategy → rounds → evaluation, run directory and checkpoints.

``build_server_app`` takes a *setup* function that turns the ServerApp's :class:`~flwr.app.Context` into a
:class:`ServerSetup` (resolved config, held-out test data, run directory, progress reporter). The simulation
layer supplies it — from ``context.run_config`` under ``flwr run``, or already resolved by
``fedpriv simulate`` — so this module knows nothing of where data or experiments come from.
"""

from __future__ import annotations

import json
import logging
import os
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
from server.config import RunConfig, privacy_mode
from server.histogram import run_histogram
from server.loop import RunFailed, run_rounds, wait_for_nodes
from server.lora import LoraBase, balance_adapters, initial_adapters, lora_model, prepare_base
from server.privacy import PRIVACY_UNIT, open_ledger, privacy_epsilons, privacy_summary
from server.rundir import RunDir
from server.setup import ServerSetup, TestData
from strategies.budget_guard import LedgerGuard
from strategies.dp_fedavg import CentralDpFedAvg
from strategies.dp_sgd import LocalDpSgd
from strategies.fedavg import make_fedavg
from strategies.feddm import FedDM, make_feddm
from strategies.feddm_dp import FedDMDp
from strategies.label_dp import LabelDpConsensus

logger = logging.getLogger("fedpriv")


def make_strategy(
    cfg: RunConfig, ledger: Ledger | None = None, run_id: str = "", initial: ArrayRecord | None = None,
    num_classes: int = 10, input_shape: tuple[int, ...] | None = None,
) -> Strategy:
    """The strategy named by ``cfg.strategy``, wrapped for ``cfg.dp`` and guarded by the ledger.

    DP is added by wrapping: FedAvg → LocalDpSgd (client DP-SGD), CentralDpFedAvg (Flower's server-side
    fixed clipping) or LabelDpConsensus (label DP); FedDM → FedDMDp; then → LedgerGuard (write-ahead ledger
    records, optional budget). ``input_shape`` (C, S, S) of the images is needed by FedDM's reply check.
    """
    mode = privacy_mode(cfg)
    feddm = _make_feddm(cfg, num_classes, input_shape) if cfg.strategy == "feddm" else None
    if mode is None:
        return feddm or make_fedavg(cfg.num_clients, cfg.fraction_train, cfg.fraction_evaluate,
                                    min_available=cfg.min_available_clients)
    if ledger is None:
        raise ValueError("a differentially private run needs a ledger")
    inner: Strategy
    if mode == "label-dp":
        if initial is None:
            raise ValueError("label-dp needs the initial model (retrain = scratch restarts from it)")
        inner = LabelDpConsensus(
            make_fedavg(cfg.num_clients, cfg.fraction_train, cfg.fraction_evaluate,
                        min_available=cfg.min_available_clients),
            epsilon=cfg.label_epsilon, num_classes=num_classes, mechanism=cfg.label_mechanism,
            stages=cfg.label_stages, num_rounds=cfg.num_rounds, retrain_rounds=cfg.retrain_rounds,
            consensus=cfg.consensus, retrain=cfg.retrain, initial_arrays=initial, holdout=cfg.label_holdout,
        )
    elif mode == "dpsgd":
        inner = LocalDpSgd(
            make_fedavg(cfg.num_clients, cfg.fraction_train, cfg.fraction_evaluate,
                        min_available=cfg.min_available_clients),
            target_epsilon=cfg.target_epsilon, target_delta=cfg.target_delta, num_rounds=cfg.num_rounds,
            clip_norm=cfg.clip_norm, batch_size=cfg.batch_size, local_epochs=cfg.local_epochs,
            noise_multiplier=cfg.noise_multiplier,
        )
    elif mode == "dpfedavg":
        base = make_fedavg(cfg.num_clients, cfg.fraction_train, cfg.fraction_evaluate, weighted_by_key="unit-weight",
                           min_available=cfg.min_available_clients)
        sigma = cfg.noise_multiplier or calibrate_gaussian(
            cfg.target_epsilon, cfg.target_delta, steps=cfg.num_rounds, accountant=cfg.accountant)
        logger.info("dpfedavg: noise multiplier %.4f for ε=%g, δ=%g over %d rounds", sigma, cfg.target_epsilon,
                    cfg.target_delta, cfg.num_rounds)
        inner = CentralDpFedAvg(base, noise_multiplier=sigma, clip_norm=cfg.clip_norm,
                                num_sampled_clients=base.min_train_nodes)
    elif mode == "feddm-dp":
        if feddm is None:
            raise ValueError(f"dp = 'feddm-dp' needs strategy = 'feddm', got {cfg.strategy!r}")
        inner = FedDMDp(feddm, target_epsilon=cfg.target_epsilon, target_delta=cfg.target_delta,
                        num_rounds=cfg.num_rounds, releases=cfg.feddm_dp_releases, clip_norm=cfg.clip_norm,
                        noise_multiplier=cfg.noise_multiplier, accountant=cfg.accountant)
    else:
        raise ValueError(f"dp must be one of none, dpsgd, dpfedavg, feddm-dp, got {cfg.dp!r}")
    policy = None
    if cfg.budget_epsilon > 0:
        policy = BudgetPolicy(cfg.budget_epsilon, cfg.target_delta, PRIVACY_UNIT[mode], cfg.budget_scope,
                              cfg.accountant)
    return LedgerGuard(inner, ledger, run_id, policy)


def _make_feddm(cfg: RunConfig, num_classes: int, input_shape: tuple[int, ...] | None) -> FedDM:
    if input_shape is None:
        raise ValueError("feddm needs the image shape (C, S, S) to check the synthetic sets")
    return make_feddm(
        cfg.num_clients, cfg.fraction_train, cfg.fraction_evaluate, cfg.min_available_clients, model=cfg.model,
        input_shape=input_shape, num_classes=num_classes, max_images=cfg.feddm_max_images,
        server_epochs=cfg.server_epochs, server_lr=cfg.server_lr, server_batch_size=cfg.server_batch_size,
        momentum=cfg.momentum, weight_decay=cfg.weight_decay, seed=cfg.seed,
    )


def make_central_eval(
    cfg: RunConfig, test: TestData, lora: LoraBase | None = None
) -> Callable[[ArrayRecord], tuple[float, float]]:
    """Evaluate an ArrayRecord of the configured model on the held-out test set (for federated LoRA: the
    adapters, on the frozen base)."""
    from models import build_model, evaluate

    if lora is not None:
        from kernels.lora import load_lora_state_dict

        adapted = lora_model(cfg, lora, test)

        def lora_eval(arrays: ArrayRecord) -> tuple[float, float]:
            load_lora_state_dict(adapted, arrays.to_torch_state_dict())
            return evaluate(adapted, test.x, test.y)

        return lora_eval

    model = build_model(cfg.model, image_size=test.x.shape[-1], num_classes=test.num_classes)

    def central_eval(arrays: ArrayRecord) -> tuple[float, float]:
        model.load_state_dict(arrays.to_torch_state_dict())
        return evaluate(model, test.x, test.y)

    return central_eval


def initial_arrays(cfg: RunConfig, test: TestData, lora: LoraBase | None = None) -> ArrayRecord:
    """The seeded initial global model (for federated LoRA: the initial adapters)."""
    from models import build_model

    if lora is not None:
        return initial_adapters(cfg, lora, test)
    model = build_model(cfg.model, image_size=test.x.shape[-1], num_classes=test.num_classes, seed=cfg.seed)
    return ArrayRecord(model.state_dict())


def run_server(grid: Grid, setup: ServerSetup) -> dict[str, Any]:
    """Run the configured federation on ``grid`` and write the run directory; return the summary.

    The summary is written even when the run fails (``stopped_reason`` says why) and the exception is
    re-raised, so callers can exit non-zero.
    """
    cfg, run_dir = setup.config, RunDir(setup.run_dir)
    random.seed(cfg.seed)  # Flower's node sampling uses the `random` module
    lora = None
    if cfg.lora_rank > 0:  # federated LoRA: pretrain the frozen base on the public split; adapters travel
        lora = prepare_base(cfg, setup.public_data, setup.test_data, run_dir.path, setup.resume)
    central_eval = make_central_eval(cfg, setup.test_data, lora)
    ledger, run_id = open_ledger(cfg, run_dir)
    initial = initial_arrays(cfg, setup.test_data, lora)
    strategy = make_strategy(cfg, ledger, run_id, initial, setup.test_data.num_classes,
                             tuple(setup.test_data.x.shape[1:]))
    run_config = cfg.to_dict() | (lora.config_entries() if lora is not None else {})

    def epsilon_so_far(_round: int) -> dict[str, Any]:
        eps = privacy_epsilons(cfg, ledger, run_id) if ledger is not None else {}
        return {"epsilon": max(eps.values(), default=0.0)}

    first_round, arrays = 1, initial
    previous: list[dict[str, Any]] = []
    if setup.resume and (ckpt := run_dir.load_checkpoint()) is not None:
        done, saved, _ = ckpt
        arrays = ArrayRecord(array_dict={k: Array(v) for k, v in saved.items()})
        first_round = done + 1
        # A crash can leave rows after the checkpoint (the row is appended before the checkpoint is saved) or a
        # torn last line: keep exactly the checkpointed rounds, so the file has each round once.
        previous = [r for r in read_metrics_rows(run_dir) if r.get("round", 0) <= done]
        rewrite_metrics(run_dir, previous)
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
            min_available = cfg.min_available_clients or cfg.num_clients
            wait_for_nodes(grid, min_available, cfg.node_wait_timeout)
            _, rows, early = run_rounds(
                grid, strategy, arrays, run_config, num_rounds=cfg.num_rounds, round_timeout=cfg.round_timeout,
                central_eval=central_eval, run_dir=run_dir, reporter=setup.reporter, first_round=first_round,
                round_metrics=epsilon_so_far if ledger is not None else None, min_available=min_available,
                node_wait_timeout=cfg.node_wait_timeout,
                post_aggregate=balance_adapters if lora is not None and cfg.lora_balance else None,
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
        if lora is not None:
            setup.summary["lora"] = lora_summary(lora, all_rows)
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
        "failure_reasons": _sum_reasons(rows, "failure_reasons"),
        "rejected_reasons": _sum_reasons(rows, "rejected_reasons"),
        "wall_s": round(wall_s, 3),
        # Privacy summary per privacy unit; this strategy makes no differentially private release.
        "privacy": {"differentially_private": False, "units": {}},
    }


def lora_summary(lora: LoraBase, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """summary.json's ``lora`` section: the base, the adapter size, and the bytes one client sent per round."""
    replies = sum(r["clients"] for r in rows)
    return {**lora.info, "base_path": str(lora.path),
            "mean_bytes_up_per_client_round": sum(r["bytes_up"] for r in rows) / replies if replies else None}


def _sum_reasons(rows: list[dict[str, Any]], key: str) -> dict[str, int]:
    total: dict[str, int] = {}
    for row in rows:
        for reason, n in row.get(key, {}).items():
            total[reason] = total.get(reason, 0) + int(n)
    return dict(sorted(total.items(), key=lambda kv: (-kv[1], kv[0])))


def read_metrics_rows(run_dir: RunDir) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl``, skipping a line a crash left unfinished."""
    if not run_dir.metrics_path.exists():
        return []
    rows = []
    for line in run_dir.metrics_path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("metrics.jsonl: skipping an unfinished line %r", line[:80])
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def rewrite_metrics(run_dir: RunDir, rows: list[dict[str, Any]]) -> None:
    """Replace ``metrics.jsonl`` with ``rows``, atomically (a crash leaves the old or the new file)."""
    tmp = run_dir.metrics_path.with_name(run_dir.metrics_path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(row) + "\n" for row in rows))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, run_dir.metrics_path)


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
