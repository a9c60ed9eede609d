"""The WebSocket on any anyio byte stream: `WebSocketChannel` and `serve_websocket`.

The path trio takes (and `serve_websocket`, which runs a session on a stream another
server accepted: the master's HTTP server mounts the transport under its own listener
and TLS by handing over the connection's stream and the request bytes it already read).
"""

from __future__ import annotations

from contextlib import suppress
from typing import Final

import anyio
import structlog
from anyio.abc import ByteStream

from nxmesh.core.interfaces import SessionHandler
from nxmesh.websocket.frames import (
    _BINARY,
    CLOSE_NORMAL,
    DEFAULT_MAX_MESSAGE,
    _Closing,
    _FrameCodec,
)
from nxmesh.websocket.handshake import _CONNECTION_ERRORS, DEFAULT_PATH, _accept_upgrade

__all__ = ["WebSocketChannel", "serve_websocket"]

log = structlog.get_logger("nxmesh.transport.websocket")

_READ_SIZE: Final = 65536
_CLOSE_TIMEOUT: Final = 2.0


def _new_lock() -> anyio.Lock:
    # Uncontended acquires need no trip through the event loop (anyio >= 4.5); at
    # thousands of agents a checkpoint per frame is measurable.
    try:
        return anyio.Lock(fast_acquire=True)
    except TypeError:  # pragma: no cover - anyio < 4.5
        return anyio.Lock()


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
            frame = self._codec.close_frame(CLOSE_NORMAL) if self._codec.open else None
            if frame is not None:
                with suppress(*_CONNECTION_ERRORS):
                    await self._write(frame)
            await self._stream.aclose()


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
