"""Per-run TLS material: a throwaway CA and a server certificate it signs (``cryptography``).

``make_run_certificates(directory)`` writes ``ca.pem``, ``server.pem`` and
``server.key`` (owner-only) for ``localhost``, ``127.0.0.1`` and ``::1``: the reference
platform serves HTTPS and WSS with them, bk-sim's own broker node AMQPS, and leaves verify
both against ``ca.pem``. Keys are EC P-256 (fast to make: a run pays milliseconds) and
live only as long as the run folder. Nothing here is for production use.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: Names every run certificate is valid for (leaves and the harness use loopback).
DEFAULT_NAMES: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
VALID_DAYS = 7
#: Environment variables the published client's libraries read a CA bundle from:
#: requests (HTTP) and OpenSSL's default paths (AMQPS via pika, WSS).
CA_ENV_VARS: tuple[str, ...] = ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")


@dataclass(frozen=True)
class RunCertificates:
    """PEM files of one run: the CA leaves trust, the server's certificate and key."""

    ca: Path
    cert: Path
    key: Path

    def client_env(self) -> dict[str, str]:
        """What a leaf process sets so its client trusts this run's CA (and only it)."""
        return {name: str(self.ca) for name in CA_ENV_VARS}


def make_run_certificates(
    directory: str | Path, names: tuple[str, ...] = DEFAULT_NAMES, *, common_name: str = "bk-sim"
) -> RunCertificates:
    """Write a fresh CA and a server certificate for ``names`` into ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=VALID_DAYS)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{common_name} run CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    paths = RunCertificates(out / "ca.pem", out / "server.pem", out / "server.key")
    paths.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    fd = os.open(paths.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key_pem)
    return paths
