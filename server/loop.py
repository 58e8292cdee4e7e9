"""The round loop: configure → send → collect (with progress) → validate → aggregate → evaluate → record.

It drives any Flower message-API :class:`~flwr.serverapp.strategy.Strategy` (its ``configure_train`` /
``aggregate_train`` / ``configure_evaluate`` / ``aggregate_evaluate``), like ``Strategy.start`` does, and adds
what fedpriv needs around each round: bytes measured from the serialized message contents, replies checked
before aggregation (a malformed one is rejected with a logged reason, never crashes the round), a metrics
row, a checkpoint, and progress events.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from server.progress import Reporter
from server.rundir import RunDir

logger = logging.getLogger("fedpriv")

CentralEval = Callable[[ArrayRecord], tuple[float, float]]  # arrays -> (loss, accuracy)
ReplyCheck = Callable[[RecordDict, ArrayRecord, int], "str | None"]  # (content, global, node) -> why


ROW_SKIP = ("num-examples", "unit-weight", "dp-steps", "dp-client-epsilon")  # averaged bookkeeping, not metrics


class RunFailed(RuntimeError):
    """The run cannot go on (e.g. no client succeeded in a round); the message says why."""


def payload_bytes(content: RecordDict) -> int:
    """Size of a message's content as Flower serializes it (protobuf)."""
    return recorddict_to_proto(content).ByteSize()


def contents_bytes(contents: Iterable[RecordDict]) -> int:
    """Total payload of message contents; a content shared by several messages is serialized once."""
    sizes: dict[int, int] = {}
    total = 0
    for content in contents:
        if id(content) not in sizes:
            sizes[id(content)] = payload_bytes(content)
        total += sizes[id(content)]
    return total


@dataclass
class RoundReplies:
    """Replies of one round, sorted into usable and unusable."""

    ok: list[Message] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # client-side errors and timeouts
    rejected: list[str] = field(default_factory=list)  # malformed replies
    bytes_up: int = 0


def collect_replies(
    grid: Grid, messages: list[Message], timeout: float, on_reply: Callable[[], None] | None = None
) -> tuple[list[Message], int]:
    """Push ``messages`` and pull replies until all arrived or ``timeout`` passed.

    Returns the replies and the number of messages that got none.
    """
    pending = set(grid.push_messages(messages))
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        got = list(grid.pull_messages(pending))
        for msg in got:
            pending.discard(msg.metadata.reply_to_message_id)
            replies.append(msg)
            if on_reply is not None:
                on_reply()
        if pending and not got:
            time.sleep(0.05)
    return replies, len(pending)


def sort_replies(
    replies: Iterable[Message], missing: int, check: ReplyCheck | None, global_arrays: ArrayRecord, phase: str
) -> RoundReplies:
    """Split replies into usable ones, client errors/timeouts, and rejected (malformed) ones; log reasons."""
    out = RoundReplies()
    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.has_error():
            out.errors.append(f"node {node}: {msg.error.reason}")
            continue
        out.bytes_up += payload_bytes(msg.content)
        reason = check(msg.content, global_arrays, node) if check is not None else None
        if reason is not None:
            out.rejected.append(f"node {node}: {reason}")
            continue
        out.ok.append(msg)
    out.errors.extend(["no reply before the round timeout"] * missing)
    for line in out.errors:
        logger.warning("%s: client failure: %s", phase, line)
    for line in out.rejected:
        logger.warning("%s: rejected reply: %s", phase, line)
    return out


def wait_for_nodes(grid: Grid, num_nodes: int, timeout: float) -> list[int]:
    """Wait until ``num_nodes`` nodes are connected (``grid.get_node_ids()`` may be empty at first).

    Raises
    ------
    RunFailed
        When fewer than ``num_nodes`` connected within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= num_nodes:
            return nodes
        if time.monotonic() >= deadline:
            raise RunFailed(
                f"only {len(nodes)} of num-clients={num_nodes} nodes connected within {timeout:g}s: lower "
                "num-clients or start more SuperNodes (flwr run: --federation-config 'num-supernodes=N')"
            )
        time.sleep(0.2)


def run_rounds(
    grid: Grid,
    strategy: Strategy,
    arrays: ArrayRecord,
    run_config: dict[str, Any],
    *,
    num_rounds: int,
    round_timeout: float,
    central_eval: CentralEval,
    run_dir: RunDir,
    reporter: Reporter,
    first_round: int = 1,
    round_metrics: Callable[[int], dict[str, Any]] | None = None,
) -> tuple[ArrayRecord, list[dict[str, Any]], str | None]:
    """Run rounds ``first_round..num_rounds``; return the final arrays, the metrics rows written, and why the
    run stopped early (a strategy that configures no round and says ``stop_reason``, e.g. a privacy budget),
    or None. ``round_metrics(round)`` adds keys to each round's row (e.g. ε so far).

    Raises
    ------
    RunFailed
        When a round sent work to clients and none of them returned a usable reply.
    """
    check: ReplyCheck | None = getattr(strategy, "validate_reply", None)
    rows: list[dict[str, Any]] = []
    reporter.start(num_rounds, first_round)
    for server_round in range(first_round, num_rounds + 1):
        t0 = time.perf_counter()
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(run_config), grid))
        if not messages and (reason := getattr(strategy, "stop_reason", None)):
            logger.info("stopping before round %d: %s", server_round, reason)
            return arrays, rows, reason
        reporter.round_start(server_round, len(messages))
        bytes_down = contents_bytes(m.content for m in messages)
        replies, missing = collect_replies(
            grid, messages, round_timeout, on_reply=lambda r=server_round: reporter.client_done(r)
        )
        train = sort_replies(replies, missing, check, arrays, "train")
        if messages and not train.ok:
            first = (train.errors + train.rejected + ["unknown"])[0]
            raise RunFailed(f"round {server_round}: no client returned a usable update ({first})")
        new_arrays, train_metrics = strategy.aggregate_train(server_round, train.ok)
        if new_arrays is not None:
            arrays = new_arrays

        row: dict[str, Any] = {"round": server_round}
        eval_messages = list(strategy.configure_evaluate(server_round, arrays, ConfigRecord(run_config), grid))
        if eval_messages:
            bytes_down += contents_bytes(m.content for m in eval_messages)
            ev_replies, ev_missing = collect_replies(grid, eval_messages, round_timeout)
            evaluation = sort_replies(ev_replies, ev_missing, None, arrays, "evaluate")
            train.bytes_up += evaluation.bytes_up
            fed_metrics = strategy.aggregate_evaluate(server_round, evaluation.ok)
            if fed_metrics is not None:
                row.update({f"federated_{k.replace('-', '_')}": v for k, v in fed_metrics.items()})

        loss, acc = central_eval(arrays)
        row.update({
            "test_accuracy": acc,
            "test_loss": loss,
            "bytes_up": train.bytes_up,
            "bytes_down": bytes_down,
            "clients": len(train.ok),
            "failures": len(train.errors),
            "rejected": len(train.rejected),
            "wall_s": round(time.perf_counter() - t0, 4),
        })
        if train_metrics is not None:  # scalar training metrics; example counts are not averages worth keeping
            row.update({k.replace("-", "_"): v for k, v in train_metrics.items()
                        if k not in ROW_SKIP and isinstance(v, (int, float))})
        if round_metrics is not None:
            row.update(round_metrics(server_round))
        run_dir.append_metrics(row)
        run_dir.save_checkpoint(server_round, {k: a.numpy() for k, a in arrays.items()}, {})
        rows.append(row)
        reporter.round_end(row)
    return arrays, rows, None
