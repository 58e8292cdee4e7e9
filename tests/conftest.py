"""Shared fixtures: Flower's environment for in-process simulations, and the Fashion-MNIST skip."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("FLWR_HOME", str(ROOT / ".flwr"))


def fashion_available() -> bool:
    from simulations.datasets import missing_fashion_files

    return not missing_fashion_files()


requires_fashion = pytest.mark.skipif(
    not fashion_available(),
    reason="Fashion-MNIST IDX files absent: apt-get install dataset-fashion-mnist (or set FEDPRIV_FASHION_DIR)",
)
