"""Request ids: taken from a well-formed ``X-Request-ID`` header or generated.

Apart from the request middleware (`nxmesh.master.api.middleware`) so the problem
responses (`nxmesh.master.problems`) can give one to a request no route took without
importing the API package, whose routes import the problems module.
"""

from __future__ import annotations

import re
import uuid
from typing import Final

import structlog
from litestar.types import Scope

__all__ = ["REQUEST_ID_HEADER", "request_id_of", "unrouted_request_id"]

REQUEST_ID_HEADER: Final = "x-request-id"
_VALID_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

log = structlog.get_logger("nxmesh.master.access")


def request_id_of(scope: Scope) -> str:
    """The client's ``X-Request-ID`` when it is well-formed, else a new random id."""
    for name, value in scope.get("headers", ()):
        if name == REQUEST_ID_HEADER.encode():
            text = value.decode("latin-1")
            if _VALID_ID.fullmatch(text):
                return text
    return uuid.uuid4().hex


def unrouted_request_id(scope: Scope, status: int) -> str:
    """The request id of a request no route took (Litestar answers 404 and 405 before any
    middleware runs): made here, stored like the middleware does, and logged once."""
    request_id = request_id_of(scope)
    scope.setdefault("state", {})["request_id"] = request_id
    log.info(
        "request",
        method=str(scope.get("method", "WEBSOCKET")),
        path=scope.get("path"),
        route="<unmatched>",
        status=status,
        request_id=request_id,
    )
    return request_id
