"""The audit log, newest first."""

from __future__ import annotations

from typing import Annotated

from litestar import get
from litestar.params import Parameter

from nxmesh.master.api._common import BEARER, ERRORS, perm
from nxmesh.master.api.context import CallerDep
from nxmesh.master.api.schemas import AuditView

__all__ = ["list_audit"]

Limit = Annotated[int, Parameter(ge=1, le=1000, description="At most this many entries.")]
Since = Annotated[
    float | None, Parameter(ge=0, le=1e11, description="Only entries at or after this time.")
]


@get("/audit", opt=perm("audit:read"), tags=["audit"], security=BEARER, responses=ERRORS)
async def list_audit(caller: CallerDep, limit: Limit = 100, since: Since = None) -> list[AuditView]:
    """Who did what to which resource, when and from where."""
    entries = await caller.services.storage.list_audit(limit=limit, since=since)
    return [
        AuditView(
            id=e.id,
            ts=e.ts,
            actor=e.actor,
            action=e.action,
            resource=e.resource,
            remote_addr=e.remote_addr,
            details=dict(e.details),
        )
        for e in entries
    ]
