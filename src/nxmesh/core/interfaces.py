"""Typed protocols for every provider kind.

A provider is a *class* registered through a ``nxmesh_register_*`` hook. Every class
carries a ``name`` (unique per kind); URL-picked kinds also carry ``schemes``. Methods
that do I/O are async and written against anyio, so providers run on asyncio and trio;
a provider tied to one event loop (grpclib) says so and stays inside its plugin.

The contract suites in `nxmesh.testing.contracts` check behaviour, these protocols check
shape (``mypy``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import attrs

if TYPE_CHECKING:
    from anyio.abc import TaskStatus

    from nxmesh.core.bundle import Bundle
    from nxmesh.core.events import Event
    from nxmesh.core.model import (
        Agent,
        ApplyReport,
        ConfigVersion,
        DesiredState,
        HealthResult,
        PendingApply,
    )
    from nxmesh.core.records import (
        AgentKey,
        AgentStatus,
        Assignment,
        AuditEntry,
        BootstrapToken,
        RetentionPolicy,
        StoredCertificate,
        User,
    )
    from nxmesh.core.settings import Settings

__all__ = [
    "Authenticator",
    "Channel",
    "Credentials",
    "DeploymentMode",
    "DnsProvider",
    "EventBus",
    "HealthCheck",
    "NginxDriver",
    "Principal",
    "Renderer",
    "SessionHandler",
    "StorageBackend",
    "TransportClient",
    "TransportServer",
    "UnaryHandler",
]


# ---------------------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------------------


@runtime_checkable
class StorageBackend(Protocol):
    """Durable state of the master: versions, agents and everything the API manages.

    Constructed as ``cls(url, *, keyring=None)`` with a `nxmesh.crypto.MasterKeyring`;
    `open` connects and migrates, `aclose` releases. Every write is atomic: a crash
    between two statements of one write leaves nothing torn. Secrets (agent session
    keys, certificate private keys) are stored encrypted with the keyring, bound to
    their record; without a keyring, storing or reading one raises
    `nxmesh.crypto.SecretError` — never plaintext. Errors on purpose derive from
    `nxmesh.core.records.StorageError`. The records are in `nxmesh.core.records`.
    A class may also offer ``from_settings(settings, *, keyring=None)`` (to read its
    plugin's settings section); applications prefer it when present.
    """

    name: ClassVar[str]
    schemes: ClassVar[tuple[str, ...]]

    async def open(self) -> None: ...
    async def aclose(self) -> None: ...

    # -- versions: immutable, numbered 1, 2, 3... per workspace without gaps

    async def add_version(self, version: ConfigVersion) -> None:
        """Store a new version; its number must be the next one of its workspace.

        Of concurrent writers of the same number exactly one succeeds.

        :raises VersionConflictError: the number is taken or would leave a gap.
        """
        ...

    async def get_version(self, workspace: str, number: int) -> ConfigVersion | None: ...
    async def latest_version(self, workspace: str) -> ConfigVersion | None: ...
    async def list_versions(
        self, workspace: str, *, limit: int = 100, before: int | None = None
    ) -> Sequence[ConfigVersion]:
        """Newest first; `before` pages backwards (numbers strictly below it)."""
        ...

    # -- agents

    async def upsert_agent(self, agent: Agent) -> None:
        """Create or replace the agent; a ``revoked`` agent stays revoked (revocation is
        final, and a write built on an earlier read must not undo it)."""
        ...

    async def set_agent_offline(
        self,
        agent_id: str,
        *,
        last_seen: float,
        running_version: int | None = None,
        running_digest: str | None = None,
        unless_seen_after: float | None = None,
    ) -> bool:
        """Set ``status="offline"`` with `last_seen` and the running version and digest, in
        one atomic conditional write: only if the agent is ``online`` and its stored
        ``last_seen`` is not after `unless_seen_after` (default `last_seen`; a later one
        means another master sees it connected). True when the agent was changed; a
        revoked, already offline or unknown agent is left as it is."""
        ...

    async def revoke_agent(self, agent_id: str) -> bool:
        """Mark the agent ``revoked`` and delete all its session keys, atomically (all or
        nothing); False when there is no such agent."""
        ...

    async def get_agent(self, agent_id: str) -> Agent | None: ...
    async def list_agents(self, workspace: str | None = None) -> Sequence[Agent]:
        """All agents (of one workspace if given), by id."""
        ...

    async def delete_agent(self, agent_id: str) -> bool:
        """Forget an agent with its keys and statuses; False when it did not exist."""
        ...

    # -- bootstrap tokens (enrollment)

    async def add_token(self, token: BootstrapToken) -> None:
        """Store a new token; raises `ConflictError` when its id exists."""
        ...

    async def consume_token(
        self, token_id: str, *, secret_hash: str, now: float | None = None
    ) -> BootstrapToken | None:
        """Atomically mark a token used and return it (``used_at`` set).

        None when it does not exist, `secret_hash` differs (the token stays usable),
        it is revoked, already used, or expired at `now` (default: the clock). Of
        concurrent callers at most one gets the token.
        """
        ...

    async def revoke_token(self, token_id: str) -> bool: ...
    async def get_token(self, token_id: str) -> BootstrapToken | None:
        """One token by id (used, revoked and expired ones too); None when unknown."""
        ...

    async def list_tokens(self, workspace: str | None = None) -> Sequence[BootstrapToken]: ...

    # -- agent session keys (secret stored encrypted)

    async def add_agent_key(self, key: AgentKey) -> None:
        """Store a key; a primary key makes the agent's other keys secondary.

        :raises NotFoundError: no such agent. :raises ConflictError: the key id exists.
        """
        ...

    async def get_agent_key(self, agent_id: str, key_id: str) -> AgentKey | None: ...
    async def list_agent_keys(self, agent_id: str) -> Sequence[AgentKey]:
        """The agent's keys, primary first, then newest first."""
        ...

    async def revoke_agent_keys(self, agent_id: str) -> int:
        """Delete every key of the agent; returns how many."""
        ...

    # -- assignments: label selector -> version

    async def set_assignment(self, assignment: Assignment) -> None:
        """Create or replace ``(workspace, name)``; `NotFoundError` for an unknown version."""
        ...

    async def list_assignments(self, workspace: str) -> Sequence[Assignment]: ...
    async def delete_assignment(self, workspace: str, name: str) -> bool: ...

    # -- certificates (private key stored encrypted)

    async def put_certificate(self, cert: StoredCertificate) -> None:
        """Create or replace ``(workspace, name)``."""
        ...

    async def get_certificate(self, workspace: str, name: str) -> StoredCertificate | None: ...
    async def list_certificates(self, workspace: str) -> Sequence[StoredCertificate]: ...
    async def delete_certificate(self, workspace: str, name: str) -> bool: ...

    # -- audit log (append-only)

    async def append_audit(self, entry: AuditEntry) -> None: ...
    async def list_audit(
        self, *, limit: int = 100, since: float | None = None, before: str | None = None
    ) -> Sequence[AuditEntry]:
        """Newest first (append order), at most `limit`, only ``ts >= since`` if given, and
        only entries appended before the entry with id `before` if given (the next page
        after that entry; none when no entry has that id)."""
        ...

    # -- users

    async def put_user(self, user: User) -> None: ...
    async def get_user(self, username: str) -> User | None: ...
    async def list_users(self) -> Sequence[User]: ...
    async def delete_user(self, username: str) -> bool: ...

    # -- per-agent rollout status

    async def set_agent_status(self, status: AgentStatus) -> None:
        """Create or replace the status of ``(agent_id, version)``; `NotFoundError` for an
        unknown agent."""
        ...

    async def list_agent_statuses(
        self, workspace: str, *, version: int | None = None
    ) -> Sequence[AgentStatus]:
        """Statuses of the workspace's agents, optionally for one version."""
        ...

    # -- retention

    async def prune(self, policy: RetentionPolicy) -> Mapping[str, int]:
        """Delete the records `policy` lets go; returns how many went, per table (or kind).

        Visits only the kinds `policy` gives a limit for: audit entries older than
        ``audit_before``; bootstrap tokens used or expired before ``tokens_before``;
        rollout statuses beyond each workspace's latest ``status_versions`` versions —
        never an agent's latest status, the status of the version it runs, nor those of a
        version an assignment pins (what the API shows of current rollouts); and what else
        the backend keeps that `policy` covers (event payloads, failed-login counters).
        Deletes in bounded batches of ``batch_size`` rows, each its own transaction, so a
        large backlog never holds a long lock; idempotent, so a pass cut short or two
        masters pruning at once are harmless. The master runs it periodically
        (`nxmesh.master.retention`); it skips a backend without this method.
        """
        ...

    # -- master key rotation

    async def rewrap_secrets(self) -> int:
        """Re-encrypt every secret not under the keyring's primary key; returns how many."""
        ...


# ---------------------------------------------------------------------------------------
# Transport
# ---------------------------------------------------------------------------------------


# A transport only carries frames: opaque ``bytes``, each one NxMesh protocol envelope
# (`nxmesh.core.envelope`). Signing, sequencing, replay protection and the messages live
# in the core (`nxmesh.core.protocol`), so every transport gets them for free and one
# contract suite (`nxmesh.testing.contracts.TransportContract`) tests them all.
#
# One class implements both sides of a transport and is registered once, under the name
# the ``[master]``/``[agent]`` ``transports`` settings use (``grpc``, ``websocket``):
# the master constructs it with its listen URL and a server `ssl.SSLContext` and calls
# `TransportServer.serve`; the agent constructs it with a client context pinning the
# master's CA and calls `TransportClient.connect`. Constructor: ``cls(url=..., *,
# ssl_context=..., **transport_options)``.


class Channel(Protocol):
    """One bidirectional master↔agent stream carrying encoded protocol frames.

    `send` and `receive` may run concurrently in two tasks (one sender, one receiver);
    frames arrive whole and in order.
    """

    async def send(self, frame: bytes) -> None:
        """Send one frame; raises ``anyio.BrokenResourceError`` (or `OSError`) once broken."""
        ...

    async def receive(self) -> bytes:
        """Next frame; raises ``anyio.EndOfStream`` when the peer closed."""
        ...

    async def aclose(self) -> None: ...


class SessionHandler(Protocol):
    """What the master runs for each accepted agent stream (returning ends the stream).

    `peer` is the remote address as ``host:port``. A handler may also implement
    `UnaryHandler`; transports with a side channel for reports (gRPC ``ReportHealth``)
    then route those frames to it.
    """

    async def __call__(self, channel: Channel, peer: str) -> None: ...


@runtime_checkable
class UnaryHandler(Protocol):
    """Optional: answers one report frame sent outside the stream with one frame."""

    async def handle_unary(self, frame: bytes, peer: str) -> bytes: ...


@runtime_checkable
class TransportServer(Protocol):
    """The master's listening side of a transport."""

    name: ClassVar[str]
    schemes: ClassVar[tuple[str, ...]]

    async def serve(self, handler: SessionHandler, *, task_status: TaskStatus[str]) -> None:
        """Accept streams until cancelled; report the bound ``host:port`` via `task_status`.

        Each stream runs `handler` in its own task; one failing session never stops the
        server. On cancellation the listener closes and running sessions are cancelled.
        """
        ...


@runtime_checkable
class TransportClient(Protocol):
    """The agent's connecting side of a transport."""

    name: ClassVar[str]
    schemes: ClassVar[tuple[str, ...]]

    def connect(self, url: str) -> AbstractAsyncContextManager[Channel]:
        """Open a stream to the master at `url`.

        Every failure to establish it — refused, unreachable, TLS verification (a master
        whose certificate the pinned CA did not sign), timeout — raises `OSError`, so the
        agent can fall back to its next transport.
        """
        ...


# ---------------------------------------------------------------------------------------
# Auth
# ---------------------------------------------------------------------------------------


@attrs.frozen
class Credentials:
    """What a client presented: a scheme (``bearer``, ``basic``, ``password``...) and values."""

    scheme: str
    values: Mapping[str, str] = attrs.field(repr=False)
    remote_addr: str | None = None


@attrs.frozen
class Principal:
    """An authenticated caller."""

    subject: str
    roles: tuple[str, ...]
    authenticator: str
    scopes: tuple[str, ...] = ()


@runtime_checkable
class Authenticator(Protocol):
    """One link of the master's authentication chain."""

    name: ClassVar[str]

    async def authenticate(self, credentials: Credentials) -> Principal | None:
        """Return a principal, None when the credentials are not this link's kind,
        or raise `nxmesh.core.errors.NxMeshError` when they are and are wrong."""
        ...


# ---------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------


@runtime_checkable
class Renderer(Protocol):
    """Turns a desired state into a deterministic nginx file bundle.

    Constructed as ``cls(template_paths=...)``. Rendering is CPU-bound and synchronous;
    async callers run it through ``anyio.to_thread.run_sync``.
    """

    name: ClassVar[str]

    def render(self, state: DesiredState, *, extra_files: Mapping[str, bytes] = ...) -> Bundle: ...


# ---------------------------------------------------------------------------------------
# Agent side: deployment mode, nginx driver, health checks
# ---------------------------------------------------------------------------------------


@runtime_checkable
class DeploymentMode(Protocol):
    """How the agent finds, starts and signals nginx (standalone, sidecar...).

    The agent builds a mode with ``cls.from_settings(settings)`` when the class has that
    classmethod, else ``cls()``. A mode holding resources (a supervised child process)
    may define ``async def aclose()``; the agent calls it on shutdown.
    """

    name: ClassVar[str]
    priority: ClassVar[int]

    @classmethod
    def detect(cls) -> bool:
        """True when the agent appears to run in this mode (cheap, no side effects)."""
        ...

    async def nginx_pid(self) -> int | None:
        """The nginx master's pid, or None when no nginx runs (never raises for that)."""
        ...

    async def start_nginx(self) -> None:
        """Start nginx on the live tree (a no-op when it runs); `NxMeshError` if it cannot."""
        ...

    async def signal_nginx(self, signal: str) -> None:
        """Send ``reload``, ``reopen``, ``quit`` or ``stop`` to the master process."""
        ...


@runtime_checkable
class NginxDriver(Protocol):
    """The apply pipeline: stage, ``nginx -t``, atomic swap, reload, verify, roll back.

    The agent builds the driver with ``cls.from_settings(settings, mode=..., agent_id=...,
    events=...)`` (`events`: the agent's ``nxmesh.agent.EventRecorder``, or None).
    Applies are serialised by the caller (the agent's applier).
    """

    name: ClassVar[str]

    @classmethod
    def from_settings(
        cls, settings: Settings, *, mode: DeploymentMode, agent_id: str, events: Any
    ) -> NginxDriver: ...

    async def apply(
        self, update: PendingApply, bundle: Bundle, *, force: bool = False
    ) -> ApplyReport:
        """Make `bundle` the configuration nginx serves, or leave the old one serving.

        Reports ``noop`` when `bundle` is already live and intact (unless `force`: drift
        revert rewrites and reloads it), ``failed`` when nothing was changed,
        ``rolled_back`` when the new tree went live and was taken back.
        """
        ...

    async def live_digest(self) -> str | None:
        """Digest of the tree nginx currently runs, None when nothing was applied."""
        ...

    async def live_files(self) -> Mapping[str, bytes] | None:
        """The live tree's files as they are on disk now (drift detection), or None."""
        ...

    async def recover(self) -> str | None:
        """Undo an apply a crash interrupted; called once at agent start. Says what it did."""
        ...


@runtime_checkable
class HealthCheck(Protocol):
    """One health probe; its results go into the agent's HealthReport.

    The agent builds each check with ``cls.from_settings(settings)`` when the class has
    it, else ``cls()``. Result names start with the check's name (``http_probe.0``).
    """

    name: ClassVar[str]

    async def run(self) -> Sequence[HealthResult]: ...


# ---------------------------------------------------------------------------------------
# Event bus
# ---------------------------------------------------------------------------------------


@runtime_checkable
class EventBus(Protocol):
    """Delivers events to every subscriber in every master process sharing the bus.

    Constructed as ``cls(url)``, or with ``cls.from_settings(settings)`` when the class
    has that classmethod (to read its plugin's settings section). Subscribers see events
    published after they subscribed, in publish order per publisher.
    """

    name: ClassVar[str]
    schemes: ClassVar[tuple[str, ...]]

    async def open(self) -> None: ...
    async def aclose(self) -> None: ...
    async def publish(self, event: Event) -> None: ...
    def subscribe(self) -> AbstractAsyncContextManager[AsyncIterator[Event]]: ...


# ---------------------------------------------------------------------------------------
# Certificates: DNS-01 providers
# ---------------------------------------------------------------------------------------


@runtime_checkable
class DnsProvider(Protocol):
    """Publishes and removes the TXT records of ACME DNS-01 challenges.

    The master builds the provider named by the ``[plugins.certs] dns_provider`` setting
    with ``cls.from_settings(settings)`` when the class has that classmethod, else
    ``cls()``. `record_name` is fully qualified with a trailing dot
    (``_acme-challenge.example.com.``); one name may carry several values at once (a
    certificate for ``example.com`` and ``*.example.com``), so `remove_txt` removes only
    the given value. Failures raise `nxmesh.core.errors.NxMeshError` subclasses.
    """

    name: ClassVar[str]

    async def add_txt(self, record_name: str, value: str) -> None:
        """Publish the TXT record; return once the provider's DNS server answers with it."""
        ...

    async def remove_txt(self, record_name: str, value: str) -> None:
        """Remove that one TXT value (a missing record is not an error)."""
        ...
