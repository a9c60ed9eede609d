"""The audit log, newest first, a page at a time (`nxmesh.master.api.paging`)."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Request, Response, get
from litestar.params import Parameter

from nxmesh.core.validation import TOKEN
from nxmesh.master.api._common import BEARER, ERRORS, perm
from nxmesh.master.api.context import CallerDep
from nxmesh.master.api.paging import (
    DEFAULT_LIMIT,
    LINK_HEADER,
    Cursor,
    PageLimit,
    decode_cursor,
    page_headers,
)
from nxmesh.master.api.schemas import AuditView

__all__ = ["list_audit"]

Since = Annotated[
    float | None, Parameter(ge=0, le=1e11, description="Only entries at or after this time.")
]


def _is_entry_id(key: str) -> bool:
    return TOKEN.reason(key) is None


@get(
    "/audit",
    opt=perm("audit:read"),
    tags=["audit"],
    security=BEARER,
    responses=ERRORS,
    response_headers=[LINK_HEADER],
)
async def list_audit(
    request: Request[Any, Any, Any],
    caller: CallerDep,
    limit: PageLimit = DEFAULT_LIMIT,
    since: Since = None,
    cursor: Cursor = None,
) -> Response[list[AuditView]]:
    """Who did what to which resource, when and from where; newest first. Older entries:
    follow the ``Link`` header's ``rel="next"`` URL until there is none."""
    before = None if cursor is None else decode_cursor(cursor, _is_entry_id)
    entries = await caller.services.storage.list_audit(limit=limit, since=since, before=before)
    headers = page_headers(request, entries, limit, {"limit": limit, "since": since})
    views = [
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
    return Response(views, headers=headers)
