"""Per-request context: request id, structured access log, latency metric, trace span.

The request id is taken from a well-formed ``X-Request-ID`` header or generated, bound to
every structlog line of the request (``structlog.contextvars``), returned in the
``X-Request-ID`` response header and put in problem responses. Latency is observed by
route *template* (``/api/v1/workspaces/{workspace:str}/sites``), never the raw path, so
the metric's cardinality stays bounded.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import structlog
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from nxmesh.master.request_ids import REQUEST_ID_HEADER, request_id_of
from nxmesh.master.tracing import span

if TYPE_CHECKING:
    from nxmesh.master.app import MasterServices

__all__ = ["REQUEST_ID_HEADER", "request_context"]

log = structlog.get_logger("nxmesh.master.access")


def request_context(app: ASGIApp) -> ASGIApp:
    """Litestar middleware factory; see the module docstring."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await app(scope, receive, send)
            return
        request_id = request_id_of(scope)
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = request_id
        route = scope.get("path_template") or "<unmatched>"
        is_http = scope["type"] == ScopeType.HTTP
        method = str(scope.get("method", "WEBSOCKET"))
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                message["headers"] = headers
            await send(message)

        started = time.perf_counter()
        with (
            structlog.contextvars.bound_contextvars(request_id=request_id),
            span(f"{method} {route}", {"http.method": method, "http.route": route}),
        ):
            try:
                await app(scope, receive, send_with_id)
            finally:
                elapsed = time.perf_counter() - started
                if is_http:
                    _observe(scope, route, method, status, elapsed)

    return middleware


def _observe(scope: Scope, route: str, method: str, status: int, elapsed: float) -> None:
    litestar_app = scope.get("app")
    services: MasterServices | None = getattr(litestar_app, "state", {}).get("services")
    if services is not None:
        services.metrics.api_request_seconds.labels(
            route=route, method=method, status=str(status)
        ).observe(elapsed)
    principal = scope.get("state", {}).get("principal")
    log.info(
        "request",
        method=method,
        path=scope.get("path"),
        route=route,
        status=status,
        duration_ms=round(elapsed * 1000, 2),
        principal=getattr(principal, "subject", None),
    )
