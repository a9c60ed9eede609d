"""Typed views of the master's JSON answers, for code that uses the client.

Each class names the fields the CLI relies on and keeps the whole answer in `raw`, so
``--json`` output is exactly what the API returned and a newer master adding fields
breaks nothing. Nested documents (a version's state, a model diff) stay mappings: they
are shown or passed on, not interpreted here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar, cast

import attrs

__all__ = [
    "AgentInfo",
    "AgentRollout",
    "AgentStatusInfo",
    "ApiTokenCreated",
    "BootstrapTokenCreated",
    "BootstrapTokenInfo",
    "ChangeResult",
    "DryRun",
    "Me",
    "RolloutInfo",
    "UserInfo",
    "VersionDiff",
    "VersionInfo",
    "parse",
    "parse_list",
]

T = TypeVar("T")


def parse(cls: type[T], data: object) -> T:
    """An instance of the attrs class `cls` from a JSON object; unknown keys are kept in
    ``raw`` only, missing optional ones take their defaults."""
    if not isinstance(data, Mapping):
        raise TypeError(f"expected a JSON object for {cls.__name__}, got {type(data).__name__}")
    values: dict[str, Any] = {}
    for field in attrs.fields(cast(Any, cls)):
        if field.name == "raw":
            values["raw"] = dict(data)
        elif field.name in data:
            values[field.name] = data[field.name]
    return cls(**values)


def parse_list(cls: type[T], data: object) -> list[T]:
    """`parse` for each item of a JSON array."""
    if not isinstance(data, list):
        raise TypeError(f"expected a JSON array of {cls.__name__}, got {type(data).__name__}")
    return [parse(cls, item) for item in data]


@attrs.frozen(kw_only=True)
class Me:
    """The authenticated caller."""

    subject: str
    roles: list[str] = attrs.field(factory=list)
    authenticator: str = ""
    grants: list[str] = attrs.field(factory=list)
    scopes: list[str] = attrs.field(factory=list)
    """An API token's scopes: it may do only what both `grants` and these allow."""
    raw: dict[str, Any] = attrs.field(factory=dict, eq=False, repr=False)


@attrs.frozen(kw_only=True)
class VersionInfo:
    """A config version (with `state` when fetched alone, without in listings)."""

    workspace: str
    number: int
    digest: str
    parent_digest: str | None = None
    author: str = ""
    message: str = ""
    created_at: float = 0.0
    key_id: str = ""
    state: dict[str, Any] | None = None
    raw: dict[str, Any] = attrs.field(factory=dict, eq=False, repr=False)


@attrs.frozen(kw_only=True)
class ChangeResult:
    """The version a change produced; `created` is False when nothing changed."""

    version: dict[str, Any]
    created: bool
    warnings: list[dict[str, Any]] = attrs.field(factory=list)
    raw: dict[str, Any] = attrs.field(factory=dict, eq=False, repr=False)

    @property
    def number(self) -> int:
        number: int = self.version["number"]
        return number

    @property
    def digest(self) -> str:
        digest: str = self.version["digest"]
        return digest


@attrs.frozen(kw_only=True)
class DryRun:
    """What a change would do: the model diff and the rendered nginx diff."""

    workspace: str
    base_version: int | None
    would_change: bool
    summary: str
    bundle_diff: str
    changes: dict[str, Any] = attrs.field(factory=dict)
    warnings: list[dict[str, Any]] = attrs.field(factory=list)
    raw: dict[str, Any] = attrs.field(factory=dict, eq=False, repr=False)


@attrs.frozen(kw_only=True)
class VersionDiff:
    """Differences between two versions."""

    workspace: str
    from_version: int | None
    to_version: int
    summary: str
    bundle_diff: str
    changes: dict[str, Any] = attrs.field(factory=dict)
    raw: dict[str, Any] = attrs.field(factory=dict, eq=False, repr=False)


@attrs.frozen(kw_only=True)
class AgentInfo:
    """An enrolled agent as the master sees it."""

    id: str
    name: str = ""
    workspace: str = "default"
    status: str = "pending"
    labels: dict[str, str] = attrs.field(factory=dict)
    nginx_version: str | None = None
    deployment_mode: str | None = None
    running_version: int | None = None
    running_digest: str | None = None
    last_seen: float | None = None
    raw: dict[str, Any] = attrs.field(factory=dict, eq=False, repr=False)


@attrs.frozen(kw_only=True)
class AgentStatusInfo:
    """How one agent's rollout of one version went."""

    agent_id: str
    version: int
    digest: str
    phase: str
    message: str = ""
    ts: float = 0.0
    raw: dict[str, Any] = attrs.field(factory=dict, eq=False, repr=False)


@attrs.frozen(kw_only=True)
class AgentRollout:
    """``GET /agents/{id}/why?version=N``: why an agent is (not) on version N."""

    agent_id: str
    version: int
    on_version: bool
    reason: str
    detail: str = ""
    desired_version: int | None = None
    assignment: str | None = None
    running_version: int | None = None
    status: dict[str, Any] | None = None
    raw: dict[str, Any] = attrs.field(factory=dict, eq=False, repr=False)

    @property
    def phase(self) -> str | None:
        """The rollout phase the master recorded (``sent``, ``applying``...), if any."""
        phase = (self.status or {}).get("phase")
        return phase if isinstance(phase, str) else None


@attrs.frozen(kw_only=True)
class RolloutInfo:
    """``GET /versions/{n}/rollout``: the version on every agent it targets."""

    workspace: str
    version: int
    digest: str
    converged: bool
    failed: bool
    agents: list[dict[str, Any]] = attrs.field(factory=list)
    """One ``AgentWhy`` document per targeted agent (parse with `AgentRollout`)."""
    untargeted: int = 0
    created_at: float = 0.0
    raw: dict[str, Any] = attrs.field(factory=dict, eq=False, repr=False)

    def agent_rollouts(self) -> list[AgentRollout]:
        return parse_list(AgentRollout, self.agents)


@attrs.frozen(kw_only=True)
class BootstrapTokenInfo:
    """An enrollment token without its secret."""

    id: str
    workspace: str
    labels: dict[str, str] = attrs.field(factory=dict)
    created_at: float = 0.0
    expires_at: float = 0.0
    used_at: float | None = None
    revoked: bool = False
    usable: bool = False
    raw: dict[str, Any] = attrs.field(factory=dict, eq=False, repr=False)


@attrs.frozen(kw_only=True)
class BootstrapTokenCreated:
    """A new enrollment token ``<id>.<secret>``: the only time its secret is shown."""

    token: str = attrs.field(repr=False)
    bootstrap_token: dict[str, Any]
    raw: dict[str, Any] = attrs.field(factory=dict, eq=False, repr=False)


@attrs.frozen(kw_only=True)
class ApiTokenCreated:
    """A new ``nxm_`` API token: the only time its secret is shown."""

    token: str = attrs.field(repr=False)
    api_token: dict[str, Any]
    raw: dict[str, Any] = attrs.field(factory=dict, eq=False, repr=False)


@attrs.frozen(kw_only=True)
class UserInfo:
    """A user of the master API."""

    username: str
    roles: list[str] = attrs.field(factory=list)
    disabled: bool = False
    raw: dict[str, Any] = attrs.field(factory=dict, eq=False, repr=False)
