"""Who is calling and may they: the app-wide guard, and what handlers receive.

`authorize` runs before every handler (HTTP and WebSocket) and denies by default:

* a route marked ``opt={"public": True}`` is open (health, readiness, schema, login...);
* a route marked ``opt={"auth": "handler"}`` authenticates itself (the events WebSocket,
  which also accepts the token as its first message);
* every other route must declare ``opt={"permission": "resource:action"}`` — a route
  without one, a plugin's included, is refused to everybody. ``opt={"authenticated":
  True}`` instead admits any authenticated caller (``/auth/me``).

The permission is checked in the route's ``{workspace}`` when it has one, organization
wide otherwise, or — with ``opt={"scope": "anywhere"}`` — in any workspace, for routes
whose handler checks each object's workspace itself (agents, API tokens).

Credentials are read from ``Authorization: Bearer <token>`` only; query parameters are
never consulted (they end up in logs and browser history).
"""

from __future__ import annotations

from typing import Any, Final

import structlog
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.handlers.base import BaseRouteHandler

from nxmesh.core.interfaces import Credentials, Principal
from nxmesh.master.app import MasterServices
from nxmesh.master.auth.errors import AuthenticationError, PermissionDeniedError

__all__ = [
    "PRINCIPAL_KEY",
    "Caller",
    "CallerDep",
    "ServicesDep",
    "authenticate_connection",
    "authorize",
    "credentials_from",
    "provide_caller",
    "provide_services",
    "remote_addr",
]

PRINCIPAL_KEY: Final = "principal"
"""Where the guard leaves the authenticated `Principal` in ``scope["state"]``."""

log = structlog.get_logger("nxmesh.master.api")


def services_of(connection: ASGIConnection[Any, Any, Any, Any]) -> MasterServices:
    services: MasterServices | None = connection.app.state.get("services")
    if services is None:
        raise RuntimeError("the master's services are not open (app lifespan not started)")
    return services


def provide_services(state: State) -> MasterServices:
    """Dependency ``services``: the running master's `MasterServices`."""
    services: MasterServices | None = state.get("services")
    if services is None:
        raise RuntimeError("the master's services are not open (app lifespan not started)")
    return services


def remote_addr(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    """The client's address as the server saw it (no proxy headers are trusted)."""
    client = connection.scope.get("client")
    return client[0] if client else None


def credentials_from(connection: ASGIConnection[Any, Any, Any, Any]) -> Credentials | None:
    """``bearer`` credentials from the Authorization header, or None without one."""
    header = connection.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError(
            "unsupported Authorization header; use 'Bearer <token>'", reason="bad_header"
        )
    return Credentials("bearer", {"token": token}, remote_addr=remote_addr(connection))


async def authenticate_connection(connection: ASGIConnection[Any, Any, Any, Any]) -> Principal:
    """The caller's principal (cached on the connection).

    :raises AuthenticationError: no credentials, or the chain rejected them.
    """
    state = connection.scope.setdefault("state", {})
    cached = state.get(PRINCIPAL_KEY)
    if isinstance(cached, Principal):
        return cached
    services = services_of(connection)
    credentials = credentials_from(connection)
    if credentials is None:
        services.metrics.auth_failed("missing")
        raise AuthenticationError("authentication required", reason="missing")
    principal = await services.auth.authenticate(credentials)
    state[PRINCIPAL_KEY] = principal
    return principal


async def authorize(
    connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
) -> None:
    """The app-wide guard; see the module docstring."""
    opt = handler.opt
    if opt.get("public") or opt.get("auth") == "handler":
        return
    setting = opt.get("public_setting")  # e.g. /metrics with auth.public_metrics = true
    if setting and getattr(services_of(connection).settings.auth, setting, False) is True:
        return
    principal = await authenticate_connection(connection)
    permission = opt.get("permission")
    if not isinstance(permission, str):
        if opt.get("authenticated"):
            return
        # Deny by default: a route that forgot to declare a permission is nobody's.
        raise PermissionDeniedError("<undeclared>")
    rbac = services_of(connection).rbac
    workspace = connection.path_params.get("workspace")
    if opt.get("scope") == "anywhere":
        allowed = rbac.allowed(principal, permission, anywhere=True)
    else:
        allowed = rbac.allowed(principal, permission, workspace)
    if not allowed:
        raise PermissionDeniedError(permission, workspace)


class Caller:
    """The authenticated caller of a request, with the checks and audit helper handlers use.

    A plain class (not attrs) so Litestar's signature model does not introspect it.
    """

    __slots__ = ("principal", "remote_addr", "request_id", "services")

    def __init__(
        self,
        principal: Principal,
        services: MasterServices,
        remote_addr: str | None = None,
        request_id: str | None = None,
    ) -> None:
        self.principal = principal
        self.services = services
        self.remote_addr = remote_addr
        self.request_id = request_id

    def __repr__(self) -> str:
        return f"Caller({self.principal.subject!r}, remote_addr={self.remote_addr!r})"

    @property
    def subject(self) -> str:
        return self.principal.subject

    def can(self, permission: str, workspace: str | None = None) -> bool:
        """Whether the caller holds `permission` at `workspace` (None: organization)."""
        return self.services.rbac.allowed(self.principal, permission, workspace)

    def workspaces_with(self, permission: str) -> frozenset[str] | None:
        """The workspaces where the caller holds `permission`; None when it holds it
        organization-wide (every workspace). Lets a list filter in the query, not after."""
        if self.can(permission):
            return None
        principal = self.principal
        named = {g.workspace for g in self.services.rbac.grants(principal.roles)}
        named.update(scope.partition("@")[2] for scope in principal.scopes)
        # `can` stays the authority: the names above are only candidates.
        return frozenset(ws for ws in named if ws and self.can(permission, ws))

    def require(self, permission: str, workspace: str | None = None) -> None:
        """Raise `PermissionDeniedError` (403) unless `can`."""
        if not self.can(permission, workspace):
            raise PermissionDeniedError(permission, workspace)

    async def audit(
        self,
        action: str,
        resource: str,
        *,
        workspace: str | None = None,
        **details: Any,
    ) -> None:
        """Record that the caller did `action` to `resource`."""
        await self.services.audit.record(
            actor=self.subject,
            action=action,
            resource=resource,
            remote_addr=self.remote_addr,
            workspace=workspace,
            details={"request_id": self.request_id, **details},
        )


async def provide_caller(request: ASGIConnection[Any, Any, Any, Any]) -> Caller:
    """Dependency ``caller``: the authenticated caller (routes behind the guard only)."""
    principal = await authenticate_connection(request)
    return Caller(
        principal=principal,
        services=services_of(request),
        remote_addr=remote_addr(request),
        request_id=request.scope.get("state", {}).get("request_id"),
    )


CallerDep = NamedDependency[Caller]
"""Handler parameter type for the ``caller`` dependency."""

ServicesDep = NamedDependency[MasterServices]
"""Handler parameter type for the ``services`` dependency."""
