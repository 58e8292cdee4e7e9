"""Asking clients who they are: the ``query`` message every client answers with its id and dataset size.

DP strategies need a stable participant name for the ledger (the client id survives across runs, node ids
do not) and, for DP-SGD, the local dataset size to calibrate the noise (dataset sizes are public in DP-SGD's
analysis, and so is the count of labels under label DP).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

logger = logging.getLogger("fedpriv")


@dataclass(frozen=True)
class ClientInfo:
    """What a client reports about itself."""

    client_id: str
    num_examples: int


def query_clients(
    grid: Grid, node_ids: list[int], config: ConfigRecord, known: dict[int, ClientInfo], timeout: float, who: str
) -> None:
    """Fill ``known`` with the :class:`ClientInfo` of every node in ``node_ids`` it does not hold yet.

    A node that fails or answers malformed is logged and left out of ``known`` (callers leave it out of the
    round); it is asked again next time.
    """
    unknown = [n for n in node_ids if n not in known]
    if not unknown:
        return
    query = [Message(content=RecordDict({"config": ConfigRecord(dict(config))}), dst_node_id=n,
                     message_type=MessageType.QUERY) for n in unknown]
    for reply in grid.send_and_receive(query, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error() or "info" not in reply.content.config_records:
            logger.warning("%s: node %d did not report its dataset size; it is left out", who, node)
            continue
        info = reply.content.config_records["info"]
        n, cid = info.get("num-examples"), info.get("client-id")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1 or not isinstance(cid, str) or not cid:
            logger.warning("%s: node %d sent a malformed size reply %r; it is left out", who, node, dict(info))
            continue
        known[node] = ClientInfo(cid, n)
