"""Run a federated simulation in-process with Flower's simulation engine, and stop everything it started."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

from flwr.clientapp import ClientApp

from server.app import build_server_app
from server.config import RunConfig
from server.progress import LogReporter, Reporter


def flower_environment(home: str | Path | None = None) -> None:
    """Environment Flower needs here: no telemetry, a project-local FLWR_HOME, no runtime installs."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("FLWR_HOME", str(Path(home or ".flwr").resolve()))
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def simulate(
    cfg: RunConfig,
    run_dir: str | Path,
    *,
    reporter: Reporter | None = None,
    resume: bool = False,
    verbose: bool = False,
    client_app: ClientApp | None = None,
) -> dict[str, Any]:
    """Run ``cfg`` as a Flower simulation of ``cfg.num_clients`` SuperNodes; return ``summary.json``'s content.

    ``client_app`` replaces the standard simulated client (fault injection, tests). Raises whatever stopped
    the run (after the run directory has been written); Flower's simulation engine and its Ray workers are
    shut down in every case.
    """
    flower_environment()
    from flwr.simulation import run_simulation

    from simulations.apps import client_app as default_client_app
    from simulations.apps import server_setup

    setup = server_setup(cfg, Path(run_dir), reporter=reporter or LogReporter(), resume=resume)
    server_app = build_server_app(lambda _grid, _context: setup)
    cpus = os.cpu_count() or 1
    backend_config = {
        "client_resources": {"num_cpus": min(cfg.client_cpus, cpus), "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "include_dashboard": False, "log_to_driver": verbose},
    }
    if not verbose:  # client failures still reach the fedpriv log, with their reasons
        logging.getLogger("flwr").setLevel(logging.ERROR)
        logging.getLogger("flwr").propagate = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            run_simulation(
                server_app=server_app, client_app=client_app or default_client_app,
                num_supernodes=cfg.num_clients, backend_config=backend_config, verbose_logging=verbose,
            )
        finally:
            _shutdown_ray()
    if not setup.summary:
        raise RuntimeError("the simulation ended without running the ServerApp (see the log above)")
    return setup.summary


def _shutdown_ray() -> None:
    try:
        import ray
    except ImportError:  # pragma: no cover - ray comes with flwr[simulation]
        return
    if ray.is_initialized():
        ray.shutdown()
