"""The built-in in-memory event bus."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import anyio.lowlevel
import pytest

from nxmesh.core.events import Event
from nxmesh.plugins.eventbus_memory import MemoryEventBus
from nxmesh.testing.contracts import EventBusContract


class TestMemoryEventBus(EventBusContract):
    @pytest.fixture
    def bus_factory(self) -> Callable[[], MemoryEventBus]:
        return lambda: MemoryEventBus("memory://")


class TestSlowSubscriber:
    @pytest.mark.anyio
    async def test_slow_subscriber_is_cut_off_instead_of_blocking(self) -> None:
        """A subscriber that stops reading is disconnected; publishing never blocks."""
        bus = MemoryEventBus(buffer=2)
        await bus.open()
        async with bus.subscribe() as events:
            with anyio.fail_after(5):
                for i in range(10):
                    await bus.publish(Event(kind="tick", payload={"i": i}))
            received = [e.payload["i"] async for e in events]
        assert received == [0, 1]
        await bus.aclose()


class TestDelivered:
    @pytest.mark.anyio
    async def test_delivered_once_every_subscriber_took_every_event_and_waits(self) -> None:
        """`delivered` is False while an event sits unread or its subscriber is busy, and
        True once the subscriber waits for the next (what tests use instead of sleeping)."""
        bus = MemoryEventBus()
        taken: list[int] = []
        handled = anyio.Event()
        assert bus.delivered  # no subscriber
        async with bus.subscribe() as events, anyio.create_task_group() as tg:

            async def read() -> None:
                async for event in events:
                    taken.append(event.payload["i"])
                    handled.set()

            tg.start_soon(read)
            await anyio.wait_all_tasks_blocked()  # the reader waits for the first event
            assert bus.delivered
            await bus.publish(Event(kind="tick", payload={"i": 1}))
            assert not bus.delivered  # sitting in the buffer
            await handled.wait()
            with anyio.fail_after(5):
                while not bus.delivered:
                    await anyio.lowlevel.checkpoint()
            assert taken == [1]
            tg.cancel_scope.cancel()
