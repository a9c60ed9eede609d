"""Certificates: upload (validated), list and show (never the private key), delete.

An upload is checked before anything is stored: the PEM parses, the first certificate is
the leaf and each next one issued the previous (chain order), none has expired or is not
yet valid, the leaf names at least one DNS name in its subjectAltName, and the private
key — unencrypted PEM, RSA or EC — belongs to the leaf. The key is stored encrypted with
the master key (AES-GCM) by the storage backend.
"""

from __future__ import annotations

from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from litestar import Controller, delete, get, post, put
from litestar.params import JSONBody

from nxmesh.core import validation as v
from nxmesh.core.errors import Problem, ValidationError
from nxmesh.core.records import StoredCertificate
from nxmesh.master.api._common import BEARER, ERRORS, Name, Workspace, perm
from nxmesh.master.api.context import Caller, CallerDep
from nxmesh.master.api.schemas import CertificateUpload, CertificateView
from nxmesh.master.problems import Conflict, NotFound

__all__ = ["CertificateController", "validate_upload"]


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _spki(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey | object) -> bytes:
    public_bytes = getattr(key, "public_bytes", None)
    if public_bytes is None:
        return b""
    data: bytes = public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data


def validate_upload(
    workspace: str, upload: CertificateUpload, *, now: datetime | None = None
) -> StoredCertificate:
    """The record to store for `upload`, or `ValidationError` naming every problem."""
    at = now or datetime.now(UTC)
    problems: list[Problem] = []
    if "PRIVATE KEY" in upload.certificate:
        raise ValidationError(
            [Problem("certificate", "contains a private key; send it in private_key only")]
        )
    try:
        certs = x509.load_pem_x509_certificates(upload.certificate.encode("utf-8"))
    except ValueError as exc:
        raise ValidationError(
            [Problem("certificate", f"is not PEM certificate data: {exc}")]
        ) from None
    try:
        key = serialization.load_pem_private_key(upload.private_key.encode("utf-8"), password=None)
    except TypeError:
        problems.append(
            Problem("private_key", "is encrypted; upload it without a passphrase (it is "
                    "encrypted at rest with the master key)")
        )  # fmt: skip
        key = None
    except (ValueError, UnsupportedAlgorithm):
        problems.append(Problem("private_key", "is not a PEM private key"))
        key = None
    if key is not None and not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        problems.append(Problem("private_key", "must be an RSA or EC key (what nginx serves)"))
        key = None

    leaf = certs[0]
    if key is not None and _spki(key.public_key()) != _spki(leaf.public_key()):
        problems.append(Problem("private_key", "does not belong to the (first) certificate"))
    for i, cert in enumerate(certs):
        where = "certificate" if i == 0 else f"certificate.chain[{i}]"
        if cert.not_valid_after_utc <= at:
            problems.append(Problem(where, f"expired on {cert.not_valid_after_utc:%Y-%m-%d}"))
        if cert.not_valid_before_utc > at:
            problems.append(
                Problem(where, f"is not valid before {cert.not_valid_before_utc:%Y-%m-%d}")
            )
        if i + 1 < len(certs):
            issuer = certs[i + 1]
            try:
                cert.verify_directly_issued_by(issuer)
            except (ValueError, TypeError, InvalidSignature):
                problems.append(
                    Problem(
                        f"certificate.chain[{i + 1}]",
                        f"did not issue the certificate before it ({cert.subject.rfc4514_string()})"
                        "; order the chain leaf first, then each issuer",
                    )
                )
    domains: list[str] = []
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = san.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    for name in names:
        lowered = name.lower()
        if v.CERT_DOMAIN.reason(lowered) is None:
            domains.append(lowered)
        else:
            problems.append(Problem("certificate", f"subjectAltName {name!r} is not a DNS name"))
    if not names:
        problems.append(Problem("certificate", "names no DNS name in its subjectAltName"))
    if problems:
        raise ValidationError(problems)
    assert key is not None
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")
    return StoredCertificate(
        workspace=workspace,
        name=upload.name,
        cert_pem=_pem(leaf),
        chain_pem="".join(_pem(c) for c in certs[1:]),
        key_pem=key_pem,
        not_after=leaf.not_valid_after_utc.timestamp(),
        domains=tuple(domains),
        source="upload",
    )


def _view(stored: StoredCertificate) -> CertificateView:
    leaf = x509.load_pem_x509_certificate(stored.cert_pem.encode("ascii"))
    chain = stored.chain_pem.count("BEGIN CERTIFICATE")
    return CertificateView(
        workspace=stored.workspace,
        name=stored.name,
        domains=tuple(stored.domains),
        subject=leaf.subject.rfc4514_string(),
        issuer=leaf.issuer.rfc4514_string(),
        not_before=leaf.not_valid_before_utc.timestamp(),
        not_after=stored.not_after,
        chain_length=1 + chain,
        fingerprint_sha256=leaf.fingerprint(hashes.SHA256()).hex(),
        source=stored.source,
    )


class CertificateController(Controller):
    """TLS certificates sites refer to by name (``tls: {certificate: <name>}``)."""

    path = "/workspaces/{workspace:str}/certificates"
    tags = ("certificates",)
    security = BEARER

    @get("/", opt=perm("certificate:read"), responses=ERRORS)
    async def list_certificates(
        self, workspace: Workspace, caller: CallerDep
    ) -> list[CertificateView]:
        return [_view(c) for c in await caller.services.storage.list_certificates(workspace)]

    @get("/{name:str}", opt=perm("certificate:read"), responses=ERRORS)
    async def get_certificate(
        self, workspace: Workspace, name: Name, caller: CallerDep
    ) -> CertificateView:
        stored = await caller.services.storage.get_certificate(workspace, name)
        if stored is None:
            raise NotFound(f"no certificate named {name!r} in workspace {workspace!r}")
        return _view(stored)

    @post("/", opt=perm("certificate:write"), responses=ERRORS)
    async def upload(
        self, workspace: Workspace, data: JSONBody[CertificateUpload], caller: CallerDep
    ) -> CertificateView:
        """Upload a certificate with its chain and key (409 when the name is taken)."""
        storage = caller.services.storage
        if await storage.get_certificate(workspace, data.name) is not None:
            raise Conflict(f"certificate {data.name!r} exists; use PUT to replace it")
        return await self._store(caller, workspace, data, "certificate.upload")

    @put("/{name:str}", opt=perm("certificate:write"), responses=ERRORS)
    async def replace(
        self, workspace: Workspace, name: Name, data: JSONBody[CertificateUpload], caller: CallerDep
    ) -> CertificateView:
        """Upload or replace the certificate `name` (renewal)."""
        if data.name != name:
            raise ValidationError([Problem("name", f"is {data.name!r} but the URL names {name!r}")])
        return await self._store(caller, workspace, data, "certificate.replace")

    async def _store(
        self, caller: Caller, workspace: str, data: CertificateUpload, action: str
    ) -> CertificateView:
        stored = validate_upload(workspace, data)
        s = caller.services
        await s.storage.put_certificate(stored)
        await caller.audit(
            action,
            f"workspaces/{workspace}/certificates/{data.name}",
            workspace=workspace,
            domains=list(stored.domains),
            not_after=stored.not_after,
        )
        await s.publish(
            "certificate.updated",
            {"name": data.name, "domains": list(stored.domains), "not_after": stored.not_after},
            workspace=workspace,
        )
        return _view(stored)

    @delete("/{name:str}", opt=perm("certificate:write"), responses=ERRORS)
    async def delete_certificate(self, workspace: Workspace, name: Name, caller: CallerDep) -> None:
        """Delete a certificate the latest desired state does not refer to (409 otherwise)."""
        s = caller.services
        latest = await s.storage.latest_version(workspace)
        if latest is not None and any(c.name == name for c in latest.state.certificates):
            raise Conflict(
                f"certificate {name!r} is used by version {latest.number}; remove it from the "
                "desired state first"
            )
        if not await s.storage.delete_certificate(workspace, name):
            raise NotFound(f"no certificate named {name!r} in workspace {workspace!r}")
        await caller.audit(
            "certificate.delete", f"workspaces/{workspace}/certificates/{name}", workspace=workspace
        )
        await s.publish("certificate.deleted", {"name": name}, workspace=workspace)
