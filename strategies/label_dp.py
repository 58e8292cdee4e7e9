"""Label-DP consensus-based retraining as a federated strategy.

References
----------
- R. Das et al., "Retraining with Predicted Hard Labels Provably Increases Model Accuracy", 2024: §3
  (consensus-based retraining: keep the samples whose predicted hard label equals the noisy label and retrain
  on them; the kept set is post-processing of the RR output, so label DP is unchanged).
- B. Ghazi et al., "Deep Learning with Label Differential Privacy", NeurIPS 2021: Alg. 2 (RRWithPrior),
  §3.2 (multi-stage training with the previous stage's model as prior).
- S. L. Warner, JASA 1965; Kairouz, Oh, Viswanath, NeurIPS 2014 (K-ary randomized response).

Protocol (``num-rounds`` rounds in all, wrapping FedAvg):

1. **Noisy phase**, rounds 1 … R₁ (R₁ = num-rounds − retrain-rounds with consensus, else num-rounds). Clients
   train on their privatized labels. With ``rr-prior`` the noisy phase is split evenly into ``label-stages``
   stages; at stage s each client privatizes its s-th data part with the current global model as prior (its
   softmax with RR's transition matrix inverted, ``label-prior = denoised``) and trains on stages 1 … s.
2. **Consensus**, at the first retraining round of each client: the client predicts hard labels with the
   global model of the end of the noisy phase and keeps the samples where prediction == noisy label.
3. **Retraining**, rounds R₁+1 … num-rounds, on the kept samples only: ``retrain = continue`` goes on from
   the noisy-phase model; ``scratch`` restarts from the initial model (then the noisy-phase model travels
   beside it once, as ``consensus-arrays``, for step 2). With ``label-matched-steps`` (default) a client's
   local SGD steps per round are those of ``local-epochs`` passes over all its data in every phase.

Model selection (``label-holdout`` > 0): clients hold a share of their stage-1 data out of noisy-phase training;
after each noisy round a federated evaluation counts how often the new global model predicts those examples' RR
labels, from which :meth:`privacy.mechanisms.RandomizedResponse.estimate_accuracy` estimates the model's accuracy on
the clients' data without bias, from noisy labels alone. The best-scoring model so far is rr-prior's prior at each
later stage (sent as ``prior-arrays``) and, at the end of the noisy phase, the consensus judge and the model
``continue`` retrains from. Without it (``label-holdout = 0``) the latest model plays every role. The selection is
held in memory: a resumed run starts it afresh.

Privacy: each client privatizes every label once (client side, :mod:`client.label_dp`), so the ledger charges
each client ε_label exactly once, unit ``label``, at the first training message it is sent — before the
noisy labels can leave in an update. ``rr`` is charged as RR with K buckets; ``rr-prior`` as binary RR with
parameter ε, which dominates every ε-DP mechanism (see :mod:`privacy.mechanisms`). A client whose first
message gets no usable reply stays charged and is charged again when next sent one (never less than the
truth).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from privacy.mechanisms import RandomizedResponse, RRWithPrior
from strategies.clients import ClientInfo, query_clients
from strategies.releases import PlannedRelease, planned_for
from strategies.wrapper import StrategyWrapper

logger = logging.getLogger("fedpriv")

MECHANISMS = ("rr", "rr-prior")
RETRAIN_MODES = ("continue", "scratch")


class LabelDpConsensus(StrategyWrapper):
    """Wraps FedAvg: noisy-label rounds, then (optionally) consensus filtering and retraining.

    Parameters
    ----------
    strategy : Strategy
        The aggregation strategy (FedAvg weighted by ``num-examples``, the size of each client's training set).
    epsilon : float
        ε of the label mechanism (per label).
    num_classes : int
        K.
    mechanism : {"rr", "rr-prior"}
        Randomized response, or RR with the global model as prior for stages ≥ 2.
    stages : int
        Number of stages of ``rr-prior`` (1 for ``rr``).
    num_rounds : int
        All rounds of the run.
    retrain_rounds : int
        Rounds of the retraining phase (ignored without consensus).
    consensus : bool
        Filter and retrain after the noisy phase.
    retrain : {"continue", "scratch"}
        Where retraining starts.
    initial_arrays : ArrayRecord
        The initial model (for ``scratch``).
    holdout : float
        Share of each client's stage-1 data held out to score the noisy phase's models (0: no selection).
    """

    list_metrics = frozenset({"label-counts"})  # the one list-valued metric a reply may carry (K counts)

    def __init__(
        self,
        strategy: Strategy,
        *,
        epsilon: float,
        num_classes: int,
        mechanism: str,
        stages: int,
        num_rounds: int,
        retrain_rounds: int,
        consensus: bool,
        retrain: str,
        initial_arrays: ArrayRecord,
        holdout: float = 0.0,
        query_timeout: float = 120.0,
    ) -> None:
        super().__init__(strategy)
        if mechanism not in MECHANISMS:
            raise ValueError(f"label-mechanism must be one of {', '.join(MECHANISMS)}, got {mechanism!r}")
        if retrain not in RETRAIN_MODES:
            raise ValueError(f"retrain must be one of {', '.join(RETRAIN_MODES)}, got {retrain!r}")
        self.stages = stages if mechanism == "rr-prior" else 1
        self.noisy_rounds = num_rounds - retrain_rounds if consensus else num_rounds
        if self.noisy_rounds < self.stages:
            raise ValueError(f"the noisy phase has {self.noisy_rounds} rounds, fewer than label-stages={self.stages}")
        self.label = (RRWithPrior if mechanism == "rr-prior" else RandomizedResponse)(epsilon, num_classes)
        self.epsilon, self.num_classes, self.mechanism = epsilon, num_classes, mechanism
        self.consensus, self.retrain, self.initial = consensus, retrain, initial_arrays
        if not 0.0 <= holdout <= 0.5:
            raise ValueError(f"label-holdout: expected a share in [0, 0.5], got {holdout!r}")
        self.holdout, self.query_timeout = holdout, query_timeout
        self.info: dict[int, ClientInfo] = {}
        self.charged: set[int] = set()  # nodes whose labels are on the ledger (a usable reply came back)
        self.filtered: set[int] = set()  # nodes that did the consensus step
        self._consensus_arrays: ArrayRecord | None = None
        self.best: tuple[float, int, ArrayRecord] | None = None  # (estimated accuracy, round, model) so far
        self._scored: tuple[int, ArrayRecord] | None = None  # the model being scored this round
        self._plans: dict[int, PlannedRelease] = {}

    # -- schedule ---------------------------------------------------------------------------------------------
    def phase(self, server_round: int) -> tuple[str, int]:
        """("noisy", stage) or ("retrain", last stage) of ``server_round``."""
        if server_round > self.noisy_rounds:
            return "retrain", self.stages
        return "noisy", min(self.stages, 1 + (server_round - 1) * self.stages // self.noisy_rounds)

    # -- Strategy -----------------------------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        phase, stage = self.phase(server_round)
        send = arrays
        selected = self.best[2] if self.best is not None else arrays  # the best-scoring model, else the latest
        if phase == "retrain" and self._consensus_arrays is None:
            self._consensus_arrays = selected  # the noisy phase's (selected) model judges the labels
            send = self.initial if self.retrain == "scratch" else selected
        new_stage = phase == "noisy" and stage > 1 and self.phase(server_round - 1)[1] < stage
        messages = list(self.strategy.configure_train(server_round, send, config, grid))
        query_clients(grid, [m.metadata.dst_node_id for m in messages], config, self.info, self.query_timeout,
                      "label-dp")
        out, self._plans = [], {}
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node not in self.info:
                continue
            cfg = ConfigRecord({
                **dict(msg.content["config"]), "client-task": "label-dp", "label-phase": phase, "label-stage": stage,
                "label-stages": self.stages, "label-epsilon": self.epsilon, "label-mechanism": self.mechanism,
            })
            content = RecordDict({"arrays": msg.content["arrays"], "config": cfg})
            if new_stage and selected is not arrays:
                content["prior-arrays"] = selected  # this stage's prior: the best-scoring model
            if phase == "retrain" and node not in self.filtered and send is not self._consensus_arrays:
                content["consensus-arrays"] = self._consensus_arrays  # judge with the noisy phase's model
            out.append(Message(content=content, dst_node_id=node, message_type=msg.metadata.message_type))
            if node not in self.charged:
                self._plans[node] = PlannedRelease(
                    node, (self.info[node].client_id,), "label", self.label.dp_event(), self.mechanism)
        return out

    def release_plan(self, server_round: int, messages: Iterable[Message]) -> list[PlannedRelease]:
        """The label release of every client sent its first training message (once per client and run)."""
        return planned_for(self._plans, messages)

    def validate_reply(self, content: RecordDict, global_arrays: ArrayRecord, node_id: int | None = None) -> str | None:
        """FedAvg's update check plus the label metrics: sizes within the client's data, K label counts."""
        reason = super().validate_reply(content, global_arrays, node_id)
        if reason is not None:
            return reason
        metrics = next(iter(content.metric_records.values()))
        size = metrics.get("data-size")
        known = self.info.get(node_id) if node_id is not None else None
        if not _count(size) or size < 1 or (known is not None and size != known.num_examples):
            expected = f"{known.num_examples} (its reported dataset size)" if known else "a positive integer"
            return f"metric 'data-size': expected {expected}, got {size!r}"
        for key in ("num-examples", "labelled-size", "kept-size"):
            value = metrics.get(key)
            if key == "kept-size" and value is None:
                continue
            if not _count(value) or value > size:
                return f"metric {key!r}: expected an integer in [0, data-size={size}], got {value!r}"
        for key, bound in (("noisy-correct", "labelled-size"), ("kept-correct", "kept-size")):
            value = metrics.get(key)  # simulation diagnostics, absent on deployed nodes
            if value is not None and (not _count(value) or value > metrics.get(bound, -1)):
                return f"metric {key!r}: expected an integer in [0, {bound}], got {value!r}"
        counts = metrics.get("label-counts")
        if not isinstance(counts, list) or len(counts) != self.num_classes:
            got = f"{len(counts)} entries" if isinstance(counts, list) else repr(counts)
            return (f"metric 'label-counts': expected {self.num_classes} counts (labels 0..{self.num_classes - 1}), "
                    f"got {got}")
        if not all(_count(c) for c in counts) or sum(counts) != metrics["num-examples"]:
            return f"metric 'label-counts': expected non-negative counts summing to num-examples, got {counts}"
        return None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = [r for r in replies if not r.has_error()]
        phase, stage = self.phase(server_round)
        for reply in replies:
            self.charged.add(reply.metadata.src_node_id)
            if phase == "retrain":
                self.filtered.add(reply.metadata.src_node_id)
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        row = self._phase_metrics(server_round, phase, stage, replies)
        if metrics is not None:
            for key in ("label-counts", "data-size", "labelled-size", "kept-size", "noisy-correct", "kept-correct"):
                metrics.pop(key, None)
            metrics.update({k.replace("_", "-"): v for k, v in row.items() if k != "round"})
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Score the new global model on the held-out RR labels (noisy phase, ``holdout`` > 0); nothing else:
        a federated evaluation on the clients' true labels would release them without accounting."""
        if self.holdout <= 0 or self.phase(server_round)[0] != "noisy" or not self.charged:
            return []
        self._scored = (server_round, arrays)
        cfg = ConfigRecord({**dict(config), "client-task": "label-dp", "label-epsilon": self.epsilon,
                            "server-round": server_round})
        return [Message(content=RecordDict({"arrays": arrays, "config": cfg}), dst_node_id=node,
                        message_type=MessageType.EVALUATE, group_id=str(server_round))
                for node in sorted(self.charged)]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Accuracy estimate of the scored model from the pooled agreement counts; keeps the best model."""
        size = agree = 0
        for reply in replies:
            if reply.has_error():
                continue
            m = next(iter(reply.content.metric_records.values()), {})
            n, k = m.get("holdout-size"), m.get("holdout-agree")
            if not (_count(n) and _count(k) and k <= n):
                logger.warning("label-dp: rejected the holdout counts of node %d: expected integers 0 <= "
                               "holdout-agree <= holdout-size, got %r and %r", reply.metadata.src_node_id, k, n)
                continue
            size, agree = size + n, agree + k
        if self._scored is None or self._scored[0] != server_round or size == 0:
            return None
        # the held-out labels are stage 1's, plain RR outputs, whatever the mechanism of later stages
        estimate = RandomizedResponse(self.epsilon, self.num_classes).estimate_accuracy(agree / size)
        if self.best is None or estimate > self.best[0]:
            self.best = (estimate, server_round, self._scored[1])
        return MetricRecord({"holdout-size": size, "holdout-agreement": agree / size,
                             "holdout-accuracy": estimate, "selected-round": self.best[1]})

    def _phase_metrics(self, server_round: int, phase: str, stage: int, replies: list[Message]) -> dict[str, Any]:
        ms = [r.content.metric_records["metrics"] for r in replies]

        def total(key: str) -> int:
            return sum(int(m.get(key, 0)) for m in ms)

        row: dict[str, Any] = {"round": server_round, "label_retrain": int(phase == "retrain"), "label_stage": stage}
        if ms and all("kept-size" in m for m in ms):
            row["kept_fraction"] = total("kept-size") / max(total("labelled-size"), 1)
            if all("kept-correct" in m for m in ms):
                row["kept_precision"] = total("kept-correct") / max(total("kept-size"), 1)
        if ms and all("noisy-correct" in m for m in ms):
            row["noisy_label_accuracy"] = total("noisy-correct") / max(total("labelled-size"), 1)
        return row

    def phase_summary(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Per phase: rounds and final test accuracy; kept fraction (and precision, in simulation)."""
        by_round = {r["round"]: r for r in rows}
        noisy_last = by_round.get(self.noisy_rounds, {})
        out: dict[str, Any] = {
            "mechanism": self.mechanism, "label_epsilon": self.epsilon, "stages": self.stages,
            "consensus": self.consensus, "retrain": self.retrain,
            "noisy_phase": {"rounds": self.noisy_rounds, "test_accuracy": noisy_last.get("test_accuracy", math.nan),
                            "noisy_label_accuracy": noisy_last.get("noisy_label_accuracy")},
        }
        if self.holdout > 0:
            scored = [r for r in rows if r.get("federated_holdout_accuracy") is not None]
            out["noisy_phase"]["selected_round"] = scored[-1]["federated_selected_round"] if scored else None
        if self.consensus:
            last = rows[-1] if rows and rows[-1]["round"] > self.noisy_rounds else {}
            out["retrain_phase"] = {
                "rounds": max(0, max(by_round, default=0) - self.noisy_rounds),
                "test_accuracy": last.get("test_accuracy", math.nan),
                "kept_fraction": last.get("kept_fraction"), "kept_precision": last.get("kept_precision"),
            }
        return out


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
