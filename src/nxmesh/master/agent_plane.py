"""The master's side of its agents: session hub, rollout orchestrator and transports.

`run_agent_plane` is the ``nxmesh master`` component (`nxmesh.master.server.
DEFAULT_COMPONENTS`) that, inside the core runtime's task group:

1. builds the `MasterSessionHub` (enrollment, replay protection, fan-out) with the
   master's version-signing key — agents pin it at enrollment;
2. builds the `RolloutOrchestrator`, makes it ``services.orchestrator`` (so the API's
   changes reach it) and runs its loops;
3. starts every transport named in ``master.transports``:

   * ``websocket`` is **mounted on the API's own listener** at ``master.websocket_path``
     (``/agent``): same address, same port, same TLS as the API (plain HTTP unless a TLS
     proxy fronts it — the session is authenticated and every version signed either way);
     `AgentWebSocketMount` routes those upgrade requests to the hub before Litestar;
   * ``grpc`` listens on its **own port** ``master.grpc_port`` on ``master.api_host``,
     TLS by default with a certificate from the master's own CA
     (``<state_dir>/tls/ca.pem`` is what agents pin as ``agent.ca_file``). grpclib runs
     on asyncio only: on trio the gRPC transport is skipped with a warning;
   * any other installed transport listens on its section's ``port``
     (``[plugins.transport_<name>] port``);
4. with ``[plugins.certs] agree_tos = true``, the ACME client and the certificate
   renewal scheduler (`nxmesh.master.acme`), HTTP-01 tokens rolled out through the
   orchestrator.

On shutdown the transports stop accepting, open agent sessions are closed (agents
reconnect, with backoff, to this master once it is back or to another one), and the
orchestrator's queued bookkeeping is written (bounded).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final

import anyio
import anyio.abc
import attrs
import sniffio
import structlog

from nxmesh.core.errors import ConfigurationError, ProviderNotFoundError
from nxmesh.core.runtime import StashKey
from nxmesh.master.app import MasterServices, NoopOrchestrator
from nxmesh.master.orchestration import RolloutOrchestrator
from nxmesh.session_hub import MasterSessionHub, TransportHandler
from nxmesh.small_queues import compact_asyncio_queue
from nxmesh.transports import build_server, server_url
from nxmesh.websocket.endpoint import SUBPROTOCOL

__all__ = [
    "AGENT_PLANE",
    "AgentPlane",
    "AgentWebSocketMount",
    "run_agent_plane",
]

log = structlog.get_logger("nxmesh.master.agents")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@attrs.define(eq=False)
class AgentPlane:
    """What `run_agent_plane` runs, in ``services.stash[AGENT_PLANE]`` (tests, plugins)."""

    hub: MasterSessionHub
    orchestrator: RolloutOrchestrator
    websocket: TransportHandler | None = None
    addresses: dict[str, str] = attrs.field(factory=dict)
    """Where each transport listens: name → ``scheme://host:port[/path]``."""
    _scopes: set[anyio.CancelScope] = attrs.field(factory=set)
    _closed: bool = False

    async def serve_websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run one agent session on an ASGI WebSocket connection."""
        message = await receive()
        if message.get("type") != "websocket.connect":
            return
        handler = self.websocket
        if handler is None or self._closed:
            await send({"type": "websocket.close", "code": 1013})
            return
        offered = scope.get("subprotocols") or ()
        await send(
            {
                "type": "websocket.accept",
                "subprotocol": SUBPROTOCOL if SUBPROTOCOL in offered else None,
            }
        )
        client = scope.get("client")
        peer = f"{client[0]}:{client[1]}" if client else "unknown"
        # hypercorn on asyncio hands each connection an `asyncio.Queue` as `receive`:
        # its four deques are ~2.7 KB of every idle agent (see `nxmesh.small_queues`).
        compact_asyncio_queue(getattr(receive, "__self__", None))
        channel = AsgiChannel(receive, send)
        with anyio.CancelScope() as cancel:
            self._scopes.add(cancel)
            try:
                await handler(channel, peer)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                log.debug("agent websocket ended", peer=peer, error=repr(exc))
            except Exception:
                # Logged once, here, and the connection closed, as the transports' own
                # listeners do: hypercorn would drop it without a word. The agent reconnects.
                log.exception("agent websocket session failed", peer=peer)
            finally:
                self._scopes.discard(cancel)
        await channel.aclose()

    def close(self) -> None:
        """Refuse new WebSocket sessions and end the open ones."""
        self._closed = True
        for scope in list(self._scopes):
            scope.cancel()


AGENT_PLANE: Final = StashKey[AgentPlane]("nxmesh.master.agent_plane")


class AsgiChannel:
    """A `nxmesh.core.interfaces.Channel` over an ASGI WebSocket (binary messages).

    No lock around `send`: the channel contract has one sender task, and `receive` never
    sends (a text message only records close code 1003 for `aclose`). A lock here cost
    ~0.8 KB per connected agent.
    """

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        self._closed = False
        self._close_code = 1000

    async def send(self, frame: bytes) -> None:
        if self._closed:
            raise anyio.ClosedResourceError("the WebSocket is closed")
        try:
            await self._send({"type": "websocket.send", "bytes": frame})
        except (OSError, RuntimeError) as exc:  # the peer went away
            self._closed = True
            raise anyio.BrokenResourceError(str(exc)) from exc

    async def receive(self) -> bytes:
        while True:
            if self._closed or self._close_code != 1000:
                raise anyio.EndOfStream
            message = await self._receive()
            kind = message.get("type")
            if kind == "websocket.disconnect":
                self._closed = True
                raise anyio.EndOfStream
            if kind != "websocket.receive":
                continue
            data = message.get("bytes")
            if data is None:  # text: not ours; closed with 1003 by `aclose`
                self._close_code = 1003
                raise anyio.EndOfStream
            return bytes(data)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with anyio.move_on_after(2.0, shield=True), contextlib.suppress(OSError, RuntimeError):
            await self._send({"type": "websocket.close", "code": self._close_code})


class AgentWebSocketMount:
    """ASGI app: agent WebSocket upgrades at `path` go to the agent plane, the rest to
    `app` (the Litestar API). Before the plane runs, agents are told to retry (1013)."""

    def __init__(self, app: ASGIApp, services: MasterServices, *, path: str) -> None:
        self.app = app
        self.services = services
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") == "websocket" and scope.get("path") == self.path:
            plane = self.services.stash.get(AGENT_PLANE, None)
            if plane is None:
                await receive()
                await send({"type": "websocket.close", "code": 1013})
                return
            await plane.serve_websocket(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _port_for(name: str, services: MasterServices) -> int:
    settings = services.settings
    if name == "grpc":
        return settings.master.grpc_port
    port = getattr(settings.plugins.get(f"transport_{name}"), "port", None)
    if not isinstance(port, int):
        raise ConfigurationError(
            f"master.transports names {name!r}: give it a port ([plugins.transport_{name}] port)"
        )
    return port


async def run_agent_plane(
    services: MasterServices, *, task_status: anyio.abc.TaskStatus[AgentPlane]
) -> None:
    """Hub, orchestrator and transports until cancelled (see the module docstring)."""
    settings = services.settings
    hub = MasterSessionHub(
        services.enrollment,
        heartbeat_interval=settings.master.heartbeat_interval,
        signing_key=services.signer.verify_key,
        compress=settings.master.compress_versions,
    )
    orchestrator = RolloutOrchestrator(services)
    orchestrator.attach(hub)
    plane = AgentPlane(hub=hub, orchestrator=orchestrator)
    registry = services.registry["transport"]
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(orchestrator.run)
            services.orchestrator = orchestrator
            from nxmesh.master.acme import acme_enabled, run_certificate_renewal

            if acme_enabled(services):
                await tg.start(run_certificate_renewal, services, orchestrator)
            for name in settings.master.transports:
                if name == "websocket":
                    plane.websocket = hub.handler("websocket")
                    continue
                try:
                    cls = registry.get(name)
                except ProviderNotFoundError:
                    log.warning("transport not installed, not served", transport=name)
                    continue
                if name == "grpc" and sniffio.current_async_library() != "asyncio":
                    log.warning(
                        "the gRPC transport needs asyncio; not served on this loop", transport=name
                    )
                    continue
                url = server_url(cls, settings, _port_for(name, services))
                server = await anyio.to_thread.run_sync(build_server, cls, settings, url)
                address = await tg.start(server.serve, hub.handler(name))
                plane.addresses[name] = f"{url.split('://', 1)[0]}://{address}"
            if plane.websocket is not None:
                plane.addresses["websocket"] = settings.master.websocket_path
            services.stash[AGENT_PLANE] = plane
            log.info("agent transports ready", **plane.addresses)
            task_status.started(plane)
            try:
                await anyio.sleep_forever()
            finally:
                plane.close()
                services.orchestrator = NoopOrchestrator()
    finally:
        plane.close()
