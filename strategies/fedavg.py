"""FedAvg baseline (McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017, Algorithm 1): the weighted average of client models, weights = local example counts.

This is Flower's own :class:`flwr.serverapp.strategy.FedAvg`; fedpriv only adds the reply check used by the
round loop before aggregation and derives the node minimums from the federation size.
"""

from __future__ import annotations

import math

from flwr.app import ArrayRecord, RecordDict
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from strategies.replies import check_model_update


class FedAvg(FlowerFedAvg):
    """Flower's FedAvg with :meth:`validate_reply` (a malformed update is rejected, not aggregated)."""

    def validate_reply(self, content: RecordDict, global_arrays: ArrayRecord, node_id: int | None = None) -> str | None:
        """Why a training reply (from ``node_id``) must be rejected, or None."""
        return check_model_update(content, global_arrays, self.weighted_by_key)


def make_fedavg(
    num_clients: int, fraction_train: float = 1.0, fraction_evaluate: float = 0.0,
    weighted_by_key: str = "num-examples", min_available: int = 0,
) -> FedAvg:
    """FedAvg sampling ``fraction_train`` of the connected nodes, waiting until ``min_available`` (0: all
    ``num_clients``) have connected.

    ``weighted_by_key="unit-weight"`` averages with equal weights (what central DP's sensitivity needs). With
    ``min_available`` below ``num_clients`` a round goes on without nodes that were lost (crashed devices);
    the number sampled is at least ``fraction_train`` of ``min_available``.
    """
    available = min_available or num_clients
    return FedAvg(
        weighted_by_key=weighted_by_key,
        fraction_train=fraction_train,
        fraction_evaluate=fraction_evaluate,
        min_train_nodes=max(1, math.ceil(fraction_train * available)),
        min_evaluate_nodes=max(1, math.ceil(fraction_evaluate * available)) if fraction_evaluate else 0,
        min_available_nodes=available,
    )
