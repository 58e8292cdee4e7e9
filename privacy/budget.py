"""Privacy budgets: a policy (ε, δ per privacy unit) checked against the ledger before each release.

The check composes the participant's recorded releases (pending ones included) with the *next* release and
refuses it if the result would exceed the budget, so a guarded run never records a release beyond its budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import dp_accounting as dpa

from privacy.accounting import ACCOUNTANTS, epsilon
from privacy.ledger import UNITS, Ledger


@dataclass(frozen=True)
class BudgetDecision:
    """Outcome of :meth:`BudgetPolicy.check`."""

    allowed: bool
    spent: float  # ε already charged
    would_spend: float  # ε with the next release
    remaining: float  # budget − spent (may be negative only if the ledger already exceeded it)
    reason: str


@dataclass(frozen=True)
class BudgetPolicy:
    """At most ``epsilon`` at ``delta`` per participant of ``unit``; ``scope`` is this run or the whole ledger."""

    epsilon: float
    delta: float
    unit: str
    scope: str = "ledger"
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        if not (isinstance(self.epsilon, (int, float)) and math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ValueError(f"budget epsilon must be a finite number > 0, got {self.epsilon!r}")
        if not (isinstance(self.delta, (int, float)) and 0.0 < self.delta < 1.0):
            raise ValueError(f"budget delta must be in (0, 1), got {self.delta!r}")
        if self.unit not in UNITS:
            raise ValueError(f"budget unit must be one of {', '.join(UNITS)}, got {self.unit!r}")
        if self.scope not in ("run", "ledger"):
            raise ValueError(f"budget scope must be 'run' or 'ledger', got {self.scope!r}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"budget accountant must be one of {', '.join(ACCOUNTANTS)}, got {self.accountant!r}")

    def check(self, ledger: Ledger, participant: str, next_event: dpa.DpEvent, run_id: str) -> BudgetDecision:
        """Would charging ``next_event`` to ``participant`` keep it within the budget?"""
        rows = ledger.charged_rows(participant, self.unit, run_id if self.scope == "run" else None)
        events = [r.event for r in rows]
        spent = epsilon(events, self.delta, self.accountant) if events else 0.0
        would = epsilon([*events, next_event], self.delta, self.accountant)
        allowed = would <= self.epsilon
        reason = (f"{participant}: ε would be {would:.4g} ≤ budget {self.epsilon:g}" if allowed else
                  f"{participant}: next release would bring ε to {would:.4g} > budget {self.epsilon:g} "
                  f"(spent {spent:.4g}, δ={self.delta:g}, unit {self.unit})")
        return BudgetDecision(allowed, spent, would, self.epsilon - spent, reason)
