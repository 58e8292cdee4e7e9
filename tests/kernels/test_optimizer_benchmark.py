"""benchmarks/optimizers.py runs its step-time part where Flower and Opacus are absent (a bare GPU machine), and
says why it skips the federated part there.

Imports torch only in this process; the benchmark runs in a subprocess with ``flwr`` and ``opacus`` blocked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BLOCKED_RUN = """
import importlib.abc, runpy, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("flwr", "opacus"):
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, Block())
sys.argv = ["optimizers.py", *sys.argv[1:]]
runpy.run_path("benchmarks/optimizers.py", run_name="__main__")
"""


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKED_RUN, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_step_part_needs_neither_flower_nor_opacus() -> None:
    proc = _run("--skip", "federated", "laser", "--repeats", "3", "--device", "cpu", "--no-write")
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout.splitlines()[0])
    assert row["device"] == "cpu" and row["adamw"] == "fused" and row["ratio"] > 0
    assert "**ratio LoRA-RITE ÷ fused AdamW**" in proc.stdout


def test_federated_part_is_skipped_with_a_reason_without_flower() -> None:
    proc = _run("--skip", "step", "laser", "--no-write")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Federated LoRA, LoRA-RITE vs AdamW**: skipped (the fedpriv simulation stack does not import here" in (
        proc.stdout)
