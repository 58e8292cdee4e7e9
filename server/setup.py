"""What the ServerApp is given besides the grid: the resolved config, data for evaluation, the run directory."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from server.config import RunConfig
from server.progress import LogReporter, Reporter


@dataclass(frozen=True)
class TestData:
    """The held-out test set the server evaluates the global model on each round."""

    x: np.ndarray  # (N, 1, S, S) float32
    y: np.ndarray  # (N,) int64
    num_classes: int


@dataclass
class ServerSetup:
    """Everything the ServerApp needs besides the grid."""

    config: RunConfig
    test_data: TestData | None  # None for jobs without a model (histograms)
    run_dir: Path
    public_data: TestData | None = None  # federated LoRA: the server's public split the base is pretrained on
    reporter: Reporter = field(default_factory=LogReporter)
    resume: bool = False
    summary: dict[str, Any] = field(default_factory=dict)  # filled in by the run
    truth: np.ndarray | None = None  # histograms in simulation: the generator's distribution (a diagnostic)
    item_names: tuple[str, ...] | None = None  # histograms: names of the k items
