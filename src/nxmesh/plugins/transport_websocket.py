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

import os
import ssl
import struct
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
from wsproto.events import AcceptConnection, Event, RejectConnection, Request
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
_MAX_HANDSHAKE: Final = 65536

# Errors that end one connection without saying anything about the server.
_CONNECTION_ERRORS = (
    OSError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
    LocalProtocolError,
    RemoteProtocolError,
)


def _new_lock() -> anyio.Lock:
    # Uncontended acquires need no trip through the event loop (anyio >= 4.5); at
    # thousands of agents a checkpoint per frame is measurable.
    try:
        return anyio.Lock(fast_acquire=True)
    except TypeError:  # pragma: no cover - anyio < 4.5
        return anyio.Lock()


def frame_header(opcode: int, length: int, *, masked: bool = False) -> bytes:
    """The header of one final (FIN) WebSocket frame carrying `length` payload bytes."""
    first = 0x80 | opcode
    mask_bit = 0x80 if masked else 0
    if length < 126:
        return bytes((first, mask_bit | length))
    if length < 65536:
        return _HEADER16.pack(first, mask_bit | 126, length)
    return _HEADER64.pack(first, mask_bit | 127, length)


def _mask(data: bytes, key: bytes) -> bytes:
    """XOR `data` with the 4-byte masking `key` (masking and unmasking alike)."""
    size = len(data)
    if size <= 4096:  # one big-int XOR is fastest for small frames...
        pad = (key * (size // 4 + 1))[:size]
        return (int.from_bytes(data, "little") ^ int.from_bytes(pad, "little")).to_bytes(
            size, "little"
        )
    out = bytearray(data)  # ...C-level byte translation for large ones
    for i in range(4):
        out[i::4] = out[i::4].translate(_XOR_TABLES[key[i]])
    return bytes(out)


_HEADER16: Final = struct.Struct("!BBH")
_HEADER64: Final = struct.Struct("!BBQ")
_XOR_TABLES: Final = tuple(bytes(b ^ k for b in range(256)) for k in range(256))
_CONTINUATION, _TEXT, _BINARY, _CLOSE, _PING, _PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class _Closing(Exception):
    """The frame parser decided to close the connection with `code`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


class WebSocketChannel:
    """A `Channel` over one upgraded WebSocket connection (RFC 6455, no extensions).

    wsproto does the HTTP upgrade; the frames after it are built and parsed here: one
    binary message per protocol frame is all the transport carries, and going through
    wsproto's event objects and its copies of every payload cost more per agent than the
    rest of a push. A client masks what it sends and the server checks that it did.

    `send` may be called from one task while another `receive`s; each of them is
    serialised by its own lock. Pings are answered from inside `receive`.
    """

    def __init__(
        self,
        stream: ByteStream,
        *,
        client: bool,
        buffered: bytes = b"",
        max_message_bytes: int = DEFAULT_MAX_MESSAGE,
    ) -> None:
        self._stream = stream
        self._client = client
        self._max = max_message_bytes
        self._send_lock = _new_lock()
        self._receive_lock = _new_lock()
        self._buffer = bytearray(buffered)
        self._parts: list[bytes] = []
        self._size = 0
        self._in_message = False
        self._ready: deque[bytes] = deque()
        self._replies: list[bytes] = []
        self._open = True  # we may still send data (no close sent or received)
        self._close_sent = False
        self._ended = False

    def _frame(self, opcode: int, payload: bytes) -> bytes:
        if self._client:  # RFC 6455 5.3: a fresh unpredictable key for every frame
            key = os.urandom(4)
            return frame_header(opcode, len(payload), masked=True) + key + _mask(payload, key)
        return frame_header(opcode, len(payload)) + payload

    async def _write(self, data: bytes) -> None:
        async with self._send_lock:
            await self._stream.send(data)

    async def send(self, frame: bytes) -> None:
        if not self._open:
            raise anyio.ClosedResourceError("the WebSocket is closed")
        await self._write(self._frame(_BINARY, frame))

    async def receive(self) -> bytes:
        """The next complete binary message; ``anyio.EndOfStream`` once the peer closed."""
        async with self._receive_lock:
            while not self._ready:
                if self._ended:
                    raise anyio.EndOfStream
                await self._pump()
            return self._ready.popleft()

    async def _pump(self) -> None:
        """Parse what is buffered; read more only when no complete frame was there."""
        try:
            self._parse()
        except _Closing as closing:
            await self._close(closing.code, str(closing))
            return
        for reply in self._replies:
            with suppress(*_CONNECTION_ERRORS):
                await self._write(reply)
        self._replies.clear()
        if self._ready or self._ended:
            return
        try:
            data = await self._stream.receive(_READ_SIZE)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            self._open = False  # 1006: gone without a close frame
            self._ended = True
            return
        self._buffer += data

    def _parse(self) -> None:
        """Consume every complete frame in the buffer (messages, pings, a close)."""
        buf = self._buffer
        pos = 0
        try:
            while not self._ended:
                available = len(buf) - pos
                if available < 2:
                    break
                first, second = buf[pos], buf[pos + 1]
                opcode, length = first & 0x0F, second & 0x7F
                start = pos + 2
                if length == 126:
                    if available < 4:
                        break
                    length = int.from_bytes(buf[start : start + 2], "big")
                    start += 2
                elif length == 127:
                    if available < 10:
                        break
                    length = int.from_bytes(buf[start : start + 8], "big")
                    start += 8
                if first & 0x70:
                    raise _Closing(1002, "reserved bits set (no extension was negotiated)")
                if bool(second & 0x80) is self._client:
                    raise _Closing(1002, "client frames must be masked, server frames not")
                if opcode >= _CLOSE and (length > 125 or not first & 0x80):
                    raise _Closing(1002, "control frames are short and unfragmented")
                if opcode <= _BINARY and self._size + length > self._max:
                    raise _Closing(1009, f"message larger than {self._max} bytes")
                key_end = start if self._client else start + 4
                end = key_end + length
                if len(buf) < end:
                    break
                with memoryview(buf) as view:
                    payload = bytes(view[key_end:end])
                if not self._client:
                    payload = _mask(payload, bytes(buf[start:key_end]))
                pos = end
                self._on_frame(opcode, bool(first & 0x80), payload)
        finally:
            del buf[:pos]

    def _on_frame(self, opcode: int, fin: bool, payload: bytes) -> None:
        if opcode in (_BINARY, _CONTINUATION):
            if (opcode == _BINARY) is self._in_message:
                raise _Closing(1002, "unexpected continuation frame")
            if fin and not self._parts:
                self._ready.append(payload)
                self._in_message = False
                self._size = 0
                return
            self._parts.append(payload)
            self._size += len(payload)
            self._in_message = not fin
            if fin:
                self._ready.append(b"".join(self._parts))
                self._parts.clear()
                self._size = 0
        elif opcode == _TEXT:
            raise _Closing(1003, "only binary messages are accepted")
        elif opcode == _PING:
            if self._open:
                self._replies.append(self._frame(_PONG, payload))
        elif opcode == _CLOSE:
            if len(payload) == 1:
                raise _Closing(1002, "close frame with a 1-byte payload")
            if not self._close_sent:  # answer with the peer's code, as RFC 6455 5.5.1 asks
                self._replies.append(self._frame(_CLOSE, payload[:2]))
                self._close_sent = True
            self._open = False
            self._ended = True
        elif opcode != _PONG:
            raise _Closing(1002, f"unknown opcode {opcode}")

    async def _close(self, code: int, reason: str) -> None:
        log.warning("closing websocket", code=code, reason=reason)
        self._ended = True
        await self._send_close(code, reason)

    async def _send_close(self, code: int, reason: str = "") -> None:
        if self._close_sent:
            return
        self._open = False
        self._close_sent = True
        payload = code.to_bytes(2, "big") + reason.encode()[:120]
        with suppress(*_CONNECTION_ERRORS):
            await self._write(self._frame(_CLOSE, payload))

    async def aclose(self) -> None:
        """Send a close frame (if still open) and close the stream; bounded and shielded."""
        with anyio.move_on_after(_CLOSE_TIMEOUT, shield=True):
            if self._open:
                await self._send_close(1000)
            self._open = False
            await self._stream.aclose()


async def _handshake_event(stream: ByteStream, ws: WSConnection, buffer: bytearray) -> Event:
    """The first event wsproto reads from the upgrade's header block.

    wsproto only sees the header block (up to the blank line): whatever follows it is
    already WebSocket frames and stays in `buffer` for `WebSocketChannel`.
    """
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            ws.receive_data(bytes(buffer[: end + 4]))
            del buffer[: end + 4]
            for event in ws.events():
                return event
            continue
        if len(buffer) > _MAX_HANDSHAKE:
            raise RemoteProtocolError("WebSocket handshake too large", event_hint=None)
        try:
            data = await stream.receive(_READ_SIZE)
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            raise anyio.EndOfStream from None
        buffer += data


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
    buffer = bytearray(initial)
    with anyio.fail_after(handshake_timeout):
        event = await _handshake_event(stream, ws, buffer)
    if not isinstance(event, Request):
        await stream.aclose()
        return
    if urlsplit(event.target).path != path:
        await stream.send(ws.send(RejectConnection(status_code=404)))
        await stream.aclose()
        return
    subprotocol = SUBPROTOCOL if SUBPROTOCOL in event.subprotocols else None
    await stream.send(ws.send(AcceptConnection(subprotocol=subprotocol)))
    # `buffer` keeps frames that arrived with the upgrade request.
    channel = WebSocketChannel(
        stream, client=False, buffered=bytes(buffer), max_message_bytes=max_message_bytes
    )
    try:
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
                request = Request(
                    host=_format_address(host, port), target=target, subprotocols=[SUBPROTOCOL]
                )
                await stream.send(ws.send(request))
                buffer = bytearray()
                event = await _handshake_event(stream, ws, buffer)
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
        # `buffer` keeps frames the master sent right behind its answer.
        return WebSocketChannel(
            stream, client=True, buffered=bytes(buffer), max_message_bytes=self.max_message_bytes
        )


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
