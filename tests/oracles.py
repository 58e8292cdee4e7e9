"""Independent reference computations the tests compare fedpriv's figures with."""

from __future__ import annotations

import dp_accounting as dpa
from dp_accounting import rdp

from privacy.accounting import RDP_ORDERS


def dpa_rdp_epsilon(*events: dpa.DpEvent, delta: float) -> float:
    """ε at ``delta`` of ``events`` composed by dp-accounting's own RDP accountant on fedpriv's orders."""
    acc = rdp.RdpAccountant(orders=list(RDP_ORDERS))
    for e in events:
        acc.compose(e)
    return acc.get_epsilon(delta)
