"""Flower ClientApp: receives the global model and the run's configuration, trains on local data, replies.

The app is built around a *data source*: a function that returns this node's local data. The simulation
(``simulations/apps.py``) plugs in a partition of a bundled dataset; a deployed SuperNode plugs in files from
its ``data-path``. Everything else the client needs travels in the message's ``config`` record (the run's
resolved configuration, kebab-case keys), so the same app works under ``fedpriv simulate`` and ``flwr run``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.data import ClientData
from client.faults import after_training, before_training, faults_enabled, plan_fault

DataSource = Callable[[Context, Mapping[str, Any]], ClientData]


def client_id(context: Context) -> str:
    """Stable id of this client: its node config's ``client-id`` when set (deployed nodes), its partition id in
    simulation, else its node id."""
    if (given := context.node_config.get("client-id")) is not None and str(given):
        return str(given)
    pid = context.node_config.get("partition-id")
    return str(pid) if pid is not None else str(context.node_id)


def _fault_client(context: Context) -> int:
    pid = context.node_config.get("partition-id")
    return int(pid) if pid is not None else int(context.node_id)


def _seed(cfg: Mapping[str, Any], context: Context) -> int:
    pid = context.node_config.get("partition-id", context.node_id % 100_003)
    return int(cfg.get("seed", 0)) * 1_000_003 + int(pid) * 1009 + int(cfg.get("server-round", 0))


def _with_node_overrides(cfg: dict[str, Any], context: Context) -> dict[str, Any]:
    """A device's own copy of the LoRA base model (node config ``lora-base-path``) replaces the server's path;
    the server's SHA-256 still has to match."""
    if (path := context.node_config.get("lora-base-path")) is not None and str(path):
        cfg["lora-base-path"] = str(path)
    return cfg


def local_fit(arrays: ArrayRecord, cfg: Mapping[str, Any], data: ClientData, seed: int) -> RecordDict:
    """Train the received model on ``data`` for the configured local epochs; reply arrays and metrics."""
    from client.model import client_model, reply_arrays
    from models import TrainConfig, set_torch_threads, train

    set_torch_threads(int(float(cfg.get("client-cpus", 1.0))))
    model = client_model(arrays, cfg, data)  # for federated LoRA: the frozen base + the received adapters
    tcfg = TrainConfig(
        epochs=int(cfg["local-epochs"]), batch_size=int(cfg["batch-size"]), lr=float(cfg["lr"]),
        momentum=float(cfg["momentum"]), weight_decay=float(cfg["weight-decay"]), optimizer=str(cfg["optimizer"]),
    )
    loss = train(model, data.x, data.y, tcfg, seed=seed)
    # unit-weight: an equal weight for aggregations that must not weight by data size (central DP).
    metrics = MetricRecord({"train-loss": float(loss), "num-examples": len(data.y), "unit-weight": 1})
    return RecordDict({"arrays": reply_arrays(model, cfg), "metrics": metrics})


def local_evaluate(arrays: ArrayRecord, cfg: Mapping[str, Any], data: ClientData) -> RecordDict:
    """Evaluate the received model on the local data."""
    from client.model import client_model
    from models import evaluate

    model = client_model(arrays, cfg, data)
    loss, acc = evaluate(model, data.x, data.y)
    metrics = MetricRecord({"eval-loss": loss, "eval-accuracy": acc, "num-examples": len(data.y)})
    return RecordDict({"metrics": metrics})


def build_client_app(data_source: DataSource) -> ClientApp:
    """Build the ClientApp that trains and evaluates on what ``data_source`` returns.

    The server names the local procedure in ``config["client-task"]``: ``fit`` (plain local SGD),
    ``dpsgd`` (Opacus DP-SGD with the noise multiplier the server calibrated, see :mod:`client.dpsgd`) or
    ``label-dp`` (training on privatized labels with consensus retraining, see :mod:`client.label_dp`),
    ``feddm`` / ``feddm-dp`` (learning a synthetic set by distribution matching, see :mod:`client.feddm`).
    """
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        cfg = _with_node_overrides(dict(msg.content["config"]), context)
        fault = None
        if faults_enabled(cfg):  # testing fault tolerance: see client.faults
            who, server_round = _fault_client(context), int(cfg.get("server-round", 0))
            fault = plan_fault(cfg, who, server_round)
            before_training(fault, who, server_round)
        data = data_source(context, cfg)
        task = str(cfg.get("client-task", "fit"))
        # Privacy noise is seeded only in simulation (reproducible runs); a deployed node draws it from OS entropy,
        # since the server knows the run's seed and could otherwise regenerate and remove the noise.
        pid = context.node_config.get("partition-id")
        simulated = pid is not None
        if task == "dpsgd":
            from client.dpsgd import dpsgd_fit

            seed = _seed(cfg, context) if simulated else None
            content = dpsgd_fit(msg.content["arrays"], cfg, data, seed, context.state)
        elif task == "label-dp":
            from client.label_dp import label_dp_fit

            rr_seed = int(cfg.get("seed", 0)) * 1_000_003 + int(pid) if simulated else None
            content = label_dp_fit(msg.content, cfg, data, _seed(cfg, context), context.state, rr_seed, simulated)
        elif task == "feddm":
            from client.feddm import feddm_fit

            content = feddm_fit(msg.content["arrays"], cfg, data, _seed(cfg, context))
        elif task == "feddm-dp":
            from client.feddm import feddm_dp_fit

            seed = _seed(cfg, context)
            content = feddm_dp_fit(msg.content["arrays"], cfg, data, seed, seed if simulated else None)
        elif task == "fit":
            content = local_fit(msg.content["arrays"], cfg, data, _seed(cfg, context))
        else:
            raise ValueError(f"client-task must be one of fit, dpsgd, label-dp, feddm, feddm-dp, got {task!r}")
        if fault is not None:
            content = after_training(fault, content, simulated)
        return Message(content=content, reply_to=msg)

    @app.query()
    def _query(msg: Message, context: Context) -> Message:
        """Answers a histogram phase's query (see :mod:`client.histogram`), else the local example count and a
        stable client id."""
        cfg = dict(msg.content["config"])
        data = data_source(context, cfg)
        if "histogram-kind" in cfg:
            from client.histogram import histogram_report

            return Message(content=histogram_report(msg.content, cfg, data), reply_to=msg)
        info = ConfigRecord({"num-examples": len(data.y), "client-id": client_id(context)})
        return Message(content=RecordDict({"info": info}), reply_to=msg)

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        cfg = _with_node_overrides(dict(msg.content["config"]), context)
        data = data_source(context, cfg)
        if cfg.get("client-task") == "label-dp":  # against the held-out RR labels, never the true ones
            from client.label_dp import label_dp_evaluate

            return Message(content=label_dp_evaluate(msg.content, cfg, data, context.state), reply_to=msg)
        return Message(content=local_evaluate(msg.content["arrays"], cfg, data), reply_to=msg)

    return app
