"""Behaviour every transport (server + client pair) provides."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import pytest

from nxmesh.core.interfaces import Channel, TransportClient, TransportServer


class TransportContract:
    """Provide ``transport_pair``: a callable returning ``(server, client, url_for)`` where
    ``url_for(address)`` turns the server's bound address into the client's URL."""

    pytestmark = pytest.mark.anyio

    @pytest.fixture
    def transport_pair(
        self,
    ) -> Callable[[], tuple[TransportServer, TransportClient, Callable[[str], str]]]:
        raise NotImplementedError("subclasses provide transport_pair")

    async def test_frames_flow_both_ways_in_order(
        self,
        transport_pair: Callable[
            [], tuple[TransportServer, TransportClient, Callable[[str], str]]
        ],
    ) -> None:
        """Frames the client sends arrive in order; the server's echo arrives back."""
        server, client, url_for = transport_pair()
        frames = [f"frame-{i}".encode() * (i + 1) for i in range(50)] + [b"x" * 1_000_000]

        async def echo(channel: Channel, peer: str) -> None:
            for _ in frames:
                await channel.send(await channel.receive())

        async with anyio.create_task_group() as tg:
            address = await tg.start(server.serve, echo)
            with anyio.fail_after(20):
                async with client.connect(url_for(address)) as channel:
                    for frame in frames:
                        await channel.send(frame)
                    echoed = [await channel.receive() for _ in frames]
            tg.cancel_scope.cancel()
        assert echoed == frames

    async def test_unreachable_master_is_an_oserror(
        self,
        transport_pair: Callable[
            [], tuple[TransportServer, TransportClient, Callable[[str], str]]
        ],
    ) -> None:
        """Connecting to a closed port raises OSError so the agent can fall back."""
        _server, client, url_for = transport_pair()
        with pytest.raises(OSError), anyio.fail_after(20):
            async with client.connect(url_for("127.0.0.1:1")):
                pass
