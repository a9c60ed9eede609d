"""Behaviour every event bus provides."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import anyio
import pytest

from nxmesh.core.events import Event
from nxmesh.core.interfaces import EventBus


class EventBusContract:
    """Provide ``bus_factory``: a callable returning a new, unopened bus on the shared medium.

    Two buses from the factory must reach each other (same process for ``memory://``,
    same database for LISTEN/NOTIFY) — so a single bus is used where sharing is unknown.
    """

    pytestmark = pytest.mark.anyio

    @pytest.fixture
    def bus_factory(self) -> Callable[[], EventBus]:
        raise NotImplementedError("subclasses provide bus_factory")

    @pytest.fixture
    async def bus(self, bus_factory: Callable[[], EventBus]) -> AsyncIterator[EventBus]:
        bus = bus_factory()
        await bus.open()
        try:
            yield bus
        finally:
            await bus.aclose()

    def test_has_name_and_schemes(self, bus_factory: Callable[[], EventBus]) -> None:
        """A bus class carries a name and at least one URL scheme."""
        bus = bus_factory()
        assert isinstance(bus, EventBus)
        assert bus.name
        assert bus.schemes

    async def test_subscriber_receives_in_publish_order(self, bus: EventBus) -> None:
        """A subscriber sees events published after it subscribed, in order, intact."""
        sent = [Event(kind="version.created", payload={"n": i}) for i in range(20)]
        async with bus.subscribe() as events:
            for event in sent:
                await bus.publish(event)
            received = []
            with anyio.fail_after(10):
                async for event in events:
                    received.append(event)
                    if len(received) == len(sent):
                        break
        assert [(e.kind, dict(e.payload), e.id) for e in received] == [
            (e.kind, dict(e.payload), e.id) for e in sent
        ]

    async def test_every_subscriber_gets_each_event(self, bus: EventBus) -> None:
        """Two subscribers each receive the same event."""
        async with bus.subscribe() as first, bus.subscribe() as second:
            await bus.publish(Event(kind="agent.online", payload={"agent": "a1"}))
            with anyio.fail_after(10):
                one = await first.__anext__()
                two = await second.__anext__()
        assert one.id == two.id
        assert one.payload["agent"] == "a1"

    async def test_events_before_subscribing_are_not_replayed(self, bus: EventBus) -> None:
        """Only events published after subscribing are delivered."""
        await bus.publish(Event(kind="old"))
        async with bus.subscribe() as events:
            await bus.publish(Event(kind="new"))
            with anyio.fail_after(10):
                event = await events.__anext__()
        assert event.kind == "new"
