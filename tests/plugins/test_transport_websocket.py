"""The built-in WebSocket transport passes the transport contract on asyncio and trio."""

from __future__ import annotations

import ssl
from pathlib import Path

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
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)), \
                        anyio.fail_after(5):
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
