"""WebSocket transport (``ws://``, ``wss://``): the agent's fallback when gRPC cannot connect.

Built on `wsproto` (sans-I/O) over anyio byte streams, so it runs on asyncio and trio and
works through proxies and load balancers that only speak HTTP/1.1. One binary WebSocket
message carries one protocol frame; the subprotocol is ``nxmesh.v1``.

- `WebSocketTransport.serve` listens on its own TCP port (TLS through an `ssl.SSLContext`).
- `serve_websocket` does the upgrade and runs the session on *any* anyio byte stream, so
  the master's HTTP server can mount the transport under its own listener and TLS later:
  hand it the connection's stream and the request bytes it already read.
- `WebSocketTransport.connect` connects, upgrades and yields a `Channel`.

Liveness is the protocol's job (``Heartbeat`` every 30 s, answered by an ``Ack``); the
channel answers WebSocket pings but sends none. Messages larger than `max_message_bytes`
close the connection with code 1009 rather than being buffered.
"""

from __future__ import annotations

import ssl
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any, ClassVar, Final
from urllib.parse import urlsplit

import anyio
import structlog
from anyio.abc import ByteStream, SocketAttribute, TaskStatus
from anyio.streams.tls import TLSListener
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from nxmesh import hookimpl
from nxmesh.core.interfaces import Channel, SessionHandler

__all__ = [
    "SUBPROTOCOL",
    "WebSocketChannel",
    "WebSocketTransport",
    "serve_websocket",
]

log = structlog.get_logger("nxmesh.transport.websocket")

SUBPROTOCOL: Final = "nxmesh.v1"
DEFAULT_PATH: Final = "/agent"
DEFAULT_MAX_MESSAGE: Final = 16 * 1024 * 1024
_READ_SIZE: Final = 65536
_CLOSE_TIMEOUT: Final = 2.0

# Errors that end one connection without saying anything about the server.
_CONNECTION_ERRORS = (
    OSError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
    LocalProtocolError,
    RemoteProtocolError,
)


class WebSocketChannel:
    """A `Channel` over one upgraded WebSocket connection.

    `send` may be called from one task while another `receive`s; each of them is
    serialised by its own lock. Pings are answered from inside `receive`.
    """

    def __init__(
        self,
        stream: ByteStream,
        ws: WSConnection,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE,
    ) -> None:
        self._stream = stream
        self._ws = ws
        self._max = max_message_bytes
        self._send_lock = anyio.Lock()
        self._receive_lock = anyio.Lock()
        self._parts: list[bytes] = []
        self._size = 0
        self._ready: deque[bytes] = deque()
        self._ended = False

    async def _write(self, event: Event) -> None:
        data = self._ws.send(event)
        async with self._send_lock:
            await self._stream.send(data)

    async def send(self, frame: bytes) -> None:
        if self._ws.state is not ConnectionState.OPEN:
            raise anyio.ClosedResourceError("the WebSocket is closed")
        try:
            await self._write(BytesMessage(data=frame))
        except LocalProtocolError:
            raise anyio.ClosedResourceError("the WebSocket is closing") from None

    async def receive(self) -> bytes:
        """The next complete binary message; ``anyio.EndOfStream`` once the peer closed."""
        async with self._receive_lock:
            while not self._ready:
                if self._ended:
                    raise anyio.EndOfStream
                await self._pump()
            return self._ready.popleft()

    async def _pump(self) -> None:
        try:
            data: bytes | None = await self._stream.receive(_READ_SIZE)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            data = None
        self._ws.receive_data(data)
        await self._handle_events()
        if data is None:
            self._ended = True

    async def _handle_events(self) -> None:
        for event in self._ws.events():
            await self._handle(event)
            if self._ended:
                return

    async def _handle(self, event: Event) -> None:
        if isinstance(event, BytesMessage):
            self._size += len(event.data)
            if self._size > self._max:
                await self._close(1009, f"message larger than {self._max} bytes")
                return
            self._parts.append(bytes(event.data))
            if event.message_finished:
                self._ready.append(b"".join(self._parts))
                self._parts.clear()
                self._size = 0
        elif isinstance(event, TextMessage):
            await self._close(1003, "only binary messages are accepted")
        elif isinstance(event, Ping):
            await self._write(event.response())
        elif isinstance(event, CloseConnection):
            if self._ws.state is ConnectionState.REMOTE_CLOSING:
                with suppress(*_CONNECTION_ERRORS):
                    await self._write(event.response())
            self._ended = True

    async def feed(self, events: Sequence[Event]) -> None:
        """Process events wsproto produced before this channel existed (the handshake's)."""
        for event in events:
            await self._handle(event)

    async def _close(self, code: int, reason: str) -> None:
        log.warning("closing websocket", code=code, reason=reason)
        self._ended = True
        if self._ws.state is ConnectionState.OPEN:
            with suppress(*_CONNECTION_ERRORS):
                await self._write(CloseConnection(code=code, reason=reason))

    async def aclose(self) -> None:
        """Send a close frame (if still open) and close the stream; bounded and shielded."""
        with anyio.move_on_after(_CLOSE_TIMEOUT, shield=True):
            if self._ws.state is ConnectionState.OPEN:
                with suppress(*_CONNECTION_ERRORS):
                    await self._write(CloseConnection(code=1000))
            await self._stream.aclose()


async def _next_event(stream: ByteStream, ws: WSConnection, pending: deque[Event]) -> Event:
    while not pending:
        try:
            data: bytes | None = await stream.receive(_READ_SIZE)
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            data = None
        ws.receive_data(data)
        pending.extend(ws.events())
        if data is None and not pending:
            raise anyio.EndOfStream
    return pending.popleft()


async def serve_websocket(
    stream: ByteStream,
    handler: SessionHandler,
    *,
    peer: str,
    path: str = DEFAULT_PATH,
    initial: bytes = b"",
    max_message_bytes: int = DEFAULT_MAX_MESSAGE,
    handshake_timeout: float = 10.0,
) -> None:
    """Upgrade `stream` to a WebSocket and run `handler` on it until it returns.

    `initial` holds bytes already read from the stream (an HTTP server that parsed the
    request line to route it); they are replayed into the handshake. Requests for another
    path get a 404, requests that are not an upgrade a 400 (wsproto's own answer).
    """
    ws = WSConnection(ConnectionType.SERVER)
    pending: deque[Event] = deque()
    if initial:
        ws.receive_data(initial)
        pending.extend(ws.events())
    with anyio.fail_after(handshake_timeout):
        event = await _next_event(stream, ws, pending)
    if not isinstance(event, Request):
        await stream.aclose()
        return
    if urlsplit(event.target).path != path:
        await stream.send(ws.send(RejectConnection(status_code=404)))
        await stream.aclose()
        return
    subprotocol = SUBPROTOCOL if SUBPROTOCOL in event.subprotocols else None
    await stream.send(ws.send(AcceptConnection(subprotocol=subprotocol)))
    channel = WebSocketChannel(stream, ws, max_message_bytes=max_message_bytes)
    try:
        await channel.feed(list(pending))  # frames that arrived with the upgrade request
        await handler(channel, peer)
    finally:
        await channel.aclose()


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _QuietTLSListener(TLSListener):
    """Logs a failed TLS handshake (a client that does not trust our CA...) as one line."""

    @staticmethod
    async def handle_handshake_error(exc: BaseException, stream: Any) -> None:
        await anyio.aclose_forcefully(stream)
        if not isinstance(exc, Exception):
            raise exc
        log.warning("TLS handshake failed", error=str(exc) or type(exc).__name__)


class WebSocketTransport:
    """WebSocket transport; one instance serves (master) or connects (agent).

    Serving: ``WebSocketTransport("wss://0.0.0.0:8443/agent", ssl_context=server_ctx)``
    listens there (port 0 binds a free port; `serve` reports ``host:port``).
    Connecting: ``WebSocketTransport(ssl_context=client_ctx).connect("wss://master:8443/agent")``
    where `client_ctx` pins the master's CA (`nxmesh.tls.client_ssl_context`).
    """

    name: ClassVar[str] = "websocket"
    schemes: ClassVar[tuple[str, ...]] = ("ws", "wss")

    def __init__(
        self,
        url: str = "ws://127.0.0.1:0/agent",
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE,
        handshake_timeout: float = 10.0,
        connect_timeout: float = 10.0,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in self.schemes:
            raise ValueError(f"not a WebSocket URL: {url!r}")
        self.url = url
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 0
        self.path = parts.path or DEFAULT_PATH
        self.tls = parts.scheme == "wss"
        self.ssl_context = ssl_context
        self.max_message_bytes = max_message_bytes
        self.handshake_timeout = handshake_timeout
        self.connect_timeout = connect_timeout

    # -- master side ---------------------------------------------------------------------

    async def serve(
        self,
        handler: SessionHandler,
        *,
        task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on `url` and run `handler` for every upgraded connection."""
        if self.tls and self.ssl_context is None:
            raise ValueError("a wss:// listener needs an ssl_context (see nxmesh.tls)")
        if not self.tls and self.ssl_context is not None:
            raise ValueError("use a wss:// URL with an ssl_context")
        listener = await anyio.create_tcp_listener(local_host=self.host, local_port=self.port)
        port = listener.extra(SocketAttribute.local_port)  # noqa: S610 - anyio, not Django
        address = _format_address(self.host, port)

        async def on_connection(stream: ByteStream) -> None:
            peer = _peer_of(stream)
            try:
                await serve_websocket(
                    stream,
                    handler,
                    peer=peer,
                    path=self.path,
                    max_message_bytes=self.max_message_bytes,
                    handshake_timeout=self.handshake_timeout,
                )
            except (*_CONNECTION_ERRORS, TimeoutError) as exc:
                log.debug("websocket connection ended", peer=peer, error=repr(exc))
            except Exception:
                # One agent's failure must not stop the listener serving the others.
                log.exception("websocket session failed", peer=peer)

        served: Any = listener
        if self.ssl_context is not None:
            served = _QuietTLSListener(
                listener,
                self.ssl_context,
                standard_compatible=False,
                handshake_timeout=self.handshake_timeout,
            )
        async with served:
            log.info("websocket transport listening", address=address, tls=self.tls)
            task_status.started(address)
            await served.serve(on_connection)

    # -- agent side ----------------------------------------------------------------------

    @asynccontextmanager
    async def connect(self, url: str) -> AsyncIterator[Channel]:
        """Connect and upgrade; every failure to do so is an `OSError`."""
        parts = urlsplit(url)
        if parts.scheme not in self.schemes or not parts.hostname:
            raise ValueError(f"not a WebSocket URL: {url!r}")
        tls = parts.scheme == "wss"
        if tls and self.ssl_context is None:
            raise ValueError("a wss:// URL needs an ssl_context pinning the master's CA")
        host = parts.hostname
        port = parts.port or (443 if tls else 80)
        target = (parts.path or DEFAULT_PATH) + (f"?{parts.query}" if parts.query else "")
        channel = await self._open(host, port, target, tls)
        try:
            yield channel
        finally:
            await channel.aclose()

    async def _open(self, host: str, port: int, target: str, tls: bool) -> WebSocketChannel:
        with anyio.fail_after(self.connect_timeout):
            if self.ssl_context is not None and tls:
                stream: ByteStream = await anyio.connect_tcp(
                    host, port, ssl_context=self.ssl_context, tls_standard_compatible=False
                )
            else:
                stream = await anyio.connect_tcp(host, port)
            try:
                ws = WSConnection(ConnectionType.CLIENT)
                await stream.send(
                    ws.send(
                        Request(
                            host=_format_address(host, port), target=target,
                            subprotocols=[SUBPROTOCOL],
                        )
                    )
                )
                pending: deque[Event] = deque()
                event = await _next_event(stream, ws, pending)
            except BaseException as exc:
                await anyio.aclose_forcefully(stream)
                if isinstance(exc, anyio.EndOfStream | anyio.BrokenResourceError):
                    raise ConnectionResetError("the master closed the connection") from exc
                raise
        if isinstance(event, RejectConnection):
            await anyio.aclose_forcefully(stream)
            raise ConnectionRefusedError(
                f"the master refused the WebSocket upgrade (HTTP {event.status_code})"
            )
        if not isinstance(event, AcceptConnection):
            await anyio.aclose_forcefully(stream)
            raise ConnectionResetError(f"unexpected WebSocket handshake event {event!r}")
        channel = WebSocketChannel(stream, ws, max_message_bytes=self.max_message_bytes)
        await channel.feed(list(pending))
        return channel



def _peer_of(stream: ByteStream) -> str:
    try:
        addr = stream.extra(SocketAttribute.remote_address)  # noqa: S610
    except anyio.TypedAttributeLookupError:
        return "unknown"
    if isinstance(addr, tuple):
        return _format_address(str(addr[0]), int(addr[1]))
    return str(addr)


@hookimpl(trylast=True)
def nxmesh_register_transports() -> Sequence[type[WebSocketTransport]]:
    return [WebSocketTransport]
