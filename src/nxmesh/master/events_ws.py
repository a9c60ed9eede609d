"""The events WebSocket, ``/api/v1/events``: version, rollout, agent and audit events live.

Authentication is a bearer token (an access token or an API token), sent either in the
``Authorization: Bearer`` header of the upgrade request or — for browsers, which cannot
set that header — as the first message, within 10 seconds::

    {"type": "auth", "token": "<access token>"}

Never as a query parameter: URLs end up in access logs and browser history.

The caller needs ``event:read``; each event is then delivered only if the caller may read
its kind in its workspace (``version.*`` → ``config:read``, ``agent.*`` → ``agent:read``,
``audit.*`` → ``audit:read``... see `nxmesh.master.rbac.EVENT_PERMISSIONS`). A client may
narrow the stream at any time::

    {"type": "subscribe", "kinds": ["version.*", "rollout.*"], "workspaces": ["prod"]}

Server messages are ``{"type": "ready", ...}`` once authenticated, then
``{"type": "event", "kind", "workspace", "id", "ts", "payload"}``. Close codes: 4401 not
authenticated, token expired or revoked (the socket closes when the token does), 4403
missing ``event:read``, 4400 a malformed message, 4408 the client fell behind (reconnect).

The credentials are checked again before events are delivered, as the REST API checks
them on every request: right away after an audited change to users or API tokens, and at
least every `RECHECK_INTERVAL` seconds otherwise. A revoked API token, a deleted or
disabled owner, or a login session that ended (logout, new password, changed roles)
closes the socket (4401); an API token's owner with changed roles changes what it
delivers.
"""

from __future__ import annotations

import contextlib
import fnmatch
import time
from typing import Any, Final

import anyio
import attrs
import structlog
from litestar import WebSocket, websocket
from litestar.exceptions import SerializationException, WebSocketDisconnect

from nxmesh.core.events import Event
from nxmesh.core.interfaces import Credentials, Principal
from nxmesh.master.api.context import credentials_from, remote_addr, services_of
from nxmesh.master.app import MasterServices
from nxmesh.master.auth.errors import AuthenticationError
from nxmesh.master.rbac import event_permission

__all__ = ["AUTH_TIMEOUT", "EVENTS_PATH", "events_websocket"]

EVENTS_PATH: Final = "/api/v1/events"
AUTH_TIMEOUT: Final = 10.0
CLOSE_UNAUTHENTICATED: Final = 4401
CLOSE_FORBIDDEN: Final = 4403
CLOSE_BAD_MESSAGE: Final = 4400
CLOSE_TOO_SLOW: Final = 4408
RECHECK_INTERVAL: Final = 30.0
_NEEDS_EVENT_READ: Final = "permission 'event:read' is required"
# Audited actions after which the stream's credentials are checked before the next event.
_ACCESS_ACTIONS: Final = ("user.", "api_token.", "auth.logout", "auth.password_change")

log = structlog.get_logger("nxmesh.master.events")


@attrs.define
class _Filter:
    kinds: tuple[str, ...] = ("*",)
    workspaces: tuple[str, ...] | None = None

    def matches(self, event: Event) -> bool:
        if self.workspaces is not None and event.workspace not in self.workspaces:
            return False
        return any(fnmatch.fnmatchcase(event.kind, pattern) for pattern in self.kinds)


class _BadMessage(Exception):
    pass


def _strings(value: object, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and len(v) < 128 for v in value):
        raise _BadMessage(f"{what} must be a list of strings")
    if len(value) > 64:
        raise _BadMessage(f"{what} may hold at most 64 entries")
    return tuple(value)


async def _authenticate(
    socket: WebSocket[Any, Any, Any], services: MasterServices
) -> tuple[Principal, float | None, Credentials]:
    credentials = credentials_from(socket)
    if credentials is None:
        with anyio.fail_after(AUTH_TIMEOUT):
            try:
                message = await socket.receive_json()
            except (SerializationException, ValueError, TypeError):
                raise AuthenticationError(
                    "the first message must be JSON", reason="malformed"
                ) from None
        token = message.get("token") if isinstance(message, dict) else None
        if (
            not isinstance(message, dict)
            or message.get("type") != "auth"
            or not isinstance(token, str)
        ):
            raise AuthenticationError(
                'send {"type": "auth", "token": "..."} first, or an Authorization header',
                reason="missing",
            )
        credentials = Credentials("bearer", {"token": token}, remote_addr=remote_addr(socket))
    principal = await services.auth.authenticate(credentials)
    expires_at = await services.auth.expiry_of(credentials.values["token"], principal)
    return principal, expires_at, credentials


def _changes_access(event: Event) -> bool:
    action = event.payload.get("action") if event.kind == "audit.recorded" else None
    return isinstance(action, str) and action.startswith(_ACCESS_ACTIONS)


def _subscription(message: object) -> dict[str, Any]:
    if not isinstance(message, dict) or message.get("type") != "subscribe":
        raise _BadMessage('expected {"type": "subscribe", ...}')
    return message


async def _read_client(
    socket: WebSocket[Any, Any, Any], selection: _Filter, done: anyio.CancelScope
) -> None:
    """Apply the client's ``subscribe`` messages; end the stream when the client leaves."""
    try:
        while True:
            message = _subscription(await socket.receive_json())
            if "kinds" in message:
                selection.kinds = _strings(message["kinds"], "kinds")
            if "workspaces" in message:
                workspaces = message["workspaces"]
                selection.workspaces = (
                    None if workspaces is None else _strings(workspaces, "workspaces")
                )
    except WebSocketDisconnect:
        done.cancel()
    except (_BadMessage, SerializationException, ValueError, TypeError) as exc:
        await _close(socket, CLOSE_BAD_MESSAGE, str(exc)[:120])
        done.cancel()


async def _close(socket: WebSocket[Any, Any, Any], code: int, reason: str) -> None:
    with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):  # already gone
        await socket.close(code=code, reason=reason)


def _visible(services: MasterServices, principal: Principal, event: Event) -> bool:
    return services.rbac.allowed(principal, event_permission(event.kind), event.workspace)


@websocket(EVENTS_PATH, opt={"auth": "handler", "permission": "event:read"})
async def events_websocket(socket: WebSocket[Any, Any, Any]) -> None:
    """Stream the events the caller may see; see the module docstring."""
    services = services_of(socket)
    await socket.accept()
    try:
        principal, expires_at, credentials = await _authenticate(socket, services)
    except AuthenticationError as exc:
        await _close(socket, CLOSE_UNAUTHENTICATED, str(exc)[:120])
        return
    except (TimeoutError, WebSocketDisconnect):
        await _close(socket, CLOSE_UNAUTHENTICATED, "no credentials")
        return
    if not services.rbac.allowed(principal, "event:read", anywhere=True):
        await _close(socket, CLOSE_FORBIDDEN, _NEEDS_EVENT_READ)
        return
    selection = _Filter()
    services.metrics.websocket_clients.inc()
    log.info("event stream opened", principal=principal.subject)
    try:
        await _stream(socket, services, credentials, principal, selection, expires_at)
    finally:
        services.metrics.websocket_clients.dec()
        log.info("event stream closed", principal=principal.subject)


async def _stream(
    socket: WebSocket[Any, Any, Any],
    services: MasterServices,
    credentials: Credentials,
    principal: Principal,
    selection: _Filter,
    expires_at: float | None,
) -> None:
    lifetime = None if expires_at is None else max(0.0, expires_at - time.time())
    recheck_at = time.monotonic() + RECHECK_INTERVAL
    async with services.bus.subscribe() as events:
        await socket.send_json({"type": "ready", "subject": principal.subject})
        async with anyio.create_task_group() as tg:
            tg.start_soon(_read_client, socket, selection, tg.cancel_scope)
            with anyio.move_on_after(lifetime) as expiry:
                async for event in events:
                    if _changes_access(event) or time.monotonic() >= recheck_at:
                        try:
                            principal = await services.auth.authenticate(credentials)
                        except AuthenticationError as exc:
                            await _close(socket, CLOSE_UNAUTHENTICATED, str(exc)[:120])
                            break
                        if not services.rbac.allowed(principal, "event:read", anywhere=True):
                            await _close(socket, CLOSE_FORBIDDEN, _NEEDS_EVENT_READ)
                            break
                        recheck_at = time.monotonic() + RECHECK_INTERVAL
                    if selection.matches(event) and _visible(services, principal, event):
                        await socket.send_json(
                            {
                                "type": "event",
                                "kind": event.kind,
                                "workspace": event.workspace,
                                "id": event.id,
                                "ts": event.ts,
                                "payload": dict(event.payload),
                            }
                        )
                else:  # the bus ended our subscription: we fell behind
                    await _close(socket, CLOSE_TOO_SLOW, "the event stream fell behind; reconnect")
            if expiry.cancelled_caught:
                await _close(
                    socket, CLOSE_UNAUTHENTICATED, "token expired; reconnect with a new one"
                )
            tg.cancel_scope.cancel()
