"""Certificates: upload (validated), list and show (never the private key), delete.

An upload is checked by `nxmesh.certs.validate_certificate` before anything is stored:
the PEM parses, the private key (unencrypted RSA ≥ 2048 bits or EC) belongs to the leaf,
the chain is in order (leaf first, then each issuer), nothing has expired or is not yet
valid, the leaf has DNS names in its subjectAltName and — for a replacement — they still
cover the server names of the sites using it. A leaf expiring within 30 days is accepted
with a warning. The key is stored encrypted with the master key (AES-GCM).
"""

from __future__ import annotations

from collections.abc import Sequence

from litestar import Controller, delete, get, post, put
from litestar.params import JSONBody

from nxmesh.certs.validate import (
    certificate_users,
    fingerprint,
    load_pem_chain,
    validate_certificate,
)
from nxmesh.core.errors import Problem, ValidationError
from nxmesh.core.records import StoredCertificate
from nxmesh.master.api._common import BEARER, ERRORS, Name, Workspace, perm
from nxmesh.master.api.context import Caller, CallerDep
from nxmesh.master.api.schemas import CertificateUpload, CertificateView, FieldProblem
from nxmesh.master.problems import Conflict, NotFound

__all__ = ["CertificateController"]


async def _server_names(caller: Caller, workspace: str, name: str) -> list[str]:
    """The names certificate `name` serves in the latest state: its sites' server names,
    the domains declared for it when TCP streams end TLS with it (`certificate_users`)."""
    latest = await caller.services.storage.latest_version(workspace)
    if latest is None:
        return []
    found = (
        host
        for _, cert, names in certificate_users(latest.state)
        if cert == name
        for _, host in names
    )
    return list(dict.fromkeys(found))


def _view(stored: StoredCertificate, warnings: Sequence[Problem] = ()) -> CertificateView:
    leaf = load_pem_chain(stored.cert_pem)[0]
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
        fingerprint_sha256=fingerprint(leaf),
        source=stored.source,
        warnings=tuple(
            FieldProblem(path=w.path, message=w.message, severity=w.severity) for w in warnings
        ),
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
        names = await _server_names(caller, workspace, data.name)
        check = validate_certificate(data.certificate, data.private_key, server_names=names)
        stored = check.stored(workspace, data.name)
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
        return _view(stored, check.warnings)

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
