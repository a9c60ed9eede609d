"""WebSocket transport (``ws://``, ``wss://``): the agent's fallback when gRPC cannot connect.

Runs on asyncio and trio and works through proxies and load balancers that only speak
HTTP/1.1. One binary WebSocket message carries one protocol frame; the subprotocol is
``nxmesh.v1``; no extension (permessage-deflate) is negotiated: frames are signed binary.
`wsproto` does the HTTP upgrade, `_FrameCodec` the frames after it. On trio (and in
`serve_websocket`) connections are anyio byte streams; on asyncio `serve` and `connect`
use asyncio's own transports (`_AsyncioWebSocket`), which costs far less per frame.

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

import asyncio
import os
import ssl
import struct
import typing
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any, ClassVar, Final
from urllib.parse import urlsplit

import anyio
import anyio.lowlevel
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
_MAX_READY: Final = 64  # parsed messages held before reading pauses
_BACKLOG: Final = 65536  # anyio's default; the kernel caps it at somaxconn

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


def _frame_header(opcode: int, length: int, *, masked: bool = False) -> bytes:
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


class _FrameCodec:
    """RFC 6455 framing state of one connection, shared by both I/O paths.

    `buffer` holds received bytes not yet parsed; `parse` turns the complete frames in it
    into `ready` messages and `replies` (pongs, the answer to a close) to write.
    """

    __slots__ = (
        "buffer",
        "client",
        "close_sent",
        "ended",
        "in_message",
        "max",
        "open",
        "parts",
        "ready",
        "replies",
        "size",
    )

    def __init__(self, buffer: bytearray, *, client: bool, max_message_bytes: int) -> None:
        self.buffer = buffer
        self.client = client
        self.max = max_message_bytes
        self.parts: list[bytes] = []
        self.size = 0
        self.in_message = False
        self.ready: deque[bytes] = deque()
        self.replies: list[bytes] = []
        self.open = True  # data may still be sent (no close sent or received)
        self.close_sent = False
        self.ended = False  # nothing more will be received

    def frame(self, opcode: int, payload: bytes) -> bytes:
        if self.client:  # RFC 6455 5.3: a fresh unpredictable key for every frame
            key = os.urandom(4)
            return _frame_header(opcode, len(payload), masked=True) + key + _mask(payload, key)
        return _frame_header(opcode, len(payload)) + payload

    def frame_parts(self, head: bytes, body: bytes) -> bytes:
        """One binary message carrying ``head + body``, the body copied once."""
        if self.client:
            return self.frame(_BINARY, head + body)
        return b"".join((_frame_header(_BINARY, len(head) + len(body)), head, body))

    def close_frame(self, code: int, reason: str = "") -> bytes | None:
        """The close frame to send, once; None when one was sent already."""
        self.open = False
        if self.close_sent:
            return None
        self.close_sent = True
        return self.frame(_CLOSE, code.to_bytes(2, "big") + reason.encode()[:120])

    def lost(self) -> None:
        """The connection ended without a close frame (1006)."""
        self.open = False
        self.ended = True

    def parse(self) -> None:
        """Consume every complete frame in the buffer.

        :raises _Closing: the peer broke the protocol; close with its code.
        """
        buf = self.buffer
        pos = 0
        try:
            while not self.ended:
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
                if bool(second & 0x80) is self.client:
                    raise _Closing(1002, "client frames must be masked, server frames not")
                if opcode >= _CLOSE and (length > 125 or not first & 0x80):
                    raise _Closing(1002, "control frames are short and unfragmented")
                if opcode <= _BINARY and self.size + length > self.max:
                    raise _Closing(1009, f"message larger than {self.max} bytes")
                key_end = start if self.client else start + 4
                end = key_end + length
                if len(buf) < end:
                    break
                with memoryview(buf) as view:
                    payload = bytes(view[key_end:end])
                if not self.client:
                    payload = _mask(payload, bytes(buf[start:key_end]))
                pos = end
                self._on_frame(opcode, bool(first & 0x80), payload)
        finally:
            del buf[:pos]

    def _on_frame(self, opcode: int, fin: bool, payload: bytes) -> None:
        if opcode in (_BINARY, _CONTINUATION):
            if (opcode == _BINARY) is self.in_message:
                raise _Closing(1002, "unexpected continuation frame")
            if fin and not self.parts:
                self.ready.append(payload)
                self.in_message = False
                self.size = 0
                return
            self.parts.append(payload)
            self.size += len(payload)
            self.in_message = not fin
            if fin:
                self.ready.append(b"".join(self.parts))
                self.parts.clear()
                self.size = 0
        elif opcode == _TEXT:
            raise _Closing(1003, "only binary messages are accepted")
        elif opcode == _PING:
            if self.open:
                self.replies.append(self.frame(_PONG, payload))
        elif opcode == _CLOSE:
            if len(payload) == 1:
                raise _Closing(1002, "close frame with a 1-byte payload")
            if not self.close_sent:  # echo the peer's code, as RFC 6455 5.5.1 asks
                self.close_sent = True
                self.replies.append(self.frame(_CLOSE, payload[:2]))
            self.open = False
            self.ended = True
        elif opcode != _PONG:
            raise _Closing(1002, f"unknown opcode {opcode}")


class WebSocketChannel:
    """A `Channel` over one upgraded WebSocket connection on any anyio byte stream.

    wsproto does the HTTP upgrade; the frames after it are built and parsed here
    (`_FrameCodec`): one binary message per protocol frame is all the transport carries,
    and wsproto's event objects and copies of every payload cost more per agent than the
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
        self._codec = _FrameCodec(
            bytearray(buffered), client=client, max_message_bytes=max_message_bytes
        )
        self._send_lock = _new_lock()
        self._receive_lock = _new_lock()

    async def _write(self, data: bytes) -> None:
        async with self._send_lock:
            await self._stream.send(data)

    async def send(self, frame: bytes) -> None:
        if not self._codec.open:
            raise anyio.ClosedResourceError("the WebSocket is closed")
        await self._write(self._codec.frame(_BINARY, frame))

    async def send_parts(self, head: bytes, body: bytes) -> None:
        """`send` of ``head + body`` (the session hub's `SendsParts`: a version's sealed
        header and the body all agents share)."""
        if not self._codec.open:
            raise anyio.ClosedResourceError("the WebSocket is closed")
        await self._write(self._codec.frame_parts(head, body))

    async def receive(self) -> bytes:
        """The next complete binary message; ``anyio.EndOfStream`` once the peer closed."""
        codec = self._codec
        async with self._receive_lock:
            while not codec.ready:
                if codec.ended:
                    raise anyio.EndOfStream
                await self._pump()
            return codec.ready.popleft()

    async def _pump(self) -> None:
        """Parse what is buffered; read more only when no complete frame was there."""
        codec = self._codec
        try:
            codec.parse()
        except _Closing as closing:
            await self._close(closing.code, str(closing))
            return
        for reply in codec.replies:
            with suppress(*_CONNECTION_ERRORS):
                await self._write(reply)
        codec.replies.clear()
        if codec.ready or codec.ended:
            return
        try:
            data = await self._stream.receive(_READ_SIZE)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            codec.lost()
            return
        codec.buffer += data

    async def _close(self, code: int, reason: str) -> None:
        log.warning("closing websocket", code=code, reason=reason)
        self._codec.ended = True
        frame = self._codec.close_frame(code, reason)
        if frame is not None:
            with suppress(*_CONNECTION_ERRORS):
                await self._write(frame)

    async def aclose(self) -> None:
        """Send a close frame (if still open) and close the stream; bounded and shielded."""
        with anyio.move_on_after(_CLOSE_TIMEOUT, shield=True):
            frame = self._codec.close_frame(1000) if self._codec.open else None
            if frame is not None:
                with suppress(*_CONNECTION_ERRORS):
                    await self._write(frame)
            await self._stream.aclose()


class _Upgrading(typing.Protocol):
    """What the upgrade needs from a connection: its received bytes and a way to write."""

    buffer: bytearray

    async def fill(self) -> None:
        """Read more into `buffer`; ``anyio.EndOfStream`` at the end."""

    async def write(self, data: bytes) -> None: ...


class _StreamIO:
    """`_Upgrading` over an anyio byte stream."""

    def __init__(self, stream: ByteStream, initial: bytes = b"") -> None:
        self.stream = stream
        self.buffer = bytearray(initial)

    async def fill(self) -> None:
        try:
            self.buffer += await self.stream.receive(_READ_SIZE)
        except anyio.BrokenResourceError:
            raise anyio.EndOfStream from None

    async def write(self, data: bytes) -> None:
        await self.stream.send(data)


async def _handshake_event(io: _Upgrading, ws: WSConnection) -> Event:
    """The first event wsproto reads from the upgrade's header block.

    wsproto only sees the header block (up to the blank line): whatever follows it is
    already WebSocket frames and stays in ``io.buffer`` for the frame codec.
    """
    buffer = io.buffer
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
        await io.fill()


async def _accept_upgrade(io: _Upgrading, *, path: str) -> bool:
    """Answer the client's upgrade request: True once accepted."""
    ws = WSConnection(ConnectionType.SERVER)
    try:
        event = await _handshake_event(io, ws)
    except RemoteProtocolError as exc:  # not an upgrade: wsproto's own answer (400)
        if isinstance(exc.event_hint, RejectConnection):
            with suppress(*_CONNECTION_ERRORS):
                await io.write(ws.send(exc.event_hint))
        raise
    if not isinstance(event, Request):
        return False
    if urlsplit(event.target).path != path:
        await io.write(ws.send(RejectConnection(status_code=404)))
        return False
    subprotocol = SUBPROTOCOL if SUBPROTOCOL in event.subprotocols else None
    await io.write(ws.send(AcceptConnection(subprotocol=subprotocol)))
    return True


async def _request_upgrade(io: _Upgrading, host: str, target: str) -> None:
    """Ask the master for the upgrade; OSError when it refuses."""
    ws = WSConnection(ConnectionType.CLIENT)
    await io.write(ws.send(Request(host=host, target=target, subprotocols=[SUBPROTOCOL])))
    try:
        event = await _handshake_event(io, ws)
    except anyio.EndOfStream as exc:
        raise ConnectionResetError("the master closed the connection") from exc
    if isinstance(event, RejectConnection):
        raise ConnectionRefusedError(
            f"the master refused the WebSocket upgrade (HTTP {event.status_code})"
        )
    if not isinstance(event, AcceptConnection):
        raise ConnectionResetError(f"unexpected WebSocket handshake event {event!r}")


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
    io = _StreamIO(stream, initial)
    with anyio.fail_after(handshake_timeout):
        accepted = await _accept_upgrade(io, path=path)
    if not accepted:
        await stream.aclose()
        return
    # `io.buffer` keeps frames that arrived with the upgrade request.
    channel = WebSocketChannel(
        stream, client=False, buffered=bytes(io.buffer), max_message_bytes=max_message_bytes
    )
    try:
        await handler(channel, peer)
    finally:
        await channel.aclose()


def _on_asyncio() -> bool:
    """Whether this runs on asyncio (trio takes the anyio stream path)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class _AsyncioWebSocket(asyncio.Protocol):
    """One WebSocket connection on asyncio's own transports, TLS included.

    On asyncio, anyio's socket and TLS streams cost several trips through the event loop
    per frame (a checkpoint per send, reading switched off and on around every receive:
    two epoll_ctl calls, the TLS stream's retry loop); at thousands of agents that is
    most of a push. Here bytes arrive through `data_received`, are decrypted by an
    `ssl.SSLObject` on memory BIOs (as anyio's TLS stream does, and without asyncio's
    256 KiB read buffer per TLS connection) and parsed on the spot; writes go straight to
    the transport, so they need no lock. It is the `Channel` once `start_frames` ran.
    """

    __slots__ = (
        "_closed",
        "_codec",
        "_drained",
        "_eof",
        "_error",
        "_handshaken",
        "_in",
        "_on_made",
        "_out",
        "_reading_paused",
        "_streak",
        "_tls",
        "_transport",
        "_waiter",
        "buffer",
        "peer",
    )

    def __init__(
        self,
        ctx: ssl.SSLContext | None,
        *,
        server_side: bool = False,
        server_hostname: str | None = None,
        on_made: asyncio.Queue[_AsyncioWebSocket] | None = None,
    ) -> None:
        self.buffer = bytearray()
        self.peer = "unknown"
        self._codec: _FrameCodec | None = None
        self._tls: ssl.SSLObject | None = None
        self._in = self._out = ssl.MemoryBIO()
        if ctx is not None:
            self._in = ssl.MemoryBIO()
            self._tls = ctx.wrap_bio(
                self._in, self._out, server_side=server_side, server_hostname=server_hostname
            )
        self._handshaken = ctx is None
        self._on_made = on_made
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None  # while writing is paused
        self._closed: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._eof = False  # nothing more will arrive
        self._reading_paused = False
        self._streak = 0

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        addr = transport.get_extra_info("peername")
        if isinstance(addr, tuple):
            self.peer = _format_address(str(addr[0]), int(addr[1]))
        if self._tls is not None and not self._tls.server_side:
            self._advance_handshake()  # the ClientHello
        if self._on_made is not None:
            self._on_made.put_nowait(self)

    def data_received(self, data: bytes) -> None:
        if self._tls is None:
            self.buffer += data
        else:
            self._in.write(data)
            if not self._advance_handshake():
                self._received()  # wake whoever waits for the handshake
                return
            self._decrypt()
        self._received()

    def eof_received(self) -> bool | None:
        self._eof = True
        self._received()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and self._error is None:
            self._error = exc
        self._eof = True
        self._transport = None
        self._received()
        self.resume_writing()
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    # -- TLS and parsing (synchronous, from the protocol callbacks) -----------------------

    def _advance_handshake(self) -> bool:
        """Whether TLS is established (driving the handshake on)."""
        if self._handshaken:
            return True
        assert self._tls is not None
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return False
        except ssl.SSLError as exc:
            self._flush()  # the alert
            self._fail(exc)
            return False
        self._handshaken = True
        self._flush()
        return True

    def _decrypt(self) -> None:
        tls = self._tls
        assert tls is not None
        try:
            # Stop when the BIO is drained rather than on SSLWantReadError: one exception
            # less per ack at thousands of agents.
            while self._in.pending or tls.pending():
                chunk = tls.read(_READ_SIZE)
                if not chunk:
                    self._eof = True
                    break
                self.buffer += chunk
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            self._eof = True
        except ssl.SSLError as exc:
            self._fail(exc)
        self._flush()  # TLS 1.3 tickets, key updates

    def _flush(self) -> None:
        transport = self._transport
        if self._out.pending and transport is not None and not transport.is_closing():
            transport.write(self._out.read())

    def _received(self) -> None:
        codec = self._codec
        if codec is not None:
            try:
                codec.parse()
            except _Closing as closing:
                log.warning("closing websocket", code=closing.code, reason=str(closing))
                codec.ended = True
                frame = codec.close_frame(closing.code, str(closing))
                if frame is not None:
                    codec.replies.append(frame)
            for reply in codec.replies:
                with suppress(anyio.BrokenResourceError, ssl.SSLError):
                    self._write(reply)
            codec.replies.clear()
            if self._eof:
                codec.lost()
        self._flow()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _flow(self) -> None:
        """Pause reading while parsed messages (or an upgrade's bytes) pile up."""
        codec = self._codec
        if codec is not None:
            backlog = len(codec.ready) >= (_MAX_READY // 2 if self._reading_paused else _MAX_READY)
        else:
            backlog = len(self.buffer) > _MAX_HANDSHAKE
        if backlog is not self._reading_paused and self._transport is not None:
            self._reading_paused = backlog
            if backlog:
                self._transport.pause_reading()
            else:
                self._transport.resume_reading()

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            raise anyio.BrokenResourceError("the connection is closed")
        if self._tls is not None:
            self._tls.write(data)
            data = self._out.read()
        transport.write(data)

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._eof = True
        if self._transport is not None:
            self._transport.abort()

    async def _wait(self) -> None:
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    # -- before the frames: `_Upgrading` --------------------------------------------------

    async def handshake_tls(self) -> None:
        """Wait until TLS is established; its `ssl.SSLError` when it failed."""
        while not self._handshaken:
            if self._error is not None:
                raise self._error
            if self._eof:
                raise ConnectionResetError("the connection closed during the TLS handshake")
            await self._wait()

    async def fill(self) -> None:
        size = len(self.buffer)
        while len(self.buffer) == size:
            if self._error is not None or self._eof:
                raise anyio.EndOfStream
            await self._wait()

    async def write(self, data: bytes) -> None:
        self._write(data)
        await self._drain()

    def start_frames(self, *, client: bool, max_message_bytes: int) -> None:
        """From now on the buffer holds WebSocket frames (some may be there already)."""
        self._codec = _FrameCodec(self.buffer, client=client, max_message_bytes=max_message_bytes)
        self._received()

    # -- Channel --------------------------------------------------------------------------

    async def send(self, frame: bytes) -> None:
        codec = self._codec
        assert codec is not None
        if not codec.open:
            raise anyio.ClosedResourceError("the WebSocket is closed")
        self._write(codec.frame(_BINARY, frame))
        await self._drain()

    async def send_parts(self, head: bytes, body: bytes) -> None:
        """`send` of ``head + body`` (the session hub's `SendsParts`: a version's sealed
        header and the body all agents share)."""
        codec = self._codec
        assert codec is not None
        if not codec.open:
            raise anyio.ClosedResourceError("the WebSocket is closed")
        self._write(codec.frame_parts(head, body))
        await self._drain()

    async def receive(self) -> bytes:
        """The next complete binary message; ``anyio.EndOfStream`` once the peer closed."""
        codec = self._codec
        assert codec is not None
        if codec.ready:
            # Messages already parsed are returned without yielding, but not forever: a
            # peer that keeps the buffer full must not starve the other tasks.
            self._streak += 1
            if self._streak >= _MAX_READY:
                self._streak = 0
                await anyio.lowlevel.checkpoint()
        while not codec.ready:
            if codec.ended:
                raise anyio.EndOfStream
            await self._wait()
            self._streak = 0
        message = codec.ready.popleft()
        if self._reading_paused:
            self._flow()
        return message

    async def _drain(self) -> None:
        while self._drained is not None:
            await asyncio.shield(self._drained)
        if self._transport is None and self._error is not None:
            raise anyio.BrokenResourceError from self._error

    def close(self) -> None:
        """Close the transport once what was written is flushed."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    async def aclose(self) -> None:
        """Send a close frame (if still open) and close; bounded and shielded."""
        codec = self._codec
        frame = codec.close_frame(1000) if codec is not None and codec.open else None
        if frame is not None:
            with suppress(anyio.BrokenResourceError, ssl.SSLError):
                self._write(frame)
        if self._transport is None:
            return
        self.close()
        self._closed = asyncio.get_running_loop().create_future()
        with anyio.move_on_after(_CLOSE_TIMEOUT, shield=True):
            await self._closed
        self.abort()


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
        if _on_asyncio():
            await self._serve_asyncio(handler, task_status)
            return
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

    async def _serve_asyncio(self, handler: SessionHandler, task_status: TaskStatus[str]) -> None:
        """`serve` on asyncio's own transports (see `_AsyncioWebSocket`)."""
        loop = asyncio.get_running_loop()
        accepted: asyncio.Queue[_AsyncioWebSocket] = asyncio.Queue()

        def accept() -> _AsyncioWebSocket:
            return _AsyncioWebSocket(self.ssl_context, server_side=True, on_made=accepted)

        server = await loop.create_server(accept, self.host, self.port, backlog=_BACKLOG)
        port = int(server.sockets[0].getsockname()[1])
        if self.port == 0 and len(server.sockets) > 1:
            # Port 0 on several addresses (localhost: ::1 and 127.0.0.1) gave each its own
            # port; listen on the first one's everywhere, as anyio's listener does.
            server.close()
            server = await loop.create_server(accept, self.host, port, backlog=_BACKLOG)
        address = _format_address(self.host, port)
        try:
            async with anyio.create_task_group() as tg:
                log.info("websocket transport listening", address=address, tls=self.tls)
                task_status.started(address)
                while True:
                    tg.start_soon(self._session_asyncio, handler, await accepted.get())
        finally:
            server.close()
            while not accepted.empty():
                accepted.get_nowait().abort()

    async def _session_asyncio(self, handler: SessionHandler, conn: _AsyncioWebSocket) -> None:
        peer = conn.peer
        try:
            with anyio.fail_after(self.handshake_timeout):
                try:
                    await conn.handshake_tls()
                except ssl.SSLError as exc:
                    log.warning("TLS handshake failed", error=str(exc) or type(exc).__name__)
                    return
                if not await _accept_upgrade(conn, path=self.path):
                    return
            conn.start_frames(client=False, max_message_bytes=self.max_message_bytes)
            try:
                await handler(conn, peer)
            finally:
                await conn.aclose()
        except (*_CONNECTION_ERRORS, TimeoutError) as exc:
            log.debug("websocket connection ended", peer=peer, error=repr(exc))
        except Exception:
            # One agent's failure must not stop the listener serving the others.
            log.exception("websocket session failed", peer=peer)
        finally:
            conn.close()

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

    async def _open(self, host: str, port: int, target: str, tls: bool) -> Channel:
        ctx = self.ssl_context if tls else None
        address = _format_address(host, port)
        if _on_asyncio():
            return await self._open_asyncio(host, port, address, target, ctx)
        with anyio.fail_after(self.connect_timeout):
            if ctx is not None:
                stream: ByteStream = await anyio.connect_tcp(
                    host, port, ssl_context=ctx, tls_standard_compatible=False
                )
            else:
                stream = await anyio.connect_tcp(host, port)
            io = _StreamIO(stream)
            try:
                await _request_upgrade(io, address, target)
            except BaseException as exc:
                await anyio.aclose_forcefully(stream)
                if isinstance(exc, anyio.BrokenResourceError):
                    raise ConnectionResetError("the master closed the connection") from exc
                raise
        # `io.buffer` keeps frames the master sent right behind its answer.
        return WebSocketChannel(
            stream, client=True, buffered=bytes(io.buffer), max_message_bytes=self.max_message_bytes
        )

    async def _open_asyncio(
        self, host: str, port: int, address: str, target: str, ctx: ssl.SSLContext | None
    ) -> Channel:
        loop = asyncio.get_running_loop()
        conn = _AsyncioWebSocket(ctx, server_hostname=host)
        try:
            with anyio.fail_after(self.connect_timeout):
                await loop.create_connection(lambda: conn, host, port)
                await conn.handshake_tls()
                await _request_upgrade(conn, address, target)
        except BaseException:
            conn.abort()
            raise
        conn.start_frames(client=True, max_message_bytes=self.max_message_bytes)
        return conn


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
