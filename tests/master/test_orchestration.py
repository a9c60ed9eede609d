"""Rollout orchestration in one process: real master services (SQLite), the session hub
and the orchestrator over the in-memory transport, agents as `AgentLink`s answering by
hand — plus the rollout API over the HTTP app."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import attrs
import pytest
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectSendStream

from nxmesh.agent.verify import verify_update
from nxmesh.agent_link import AgentLink, Backoff, Endpoint, MemoryCredentialStore
from nxmesh.config.versions import new_version
from nxmesh.core.events import Event
from nxmesh.core.model import Agent, ConfigVersion, DesiredState, HealthReport, LabelSelector
from nxmesh.core.pluginmanager import NxMeshPluginManager
from nxmesh.core.protocol import ConfigStatus, ConfigUpdate, Heartbeat
from nxmesh.core.records import AgentStatus, Assignment, StorageError
from nxmesh.crypto.signing import VerifyKey
from nxmesh.master.app import MasterServices, open_services
from nxmesh.master.orchestration import RECONCILE_INTERVAL, RolloutOrchestrator
from nxmesh.plugins.eventbus_memory import MemoryEventBus
from nxmesh.session_hub import MasterSessionHub, SessionInfo
from nxmesh.testing import make_state, memory_transport
from nxmesh.testing.memory_transport import MemoryChannel, MemoryTransport

from .conftest import Master, make_settings

pytestmark = pytest.mark.anyio

Stream = MemoryObjectSendStream[bytes]


def _drained(stream: MemoryObjectSendStream[Any]) -> bool:
    """Whether every frame sent on `stream` was read, and handled: its reader (a session
    loop, handling one frame before reading the next) waits for the next one — or is gone."""
    stats = stream.statistics()
    return stats.open_receive_streams == 0 or (
        stats.current_buffer_used == 0 and stats.tasks_waiting_receive > 0
    )


@attrs.define(eq=False)
class Plane:
    """Master services + hub + orchestrator, served over the memory transport."""

    services: MasterServices
    hub: MasterSessionHub
    orchestrator: RolloutOrchestrator
    transport: MemoryTransport
    tg: TaskGroup
    streams: list[Stream]
    """Both directions of every stream the memory transport opened (see `channel_pair`)."""
    keys: dict[str, VerifyKey] = attrs.field(factory=dict)
    links: list[AgentLink] = attrs.field(factory=list)

    async def agent(self, name: str, **labels: str) -> AgentLink:
        issued = await self.services.enrollment.create_token(labels=labels)
        link = AgentLink(
            [Endpoint(self.transport, "memory://")],
            MemoryCredentialStore(),
            bootstrap_token=issued.token,
            name=name,
            labels=labels,
            backoff=Backoff(0.01, 0.05),
            on_master_key=lambda key, _enrolled: self.keys.__setitem__(name, key),
        )
        self.links.append(link)
        self.tg.start_soon(link.run_forever)
        with anyio.fail_after(5):
            await link.wait_registered()
        assert self.streams, "settle() needs the streams: see channel_pair"
        return link

    async def commit(self, body: str) -> ConfigVersion:
        """Store a new version; `body` names it (and picks a distinct upstream port)."""
        state = make_state(1, port=18000 + sum(map(ord, body)))
        result = await self.services.changes.commit(
            "default", lambda _old: state, author="tester", message=body
        )
        return result.version

    async def pin(self, name: str, version: int, **labels: str) -> None:
        """Store an assignment of `version` to the agents with `labels`, as the API does."""
        selector = LabelSelector(match_labels=labels)
        await self.services.storage.set_assignment(
            Assignment(workspace="default", name=name, selector=selector, version=version)
        )
        await self.orchestrator.assignments_changed("default")

    async def settle(self) -> None:
        """Return once everything the agents and the master sent was handled and nothing
        more is due: what an agent has not received by then, the master does not send
        (until something changes, or the periodic reconcile). No sleep: see `quiet`."""
        with anyio.fail_after(30):  # a bound, not a timing check
            while not self.quiet():
                await self.orchestrator.wait_written()
                await anyio.lowlevel.checkpoint()  # the others (tasks, SQLite threads) go on

    def quiet(self) -> bool:
        """At this instant, no work is queued or under way anywhere in the plane: every
        frame was `delivered`, the orchestrator has handled every event on the bus, and has
        nothing to reconcile or write, nor a reconcile or write under way."""
        bus = self.services.bus
        assert isinstance(bus, MemoryEventBus)
        return self.delivered() and bus.delivered and self.orchestrator.idle

    def delivered(self) -> bool:
        """At this instant, every frame either side sent was read and handled.

        Every link has put what it queued on its stream (`AgentLink.pending_frames`);
        every frame on every stream, both ways, was handled (`_drained`: the master's
        session loop hands a status to the orchestrator before it reads the next frame);
        the hub has nothing queued or being sent for any agent (`sending`)."""
        return (
            not any(link.pending_frames for link in self.links)
            and all(map(_drained, self.streams))
            and not self.hub.sending
        )

    async def statuses(self, agent_id: str) -> list[AgentStatus]:
        found = await self.services.storage.list_agent_statuses("default")
        return [s for s in found if s.agent_id == agent_id]


async def next_update(link: AgentLink, within: float = 30.0) -> ConfigUpdate:
    # A bound, not a timing check: a loaded CI machine may take seconds to push.
    with anyio.fail_after(within):
        return await link.updates.receive()


def answer(link: AgentLink, update: ConfigUpdate, phase: str = "applied", **extra: str) -> None:
    link.send_status(
        ConfigStatus(version=update.version, digest=update.digest, phase=phase, **extra)  # type: ignore[arg-type]
    )


def hold_assignment_reads(
    plane: Plane, monkeypatch: pytest.MonkeyPatch
) -> tuple[anyio.Event, anyio.Event]:
    """Make the next ``list_assignments`` (a reconcile pass reads it after taking its
    snapshot of the sessions) wait: the first event is set once a read waits, setting
    the second lets it go on."""
    storage, held, resume = plane.services.storage, anyio.Event(), anyio.Event()
    list_assignments = storage.list_assignments

    async def paused(workspace: str) -> list[Assignment]:
        held.set()
        await resume.wait()
        return await list_assignments(workspace)

    monkeypatch.setattr(storage, "list_assignments", paused)
    return held, resume


@pytest.fixture
def reconcile_interval() -> float:
    return RECONCILE_INTERVAL


def recording_pairs(streams: list[Stream]) -> Callable[[int], tuple[MemoryChannel, MemoryChannel]]:
    """`memory_transport.channel_pair`, remembering each direction's stream in `streams`."""

    def channel_pair(buffer: int = 64) -> tuple[MemoryChannel, MemoryChannel]:
        up, from_agent = anyio.create_memory_object_stream[bytes](buffer)
        down, to_agent = anyio.create_memory_object_stream[bytes](buffer)
        streams[:] = [s for s in streams if s.statistics().open_receive_streams]
        streams.extend((up, down))
        return MemoryChannel(up, to_agent), MemoryChannel(down, from_agent)

    return channel_pair


@pytest.fixture
async def plane(
    plugin_manager: NxMeshPluginManager,
    tmp_path: Path,
    template_state: Path,
    reconcile_interval: float,
) -> AsyncIterator[Plane]:
    shutil.copytree(template_state, tmp_path / "state")
    settings = make_settings(plugin_manager, tmp_path / "state")
    streams: list[Stream] = []
    async with open_services(plugin_manager, settings) as services:
        hub = MasterSessionHub(
            services.enrollment, signing_key=services.signer.verify_key, heartbeat_interval=5
        )
        orchestrator = RolloutOrchestrator(services, reconcile_interval=reconcile_interval)
        orchestrator.attach(hub)
        services.orchestrator = orchestrator
        transport = MemoryTransport()
        # Not the `monkeypatch` fixture: tests undo theirs while the plane runs.
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(memory_transport, "channel_pair", recording_pairs(streams))
            async with anyio.create_task_group() as tg:
                await tg.start(orchestrator.run)
                await tg.start(transport.serve, hub.handler("memory"))
                yield Plane(services, hub, orchestrator, transport, tg, streams)
                tg.cancel_scope.cancel()


class TestPushes:
    async def test_version_reaches_agents_signed_and_statuses_are_recorded(
        self, plane: Plane
    ) -> None:
        """A stored version goes to every connected agent, verifiable with the key pinned
        at enrollment; sent/received/applied are persisted and the rollout completes."""
        a, b = await plane.agent("a", env="prod"), await plane.agent("b", env="prod")
        assert plane.keys["a"] == plane.services.signer.verify_key
        version = await plane.commit("one")
        for link in (a, b):
            update = await next_update(link)
            assert (update.version, update.digest) == (version.number, version.digest)
            pending = update.to_pending()
            assert verify_update(pending, plane.keys["a"], require_signature=True) is None
            tampered = attrs.evolve(pending, author="mallory")
            assert "signature does not match" in (verify_update(tampered, plane.keys["a"]) or "")
            answer(link, update)
        await plane.settle()
        assert a.agent_id is not None
        phases = [s.phase for s in await plane.statuses(a.agent_id)]
        assert phases == ["applied"]  # one record per (agent, version): the latest phase
        agent = await plane.services.storage.get_agent(a.agent_id)
        assert agent is not None
        assert (agent.running_version, agent.running_digest) == (version.number, version.digest)
        metrics = plane.services.metrics
        assert metrics.pushes.labels(outcome="sent")._value.get() == 2
        assert metrics.pushes.labels(outcome="applied")._value.get() == 2
        assert metrics.connected_agents.labels(transport="memory")._value.get() == 2
        samples = metrics.convergence_seconds.collect()[0].samples
        assert next(s for s in samples if s.name.endswith("_count")).value == 1

    async def test_assignments_pin_agents_most_specific_wins(self, plane: Plane) -> None:
        """An assignment pins staging to version 1; prod follows the latest."""
        prod, staging = await plane.agent("p", env="prod"), await plane.agent("s", env="stage")
        first = await plane.commit("one")
        for link in (prod, staging):
            answer(link, await next_update(link))
        await plane.settle()
        await plane.pin("hold-staging", first.number, env="stage")
        second = await plane.commit("two")
        update = await next_update(prod)
        assert update.version == second.number
        await plane.settle()
        assert len(staging.updates) == 0
        # Retargeting the assignment moves staging at once.
        await plane.services.storage.delete_assignment("default", "hold-staging")
        await plane.orchestrator.assignments_changed("default")
        assert (await next_update(staging)).version == second.number

    async def test_an_assignment_back_to_the_running_version_wins_over_a_push_in_flight(
        self, plane: Plane
    ) -> None:
        """Pinned back to the version it runs while a newer one is on its way, the agent
        applies the newer one, then gets the pinned one at once — not at the next
        periodic reconcile (60 s here, beyond `next_update`'s bound)."""
        link = await plane.agent("a", env="stage")
        first = await plane.commit("one")
        answer(link, await next_update(link))
        await plane.settle()
        await plane.commit("two")
        in_flight = await next_update(link)
        await plane.pin("hold", first.number, env="stage")
        await plane.settle()
        assert len(link.updates) == 0  # it runs the pinned version: nothing to send yet
        answer(link, in_flight)
        back = await next_update(link)
        assert (back.version, back.digest) == (first.number, first.digest)

    async def test_reconnect_resends_only_on_mismatch(self, plane: Plane) -> None:
        """An agent reconnecting on the desired version gets nothing; one behind gets it."""
        link = await plane.agent("a")
        version = await plane.commit("one")
        update = await next_update(link)
        answer(link, update)
        await plane.settle()
        assert link.agent_id is not None
        plane.hub.disconnect(link.agent_id)
        with anyio.fail_after(5):
            await link.wait_registered(count=2)
        await plane.settle()
        assert len(link.updates) == 0
        link.set_running(None, None)
        plane.hub.disconnect(link.agent_id)
        with anyio.fail_after(5):
            await link.wait_registered(count=3)
        assert (await next_update(link)).digest == version.digest

    async def test_answer_during_a_reconcile_is_not_pushed_again(
        self, plane: Plane, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A reconcile pass snapshots the sessions, then reads storage; an agent applying
        its version meanwhile must not get it again (the pass's snapshot predates that)."""
        link = await plane.agent("a")
        await plane.commit("one")
        update = await next_update(link)
        await plane.settle()
        held, resume = hold_assignment_reads(plane, monkeypatch)
        await plane.orchestrator.assignments_changed("default")
        with anyio.fail_after(10):  # bounds, not timing checks
            await held.wait()  # the pass took its snapshot: the agent runs nothing yet
            answer(link, update)
            while not plane.delivered():
                await anyio.lowlevel.checkpoint()
        resume.set()
        await plane.settle()
        assert len(link.updates) == 0
        assert plane.services.metrics.pushes.labels(outcome="sent")._value.get() == 1

    async def test_heartbeat_during_a_reconcile_is_not_answered_with_a_push(
        self, plane: Plane, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The same race with a heartbeat: an agent that reports (without a status, as
        after a restart on its cache) that it runs the version while a pass reads
        storage is not sent the version again."""
        link = await plane.agent("a")
        version = await plane.commit("one")
        await next_update(link)  # sent; the agent does not answer
        await plane.settle()
        held, resume = hold_assignment_reads(plane, monkeypatch)
        # Forget the push (as after a master restart) so that only the snapshot decides.
        assert link.agent_id is not None
        plane.orchestrator._inflight.pop(link.agent_id, None)
        await plane.orchestrator.assignments_changed("default")
        with anyio.fail_after(10):  # bounds, not timing checks
            await held.wait()  # the pass took its snapshot: the agent runs nothing yet
            # What `AgentLink` sends every heartbeat interval, sent now. The hub takes the
            # running version from it, then resyncs through the paused storage too.
            link._queue(Heartbeat(running_version=version.number, running_digest=version.digest))
            while plane.hub.running(link.agent_id) != (version.number, version.digest):
                await anyio.lowlevel.checkpoint()
        resume.set()
        await plane.settle()
        assert len(link.updates) == 0
        assert plane.services.metrics.pushes.labels(outcome="sent")._value.get() == 1

    async def test_failure_keeps_nginx_message_and_is_not_resent(self, plane: Plane) -> None:
        """failed + nginx's output are stored (without the bidirectional controls an
        agent may send: they would reorder the text on an admin's terminal); the same
        version is not pushed again."""
        link = await plane.agent("a")
        await plane.commit("one")
        update = await next_update(link)
        answer(link, update, "failed", error="nginx -t failed",
               nginx_output='host not found in upstream "x" \u202eexe.txt')  # fmt: skip
        await plane.settle()
        assert link.agent_id is not None
        [status] = await plane.statuses(link.agent_id)
        assert status.phase == "failed"
        assert status.message == 'nginx -t failed\nhost not found in upstream "x" exe.txt'
        await plane.orchestrator.assignments_changed("default")  # any later reconcile
        await plane.settle()
        assert len(link.updates) == 0

    async def test_health_reports_reach_services_health(self, plane: Plane) -> None:
        link = await plane.agent("a")
        link.send_health(HealthReport(agent_id="whatever", ts=1.0, results=()))
        await plane.settle()
        assert link.agent_id is not None
        assert plane.services.health.get(link.agent_id) is not None

    async def test_revoked_agent_is_disconnected(self, plane: Plane) -> None:
        link = await plane.agent("a")
        assert link.agent_id is not None
        await plane.services.enrollment.revoke_agent(link.agent_id)
        await plane.orchestrator.agent_revoked(link.agent_id)
        assert link.agent_id not in plane.hub.connected  # its stream is being closed

    async def test_going_offline_does_not_undo_a_revocation_elsewhere(
        self, plane: Plane, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The agent's stream closed here while another master revokes it: however the two
        interleave (the revocation lands right before this master's offline write), the
        agent stays revoked — not offline, which would count it as a rollout target that
        never converges."""
        services, storage = plane.services, plane.services.storage
        await storage.upsert_agent(Agent(id="a1", name="edge", status="online", last_seen=100.0))
        revoked: list[bool] = []
        calls: list[str] = []

        async def revoke_elsewhere_once() -> None:
            calls.append("revoke")
            if len(calls) == 1:  # the first storage call; not those of the revocation
                revoked.append(await services.enrollment.revoke_agent("a1"))

        for name in ("get_agent", "set_agent_offline"):  # whichever the bookkeeping uses
            real = getattr(storage, name)

            async def interleaved(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
                await revoke_elsewhere_once()
                return await _real(*args, **kwargs)

            monkeypatch.setattr(storage, name, interleaved)
        info = SessionInfo(agent_id="a1", peer="memory", labels={}, workspace="default",
                           transport="memory", protocol_version=1, key_id="k1",
                           running_version=None, running_digest=None, connected_at=90.0,
                           last_seen=100.0)  # fmt: skip
        plane.orchestrator.on_session(info, connected=False)  # its session closed here
        await plane.orchestrator.wait_written()
        monkeypatch.undo()
        assert revoked == [True]
        agent = await storage.get_agent("a1")
        assert agent is not None
        assert agent.status == "revoked"

    async def test_trace_context_travels_with_the_update(self, plane: Plane, exporter: Any) -> None:
        """The API call's trace context reaches the agent inside the ConfigUpdate."""
        from opentelemetry import trace

        link = await plane.agent("a")
        with trace.get_tracer("test").start_as_current_span("api call") as span:
            await plane.commit("traced")
            trace_id = format(span.get_span_context().trace_id, "032x")
        update = await next_update(link)
        assert update.trace["traceparent"].split("-")[1] == trace_id
        assert update.to_pending().trace == update.trace


class TestMissedEvents:
    """What no event announced still reaches the agents (see also test_bus_outage.py)."""

    @pytest.fixture
    def reconcile_interval(self) -> float:
        return 0.2

    async def test_connected_agents_last_seen_is_stored_by_the_periodic_pass(
        self, plane: Plane
    ) -> None:
        """Frames that write nothing (heartbeats, health) move only the session's
        last_seen; the periodic pass stores it, so an online agent is not listed as seen
        minutes ago."""
        link = await plane.agent("a")
        assert link.agent_id is not None
        await plane.commit("one")
        answer(link, await next_update(link))
        await plane.settle()
        storage = plane.services.storage
        stored = await storage.get_agent(link.agent_id)
        assert stored is not None
        assert stored.last_seen is not None
        while plane.hub.clock() <= stored.last_seen:  # a later frame has a later time
            await anyio.lowlevel.checkpoint()
        link.send_health(HealthReport(agent_id="whatever", ts=1.0, results=()))
        await plane.settle()
        session = plane.hub.session(link.agent_id)
        assert session is not None
        assert session.last_seen > stored.last_seen
        with anyio.fail_after(10):  # a bound, not a timing check: passes run every 0.2 s
            while True:
                stored = await storage.get_agent(link.agent_id)
                assert stored is not None
                if stored.last_seen == session.last_seen:
                    break
                await anyio.sleep(0.05)

    async def test_version_whose_announcement_failed_reaches_local_agents(
        self, plane: Plane, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The bus refuses the version.created event: the commit still succeeds (the
        version is stored) and this master's agents still get the version."""
        link = await plane.agent("a")

        async def bus_down(event: Event) -> None:
            raise StorageError("PostgresEventBus('postgresql://db/x') is not open")

        monkeypatch.setattr(plane.services.bus, "publish", bus_down)
        version = await plane.commit("one")
        update = await next_update(link)
        assert (update.version, update.digest) == (version.number, version.digest)

    async def test_statuses_are_stored_while_their_announcement_fails(
        self, plane: Plane, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The bus refuses ``rollout.status`` events: every status is still stored, the
        outage is logged once as a warning (no traceback per batch), and its end once."""
        from structlog.testing import capture_logs

        link = await plane.agent("a")
        assert link.agent_id is not None
        publish = plane.services.bus.publish
        refused: list[str] = []

        async def status_bus_down(event: Event) -> None:
            if event.kind == "rollout.status":
                refused.append(event.payload["phase"])
                raise StorageError("PostgresEventBus('postgresql://db/x') is not open")
            await publish(event)

        monkeypatch.setattr(plane.services.bus, "publish", status_bus_down)
        with capture_logs() as logs:
            first = await plane.commit("one")
            answer(link, await next_update(link))
            await plane.settle()
            assert len(refused) >= 2  # sent, then the agent's answers: several batches
            assert [s.phase for s in await plane.statuses(link.agent_id)] == ["applied"]
            monkeypatch.setattr(plane.services.bus, "publish", publish)
            second = await plane.commit("two")
            answer(link, await next_update(link))
            await plane.settle()
        assert second.number == first.number + 1
        statuses = {s.version: s.phase for s in await plane.statuses(link.agent_id)}
        assert statuses == {first.number: "applied", second.number: "applied"}
        said = [(e["log_level"], e["event"]) for e in logs if "announce" in e["event"]]
        assert said == [
            ("warning", "rollout statuses stored but not announced: the event bus refused them"),
            ("info", "rollout statuses announced on the event bus again"),
        ]
        assert not [e for e in logs if e["event"] == "rollout bookkeeping failed"]

    async def test_periodic_reconcile_pushes_an_unannounced_version(self, plane: Plane) -> None:
        """A version stored without any announcement (as when its event was missed during
        a bus outage) reaches the connected agents on the next full reconcile."""
        link = await plane.agent("a")
        services = plane.services
        version = new_version(make_state(1, port=18123), previous=None, author="elsewhere",
                              message="m", signer=services.signer)  # fmt: skip
        await services.storage.add_version(version)
        update = await next_update(link)
        assert (update.version, update.digest) == (version.number, version.digest)

    async def test_full_reconcile_disconnects_an_agent_revoked_elsewhere(
        self, plane: Plane, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Revoked through another master whose ``agent.revoked`` event was missed: the
        next full reconcile reads the revocation from storage and closes the stream."""
        link = await plane.agent("a")
        assert link.agent_id is not None
        closed = anyio.Event()
        disconnect = plane.hub.disconnect

        def observed(agent_id: str) -> bool:
            found = disconnect(agent_id)
            if agent_id == link.agent_id:
                closed.set()
            return found

        monkeypatch.setattr(plane.hub, "disconnect", observed)
        await plane.services.enrollment.revoke_agent(link.agent_id)  # no event, no hub call
        with anyio.fail_after(10):  # a bound: the periodic reconcile comes every 0.2 s
            await closed.wait()
        assert link.agent_id not in plane.hub.connected


@pytest.fixture(scope="module")
def exporter() -> Any:
    """Spans recorded in memory (the global tracer provider can only be set once)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


class TestRolloutApi:
    def test_rollout_view_per_agent(self, master: Master, admin: dict[str, str]) -> None:
        """GET .../versions/N/rollout: targeted agents, phase, nginx's message, converged."""
        from nxmesh.core.model import Agent
        from nxmesh.core.serialization import unstructure

        state: DesiredState = make_state(1, port=18081)
        response = master.client.put(
            "/api/v1/workspaces/default/state", json=unstructure(state), headers=admin
        )
        assert response.status_code == 200, response.text
        version = response.json()["version"]
        storage = master.services.storage
        done = Agent(
            id="done1",
            name="done1",
            status="online",
            running_version=version["number"],
            running_digest=version["digest"],
        )
        broken = Agent(id="broken1", name="broken1", status="online")
        for agent in (done, broken):
            master.call(storage.upsert_agent, agent)
        master.call(
            storage.set_agent_status,
            AgentStatus(agent_id="broken1", version=version["number"], digest=version["digest"],
                        phase="failed", message="nginx -t failed: host not found"),
        )  # fmt: skip
        view = master.client.get(
            f"/api/v1/workspaces/default/versions/{version['number']}/rollout", headers=admin
        ).json()
        assert view["converged"] is False
        assert view["failed"] is True
        reasons = {a["agent_id"]: a["reason"] for a in view["agents"]}
        assert reasons == {"done1": "current", "broken1": "failed"}
        [failed] = [a for a in view["agents"] if a["agent_id"] == "broken1"]
        assert "host not found" in failed["status"]["message"]
        missing = master.client.get("/api/v1/workspaces/default/versions/99/rollout",
                                    headers=admin)  # fmt: skip
        assert missing.status_code == 404


class TestCertificates:
    @pytest.mark.parametrize("user", ["site", "stream"])
    async def test_material_travels_sealed_and_follows_a_replaced_certificate(
        self, plane: Plane, user: str
    ) -> None:
        """A TLS site's (or TCP stream's) certificate reaches the agent with the version,
        its key sealed for that agent; replacing the certificate re-sends the same
        version with the new one."""
        from nxmesh.certs.validate import validate_certificate
        from nxmesh.core.events import Event
        from nxmesh.core.model import (
            CertificateRef,
            Listener,
            Location,
            Return,
            Site,
            Stream,
            StreamTLS,
            TLSConfig,
            Upstream,
            UpstreamServer,
        )

        from .certs import issue

        storage = plane.services.storage

        async def upload() -> str:
            leaf = issue("www.example.test", dns=("www.example.test",))
            check = validate_certificate(leaf.cert_pem, leaf.key_pem)
            await storage.put_certificate(check.stored("default", "web"))
            return leaf.key_pem

        first_key = await upload()
        link = await plane.agent("a")
        state = DesiredState(
            certificates=(CertificateRef(name="web", domains=("www.example.test",)),),
            sites=(
                Site(
                    name="web",
                    server_names=("www.example.test",),
                    listeners=(Listener(port=8443, tls=True),),
                    tls=TLSConfig(certificate="web"),
                    locations=(Location(path="/", return_=Return(code=200, body="tls")),),
                ),
            ),
        )
        if user == "stream":
            state = attrs.evolve(
                state,
                sites=(),
                upstreams=(Upstream("db", (UpstreamServer("127.0.0.1:5432"),)),),
                streams=(
                    Stream(name="pg", port=6432, upstream="db", tls=StreamTLS(certificate="web")),
                ),
            )
        await plane.services.changes.commit(
            "default", lambda _old: state, author="t", message="tls"
        )
        update = await next_update(link)
        [cert] = update.certificates
        assert (cert.name, cert.stem, cert.key_pem) == ("web", "certs/web", first_key)
        # On the wire the key was sealed: the hub's frame for this agent never holds it.
        version = await storage.latest_version("default")
        assert version is not None
        material = await plane.orchestrator.material_for(version)
        assert material is not None
        assert link.agent_id is not None
        # The encoded body is exactly what travels for this agent.
        session = plane.hub._sessions[link.agent_id]
        body = plane.hub._agent_body(session, version, None, material)
        assert first_key.encode() not in body.data
        assert b"BEGIN PRIVATE KEY" not in body.data
        answer(link, update)
        await plane.settle()
        second_key = await upload()
        await plane.services.bus.publish(
            Event("certificate.updated", payload={"name": "web"}, workspace="default")
        )
        again = await next_update(link)
        assert (again.version, again.digest) == (update.version, update.digest)
        assert again.certificates[0].key_pem == second_key

    async def test_http01_tokens_reach_the_agents_serving_the_domain(self, plane: Plane) -> None:
        """The solver's publish callback re-sends the version with the tokens to the agents
        serving the domain, and returns once they applied it."""
        from nxmesh.certs.acme_client import PendingChallenge
        from nxmesh.certs.distribution import CertificateDistributor
        from nxmesh.certs.http01 import ChallengeBoard, Http01Solver
        from nxmesh.core.model import Listener, Location, Return, Site

        board = ChallengeBoard()
        plane.orchestrator.distributor = CertificateDistributor(plane.services.storage, board=board)
        web, other = await plane.agent("web"), await plane.agent("other")
        state = DesiredState(
            sites=(
                Site(
                    name="shop",
                    server_names=("shop.example.test",),
                    listeners=(Listener(port=8080),),
                    locations=(Location(path="/", return_=Return(code=200, body="shop")),),
                ),
            )
        )
        await plane.services.changes.commit("default", lambda _o: state, author="t", message="x")
        for link in (web, other):
            answer(link, await next_update(link))
        await plane.settle()
        token, thumbprint = "A" * 43, "B" * 43
        challenge = PendingChallenge(
            domain="shop.example.test", type="http-01", token=token,
            key_authorization=f"{token}.{thumbprint}",
        )  # fmt: skip
        solver = Http01Solver(board, plane.orchestrator.publish_challenges)
        async with anyio.create_task_group() as tg:
            tg.start_soon(solver.present, [challenge])
            for link in (web, other):
                update = await next_update(link)
                assert dict(update.challenges) == {token: f"{token}.{thumbprint}"}
                answer(link, update)
        # present() returned: both agents confirmed the tokens. Cleanup withdraws them.
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(solver.cleanup, [challenge])
                for link in (web, other):
                    update = await next_update(link)
                    assert dict(update.challenges) == {}
                    answer(link, update)
