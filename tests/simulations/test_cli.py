"""The `fedpriv` command: listing, and usage/config errors as one line each with exit 2, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from simulations.cli import EXIT_USAGE, main
from simulations.experiments import list_experiments


def test_experiments_lists_bundled(capsys) -> None:
    assert main(["experiments"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == sorted(names) and {"digits-fedavg", "fashion-fedavg", "digits-dpsgd"} <= set(names)


def test_experiments_keys(capsys) -> None:
    assert main(["experiments", "--keys"]) == 0
    out = capsys.readouterr().out
    assert "num-clients" in out and "dirichlet-alpha" in out


@pytest.mark.parametrize(
    ("argv", "lines"),
    [
        (["simulate", "--set", "num-round=3", "lr=x", "oops"], [
            "fedpriv: error: --set: expected key=value, got 'oops'",
            "fedpriv: error: unknown key 'num-round' (did you mean 'num-rounds'?)",
            "fedpriv: error: lr: expected a number, got 'x'",
        ]),
        (["simulate", "nope"], [
            "fedpriv: error: experiment: unknown experiment 'nope'; expected one of "
            + ", ".join(n for n, _ in list_experiments()) + " or a path to a .toml file",
        ]),
        (["simulate", "--set", "num-clients=0", "dirichlet-alpha=0", "num-rounds=0"], [
            "fedpriv: error: num-clients: expected a value >= 1, got 0",
            "fedpriv: error: dirichlet-alpha: expected a value > 0, got 0.0",
            "fedpriv: error: num-rounds: expected a value >= 1, got 0",
        ]),
        (["simulate", "--resume", "/nonexistent/run"], [
            "fedpriv: error: --resume: /nonexistent/run is not a run directory (no config.toml)",
        ]),
    ],
)
def test_usage_errors(argv: list[str], lines: list[str], capsys) -> None:
    assert main(argv) == EXIT_USAGE
    assert capsys.readouterr().err.strip().splitlines() == lines


def test_installed_command_prints_no_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "simulate", "--set", "partition=shards"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "fedpriv: error: partition: expected one of iid, dirichlet, pathological, got 'shards'"
    )
