"""``/healthz`` (the process is up), ``/readyz`` (storage answers), ``/metrics``."""

from __future__ import annotations

from typing import Final

import anyio
import structlog
from litestar import Response, get
from litestar.openapi import ResponseSpec

from nxmesh.core.interfaces import StorageBackend
from nxmesh.master.api._common import BEARER, PUBLIC_ERRORS
from nxmesh.master.api.context import ServicesDep
from nxmesh.master.api.schemas import Health
from nxmesh.master.metrics import CONTENT_TYPE

__all__ = ["healthz", "metrics", "readyz"]

_READY_TIMEOUT: Final = 5.0

log = structlog.get_logger("nxmesh.master.api")


@get(
    "/healthz",
    opt={"public": True},
    tags=["health"],
    summary="Liveness: the process serves",
    responses=PUBLIC_ERRORS,
)
async def healthz() -> Health:
    return Health(status="ok")


@get(
    "/readyz",
    opt={"public": True},
    tags=["health"],
    summary="Readiness: storage is reachable",
    media_type="application/json",
    responses={503: ResponseSpec(Health, description="Storage does not answer")},
)
async def readyz(services: ServicesDep) -> Response[Health]:
    detail = ""
    with anyio.move_on_after(_READY_TIMEOUT) as scope:
        try:
            await _ping(services.storage)
        except Exception as exc:  # readiness must answer whatever broke; the log says what
            log.warning("readiness probe failed", error_type=type(exc).__name__, error=str(exc))
            detail = f"storage: {type(exc).__name__}"
    if scope.cancelled_caught:
        detail = f"storage did not answer within {_READY_TIMEOUT:.0f} s"
    if detail:
        return Response(Health(status="unavailable", detail=detail), status_code=503)
    return Response(Health(status="ok"))


async def _ping(storage: StorageBackend) -> None:
    """One storage round trip: the backend's ``ping`` when it has one (SQL backends:
    its worker thread is abandoned at the timeout, so a hung database cannot keep the
    probe waiting for the thread), else a read."""
    ping = getattr(storage, "ping", None)
    if callable(ping):
        await ping()
    else:
        await storage.get_user("readyz-probe")


@get(
    "/metrics",
    opt={"permission": "metrics:read", "public_setting": "public_metrics"},
    security=BEARER,
    tags=["health"],
    summary="Prometheus metrics (text exposition format)",
    media_type=CONTENT_TYPE,
)
async def metrics(services: ServicesDep) -> Response[bytes]:
    return Response(services.metrics.render(), media_type=CONTENT_TYPE)
