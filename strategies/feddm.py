"""FedDM as a federated strategy: clients send small synthetic sets instead of model updates, the server trains the
global model on their union.

Reference
---------
Y. Xiong, R. Wang, M. Cheng, F. Yu, C.-J. Hsieh, "FedDM: Iterative Distribution Matching for
Communication-Efficient Federated Learning", CVPR 2023 (arXiv:2207.09653). §3 builds the global objective from
local surrogates learned by distribution matching around the current global model; its DP section privatizes
the matching statistics with the Gaussian mechanism. The equations below are numbered for this module (the
paper's own numbering is not reproduced); the symbols follow the paper.

(1) Global objective over K clients with data D_k:  min_w  Σ_k (n_k / n) · F_k(w),
    F_k(w) = (1 / n_k) Σ_{(x, y) ∈ D_k} ℓ(w; x, y).
(2) Local surrogate: a small synthetic set S_k with F̃_k(w) = (1 / |S_k|) Σ_{(s, y) ∈ S_k} ℓ(w; s, y) ≈ F_k(w) for w
    in a neighbourhood of the round's global model w_t (not only at w_t, as a model update would be).
(3) S_k is learned by distribution matching on randomly perturbed models w = w_t + δ, ‖δ‖₂ = ρ:
    min_{S_k} E_δ Σ_c ‖ mean_{x ∈ D_{k,c}} φ_w(x) − mean_{s ∈ S_{k,c}} φ_w(s) ‖²,
    φ_w = [penultimate features, logits] of the network with weights w (:mod:`client.feddm`).
(4) Server update: w_{t+1} = E epochs of SGD from w_t on  (1 / |S|) Σ_{(s, y) ∈ ∪_k S_k} ℓ(w; s, y)
    (``server-epochs``, ``server-lr``, ``server-batch-size``; momentum/weight decay from ``momentum``,
    ``weight-decay``). Only the current round's sets are used: each S_k matches D_k around w_t only.
(5) DP variant (:class:`strategies.feddm_dp.FedDMDp` wrapping this strategy): per-example clipping of φ to
    norm C and Gaussian noise N(0, σ²C²) on the per-class sums, T + 1 releases per round (T perturbations and
    the class counts), σ calibrated from the target ε over rounds × (T + 1).

Communication is measured from the real payloads: the array bytes of every synthetic ArrayRecord received
(uplink) and of the global ArrayRecord sent to each sampled client (downlink), per round and cumulatively, in
the round metrics (``feddm_bytes_up``, ``feddm_bytes_up_cum``, ``feddm_bytes_down``; the cumulative counters
start with the server process, so a resumed run restarts them); the round loop's ``bytes_up``/``bytes_down`` are
the serialized message sizes.

A reply whose synthetic set is malformed — not exactly the ``synthetic`` ArrayRecord of float32 images shaped
like the model's input and int64 labels, non-finite or out-of-[0, 1] pixels, labels outside 0..K−1, no image
or more than ``feddm-max-images`` — is rejected by :meth:`FedDM.validate_reply` with a reason; the round loop
logs and counts it and trains on the other clients' sets.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from strategies.fedavg import FedAvg, make_fedavg
from strategies.replies import MAX_EXAMPLES
from strategies.wrapper import StrategyWrapper

logger = logging.getLogger("fedpriv")

SYNTHETIC_KEY = "synthetic"  # the reply's ArrayRecord: "images" float32 (M, C, S, S), "labels" int64 (M,)


def array_bytes(record: ArrayRecord) -> int:
    """Bytes of the arrays' serialized data in ``record`` (what travels, without the message envelope)."""
    return sum(len(a.data) for a in record.values())


def check_synthetic_set(
    content: RecordDict, input_shape: tuple[int, ...], num_classes: int, max_images: int
) -> str | None:
    """Why a FedDM reply must be rejected, or None when it is a well-formed synthetic set.

    Well formed: exactly one ArrayRecord, named ``synthetic``, holding exactly ``images`` — float32 of shape
    (M, *input_shape), finite, in [0, 1], 1 ≤ M ≤ ``max_images`` — and ``labels`` — int64 of shape (M,) in
    0..num_classes−1; and exactly one MetricRecord whose ``num-examples`` equals M.
    """
    if set(content.array_records) != {SYNTHETIC_KEY}:
        return f"expected exactly one ArrayRecord {SYNTHETIC_KEY!r}, got {sorted(content.array_records)}"
    if len(content.metric_records) != 1:
        return f"expected exactly one MetricRecord, got {len(content.metric_records)}"
    arrays = content.array_records[SYNTHETIC_KEY]
    if set(arrays.keys()) != {"images", "labels"}:
        return f"synthetic set: expected arrays 'images' and 'labels', got {sorted(arrays.keys())}"
    images, labels = arrays["images"], arrays["labels"]
    want = ", ".join(str(s) for s in input_shape)
    if images.dtype != "float32" or tuple(images.shape[1:]) != tuple(input_shape) or len(images.shape) < 1:
        return f"synthetic images: expected float32[M, {want}], got {images.dtype}{list(images.shape)}"
    m = int(images.shape[0])
    if m < 1:
        return "synthetic set: expected at least one image, got 0"
    if m > max_images:
        return f"synthetic set: {m} images, more than feddm-max-images={max_images}"
    if labels.dtype != "int64" or tuple(labels.shape) != (m,):
        return f"synthetic labels: expected int64[{m}] (one per image), got {labels.dtype}{list(labels.shape)}"
    try:
        x, y = images.numpy(), labels.numpy()
    except Exception as exc:  # a payload that does not decode is malformed, whatever the reason
        return f"synthetic set does not decode: {exc}"
    if not np.isfinite(x).all():
        return "synthetic images have non-finite values"
    if x.min() < 0.0 or x.max() > 1.0:
        return f"synthetic images: expected pixel values in [0, 1], got values in [{x.min():.4g}, {x.max():.4g}]"
    if y.min() < 0 or y.max() >= num_classes:
        return f"synthetic labels: expected classes 0..{num_classes - 1}, got values in [{y.min()}, {y.max()}]"
    count = next(iter(content.metric_records.values())).get("num-examples")
    if not isinstance(count, int) or isinstance(count, bool) or not 0 < count <= MAX_EXAMPLES or count != m:
        return f"metric 'num-examples': expected {m} (the number of synthetic images), got {count!r}"
    return None


class FedDM(StrategyWrapper):
    """FedDM's server: sends the global model, trains it on the union of the returned synthetic sets.

    Client sampling (``fraction-train``) and federated evaluation come from the wrapped FedAvg, whose
    aggregation is never used.

    Parameters
    ----------
    strategy : FedAvg
        Samples the clients and runs federated evaluation.
    model : str
        Network name (:func:`models.build_model`).
    input_shape : tuple of int
        (C, S, S) of the images.
    num_classes : int
        K; labels must lie in 0..K−1.
    max_images : int
        Largest synthetic set accepted from one client.
    server_epochs, server_lr, server_batch_size : int, float, int
        SGD on the union, eq. (4).
    momentum, weight_decay : float
        Of the server's SGD.
    seed : int
        Seeds the server's shuffling (plus the round number).
    """

    def __init__(
        self,
        strategy: FedAvg,
        *,
        model: str,
        input_shape: tuple[int, ...],
        num_classes: int,
        max_images: int,
        server_epochs: int,
        server_lr: float,
        server_batch_size: int,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__(strategy)
        self.model, self.input_shape, self.num_classes = model, tuple(input_shape), num_classes
        self.max_images = max_images
        self.server_epochs, self.server_lr, self.server_batch_size = server_epochs, server_lr, server_batch_size
        self.momentum, self.weight_decay, self.seed = momentum, weight_decay, seed
        self.bytes_up_total = 0
        self.bytes_down_total = 0
        self._global: ArrayRecord | None = None
        self._bytes_down = 0

    # -- Strategy ------------------------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The global model and the run config with ``client-task = feddm`` to every sampled client."""
        self._global = arrays
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        if not messages:
            return []
        cfg = ConfigRecord({**dict(messages[0].content["config"]), "client-task": "feddm"})
        content = RecordDict({"arrays": arrays, "config": cfg})  # one payload, shared by every message
        self._bytes_down = array_bytes(arrays) * len(messages)
        return [Message(content=content, dst_node_id=m.metadata.dst_node_id, message_type=m.metadata.message_type)
                for m in messages]

    def validate_reply(self, content: RecordDict, global_arrays: ArrayRecord, node_id: int | None = None) -> str | None:
        """The synthetic-set check (:func:`check_synthetic_set`)."""
        return check_synthetic_set(content, self.input_shape, self.num_classes, self.max_images)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Train the global model on the union of the replies' synthetic sets (eq. 4)."""
        from models import TrainConfig, build_model, train

        replies = [r for r in replies if not r.has_error()]
        if not replies or self._global is None:
            return None, None
        sets = [r.content.array_records[SYNTHETIC_KEY] for r in replies]
        x = np.concatenate([s["images"].numpy() for s in sets])  # (M, C, S, S)
        y = np.concatenate([s["labels"].numpy() for s in sets]).astype(np.int64)  # (M,)
        bytes_up = sum(array_bytes(s) for s in sets)
        self.bytes_up_total += bytes_up
        self.bytes_down_total += self._bytes_down

        net = build_model(self.model, image_size=self.input_shape[-1], num_classes=self.num_classes)
        net.load_state_dict(self._global.to_torch_state_dict())
        tcfg = TrainConfig(epochs=self.server_epochs, batch_size=self.server_batch_size, lr=self.server_lr,
                           momentum=self.momentum, weight_decay=self.weight_decay, optimizer="sgd")
        loss = train(net, x, y, tcfg, seed=self.seed * 1_000_003 + server_round)
        client = [r.content.metric_records["metrics"] for r in replies]

        def mean(key: str) -> float:
            return float(np.mean([float(m.get(key, np.nan)) for m in client]))

        metrics = MetricRecord({
            "feddm-images": len(y),
            "feddm-classes-mean": mean("feddm-classes"),
            "feddm-matching-loss-start": mean("feddm-loss-start"),
            "feddm-matching-loss": mean("train-loss"),
            "feddm-client-seconds-mean": mean("feddm-client-seconds"),
            "feddm-client-seconds-max": float(max(float(m.get("feddm-client-seconds", 0.0)) for m in client)),
            "server-train-loss": float(loss),
            "feddm-bytes-up": bytes_up,
            "feddm-bytes-up-cum": self.bytes_up_total,
            "feddm-bytes-down": self._bytes_down,
            "feddm-bytes-down-cum": self.bytes_down_total,
            "feddm-model-bytes": array_bytes(self._global),
        })
        logger.info("feddm: round %d trained on %d synthetic images from %d clients (%d bytes up)", server_round,
                    len(y), len(replies), bytes_up)
        return ArrayRecord(net.state_dict()), metrics


def make_feddm(
    num_clients: int,
    fraction_train: float,
    fraction_evaluate: float,
    min_available: int = 0,
    **kwargs: Any,
) -> FedDM:
    """FedDM sampling ``fraction_train`` of the connected nodes like :func:`~strategies.fedavg.make_fedavg`
    (keyword arguments: see :class:`FedDM`)."""
    return FedDM(make_fedavg(num_clients, fraction_train, fraction_evaluate, min_available=min_available), **kwargs)
