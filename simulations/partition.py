"""Seeded, deterministic client partitions built with flwr-datasets' partitioners.

* ``iid``: :class:`~flwr_datasets.partitioner.IidPartitioner`, equal random shares.
* ``dirichlet``: :class:`~flwr_datasets.partitioner.DirichletPartitioner` (label proportions per client
  drawn from Dir(α); small α → strong label skew), Hsu et al. 2019.
* ``pathological``: :class:`~flwr_datasets.partitioner.PathologicalPartitioner`, each client holds
  ``classes-per-client`` classes (McMahan et al. 2017's shards); the first class of client i is i mod K,
  so every class is used when there are at least K clients.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

PARTITION_SCHEMES = ("iid", "dirichlet", "pathological")


class PartitionError(ValueError):
    """The requested partition cannot be built; the message names the setting to change."""


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    scheme: str = "iid",
    *,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    seed: int = 0,
) -> list[np.ndarray]:
    """Split sample indices into ``num_partitions`` client partitions.

    Parameters
    ----------
    labels : np.ndarray
        Integer labels of the whole training set, shape (N,).
    num_partitions : int
        Number of clients.
    scheme : str
        One of :data:`PARTITION_SCHEMES`.
    alpha : float
        Dirichlet concentration (``dirichlet`` only).
    classes_per_client : int
        Classes held by each client (``pathological`` only).
    seed : int
        Seed of the partitioner; the same arguments always give the same partitions.

    Returns
    -------
    list[np.ndarray]
        Sorted int64 index arrays, one per client, pairwise disjoint.
    """
    return [p.copy() for p in _cached(tuple(int(v) for v in labels), num_partitions, scheme, alpha,
                                      classes_per_client, seed)]


@lru_cache(maxsize=8)
def _cached(
    labels: tuple[int, ...], num_partitions: int, scheme: str, alpha: float, classes_per_client: int, seed: int
) -> tuple[np.ndarray, ...]:
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    n = len(labels)
    if num_partitions < 1 or num_partitions > n:
        raise PartitionError(f"num-clients must be between 1 and {n} (the training samples), got {num_partitions}")
    if scheme == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
        shuffle_seed: int | None = seed
    elif scheme == "dirichlet":
        # Ask for a minimum partition size the data can support, so the partitioner's retries succeed.
        min_size = max(1, min(10, n // (4 * num_partitions)))
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions, partition_by="label", alpha=alpha,
            min_partition_size=min_size, self_balancing=False, shuffle=True, seed=seed,
        )
        shuffle_seed = None
    elif scheme == "pathological":
        partitioner = PathologicalPartitioner(
            num_partitions=num_partitions, partition_by="label",
            num_classes_per_partition=classes_per_client, class_assignment_mode="first-deterministic",
            shuffle=True, seed=seed,
        )
        shuffle_seed = None
    else:
        raise PartitionError(f"partition must be one of {', '.join(PARTITION_SCHEMES)}, got {scheme!r}")

    data = Dataset.from_dict({"label": list(labels), "idx": list(range(n))})
    if shuffle_seed is not None:  # IidPartitioner splits in order: shuffle first, deterministically
        data = data.shuffle(seed=shuffle_seed)
    partitioner.dataset = data
    try:
        parts = tuple(
            np.sort(np.asarray(partitioner.load_partition(i)["idx"], dtype=np.int64)) for i in range(num_partitions)
        )
    except ValueError as exc:
        raise PartitionError(f"cannot build a {scheme} partition into {num_partitions} clients: {exc}") from exc
    return parts
