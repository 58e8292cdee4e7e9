"""A Flower :class:`~flwr.serverapp.Grid` that runs the real ClientApp in this process, one message at a time.

For benchmarks and tests on small machines: the strategies, the round loop and the ClientApp are the same code
that ``fedpriv simulate`` runs through Flower's simulation engine (Ray workers); only the transport differs.
Each message's content is serialized to Flower's protobuf and parsed back on the way to the client and on the
way back, as a real transport would, so nothing is shared between server and client objects, and a client
exception becomes an error reply like Flower's. Every node keeps its own :class:`~flwr.app.Context` (node
config ``partition-id`` / ``num-partitions``, and ``state`` across rounds), and the seconds each client call
took are recorded in :attr:`InProcessGrid.client_seconds`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from client.app import build_client_app
from client.data import ClientData
from server.app import run_server
from server.config import RunConfig
from server.rundir import RunDir
from server.setup import ServerSetup, TestData

CLIENT_EXCEPTION = 1  # error code of a reply whose ClientApp raised


def _copy(content: RecordDict) -> RecordDict:
    """The content as the receiver would see it after Flower's protobuf serialization."""
    return recorddict_from_proto(recorddict_to_proto(content))


class InProcessGrid(Grid):
    """Nodes 1..N run ``client_app`` synchronously when messages are pushed; replies wait to be pulled.

    Parameters
    ----------
    client_app : ClientApp
        The app every node runs (its data source reads ``partition-id`` from the node config).
    num_nodes : int
        N, the number of nodes (partition ids 0..N−1).
    """

    def __init__(self, client_app: ClientApp, num_nodes: int) -> None:
        self.client_app = client_app
        self.node_ids = list(range(1, num_nodes + 1))
        self.contexts = {
            node: Context(run_id=0, node_id=node, node_config={"partition-id": node - 1, "num-partitions": num_nodes},
                          state=RecordDict(), run_config={})
            for node in self.node_ids
        }
        self.client_seconds: list[tuple[str, int, float]] = []  # (message type, node, seconds) per client call
        self._replies: dict[str, Message] = {}
        self._run = Run.create_empty(0)
        # The identity Flower gives the ServerApp's process (messages created here are stamped with it).
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 0, SUPERLINK_NODE_ID

    # -- Grid --------------------------------------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            if msg.metadata.dst_node_id not in self.contexts:
                raise ValueError(f"no node {msg.metadata.dst_node_id} in this grid")
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            ids.append(msg.metadata.message_id)
            self._replies[msg.metadata.message_id] = self._deliver(msg)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    # -- the client side ------------------------------------------------------------------------------------------
    def _deliver(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        received = Message(content=_copy(msg.content), metadata=copy.deepcopy(msg.metadata))
        t0 = time.perf_counter()
        try:
            reply = self.client_app(received, self.contexts[node])
        except Exception as exc:  # a client failure is a reply with an error, as in Flower's engines
            reply = Message(Error(CLIENT_EXCEPTION, f"{type(exc).__name__}: {exc}"), reply_to=received)
        self.client_seconds.append((msg.metadata.message_type, node, time.perf_counter() - t0))
        if reply.has_content():
            reply = Message(content=_copy(reply.content), metadata=reply.metadata)
        return reply


def run_in_process(
    cfg: RunConfig, clients: list[ClientData], test: TestData, run_dir: str | Path, public: TestData | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]], InProcessGrid]:
    """Run ``cfg`` through the real ServerApp logic (:func:`server.app.run_server`: strategy, DP wrappers, ledger,
    round loop, run directory) and the real ClientApp, node i holding ``clients[i]``; ``public`` is the server's
    public split (federated LoRA pretrains its base on it).

    Returns the summary, the metrics rows and the grid (for its client timings).
    """
    if len(clients) != cfg.num_clients:
        raise ValueError(f"num-clients={cfg.num_clients} but {len(clients)} client data sets were given")
    grid = InProcessGrid(build_client_app(lambda ctx, _cfg: clients[int(ctx.node_config["partition-id"])]),
                         cfg.num_clients)
    setup = ServerSetup(config=cfg, test_data=test, run_dir=Path(run_dir), public_data=public)
    summary = run_server(grid, setup)
    return summary, RunDir(run_dir).read_metrics(), grid
