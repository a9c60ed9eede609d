"""The built-in in-memory event bus."""

from __future__ import annotations

from collections.abc import Callable

import anyio
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
