"""The HTTP/1.1 upgrade to a WebSocket (wsproto), for both I/O paths.

wsproto reads and writes the upgrade's header block only; the frames after it are
`nxmesh.websocket.frames`' job. The subprotocol is ``nxmesh.v1``; no extension
(permessage-deflate) is negotiated.
"""

from __future__ import annotations

import typing
from contextlib import suppress
from typing import Final
from urllib.parse import urlsplit

import anyio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Event, RejectConnection, Request
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from nxmesh.websocket.endpoint import DEFAULT_PATH, SUBPROTOCOL

__all__ = ["DEFAULT_PATH", "SUBPROTOCOL"]

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


class _Upgrading(typing.Protocol):
    """What the upgrade needs from a connection: its received bytes and a way to write."""

    buffer: bytearray

    async def fill(self) -> None:
        """Read more into `buffer`; ``anyio.EndOfStream`` at the end."""

    async def write(self, data: bytes) -> None: ...


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
