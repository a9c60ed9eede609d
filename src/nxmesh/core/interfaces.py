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
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

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

__all__ = [
    "Authenticator",
    "Channel",
    "Credentials",
    "DeploymentMode",
    "EventBus",
    "HealthCheck",
    "NginxDriver",
    "Principal",
    "Renderer",
    "SessionHandler",
    "StorageBackend",
    "TransportClient",
    "TransportServer",
]


# ---------------------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------------------


@runtime_checkable
class StorageBackend(Protocol):
    """Durable state of the master: versions, agents and everything the API manages.

    Constructed as ``cls(url)``; `open` connects and migrates, `aclose` releases.
    Writes are atomic: a crash between two statements of one write leaves nothing torn.
    """

    name: ClassVar[str]
    schemes: ClassVar[tuple[str, ...]]

    async def open(self) -> None: ...
    async def aclose(self) -> None: ...

    async def add_version(self, version: ConfigVersion) -> None:
        """Store a new version; its number must be the next one of its workspace."""
        ...

    async def get_version(self, workspace: str, number: int) -> ConfigVersion | None: ...
    async def latest_version(self, workspace: str) -> ConfigVersion | None: ...
    async def list_versions(
        self, workspace: str, *, limit: int = 100, before: int | None = None
    ) -> Sequence[ConfigVersion]: ...

    async def upsert_agent(self, agent: Agent) -> None: ...
    async def get_agent(self, agent_id: str) -> Agent | None: ...
    async def list_agents(self) -> Sequence[Agent]: ...


# ---------------------------------------------------------------------------------------
# Transport
# ---------------------------------------------------------------------------------------


class Channel(Protocol):
    """One bidirectional master↔agent stream carrying encoded protocol envelopes."""

    async def send(self, frame: bytes) -> None: ...
    async def receive(self) -> bytes:
        """Next frame; raises ``anyio.EndOfStream`` when the peer closed."""
        ...

    async def aclose(self) -> None: ...


class SessionHandler(Protocol):
    """What the master runs for each accepted agent stream."""

    async def __call__(self, channel: Channel, peer: str) -> None: ...


@runtime_checkable
class TransportServer(Protocol):
    """The master's listening side of a transport."""

    name: ClassVar[str]
    schemes: ClassVar[tuple[str, ...]]
    role: ClassVar[str]  # "server"

    async def serve(
        self, handler: SessionHandler, *, task_status: TaskStatus[str]
    ) -> None:
        """Accept streams until cancelled; report the bound address via `task_status`."""
        ...


@runtime_checkable
class TransportClient(Protocol):
    """The agent's connecting side of a transport."""

    name: ClassVar[str]
    schemes: ClassVar[tuple[str, ...]]
    role: ClassVar[str]  # "client"

    def connect(self, url: str) -> AbstractAsyncContextManager[Channel]:
        """Open a stream to the master at `url`; raises ``OSError`` when unreachable."""
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

    def render(self, state: DesiredState, *, extra_files: Mapping[str, bytes] = ...) -> Bundle:
        ...


# ---------------------------------------------------------------------------------------
# Agent side: deployment mode, nginx driver, health checks
# ---------------------------------------------------------------------------------------


@runtime_checkable
class DeploymentMode(Protocol):
    """How the agent finds, starts and signals nginx (standalone, sidecar...)."""

    name: ClassVar[str]
    priority: ClassVar[int]

    @classmethod
    def detect(cls) -> bool:
        """True when the agent appears to run in this mode (cheap, no side effects)."""
        ...

    async def nginx_pid(self) -> int | None: ...
    async def start_nginx(self) -> None: ...
    async def signal_nginx(self, signal: str) -> None:
        """Send ``reload``, ``reopen``, ``quit`` or ``stop`` to the master process."""
        ...


@runtime_checkable
class NginxDriver(Protocol):
    """The apply pipeline: stage, ``nginx -t``, atomic swap, reload, verify, roll back."""

    name: ClassVar[str]

    async def apply(self, update: PendingApply, bundle: Bundle) -> ApplyReport: ...
    async def live_digest(self) -> str | None:
        """Digest of the tree nginx currently runs, None when nothing was applied."""
        ...


@runtime_checkable
class HealthCheck(Protocol):
    """One health probe; its results go into the agent's HealthReport."""

    name: ClassVar[str]

    async def run(self) -> Sequence[HealthResult]: ...


# ---------------------------------------------------------------------------------------
# Event bus
# ---------------------------------------------------------------------------------------


@runtime_checkable
class EventBus(Protocol):
    """Delivers events to every subscriber in every master process sharing the bus.

    Constructed as ``cls(url)``. Subscribers see events published after they subscribed,
    in publish order per publisher.
    """

    name: ClassVar[str]
    schemes: ClassVar[tuple[str, ...]]

    async def open(self) -> None: ...
    async def aclose(self) -> None: ...
    async def publish(self, event: Event) -> None: ...
    def subscribe(self) -> AbstractAsyncContextManager[AsyncIterator[Event]]: ...
