"""Certificates and SuperNode keys for a deployment: ``fedpriv certs DIR``.

Everything is made with the ``cryptography`` package (a Flower dependency), in the formats Flower 1.41 reads:

* ``ca.crt`` / ``ca.key`` — a self-signed certificate authority (EC P-384). ``ca.crt`` is what every SuperNode
  (``flower-supernode --root-certificates``) and the ``flwr`` CLI (``root-certificates`` of the SuperLink
  connection) use to verify the SuperLink; keep ``ca.key`` off the devices.
* ``server.pem`` / ``server.key`` — the SuperLink's TLS certificate, signed by the CA, with every given host as a
  subject alternative name (IP addresses as IP SANs, names as DNS SANs): ``flower-superlink --ssl-certfile
  server.pem --ssl-keyfile server.key --ssl-ca-certfile ca.crt``.
* ``nodes/node-<i>`` / ``nodes/node-<i>.pub`` — one EC (P-384) key pair per SuperNode for SuperNode
  authentication, the private key in OpenSSH format (``flower-supernode --auth-supernode-private-key``), the
  public key as an OpenSSH line (``flwr supernode register nodes/node-<i>.pub <connection>``). Flower 1.41's
  SuperNode signs a timestamp with this key on every Fleet request; a SuperLink started with
  ``--enable-supernode-auth`` only accepts nodes whose public key was registered through its Control API.

Private keys are written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("127.0.0.1", "localhost")
VALID_DAYS = 365


@dataclass(frozen=True)
class NodeKey:
    """One SuperNode's authentication key pair (OpenSSH private key, OpenSSH public key line)."""

    private: Path
    public: Path


@dataclass(frozen=True)
class CertificateSet:
    """Paths of what :func:`make_certificates` wrote."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    nodes: tuple[NodeKey, ...]


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if private:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(path, 0o600)
    else:
        path.write_bytes(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _subject_alt_names(hosts: tuple[str, ...]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_node_key(private_path: Path) -> NodeKey:
    """Write one SuperNode key pair: ``private_path`` (OpenSSH private key) and ``<private_path>.pub``."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    pub_path = private_path.with_name(private_path.name + ".pub")
    _write(private_path, private, private=True)
    _write(pub_path, public + b"\n")
    return NodeKey(private_path, pub_path)


def check_hosts(hosts: list[str] | tuple[str, ...]) -> list[str]:
    """One line per unusable host name (empty: all usable)."""
    errors = []
    for host in hosts:
        if not host or any(c.isspace() for c in host) or "/" in host or (":" in host and not _is_ip(host)):
            errors.append(f"--hosts: expected an IP address or a DNS name, got {host!r}")
    return errors


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def make_certificates(
    directory: str | Path, hosts: tuple[str, ...] | list[str] = DEFAULT_HOSTS, nodes: int = 0,
    valid_days: int = VALID_DAYS,
) -> CertificateSet:
    """Write a CA, a SuperLink certificate for ``hosts`` and ``nodes`` SuperNode key pairs into ``directory``.

    Parameters
    ----------
    directory : str or Path
        Created if needed; existing files of the same names are replaced.
    hosts : sequence of str
        Addresses the SuperLink is reached at (subject alternative names of its certificate).
    nodes : int
        How many SuperNode authentication key pairs to write (``nodes/node-0`` …).
    valid_days : int
        Validity of the certificates.

    Returns
    -------
    CertificateSet
        The paths written.
    """
    hosts = tuple(hosts)
    if not hosts:
        raise ValueError("at least one host is needed for the SuperLink certificate")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    not_before, not_after = now - dt.timedelta(minutes=5), now + dt.timedelta(days=valid_days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedpriv"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "fedpriv deployment CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedpriv"),
                             x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    server_cert = (
        x509.CertificateBuilder().subject_name(server_name).issuer_name(ca_name)
        .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(_subject_alt_names(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    paths = CertificateSet(out, out / "ca.crt", out / "ca.key", out / "server.pem", out / "server.key",
                           tuple(make_node_key(out / "nodes" / f"node-{i}") for i in range(nodes)))
    _write(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(paths.ca_key, _pem_key(ca_key), private=True)
    _write(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    _write(paths.server_key, _pem_key(server_key), private=True)
    return paths
