"""The Flower apps of a simulation: ServerApp/ClientApp wired to the bundled datasets and experiments.

These are the ``[tool.flwr.app.components]`` of ``pyproject.toml`` (for ``flwr run .``) and what
``fedpriv simulate`` runs in-process.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid

from client.app import ClientData, build_client_app
from server.app import ServerSetup, TestData, build_server_app
from server.config import RunConfig
from server.rundir import default_run_dir
from simulations.datasets import load_dataset
from simulations.experiments import resolve
from simulations.partition import partition_indices

_CLIENT_CACHE: dict[tuple[Any, ...], ClientData] = {}


LORA_SPLIT_KEYS = ("lora-rank", "lora-public-classes", "lora-public-fraction")


def lora_split(y_train: np.ndarray, cfg: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Federated LoRA's split of the training set: (public, private) indices, both sorted.

    Public (the server's, for pretraining the base): a ``lora-public-fraction`` share of the examples of each
    class 0 .. ``lora-public-classes``−1, drawn with the run seed. Private (partitioned over the clients):
    everything else — the remaining examples of those classes and all examples of the other classes.
    """
    rng = np.random.default_rng([int(cfg["seed"]), 0x10AA])
    public = []
    for c in range(int(cfg["lora-public-classes"])):
        idx = np.flatnonzero(y_train == c)
        take = round(float(cfg["lora-public-fraction"]) * len(idx))
        public.append(rng.permutation(idx)[:take])
    pub = np.sort(np.concatenate(public)) if public else np.zeros(0, dtype=np.int64)
    return pub, np.setdiff1d(np.arange(len(y_train)), pub)


def partition_data(cfg: Mapping[str, Any], partition_id: int, num_partitions: int) -> ClientData:
    """The training partition ``partition_id`` of the configured dataset (cached per process).

    With federated LoRA (``lora-rank`` > 0) only the private examples are partitioned (see :func:`lora_split`).
    """
    spec = ("dataset", "data-dir", "test-fraction", "partition", "dirichlet-alpha", "classes-per-client", "seed")
    lora = int(cfg.get("lora-rank", 0) or 0) > 0
    key = (*(cfg[k] for k in spec), *((cfg[k] for k in LORA_SPLIT_KEYS) if lora else ()), partition_id,
           num_partitions)
    if cfg["dataset"] == "words":
        return word_users(cfg, partition_id)
    if key not in _CLIENT_CACHE:
        ds = load_dataset(str(cfg["dataset"]), data_dir=str(cfg["data-dir"]),
                          test_fraction=float(cfg["test-fraction"]))
        pool = lora_split(ds.y_train, cfg)[1] if lora else np.arange(len(ds.y_train))
        parts = partition_indices(
            ds.y_train[pool], num_partitions, str(cfg["partition"]), alpha=float(cfg["dirichlet-alpha"]),
            classes_per_client=int(cfg["classes-per-client"]), seed=int(cfg["seed"]),
        )
        idx = pool[parts[partition_id]]
        _CLIENT_CACHE[key] = ClientData(ds.x_train[idx], ds.y_train[idx], ds.num_classes, str(partition_id))
    return _CLIENT_CACHE[key]


def word_users(cfg: Mapping[str, Any], partition_id: int) -> ClientData:
    """The users of node ``partition_id`` in the words population: ``users-per-client`` users, each drawing
    ``samples-per-user`` words from the top ``num-items`` word frequencies (seeded by run seed and node)."""
    from simulations.histogram_data import node_users

    counts = node_users(cfg, partition_id)
    return ClientData(counts, np.zeros(0, dtype=np.int64), int(cfg["num-items"]), str(partition_id))


def simulation_data_source(context: Context, cfg: Mapping[str, Any]) -> ClientData:
    """Data source of a simulated SuperNode: its partition, from the node config Flower assigns."""
    return partition_data(cfg, int(context.node_config["partition-id"]), int(context.node_config["num-partitions"]))


# (image size, number of classes) of each image dataset, what a deployed node's own data must match.
IMAGE_DATASETS = {"digits": (8, 10), "fashion-mnist": (28, 10)}


def node_data_source(context: Context, cfg: Mapping[str, Any]) -> ClientData:
    """Data source of any SuperNode: the files its ``data-path`` node config names (a deployed device, see
    :mod:`client.local_data`), else its simulated partition (``partition-id`` / ``num-partitions``)."""
    path = context.node_config.get("data-path")
    if path is None:
        return simulation_data_source(context, cfg)
    from client.app import client_id
    from client.local_data import LocalDataError, load_local_data

    dataset = str(cfg["dataset"])
    if dataset not in IMAGE_DATASETS:
        raise LocalDataError(f"data-path {path}: deployed nodes hold image data; dataset {dataset!r} is not one "
                             f"({', '.join(IMAGE_DATASETS)})")
    size, classes = IMAGE_DATASETS[dataset]
    return load_local_data(str(path), classes, size, client_id(context))


def test_data(cfg: RunConfig) -> TestData | None:
    """The held-out test set of the configured dataset (None for the words population: nothing to test)."""
    if cfg.dataset == "words":
        return None
    ds = load_dataset(cfg.dataset, data_dir=cfg.data_dir, test_fraction=cfg.test_fraction)
    return TestData(ds.x_test, ds.y_test, ds.num_classes)


def public_data(cfg: RunConfig) -> TestData | None:
    """Federated LoRA: the server's public split of the training set (see :func:`lora_split`), else None."""
    if cfg.lora_rank == 0 or cfg.dataset == "words":
        return None
    ds = load_dataset(cfg.dataset, data_dir=cfg.data_dir, test_fraction=cfg.test_fraction)
    pub, _ = lora_split(ds.y_train, cfg.to_dict())
    return TestData(ds.x_train[pub], ds.y_train[pub], ds.num_classes)


def server_setup(cfg: RunConfig, run_dir: Path, **kwargs: Any) -> ServerSetup:
    """The ServerSetup of a simulated run: test data (and for federated LoRA the public split), or for the words
    population its true distribution."""
    setup = ServerSetup(config=cfg, test_data=test_data(cfg), run_dir=run_dir, public_data=public_data(cfg),
                        **kwargs)
    if cfg.dataset == "words":
        from simulations.histogram_data import word_distribution

        setup.item_names, setup.truth = word_distribution(cfg.num_items)
    return setup


def flwr_run_overrides(run_config: Mapping[str, Any], user_overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The keys a ``flwr run`` user changed: given with ``--run-config``, or edited in ``pyproject.toml``.

    ``[tool.flwr.app.config]`` lists every key (Flower only accepts overrides of listed keys) with the resolved
    values of the default experiment; a value that differs from those was edited, and wins over the selected
    experiment's value like a ``--run-config`` override does.
    """
    baseline = resolve().to_dict()
    return {k: v for k, v in run_config.items() if k in user_overrides or baseline.get(k) != v}


def setup_from_context(grid: Grid, context: Context) -> ServerSetup:
    """Server setup for ``flwr run``: the selected ``experiment`` plus the user's overrides."""
    fedpriv_log = logging.getLogger("fedpriv")
    if not fedpriv_log.handlers:  # show fedpriv's round lines in Flower's log stream
        fedpriv_log.handlers = list(logging.getLogger("flwr").handlers)
        fedpriv_log.setLevel(logging.INFO)
        fedpriv_log.propagate = False
    overrides = flwr_run_overrides(context.run_config, grid.run.override_config)
    cfg = resolve(str(overrides.pop("experiment", context.run_config.get("experiment", ""))) or None, overrides)
    run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg.experiment)
    return server_setup(cfg, run_dir)


server_app = build_server_app(setup_from_context)
client_app = build_client_app(node_data_source)
