"""Server loop of user-level DP histogram estimation over Flower (Liu et al., NeurIPS 2020; see
:mod:`privacy.histogram` for the mechanisms and their sensitivities).

Each phase of the configured :class:`~privacy.histogram.HistogramEstimator` is one round: the server sends
the phase's query (kind, k, m and, in liu2020's fine phase, the per-item clipping interval derived from the
released coarse estimate) to every node; nodes reply the sum of their users' statistics and their user count;
a reply of the wrong length, or outside what the query allows, is rejected with a logged reason (never clipped
a second time). The phase's charge (unit ``user``, participant ``all``) is written to the ledger as
``pending`` *before* the noise is added and the result leaves the aggregation, and marked ``released``
after. The estimate is written to ``histogram.json`` in the run directory.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from privacy.histogram import HistogramEstimator, HistogramQuery
from server.loop import RunFailed, collect_replies, sort_replies, wait_for_nodes
from server.privacy import open_ledger, privacy_summary
from server.rundir import RunDir
from server.setup import ServerSetup

logger = logging.getLogger("fedpriv")
EVERYONE = "all"


def _query_messages(grid: Grid, nodes: list[int], query: HistogramQuery, phase: int, config: dict[str, Any],
                    ) -> list[Message]:
    cfg = ConfigRecord({**config, "histogram-phase": phase, "histogram-kind": query.kind})
    content = RecordDict({"config": cfg})
    if query.kind == "clipped":
        content["interval"] = ArrayRecord({"lower": Array(np.asarray(query.lower)),
                                           "upper": Array(np.asarray(query.upper))})
    return [Message(content=content, dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]


def check_histogram_reply(query: HistogramQuery) -> Any:
    """A reply check for the round loop's ``sort_replies``: the node's sum must be possible for ``query``."""

    def check(content: RecordDict, _arrays: ArrayRecord, _node: int) -> str | None:
        if sorted(content.keys()) != ["histogram", "metrics"] or "histogram" not in content.array_records \
                or "metrics" not in content.metric_records:
            return (f"expected exactly an ArrayRecord 'histogram' and a MetricRecord 'metrics', got records "
                    f"{sorted(content.keys())}")
        arrays = content.array_records["histogram"]
        if list(arrays.keys()) != ["sum"]:
            return f"histogram: expected exactly one array 'sum', got {sorted(arrays.keys())}"
        try:
            total = arrays["sum"].numpy()
        except Exception as exc:  # a payload that does not decode is malformed, whatever the reason
            return f"histogram: does not decode: {exc}"
        if total.dtype != np.float64:
            return f"histogram: expected float64 sums, got dtype {total.dtype}"
        return query.check_report(total, content.metric_records["metrics"].get("num-users"))

    return check


def run_histogram(grid: Grid, setup: ServerSetup) -> dict[str, Any]:
    """Run every phase over the connected nodes; write the run directory; return the summary."""
    cfg, run_dir = setup.config, RunDir(setup.run_dir)
    run_dir.write_config(cfg.to_dict())
    est = HistogramEstimator(cfg.histogram_method, cfg.target_epsilon, cfg.target_delta, cfg.num_items,
                             accountant=cfg.accountant)
    ledger, run_id = open_ledger(cfg, run_dir)
    assert ledger is not None
    rng = np.random.default_rng()  # OS entropy: noise seeded from the (public) run seed could be subtracted
    events = est.dp_events()
    t0, rows, stopped = time.perf_counter(), [], "completed"
    distribution: np.ndarray | None = None
    try:
        nodes = wait_for_nodes(grid, cfg.num_clients, cfg.node_wait_timeout)
        coarse, n_users = None, 0
        setup.reporter.start(est.phases, 1)
        for phase in range(est.phases):
            query = est.query(phase, coarse, n_users, cfg.samples_per_user)
            messages = _query_messages(grid, nodes, query, phase, cfg.to_dict())
            setup.reporter.round_start(phase + 1, len(messages))
            replies, missing = collect_replies(grid, messages, cfg.round_timeout,
                                               on_reply=lambda p=phase: setup.reporter.client_done(p + 1))
            got = sort_replies(replies, missing, check_histogram_reply(query), ArrayRecord(), f"phase {phase + 1}")
            if not got.ok:
                raise RunFailed(f"phase {phase + 1}: no node returned a usable report "
                                f"({(got.errors + got.rejected + ['unknown'])[0]})")
            total = sum(m.content.array_records["histogram"]["sum"].numpy() for m in got.ok)
            n = sum(int(m.content.metric_records["metrics"]["num-users"]) for m in got.ok)
            n_users = n_users or n
            with ledger.release(run_id, phase + 1, [EVERYONE], "user", events[phase], cfg.histogram_method):
                noisy = est.add_noise(phase, np.asarray(total, dtype=np.float64), query, rng)
                distribution = est.finish(noisy, n, query, None if coarse is None else (coarse, n_users))
            coarse = distribution
            row: dict[str, Any] = {"round": phase + 1, "users": n, "clients": len(got.ok),
                                   "failures": len(got.errors), "rejected": len(got.rejected),
                                   "sensitivity_l2": query.l2_sensitivity, "bytes_up": got.bytes_up,
                                   "wall_s": round(time.perf_counter() - t0, 4)}
            if setup.truth is not None:  # simulation diagnostic: the generator's distribution is public
                row["l1_error"] = float(np.abs(distribution - setup.truth).sum())
            run_dir.append_metrics(row)
            rows.append(row)
            logger.info("phase %d/%d: %d users from %d nodes (%d rejected), l2 sensitivity %.4f%s", phase + 1,
                        est.phases, n, len(got.ok), len(got.rejected), query.l2_sensitivity,
                        f", l1 error {row['l1_error']:.4f}" if "l1_error" in row else "")
    except BaseException as exc:
        stopped = f"failed: {exc}" if isinstance(exc, RunFailed) else f"failed: {type(exc).__name__}: {exc}"
        raise
    finally:
        last = rows[-1] if rows else {}
        setup.summary = {
            "experiment": cfg.experiment, "strategy": cfg.strategy, "method": cfg.histogram_method,
            "stopped_reason": stopped, "rounds_completed": len(rows), "num_rounds": est.phases,
            "users": last.get("users", 0), "num_items": cfg.num_items, "samples_per_user": cfg.samples_per_user,
            "final": {"l1_error": last.get("l1_error", float("nan"))},
            "total_rejected": sum(r["rejected"] for r in rows), "total_failures": sum(r["failures"] for r in rows),
            "wall_s": round(time.perf_counter() - t0, 3),
            "privacy": privacy_summary(cfg, ledger, run_id),
        }
        ledger.close()
        if distribution is not None and len(rows) == est.phases:
            (run_dir.path / "histogram.json").write_text(json.dumps(
                {"items": list(setup.item_names or range(cfg.num_items)), "probability": distribution.tolist()}))
        run_dir.write_summary(setup.summary)
        setup.reporter.finish(setup.summary)
    return setup.summary
