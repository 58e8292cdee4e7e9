"""``fedpriv deploy local``: a real Flower deployment on this machine — a SuperLink and N SuperNodes on 127.0.0.1,
with TLS and SuperNode authentication — that runs one experiment and is stopped afterwards.

What it does, in order (every step is what an operator does on real devices, see README "Deploy to devices"):

1. ``fedpriv certs``: a CA, the SuperLink's certificate for 127.0.0.1/localhost, one EC key pair per node.
2. Each node's partition of the configured dataset is written as its own NPZ data file
   (:mod:`client.local_data`).
3. ``flower-superlink --ssl-certfile … --ssl-keyfile … --ssl-ca-certfile … --enable-supernode-auth``.
4. A SuperLink connection in a private ``FLWR_HOME/config.toml`` (address + ``root-certificates``), then
   ``flwr supernode register nodes/node-<i>.pub`` for every node: Flower 1.41 keeps the registered public keys
   in the SuperLink's state and only activates SuperNodes that sign with a registered key.
5. ``flower-supernode --root-certificates ca.crt --auth-supernode-private-key nodes/node-<i>
   --node-config 'data-path="…" client-id="<i>"'`` per node.
6. ``flwr run <project> <connection> --run-config <resolved config> --stream``; ``flwr run`` exits 0 even when
   the run fails, so the outcome is read from ``flwr ls --run-id`` (Flower's status) and the run directory's
   ``summary.json`` (fedpriv's ``stopped_reason``).
7. Every process started is stopped (its whole process group: SIGTERM, then SIGKILL), also on errors and
   Ctrl-C. Logs stay in ``<run dir>/deployment/logs``; the bulky copies (node data, Flower's app cache) are
   removed.

``--insecure`` runs the same without TLS and without node authentication (Flower refuses node authentication
without TLS); it prints a warning and is meant for debugging only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from server.config import RunConfig

CONNECTION = "fedpriv-local"
HOST = "127.0.0.1"
INSECURE_WARNING = ("warning: --insecure: no TLS and no SuperNode authentication — traffic is unencrypted and any "
                    "process that reaches the port can join as a node; use it only to debug on a trusted machine")
SUPERNODE_REFUSED = "Exit Code: 305"  # flower-supernode's log (it exits 1): could not connect to the SuperLink


class DeployError(RuntimeError):
    """The deployment could not be set up or the run failed; the message is one line."""


def project_root() -> Path:
    """The fedpriv checkout that ``flwr run`` builds the app from (its pyproject.toml has ``[tool.flwr.app]``)."""
    root = Path(__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or "[tool.flwr.app]" not in pyproject.read_text(encoding="utf-8"):
        raise DeployError(f"deploy needs the fedpriv source checkout (a pyproject.toml with [tool.flwr.app]) at "
                          f"{root}; install fedpriv from its checkout (pip install -e .)")
    return root


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment of every Flower process: private FLWR_HOME, no telemetry, no run-time installs, this venv's
    executables first on PATH (the SuperLink and SuperNodes start ``flower-superexec`` by name)."""
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": str(flwr_home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""), "PYTHONUNBUFFERED": "1",
    })
    return env


def flower_bin(name: str) -> str:
    """Path of a Flower executable installed beside this Python."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        found = shutil.which(name)
        if found is None:
            raise DeployError(f"{name} not found beside {sys.executable} or on PATH; is flwr installed?")
        return found
    return str(path)


@dataclass
class Processes:
    """Processes started in their own sessions (process groups), stopped together."""

    env: dict[str, str]
    log_dir: Path
    started: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _logs: list[IO[bytes]] = field(default_factory=list)

    def start(self, name: str, cmd: list[str], cwd: Path | None = None) -> subprocess.Popen[bytes]:
        """Start ``cmd`` with output to ``logs/<name>.log``."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 (closed in stop_all)
        self._logs.append(log)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
                                cwd=cwd, start_new_session=True)
        self.started[name] = proc
        return proc

    def log_text(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""

    def dead(self) -> list[tuple[str, int]]:
        """(name, exit code) of started processes that have exited."""
        return [(n, p.returncode) for n, p in self.started.items() if p.poll() is not None]

    def stop(self, name: str, grace: float = 10.0) -> None:
        proc = self.started.pop(name, None)
        if proc is not None:
            _stop_group(proc, grace)

    def stop_all(self, grace: float = 10.0) -> None:
        """SIGTERM every process group, wait up to ``grace`` seconds, SIGKILL what is left."""
        procs = list(self.started.values())
        for proc in procs:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in procs:
            _signal_group(proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self.started.clear()
        for log in self._logs:
            log.close()
        self._logs.clear()


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)  # the group of a process started with start_new_session=True has its pid


def _stop_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    _signal_group(proc, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    _signal_group(proc, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _stragglers(markers: list[str]) -> list[int]:
    """Pids of processes whose command line holds one of ``markers`` (this deployment's ports): Flower starts
    ``flower-superexec`` / ``flwr-serverapp`` / ``flwr-clientapp`` detached, in sessions of their own."""
    pids = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if ("flwr" in cmdline or "flower" in cmdline) and any(m in cmdline for m in markers):
            pids.append(int(entry.name))
    return pids


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float, what: str, log: Callable[[], str]) -> None:
    """Wait until something listens on 127.0.0.1:``port``; fail if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DeployError(f"{what} exited with code {proc.returncode} while starting: {last_error(log())}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.2)
    raise DeployError(f"{what} did not listen on {HOST}:{port} within {timeout:g}s")


def last_error(log: str) -> str:
    """The most telling line of a Flower log (its last ERROR, else its last line), without colour codes."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in log.splitlines()]
    lines = [ln for ln in lines if ln]
    errors = [ln for ln in lines if "ERROR" in ln or "Error" in ln or "error" in ln]
    return (errors or lines or ["(no output)"])[-1][:300]


def write_connection(flwr_home: Path, address: str, root_certificates: Path | None) -> None:
    """The ``flwr`` CLI's SuperLink connection (Flower 1.41 reads them from ``$FLWR_HOME/config.toml``)."""
    import tomli_w

    conn: dict[str, Any] = {"address": address}
    if root_certificates is None:
        conn["insecure"] = True
    else:
        conn["root-certificates"] = str(root_certificates.resolve())
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}}))


def superlink_command(port: int, certs_dir: Path | None) -> list[str]:
    """``flower-superlink`` with TLS and SuperNode authentication (``certs_dir``), or ``--insecure`` (None)."""
    cmd = [flower_bin("flower-superlink"), "--host", HOST, "--port", str(port),
           "--disable-runtime-dependency-installation"]
    if certs_dir is None:
        return [*cmd, "--insecure"]
    return [*cmd, "--ssl-certfile", str(certs_dir / "server.pem"), "--ssl-keyfile", str(certs_dir / "server.key"),
            "--ssl-ca-certfile", str(certs_dir / "ca.crt"), "--enable-supernode-auth"]


def supernode_command(superlink: str, runtime_port: int, node_config: Mapping[str, str], ca: Path | None,
                      private_key: Path | None, max_wait: float | None = None) -> list[str]:
    """``flower-supernode`` for one device: its SuperLink, CA, authentication key and node config."""
    config = " ".join(f'{k}="{v}"' for k, v in node_config.items())
    cmd = [flower_bin("flower-supernode"), "--superlink", superlink, "--host", HOST, "--port", str(runtime_port),
           "--node-config", config]
    if max_wait is not None:
        cmd += ["--max-wait-time", str(max_wait)]
    if ca is None:
        return [*cmd, "--insecure"]
    cmd += ["--root-certificates", str(ca)]
    if private_key is not None:
        cmd += ["--auth-supernode-private-key", str(private_key)]
    return cmd


def register_nodes(public_keys: list[Path], env: dict[str, str], timeout: float = 120.0) -> list[int]:
    """``flwr supernode register KEY.pub`` for every key (in parallel); the node ids the SuperLink assigned."""
    flwr = flower_bin("flwr")
    procs = [subprocess.Popen([flwr, "supernode", "register", str(key), CONNECTION, "--format", "json"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
             for key in public_keys]
    ids = []
    try:
        for key, proc in zip(public_keys, procs, strict=True):
            out, _ = proc.communicate(timeout=timeout)
            text = out.decode(errors="replace")
            match = re.search(r'"node-id":\s*(\d+)', text)
            if proc.returncode != 0 or match is None:
                raise DeployError(f"flwr supernode register {key.name} failed (exit {proc.returncode}): "
                                  f"{last_error(text)}")
            ids.append(int(match.group(1)))
    finally:
        for proc in procs:
            if proc.poll() is None:
                _stop_group(proc, 1.0)
    return ids


def run_status(run_id: str, env: dict[str, str], timeout: float = 60.0) -> str:
    """Flower's status of ``run_id`` (``finished:completed``, ``finished:failed`` …) from ``flwr ls``."""
    proc = subprocess.run([flower_bin("flwr"), "ls", CONNECTION, "--run-id", run_id, "--format", "json"],
                          capture_output=True, text=True, env=env, timeout=timeout)
    match = re.search(r"\{.*\}", proc.stdout, flags=re.S)
    try:
        runs = json.loads(match.group(0))["runs"] if match else []
    except (json.JSONDecodeError, KeyError):
        runs = []
    return str(runs[0].get("status", "unknown")) if runs else "unknown"


def write_partitions(cfg: RunConfig, data_dir: Path, nodes: int) -> list[Path]:
    """Each node's partition of the configured dataset as ``node-<i>.npz`` (what a device would hold)."""
    from client.local_data import write_npz
    from simulations.apps import partition_data

    paths = []
    for i in range(nodes):
        part = partition_data(cfg.to_dict(), i, nodes)
        paths.append(write_npz(data_dir / f"node-{i}.npz", part.x, part.y))
    return paths


def deploy_local(
    cfg: RunConfig,
    run_dir: Path,
    nodes: int,
    *,
    insecure: bool = False,
    timeout: float = 3600.0,
    say: Callable[[str], None] = print,
    keep: bool = False,
) -> dict[str, Any]:
    """Run ``cfg`` on a local SuperLink and ``nodes`` SuperNodes; return ``summary.json``'s content.

    Raises
    ------
    DeployError
        When a component does not start, a node is refused, the run fails (``stopped_reason``) or does not end
        within ``timeout`` seconds. Every process started has been stopped by then.
    """
    from simulations.certs import make_certificates

    if threading.current_thread() is threading.main_thread():  # SIGTERM, too, stops what was started
        previous = signal.signal(signal.SIGTERM, _terminate)
        try:
            return _deploy_local(cfg, run_dir, nodes, insecure, timeout, say, keep, make_certificates)
        finally:
            signal.signal(signal.SIGTERM, previous)
    return _deploy_local(cfg, run_dir, nodes, insecure, timeout, say, keep, make_certificates)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _deploy_local(cfg: RunConfig, run_dir: Path, nodes: int, insecure: bool, timeout: float,
                  say: Callable[[str], None], keep: bool, make_certificates: Callable[..., Any]) -> dict[str, Any]:
    run_dir = run_dir.resolve()
    deploy_dir = run_dir / "deployment"
    if deploy_dir.exists():
        shutil.rmtree(deploy_dir)
    flwr_home, logs = deploy_dir / "flwr-home", deploy_dir / "logs"
    env = flower_env(flwr_home)
    procs = Processes(env, logs)
    port = free_port()
    address = f"{HOST}:{port}"
    markers = [address]
    try:
        certs = None if insecure else make_certificates(deploy_dir / "certs", nodes=nodes)
        data = write_partitions(cfg, deploy_dir / "data", nodes)

        superlink = procs.start("superlink", superlink_command(port, None if certs is None else certs.directory),
                                cwd=deploy_dir)
        wait_for_port(port, superlink, 90.0, "flower-superlink", lambda: procs.log_text("superlink"))
        write_connection(flwr_home, address, None if certs is None else certs.ca_cert)
        state = {"superlink": address, "connection": CONNECTION, "flwr_home": str(flwr_home),
                 "root_certificates": None if certs is None else str(certs.ca_cert), "insecure": insecure,
                 "pids": {"superlink": superlink.pid}}
        (deploy_dir / "state.json").write_text(json.dumps(state, indent=2))
        if certs is not None:
            node_ids = register_nodes([k.public for k in certs.nodes], env)
            say(f"fedpriv: SuperLink on {address} (TLS, SuperNode authentication); registered {len(node_ids)} "
                "SuperNode keys")
        else:
            say(f"fedpriv: SuperLink on {address} (insecure)")
        for i in range(nodes):
            runtime = free_port()
            markers.append(f"{HOST}:{runtime}")
            node_cfg = {"data-path": str(data[i]), "client-id": str(i)}
            key = None if certs is None else certs.nodes[i].private
            proc = procs.start(f"supernode-{i}", supernode_command(
                address, runtime, node_cfg, None if certs is None else certs.ca_cert, key), cwd=deploy_dir)
            state["pids"][f"supernode-{i}"] = proc.pid
        (deploy_dir / "state.json").write_text(json.dumps(state, indent=2))
        say(f"fedpriv: {nodes} SuperNodes started, each with its own data file; logs in {logs}")

        summary, run_id, status = _run_app(cfg, run_dir, deploy_dir, env, procs, timeout, say)
        say(f"fedpriv: Flower run {run_id}: {status}")
        if not str(summary.get("stopped_reason", "")).startswith(("completed", "privacy budget")) or \
                not status.startswith("finished:completed"):
            raise DeployError(f"the run failed (Flower status {status}, stopped_reason "
                              f"{summary.get('stopped_reason', 'none')!r}); logs in {logs}")
        return summary
    finally:
        procs.stop_all()
        for pid in _stragglers(markers):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if not keep:
            shutil.rmtree(deploy_dir / "data", ignore_errors=True)
            shutil.rmtree(flwr_home / "apps", ignore_errors=True)


def _run_app(cfg: RunConfig, run_dir: Path, deploy_dir: Path, env: dict[str, str], procs: Processes,
             timeout: float, say: Callable[[str], None]) -> tuple[dict[str, Any], str, str]:
    """``flwr run`` the project against the local SuperLink; (summary, Flower run id, Flower status)."""
    import tomli_w

    run_config = deploy_dir / "run-config.toml"
    values = {**cfg.to_dict(), "out": str(run_dir)}
    run_config.write_text(tomli_w.dumps(values))
    summary_path = run_dir / "summary.json"
    summary_path.unlink(missing_ok=True)
    runner = procs.start("flwr-run", [flower_bin("flwr"), "run", str(project_root()), CONNECTION, "--run-config",
                                      str(run_config), "--stream"], cwd=deploy_dir)
    deadline = time.monotonic() + timeout
    run_id = ""
    while runner.poll() is None:
        if not run_id and (m := re.search(r"Successfully started run (\d+)", procs.log_text("flwr-run"))):
            run_id = m.group(1)
            say(f"fedpriv: Flower run {run_id} started → {run_dir}")
        infra = [(n, c) for n, c in procs.dead() if n == "superlink" or n.startswith("supernode")]
        if infra:
            name, code = infra[0]
            raise DeployError(f"{name} exited with code {code} during the run: {last_error(procs.log_text(name))}")
        if time.monotonic() > deadline:
            if run_id:
                subprocess.run([flower_bin("flwr"), "stop", run_id, CONNECTION], env=env, capture_output=True,
                               timeout=60)
            raise DeployError(f"the run did not finish within {timeout:g}s (raise --timeout); logs in "
                              f"{procs.log_dir}")
        time.sleep(0.5)
    text = procs.log_text("flwr-run")
    if not run_id and (m := re.search(r"Successfully started run (\d+)", text)):
        run_id = m.group(1)
    if not run_id:
        raise DeployError(f"flwr run did not start a run (exit {runner.returncode}): {last_error(text)}")
    status = run_status(run_id, env)
    for _ in range(20):  # the stream can end a moment before the SuperLink records the final status
        if status.startswith("finished"):
            break
        time.sleep(0.5)
        status = run_status(run_id, env)
    if not summary_path.is_file():
        raise DeployError(f"the ServerApp wrote no summary.json (Flower status {status}): {last_error(text)}")
    return json.loads(summary_path.read_text()), run_id, status
