"""A throwaway PKI for certificate tests: a root, an intermediate and leaves on demand.

::

    pki = Pki()
    leaf = pki.leaf("www.example.test", days=10)
    validate_certificate(pki.chain(leaf), leaf.key_pem, server_names=["www.example.test"])
"""

from __future__ import annotations

import datetime as dt

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from nxmesh.core.records import StoredCertificate

__all__ = ["Issued", "Pki", "cert_pem", "key_pem"]


Key = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def key_pem(key: Key) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@attrs.define
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: Key

    @property
    def pem(self) -> str:
        return cert_pem(self.cert)

    @property
    def key_pem(self) -> str:
        return key_pem(self.key)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@attrs.define
class Pki:
    """A root, an intermediate under it, and leaves under the intermediate."""

    root: Issued = attrs.field(init=False)
    intermediate: Issued = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.root = self.ca("Test Root", None)
        self.intermediate = self.ca("Test Intermediate", self.root)

    def ca(self, cn: str, issuer: Issued | None) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(issuer.cert.subject if issuer else _name(cn))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(days=10))
            .not_valid_after(_now() + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        )
        cert = builder.sign(issuer.key if issuer else key, hashes.SHA256())
        return Issued(cert, key)

    def leaf(
        self,
        *names: str,
        days: float = 90,
        not_before_days: float = -1,
        key: Key | None = None,
        issuer: Issued | None = None,
        san: bool = True,
    ) -> Issued:
        """A server certificate valid from `not_before_days` to `days` from now."""
        key = key or ec.generate_private_key(ec.SECP256R1())
        issuer = issuer or self.intermediate
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(names[0] if names else "no-san"))
            .issuer_name(issuer.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() + dt.timedelta(days=not_before_days))
            .not_valid_after(_now() + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if san and names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
            )
        return Issued(builder.sign(issuer.key, hashes.SHA256()), key)

    def chain(self, leaf: Issued) -> str:
        """Leaf, then intermediate: the order servers send."""
        return leaf.pem + self.intermediate.pem

    @staticmethod
    def crl(ca: Issued, *revoked: Issued, days: float = 7) -> str:
        """A PEM revocation list of `ca` listing `revoked`, valid for `days` from now."""
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca.cert.subject)
            .last_update(now - dt.timedelta(minutes=5))
            .next_update(now + dt.timedelta(days=days))
        )
        for issued in revoked:
            entry = x509.RevokedCertificateBuilder().serial_number(issued.cert.serial_number)
            builder = builder.add_revoked_certificate(entry.revocation_date(now).build())
        crl = builder.sign(ca.key, hashes.SHA256())
        return crl.public_bytes(serialization.Encoding.PEM).decode()

    def stored(
        self,
        name: str,
        *names: str,
        days: float = 90,
        workspace: str = "default",
        source: str = "upload",
    ) -> StoredCertificate:
        """A storage record for a new leaf naming `names` (key unencrypted, as stored)."""
        leaf = self.leaf(*names, days=days)
        return StoredCertificate(
            workspace=workspace,
            name=name,
            cert_pem=leaf.pem,
            chain_pem=self.intermediate.pem,
            key_pem=leaf.key_pem,
            not_after=leaf.cert.not_valid_after_utc.timestamp(),
            domains=names,
            source=source,
        )
