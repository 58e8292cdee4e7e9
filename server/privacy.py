"""The run's privacy bookkeeping: which mode makes it private, its ledger, and the privacy part of summary.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from privacy.ledger import Ledger
from server.config import RunConfig, privacy_mode
from server.rundir import RunDir

PRIVACY_UNIT = {"dpsgd": "example", "dpfedavg": "user", "label-dp": "label", "histogram": "user",
                "feddm-dp": "example"}


def open_ledger(cfg: RunConfig, run_dir: RunDir) -> tuple[Ledger | None, str]:
    """The run's ledger (its own file, or the shared one named by ``ledger``) with this run registered."""
    if privacy_mode(cfg) is None:
        return None, run_dir.path.name
    ledger = Ledger(Path(cfg.ledger) if cfg.ledger else run_dir.path / "ledger.sqlite")
    run_id = run_dir.path.resolve().name
    ledger.register_run(run_id, cfg.experiment, cfg.to_dict())
    return ledger, run_id


def privacy_epsilons(cfg: RunConfig, ledger: Ledger, run_id: str) -> dict[str, float]:
    """ε at target-delta of every participant charged in this run (pending releases included)."""
    unit = PRIVACY_UNIT[str(privacy_mode(cfg))]
    return {p: ledger.spent_epsilon(p, unit, cfg.target_delta, cfg.accountant, run_id=run_id)
            for p, u in ledger.participants(run_id=run_id) if u == unit}


def privacy_summary(cfg: RunConfig, ledger: Ledger, run_id: str, excluded: list[Any] | None = None) -> dict[str, Any]:
    """The privacy part of summary.json, computed from the ledger (pending releases counted as spent)."""
    eps = privacy_epsilons(cfg, ledger, run_id)
    mode = str(privacy_mode(cfg))
    unit = PRIVACY_UNIT[mode]
    mechanism = {"label-dp": cfg.label_mechanism, "histogram": cfg.histogram_method}.get(mode, mode)
    return {
        "differentially_private": True,
        "mechanism": mechanism,
        "unit": unit,
        "delta": cfg.target_delta,
        "accountant": cfg.accountant,
        "target_epsilon": cfg.label_epsilon if mode == "label-dp" else cfg.target_epsilon,
        "epsilon": max(eps.values(), default=0.0),
        "epsilon_by_participant": eps,
        "epsilon_all_runs_max": max((ledger.spent_epsilon(p, unit, cfg.target_delta, cfg.accountant)
                                     for p in eps), default=0.0),
        "budget_epsilon": cfg.budget_epsilon or None,
        "excluded": excluded or [],
        "ledger": str(ledger.path),
        "run_id": run_id,
    }
