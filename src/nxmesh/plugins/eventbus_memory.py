"""In-process event bus (``memory://``): the default for a single master process."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import ClassVar

import anyio
import structlog
from anyio.streams.memory import MemoryObjectSendStream

from nxmesh import hookimpl
from nxmesh.core.events import Event
from nxmesh.core.interfaces import EventBus

log = structlog.get_logger("nxmesh.eventbus.memory")


class MemoryEventBus:
    """Fans each published event out to every current subscriber of this process.

    A subscriber that falls `buffer` events behind is disconnected rather than allowed
    to block publishers: its iterator ends and it must resubscribe (and resync).
    """

    name: ClassVar[str] = "memory"
    schemes: ClassVar[tuple[str, ...]] = ("memory",)

    def __init__(self, url: str = "memory://", *, buffer: int = 1024) -> None:
        self.url = url
        self._buffer = buffer
        self._subscribers: set[MemoryObjectSendStream[Event]] = set()

    async def open(self) -> None:
        return None

    async def aclose(self) -> None:
        for send in list(self._subscribers):
            send.close()
        self._subscribers.clear()

    async def publish(self, event: Event) -> None:
        for send in list(self._subscribers):
            try:
                send.send_nowait(event)
            except anyio.WouldBlock:
                log.warning("slow subscriber disconnected", buffer=self._buffer)
                self._subscribers.discard(send)
                send.close()
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._subscribers.discard(send)

    @property
    def delivered(self) -> bool:
        """Whether every subscriber has taken every event published so far and waits for
        the next one (tests: the bus holds nothing in flight)."""
        for send in self._subscribers:
            stats = send.statistics()
            if stats.open_receive_streams and (
                stats.current_buffer_used or not stats.tasks_waiting_receive
            ):
                return False
        return True

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[AsyncIterator[Event]]:
        send, receive = anyio.create_memory_object_stream[Event](self._buffer)
        self._subscribers.add(send)
        try:
            async with receive:
                yield receive
        finally:
            self._subscribers.discard(send)
            send.close()


@hookimpl(trylast=True)
def nxmesh_register_event_buses() -> Sequence[type[EventBus]]:
    return [MemoryEventBus]
