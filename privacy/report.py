"""Privacy reports built from the ledger alone: per run, per unit, per participant ε(δ) and its history."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from privacy.ledger import Ledger


def _num(x: float) -> float | None:
    return None if math.isinf(x) or math.isnan(x) else x


def build_report(
    ledger: Ledger, delta: float, budget_epsilon: float | None = None, accountant: str = "rdp",
    run_id: str | None = None,
) -> dict[str, Any]:
    """A JSON-able report: for each run (or only ``run_id``) and privacy unit, each participant's ε at ``delta``
    in that run and across the whole ledger, its releases (pending counted as spent), rounds, mechanisms,
    remaining budget and ε after each round."""
    runs = [r for r in ledger.runs() if run_id is None or r["run_id"] == run_id]
    out: dict[str, Any] = {"ledger": str(ledger.path), "delta": delta, "accountant": accountant,
                           "budget_epsilon": budget_epsilon, "runs": []}
    for run in runs:
        units: dict[str, list[dict[str, Any]]] = {}
        for participant, unit in ledger.participants(run_id=run["run_id"]):
            rows = ledger.charged_rows(participant, unit, run["run_id"])
            eps_run = ledger.spent_epsilon(participant, unit, delta, accountant, run["run_id"])
            eps_all = ledger.spent_epsilon(participant, unit, delta, accountant)
            entry = {
                "participant": participant,
                "epsilon": _num(eps_run),
                "epsilon_all_runs": _num(eps_all),
                "releases": len(rows),
                "pending": sum(r.status == "pending" for r in rows),
                "rounds": sorted({r.round for r in rows}),
                "mechanisms": dict(Counter(r.mechanism for r in rows)),
                "epsilon_by_round": [[rnd, _num(e)] for rnd, e in
                                     ledger.epsilon_by_round(participant, unit, delta, run["run_id"], accountant)],
            }
            if budget_epsilon is not None:
                entry["remaining"] = _num(budget_epsilon - eps_all)
            units.setdefault(unit, []).append(entry)
        out["runs"].append({"run_id": run["run_id"], "experiment": run["experiment"],
                            "created_at": run["created_at"], "units": units})
    return out
