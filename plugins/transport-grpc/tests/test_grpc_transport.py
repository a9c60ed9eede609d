"""The gRPC transport passes the transport contract (asyncio only: grpclib is asyncio-only)."""

from __future__ import annotations

import asyncio.sslproto
import contextlib
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import grpclib.protocol
import pytest
from grpclib.client import Channel as GrpcChannel
from grpclib.client import StreamStreamMethod, UnaryUnaryMethod
from grpclib.const import Status
from grpclib.encoding.base import CodecBase
from grpclib.exceptions import GRPCError, StreamTerminatedError
from structlog.testing import capture_logs

from nxmesh.core.envelope import MessageType, seal, unseal
from nxmesh.core.interfaces import Channel
from nxmesh.core.model import HealthReport, HealthResult
from nxmesh.core.pluginmanager import get_plugin_manager
from nxmesh.core.protocol import Ack, MetricsBatch, decode_body, encode_body
from nxmesh.core.registry import ProviderRegistries
from nxmesh.small_queues import SmallQueue
from nxmesh.testing.contracts import TransportContract
from nxmesh.testing.contracts.transport import Mesh, TransportKit
from nxmesh.tls import ensure_tls_material
from nxmesh_transport_grpc import GrpcSettings, GrpcTransport, client_context, server_context
from nxmesh_transport_grpc._generated.agent_grpc import AgentServiceStub
from nxmesh_transport_grpc._generated.agent_pb2 import Frame
from nxmesh_transport_grpc.transport import (
    _MESSAGE_PREFIX,
    _AgentClient,
    _FrameCodec,
    _read_frame,
    _WireFrame,
    lean_data_frame_repr,
    lean_frame_flags,
    wire_frame,
)


def _kit(settings: GrpcSettings | None = None) -> TransportKit:
    return TransportKit(
        server=lambda url, ctx: GrpcTransport(url, ssl_context=ctx, settings=settings),
        client=lambda ctx: GrpcTransport(ssl_context=ctx, settings=settings),
        listen_url="grpcs://127.0.0.1:0",
        url_for=lambda address: f"grpcs://{address}",
    )


@pytest.fixture
def anyio_backend() -> str:
    """grpclib runs on asyncio only."""
    return "asyncio"


class TestGrpcTransport(TransportContract):
    """The contract, over ``grpcs://``."""

    @pytest.fixture
    def transport_kit(self) -> TransportKit:
        return _kit()


class TestGrpcSpecifics:
    """What only the gRPC transport does."""

    pytestmark = pytest.mark.anyio

    def test_is_registered_as_grpc(self) -> None:
        """The plugin registers one class, picked by name or grpc/grpcs scheme."""
        registry = ProviderRegistries.collect(get_plugin_manager(environ={}))["transport"]
        assert registry.get("grpc") is GrpcTransport
        assert registry.by_scheme("grpcs://master:8471") is GrpcTransport

    async def test_reports_travel_beside_the_stream(self, tmp_path: Path) -> None:
        """Health and metrics frames go through the unary calls and reach the hub verified."""
        async with Mesh(_kit(), tmp_path) as mesh:
            agent = await mesh.start_agent()
            assert agent.agent_id is not None
            agent.send_health(
                HealthReport(agent_id=agent.agent_id, ts=1.0e9, results=(HealthResult("x", "ok"),))
            )
            agent.send_metrics(MetricsBatch(ts=1.0e9, samples={"nginx.requests": 3.0}))
            with anyio.fail_after(10):
                await mesh.wait_messages(2)
            kinds = {type(m).__name__ for _, m in mesh.messages}
            assert kinds == {"HealthReport", "MetricsBatch"}
            assert mesh.hub.counters.rejected == 0

    async def test_unary_report_without_a_session_is_refused(self, tmp_path: Path) -> None:
        """A report from an agent without an open stream gets an error Ack and is counted."""
        async with Mesh(_kit(), tmp_path) as mesh:
            creds = await mesh.enrolled_credentials()
            frame = seal(
                encode_body(MetricsBatch(ts=1.0, samples={})),
                agent_id=creds.agent_id,
                key_id=creds.key_id,
                key=creds.key,
                seq=1,
                ts_ms=1,
            )
            reply = await mesh.hub.handle_unary(frame, "test")
            env = unseal(reply)
            assert env.type is MessageType.ACK
            ack = decode_body(env)
            assert isinstance(ack, Ack)
            assert not ack.ok
            assert "no open session" in ack.error
            assert mesh.hub.counters.malformed == 1

    async def test_oversized_message_is_refused(self, tmp_path: Path) -> None:
        """Messages above max_message_bytes are refused and end the stream."""
        settings = GrpcSettings(max_message_bytes=64 * 1024)
        kit = _kit(settings)
        got: list[bytes] = []

        async def collect(channel: Channel, peer: str) -> None:
            try:
                while True:
                    got.append(await channel.receive())
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass

        server_ctx = server_context(settings, tmp_path)
        client_ctx = client_context(GrpcSettings(ca_file=tmp_path / "tls" / "ca.pem"))
        assert server_ctx is not None
        assert client_ctx is not None
        server, client = kit.server("grpcs://127.0.0.1:0", server_ctx), kit.client(client_ctx)
        async with anyio.create_task_group() as tg:
            address = await tg.start(server.serve, collect)
            async with client.connect(f"grpcs://{address}") as channel:
                await channel.send(b"small")
                with pytest.raises(anyio.BrokenResourceError, match="exceeds"):
                    await channel.send(b"x" * 100_000)
            tg.cancel_scope.cancel()
        assert got == [b"small"]

    @pytest.mark.parametrize("method", ["Stream", "ReportHealth", "ReportMetrics"])
    async def test_master_refuses_an_oversized_message_before_reading_it(
        self, method: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A client that ignores the limit (a raw grpclib client) announcing a message over
        max_message_bytes gets RESOURCE_EXHAUSTED; the master read its 5-byte prefix, never
        the body (grpclib's `recv_message` would buffer all of it, up to 4 GiB)."""
        limit = 64 * 1024
        reads = _spy_reads(monkeypatch)
        got: list[bytes] = []
        async with _raw_grpc(GrpcSettings(tls=False, max_message_bytes=limit), got) as channel:
            with anyio.fail_after(10), pytest.raises(GRPCError) as info:
                await _raw_call(channel, method, b"\n" + b"\x00" * (16 * limit))
        assert info.value.status is Status.RESOURCE_EXHAUSTED
        assert "exceeds the 65536 byte limit" in str(info.value.message)
        assert got == []
        assert reads
        assert max(reads) <= limit  # nothing of the 1 MiB body was asked for

    async def test_master_bounds_a_slow_unary_call(self) -> None:
        """A report whose message never completes ends with DEADLINE_EXCEEDED after the
        unary timeout (connect_timeout), instead of holding the call open; one cut short
        by the end of the request is refused as such (no traceback from grpclib)."""
        settings = GrpcSettings(tls=False, connect_timeout=0.2)
        async with _raw_grpc(settings, []) as channel:
            method = UnaryUnaryMethod(
                channel, "/nxmesh.agent.v1.AgentService/ReportHealth", bytes, bytes
            )

            async def cut(end: bool) -> None:
                async with method.open() as stream:
                    await stream.send_request()
                    prefix = _MESSAGE_PREFIX.pack(False, 100)  # announces 100 bytes, sends 10
                    await stream._stream.send_data(prefix + b"x" * 10, end_stream=end)
                    await stream.recv_message()

            for end, status in [(False, Status.DEADLINE_EXCEEDED), (True, Status.INVALID_ARGUMENT)]:
                with anyio.fail_after(10), pytest.raises(GRPCError) as info:
                    await asyncio.create_task(cut(end))
                assert info.value.status is status

    async def test_a_failing_session_is_logged_once(self, caplog: pytest.LogCaptureFixture) -> None:
        """An unexpected error in a session is one log entry (with its traceback) and ends
        the call with INTERNAL; grpclib does not log it a second time."""

        async def failing(channel: Channel, peer: str) -> None:
            await channel.receive()
            raise RuntimeError("bug")

        with capture_logs() as logs:
            async with _raw_grpc(GrpcSettings(tls=False), [], failing) as channel:
                with anyio.fail_after(10), pytest.raises(GRPCError) as info:
                    await _raw_call(channel, "Stream", wire_frame(b"frame"))
        assert info.value.status is Status.INTERNAL
        failures = [e for e in logs if e["log_level"] == "error"]
        assert [e["event"] for e in failures] == ["grpc session failed"]
        assert not [r for r in caplog.records if r.name.startswith("grpclib")]

    async def test_master_reads_frames_without_grpclib_internals(self) -> None:
        """On a grpclib release without the internals the master reads messages with
        `recv_message` (buffered whole, then refused by the codec when too large)."""
        from nxmesh_transport_grpc.server import _read_request

        stream = _FakeServerStream([wire_frame(b"a frame")])
        assert await _read_request(stream) == b"a frame"  # type: ignore[arg-type]
        too_big = _FakeServerStream([wire_frame(b"x" * 70_000)], limit=64 * 1024)
        with pytest.raises(GRPCError, match="exceeds"):
            await _read_request(too_big)  # type: ignore[arg-type]

    @pytest.mark.parametrize("lean", [True, False])
    async def test_master_connection_is_lean_and_carries_large_frames(
        self, tmp_path: Path, lean: bool, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Serving TLS caps asyncio's TLS read buffer (4 KiB by default), swaps h2's and
        grpclib's per-connection deques for small lists (unless `compact_connections` is
        off) and sends with one copy; the agent reads frames with one copy (unless
        `direct_frame_reads` is off); megabyte frames still pass both ways (many reads per
        TLS record), several in a row."""
        # Process-wide: back to asyncio's default, so the cap below is this test's doing.
        monkeypatch.setattr(asyncio.sslproto.SSLProtocol, "max_size", 256 * 1024)
        settings = GrpcSettings(compact_connections=lean)
        assert GrpcSettings().direct_frame_reads
        assert settings.tls_read_buffer_bytes == 4096
        assert GrpcSettings().compact_connections
        big = bytes(range(256)) * 4096 + b"end"  # 1 MiB + 3
        channels: list[Any] = []

        async def echo(channel: Channel, peer: str) -> None:
            channels.append(channel)
            try:
                while True:
                    await channel.send(await channel.receive())
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass

        server_ctx = server_context(settings, tmp_path)
        client_ctx = client_context(GrpcSettings(ca_file=tmp_path / "tls" / "ca.pem"))
        assert server_ctx is not None
        assert client_ctx is not None
        server = GrpcTransport("grpcs://127.0.0.1:0", ssl_context=server_ctx, settings=settings)
        async with anyio.create_task_group() as tg:
            address = await tg.start(server.serve, echo)
            assert asyncio.sslproto.SSLProtocol.max_size == 4096
            client = GrpcTransport(
                ssl_context=client_ctx, settings=GrpcSettings(direct_frame_reads=lean)
            )
            async with client.connect(f"grpcs://{address}") as channel:
                for frame in (big, b"small", big[::-1]):
                    await channel.send(frame)
                    with anyio.fail_after(30):
                        assert await channel.receive() == frame
                assert channels[0]._h2_stream is not None  # the one-copy send path
                assert channel._direct is lean  # type: ignore[attr-defined]  # one-copy read
                inner = channels[0]._stream._stream
                h2conn = inner.connection._connection
                queues = [
                    *h2conn.local_settings._settings.values(),
                    *h2conn.remote_settings._settings.values(),
                    h2conn.decoder.header_table.dynamic_entries,
                    inner.connection.write_ready._waiters,
                    inner.window_updated._waiters,
                    inner.buffer._unacked._queue,
                ]
                assert all(isinstance(q, SmallQueue) == lean for q in queues)
            tg.cancel_scope.cancel()

    @pytest.mark.parametrize("size", [0, 1, 127, 128, 16_383, 16_384, 70_000, 2**21 + 3])
    def test_frames_are_encoded_exactly_like_protobuf(self, size: int) -> None:
        """The copy-free wire encoding equals protobuf's, and decodes back to the frame."""
        data = bytes(range(256)) * (size // 256) + bytes(size % 256)
        encoded = wire_frame(data)
        assert encoded == Frame(data=data).SerializeToString()
        assert _FrameCodec(2**30).decode(encoded, Frame).data == data

    def test_other_encodings_fall_back_to_protobuf(self) -> None:
        """A Frame with extra (unknown) fields from a newer peer still decodes, also
        where the agent asks for its protobuf-free `_WireFrame`."""
        encoded = Frame(data=b"abc").SerializeToString() + b"\x10\x01"  # field 2 = 1
        assert _FrameCodec(1024).decode(encoded, Frame).data == b"abc"
        assert _FrameCodec(1024).decode(encoded, _WireFrame).data == b"abc"

    def test_the_agents_calls_are_the_generated_stubs(self) -> None:
        """`_AgentClient` calls the methods the generated stub names, with the same
        cardinalities, without loading the generated protobuf module."""
        mine, generated = _AgentClient(Any), AgentServiceStub(Any)  # type: ignore[arg-type]
        for method in ("Stream", "ReportHealth", "ReportMetrics"):
            ours, theirs = getattr(mine, method), getattr(generated, method)
            assert (type(ours), ours.name) == (type(theirs), theirs.name)
        code = (
            "import sys\n"
            "from nxmesh_transport_grpc.transport import GrpcTransport, _AgentClient, _FrameCodec\n"
            "from nxmesh_transport_grpc.transport import _WireFrame, wire_frame\n"
            "_AgentClient(None)\n"
            "assert _FrameCodec(99).decode(wire_frame(b'x'), _WireFrame).data == b'x'\n"
            "print(sorted(m for m in sys.modules if 'pb2' in m or 'descriptor_pool' in m))\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "[]"

    @pytest.mark.parametrize("size", [0, 1, 4095, 4096, 16_384, 70_000, 2**21 + 3])
    async def test_client_reads_frames_straight_out_of_the_stream(self, size: int) -> None:
        """`_read_frame` returns what grpclib's `recv_message` + the codec would, for
        every size, then None at the end of the stream."""
        frame = bytes(range(256)) * (size // 256) + bytes(size % 256)
        stream = _FakeClientStream([wire_frame(frame), wire_frame(b"next")])
        assert await _read_frame(stream) == frame
        assert await _read_frame(stream) == b"next"
        assert await _read_frame(stream) is None
        assert stream._messages_received == 2

    async def test_client_reads_other_encodings_through_the_codec(self) -> None:
        """A large Frame with an unknown field, or a longer field header, still decodes;
        a message cut short by the end of the stream is an error, not a short frame."""
        data = b"x" * 70_000
        extra = Frame(data=data).SerializeToString() + b"\x10\x01"  # field 2 = 1
        long_varint = b"\n\xf0\xa2\x84\x00" + data  # 70,000 as a 4-byte varint
        stream = _FakeClientStream([extra, long_varint])
        assert await _read_frame(stream) == data
        assert await _read_frame(stream) == data
        cut = _FakeClientStream([wire_frame(data)], cut=1000)
        with pytest.raises(StreamTerminatedError):
            await _read_frame(cut)

    async def test_client_read_is_bounded_before_buffering(self) -> None:
        """The size limit applies to the announced length, before the body is read."""
        stream = _FakeClientStream([wire_frame(b"x" * 70_000)], limit=64 * 1024)
        with pytest.raises(GRPCError, match="exceeds"):
            await _read_frame(stream)
        assert stream._stream.read == 5

    @pytest.mark.parametrize("size", [0, 1, 9, 10, 11, 12, 16_384])
    @pytest.mark.parametrize("pad", [None, 0, 3, 40])
    def test_lean_data_frame_repr_gives_the_same_text(self, size: int, pad: int | None) -> None:
        """The DATA frame repr `lean_frame_repr` installs reads only the bytes it shows and
        says exactly what hyperframe's own says, padded or not, received or built."""
        from hyperframe.frame import DataFrame
        from hyperframe.frame import Frame as H2Frame

        assert GrpcSettings().lean_frame_repr
        assert lean_data_frame_repr()
        assert lean_data_frame_repr()  # idempotent
        data = bytes(range(1, 256)) * (size // 255) + bytes(range(1, 1 + size % 255))
        built = DataFrame(1, data)
        if pad is not None:
            built.flags.add("PADDED")
            built.pad_length = pad
        received, _ = DataFrame.parse_frame_header(memoryview(built.serialize()[:9]))
        received.parse_body(memoryview(built.serialize()[9:]))
        for frame in (built, received):
            assert frame._body_repr._nxmesh_lean  # type: ignore[attr-defined]
            assert frame._body_repr() == H2Frame._body_repr(frame)  # hyperframe's own

    def test_lean_frame_flags_keep_hyperframes_behaviour(self) -> None:
        """With `lean_frame_flags`, frames of every class parse, build and refuse flags as
        hyperframe's own `Flags` does; only the valid-name set is shared per class."""
        from hyperframe.flags import Flag, Flags
        from hyperframe.frame import FRAMES, DataFrame, Frame, SettingsFrame

        assert GrpcSettings().lean_frame_flags
        assert lean_frame_flags()
        assert lean_frame_flags()  # idempotent
        for frame_class in FRAMES.values():
            names = {flag.name for flag in frame_class.defined_flags}
            first, second = Flags(frame_class.defined_flags), Flags(frame_class.defined_flags)
            assert first._valid_flags == names
            assert first._valid_flags is second._valid_flags  # built once per class
            for name in names:
                first.add(name)
            assert set(first) == names
            assert not second  # the flags themselves are the frame's own
            with pytest.raises(ValueError, match="Unexpected flag: BOGUS"):
                first.add("BOGUS")
        built = DataFrame(3, b"body", flags=["END_STREAM"])
        received, _ = Frame.parse_frame_header(memoryview(built.serialize()[:9]))
        received.parse_body(memoryview(built.serialize()[9:]))
        assert isinstance(received, DataFrame)
        assert set(received.flags) == {"END_STREAM"}
        assert received.data == b"body"
        ack = SettingsFrame(0, flags=["ACK"])
        with pytest.raises(ValueError, match="Unexpected flag: END_STREAM"):
            ack.flags.add("END_STREAM")
        # A flag list hyperframe does not define still gets a set of its own.
        own = Flags([Flag("X", 0x1)])
        own.add("X")
        assert set(own) == {"X"}
        with pytest.raises(ValueError, match="Unexpected flag: ACK"):
            own.add("ACK")

    def test_server_context_creates_a_ca_once(self, tmp_path: Path) -> None:
        """With TLS on and no files, the master creates its CA on first start and reuses it."""
        first = server_context(GrpcSettings(), tmp_path)
        ca = (tmp_path / "tls" / "ca.pem").read_bytes()
        second = server_context(GrpcSettings(), tmp_path)
        assert isinstance(first, ssl.SSLContext)
        assert isinstance(second, ssl.SSLContext)
        assert (tmp_path / "tls" / "ca.pem").read_bytes() == ca
        assert oct((tmp_path / "tls" / "server.key").stat().st_mode & 0o777) == "0o600"

    async def test_server_context_serves_the_operators_files(self, tmp_path: Path) -> None:
        """With cert_file and key_file the master serves them (no CA of its own), and an
        agent pinning their CA connects over h2."""
        own = ensure_tls_material(tmp_path / "own", hostnames=["127.0.0.1"])
        ctx = server_context(GrpcSettings(cert_file=own.cert, key_file=own.key), tmp_path)
        assert not (tmp_path / "tls").exists()
        server = GrpcTransport("grpcs://127.0.0.1:0", ssl_context=ctx)
        client = GrpcTransport(ssl_context=client_context(GrpcSettings(ca_file=own.ca_cert)))

        async def echo(channel: Channel, peer: str) -> None:
            await channel.send(await channel.receive())

        async with anyio.create_task_group() as tg:
            address = await tg.start(server.serve, echo)
            async with client.connect(f"grpcs://{address}") as channel:
                await channel.send(b"ping")
                with anyio.fail_after(10):
                    assert await channel.receive() == b"ping"
            tg.cancel_scope.cancel()

    def test_agent_needs_a_ca_to_pin(self) -> None:
        """An agent with TLS on but no ca_file is a configuration error naming the setting."""
        with pytest.raises(ValueError, match="ca_file"):
            client_context(GrpcSettings())
        assert client_context(GrpcSettings(tls=False)) is None

    def test_keepalive_respects_grpc_core_ping_policy(self) -> None:
        """Client pings: at most 2 without data, 5 min apart without data, timeout 20 s."""
        config = GrpcTransport()._client_config()
        assert config._http2_max_pings_without_data == 2
        assert config._http2_min_sent_ping_interval_without_data >= 300
        assert config._keepalive_permit_without_calls is False
        assert config._keepalive_time is not None
        assert config._keepalive_time >= 2 * GrpcSettings().heartbeat_interval


class _FakeBuffer:
    """grpclib's HTTP/2 stream as `_read_frame` sees it: `recv_data` over gRPC messages."""

    def __init__(self, messages: list[bytes], cut: int) -> None:
        wire = b"".join(_MESSAGE_PREFIX.pack(False, len(m)) + m for m in messages)
        self.data = wire[: len(wire) - cut]
        self.read = 0
        self.connection = type("Conn", (), {"messages_received": 0})()

    async def recv_data(self, size: int) -> bytes:
        chunk = self.data[self.read : self.read + size]
        self.read += len(chunk)
        return chunk


class _FakeClientStream:
    def __init__(self, messages: list[bytes], *, cut: int = 0, limit: int = 2**30) -> None:
        self._recv_initial_metadata_done = True
        self._wrapper = contextlib.nullcontext()
        self._codec = _FrameCodec(limit)
        self._messages_received = 0
        self._stream = _FakeBuffer(messages, cut)


class _FakeServerStream:
    """A server stream of a grpclib release without the 0.4 internals: `recv_message` only."""

    def __init__(self, messages: list[bytes], *, limit: int = 2**30) -> None:
        self._codec = _FrameCodec(limit)
        self._messages = messages

    async def recv_message(self) -> Any:
        if not self._messages:
            return None
        return self._codec.decode(self._messages.pop(0), _WireFrame)


class _RawCodec(CodecBase):
    """Sends and receives bytes as they are: a client that knows no limit."""

    __content_subtype__ = "proto"

    def encode(self, message: Any, message_type: Any) -> bytes:
        return bytes(message)

    def decode(self, data: bytes, message_type: Any) -> Any:
        return data


class _Collect:
    """A session handler keeping every frame it receives, and a unary handler."""

    def __init__(self, got: list[bytes]) -> None:
        self.got = got

    async def __call__(self, channel: Channel, peer: str) -> None:
        while True:
            self.got.append(await channel.receive())

    async def handle_unary(self, frame: bytes, peer: str) -> bytes:
        self.got.append(frame)
        return b""


@contextlib.asynccontextmanager
async def _raw_grpc(settings: GrpcSettings, got: list[bytes], handler: Any = None) -> Any:
    """A master (plain gRPC) collecting frames (or running `handler`), and a raw grpclib
    channel to it."""
    server = GrpcTransport("grpc://127.0.0.1:0", settings=settings)
    async with anyio.create_task_group() as tg:
        address = await tg.start(server.serve, handler or _Collect(got))
        host, port = address.rsplit(":", 1)
        channel = GrpcChannel(host, int(port), codec=_RawCodec())
        try:
            yield channel
        finally:
            channel.close()
            tg.cancel_scope.cancel()


async def _raw_call(channel: GrpcChannel, method: str, message: bytes) -> None:
    """Call `method` with `message`, in a task of its own: grpclib wakes a call the server
    reset by cancelling its task natively, and that cancel request stays on the task."""
    path = "/nxmesh.agent.v1.AgentService/" + method

    async def call() -> None:
        if method != "Stream":
            await UnaryUnaryMethod(channel, path, bytes, bytes)(message)
            return
        async with StreamStreamMethod(channel, path, bytes, bytes).open() as stream:
            await stream.send_message(message)
            await stream.recv_message()

    await asyncio.create_task(call())


def _spy_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes asked of grpclib's HTTP/2 streams (`recv_data`), both sides."""
    reads: list[int] = []
    recv_data = grpclib.protocol.Stream.recv_data

    async def spy(self: Any, size: int) -> bytes:
        reads.append(size)
        return await recv_data(self, size)

    monkeypatch.setattr(grpclib.protocol.Stream, "recv_data", spy)
    return reads
