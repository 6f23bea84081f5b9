"""A certificate authority and certificates for a test deployment (``fedtune certs``).

Mutual TLS needs three kinds of files: a CA certificate that both sides trust, a server
certificate whose subject alternative names cover every name and address clients dial, and
one certificate per client. Making them with openssl takes a page of flags that are easy to
get subtly wrong (a missing SAN makes gRPC refuse the handshake with an unhelpful message), so
this module makes them with the ``cryptography`` package in one call.

These are for test deployments and private fleets: keys are ECDSA P-256, written with mode 0600,
and certificates last ``days`` days. A production fleet should use its own PKI.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtune.durable import write_file


class CertError(ValueError):
    """Bad arguments for the certificate helper (an unusable host name, an existing file)."""


@dataclass
class Pki:
    """Paths of what :func:`make_test_pki` wrote."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, tuple[Path, Path]] = field(default_factory=dict)  # name -> (cert, key)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedtune test deployment"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        host = host.strip()
        if not host:
            continue
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if any(c.isspace() or c in "/:@" for c in host):
                raise CertError(f"host {host!r} is neither an IP address nor a DNS name") from None
            names.append(x509.DNSName(host))
    if not names:
        raise CertError("give at least one host name or address the coordinator is reached at")
    return names


def _issue(subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
           days: int, *, ca: bool = False, hosts: Sequence[str] = (), usage=None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    issuer_name, issuer_key = issuer if issuer else (_name(subject), key)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                                      key_encipherment=False, data_encipherment=False, key_agreement=False,
                                                      encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName(_alt_names(hosts)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def make_test_pki(folder: str | Path, hosts: Sequence[str], clients: Sequence[str] = (), *, days: int = 30,
                  overwrite: bool = False) -> Pki:
    """Write ``ca.pem``/``ca-key.pem``, ``server.pem``/``server-key.pem`` (valid for ``hosts``)
    and ``<client>.pem``/``<client>-key.pem`` for each client name into ``folder``."""
    if days < 1:
        raise CertError("certificates must last at least one day")
    for client in clients:
        if not client or not all(c.isalnum() or c in "_.-" for c in client):
            raise CertError(f"client name {client!r}: use letters, digits, '_', '.' or '-'")
    if len(set(clients)) != len(clients):
        raise CertError("client names must be distinct")
    if {"ca", "server"} & set(clients):
        raise CertError("'ca' and 'server' are taken by the CA's and the coordinator's files")
    _alt_names(hosts)  # validate before writing anything
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _issue("fedtune test CA", ca_key, None, days, ca=True)
    issuer = (ca_cert.subject, ca_key)
    pki = Pki(out / "ca.pem", out / "ca-key.pem", out / "server.pem", out / "server-key.pem")
    files: list[tuple[Path, bytes, bool]] = [(pki.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), False), (pki.ca_key, _key_pem(ca_key), True)]

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _issue(hosts[0], server_key, issuer, days, hosts=hosts, usage=ExtendedKeyUsageOID.SERVER_AUTH)
    files += [(pki.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), False), (pki.server_key, _key_pem(server_key), True)]

    for client in clients:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(client, key, issuer, days, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
        paths = (out / f"{client}.pem", out / f"{client}-key.pem")
        pki.clients[client] = paths
        files += [(paths[0], cert.public_bytes(serialization.Encoding.PEM), False), (paths[1], _key_pem(key), True)]

    if not overwrite:
        for path, _, _ in files:
            if path.exists():
                raise CertError(f"{path} exists; pass --force to replace it")
    for path, data, secret in files:
        path.unlink(missing_ok=True)  # created afresh, so a replaced key gets mode 0600 too
        write_file(path, data, mode=0o600 if secret else 0o644)
    return pki
