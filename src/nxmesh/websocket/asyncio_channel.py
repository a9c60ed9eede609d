"""The WebSocket on asyncio's own transports (`_AsyncioWebSocket`): the asyncio path.

`WebSocketTransport.serve` and `connect` take it whenever they run on asyncio; trio takes
the anyio byte-stream path (`nxmesh.websocket.streams`).
"""

from __future__ import annotations

import asyncio
import ssl
from contextlib import suppress
from typing import Final

import anyio
import anyio.lowlevel
import structlog

from nxmesh.netaddr import host_port
from nxmesh.websocket.frames import _BINARY, CLOSE_NORMAL, _Closing, _FrameCodec
from nxmesh.websocket.handshake import _MAX_HANDSHAKE
from nxmesh.websocket.streams import _CLOSE_TIMEOUT, _READ_SIZE

__all__: list[str] = []

log = structlog.get_logger("nxmesh.transport.websocket")

_MAX_READY: Final = 64  # parsed messages held before reading pauses


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
            self.peer = host_port(str(addr[0]), int(addr[1]))
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
        frame = codec.close_frame(CLOSE_NORMAL) if codec is not None and codec.open else None
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
