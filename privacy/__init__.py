"""Differential-privacy core: mechanisms, accounting, the persistent ledger, budgets and reports.

Framework-free on purpose: this package imports only the standard library, numpy and dp-accounting, so the
numbers it reports can be audited and recomputed without Flower or torch.
"""

from privacy.accounting import epsilon, event_from_json, event_to_json
from privacy.budget import BudgetDecision, BudgetPolicy
from privacy.ledger import Ledger, LedgerError, Release, ReleaseHandle
from privacy.mechanisms import (
    GaussianMechanism,
    LaplaceMechanism,
    RandomizedResponse,
    RRWithPrior,
    calibrate_gaussian,
    composed,
    poisson_sampled,
    pure_dp_event,
    self_composed,
)

__all__ = [
    "BudgetDecision",
    "BudgetPolicy",
    "GaussianMechanism",
    "LaplaceMechanism",
    "Ledger",
    "LedgerError",
    "RRWithPrior",
    "RandomizedResponse",
    "Release",
    "ReleaseHandle",
    "calibrate_gaussian",
    "composed",
    "epsilon",
    "event_from_json",
    "event_to_json",
    "poisson_sampled",
    "pure_dp_event",
    "self_composed",
]
