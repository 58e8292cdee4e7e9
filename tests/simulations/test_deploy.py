"""`fedpriv deploy local` end to end: a real SuperLink and SuperNodes on loopback, TLS and SuperNode authentication
(slow: about 1.5–2 minutes). While the run goes on, strangers try to get in and must be refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from simulations.certs import make_node_key
from simulations.deploy import (
    CONNECTION,
    SUPERNODE_REFUSED,
    _stragglers,
    flower_bin,
    flower_env,
    free_port,
    supernode_command,
    write_connection,
)

pytestmark = pytest.mark.slow


def _wait_for_nodes_started(state_path: Path, proc: subprocess.Popen, timeout: float = 150.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"deploy exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}"
        if state_path.is_file():
            state = json.loads(state_path.read_text())
            if "supernode-0" in state["pids"]:
                return state
        time.sleep(0.5)
    raise AssertionError("the deployment did not start its SuperNodes in time")


def _run_logged(cmd: list[str], env: dict, log: Path, timeout: float = 120.0) -> tuple[int, str]:
    """Run ``cmd`` with its output in a file (Flower's SuperExec child inherits the output and outlives the
    SuperNode for a while: a pipe would not close) and wait for the command itself."""
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    return code, log.read_text(errors="replace")


def test_deploy_local_runs_over_tls_with_node_auth_and_refuses_strangers(tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "cli-home")}
    deploy = subprocess.Popen(
        [sys.executable, "-m", "simulations.cli", "deploy", "local", "digits-fedavg", "--nodes", "2", "--set",
         "num-rounds=2", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
    )
    try:
        state = _wait_for_nodes_started(out / "deployment" / "state.json", deploy)
        address, ca = state["superlink"], Path(state["root_certificates"])
        assert not state["insecure"] and ca.is_file()
        data = out / "deployment" / "data" / "node-0.npz"

        # 1. A SuperNode with the CA but a key nobody registered: TLS works, activation is refused.
        stranger = make_node_key(tmp_path / "stranger" / "node-x")
        code, rogue_log = _run_logged(
            supernode_command(address, free_port(), {"data-path": str(data)}, ca, stranger.private, max_wait=30),
            flower_env(tmp_path / "rogue-home"), tmp_path / "rogue.log")
        assert code != 0 and SUPERNODE_REFUSED in rogue_log, rogue_log[-2000:]
        assert "Failed to activate SuperNode" in rogue_log

        # 2. A SuperNode without the CA: the SuperLink's certificate does not verify, nothing is sent.
        no_ca = [flower_bin("flower-supernode"), "--superlink", address, "--port", str(free_port()),
                 "--auth-supernode-private-key", str(stranger.private), "--node-config", f'data-path="{data}"',
                 "--max-wait-time", "30"]
        code, no_ca_log = _run_logged(no_ca, flower_env(tmp_path / "noca-home"), tmp_path / "no-ca.log")
        assert code != 0 and SUPERNODE_REFUSED in no_ca_log, no_ca_log[-2000:]
        assert "CERTIFICATE_VERIFY_FAILED" in no_ca_log

        # 3. The flwr CLI: with the CA it lists the run; without it (TLS, system trust store) it cannot connect.
        code, ls_log = _run_logged([flower_bin("flwr"), "ls", CONNECTION], flower_env(Path(state["flwr_home"])),
                                   tmp_path / "ls-ca.log")
        assert code == 0, ls_log[-2000:]
        cli_home = tmp_path / "cli-noca-home"
        write_connection(cli_home, address, None)
        conf = cli_home / "config.toml"
        conf.write_text(conf.read_text().replace("insecure = true\n", ""))  # TLS, but no root-certificates
        code, ls_log = _run_logged([flower_bin("flwr"), "ls", CONNECTION], flower_env(cli_home),
                                   tmp_path / "ls-noca.log")
        assert code != 0 and "Connection to the SuperLink is unavailable" in ls_log, ls_log[-2000:]

        stdout, stderr = deploy.communicate(timeout=300)
    finally:
        if deploy.poll() is None:
            os.killpg(deploy.pid, signal.SIGINT)
            deploy.communicate(timeout=60)
    assert deploy.returncode == 0, stderr[-3000:]
    assert "TLS, SuperNode authentication" in stdout and "finished:completed" in stdout

    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_reason"] == "completed" and summary["rounds_completed"] == 2
    assert summary["final"]["test_accuracy"] > 0.6  # chance is 0.1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["clients"], r["failures"]) for r in rows] == [(1, 2, 0), (2, 2, 0)]  # no stranger joined
    superlink_log = (out / "deployment" / "logs" / "superlink.log").read_text()
    assert "Activated node_id" in superlink_log and "No SuperNode found with the given public key" in superlink_log
    # Everything the deployment started is gone; bulky copies were removed, logs and certificates kept.
    assert _stragglers([address]) == []
    assert not (out / "deployment" / "data").exists()
    assert (out / "deployment" / "logs" / "supernode-1.log").is_file()


def test_deploy_local_reports_a_failed_run_and_stops_everything(tmp_path: Path) -> None:
    """`flwr run` exits 0 when the run fails; deploy must still say so (exit 1) and leave nothing running."""
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "deploy", "local", "--nodes", "1", "--set", "num-rounds=1",
         "round-timeout=0.2", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "FLWR_HOME": str(tmp_path / "cli-home")},
    )
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("fedpriv: deploy failed:")]
    assert "the run failed (Flower status finished:failed" in line and "no client returned a usable update" in line
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_reason"].startswith("failed: round 1: no client returned a usable update")
    state = json.loads((out / "deployment" / "state.json").read_text())
    assert _stragglers([state["superlink"]]) == []
