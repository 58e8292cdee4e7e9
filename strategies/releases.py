"""What a DP strategy wrapper declares about the releases a round will make (for the ledger and budgets)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import dp_accounting as dpa
from flwr.app import Message


@dataclass(frozen=True)
class PlannedRelease:
    """A release the round will make.

    ``node_id`` is the node whose message carries it (a client-side mechanism), or None for a release the
    server makes itself when it aggregates (a central mechanism).
    """

    node_id: int | None
    participants: tuple[str, ...]
    unit: str  # example | label | user
    event: dpa.DpEvent
    mechanism: str  # short name shown by `fedpriv audit`


def planned_for(plans: Mapping[int, PlannedRelease], messages: Iterable[Message]) -> list[PlannedRelease]:
    """The planned client-side releases that ``messages`` carry (``plans`` keyed by destination node)."""
    return [plans[m.metadata.dst_node_id] for m in messages if m.metadata.dst_node_id in plans]
