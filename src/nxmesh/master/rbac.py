"""Role-based access control: permissions ``resource:action``, roles, workspace scopes.

Resources form a hierarchy **organization → workspace → agent / config / certificate**.
A *grant* is a permission pattern plus where it applies: everywhere (organization-wide)
or in one workspace. Patterns are exact (``config:write``) or use ``*`` for the resource,
the action or both (``config:*``, ``*:read``, ``*``).

A principal's roles are *bindings*: ``operator`` grants the operator role organization
wide, ``operator@staging`` only inside workspace ``staging``. Built-in roles are
`BUILTIN_ROLES`; custom roles come from ``[auth.roles]`` and may pin single grants to a
workspace themselves (``"config:write@staging"``).

API tokens narrow further: a token's scopes use the same grant syntax, and a request
made with it needs the permission from the owner's roles *and* from the token's scopes.

Everything is denied unless a grant allows it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

import attrs

from nxmesh.core.errors import ConfigurationError
from nxmesh.core.interfaces import Principal

__all__ = [
    "BUILTIN_ROLES",
    "EVENT_PERMISSIONS",
    "ORGANIZATION_PERMISSIONS",
    "PERMISSIONS",
    "Grant",
    "Rbac",
    "event_permission",
    "parse_grant",
]

PERMISSIONS: Final[Mapping[str, str]] = {
    "config:read": "read desired state, sites, upstreams, streams, versions and diffs",
    "config:write": "change desired state, sites, upstreams and streams (creates versions)",
    "config:rollback": "roll a workspace back to an earlier version",
    "assignment:read": "read which agents get which version",
    "assignment:write": "create, change and delete assignments",
    "agent:read": "list agents, their status, health and rollout explanations",
    "agent:write": "change agent labels",
    "agent:revoke": "revoke an agent's credentials",
    "bootstrap_token:read": "list enrollment tokens (never their secrets)",
    "bootstrap_token:write": "create and revoke enrollment tokens",
    "certificate:read": "list certificates (never their private keys)",
    "certificate:write": "upload, replace and delete certificates",
    "user:read": "list users",
    "user:write": "create, change and delete users",
    "role:read": "list roles and their permissions",
    "audit:read": "read the audit log",
    "event:read": "stream events over the WebSocket (filtered by the other permissions)",
    "metrics:read": "scrape /metrics",
    "api_token:read": "list one's own API tokens",
    "api_token:write": "create and revoke one's own API tokens",
}
"""Every permission the API checks, with what it allows."""

ORGANIZATION_PERMISSIONS: Final = frozenset(
    {"user:read", "user:write", "role:read", "audit:read", "metrics:read"}
)
"""Permissions about the organization itself: only organization-wide grants give them."""

_VIEWER = (
    "config:read",
    "assignment:read",
    "agent:read",
    "certificate:read",
    "event:read",
    "metrics:read",
    "role:read",
    "api_token:read",
    "api_token:write",
)
_OPERATOR = (
    *_VIEWER,
    "config:write",
    "config:rollback",
    "assignment:write",
    "agent:write",
    "agent:revoke",
    "bootstrap_token:read",
    "bootstrap_token:write",
    "certificate:write",
    "audit:read",
)

BUILTIN_ROLES: Final[Mapping[str, tuple[str, ...]]] = {
    "admin": ("*",),
    "operator": _OPERATOR,
    "viewer": _VIEWER,
}
"""The roles every master has; ``[auth.roles]`` cannot redefine them."""

EVENT_PERMISSIONS: Final[Mapping[str, str]] = {
    "version": "config:read",
    "state": "config:read",
    "rollout": "config:read",
    "assignment": "assignment:read",
    "agent": "agent:read",
    "certificate": "certificate:read",
    "bootstrap_token": "bootstrap_token:read",
    "user": "user:read",
    "audit": "audit:read",
}
"""Event kind prefix (before the first dot) → the permission needed to receive it."""

_PART = r"(?:[a-z][a-z0-9_]{0,31}|\*)"
_PATTERN = re.compile(rf"^(?:\*|{_PART}:{_PART})$")
_WORKSPACE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_ROLE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")


def event_permission(kind: str) -> str:
    """The permission needed to receive an event of `kind`; ``*`` (admins) when unknown."""
    return EVENT_PERMISSIONS.get(kind.split(".", 1)[0], "*")


@attrs.frozen
class Grant:
    """A permission pattern, organization-wide (`workspace` None) or in one workspace."""

    pattern: str
    workspace: str | None = None

    def matches(self, permission: str) -> bool:
        """Whether the pattern covers `permission` (ignoring where)."""
        if self.pattern == "*":
            return True
        resource, _, action = self.pattern.partition(":")
        want_resource, _, want_action = permission.partition(":")
        return resource in ("*", want_resource) and action in ("*", want_action)

    def covers(self, permission: str, workspace: str | None, *, anywhere: bool = False) -> bool:
        """Whether this grant allows `permission` at `workspace` (None: the organization)."""
        if not self.matches(permission):
            return False
        if anywhere or self.workspace is None:
            return True
        return workspace is not None and self.workspace == workspace

    def __str__(self) -> str:
        return self.pattern if self.workspace is None else f"{self.pattern}@{self.workspace}"


def parse_grant(text: str) -> Grant:
    """``config:write`` or ``config:write@staging`` → a `Grant`; `ValueError` when malformed."""
    pattern, at, workspace = text.strip().partition("@")
    if not _PATTERN.fullmatch(pattern):
        raise ValueError(
            f"{text!r} is not a permission: expected 'resource:action' (either may be '*') "
            "or '*', optionally followed by '@workspace'"
        )
    if at and not _WORKSPACE.fullmatch(workspace):
        raise ValueError(f"{text!r} names an invalid workspace {workspace!r}")
    return Grant(pattern, workspace if at else None)


class Rbac:
    """Resolves role bindings to grants and answers permission checks."""

    def __init__(self, custom_roles: Mapping[str, Sequence[str]] | None = None) -> None:
        self._roles: dict[str, tuple[Grant, ...]] = {
            name: tuple(Grant(p) for p in perms) for name, perms in BUILTIN_ROLES.items()
        }
        for name, perms in (custom_roles or {}).items():
            if name in BUILTIN_ROLES:
                raise ConfigurationError(
                    f"auth.roles.{name}: {name!r} is a built-in role and cannot be redefined"
                )
            if not _ROLE.fullmatch(name):
                raise ConfigurationError(
                    f"auth.roles: invalid role name {name!r} (lowercase letters, digits, '-', '_')"
                )
            try:
                self._roles[name] = tuple(parse_grant(p) for p in perms)
            except ValueError as exc:
                raise ConfigurationError(f"auth.roles.{name}: {exc}") from None

    @property
    def roles(self) -> Mapping[str, tuple[Grant, ...]]:
        """Role name → its grants (built-in first, then custom, in settings order)."""
        return dict(self._roles)

    def is_builtin(self, role: str) -> bool:
        return role in BUILTIN_ROLES

    def check_binding(self, binding: str) -> str | None:
        """Why `binding` (``role`` or ``role@workspace``) is invalid, or None when it is fine."""
        role, at, workspace = binding.partition("@")
        if role not in self._roles:
            known = ", ".join(self._roles)
            return f"unknown role {role!r} (roles: {known})"
        if at and not _WORKSPACE.fullmatch(workspace):
            return f"invalid workspace {workspace!r} in role binding {binding!r}"
        return None

    def grants(self, bindings: Iterable[str]) -> list[Grant]:
        """The grants of role `bindings`; unknown roles grant nothing."""
        out: list[Grant] = []
        for binding in bindings:
            role, at, scope = binding.partition("@")
            for grant in self._roles.get(role, ()):
                if not at:
                    out.append(grant)
                elif grant.workspace is None:
                    out.append(Grant(grant.pattern, scope))
                elif grant.workspace == scope:
                    out.append(grant)
                # else: bound to one workspace, pinned to another: applies nowhere.
        return out

    def allowed(
        self,
        principal: Principal | None,
        permission: str,
        workspace: str | None = None,
        *,
        anywhere: bool = False,
    ) -> bool:
        """Whether `principal` holds `permission` at `workspace` (None: organization-wide).

        With `anywhere`, a grant in any workspace is enough (lists filter per item later).
        An API token principal needs the permission in its scopes too.
        """
        if principal is None:
            return False
        if permission in ORGANIZATION_PERMISSIONS and not anywhere:
            workspace = None
        if not _covered(self.grants(principal.roles), permission, workspace, anywhere):
            return False
        if principal.authenticator == "api_token":
            scopes = [_scope(s) for s in principal.scopes]
            return _covered([g for g in scopes if g is not None], permission, workspace, anywhere)
        return True

    def scope_allowed(self, principal: Principal, scope: Grant) -> bool:
        """Whether `principal` may hand `scope` on (to an API token, a user's role): no
        privilege escalation. An API token principal is held to its own scopes too, so a
        narrow token cannot mint a wider token or user than itself."""
        if not any(_wider(grant, scope) for grant in self.grants(principal.roles)):
            return False
        if principal.authenticator == "api_token":
            own = (_scope(text) for text in principal.scopes)
            return any(grant is not None and _wider(grant, scope) for grant in own)
        return True

    def holds_all(self, principal: Principal, bindings: Iterable[str]) -> bool:
        """Whether `principal` could grant everything role `bindings` grant: the bar for
        changing or deleting a user that holds them (a helpdesk role with ``user:write``
        must not reset an admin's password)."""
        return all(self.scope_allowed(principal, grant) for grant in self.grants(bindings))


def _scope(text: str) -> Grant | None:
    try:
        return parse_grant(text)
    except ValueError:
        return None


def _covered(
    grants: Iterable[Grant], permission: str, workspace: str | None, anywhere: bool
) -> bool:
    return any(g.covers(permission, workspace, anywhere=anywhere) for g in grants)


def _wider(grant: Grant, scope: Grant) -> bool:
    """`grant` covers everything `scope` could cover."""
    if grant.workspace is not None and grant.workspace != scope.workspace:
        return False
    if grant.pattern == "*":
        return True
    g_res, _, g_act = grant.pattern.partition(":")
    s_res, _, s_act = scope.pattern.partition(":")
    if scope.pattern == "*":
        return False
    return g_res in ("*", s_res) and g_act in ("*", s_act)
