"""Client side of user-level DP histograms: the clipped local contribution of this node's users.

The server's query message names the phase's statistic (:class:`privacy.histogram.HistogramQuery`): each
user's empirical frequencies (``frequency``), or each user's counts clipped to the server's per-item interval
around its coarse estimate, divided by m (``clipped``, intervals in the ``interval`` ArrayRecord). The node
replies the sum over its users and how many users it summed; the server adds the noise (central DP with a
trusted aggregator, as in Liu et al. 2020). A node may hold one user (cross-device) or many (cross-silo).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from client.data import ClientData
from privacy.histogram import HistogramQuery


def query_from_message(content: RecordDict, cfg: Mapping[str, Any]) -> HistogramQuery:
    """The phase's statistic as the server described it."""
    kind, k = str(cfg["histogram-kind"]), int(cfg["num-items"])
    if kind == "frequency":
        return HistogramQuery("frequency", k)
    interval = content.array_records["interval"]
    return HistogramQuery("clipped", k, int(cfg["samples-per-user"]), interval["lower"].numpy(),
                          interval["upper"].numpy())


def histogram_report(content: RecordDict, cfg: Mapping[str, Any], data: ClientData) -> RecordDict:
    """Sum of this node's users' statistics (``data.x``: users × k counts) and its user count."""
    query = query_from_message(content, cfg)
    total = query.contribution(np.asarray(data.x))
    return RecordDict({"histogram": ArrayRecord({"sum": Array(total)}),
                       "metrics": MetricRecord({"num-users": int(np.asarray(data.x).shape[0])})})
