"""Request and response bodies of the API that are not domain objects themselves.

Domain objects (`Site`, `Upstream`, `DesiredState`, `ConfigVersion`, `Agent`...) are
used as they are; these attrs classes cover the rest. Fields that hold secrets are
``repr=False``; response classes never carry password hashes, token hashes or private
keys. Request fields are validated like the model, so a problem names its field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import attrs

from nxmesh.config.diff import StateDiff
from nxmesh.core import validation as v
from nxmesh.core.model import ConfigVersion, FrozenMap, LabelSelector
from nxmesh.core.records import AgentStatus

__all__ = [
    "AgentWhy",
    "ApiTokenCreate",
    "ApiTokenCreated",
    "ApiTokenView",
    "AssignmentSpec",
    "AuditView",
    "BootstrapTokenCreate",
    "BootstrapTokenCreated",
    "BootstrapTokenView",
    "CertificateUpload",
    "CertificateView",
    "ChangeResult",
    "DryRunResult",
    "FieldProblem",
    "Health",
    "LabelsUpdate",
    "LoginRequest",
    "Me",
    "PasswordChange",
    "RefreshRequest",
    "RoleView",
    "TokenResponse",
    "UserCreate",
    "UserUpdate",
    "UserView",
    "VersionDiff",
    "VersionSummary",
]

_MAX_TTL = 365 * 86400.0


def _freeze(value: Mapping[str, str]) -> FrozenMap[str, str]:
    return value if isinstance(value, FrozenMap) else FrozenMap(value)


def _secret(max_len: int) -> v.FieldCheck:
    def check(value: object) -> v.Problems:
        if not isinstance(value, str):
            return [("", f"must be a string, got {v.type_name(value)}")]  # no value: secret
        if not value:
            return [("", "must not be empty")]
        if len(value) > max_len:
            return [("", f"is {len(value)} characters long; at most {max_len} are allowed")]
        return []

    return v.FieldCheck(check)


def _optional(check: v.FieldCheck) -> v.FieldCheck:
    return v.FieldCheck(lambda value: [] if value is None else check.problems(value))


def _scopes(value: object) -> v.Problems:
    if not isinstance(value, tuple):
        return [("", f"must be a list, got {v.describe(value)}")]
    if len(value) > 64:
        return [("", f"has {len(value)} items; at most 64 are allowed")]
    return [(f"[{i}]", "must be a string") for i, s in enumerate(value) if not isinstance(s, str)]


# ---------------------------------------------------------------------------------------
# Auth
# ---------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class LoginRequest:
    """Username and password for ``POST /api/v1/auth/login``."""

    username: str = attrs.field(validator=v.text(v.TOKEN))
    password: str = attrs.field(repr=False, validator=_secret(1024))


@attrs.frozen(kw_only=True)
class PasswordChange:
    """The caller's current password and the new one."""

    current_password: str = attrs.field(repr=False, validator=_secret(1024))
    new_password: str = attrs.field(repr=False, validator=_secret(1024))


@attrs.frozen(kw_only=True)
class RefreshRequest:
    """A refresh token to rotate (``/auth/refresh``) or revoke (``/auth/logout``)."""

    refresh_token: str = attrs.field(repr=False, validator=_secret(256))


@attrs.frozen(kw_only=True)
class TokenResponse:
    """A new session: the access token (Bearer) and the refresh token that renews it."""

    access_token: str = attrs.field(repr=False)
    token_type: str
    expires_in: int
    expires_at: float
    refresh_token: str = attrs.field(repr=False)
    refresh_expires_at: float
    subject: str
    roles: tuple[str, ...]


@attrs.frozen(kw_only=True)
class Me:
    """The authenticated caller and the permissions its roles grant."""

    subject: str
    roles: tuple[str, ...]
    authenticator: str
    scopes: tuple[str, ...]
    grants: tuple[str, ...]


@attrs.frozen(kw_only=True)
class ApiTokenCreate:
    """A new API token: a name, its scopes (permissions, ``@workspace`` allowed), a lifetime."""

    name: str = attrs.field(validator=v.text(v.NAME))
    scopes: tuple[str, ...] = attrs.field(validator=v.FieldCheck(_scopes))
    expires_in: float | None = attrs.field(
        default=None, validator=v.finite(optional=True, minimum=60.0)
    )

    def __attrs_post_init__(self) -> None:
        if self.expires_in is not None and self.expires_in > _MAX_TTL:
            v.raise_problems([("expires_in", f"must be at most {_MAX_TTL:.0f} seconds")])


@attrs.frozen(kw_only=True)
class ApiTokenView:
    """An API token without its secret."""

    id: str
    owner: str
    name: str
    scopes: tuple[str, ...]
    created_at: float
    expires_at: float | None
    last_used_at: float | None
    revoked: bool


@attrs.frozen(kw_only=True)
class ApiTokenCreated:
    """The token (shown this once) and its record."""

    token: str = attrs.field(repr=False)
    api_token: ApiTokenView


# ---------------------------------------------------------------------------------------
# Desired state and versions
# ---------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class FieldProblem:
    """A warning (or error) about one field."""

    path: str
    message: str
    severity: str = "warning"


@attrs.frozen(kw_only=True)
class VersionSummary:
    """A config version without its state."""

    workspace: str
    number: int
    digest: str
    parent_digest: str | None
    author: str
    message: str
    created_at: float
    key_id: str

    @classmethod
    def of(cls, version: ConfigVersion) -> VersionSummary:
        return cls(
            workspace=version.workspace,
            number=version.number,
            digest=version.digest,
            parent_digest=version.parent_digest,
            author=version.author,
            message=version.message,
            created_at=version.created_at,
            key_id=version.key_id,
        )


@attrs.frozen(kw_only=True)
class ChangeResult:
    """The version a change produced; `created` is False when nothing changed."""

    version: VersionSummary
    created: bool
    warnings: tuple[FieldProblem, ...] = ()


@attrs.frozen(kw_only=True)
class DryRunResult:
    """What a change would do: the model diff and the rendered nginx diff. Nothing stored."""

    workspace: str
    base_version: int | None
    would_change: bool
    changes: StateDiff
    summary: str
    bundle_diff: str
    warnings: tuple[FieldProblem, ...] = ()


@attrs.frozen(kw_only=True)
class VersionDiff:
    """Differences from version `from_version` to version `to_version`."""

    workspace: str
    from_version: int | None
    to_version: int
    changes: StateDiff
    summary: str
    bundle_diff: str


# ---------------------------------------------------------------------------------------
# Assignments and agents
# ---------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class AssignmentSpec:
    """Which version the agents matching `selector` should run."""

    selector: LabelSelector = attrs.field(factory=LabelSelector)
    version: int = attrs.field(validator=v.int_range(1, 2**63 - 1))


@attrs.frozen(kw_only=True)
class LabelsUpdate:
    """The agent's complete new label set (labels bound by its bootstrap token included)."""

    labels: Mapping[str, str] = attrs.field(converter=_freeze, validator=v.labels())


WhyReason = Literal[
    "current",
    "revoked",
    "not_selected",
    "offline",
    "failed",
    "rolled_back",
    "in_progress",
    "pending",
]


@attrs.frozen(kw_only=True)
class AgentWhy:
    """Why an agent is (not) running a version, in words and as a machine-readable reason."""

    agent_id: str
    version: int
    on_version: bool
    reason: WhyReason
    detail: str
    desired_version: int | None
    assignment: str | None
    running_version: int | None
    status: AgentStatus | None = None


@attrs.frozen(kw_only=True)
class RolloutView:
    """Where one version's rollout stands on every agent it targets, in one answer.

    `agents` holds one `AgentWhy` per targeted agent (not revoked, and this is the version
    its assignment or the latest picks); `converged` is true when every one of them runs
    the version's digest, `failed` as soon as one failed or rolled it back.
    """

    workspace: str
    version: int
    digest: str
    created_at: float
    converged: bool
    failed: bool
    agents: tuple[AgentWhy, ...]
    untargeted: int


# ---------------------------------------------------------------------------------------
# Enrollment and certificates
# ---------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class BootstrapTokenCreate:
    """A new single-use enrollment token; `labels` are bound to the agent that uses it."""

    labels: Mapping[str, str] = attrs.field(
        factory=FrozenMap, converter=_freeze, validator=v.labels()
    )
    ttl: float = attrs.field(default=3600.0, validator=v.finite(minimum=60.0))

    def __attrs_post_init__(self) -> None:
        if self.ttl > 7 * 86400:
            v.raise_problems([("ttl", "must be at most 604800 seconds (7 days)")])


@attrs.frozen(kw_only=True)
class BootstrapTokenView:
    """An enrollment token without its secret."""

    id: str
    workspace: str
    labels: Mapping[str, str]
    created_at: float
    expires_at: float
    used_at: float | None
    revoked: bool
    usable: bool


@attrs.frozen(kw_only=True)
class BootstrapTokenCreated:
    """The token ``<id>.<secret>`` (shown this once) and its record."""

    token: str = attrs.field(repr=False)
    bootstrap_token: BootstrapTokenView


@attrs.frozen(kw_only=True)
class CertificateUpload:
    """A PEM certificate (leaf first, then its chain) and its unencrypted PEM private key."""

    name: str = attrs.field(validator=v.text(v.NAME))
    certificate: str = attrs.field(validator=_secret(256 * 1024))
    private_key: str = attrs.field(repr=False, validator=_secret(64 * 1024))


@attrs.frozen(kw_only=True)
class CertificateView:
    """A stored certificate without its private key."""

    workspace: str
    name: str
    domains: tuple[str, ...]
    subject: str
    issuer: str
    not_before: float
    not_after: float
    chain_length: int
    fingerprint_sha256: str
    source: str
    warnings: tuple[FieldProblem, ...] = ()


# ---------------------------------------------------------------------------------------
# Users, roles, audit, health
# ---------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class UserCreate:
    """A new local user; roles are bindings like ``operator`` or ``viewer@staging``."""

    username: str = attrs.field(validator=v.text(v.NAME))
    password: str = attrs.field(repr=False, validator=_secret(1024))
    roles: tuple[str, ...] = attrs.field(
        default=("viewer",), validator=v.each(v.ROLE_BINDING, hi=32, noun="role")
    )


@attrs.frozen(kw_only=True)
class UserUpdate:
    """Changes to a user; omitted fields stay as they are."""

    roles: tuple[str, ...] | None = attrs.field(
        default=None, validator=_optional(v.each(v.ROLE_BINDING, hi=32, noun="role"))
    )
    disabled: bool | None = None
    password: str | None = attrs.field(default=None, repr=False, validator=_optional(_secret(1024)))


@attrs.frozen(kw_only=True)
class UserView:
    """A user without its password hash."""

    username: str
    roles: tuple[str, ...]
    disabled: bool


@attrs.frozen(kw_only=True)
class RoleView:
    """A role and the permissions it grants."""

    name: str
    builtin: bool
    permissions: tuple[str, ...]


@attrs.frozen(kw_only=True)
class AuditView:
    """One audit log entry."""

    id: str
    ts: float
    actor: str
    action: str
    resource: str
    remote_addr: str | None
    details: Mapping[str, Any]


@attrs.frozen(kw_only=True)
class Health:
    """Liveness or readiness."""

    status: Literal["ok", "unavailable"]
    detail: str = ""
