"""The run directory (design §2): config.toml, metrics.jsonl, summary.json, plots/, checkpoint/."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np


def default_run_dir(experiment: str, root: str | Path = "runs") -> Path:
    """``runs/<experiment>-<UTC timestamp>``, made unique if it already exists."""
    name = Path(experiment).stem if experiment.endswith(".toml") else experiment
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = Path(root) / f"{name}-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = Path(root) / f"{name}-{stamp}-{n}"
    return path


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunDir:
    """Writes one run's files; every write is atomic or append-only, so a crash leaves readable files."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "checkpoint").mkdir(exist_ok=True)
        (self.path / "plots").mkdir(exist_ok=True)

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def write_config(self, config: Mapping[str, Any]) -> None:
        import tomli_w

        _atomic_write(self.path / "config.toml", tomli_w.dumps(dict(config)).encode())

    def append_metrics(self, row: Mapping[str, Any]) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        rows = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rows.append(json.loads(line))
        return rows

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        _atomic_write(self.path / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())

    def save_checkpoint(self, server_round: int, arrays: Mapping[str, np.ndarray], state: Mapping[str, Any]) -> None:
        """Save the global model after ``server_round`` (``model.npz``) and loop state (``state.json``)."""
        ckpt = self.path / "checkpoint"
        tmp = ckpt / "model.npz.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, ckpt / "model.npz")
        _atomic_write(ckpt / "state.json", json.dumps({"round": server_round, **state}).encode())

    def load_checkpoint(self) -> tuple[int, dict[str, np.ndarray], dict[str, Any]] | None:
        """(round, arrays, state) of the last checkpoint, or None when there is none."""
        ckpt = self.path / "checkpoint"
        if not (ckpt / "state.json").exists() or not (ckpt / "model.npz").exists():
            return None
        state = json.loads((ckpt / "state.json").read_text())
        with np.load(ckpt / "model.npz") as z:
            arrays = {k: z[k] for k in z.files}
        return int(state.pop("round")), arrays, state

    def write_plots(self, rows: list[Mapping[str, Any]]) -> None:
        """accuracy.png (accuracy and loss), bytes.png (bytes up/down), epsilon.png (ε spent) per round."""
        if not rows:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rounds = [r["round"] for r in rows]
        fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
        ax[0].plot(rounds, [r["test_accuracy"] for r in rows], marker="o")
        ax[0].set(xlabel="round", ylabel="test accuracy", title="accuracy")
        ax[1].plot(rounds, [r["test_loss"] for r in rows], marker="o", color="tab:red")
        ax[1].set(xlabel="round", ylabel="test loss", title="loss")
        fig.tight_layout()
        fig.savefig(self.path / "plots" / "accuracy.png", dpi=100)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(rounds, [r["bytes_up"] / 2**20 for r in rows], marker="o", label="up (clients → server)")
        ax.plot(rounds, [r["bytes_down"] / 2**20 for r in rows], marker="s", label="down (server → clients)")
        ax.set(xlabel="round", ylabel="MiB", title="bytes per round")
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.path / "plots" / "bytes.png", dpi=100)
        plt.close(fig)

        if any("epsilon" in r for r in rows):
            fig, ax = plt.subplots(figsize=(5, 3.2))
            ax.plot([r["round"] for r in rows if "epsilon" in r], [r["epsilon"] for r in rows if "epsilon" in r],
                    marker="o", color="tab:purple")
            ax.set(xlabel="round", ylabel="ε (max over participants)", title="privacy spent (ledger)")
            fig.tight_layout()
            fig.savefig(self.path / "plots" / "epsilon.png", dpi=100)
            plt.close(fig)
