"""The ledger guard: a strategy wrapper that writes every release of the wrapped (DP) strategy to the privacy
ledger *before* the round's messages leave the server, and enforces a budget.

Before each training round it asks the wrapped strategy for its :class:`~strategies.releases.PlannedRelease`
list. With a :class:`~privacy.budget.BudgetPolicy`, a client whose release would exceed the budget is left out
of the round; when nobody is left (or a central release would exceed it) the round is not configured and
:attr:`stop_reason` says why, so the run stops cleanly. The remaining releases are inserted as ``pending``
(committed) and the messages returned; when a client's reply arrives its rows are marked ``released``, and a
central release is marked after aggregation. Rows of a client that never replied stay pending (charged).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from privacy.budget import BudgetPolicy
from privacy.ledger import Ledger
from strategies.releases import PlannedRelease
from strategies.wrapper import StrategyWrapper

logger = logging.getLogger("fedpriv")


class LedgerGuard(StrategyWrapper):
    """Records the wrapped strategy's releases write-ahead and refuses releases beyond ``policy``."""

    def __init__(self, strategy: Strategy, ledger: Ledger, run_id: str, policy: BudgetPolicy | None = None) -> None:
        if not hasattr(strategy, "release_plan"):
            raise TypeError(f"{type(strategy).__name__} declares no release_plan; only DP strategies need a guard")
        super().__init__(strategy)
        self.ledger, self.run_id, self.policy = ledger, run_id, policy
        self.stop_reason: str | None = None
        self.excluded: list[dict[str, Any]] = []  # who was left out, when and why
        self._client_handles: dict[int, list[Any]] = {}
        self._central_handles: list[Any] = []

    def _allowed(self, release: PlannedRelease) -> tuple[bool, str]:
        if self.policy is None or release.unit != self.policy.unit:
            return True, ""
        for participant in release.participants:
            decision = self.policy.check(self.ledger, participant, release.event, self.run_id)
            if not decision.allowed:
                return False, decision.reason
        return True, ""

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        plan: list[PlannedRelease] = self.strategy.release_plan(server_round, messages)
        central = [p for p in plan if p.node_id is None]
        for release in central:
            ok, why = self._allowed(release)
            if not ok:
                self.stop_reason = f"privacy budget exhausted before round {server_round}: {why}"
                return []
        per_node: dict[int, list[PlannedRelease]] = {}
        for p in plan:
            if p.node_id is not None:
                per_node.setdefault(p.node_id, []).append(p)
        kept = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            verdicts = [self._allowed(p) for p in per_node.get(node, [])]
            refused = [why for ok, why in verdicts if not ok]
            if refused:
                self.excluded.append({"round": server_round, "node": node, "reason": refused[0]})
                logger.info("budget: leaving out node %d in round %d: %s", node, server_round, refused[0])
                continue
            kept.append(msg)
        if messages and not kept:
            self.stop_reason = (f"privacy budget exhausted before round {server_round}: every sampled client "
                                f"would exceed it ({self.excluded[-1]['reason']})")
            return []
        # Write-ahead: pending rows are committed before any message is returned for sending.
        self._client_handles = {}
        for msg in kept:
            node = msg.metadata.dst_node_id
            self._client_handles[node] = [
                self.ledger.begin_release(self.run_id, server_round, p.participants, p.unit, p.event, p.mechanism)
                for p in per_node.get(node, [])
            ]
        self._central_handles = [
            self.ledger.begin_release(self.run_id, server_round, p.participants, p.unit, p.event, p.mechanism)
            for p in central
        ]
        return kept

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for reply in replies:  # the client has released its update: it is here
            for handle in self._client_handles.pop(reply.metadata.src_node_id, []):
                self.ledger.mark_released(handle)
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is not None:
            for handle in self._central_handles:
                self.ledger.mark_released(handle)
        self._central_handles = []
        return arrays, metrics
