"""The master side of the gRPC transport: the ``AgentService`` grpclib serves.

`GrpcTransport.serve` imports this module; agents never do, so they do without
protobuf's descriptor machinery that the generated service base brings (~1.4 MB).
"""

from __future__ import annotations

from typing import Any

import anyio
import structlog
from grpclib.const import Status
from grpclib.exceptions import GRPCError
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
    _receive,
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


class _ServerChannel:
    """A `Channel` over the server side of one ``Stream`` call.

    Sends build the whole gRPC message (prefix, protobuf field header, frame) with one
    copy and hand it to grpclib's HTTP/2 stream; `send_message` would copy a version
    body twice more per agent (``wire_frame``, then its own prefix).
    """

    __slots__ = ("_h2_stream", "_limit", "_stream")

    def __init__(self, stream: ServerStream[Frame, Frame], limit: int) -> None:
        self._stream = stream
        self._limit = limit
        # grpclib's HTTP/2 stream (internal): a release without it gets `send_message`.
        inner = getattr(stream, "_stream", None)
        usable = hasattr(inner, "send_data") and hasattr(stream, "_send_initial_metadata_done")
        self._h2_stream: Any = inner if usable else None

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
        return await _receive(self._stream)

    async def aclose(self) -> None:
        return None  # the call ends when the handler returns


class AgentService(AgentServiceBase):
    def __init__(self, handler: SessionHandler, limit: int, *, compact: bool = True) -> None:
        self._handler = handler
        self._limit = limit
        self._compact = compact

    async def Stream(self, stream: ServerStream[Frame, Frame]) -> None:
        if self._compact:
            _trim_connection(stream)
        peer = _peer_of(stream)
        try:
            await self._handler(_ServerChannel(stream, self._limit), peer)
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
            # One agent's failure must not take the others down; grpclib answers INTERNAL.
            log.exception("grpc session failed", peer=peer)
            raise

    async def _unary(self, stream: ServerStream[Frame, Frame], kind: MessageType) -> None:
        if not isinstance(self._handler, UnaryHandler):
            raise GRPCError(Status.UNIMPLEMENTED, "this master takes reports on the stream")
        request = await stream.recv_message()
        if request is None:
            raise GRPCError(Status.INVALID_ARGUMENT, "no frame")
        if peek_type(request.data) is not kind:
            raise GRPCError(Status.INVALID_ARGUMENT, f"expected a {kind.name} frame")
        reply = await self._handler.handle_unary(request.data, _peer_of(stream))
        await stream.send_message(_pre_encoded(reply))

    async def ReportHealth(self, stream: ServerStream[Frame, Frame]) -> None:
        await self._unary(stream, MessageType.HEALTH_REPORT)

    async def ReportMetrics(self, stream: ServerStream[Frame, Frame]) -> None:
        await self._unary(stream, MessageType.METRICS_BATCH)
