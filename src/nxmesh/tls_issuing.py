"""Issuing the master's TLS material: the private CA and the server certificate it signs.

Imported by `nxmesh.tls.ensure_tls_material` only, so processes that merely build TLS
contexts (every agent) do not load ``cryptography.x509``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nxmesh.crypto.private_files import write_private_file
from nxmesh.tls import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    SERVER_CERT_FILE,
    SERVER_KEY_FILE,
    TLSFiles,
)

__all__ = ["issue_missing"]

_RENEW_BEFORE: Final = dt.timedelta(days=30)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _san(hostnames: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _encryption(password: bytes | None) -> serialization.KeySerializationEncryption:
    if password:
        return serialization.BestAvailableEncryption(password)
    return serialization.NoEncryption()


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey, password: bytes | None) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, _encryption(password)
    )
    tmp = path.with_name(path.name + ".new")
    tmp.unlink(missing_ok=True)
    write_private_file(tmp, pem)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _make_ca(directory: Path, password: bytes | None) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "NxMesh master CA")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    _write_key(directory / CA_KEY_FILE, key, password)
    _write_public(directory / CA_CERT_FILE, cert.public_bytes(serialization.Encoding.PEM))


def _load_key(path: Path, password: bytes | None) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=password or None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TypeError(f"{path} is not an EC private key")
    return key


def _make_server_cert(
    directory: Path, hostnames: Sequence[str], password: bytes | None, days: int
) -> None:
    ca_key = _load_key(directory / CA_KEY_FILE, password)
    ca_cert = x509.load_pem_x509_certificate((directory / CA_CERT_FILE).read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(hostnames), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(directory / SERVER_KEY_FILE, key, password)
    _write_public(directory / SERVER_CERT_FILE, cert.public_bytes(serialization.Encoding.PEM))


def _server_cert_current(directory: Path, hostnames: Sequence[str]) -> bool:
    path = directory / SERVER_CERT_FILE
    if not path.exists() or not (directory / SERVER_KEY_FILE).exists():
        return False
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    if cert.not_valid_after_utc - _now() < _RENEW_BEFORE:
        return False
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return set(san) == set(_san(hostnames))


def issue_missing(
    directory: Path,
    *,
    hostnames: Sequence[str],
    key_password: bytes | None,
    server_days: int,
) -> TLSFiles:
    """`nxmesh.tls.ensure_tls_material`'s work (see there)."""
    if not hostnames:
        raise ValueError("at least one host name is needed for the server certificate")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not (directory / CA_CERT_FILE).exists() or not (directory / CA_KEY_FILE).exists():
        _make_ca(directory, key_password)
    if not _server_cert_current(directory, hostnames):
        _make_server_cert(directory, hostnames, key_password, server_days)
    return TLSFiles(
        ca_cert=directory / CA_CERT_FILE,
        cert=directory / SERVER_CERT_FILE,
        key=directory / SERVER_KEY_FILE,
        key_password=key_password,
    )
