"""The local data a client trains on (or, for histogram jobs, its users' item counts)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClientData:
    """A node's local data: images (N, 1, S, S) float32 and labels (N,) int64; for histogram jobs, ``x`` holds
    its users' item counts (users × k) int64 and ``y`` is empty."""

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    client_id: str
