"""Partitions: sizes, disjointness, determinism and label skew."""

from __future__ import annotations

import numpy as np
import pytest

from simulations.datasets import load_digits
from simulations.partition import PartitionError, partition_indices

LABELS = load_digits().y_train


def label_skew(parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each client's label histogram and the global one."""
    glob = np.bincount(LABELS, minlength=10) / len(LABELS)
    return float(np.mean([0.5 * np.abs(np.bincount(LABELS[p], minlength=10) / len(p) - glob).sum() for p in parts]))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "pathological"])
def test_partitions_cover_disjointly_and_deterministically(scheme: str) -> None:
    parts = partition_indices(LABELS, 10, scheme, alpha=0.5, classes_per_client=2, seed=3)
    assert len(parts) == 10
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)), "partitions overlap"
    assert all(len(p) > 0 for p in parts)
    assert len(joined) == len(LABELS)  # every sample is used (pathological: every class is assigned)
    again = partition_indices(LABELS, 10, scheme, alpha=0.5, classes_per_client=2, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition_indices(LABELS, 10, scheme, alpha=0.5, classes_per_client=2, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_iid_sizes_are_balanced() -> None:
    sizes = [len(p) for p in partition_indices(LABELS, 10, "iid", seed=0)]
    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) == len(LABELS)


def test_label_skew_grows_as_alpha_shrinks() -> None:
    iid = label_skew(partition_indices(LABELS, 10, "iid", seed=0))
    mild = label_skew(partition_indices(LABELS, 10, "dirichlet", alpha=10.0, seed=0))
    strong = label_skew(partition_indices(LABELS, 10, "dirichlet", alpha=0.1, seed=0))
    assert iid < 0.15
    assert strong > 0.5 > mild
    assert strong > 3 * iid


def test_pathological_clients_hold_exactly_their_classes() -> None:
    parts = partition_indices(LABELS, 10, "pathological", classes_per_client=2, seed=0)
    assert all(len(np.unique(LABELS[p])) <= 2 for p in parts)


def test_impossible_partition_is_a_clear_error() -> None:
    with pytest.raises(PartitionError, match="num-clients must be between 1 and"):
        partition_indices(LABELS[:5], 6, "iid")
    with pytest.raises(PartitionError, match="partition must be one of"):
        partition_indices(LABELS, 2, "shards")
