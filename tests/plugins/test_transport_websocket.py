"""The built-in WebSocket transport passes the transport contract on asyncio and trio."""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from nxmesh.core.interfaces import Channel
from nxmesh.core.pluginmanager import get_plugin_manager
from nxmesh.core.registry import ProviderRegistries
from nxmesh.plugins.transport_websocket import WebSocketTransport
from nxmesh.testing.contracts import TransportContract
from nxmesh.testing.contracts.transport import TransportKit


def _kit() -> TransportKit:
    return TransportKit(
        server=lambda url, ctx: WebSocketTransport(url, ssl_context=ctx),
        client=lambda ctx: WebSocketTransport(ssl_context=ctx),
        listen_url="wss://127.0.0.1:0/agent",
        url_for=lambda address: f"wss://{address}/agent",
    )


class TestWebSocketTransport(TransportContract):
    """The contract, over ``wss://``."""

    @pytest.fixture
    def transport_kit(self) -> TransportKit:
        return _kit()


class TestWebSocketSpecifics:
    """What only the WebSocket transport does."""

    pytestmark = pytest.mark.anyio

    def test_is_registered_as_websocket(self) -> None:
        """The built-in plugin registers one class, picked by name or ws/wss scheme."""
        registry = ProviderRegistries.collect(get_plugin_manager(environ={}))["transport"]
        assert registry.get("websocket") is WebSocketTransport
        assert registry.by_scheme("wss://master:8443/agent") is WebSocketTransport

    def test_the_entry_point_does_not_import_wsproto(self) -> None:
        """Every process (every agent) imports the plugin module at start-up and builds the
        transport class: both stay thin; wsproto comes with the first connection."""
        code = (
            "import sys, anyio\n"
            "import nxmesh.plugins.transport_websocket as plugin\n"
            "def heavy(): return sorted(m for m in ('wsproto', 'h11') if m in sys.modules)\n"
            "assert not heavy(), heavy()\n"
            "assert plugin.SUBPROTOCOL == 'nxmesh.v1'\n"
            "transport = plugin.WebSocketTransport()\n"
            "assert transport.name == 'websocket'\n"
            "assert not heavy(), heavy()\n"
            "async def attempt():\n"
            "    try:\n"
            "        async with transport.connect('ws://127.0.0.1:9/agent'):\n"
            "            pass\n"
            "    except OSError:\n"
            "        pass\n"
            "anyio.run(attempt)\n"
            "assert heavy() == ['h11', 'wsproto'], heavy()\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr

    async def test_other_paths_get_404(self) -> None:
        """Only the configured path upgrades; others are refused with an OSError."""

        async def never(channel: Channel, peer: str) -> None:
            raise AssertionError("no session expected")

        server = WebSocketTransport("ws://127.0.0.1:0/agent")
        async with anyio.create_task_group() as tg:
            address = await tg.start(server.serve, never)
            with pytest.raises(ConnectionRefusedError, match="HTTP 404"):
                async with WebSocketTransport().connect(f"ws://{address}/other"):
                    pass
            tg.cancel_scope.cancel()

    async def test_oversized_message_closes_the_connection(self) -> None:
        """A message above max_message_bytes ends the stream instead of being buffered."""
        received: list[bytes] = []

        async def collect(channel: Channel, peer: str) -> None:
            try:
                while True:
                    received.append(await channel.receive())
            except anyio.EndOfStream:
                pass

        server = WebSocketTransport("ws://127.0.0.1:0/agent", max_message_bytes=1024)
        async with anyio.create_task_group() as tg:
            address = await tg.start(server.serve, collect)
            async with WebSocketTransport().connect(f"ws://{address}/agent") as channel:
                await channel.send(b"small")
                await channel.send(b"x" * 4096)
                with (
                    pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)),
                    anyio.fail_after(5),
                ):
                    await channel.receive()
            tg.cancel_scope.cancel()
        assert received == [b"small"]

    @pytest.mark.parametrize(
        "url", ["wss://127.0.0.1:0/agent", "ws://127.0.0.1:0/agent"], ids=["no-ctx", "ctx"]
    )
    async def test_tls_and_url_must_agree(self, url: str, tmp_path: Path) -> None:
        """wss:// without a context, or a context on ws://, is a configuration error."""
        ctx = ssl.create_default_context() if url.startswith("ws:") else None

        async def never(channel: Channel, peer: str) -> None:
            raise AssertionError

        with pytest.raises(ValueError, match="ssl_context"):
            await WebSocketTransport(url, ssl_context=ctx).serve(never)


class TestWireCompatibility:
    """The channel frames messages itself; wsproto, a conforming peer, checks the wire."""

    pytestmark = pytest.mark.anyio

    async def test_server_against_a_wsproto_client(self) -> None:
        """Fragments, an interleaved ping, a 64-bit length and the close handshake."""
        from wsproto import ConnectionType, WSConnection
        from wsproto.events import (
            AcceptConnection,
            BytesMessage,
            CloseConnection,
            Message,
            Ping,
            Pong,
            Request,
        )

        big = bytes(range(256)) * 300  # above 65535 bytes: the 8-byte length form

        async def echo(channel: Channel, peer: str) -> None:
            for _ in range(2):
                await channel.send(await channel.receive())
            with pytest.raises(anyio.EndOfStream):
                await channel.receive()

        server = WebSocketTransport("ws://127.0.0.1:0/agent")
        async with anyio.create_task_group() as tg:
            address = await tg.start(server.serve, echo)
            host, port = address.rsplit(":", 1)
            ws = WSConnection(ConnectionType.CLIENT)
            events: list[object] = []

            async with await anyio.connect_tcp(host, int(port)) as stream:

                async def until(kind: type) -> Any:
                    while not any(isinstance(e, kind) for e in events):
                        ws.receive_data(await stream.receive())
                        events.extend(ws.events())
                    found = next(e for e in events if isinstance(e, kind))
                    events.remove(found)
                    return found

                await stream.send(
                    ws.send(Request(host=address, target="/agent", subprotocols=["nxmesh.v1"]))
                )
                accepted = await until(AcceptConnection)
                assert accepted.subprotocol == "nxmesh.v1"
                await stream.send(
                    ws.send(Message(data=b"first ", message_finished=False))
                    + ws.send(Ping(payload=b"hi"))
                    + ws.send(Message(data=b"second"))
                )
                assert (await until(Pong)).payload == b"hi"
                echoed = await until(BytesMessage)
                assert echoed.data == b"first second"
                assert echoed.message_finished
                await stream.send(ws.send(Message(data=big)))
                parts = b""
                while True:
                    part = await until(BytesMessage)
                    parts += part.data
                    if part.message_finished:
                        break
                assert parts == big
                await stream.send(ws.send(CloseConnection(code=1000)))
                assert (await until(CloseConnection)).code == 1000
            tg.cancel_scope.cancel()

    async def test_client_against_a_wsproto_server(self) -> None:
        """Frames sent right behind the 101, a ping answered, masked frames sent."""
        from wsproto import ConnectionType, WSConnection
        from wsproto.events import (
            AcceptConnection,
            BytesMessage,
            CloseConnection,
            Message,
            Ping,
            Pong,
            Request,
        )

        big = b"\x00\xff" * 40000
        seen: list[bytes] = []

        async def serve(stream: Any) -> None:
            ws = WSConnection(ConnectionType.SERVER)
            events: list[object] = []

            async def until(kind: type) -> Any:
                while not any(isinstance(e, kind) for e in events):
                    ws.receive_data(await stream.receive())
                    events.extend(ws.events())
                found = next(e for e in events if isinstance(e, kind))
                events.remove(found)
                return found

            async with stream:
                request = await until(Request)
                await stream.send(
                    ws.send(AcceptConnection(subprotocol=request.subprotocols[0]))
                    + ws.send(Message(data=b"hello"))
                    + ws.send(Message(data=big))
                    + ws.send(Ping(payload=b"p"))
                    + ws.send(Message(data=b"after ping"))
                )
                assert (await until(Pong)).payload == b"p"
                seen.append((await until(BytesMessage)).data)  # masked by the client
                await stream.send(ws.send(CloseConnection(code=1000)))
                assert (await until(CloseConnection)).code == 1000

        async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
            port = listener.extra(anyio.abc.SocketAttribute.local_port)
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, serve)
                url = f"ws://127.0.0.1:{port}/agent"
                async with WebSocketTransport().connect(url) as channel:
                    assert await channel.receive() == b"hello"
                    assert await channel.receive() == big
                    assert await channel.receive() == b"after ping"
                    await channel.send(b"\x01" * 5000)
                    with pytest.raises(anyio.EndOfStream), anyio.fail_after(5):
                        await channel.receive()
                tg.cancel_scope.cancel()
        assert seen == [b"\x01" * 5000]

    @pytest.mark.parametrize(
        ("frame", "code"),
        [
            (b"\x82\x05hello", 1002),  # not masked
            (
                b"\x81\x85abcd" + bytes(a ^ b for a, b in zip(b"hello", b"abcd" * 2, strict=False)),
                1003,
            ),
            (b"\xc2\x80abcd", 1002),  # a reserved bit without an extension
            (b"\x09\x80abcd", 1002),  # a fragmented ping
        ],
        ids=["unmasked", "text", "rsv1", "fragmented-control"],
    )
    async def test_server_rejects_bad_frames(self, frame: bytes, code: int) -> None:
        """A frame RFC 6455 forbids (or a text message) closes with the matching code."""
        from wsproto import ConnectionType, WSConnection
        from wsproto.events import CloseConnection, Request

        ended = anyio.Event()

        async def wait(channel: Channel, peer: str) -> None:
            with pytest.raises(anyio.EndOfStream):
                await channel.receive()
            ended.set()

        server = WebSocketTransport("ws://127.0.0.1:0/agent")
        async with anyio.create_task_group() as tg:
            address = await tg.start(server.serve, wait)
            host, port = address.rsplit(":", 1)
            ws = WSConnection(ConnectionType.CLIENT)
            async with await anyio.connect_tcp(host, int(port)) as stream:
                await stream.send(ws.send(Request(host=address, target="/agent")))
                ws.receive_data(await stream.receive())
                list(ws.events())
                await stream.send(frame)
                with anyio.fail_after(5):
                    await ended.wait()
                    closes: list[CloseConnection] = []
                    while not closes:
                        ws.receive_data(await stream.receive())
                        closes = [e for e in ws.events() if isinstance(e, CloseConnection)]
                assert closes[0].code == code
            tg.cancel_scope.cancel()

    async def test_each_backend_takes_its_own_path(self, anyio_backend: str) -> None:
        """asyncio runs on its own transports, trio on anyio streams: the contract above
        covers both."""
        from nxmesh.websocket.asyncio_channel import _AsyncioWebSocket
        from nxmesh.websocket.streams import WebSocketChannel

        async def hold(channel: Channel, peer: str) -> None:
            await channel.send(type(channel).__name__.encode())
            with pytest.raises(anyio.EndOfStream):
                await channel.receive()

        expected = _AsyncioWebSocket if anyio_backend == "asyncio" else WebSocketChannel
        server = WebSocketTransport("ws://127.0.0.1:0/agent")
        async with anyio.create_task_group() as tg:
            address = await tg.start(server.serve, hold)
            async with WebSocketTransport().connect(f"ws://{address}/agent") as channel:
                assert isinstance(channel, expected)
                assert await channel.receive() == expected.__name__.encode()
            tg.cancel_scope.cancel()

    async def test_a_slow_reader_pushes_back_and_loses_nothing(self) -> None:
        """Sends wait while the peer does not read, and all arrive once it does."""
        chunk = bytes(range(256)) * 4096  # 1 MiB: far more than the socket buffers
        sent = anyio.Event()

        async def flood(channel: Channel, peer: str) -> None:
            for i in range(24):
                await channel.send(bytes([i]) + chunk)
            sent.set()
            with pytest.raises(anyio.EndOfStream):
                await channel.receive()

        server = WebSocketTransport("ws://127.0.0.1:0/agent")
        async with anyio.create_task_group() as tg:
            address = await tg.start(server.serve, flood)
            async with WebSocketTransport().connect(f"ws://{address}/agent") as channel:
                await anyio.sleep(0.2)  # the server fills the buffers and must wait
                with anyio.fail_after(30):
                    for i in range(24):
                        assert await channel.receive() == bytes([i]) + chunk
                    await sent.wait()
            tg.cancel_scope.cancel()

    async def test_a_reader_gone_ends_a_blocked_send(self) -> None:
        """A send waiting on a peer that went away fails instead of hanging."""
        chunk = b"x" * (1 << 20)
        outcome: list[BaseException] = []
        ended = anyio.Event()

        async def flood(channel: Channel, peer: str) -> None:
            try:
                while True:
                    await channel.send(chunk)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                outcome.append(exc)
            finally:
                ended.set()

        server = WebSocketTransport("ws://127.0.0.1:0/agent")
        async with anyio.create_task_group() as tg:
            address = await tg.start(server.serve, flood)
            async with WebSocketTransport().connect(f"ws://{address}/agent") as channel:
                await channel.receive()
            with anyio.fail_after(30):
                await ended.wait()
            tg.cancel_scope.cancel()
        assert outcome

    async def test_send_parts_is_one_message(self) -> None:
        """Both ends take a frame in two parts (the hub's `SendsParts`): one message."""
        from nxmesh.session_hub import SendsParts

        body = bytes(range(256)) * 300
        got: list[bytes] = []

        async def parts(channel: Channel, peer: str) -> None:
            assert isinstance(channel, SendsParts)
            await channel.send_parts(b"head:", body)
            got.append(await channel.receive())

        server = WebSocketTransport("ws://127.0.0.1:0/agent")
        async with anyio.create_task_group() as tg:
            address = await tg.start(server.serve, parts)
            async with WebSocketTransport().connect(f"ws://{address}/agent") as channel:
                assert isinstance(channel, SendsParts)
                assert await channel.receive() == b"head:" + body
                await channel.send_parts(b"", b"back")
                with pytest.raises(anyio.EndOfStream), anyio.fail_after(5):
                    await channel.receive()
            tg.cancel_scope.cancel()
        assert got == [b"back"]
