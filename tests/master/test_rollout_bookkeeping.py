"""The orchestrator's storage writes in batches: statuses and running versions of many
agents in one transaction each (`SqlStorage.set_agent_statuses`, `set_running_versions`),
same outcome as one by one — on SQLite and PostgreSQL, asyncio and trio."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import insert

from nxmesh.core.events import Event
from nxmesh.core.model import Agent
from nxmesh.core.protocol import ConfigStatus
from nxmesh.core.records import AgentStatus
from nxmesh.master.app import MasterServices, open_services
from nxmesh.master.orchestration import RolloutOrchestrator
from nxmesh.sql import tables
from nxmesh.sql.backend import SqlStorage
from nxmesh.testing import make_version

from .conftest import make_settings

pytestmark = pytest.mark.anyio


def _agent(i: int) -> Agent:
    return Agent(id=f"agent-{i:03d}", name=f"a{i}", workspace="default", status="online")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def services(
    request: pytest.FixtureRequest, plugin_manager: Any, tmp_path: Path
) -> AsyncIterator[MasterServices]:
    pm, overrides = plugin_manager, {}
    if request.param == "postgres":
        pm = request.getfixturevalue("pg_plugin_manager")
        overrides = {"storage_url": request.getfixturevalue("pg_database")}
    settings = make_settings(pm, tmp_path / "state", **overrides)
    async with open_services(pm, settings) as services:
        yield services


class TestBulkStorage:
    async def test_statuses_last_wins_and_unknown_agents_skipped(
        self, services: MasterServices
    ) -> None:
        storage = services.storage
        assert isinstance(storage, SqlStorage)
        for i in range(3):
            await storage.upsert_agent(_agent(i))
        now = time.time()

        def status(agent: str, version: int, phase: str) -> AgentStatus:
            return AgentStatus(agent_id=agent, version=version, digest="d" * 64,
                               phase=phase, ts=now)  # type: ignore[arg-type]  # fmt: skip

        stored = await storage.set_agent_statuses([
            status("agent-000", 1, "sent"),
            status("agent-001", 1, "sent"),
            status("gone", 1, "sent"),
            status("agent-000", 1, "applied"),
            status("agent-000", 2, "sent"),
        ])  # fmt: skip
        expected = [("agent-000", 1, "applied"), ("agent-000", 2, "sent"),
                    ("agent-001", 1, "sent")]  # fmt: skip
        assert sorted((s.agent_id, s.version, s.phase) for s in stored) == expected
        found = await storage.list_agent_statuses("default")
        assert [(s.agent_id, s.version, s.phase) for s in found] == expected
        # An existing row is replaced in bulk too.
        await storage.set_agent_statuses([status("agent-001", 1, "failed")])
        found = await storage.list_agent_statuses("default", version=1)
        assert [(s.agent_id, s.phase) for s in found] == [
            ("agent-000", "applied"), ("agent-001", "failed")]  # fmt: skip
        assert await storage.set_agent_statuses([]) == []
        # One agent's statuses (GET /agents/{id}/status), not the whole workspace's.
        mine = await storage.list_agent_statuses("default", agent_id="agent-000")
        assert [(s.version, s.phase) for s in mine] == [(1, "applied"), (2, "sent")]
        mine = await storage.list_agent_statuses("default", agent_id="agent-000", version=2)
        assert [(s.version, s.phase) for s in mine] == [(2, "sent")]

    async def test_running_versions(self, services: MasterServices) -> None:
        storage = services.storage
        assert isinstance(storage, SqlStorage)
        for i in range(3):
            await storage.upsert_agent(_agent(i))
        count = await storage.set_running_versions([
            ("agent-000", 1, "a" * 64, 10.0),
            ("agent-001", 1, "a" * 64, 11.0),
            ("agent-000", 2, "b" * 64, 12.0),
            ("gone", 2, "b" * 64, 12.0),
        ])  # fmt: skip
        assert count == 2
        agents = {a.id: a for a in await storage.list_agents()}
        assert (agents["agent-000"].running_version, agents["agent-000"].last_seen) == (2, 12.0)
        assert agents["agent-000"].running_digest == "b" * 64
        assert (agents["agent-001"].running_version, agents["agent-001"].status) == (1, "online")
        assert agents["agent-002"].running_version is None


class TestOrchestratorBatches:
    async def test_many_statuses_land_with_their_events(self, services: MasterServices) -> None:
        """1,100 agents sent a version and acking it: every status and running version is
        stored, a deleted agent's are skipped, and one rollout.status event per stored
        status is published in order — more than a memory-bus subscriber buffers (1,024),
        so publishing a batch must let subscribers keep up rather than drop them."""
        storage = services.storage
        assert isinstance(storage, SqlStorage)
        version = make_version(number=1)
        await storage.add_version(version)
        n = 1100
        rows = [{"id": f"agent-{i:04d}", "name": "a", "labels": "{}", "workspace": "default",
                 "status": "online"} for i in range(n)]  # fmt: skip
        with storage.engine.begin() as conn:  # setup only: one statement, not 1,100
            conn.execute(insert(tables.agents), rows)
        orchestrator = RolloutOrchestrator(services)
        events: list[Event] = []
        async with anyio.create_task_group() as tg, services.bus.subscribe() as stream:

            async def collect() -> None:
                async for event in stream:
                    if event.kind == "rollout.status":
                        events.append(event)

            tg.start_soon(collect)
            await tg.start(orchestrator.run)
            await storage.delete_agent(f"agent-{n - 1:04d}")
            for i in range(n):
                orchestrator.on_sent(f"agent-{i:04d}", version)
            for i in range(n):
                done = ConfigStatus(version=1, digest=version.digest, phase="applied")
                await orchestrator.on_message(f"agent-{i:04d}", done)
            await orchestrator.wait_written()
            with anyio.fail_after(30):
                while len(events) < n - 1:
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()

        statuses = await storage.list_agent_statuses("default", version=1)
        assert len(statuses) == n - 1
        assert {s.phase for s in statuses} == {"applied"}
        agents = await storage.list_agents()
        assert len(agents) == n - 1
        assert {(a.running_version, a.running_digest) for a in agents} == {(1, version.digest)}
        assert [e.payload["agent_id"] for e in events] == [f"agent-{i:04d}" for i in range(n - 1)]
        assert {e.payload["phase"] for e in events} == {"sent"}  # applied ones: no workspace
        sent = services.metrics.pushes.labels(outcome="sent")._value.get()
        applied = services.metrics.pushes.labels(outcome="applied")._value.get()
        assert (sent, applied) == (n, n)
