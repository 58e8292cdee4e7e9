"""Client side of label-DP consensus retraining.

References
----------
- R. Das, S. Chen, et al., "Retraining with Predicted Hard Labels Provably Increases Model Accuracy", 2024:
  train on RR-noised labels, predict hard labels on the training set, keep the samples whose prediction equals
  the noisy label ("consensus"), retrain on them. Post-processing of the noisy labels: no extra privacy cost.
- B. Ghazi, N. Golowich, R. Kumar, P. Manurangsi, C. Zhang, "Deep Learning with Label Differential Privacy",
  NeurIPS 2021, Alg. 2 (RRWithPrior) and §3.2 (multi-stage training: stage t privatizes a fresh, disjoint
  part of the data with the prior given by the model trained on stages < t).

The client privatizes each label **once** and keeps the noisy labels in ``Context.state`` for the whole run;
every round and phase reuses them. Its data is split at random into ``label-stages`` disjoint parts; part s
is privatized the first time the server announces stage s (RR for s = 1 and for mechanism ``rr``; RRWithPrior
with the received global model's softmax as prior for s > 1). Each label goes through exactly one ε-DP
mechanism, so by parallel composition the client's labels are ε-label-DP however many rounds run.

The prior (``label-prior = denoised``, the default): a model trained on RR labels estimates the distribution
of the *released* label, q = Mᵀp, which at ε = 1 and K = 10 is nearly flat (every entry in [0.085, 0.232]), so
RRWithPrior would pick k* ≈ K and gain nothing over RR. Ghazi et al.'s prior is P(true label | x); inverting
RR's transition matrix (:meth:`privacy.mechanisms.RandomizedResponse.denoise`) estimates it from q. Exact when
the prior model saw only RR labels (stage 2 of the default 2 stages); for stages ≥ 3 its training set also
holds RRWithPrior labels and the inversion is an approximation — any prior keeps the ε guarantee, since it does
not depend on the labels being privatized. ``softmax`` uses q as is.

Local work (``label-matched-steps``, default true): every round a client takes the SGD steps of
``local-epochs`` passes over all its data, whatever subset it trains on — 1/(labelled share) passes over the
labelled part in rr-prior's early stages, 1/(kept share) passes over the kept set in retraining (about 5 at
ε = 1, where consensus keeps ~20 %) — so retraining rounds cost what noisy rounds cost, and comparisons at equal
rounds are at equal computation.

Held-out labels (``label-holdout`` h > 0): a share h of the stage-1 part is left out of noisy-phase training. Its
labels are plain RR outputs of examples the model never trained on, so the rate at which a model's prediction agrees
with them estimates the model's accuracy without bias (:func:`label_dp_evaluate` reports the counts in federated
evaluation; the server inverts RR's channel, :meth:`privacy.mechanisms.RandomizedResponse.estimate_accuracy`). It is
post-processing of the noisy labels: no extra privacy cost. The held-out examples join the retraining phase like any
other labelled example.

Randomness: in simulation (``partition-id`` in the node config) the RR draws are seeded from the run seed and
the partition, so runs are reproducible; a deployed SuperNode draws them from the OS entropy pool, because a
seed the server can guess would let it undo the noise. The true-label diagnostics (noisy-label accuracy,
kept-set precision) are reported in simulation only and are never used by the algorithm.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from client.data import ClientData

STATE_KEY = "label-dp"  # ArrayRecord in Context.state: stage, noisy, holdout (n,); kept (n,) once filtered
UNSET = -1


def _load(state: RecordDict) -> dict[str, np.ndarray]:
    if STATE_KEY not in state.array_records:
        return {}
    return {k: a.numpy() for k, a in state.array_records[STATE_KEY].items()}


def _save(state: RecordDict, values: dict[str, np.ndarray]) -> None:
    state.array_records[STATE_KEY] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in values.items()})


def _model(cfg: Mapping[str, Any], data: ClientData, arrays: ArrayRecord) -> Any:
    from models import build_model

    model = build_model(str(cfg["model"]), image_size=data.x.shape[-1], num_classes=data.num_classes)
    model.load_state_dict(arrays.to_torch_state_dict())
    return model


def _flag(value: object) -> bool:
    return value is True or str(value).lower() == "true"


def privatize_stages(
    values: dict[str, np.ndarray], upto: int, cfg: Mapping[str, Any], data: ClientData, arrays: ArrayRecord,
    rng: np.random.Generator,
) -> None:
    """Privatize the labels of stages 1..``upto`` that are not privatized yet (in place in ``values``)."""
    from models import predict_proba
    from privacy.mechanisms import RandomizedResponse, RRWithPrior

    eps, k = float(cfg["label-epsilon"]), data.num_classes
    mechanism = str(cfg["label-mechanism"])
    for stage in range(1, upto + 1):
        idx = np.flatnonzero((values["stage"] == stage) & (values["noisy"] == UNSET))
        if idx.size == 0:
            continue
        if stage == 1 or mechanism == "rr":
            values["noisy"][idx] = RandomizedResponse(eps, k).apply(data.y[idx], rng)
        else:
            prior = predict_proba(_model(cfg, data, arrays), data.x[idx])
            if str(cfg.get("label-prior", "denoised")) == "denoised":
                prior = RandomizedResponse(eps, k).denoise(prior)
            prior /= prior.sum(axis=1, keepdims=True)
            values["noisy"][idx] = RRWithPrior(eps, k).apply(data.y[idx], prior, rng)


def label_dp_fit(
    content: RecordDict, cfg: Mapping[str, Any], data: ClientData, seed: int, state: RecordDict,
    rr_seed: int | None, diagnostics: bool,
) -> RecordDict:
    """One round of label-DP training; returns the update, the training-set size and label metrics.

    Parameters
    ----------
    content : RecordDict
        The server's message: ``arrays`` (the model to train from), ``config``, and in the first retraining
        round of a node ``consensus-arrays`` (the model whose predictions select the kept samples; absent,
        ``arrays`` is used).
    rr_seed : int or None
        Seed of the label noise (simulation); None draws from OS entropy.
    diagnostics : bool
        Report true-label diagnostics (simulation only).
    """
    from models import TrainConfig, predict_proba, set_torch_threads, train

    set_torch_threads(int(float(cfg.get("client-cpus", 1.0))))
    n, stages = len(data.y), int(cfg["label-stages"])
    values = _load(state)
    if not values or len(values["noisy"]) != n:
        split_rng = np.random.default_rng(None if rr_seed is None else [rr_seed, 1])
        split = split_rng.permutation(n)
        values = {"stage": (split % stages + 1).astype(np.int64), "noisy": np.full(n, UNSET, dtype=np.int64)}
        first = np.flatnonzero(values["stage"] == 1)
        holdout = np.zeros(n, dtype=np.int8)
        holdout[split_rng.permutation(first)[: round(float(cfg.get("label-holdout", 0.0)) * len(first))]] = 1
        values["holdout"] = holdout
    values.setdefault("holdout", np.zeros(n, dtype=np.int8))
    phase, stage = str(cfg["label-phase"]), int(cfg["label-stage"])
    arrays = content["arrays"]
    rng = np.random.default_rng(None if rr_seed is None else [rr_seed, 2, stage])
    privatize_stages(values, stage, cfg, data, content.array_records.get("prior-arrays", arrays), rng)
    labelled = values["noisy"] != UNSET

    if phase == "retrain":
        if "kept" not in values:
            judge = content.array_records.get("consensus-arrays", arrays)
            pred = np.full(n, UNSET, dtype=np.int64)
            pred[labelled] = predict_proba(_model(cfg, data, judge), data.x[labelled]).argmax(axis=1)
            values["kept"] = (labelled & (pred == values["noisy"])).astype(np.int8)
        use = values["kept"].astype(bool)
        if not use.any():
            _save(state, values)
            raise ValueError("consensus kept no sample: the global model disagrees with every noisy label")
    elif phase == "noisy":
        use = labelled & (values["holdout"] == 0)
    else:
        raise ValueError(f"label-phase must be one of noisy, retrain, got {phase!r}")
    _save(state, values)

    model = _model(cfg, data, arrays)
    epochs = int(cfg["local-epochs"])
    if _flag(cfg.get("label-matched-steps", False)):  # as many SGD steps as local-epochs passes over all the data
        epochs *= max(1, round(n / int(use.sum())))
    tcfg = TrainConfig(
        epochs=epochs, batch_size=int(cfg["batch-size"]), lr=float(cfg["lr"]),
        momentum=float(cfg["momentum"]), weight_decay=float(cfg["weight-decay"]), optimizer=str(cfg["optimizer"]),
    )
    x, noisy = data.x[use], values["noisy"][use]
    loss = train(model, x, noisy, tcfg, seed=seed)
    metrics: dict[str, Any] = {
        "train-loss": float(loss),
        "num-examples": int(use.sum()),
        "data-size": n,
        "labelled-size": int(labelled.sum()),
        "label-counts": np.bincount(noisy, minlength=data.num_classes).astype(int).tolist(),
    }
    if "kept" in values:
        metrics["kept-size"] = int(values["kept"].sum())
    if diagnostics:  # simulation only: how good the noisy labels and the kept set are, against the truth
        metrics["noisy-correct"] = int((values["noisy"][labelled] == data.y[labelled]).sum())
        if "kept" in values:
            kept = values["kept"].astype(bool)
            metrics["kept-correct"] = int((values["noisy"][kept] == data.y[kept]).sum())
    return RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)})


def label_dp_evaluate(content: RecordDict, cfg: Mapping[str, Any], data: ClientData, state: RecordDict) -> RecordDict:
    """Agreement of the received model with the held-out RR labels (federated evaluation of label DP).

    Returns ``holdout-size`` (held-out examples whose labels are privatized) and ``holdout-agree`` (how many of
    them the model predicts as their RR label); the server turns the counts into an accuracy estimate. Only RR
    outputs are read, never a true label. A client without held-out labels reports zeros.
    """
    from models import predict_proba, set_torch_threads

    set_torch_threads(int(float(cfg.get("client-cpus", 1.0))))
    values = _load(state)
    held = (np.flatnonzero((values["holdout"] == 1) & (values["noisy"] != UNSET))
            if "holdout" in values and len(values["noisy"]) == len(data.y) else np.zeros(0, dtype=np.int64))
    agree = 0
    if held.size:
        pred = predict_proba(_model(cfg, data, content["arrays"]), data.x[held]).argmax(axis=1)
        agree = int((pred == values["noisy"][held]).sum())
    metrics = {"holdout-size": int(held.size), "holdout-agree": agree, "num-examples": int(held.size)}
    return RecordDict({"metrics": MetricRecord(metrics)})
