"""`fedpriv deploy` without starting anything: argument checks, the insecure warning, the commands it would run."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulations.cli import main as fedpriv
from simulations.deploy import INSECURE_WARNING, superlink_command, supernode_command


def test_insecure_needs_the_flag_and_always_warns(capsys: pytest.CaptureFixture[str]) -> None:
    assert fedpriv(["deploy", "local", "--insecure", "--nodes", "0", "--set", "num-round=2"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"fedpriv: {INSECURE_WARNING}",
        "fedpriv: error: --nodes: expected at least 1 SuperNode, got 0",
        "fedpriv: error: unknown key 'num-round' (did you mean 'num-rounds'?)",
    ]
    assert fedpriv(["deploy", "local", "--nodes", "2", "--set", "num-clients=3"]) == 2
    err = capsys.readouterr().err
    assert "warning" not in err
    assert "num-clients: deploy runs one client per SuperNode; got num-clients=3 with --nodes 2" in err
    assert fedpriv(["deploy", "local", "words-histogram", "--nodes", "2"]) == 2
    assert "'words' (histograms) is simulation-only" in capsys.readouterr().err


def test_secure_commands_use_tls_and_node_authentication(tmp_path: Path) -> None:
    link = superlink_command(9000, tmp_path)
    assert "--insecure" not in link and "--enable-supernode-auth" in link
    assert link[link.index("--ssl-certfile") + 1] == str(tmp_path / "server.pem")
    assert link[link.index("--ssl-ca-certfile") + 1] == str(tmp_path / "ca.crt")
    node = supernode_command("127.0.0.1:9000", 9100, {"data-path": "/d/n.npz", "client-id": "0"}, tmp_path / "ca.crt",
                             tmp_path / "node-0")
    assert "--insecure" not in node
    assert node[node.index("--root-certificates") + 1] == str(tmp_path / "ca.crt")
    assert node[node.index("--auth-supernode-private-key") + 1] == str(tmp_path / "node-0")
    assert node[node.index("--node-config") + 1] == 'data-path="/d/n.npz" client-id="0"'
    # Insecure only when asked for: no certificates, no keys.
    assert superlink_command(9000, None)[-1] == "--insecure"
    insecure_node = supernode_command("127.0.0.1:9000", 9100, {}, None, None)
    assert insecure_node[-1] == "--insecure" and "--auth-supernode-private-key" not in insecure_node
