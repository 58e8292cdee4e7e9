"""Central user-level DP-FedAvg (McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent
Language Models", ICLR 2018, Alg. 1 with fixed clipping) using Flower's own
:class:`~flwr.serverapp.strategy.DifferentialPrivacyServerSideFixedClipping`.

Each round the server clips every client's update to ℓ2 norm C, averages the m sampled updates with equal
weights, and adds N(0, (σ·C/m)²): a Gaussian mechanism with noise multiplier σ on the sum, with respect to
adding or removing one client's whole data (privacy unit ``user``, charged to ``all``). Flower samples a
fixed number of clients without replacement; dp-accounting has no amplification result for that sampling under
add-or-remove adjacency (Flower's own accountant also requires ``no-amplification``), so each round is charged
as an unamplified Gaussian — an upper bound. A round that gets fewer usable replies than it sampled is not
aggregated (the noise was calibrated for m), and its pending charge stays on the ledger.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import dp_accounting as dpa
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

from strategies.fedavg import FedAvg as FedAvgWithChecks
from strategies.releases import PlannedRelease
from strategies.wrapper import StrategyWrapper

logger = logging.getLogger("fedpriv")
EVERYONE = "all"


class CentralDpFedAvg(StrategyWrapper):
    """Flower's server-side fixed-clipping DP wrapper around an equal-weight FedAvg, with declared releases."""

    def __init__(
        self, strategy: FedAvgWithChecks, *, noise_multiplier: float, clip_norm: float, num_sampled_clients: int
    ) -> None:
        super().__init__(DifferentialPrivacyServerSideFixedClipping(
            strategy, noise_multiplier=noise_multiplier, clipping_norm=clip_norm,
            num_sampled_clients=num_sampled_clients,
        ))
        self.fedavg = strategy
        self.noise_multiplier = noise_multiplier
        self.num_sampled_clients = num_sampled_clients

    def release_plan(self, server_round: int, messages: Iterable[Message]) -> list[PlannedRelease]:
        """One central release per round that sends work: the noised average."""
        if not list(messages):
            return []
        return [PlannedRelease(None, (EVERYONE,), "user", dpa.GaussianDpEvent(self.noise_multiplier), "dpfedavg")]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = [r for r in replies if not r.has_error()]
        if len(replies) < self.num_sampled_clients:
            logger.warning("dpfedavg: round %d got %d of %d updates; not aggregated (noise is calibrated for %d)",
                           server_round, len(replies), self.num_sampled_clients, self.num_sampled_clients)
            return None, None
        return self.strategy.aggregate_train(server_round, replies)

    def validate_reply(self, content: RecordDict, global_arrays: ArrayRecord, node_id: int | None = None) -> str | None:
        """FedAvg's update check (Flower's DP wrapper has none), and the equal weight the noise is calibrated for:
        ``unit-weight`` must be 1 (a larger weight would let one client outweigh the others)."""
        reason = self.fedavg.validate_reply(content, global_arrays, node_id)
        if reason is not None:
            return reason
        weight = next(iter(content.metric_records.values())).get(self.fedavg.weighted_by_key)
        if self.fedavg.weighted_by_key == "unit-weight" and weight != 1:
            return f"metric 'unit-weight': expected 1 (equal weights), got {weight!r}"
        return None
