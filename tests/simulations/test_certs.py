"""`fedpriv certs`: a CA, a SuperLink certificate that verifies for its hosts, and SuperNode keys Flower accepts."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from simulations.certs import make_certificates
from simulations.cli import main as fedpriv


def _handshake(certs: Path, server_name: str) -> str:
    """TLS handshake against a server using server.pem/server.key; the client trusts only ca.crt."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs / "server.pem", certs / "server.key")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                client_ctx.wrap_socket(raw, server_hostname=server_name) as tls:
            return tls.recv(2).decode()
    finally:
        thread.join(timeout=10)
        listener.close()


def test_server_certificate_verifies_for_every_host_against_the_ca(tmp_path: Path) -> None:
    made = make_certificates(tmp_path, hosts=("127.0.0.1", "localhost", "fl.example.org"), nodes=0)
    cert = x509.load_pem_x509_certificate(made.server_cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "fl.example.org"]
    assert _handshake(tmp_path, "127.0.0.1") == "ok"
    assert _handshake(tmp_path, "localhost") == "ok"
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(tmp_path, "other.example.org")  # not a SAN


def test_a_client_with_another_ca_is_refused(tmp_path: Path) -> None:
    make_certificates(tmp_path / "a")
    make_certificates(tmp_path / "b")
    (tmp_path / "a" / "ca.crt").write_bytes((tmp_path / "b" / "ca.crt").read_bytes())
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(tmp_path / "a", "127.0.0.1")


def test_node_keys_are_what_flower_1_41_loads(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key  # what `flwr supernode register` runs

    made = make_certificates(tmp_path, nodes=2)
    assert [k.private.name for k in made.nodes] == ["node-0", "node-1"]
    for key in made.nodes:
        private = load_ssh_private_key(key.private.read_bytes(), None)  # what `flower-supernode` runs
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        public = load_ssh_public_key(key.public.read_bytes())
        assert public.public_numbers() == private.public_key().public_numbers()
        assert try_load_public_key(key.public)  # an approved NIST curve, bytes for the SuperLink
        assert stat.S_IMODE(key.private.stat().st_mode) == 0o600
    assert stat.S_IMODE(made.ca_key.stat().st_mode) == 0o600 and stat.S_IMODE(made.server_key.stat().st_mode) == 0o600


def test_certs_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "certs"
    assert fedpriv(["certs", str(out), "--nodes", "3", "--hosts", "127.0.0.1", "superlink.lan"]) == 0
    assert sorted(p.name for p in (out / "nodes").iterdir()) == [
        "node-0", "node-0.pub", "node-1", "node-1.pub", "node-2", "node-2.pub"]
    assert "superlink.lan" in capsys.readouterr().out
    # Existing files are not replaced silently; bad input is one line each, exit 2.
    assert fedpriv(["certs", str(out)]) == 2
    assert fedpriv(["certs", str(out), "--nodes", "-1", "--hosts", "bad host", "--force"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"fedpriv: error: certs: {out} already holds ca.crt, server.pem, nodes; pass --force to replace them",
        "fedpriv: error: --hosts: expected an IP address or a DNS name, got 'bad host'",
        "fedpriv: error: --nodes: expected a count >= 0, got -1",
    ]
    assert fedpriv(["certs", str(out), "--force"]) == 0
