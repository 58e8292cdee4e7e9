"""Client-side DP-SGD (Abadi et al., CCS 2016, Alg. 1) as a strategy wrapper: the clients of the wrapped
strategy train with Opacus, each with a noise multiplier calibrated so that its own examples are
(target-ε, target-δ)-DP over all planned rounds.

Per client i with n_i examples, batch size B and E local epochs, Opacus' Poisson loader uses sampling rate
q_i = 1 / ⌈n_i / B⌉ and takes E·⌈n_i / B⌉ steps per round. The wrapper asks each client once for n_i (a
``query`` message; dataset sizes are public in DP-SGD's analysis), calibrates σ_i for R·E·⌈n_i / B⌉ steps,
and declares each round's release per client as SelfComposed(PoissonSampled(Gaussian(σ_i), q_i), E·⌈n_i/B⌉)
with privacy unit ``example``. Opacus may take one step fewer when 1/q is not exact: the charge is never less.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from functools import lru_cache

import dp_accounting as dpa
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from privacy.mechanisms import calibrate_gaussian, poisson_sampled, self_composed
from strategies.clients import ClientInfo, query_clients
from strategies.releases import PlannedRelease, planned_for
from strategies.wrapper import StrategyWrapper

logger = logging.getLogger("fedpriv")


@lru_cache(maxsize=256)
def _calibrate(target_epsilon: float, target_delta: float, steps: int, batches: int) -> float:
    """σ for ``steps`` Poisson-sampled steps at q = 1/batches (cached: clients of equal size share it)."""
    return calibrate_gaussian(target_epsilon, target_delta, steps=steps, sampling_probability=1.0 / batches,
                              rtol=1e-2)


class LocalDpSgd(StrategyWrapper):
    """Wraps a strategy so its clients run DP-SGD with per-client calibrated noise."""

    def __init__(
        self,
        strategy: Strategy,
        *,
        target_epsilon: float,
        target_delta: float,
        num_rounds: int,
        clip_norm: float,
        batch_size: int,
        local_epochs: int,
        noise_multiplier: float = 0.0,
        query_timeout: float = 120.0,
    ) -> None:
        super().__init__(strategy)
        self.target_epsilon, self.target_delta = target_epsilon, target_delta
        self.num_rounds, self.clip_norm = num_rounds, clip_norm
        self.batch_size, self.local_epochs = batch_size, local_epochs
        self.fixed_sigma = noise_multiplier
        self.query_timeout = query_timeout
        self.info: dict[int, ClientInfo] = {}
        self.clients: dict[int, tuple[str, int, float]] = {}  # node -> (client id, n, sigma)
        self._plans: dict[int, PlannedRelease] = {}

    # -- per-client calibration --------------------------------------------------------------------------
    def steps_per_round(self, num_examples: int) -> int:
        return self.local_epochs * max(1, math.ceil(num_examples / self.batch_size))

    def round_event(self, num_examples: int, sigma: float) -> dpa.DpEvent:
        k = max(1, math.ceil(num_examples / self.batch_size))
        return self_composed(poisson_sampled(dpa.GaussianDpEvent(sigma), 1.0 / k), self.local_epochs * k)

    def _learn_sizes(self, grid: Grid, node_ids: list[int], config: ConfigRecord) -> None:
        new = [n for n in node_ids if n not in self.info]
        query_clients(grid, new, config, self.info, self.query_timeout, "dpsgd")
        for node in (n for n in new if n in self.info):
            cid, n = self.info[node].client_id, self.info[node].num_examples
            k = max(1, math.ceil(n / self.batch_size))
            sigma = self.fixed_sigma or _calibrate(self.target_epsilon, self.target_delta,
                                                   self.num_rounds * self.local_epochs * k, k)
            self.clients[node] = (cid, n, sigma)
            logger.info("dpsgd: client %s (n=%d, q=%.4f) noise multiplier %.4f", cid, n, 1 / k, sigma)

    # -- Strategy ------------------------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self._learn_sizes(grid, [m.metadata.dst_node_id for m in messages], config)
        out, self._plans = [], {}
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node not in self.clients:
                continue
            cid, n, sigma = self.clients[node]
            cfg = ConfigRecord({**dict(msg.content["config"]), "client-task": "dpsgd", "dp-noise-multiplier": sigma,
                                "clip-norm": self.clip_norm, "target-delta": self.target_delta})
            content = RecordDict({"arrays": msg.content["arrays"], "config": cfg})
            out.append(Message(content=content, dst_node_id=node, message_type=msg.metadata.message_type))
            self._plans[node] = PlannedRelease(node, (cid,), "example", self.round_event(n, sigma), "dpsgd")
        return out

    def validate_reply(self, content: RecordDict, global_arrays: ArrayRecord, node_id: int | None = None) -> str | None:
        """FedAvg's update check plus the DP-SGD bookkeeping: ``dp-steps`` a count, ``dp-client-epsilon`` ≥ 0."""
        reason = self.strategy.validate_reply(content, global_arrays, node_id)
        if reason is not None:
            return reason
        metrics = next(iter(content.metric_records.values()))
        steps, eps = metrics.get("dp-steps", 0), metrics.get("dp-client-epsilon", 0.0)
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            return f"metric 'dp-steps': expected a non-negative integer, got {steps!r}"
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0.0 <= eps < math.inf:
            return f"metric 'dp-client-epsilon': expected a finite number >= 0, got {eps!r}"
        return None

    def release_plan(self, server_round: int, messages: Iterable[Message]) -> list[PlannedRelease]:
        """The releases ``messages`` will cause (one per client: its DP-SGD steps of this round)."""
        return planned_for(self._plans, messages)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        client_eps = [float(r.content.metric_records["metrics"].get("dp-client-epsilon", math.nan))
                      for r in replies if not r.has_error() and "metrics" in r.content.metric_records]
        if metrics is not None and client_eps:
            metrics["dp-client-epsilon-max"] = max(client_eps)
        return arrays, metrics
