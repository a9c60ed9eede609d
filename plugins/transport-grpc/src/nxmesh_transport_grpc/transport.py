"""The gRPC transport: grpclib server (master) and client (agent) for ``AgentService``.

grpclib runs on asyncio only, so this transport does too; everything above it (the
session hub, the agent link) is anyio code and runs unchanged on it.

- ``Stream`` carries the session: one NxMesh frame per ``Frame`` message, both ways.
- ``ReportHealth`` / ``ReportMetrics`` carry health and metrics frames beside the stream
  (their own HTTP/2 streams and flow-control windows), so a big report never delays a
  config push. The client routes those frames there by their (signed) header type; the
  server hands them to the session handler's `UnaryHandler.handle_unary`.
- TLS is on by default (``grpcs://``): the master serves a certificate from its own CA
  (`server_context`), agents pin that CA (`client_context`). ALPN ``h2`` is set on the
  contexts given.
- Messages above `GrpcSettings.max_message_bytes` are refused (``RESOURCE_EXHAUSTED``)
  before they are read, parsed or sent. grpclib has no limit of its own and reads a
  message whole before its codec sees it, so both sides read frames themselves
  (`_read_frame`, `_read_message`): the 5-byte gRPC prefix first, the body only when its
  length is within the limit (grpclib's `recv_message` is the fallback for releases
  without its 0.4 internals: it buffers the message once, then the codec drops it).
- Keepalive follows `GrpcSettings` (see its docstring for why the values are safe with
  gRPC-core peers). Heartbeats are the session's: a ``Heartbeat`` frame every 30 s.
- Memory: asyncio keeps a 256 KiB TLS read buffer per connection; serving TLS lowers it
  to `GrpcSettings.tls_read_buffer_bytes` (4 KiB) for the process
  (`nxmesh.tls.limit_tls_read_buffer`), and each stream's connection trades h2's and grpclib's
  deques for small lists (`server._trim_connection`). The master side (`server`) is a
  module of its own: agents never load it, nor the protobuf code its generated base needs.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final, cast
from urllib.parse import urlsplit

import anyio
import h2.exceptions
import structlog
from anyio.abc import TaskStatus
from grpclib.client import Channel as GrpcChannel
from grpclib.client import StreamStreamMethod, UnaryUnaryMethod
from grpclib.config import Configuration
from grpclib.const import Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.exceptions import ProtocolError as GrpclibProtocolError
from grpclib.server import Server

from nxmesh.core.envelope import MessageType, peek_type
from nxmesh.core.interfaces import Channel, SessionHandler
from nxmesh.netaddr import host_port
from nxmesh.tls import (
    client_ssl_context,
    ensure_tls_material,
    limit_tls_read_buffer,  # re-exported: it lived here before the API listener used it
    server_ssl_context,
    serving_context,
)
from nxmesh_transport_grpc.settings import GrpcSettings

if TYPE_CHECKING:
    from nxmesh_transport_grpc._generated.agent_pb2 import Frame

__all__ = [
    "GrpcTransport",
    "client_context",
    "lean_data_frame_repr",
    "lean_frame_flags",
    "limit_tls_read_buffer",
    "server_context",
    "wire_frame",
]

log = structlog.get_logger("nxmesh.transport.grpc")

_ALPN: Final = ["h2"]
_STREAM_ERRORS = (
    GRPCError,
    StreamTerminatedError,
    GrpclibProtocolError,
    h2.exceptions.ProtocolError,
    ConnectionError,
)


def server_context(settings: GrpcSettings, state_dir: Path) -> ssl.SSLContext | None:
    """The master's TLS context: the configured files, or a CA + certificate it creates.

    None when TLS is off (``tls = false``: only for tests and trusted networks).
    """
    if not settings.tls:
        return None
    if settings.cert_file is not None and settings.key_file is not None:
        return serving_context(settings.cert_file, settings.key_file, alpn=_ALPN)
    files = ensure_tls_material(state_dir / "tls", hostnames=settings.hostnames)
    return server_ssl_context(files, alpn=_ALPN)


def client_context(settings: GrpcSettings) -> ssl.SSLContext | None:
    """The agent's TLS context pinning ``ca_file``; None when TLS is off."""
    if not settings.tls:
        return None
    if settings.ca_file is None:
        raise ValueError(
            "[plugins.transport_grpc] ca_file is required with tls: the agent pins the "
            "master's CA (its state directory's tls/ca.pem)"
        )
    return client_ssl_context(settings.ca_file, alpn=_ALPN)


_REPR_PREFIX: Final = 11  # body bytes `_raw_data_repr` ends up showing (20 hex digits + 1)


def lean_data_frame_repr() -> bool:
    """Make hyperframe's ``DataFrame`` repr read only the bytes it shows, process-wide.

    h2 formats ``repr(frame)`` for every frame it receives, for a trace log line it then
    drops (``H2Connection._receive_frame``). A DATA frame's repr copies its whole body
    (``serialize_body``) and hexes it (``_raw_data_repr``) to keep 20 hex digits: for an
    agent reading a 64 KB version that is about 200 KB of garbage per push. The repr
    given here is the same text, built from the first 11 bytes of the body.

    Reaches into hyperframe (bounded to 6.x in pyproject.toml); when its layout is not the
    one this was written for, nothing is changed and False is returned.
    """
    from hyperframe import frame as hf

    cls: Any = hf.DataFrame
    if getattr(cls._body_repr, "_nxmesh_lean", False):
        return True
    raw_repr = getattr(hf, "_raw_data_repr", None)
    if (
        raw_repr is None
        or cls._body_repr is not hf.Frame._body_repr
        or not hasattr(cls, "serialize_padding_data")
    ):
        return False  # pragma: no cover - a hyperframe release changed it

    def _body_repr(self: Any) -> str:
        # serialize_body() is padding length byte + data + padding; only its head shows.
        head = self.serialize_padding_data() + bytes(self.data[:_REPR_PREFIX])
        if len(head) < _REPR_PREFIX and self.pad_length:
            head += bytes(min(self.pad_length, _REPR_PREFIX - len(head)))
        return str(raw_repr(head[:_REPR_PREFIX]))

    _body_repr._nxmesh_lean = True  # type: ignore[attr-defined]
    cls._body_repr = _body_repr
    return True


def lean_frame_flags() -> bool:
    """Give each hyperframe frame the valid-flag names of its class, built once, process-wide.

    hyperframe's ``Flags`` builds the set of a frame class's valid flag names anew for every
    frame parsed or built (a set comprehension over ``defined_flags``): 1-2 µs, several
    times per message each way, the largest single cost of HTTP/2 framing in a fan-out.
    The names are fixed per class, so the frozen set built here for every frame class is
    shared; a list hyperframe does not define gets its own set as before.

    Reaches into hyperframe (bounded to 6.x in pyproject.toml); when its layout is not the
    one this was written for, nothing is changed and False is returned.
    """
    from hyperframe import flags as hflags
    from hyperframe import frame as hf

    cls: Any = hflags.Flags
    if getattr(cls.__init__, "_nxmesh_lean", False):
        return True
    if set(vars(cls([]))) != {"_valid_flags", "_flags"}:
        return False  # pragma: no cover - a hyperframe release changed it
    frame_classes: list[Any] = [hf.Frame, hf.ExtensionFrame, *hf.FRAMES.values()]
    # Keyed by id(): the classes keep their lists alive, so an id is never reused.
    known = {
        id(fc.defined_flags): frozenset(flag.name for flag in fc.defined_flags)
        for fc in frame_classes
    }
    original = cls.__init__

    def __init__(self: Any, defined_flags: Any) -> None:
        valid = known.get(id(defined_flags))
        if valid is None:
            original(self, defined_flags)
            return
        self._valid_flags = valid
        self._flags = set()

    __init__._nxmesh_lean = True  # type: ignore[attr-defined]
    cls.__init__ = __init__
    return True


_MESSAGE_PREFIX: Final = struct.Struct(">?I")  # gRPC: compressed flag, message length


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def wire_frame(frame: bytes) -> bytes:
    """The protobuf encoding of ``Frame(data=frame)``, built with a single copy.

    A fan-out sends a large frame to thousands of agents; going through a `Frame` object
    would copy each one twice more (into the message, then out of it).
    """
    return b"\n" + _varint(len(frame)) + frame if frame else b""


def _pre_encoded(frame: bytes) -> Frame:
    """`wire_frame` where grpclib's types expect a `Frame`: `_FrameCodec` sends bytes as
    they are, so the message never exists as a protobuf object."""
    return cast("Frame", wire_frame(frame))


async def _receive(stream: Any, *, direct: bool = False, server: bool = False) -> bytes:
    """Next frame of a server or client stream (both channels read the same way; `direct`:
    read it out of the HTTP/2 stream, `server`: a server stream, see `_read_message`)."""
    try:
        if direct:
            frame = await (_read_message(stream) if server else _read_frame(stream))
        else:
            message = await stream.recv_message()
            frame = None if message is None else message.data
    except _STREAM_ERRORS as exc:
        raise anyio.BrokenResourceError(str(exc)) from exc
    if frame is None:
        raise anyio.EndOfStream
    return frame


class _WireFrame:
    """A received `Frame`, parsed without protobuf (it has one bytes field)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


def _parse_frame(data: bytes) -> _WireFrame | None:
    if not data:
        return _WireFrame(b"")
    if data[0] != 0x0A:
        return None
    length = shift = 0
    pos = 1
    while pos < len(data) and pos <= 10:
        byte = data[pos]
        length |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return _WireFrame(data[pos:]) if pos + length == len(data) else None
        shift += 7
    return None


class _FrameCodec(ProtoCodec):
    """The protobuf codec with a size bound both ways and a copy-free path for `Frame`,
    the one message type ``AgentService`` carries.

    Sending: pre-encoded bytes (`wire_frame`) pass through as they are. Receiving: a
    `Frame` is parsed by hand when it is the plain single-field encoding; anything else
    (e.g. unknown fields from a newer peer) falls back to protobuf, loaded then.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def _check(self, size: int) -> None:
        if size > self.limit:
            raise GRPCError(
                Status.RESOURCE_EXHAUSTED,
                f"message of {size} bytes exceeds the {self.limit} byte limit",
            )

    def encode(self, message: Any, message_type: Any) -> bytes:
        data = message if isinstance(message, bytes) else super().encode(message, message_type)
        self._check(len(data))
        return data

    def decode(self, data: bytes, message_type: Any) -> Any:
        self._check(len(data))
        parsed = _parse_frame(data)
        if parsed is not None:
            return parsed
        from nxmesh_transport_grpc._generated.agent_pb2 import Frame

        return Frame.FromString(data)


# ---------------------------------------------------------------------------------------
# Agent side
# ---------------------------------------------------------------------------------------


# Below this size a message is read whole and the frame sliced out of it (one read and a
# small copy cost less than the two extra reads `_read_frame` makes).
_DIRECT_READ_MIN: Final = 4096


def _field_header_size(length: int) -> int:
    """Bytes of protobuf field header (tag + varint) if a message of `length` bytes is the
    plain single-field encoding of a `Frame`; 0 when no frame length fits."""
    for k in range(1, 6):
        n = length - 1 - k
        if n >= 0 and max(1, (n.bit_length() + 6) // 7) == k:
            return 1 + k
    return 0


def _server_reads(stream: Any) -> bool:
    """True when a stream (server or client) has the grpclib 0.4 internals
    `_read_message` uses."""
    inner = getattr(stream, "_stream", None)
    return (
        hasattr(inner, "recv_data")
        and hasattr(inner, "connection")
        and hasattr(stream, "_messages_received")
        and isinstance(getattr(stream, "_codec", None), _FrameCodec)
    )


def _direct_reads(stream: Any) -> bool:
    """True when the client stream has the grpclib 0.4 internals `_read_frame` uses."""
    return (
        _server_reads(stream)
        and hasattr(stream, "_wrapper")
        and hasattr(stream, "_recv_initial_metadata_done")
    )


async def _read_frame(stream: Any) -> bytes | None:
    """grpclib's client `Stream.recv_message` for a `Frame`, read by `_read_message`."""
    if not stream._recv_initial_metadata_done:
        await stream.recv_initial_metadata()
    with stream._wrapper:
        return await _read_message(stream)


async def _read_message(stream: Any) -> bytes | None:
    """grpclib's `Stream.recv_message` (server or client) for a `Frame`, with the frame
    read straight out of the HTTP/2 stream: the gRPC prefix, then the protobuf field
    header, then the frame itself, so a large version body is joined from its DATA frames
    once and not copied again out of the message (`_parse_frame`). None at the end of the
    stream.

    The size limit applies to the length the prefix announces, before anything of the
    body is read: grpclib would buffer up to 4 GiB a peer announces (`GRPCError`
    ``RESOURCE_EXHAUSTED`` instead; the unread rest is never acknowledged, so the peer
    cannot send more than the HTTP/2 window). Other encodings of a `Frame` (unknown
    fields from a newer peer) go through the codec. Listeners on grpclib's message events
    are skipped: neither side registers any. A server stream runs inside grpclib's
    deadline wrapper already; a client stream's is `_read_frame`'s.
    """
    codec: _FrameCodec = stream._codec
    inner = stream._stream
    try:
        meta = await inner.recv_data(5)
        if not meta:
            return None
        if len(meta) != 5:
            raise StreamTerminatedError(f"stream ended inside a message prefix ({len(meta)} of 5)")
        compressed, length = _MESSAGE_PREFIX.unpack(meta)
        if compressed:
            raise NotImplementedError("Compression not implemented")  # as grpclib
        codec._check(length)
        head_size = _field_header_size(length) if length >= _DIRECT_READ_MIN else 0
        frame: bytes | None = None
        if head_size:
            head = await inner.recv_data(head_size)
            if head == b"\n" + _varint(length - head_size):
                frame = await inner.recv_data(length - head_size)
                size = len(head) + len(frame)
            else:
                data = head + await inner.recv_data(length - head_size)
                size = len(data)
        else:
            data = await inner.recv_data(length)
            size = len(data)
    except AssertionError:
        # grpclib's buffer asserts when the stream ends inside a message: a peer's doing
        # (not a bug here), so a stream error, not a traceback per attempt in the log.
        raise StreamTerminatedError("stream ended inside a message") from None
    if size != length:
        raise StreamTerminatedError(f"stream ended inside a message ({size} of {length})")
    if frame is None:
        frame = codec.decode(data, _WireFrame).data
    stream._messages_received += 1
    connection = inner.connection
    connection.messages_received += 1
    connection.last_message_received = time.monotonic()
    return frame


_SERVICE: Final = "/nxmesh.agent.v1.AgentService/"


class _AgentClient:
    """The agent's calls of ``AgentService`` (agent.proto): the generated
    `AgentServiceStub` with `_WireFrame` for messages. The generated stub would load
    protobuf's descriptors (~1.4 MB per agent) for a message `_FrameCodec` encodes and
    parses by hand; a test checks that both name the same methods."""

    __slots__ = ("ReportHealth", "ReportMetrics", "Stream")

    def __init__(self, channel: GrpcChannel) -> None:
        self.Stream = StreamStreamMethod(channel, _SERVICE + "Stream", _WireFrame, _WireFrame)
        self.ReportHealth = UnaryUnaryMethod(
            channel, _SERVICE + "ReportHealth", _WireFrame, _WireFrame
        )
        self.ReportMetrics = UnaryUnaryMethod(
            channel, _SERVICE + "ReportMetrics", _WireFrame, _WireFrame
        )


class _ClientChannel:
    """A `Channel` over the client side of one ``Stream`` call, plus the unary reports."""

    def __init__(
        self, stream: Any, stub: _AgentClient, unary_timeout: float, *, direct: bool = True
    ) -> None:
        self._stream = stream
        self._stub = stub
        self._unary_timeout = unary_timeout
        # grpclib's client stream internals (0.4): a release without them gets `_receive`.
        self._direct = direct and _direct_reads(stream)

    async def send(self, frame: bytes) -> None:
        kind = peek_type(frame)
        try:
            if kind is MessageType.HEALTH_REPORT:
                await self._stub.ReportHealth(_pre_encoded(frame), timeout=self._unary_timeout)
            elif kind is MessageType.METRICS_BATCH:
                await self._stub.ReportMetrics(_pre_encoded(frame), timeout=self._unary_timeout)
            else:
                await self._stream.send_message(_pre_encoded(frame))
        except _STREAM_ERRORS as exc:
            raise anyio.BrokenResourceError(str(exc)) from exc

    async def receive(self) -> bytes:
        return await _receive(self._stream, direct=self._direct)

    async def aclose(self) -> None:
        return None  # `GrpcTransport.connect` ends the call and closes the connection


# ---------------------------------------------------------------------------------------
# The transport
# ---------------------------------------------------------------------------------------


class GrpcTransport:
    """gRPC transport (``grpc://``, ``grpcs://``); one instance serves or connects.

    Serving: ``GrpcTransport("grpcs://0.0.0.0:8471", ssl_context=server_context(...))``;
    port 0 binds a free port and `serve` reports ``host:port``.
    Connecting: ``GrpcTransport(ssl_context=client_context(...)).connect(url)``.
    """

    name: ClassVar[str] = "grpc"
    schemes: ClassVar[tuple[str, ...]] = ("grpc", "grpcs")

    def __init__(
        self,
        url: str = "grpcs://127.0.0.1:0",
        *,
        ssl_context: ssl.SSLContext | None = None,
        settings: GrpcSettings | None = None,
        shutdown_timeout: float = 5.0,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in self.schemes:
            raise ValueError(f"not a gRPC URL: {url!r}")
        self.url = url
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 0
        self.tls = parts.scheme == "grpcs"
        self.settings = settings or GrpcSettings()
        self.ssl_context = ssl_context
        if ssl_context is not None:
            ssl_context.set_alpn_protocols(_ALPN)
        self.shutdown_timeout = shutdown_timeout

    def _server_config(self) -> Configuration:
        return Configuration(
            _keepalive_time=self.settings.server_keepalive_time,
            _keepalive_timeout=self.settings.keepalive_timeout,
            _keepalive_permit_without_calls=False,
        )

    def _client_config(self) -> Configuration:
        return Configuration(
            _keepalive_time=self.settings.keepalive_time,
            _keepalive_timeout=self.settings.keepalive_timeout,
            _keepalive_permit_without_calls=False,
            _http2_max_pings_without_data=2,
            _http2_min_sent_ping_interval_without_data=300.0,
        )

    # -- master side ---------------------------------------------------------------------

    async def serve(
        self,
        handler: SessionHandler,
        *,
        task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve ``AgentService`` until cancelled; then stop accepting, cancel the running
        sessions and wait (at most `shutdown_timeout` s) for them to finish."""
        if self.tls and self.ssl_context is None:
            raise ValueError("a grpcs:// listener needs an ssl_context (see server_context)")
        if not self.tls and self.ssl_context is not None:
            raise ValueError("use a grpcs:// URL with an ssl_context")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(1024)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        address = host_port(self.host, sock.getsockname()[1])
        if self.ssl_context is not None and self.settings.tls_read_buffer_bytes:
            limit_tls_read_buffer(self.settings.tls_read_buffer_bytes)
        if self.settings.lean_frame_repr:
            lean_data_frame_repr()
        if self.settings.lean_frame_flags:
            lean_frame_flags()
        from nxmesh_transport_grpc.server import AgentService

        server = Server(
            [
                AgentService(
                    handler,
                    self.settings.max_message_bytes,
                    compact=self.settings.compact_connections,
                    unary_timeout=self.settings.connect_timeout,
                )
            ],
            codec=_FrameCodec(self.settings.max_message_bytes),
            config=self._server_config(),
        )
        try:
            await server.start(sock=sock, ssl=self.ssl_context, backlog=1024)
        except BaseException:
            sock.close()
            raise
        log.info("grpc transport listening", address=address, tls=self.tls)
        try:
            task_status.started(address)
            await anyio.sleep_forever()
        finally:
            with anyio.move_on_after(self.shutdown_timeout, shield=True):
                server.close()
                await server.wait_closed()
            log.info("grpc transport stopped", address=address)

    # -- agent side ----------------------------------------------------------------------

    @asynccontextmanager
    async def connect(self, url: str) -> AsyncIterator[Channel]:
        """Open the ``Stream`` call; every failure to do so is an `OSError`."""
        parts = urlsplit(url)
        if parts.scheme not in self.schemes or not parts.hostname:
            raise ValueError(f"not a gRPC URL: {url!r}")
        tls = parts.scheme == "grpcs"
        if tls and self.ssl_context is None:
            raise ValueError("a grpcs:// URL needs an ssl_context pinning the master's CA")
        if self.settings.lean_frame_repr:
            lean_data_frame_repr()
        if self.settings.lean_frame_flags:
            lean_frame_flags()
        channel = GrpcChannel(
            parts.hostname,
            parts.port or 443,
            ssl=self.ssl_context if tls else None,
            config=self._client_config(),
            codec=_FrameCodec(self.settings.max_message_bytes),
        )
        try:
            try:
                with anyio.fail_after(self.settings.connect_timeout):
                    await channel.__connect__()
            except (ssl.SSLError, OSError):
                raise
            except _STREAM_ERRORS as exc:  # pragma: no cover - h2 refused the preface
                raise ConnectionResetError(str(exc)) from exc
            stub = _AgentClient(channel)
            stream = stub.Stream.open()
            await stream.__aenter__()
            try:
                await stream.send_request()
            except _STREAM_ERRORS as exc:
                raise ConnectionResetError(str(exc)) from exc
            try:
                yield _ClientChannel(
                    stream,
                    stub,
                    self.settings.connect_timeout,
                    direct=self.settings.direct_frame_reads,
                )
            finally:
                # Half-close so the master's session ends cleanly, then hang up.
                with anyio.move_on_after(1.0, shield=True):
                    try:
                        await stream.end()
                        while await stream.recv_message() is not None:
                            pass
                    except (*_STREAM_ERRORS, anyio.BrokenResourceError):
                        pass
        finally:
            channel.close()
