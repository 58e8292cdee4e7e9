"""The round loop: configure → send → collect (with progress) → validate → aggregate → evaluate → record.

It drives any Flower message-API :class:`~flwr.serverapp.strategy.Strategy` (its ``configure_train`` /
``aggregate_train`` / ``configure_evaluate`` / ``aggregate_evaluate``), like ``Strategy.start`` does, and adds
what fedpriv needs around each round: bytes measured from the serialized message contents, replies checked
before aggregation (a malformed one is rejected with a logged reason, never crashes the round), a metrics
row, a checkpoint, and progress events.
"""

from __future__ import annotations

import logging
import re
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
from strategies.replies import check_payload, describe_schema_difference, reply_schema

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
    error_reasons: list[str] = field(default_factory=list)  # the same, without the node id (for counting)
    rejected_reasons: list[str] = field(default_factory=list)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def short_reason(reason: str, limit: int = 200) -> str:
    """A client error's gist for counting: the exception message Flower wraps (``... Message: <text>``), else the
    first line, without terminal colours, at most ``limit`` characters (worker ids and tracebacks vary)."""
    text = _ANSI.sub("", reason).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    wrapped = [ln.split("Message:", 1)[1].strip(" '>") for ln in lines if "Message:" in ln]
    line = (wrapped[-1] if wrapped and wrapped[-1] else lines[0]) if lines else "error without a reason"
    return line if len(line) <= limit else line[: limit - 1] + "…"


def count_reasons(reasons: Iterable[str]) -> dict[str, int]:
    """``{reason: how many}``, most frequent first (a round's ``rejected_reasons`` / ``failure_reasons``)."""
    counts: dict[str, int] = {}
    for reason in reasons:
        counts[reason] = counts.get(reason, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


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


def check_reply(
    content: RecordDict, check: ReplyCheck | None, global_arrays: ArrayRecord, node: int,
    list_metrics: frozenset[str] = frozenset(),
) -> str | None:
    """Why one reply must be rejected, or None: :func:`~strategies.replies.check_payload`, then ``check`` (the
    strategy's ``validate_reply``). Never raises: a check that trips over a reply has found a malformed one."""
    try:
        reason = check_payload(content, list_metrics)
        if reason is None and check is not None:
            reason = check(content, global_arrays, node)
    except Exception as exc:
        reason = f"reply could not be checked: {type(exc).__name__}: {exc}"
    return reason


def sort_replies(
    replies: Iterable[Message], missing: int, check: ReplyCheck | None, global_arrays: ArrayRecord, phase: str,
    list_metrics: Iterable[str] = (), consistent: bool = False,
) -> RoundReplies:
    """Split replies into usable ones, client errors/timeouts, and rejected (malformed) ones; log reasons.

    This is where client replies are decoded (see :mod:`strategies.replies`): every reply passes
    :func:`~strategies.replies.check_payload` (arrays decode to what they declare, finite values, numeric
    metrics; lists only for ``list_metrics``), then ``check`` (the strategy's ``validate_reply``); with
    ``consistent`` the usable replies must also share one :func:`~strategies.replies.reply_schema` (the
    majority's; ties go to the earliest reply), as Flower's aggregation requires. Nothing here raises on a
    malformed reply.
    """
    out = RoundReplies()
    allowed = frozenset(list_metrics)
    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.has_error():
            out.errors.append(f"node {node}: {msg.error.reason}")
            out.error_reasons.append(short_reason(str(msg.error.reason)))
            continue
        try:
            out.bytes_up += payload_bytes(msg.content)
            reason = check_reply(msg.content, check, global_arrays, node, allowed)
        except Exception as exc:  # e.g. values a protobuf cannot hold: it cannot have come over the wire
            reason = f"reply does not serialize: {type(exc).__name__}: {exc}"
        if reason is not None:
            out.rejected.append(f"node {node}: {reason}")
            out.rejected_reasons.append(reason)
            continue
        out.ok.append(msg)
    if consistent and len(out.ok) > 1:
        schemas = [reply_schema(m.content) for m in out.ok]
        majority = max(schemas, key=lambda sc: (schemas.count(sc), -schemas.index(sc)))
        kept = []
        for msg, schema in zip(out.ok, schemas, strict=True):
            if schema == majority:
                kept.append(msg)
                continue
            reason = describe_schema_difference(schema, majority)
            out.rejected.append(f"node {msg.metadata.src_node_id}: {reason}")
            out.rejected_reasons.append(reason)
        out.ok = kept
    out.errors.extend(["no reply before the round timeout"] * missing)
    out.error_reasons.extend(["no reply before the round timeout"] * missing)
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
    min_available: int = 0,
    node_wait_timeout: float = 120.0,
    post_aggregate: Callable[[ArrayRecord], ArrayRecord] | None = None,
) -> tuple[ArrayRecord, list[dict[str, Any]], str | None]:
    """Run rounds ``first_round..num_rounds``; return the final arrays, the metrics rows written, and why the
    run stopped early (a strategy that configures no round and says ``stop_reason``, e.g. a privacy budget),
    or None. ``round_metrics(round)`` adds keys to each round's row (e.g. ε so far). With ``min_available``,
    each round after the first waits up to ``node_wait_timeout`` seconds for that many connected nodes (a
    SuperNode that died is not waited for forever). ``post_aggregate`` transforms each aggregated model before it
    is evaluated, checkpointed and sent (post-processing: it sees only what the strategy released).

    Raises
    ------
    RunFailed
        When a round sent work to clients and none of them returned a usable reply, or fewer than
        ``min_available`` nodes stayed connected.
    """
    check: ReplyCheck | None = getattr(strategy, "validate_reply", None)
    list_metrics = frozenset(getattr(strategy, "list_metrics", ()))
    rows: list[dict[str, Any]] = []
    reporter.start(num_rounds, first_round)
    for server_round in range(first_round, num_rounds + 1):
        t0 = time.perf_counter()
        if min_available and server_round > first_round:
            wait_for_nodes(grid, min_available, node_wait_timeout)
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(run_config), grid))
        if not messages and (reason := getattr(strategy, "stop_reason", None)):
            logger.info("stopping before round %d: %s", server_round, reason)
            return arrays, rows, reason
        reporter.round_start(server_round, len(messages))
        bytes_down = contents_bytes(m.content for m in messages)
        replies, missing = collect_replies(
            grid, messages, round_timeout, on_reply=lambda r=server_round: reporter.client_done(r)
        )
        train = sort_replies(replies, missing, check, arrays, "train", list_metrics, consistent=True)
        if messages and not train.ok:
            first = (train.errors + train.rejected + ["unknown"])[0]
            raise RunFailed(f"round {server_round}: no client returned a usable update ({first})")
        new_arrays, train_metrics = strategy.aggregate_train(server_round, train.ok)
        if new_arrays is not None:
            arrays = new_arrays if post_aggregate is None else post_aggregate(new_arrays)

        row: dict[str, Any] = {"round": server_round}
        eval_messages = list(strategy.configure_evaluate(server_round, arrays, ConfigRecord(run_config), grid))
        if eval_messages:
            bytes_down += contents_bytes(m.content for m in eval_messages)
            ev_replies, ev_missing = collect_replies(grid, eval_messages, round_timeout)
            evaluation = sort_replies(ev_replies, ev_missing, None, arrays, "evaluate", consistent=True)
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
        if train.error_reasons:
            row["failure_reasons"] = count_reasons(train.error_reasons)
        if train.rejected_reasons:
            row["rejected_reasons"] = count_reasons(train.rejected_reasons)
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
