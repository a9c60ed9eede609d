"""An in-process transport for tests: the real session code without sockets or TLS.

``MemoryTransport`` implements both sides: ``serve(handler)`` accepts, ``connect()`` opens
a stream to the serving instance through anyio memory streams. It is not registered as a
plugin; tests construct it::

    transport = MemoryTransport()
    async with anyio.create_task_group() as tg:
        await tg.start(transport.serve, hub)
        async with transport.connect("memory://") as channel:
            ...
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import ClassVar

import anyio
from anyio.abc import TaskGroup, TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from nxmesh.core.interfaces import Channel, SessionHandler

__all__ = ["MemoryChannel", "MemoryTransport"]


class MemoryChannel:
    """One end of an in-memory stream pair."""

    def __init__(
        self, send: MemoryObjectSendStream[bytes], receive: MemoryObjectReceiveStream[bytes]
    ) -> None:
        self._send = send
        self._receive = receive

    async def send(self, frame: bytes) -> None:
        await self._send.send(frame)

    async def receive(self) -> bytes:
        try:
            return await self._receive.receive()
        except anyio.ClosedResourceError:
            raise anyio.EndOfStream from None

    async def aclose(self) -> None:
        await self._send.aclose()
        await self._receive.aclose()


def channel_pair(buffer: int = 64) -> tuple[MemoryChannel, MemoryChannel]:
    """Two connected channels: what one sends, the other receives."""
    a_send, a_receive = anyio.create_memory_object_stream[bytes](buffer)
    b_send, b_receive = anyio.create_memory_object_stream[bytes](buffer)
    return MemoryChannel(a_send, b_receive), MemoryChannel(b_send, a_receive)


class MemoryTransport:
    """Both sides of a transport in one process; see the module docstring."""

    name: ClassVar[str] = "memory"
    schemes: ClassVar[tuple[str, ...]] = ("memory",)

    def __init__(self, url: str = "memory://", **_: object) -> None:
        self.url = url
        self._handler: SessionHandler | None = None
        self._tg: TaskGroup | None = None

    async def serve(
        self,
        handler: SessionHandler,
        *,
        task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            async with anyio.create_task_group() as tg:
                self._handler, self._tg = handler, tg
                task_status.started("memory")
                await anyio.sleep_forever()
        finally:
            self._handler = self._tg = None

    async def _run(self, channel: MemoryChannel, handler: SessionHandler) -> None:
        try:
            await handler(channel, "memory")
        finally:
            await channel.aclose()

    @asynccontextmanager
    async def connect(self, url: str) -> AsyncIterator[Channel]:
        if self._tg is None or self._handler is None:
            raise ConnectionRefusedError("the memory transport is not serving")
        agent, master = channel_pair()
        self._tg.start_soon(self._run, master, self._handler)
        try:
            yield agent
        finally:
            await agent.aclose()
