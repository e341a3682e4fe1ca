"""Test support: a throwaway certificate authority and server certificates it signs.

`make_ca(dir)` writes a self-signed CA; `ca.issue(dir, "name")` writes a server
certificate for localhost and 127.0.0.1 and its unencrypted key (PEM, like
`listen.tls_cert`/`tls_key`); `client_context(ca)` trusts that CA and nothing else.
Made with the `cryptography` package, in memory, in milliseconds (EC P-256).
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HOSTS = ("localhost", "127.0.0.1")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey) -> Any:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path, password: bytes | None) -> None:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    )


@dataclass(frozen=True)
class ServerFiles:
    cert: Path
    key: Path


@dataclass(frozen=True)
class CertificateAuthority:
    path: Path  # the CA certificate (PEM): what clients trust
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    def issue(
        self,
        directory: Path,
        common_name: str,
        *,
        hosts: tuple[str, ...] = HOSTS,
        password: bytes | None = None,
    ) -> ServerFiles:
        """A server certificate for `hosts` signed by this CA, and its key."""
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        certificate = (
            _builder(_name(common_name), self.certificate.subject, key)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        files = ServerFiles(directory / f"{common_name}.pem", directory / f"{common_name}.key")
        files.cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        _write_key(key, files.key, password)
        return files


def make_ca(directory: Path, common_name: str = "pleo-proxy test CA") -> CertificateAuthority:
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        _builder(_name(common_name), _name(common_name), key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = directory / "ca.pem"
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return CertificateAuthority(path, key, certificate)


def client_context(ca: CertificateAuthority) -> ssl.SSLContext:
    """A client context that verifies the server against `ca` only (no system CAs)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies chain and host name
    context.load_verify_locations(cafile=ca.path)
    return context


def common_name(peer: Any) -> str:
    """The CN of `getpeercert()`'s subject."""
    assert peer is not None
    name: str = next(v for rdn in peer["subject"] for k, v in rdn if k == "commonName")
    return name
