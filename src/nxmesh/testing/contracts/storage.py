"""Behaviour every storage backend provides."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from nxmesh.core.interfaces import StorageBackend
from nxmesh.core.model import Agent
from nxmesh.testing.factories import make_version


class StorageContract:
    """Provide ``storage_factory``: a callable returning a new, unopened backend on an
    empty database. Calling it twice must reach the *same* database (for reopen tests)."""

    pytestmark = pytest.mark.anyio

    @pytest.fixture
    def storage_factory(self) -> Callable[[], StorageBackend]:
        raise NotImplementedError("subclasses provide storage_factory")

    @pytest.fixture
    async def storage(
        self, storage_factory: Callable[[], StorageBackend]
    ) -> AsyncIterator[StorageBackend]:
        backend = storage_factory()
        await backend.open()
        try:
            yield backend
        finally:
            await backend.aclose()

    async def test_version_round_trips(self, storage: StorageBackend) -> None:
        """A stored version reads back equal, by number and as the latest."""
        version = make_version(1)
        await storage.add_version(version)
        assert await storage.get_version("default", 1) == version
        assert await storage.latest_version("default") == version

    async def test_versions_are_listed_newest_first_per_workspace(
        self, storage: StorageBackend
    ) -> None:
        """Listing returns one workspace's versions, newest first, honouring limit and before."""
        for n in (1, 2, 3):
            await storage.add_version(make_version(n))
        await storage.add_version(make_version(1, workspace="other"))
        listed = await storage.list_versions("default")
        assert [v.number for v in listed] == [3, 2, 1]
        assert [v.number for v in await storage.list_versions("default", limit=1)] == [3]
        assert [v.number for v in await storage.list_versions("default", before=3)] == [2, 1]

    async def test_version_numbers_cannot_be_reused(self, storage: StorageBackend) -> None:
        """Adding a second version with an existing number fails and keeps the first."""
        first = make_version(1)
        await storage.add_version(first)
        with pytest.raises(Exception):  # noqa: B017 - backends raise their own conflict type
            await storage.add_version(make_version(1, message="impostor"))
        assert await storage.get_version("default", 1) == first

    async def test_unknown_version_is_none(self, storage: StorageBackend) -> None:
        """Reading a version that was never stored gives None."""
        assert await storage.get_version("default", 42) is None
        assert await storage.latest_version("nowhere") is None

    async def test_agent_upsert_updates_in_place(self, storage: StorageBackend) -> None:
        """Upserting the same agent id twice keeps one record with the latest fields."""
        await storage.upsert_agent(Agent(id="a1", name="edge-1", labels={"env": "prod"}))
        await storage.upsert_agent(Agent(id="a1", name="edge-1", status="online"))
        agent = await storage.get_agent("a1")
        assert agent is not None
        assert agent.status == "online"
        assert [a.id for a in await storage.list_agents()] == ["a1"]
        assert await storage.get_agent("missing") is None

    async def test_data_survives_reopen(
        self, storage_factory: Callable[[], StorageBackend]
    ) -> None:
        """What one backend instance stored, a new instance on the same URL reads."""
        first = storage_factory()
        await first.open()
        await first.add_version(make_version(1))
        await first.aclose()
        second = storage_factory()
        await second.open()
        try:
            stored = await second.get_version("default", 1)
        finally:
            await second.aclose()
        assert stored is not None
        assert stored.number == 1
