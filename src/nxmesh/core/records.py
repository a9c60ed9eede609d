"""Records the master's storage keeps besides versions and agents, and storage errors.

These are frozen attrs classes like the domain model, but they are the master's own
bookkeeping (enrollment tokens, session keys, audit entries...) rather than desired state
users write. Fields holding secrets are excluded from ``repr``; a `StorageBackend` keeps
them encrypted at rest (`AgentKey.secret`, `StoredCertificate.key_pem`) or hashed
(`BootstrapToken.secret_hash`, `User.password_hash`).

Timestamps are seconds since the epoch (floats), as everywhere in the model.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any

import attrs

from nxmesh.core import validation as v
from nxmesh.core.errors import NxMeshError
from nxmesh.core.model import FrozenMap, LabelSelector

__all__ = [
    "AgentKey",
    "AgentStatus",
    "Assignment",
    "AuditEntry",
    "BootstrapToken",
    "ConflictError",
    "NotFoundError",
    "RetentionPolicy",
    "StorageError",
    "StoredCertificate",
    "User",
    "VersionConflictError",
]


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


class StorageError(NxMeshError):
    """The storage backend refused or failed an operation (unreachable database...)."""


class ConflictError(StorageError):
    """A write collided with existing data (a duplicate id, a concurrent writer)."""


class VersionConflictError(ConflictError):
    """A version's number is not the next one of its workspace.

    Raised to every writer but one when several race to add the same number, and for a
    number that would leave a gap. Reload the latest version and retry.
    """

    def __init__(self, workspace: str, number: int, latest: int | None) -> None:
        self.workspace, self.number, self.latest = workspace, number, latest
        if latest is None:
            detail = "another writer added it concurrently"
        else:
            detail = f"the latest is {latest}, so the next must be {latest + 1}"
        super().__init__(
            f"cannot add version {number} to workspace {workspace!r}: {detail}; "
            "reload the latest version and retry"
        )


class NotFoundError(StorageError):
    """A write referred to something that does not exist (an unknown agent or version)."""


def _freeze(data: Mapping[str, Any]) -> FrozenMap[str, Any]:
    return data if isinstance(data, FrozenMap) else FrozenMap(data)


def _as_tuple(items: Any) -> tuple[Any, ...]:
    return tuple(items)


def _bytes(value: bytes | bytearray | memoryview) -> bytes:
    return bytes(value)


# ---------------------------------------------------------------------------------------
# Enrollment and sessions
# ---------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class BootstrapToken:
    """A single-use enrollment token ``id.secret``; only a hash of the secret is stored.

    Usable while not `revoked`, not used (`used_at` is None) and before `expires_at`;
    `StorageBackend.consume_token` checks all three and marks it used atomically.
    """

    id: str = attrs.field(validator=v.text(v.TOKEN))
    secret_hash: str = attrs.field(repr=False, validator=attrs.validators.min_len(1))
    workspace: str = attrs.field(default="default", validator=v.text(v.NAME))
    labels: Mapping[str, str] = attrs.field(
        factory=FrozenMap, converter=_freeze, validator=v.labels()
    )
    created_at: float = attrs.field(factory=time.time, validator=v.finite())
    expires_at: float = attrs.field(validator=v.finite())
    used_at: float | None = attrs.field(default=None, validator=v.finite(optional=True))
    revoked: bool = False

    @expires_at.default
    def _one_hour(self) -> float:
        return self.created_at + 3600.0

    def usable(self, now: float | None = None) -> bool:
        """True when the token can still enroll an agent at `now` (default: the clock)."""
        at = time.time() if now is None else now
        return not self.revoked and self.used_at is None and at < self.expires_at


@attrs.frozen(kw_only=True)
class AgentKey:
    """A session key an agent signs its envelopes with; several overlap during rotation.

    `secret` is stored encrypted with the master keyring. Adding a `primary` key makes
    every other key of the agent secondary (still accepted until it expires).
    """

    agent_id: str = attrs.field(validator=v.text(v.TOKEN))
    key_id: str = attrs.field(validator=v.text(v.TOKEN))
    secret: bytes = attrs.field(repr=False, converter=_bytes, validator=attrs.validators.min_len(1))
    created_at: float = attrs.field(factory=time.time, validator=v.finite())
    expires_at: float = attrs.field(validator=v.finite())
    primary: bool = True


# ---------------------------------------------------------------------------------------
# Rollout
# ---------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Assignment:
    """Which version of a workspace the agents matching `selector` should run."""

    workspace: str = attrs.field(validator=v.text(v.NAME))
    name: str = attrs.field(validator=v.text(v.NAME))
    selector: LabelSelector = attrs.field(factory=LabelSelector)
    version: int = attrs.field(validator=v.int_range(1, 2**63 - 1))
    created_at: float = attrs.field(factory=time.time, validator=v.finite())


@attrs.frozen(kw_only=True)
class AgentStatus:
    """How one agent's rollout of one version went (``sent``, ``applied``, ``failed``...).

    One record per (agent, version); setting it again replaces it.
    """

    agent_id: str = attrs.field(validator=v.text(v.TOKEN))
    version: int = attrs.field(validator=v.int_range(0, 2**63 - 1))
    digest: str = attrs.field(validator=v.text(v.DIGEST))
    phase: str = attrs.field(validator=v.text(v.TOKEN))
    message: str = attrs.field(default="", validator=v.text(v.LOG_TEXT))
    ts: float = attrs.field(factory=time.time, validator=v.finite())


# ---------------------------------------------------------------------------------------
# Certificates
# ---------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class StoredCertificate:
    """A certificate with its chain and private key; `key_pem` is encrypted at rest."""

    workspace: str = attrs.field(validator=v.text(v.NAME))
    name: str = attrs.field(validator=v.text(v.NAME))
    cert_pem: str
    chain_pem: str = ""
    key_pem: str = attrs.field(repr=False)
    not_after: float = attrs.field(validator=v.finite())
    domains: tuple[str, ...] = attrs.field(default=(), converter=_as_tuple)
    source: str = attrs.field(default="upload", validator=attrs.validators.in_(("upload", "acme")))


# ---------------------------------------------------------------------------------------
# Retention
# ---------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class RetentionPolicy:
    """What `StorageBackend.prune` may delete; None (or 0 versions) keeps that kind forever.

    Times are epoch seconds (the master computes them from its clock and the ``[master]``
    retention settings, `nxmesh.master.retention`):

    * `audit_before`: audit entries with ``ts`` before it;
    * `tokens_before`: bootstrap tokens used, or expired, before it (a revoked token goes
      once it has expired: revocation has no timestamp);
    * `status_versions`: keep the rollout statuses of each workspace's latest N versions;
      older ones go, except the latest status of each agent, the one of the version it
      runs and those of versions an assignment pins (what the API shows of a rollout);
    * `event_payloads_before`: large events parked for the PostgreSQL event bus;
    * `login_failures_before`: failed-login counters last bumped before it (stale: they
      restart from zero anyway);
    * `batch_size`: rows per delete statement, each its own short transaction.
    """

    audit_before: float | None = attrs.field(default=None, validator=v.finite(optional=True))
    tokens_before: float | None = attrs.field(default=None, validator=v.finite(optional=True))
    status_versions: int = attrs.field(default=0, validator=v.int_range(0, 2**31 - 1))
    event_payloads_before: float | None = attrs.field(
        default=None, validator=v.finite(optional=True)
    )
    login_failures_before: float | None = attrs.field(
        default=None, validator=v.finite(optional=True)
    )
    batch_size: int = attrs.field(default=1000, validator=v.int_range(1, 1_000_000))


# ---------------------------------------------------------------------------------------
# Audit and users
# ---------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class AuditEntry:
    """Who did what to which resource, from where; `details` holds JSON-compatible values."""

    id: str = attrs.field(factory=lambda: uuid.uuid4().hex, validator=v.text(v.TOKEN))
    ts: float = attrs.field(factory=time.time, validator=v.finite())
    actor: str
    action: str
    resource: str = ""
    remote_addr: str | None = None
    # Values may be nested dicts/lists, which are not hashable: keep them out of the hash.
    details: Mapping[str, Any] = attrs.field(factory=FrozenMap, converter=_freeze, hash=False)


@attrs.frozen(kw_only=True)
class User:
    """A local user of the master API; `password_hash` is a password-hashing KDF output."""

    username: str = attrs.field(validator=v.text(v.TOKEN))
    password_hash: str = attrs.field(repr=False)
    roles: tuple[str, ...] = attrs.field(default=(), converter=_as_tuple)
    disabled: bool = False
