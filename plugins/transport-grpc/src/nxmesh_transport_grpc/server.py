"""The master side of the gRPC transport: the ``AgentService`` grpclib serves.

`GrpcTransport.serve` imports this module; agents never do, so they do without
protobuf's descriptor machinery that the generated service base brings (~1.4 MB).
"""

from __future__ import annotations

from typing import Any

import anyio
import structlog
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.server import Stream as ServerStream

from nxmesh.core.envelope import MessageType, peek_type
from nxmesh.core.interfaces import SessionHandler, UnaryHandler
from nxmesh.netaddr import host_port
from nxmesh.small_queues import compact_asyncio_queue, small
from nxmesh_transport_grpc._generated.agent_grpc import AgentServiceBase
from nxmesh_transport_grpc._generated.agent_pb2 import Frame
from nxmesh_transport_grpc.transport import (
    _MESSAGE_PREFIX,
    _STREAM_ERRORS,
    _pre_encoded,
    _read_message,
    _receive,
    _server_reads,
    _varint,
)

__all__ = ["AgentService"]

log = structlog.get_logger("nxmesh.transport.grpc")


def _peer_of(stream: ServerStream[Any, Any]) -> str:
    addr = stream.peer.addr()
    if addr is None:
        return "unknown"
    return host_port(str(addr[0]), int(addr[1]))


def _trim_connection(stream: ServerStream[Any, Any]) -> None:
    """Swap the deques h2, hpack, grpclib and asyncio's TLS protocol allocate per
    connection and per stream for small lists: about 19 KB less per connected agent
    (see `nxmesh.small_queues`).

    Only the types of containers change, on objects whose code uses nothing but
    `append`/`popleft`/`appendleft`/`pop`/`remove`/`clear`/indexing/iteration on them.
    Reaches into grpclib's, h2's and asyncio's internals: if a newer release renames
    them, nothing breaks, the saving is just lost (a test notices).
    """
    try:
        inner: Any = stream._stream  # grpclib.protocol.Stream
        connection: Any = inner.connection  # grpclib.protocol.Connection
        h2conn: Any = connection._connection
        for settings in (h2conn.local_settings, h2conn.remote_settings):
            values = settings._settings
            for key, pending in values.items():
                values[key] = small(pending)
        for table in (h2conn.encoder.header_table, h2conn.decoder.header_table):
            table.dynamic_entries = small(table.dynamic_entries)
        for event in (
            connection.write_ready,
            connection.stream_close_waiter,
            inner.window_updated,
            inner.headers_received,
            inner.trailers_received,
        ):
            event._waiters = small(event._waiters)
        buffer = inner.buffer
        buffer._acked = small(buffer._acked)
        compact_asyncio_queue(buffer._unacked)
        tls = getattr(connection._transport, "_ssl_protocol", None)  # asyncio's SSLProtocol
        if tls is not None:
            tls._write_backlog = small(tls._write_backlog)
    except AttributeError:  # pragma: no cover - a grpclib or h2 release moved them
        pass


async def _read_request(stream: ServerStream[Frame, Frame]) -> bytes | None:
    """The next frame of a server stream, its size checked before its body is read
    (`_read_message`); grpclib's `recv_message` for releases without its 0.4 internals."""
    if _server_reads(stream):
        return await _read_message(stream)
    message = await stream.recv_message()
    return None if message is None else message.data


def _refused(peer: str, exc: GRPCError) -> GRPCError:
    log.warning("grpc message refused", peer=peer, status=exc.status.name, error=exc.message)
    return exc


class _ServerChannel:
    """A `Channel` over the server side of one ``Stream`` call.

    Sends build the whole gRPC message (prefix, protobuf field header, frame) with one
    copy and hand it to grpclib's HTTP/2 stream; `send_message` would copy a version
    body twice more per agent (``wire_frame``, then its own prefix). Receives check a
    message's announced size before reading it (`_read_message`); a refused message ends
    the session's reads (`anyio.BrokenResourceError`) and is kept in `refused`, the status
    the call then ends with.
    """

    __slots__ = ("_direct", "_h2_stream", "_limit", "_stream", "refused")

    def __init__(self, stream: ServerStream[Frame, Frame], limit: int) -> None:
        self._stream = stream
        self._limit = limit
        self.refused: GRPCError | None = None
        # grpclib's HTTP/2 stream (internal): a release without it gets `send_message`.
        inner = getattr(stream, "_stream", None)
        usable = hasattr(inner, "send_data") and hasattr(stream, "_send_initial_metadata_done")
        self._h2_stream: Any = inner if usable else None
        # ... and `recv_message`, which buffers a whole message before the codec checks it.
        self._direct = _server_reads(stream)

    async def send(self, frame: bytes) -> None:
        await self.send_parts(b"", frame)

    async def send_parts(self, head: bytes, body: bytes) -> None:
        """Send the frame ``head + body`` (the session hub's `SendsParts`)."""
        size = len(head) + len(body)
        field = b"\n" + _varint(size) if size else b""
        length = len(field) + size
        stream = self._stream
        try:
            if length > self._limit:
                raise GRPCError(
                    Status.RESOURCE_EXHAUSTED,
                    f"message of {length} bytes exceeds the {self._limit} byte limit",
                )
            if self._h2_stream is None:
                await stream.send_message(_pre_encoded(head + body))
                return
            if not stream._send_initial_metadata_done:
                await stream.send_initial_metadata()
            data = b"".join((_MESSAGE_PREFIX.pack(False, length), field, head, body))
            # (grpclib's `_send_message_done` only guards unary responses: not set here.)
            await self._h2_stream.send_data(data)
        except _STREAM_ERRORS as exc:
            raise anyio.BrokenResourceError(str(exc)) from exc

    async def receive(self) -> bytes:
        try:
            return await _receive(self._stream, direct=self._direct, server=True)
        except anyio.BrokenResourceError as exc:
            if isinstance(exc.__cause__, GRPCError):  # the codec's size check
                self.refused = exc.__cause__
            raise

    async def aclose(self) -> None:
        return None  # the call ends when the handler returns


class AgentService(AgentServiceBase):
    """``AgentService`` on a `SessionHandler`: ``Stream`` runs a session, the unary
    reports go to its `UnaryHandler.handle_unary`. A unary call has `unary_timeout`
    seconds to deliver its frame: a peer sending slowly (or never ending its message) does
    not hold it open."""

    def __init__(
        self,
        handler: SessionHandler,
        limit: int,
        *,
        compact: bool = True,
        unary_timeout: float = 10.0,
    ) -> None:
        self._handler = handler
        self._limit = limit
        self._compact = compact
        self._unary_timeout = unary_timeout

    async def Stream(self, stream: ServerStream[Frame, Frame]) -> None:
        if self._compact:
            _trim_connection(stream)
        peer = _peer_of(stream)
        channel = _ServerChannel(stream, self._limit)
        try:
            await self._handler(channel, peer)
        except (*_STREAM_ERRORS, anyio.BrokenResourceError, anyio.EndOfStream) as exc:
            log.debug("grpc stream ended", peer=peer, error=repr(exc))
        except anyio.get_cancelled_exc_class():
            # Shutting down: end the call with UNAVAILABLE so the agent reconnects now
            # (grpclib would leave the stream open and the agent would wait for silence).
            with anyio.move_on_after(1.0, shield=True):
                try:
                    await stream.send_trailing_metadata(
                        status=Status.UNAVAILABLE, status_message="master shutting down"
                    )
                except (*_STREAM_ERRORS, anyio.BrokenResourceError):
                    pass
            raise
        except Exception:
            # One agent's failure must not take the others down. Logged once, here: a
            # GRPCError ends the call with its status without grpclib logging it again.
            log.exception("grpc session failed", peer=peer)
            raise GRPCError(Status.INTERNAL, "the session failed on the master") from None
        if channel.refused is not None:
            # Ends the call with RESOURCE_EXHAUSTED and resets the stream: the unread rest
            # of the message is dropped, never acknowledged.
            raise _refused(peer, channel.refused)

    async def _unary(self, stream: ServerStream[Frame, Frame], kind: MessageType) -> None:
        if not isinstance(self._handler, UnaryHandler):
            raise GRPCError(Status.UNIMPLEMENTED, "this master takes reports on the stream")
        peer = _peer_of(stream)
        timeout = self._unary_timeout
        frame: bytes | None = None
        try:
            with anyio.move_on_after(timeout) as reading:
                frame = await _read_request(stream)
        except GRPCError as exc:  # too large: refused before it was read
            raise _refused(peer, exc) from None
        except StreamTerminatedError as exc:  # ended inside the message (ours, not grpclib's)
            raise GRPCError(Status.INVALID_ARGUMENT, str(exc)) from None
        if reading.cancelled_caught:
            raise GRPCError(Status.DEADLINE_EXCEEDED, f"no whole frame within {timeout:g} s")
        if frame is None:
            raise GRPCError(Status.INVALID_ARGUMENT, "no frame")
        if peek_type(frame) is not kind:
            raise GRPCError(Status.INVALID_ARGUMENT, f"expected a {kind.name} frame")
        reply = await self._handler.handle_unary(frame, peer)
        # An Ack of a few hundred bytes: within any HTTP/2 window, it does not wait for the
        # peer (a connection that stopped reading altogether ends with its keepalive).
        await stream.send_message(_pre_encoded(reply))

    async def ReportHealth(self, stream: ServerStream[Frame, Frame]) -> None:
        await self._unary(stream, MessageType.HEALTH_REPORT)

    async def ReportMetrics(self, stream: ServerStream[Frame, Frame]) -> None:
        await self._unary(stream, MessageType.METRICS_BATCH)
