"""Differentially private FedDM as a strategy wrapper (Xiong et al., CVPR 2023, DP section; eq. (5) of
:mod:`strategies.feddm`): the wrapped :class:`~strategies.feddm.FedDM` is unchanged, its clients switch to
``client-task = "feddm-dp"`` (:func:`client.feddm.feddm_dp_fit`).

Privacy unit ``example``, per client. Each round a client makes T + 1 releases from all of its data (no
sampling): for each of T = ``feddm-dp-releases`` random perturbations of the global model the per-class sums of
its examples' clipped feature vectors (clip norm C = ``clip-norm``; one example changes one class row by at
most C in ℓ2) plus N(0, σ²C²) per coordinate, and once the per-class counts plus N(0, σ²) (sensitivity 1).
Each is a Gaussian mechanism with noise multiplier σ, so a round is SelfComposed(Gaussian(σ), T + 1) — one ledger
row per client and round, written ``pending`` before the message leaves (:class:`strategies.budget_guard.
LedgerGuard`). σ is calibrated once, the same for every client (full-batch releases do not depend on the data
size), so that R = ``num-rounds`` rounds, R·(T + 1) Gaussian releases, meet (``target-epsilon``,
``target-delta``) with the run's accountant; ``noise-multiplier`` > 0 fixes σ instead. The synthetic images
are post-processing of the releases (initialized from data-independent noise), so nothing else is charged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import dp_accounting as dpa
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from privacy.mechanisms import calibrate_gaussian, self_composed
from strategies.clients import ClientInfo, query_clients
from strategies.feddm import FedDM
from strategies.releases import PlannedRelease, planned_for
from strategies.wrapper import StrategyWrapper

logger = logging.getLogger("fedpriv")


class FedDMDp(StrategyWrapper):
    """Wraps :class:`FedDM` so that its clients release only Gaussian-noised, clipped per-class statistics.

    Parameters
    ----------
    strategy : FedDM
        The (unchanged) FedDM server.
    target_epsilon, target_delta : float
        Per-client (ε, δ) to reach after ``num_rounds`` rounds.
    num_rounds : int
        Rounds the calibration covers.
    releases : int
        T, perturbations (noised per-class sums) per round; the counts add one release.
    clip_norm : float
        C, the ℓ2 bound of each example's feature vector.
    noise_multiplier : float
        Fixed σ; 0 calibrates it.
    accountant : {"rdp", "pld"}
        Accountant of the calibration (the ledger recomputes ε from the recorded events).
    """

    def __init__(
        self,
        strategy: FedDM,
        *,
        target_epsilon: float,
        target_delta: float,
        num_rounds: int,
        releases: int,
        clip_norm: float,
        noise_multiplier: float = 0.0,
        accountant: str = "rdp",
        query_timeout: float = 120.0,
    ) -> None:
        super().__init__(strategy)
        if releases < 1:
            raise ValueError(f"feddm-dp-releases: expected a value >= 1, got {releases}")
        self.releases, self.clip_norm = releases, clip_norm
        self.num_rounds = num_rounds
        self.sigma = noise_multiplier or calibrate_gaussian(
            target_epsilon, target_delta, steps=num_rounds * self.releases_per_round, accountant=accountant)
        logger.info("feddm-dp: noise multiplier %.4f for ε=%g, δ=%g over %d rounds × %d releases", self.sigma,
                    target_epsilon, target_delta, num_rounds, self.releases_per_round)
        self.query_timeout = query_timeout
        self.info: dict[int, ClientInfo] = {}
        self._plans: dict[int, PlannedRelease] = {}

    @property
    def releases_per_round(self) -> int:
        """T noised per-class sums + 1 noised count vector."""
        return self.releases + 1

    def round_event(self) -> dpa.DpEvent:
        """One client's releases in one round."""
        return self_composed(dpa.GaussianDpEvent(self.sigma), self.releases_per_round)

    # -- Strategy ------------------------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        query_clients(grid, [m.metadata.dst_node_id for m in messages], config, self.info, self.query_timeout,
                      "feddm-dp")
        out, self._plans = [], {}
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node not in self.info:
                continue
            cfg = ConfigRecord({**dict(msg.content["config"]), "client-task": "feddm-dp",
                                "feddm-noise-multiplier": self.sigma, "clip-norm": self.clip_norm,
                                "feddm-dp-releases": self.releases})
            content = RecordDict({"arrays": msg.content["arrays"], "config": cfg})
            out.append(Message(content=content, dst_node_id=node, message_type=msg.metadata.message_type))
            self._plans[node] = PlannedRelease(node, (self.info[node].client_id,), "example", self.round_event(),
                                               "feddm-dp")
        return out

    def release_plan(self, server_round: int, messages: Iterable[Message]) -> list[PlannedRelease]:
        """One release per client sent work this round: its T + 1 Gaussian releases."""
        return planned_for(self._plans, messages)

    def validate_reply(self, content: RecordDict, global_arrays: ArrayRecord, node_id: int | None = None) -> str | None:
        """FedDM's synthetic-set check, and the client's count of releases must be the planned one."""
        reason = super().validate_reply(content, global_arrays, node_id)
        if reason is not None:
            return reason
        got = next(iter(content.metric_records.values())).get("feddm-dp-releases")
        if got != self.releases_per_round:
            return f"metric 'feddm-dp-releases': expected {self.releases_per_round} (the planned releases), got {got!r}"
        return None
