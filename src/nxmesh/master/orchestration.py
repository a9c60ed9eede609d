"""Rollout orchestration: which connected agent gets which version, and how it went.

`RolloutOrchestrator` is the master's `nxmesh.master.app.Orchestrator`. Each master
process runs one, beside its `nxmesh.session_hub.MasterSessionHub`:

* **What to push.** Storing a version, changing an assignment or an agent's labels marks
  the workspace *dirty* — directly from the API of this process (`version_created`...)
  and through the event bus from every other master process (``version.created``,
  ``assignment.*``, ``agent.updated``, ``agent.revoked``). A reconcile loop then goes
  over the agents connected **to this process** in that workspace: the assignment whose
  selector matches (most specific wins) names the version, unmatched agents follow the
  latest (`nxmesh.master.selection`); an agent not already running that version and
  digest, and not already sent it (nor refused it: a failed version is not pushed again
  until another one is due, or the agent reconnects), gets it
  (`MasterSessionHub.offer`; the body is encoded once per version). An agent that still
  runs its desired version while another is on its way to it (an assignment moved back
  during a push) is reconciled again as soon as it reports how that push ended.
* **Full reconciles.** Events can be missed: a bus outage (the subscription is renewed
  until it works again, `nxmesh.master.bus_follow.follow_bus`), a version whose announcement
  failed. After every resubscription and every `reconcile_interval` seconds (60), every
  workspace with a connected agent is reconciled, after refreshing its sessions from
  storage (labels changed, agents revoked through another master); each periodic pass
  also stores when every connected agent was last heard from (`last_seen`).
* **Reconnects.** The hub asks `desired_for` when an agent registers or its heartbeat
  reports another running version; it resends only on mismatch (version or digest).
* **Status.** Every step is persisted with ``set_agent_status`` — ``sent`` when the
  version went out on the stream, then what the agent reports: ``received``,
  ``applying``, ``applied`` / ``noop`` / ``failed`` (with nginx's message) /
  ``rolled_back`` / ``vetoed`` — and announced as ``rollout.status`` events. An applied
  version also updates the agent's ``running_version``/``running_digest``. Sessions
  opening and closing set the agent ``online``/``offline``. Writes go through one
  writer task in order, so the session loops never wait for storage.
* **Done.** A rollout is complete when every targeted agent (not revoked, desired
  version = this one, online or not) reports the version's digest: the orchestrator
  then observes ``nxmesh_master_convergence_seconds`` (from the version's creation) and
  publishes ``rollout.completed``.
* **Restarts lose nothing**: versions, assignments and statuses are in storage; agents
  reconnect with what they run and get what they miss.
* **Tracing**: the trace context of the API call that stored a version (or of the
  ``version.created`` event from another master) goes into the `ConfigUpdate`, so each
  agent's apply joins that trace.
* **Certificates**: a version whose sites use TLS carries the agent's certificate
  material (`nxmesh.certs.CertificateDistributor.material_for_state`: only the
  certificates its sites use, a placeholder for an ACME certificate not issued yet, and
  the pending HTTP-01 tokens of its domains), keys sealed per agent by the hub. When a
  certificate changes (``cert.renewed`` from the renewal scheduler, ``certificate.updated``
  from an upload) the agents whose sites use it get their version again with the new
  material — no new version is needed.

Metrics: ``nxmesh_master_connected_agents{transport}``, ``nxmesh_master_pushes_total
{outcome}`` (``sent`` and every final outcome), ``nxmesh_master_convergence_seconds``.
Health reports go into ``services.health``.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Final

import anyio
import anyio.abc
import anyio.lowlevel
import attrs
import structlog
from prometheus_client import Counter

from nxmesh.core import validation
from nxmesh.core.events import Event
from nxmesh.core.model import (
    Agent,
    ConfigVersion,
    DesiredState,
    FrozenMap,
    HealthReport,
    TlsCertificate,
)
from nxmesh.core.protocol import ConfigStatus, Message
from nxmesh.core.records import AgentStatus, NotFoundError
from nxmesh.master.bus_follow import follow_bus
from nxmesh.master.selection import desired_version
from nxmesh.master.tracing import inject_context
from nxmesh.session_hub import UpdateMaterial

if TYPE_CHECKING:
    from nxmesh.certs.distribution import CertificateDistributor
    from nxmesh.master.app import MasterServices
    from nxmesh.session_hub import MasterSessionHub, SessionInfo

__all__ = ["RECONCILE_INTERVAL", "RolloutOrchestrator"]

log = structlog.get_logger("nxmesh.master.rollout")

_TRACES: Final = 256
_CONVERGED: Final = 1024
_MATERIALS: Final = 64
_CERT_EVENTS: Final = ("cert.renewed", "certificate.updated")
_FLUSH_TIMEOUT: Final = 5.0

RECONCILE_INTERVAL: Final = 60.0
"""Default seconds between two full reconciles (see `RolloutOrchestrator.mark_all`)."""

_BATCH: Final = 500
"""At most this many queued writes go to storage together."""


@attrs.frozen
class _StatusWrite:
    status: AgentStatus
    workspace: str | None


@attrs.frozen
class _RunningWrite:
    agent_id: str
    version: int
    digest: str
    ts: float


@attrs.frozen
class _ConvergedCheck:
    workspace: str
    number: int


Write = Callable[[], Awaitable[None]] | _StatusWrite | _RunningWrite | _ConvergedCheck
"""A queued storage write: the three frequent kinds are data, batched; others a call."""


class RolloutOrchestrator:
    """Pushes versions to this process's agents and records how each rollout goes."""

    def __init__(
        self,
        services: MasterServices,
        *,
        clock: Callable[[], float] = time.time,
        reconcile_interval: float = RECONCILE_INTERVAL,
    ) -> None:
        self.services = services
        self.storage = services.storage
        self.metrics = services.metrics
        self.clock = clock
        self.reconcile_interval = reconcile_interval
        """Seconds between full reconciles (`mark_all`); events make most of them moot."""
        self.hub: MasterSessionHub | None = None
        self._dirty: set[str] = set()
        self._stale: set[str] = set()
        """Workspaces whose sessions are refreshed from storage before their next reconcile."""
        self._wake = anyio.Event()
        self._writes: deque[Write] = deque()
        self._write_wake = anyio.Event()
        self._idle = anyio.Event()
        self._idle.set()
        self._inflight: dict[str, tuple[int, str]] = {}
        self._failed: dict[str, tuple[int, str]] = {}
        """Per agent: the version it refused last (not pushed again until another one)."""
        self._superseded: set[str] = set()
        """Agents applying a version no longer desired while they still run the desired
        one: reconciled again once that push ends, not at the next periodic pass."""
        self._reconciling = False
        self._announce_failing = False  # the bus refused the last announcement
        self._traces: OrderedDict[tuple[str, int], dict[str, str]] = OrderedDict()
        self._converged: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._materials: OrderedDict[tuple[str, int, str], UpdateMaterial | None] = OrderedDict()
        self._cert_changes: dict[str, set[str]] = {}
        self._distributor: CertificateDistributor | None = None
        self._push_counters: dict[str, Counter] = {}
        self._session_agents: dict[str, Agent] = {}
        """Per connected agent, the `Agent` its session describes (built once, validated)."""

    def attach(self, hub: MasterSessionHub) -> None:
        """Drive `hub`: become its assignment source and observer."""
        self.hub = hub
        hub.assignments = self
        hub.on_message = self.on_message
        hub.on_session = self.on_session
        hub.on_sent = self.on_sent
        hub.material_for = self.material_for

    # -- Orchestrator (called by this process's API) ---------------------------------------

    async def version_created(self, version: ConfigVersion) -> None:
        trace = inject_context()
        if trace:
            self._remember_trace(version.workspace, version.number, trace)
        self.mark(version.workspace)

    async def assignments_changed(self, workspace: str) -> None:
        self.mark(workspace)

    async def agent_changed(self, agent: Agent) -> None:
        if self.hub is not None:
            self.hub.update_agent(agent)
        self.mark(agent.workspace)

    async def agent_revoked(self, agent_id: str) -> None:
        self._inflight.pop(agent_id, None)
        self._superseded.discard(agent_id)
        if self.hub is not None and self.hub.disconnect(agent_id):
            log.warning("revoked agent disconnected", agent_id=agent_id)

    # -- AssignmentSource (the hub asks on register and on a changed running version) ------

    async def desired_for(self, agent: Agent) -> ConfigVersion | None:
        """The version `agent` should run; the hub sends it when the agent runs another."""
        latest = await self.storage.latest_version(agent.workspace)
        assignments = await self.storage.list_assignments(agent.workspace)
        desired = desired_version(agent, assignments, latest.number if latest else None)
        if desired.version is None:
            return None
        if latest is not None and desired.version == latest.number:
            return latest
        return await self.storage.get_version(agent.workspace, desired.version)

    # -- certificate material --------------------------------------------------------------

    @property
    def distributor(self) -> CertificateDistributor:
        if self._distributor is None:
            from nxmesh.certs.distribution import CertificateDistributor

            self._distributor = CertificateDistributor(self.storage)
        return self._distributor

    @distributor.setter
    def distributor(self, value: CertificateDistributor) -> None:
        self._distributor = value
        self._materials.clear()

    async def material_for(self, version: ConfigVersion) -> UpdateMaterial | None:
        """The certificate material of `version`'s state (None when its sites use no TLS
        and no HTTP-01 token is pending)."""
        board = self._distributor.board if self._distributor is not None else None
        if not board and not _uses_tls(version.state):
            return None
        key = (version.workspace, version.number, version.digest)
        if key in self._materials:
            return self._materials[key]
        try:
            material = await self.distributor.material_for_state(version.state)
        except Exception:  # a missing upload, a name clash: the agent's nginx -t will say
            log.exception("no certificate material", workspace=version.workspace,
                          version=version.number)  # fmt: skip
            return None
        found = UpdateMaterial(
            certificates=tuple(
                # Same fields on both sides of the wire: copy them all, not one by one.
                TlsCertificate(**attrs.asdict(c, recurse=False))
                for c in material.certificates
            ),
            challenges=FrozenMap(material.challenges),
        )
        self._materials[key] = found
        while len(self._materials) > _MATERIALS:
            self._materials.popitem(last=False)
        return found

    async def publish_challenges(
        self, domains: frozenset[str], *, confirm_within: float = 120.0
    ) -> None:
        """Send the connected agents serving one of `domains` their version again with the
        challenge board's current HTTP-01 tokens; return once they applied it (or after
        `confirm_within` seconds). The ``Http01Solver``'s publish callback."""
        hub = self.hub
        if hub is None or not domains:
            return
        self._materials.clear()
        targets: list[tuple[str, ConfigVersion, UpdateMaterial | None]] = []
        for info in hub.sessions():
            version = await self.desired_for(_agent_of(info))
            if version is None:
                continue
            served = {name for site in version.state.sites for name in site.server_names}
            if served & domains:
                targets.append((info.agent_id, version, await self.material_for(version)))
        waits = []
        for number in {version.number for _, version, _ in targets}:
            ids = [agent_id for agent_id, version, _ in targets if version.number == number]
            waits.append(hub.expect_status(number, ids))
        for agent_id, version, material in targets:
            hub.offer(agent_id, version, material=material)
        log.info("http-01 tokens rolled out", domains=sorted(domains), agents=len(targets))
        with anyio.move_on_after(confirm_within) as scope:
            for wait in waits:
                await wait()
        if scope.cancelled_caught:
            log.warning("agents did not confirm the http-01 tokens in time",
                        domains=sorted(domains), seconds=confirm_within)  # fmt: skip

    def certificates_changed(self, workspace: str, names: set[str] | None = None) -> None:
        """Certificates of `workspace` changed (all of them when `names` is None): the
        agents whose sites use them get their version again with the new material."""
        for key in [k for k in self._materials if k[0] == workspace]:
            del self._materials[key]
        pending = self._cert_changes.setdefault(workspace, set())
        pending.update(names if names is not None else {"*"})
        self.mark(workspace)

    # -- reconciling -----------------------------------------------------------------------

    def mark(self, workspace: str) -> None:
        """Reconcile `workspace` soon (coalesced: a burst of changes costs one pass)."""
        self._dirty.add(workspace)
        self._wake.set()

    def mark_all(self) -> None:
        """Reconcile every workspace with an agent connected to this process soon (a full
        reconcile: after events may have been missed, and periodically)."""
        if self.hub is None:
            return
        # A missed cert.renewed must not keep serving the old material to later pushes and
        # reconnects (rebuilt on demand: one read per version).
        self._materials.clear()
        for workspace in {info.workspace for info in self.hub.sessions()}:
            self._stale.add(workspace)
            self.mark(workspace)

    async def _refresh_sessions(self, workspace: str) -> None:
        """Bring the sessions of `workspace` up to date with storage: what ``agent.updated``
        and ``agent.revoked`` events from other masters would have done, had they come."""
        hub = self.hub
        sessions = hub.sessions(workspace) if hub is not None else []
        if hub is None or not sessions:
            return
        stored = {a.id: a for a in await self.storage.list_agents(workspace)}
        for info in sessions:
            agent = stored.get(info.agent_id)
            if agent is None:
                continue
            if agent.status == "revoked":
                self._inflight.pop(info.agent_id, None)
                self._superseded.discard(info.agent_id)
                if hub.disconnect(info.agent_id):
                    log.warning("revoked agent disconnected", agent_id=info.agent_id)
            elif dict(agent.labels) != dict(info.labels):
                hub.update_agent(agent)

    async def reconcile(self, workspace: str, *, certificates: set[str] | None = None) -> list[str]:
        """Offer each connected agent of `workspace` its desired version when it runs
        another and was not sent it yet — or, when its sites use one of `certificates`
        (``"*"``: any), again with the new material; returns the agents offered one."""
        hub = self.hub
        if hub is None:
            return []
        sessions = hub.sessions(workspace)
        if not sessions:
            return []
        latest = await self.storage.latest_version(workspace)
        if latest is None:
            return []
        assignments = await self.storage.list_assignments(workspace)
        versions: dict[int, ConfigVersion | None] = {latest.number: latest}
        uses: dict[int, bool] = {}
        offered: list[str] = []
        for info in sessions:
            # Without assignments every agent follows the latest: no Agent to build.
            number = (
                desired_version(self._session_agent(info), assignments, latest.number).version
                if assignments
                else latest.number
            )
            if number is None:
                continue
            if number not in versions:
                versions[number] = await self.storage.get_version(workspace, number)
            version = versions[number]
            if version is None:
                continue
            target = (version.number, version.digest)
            if certificates and version.number not in uses:
                uses[version.number] = _uses_certificates(version.state, certificates)
            recert = uses.get(version.number, False)
            running = (info.running_version, info.running_digest)
            if not self._due(info.agent_id, running, target, recert):
                # An assignment moved back to what the agent runs while another version
                # is on its way: once that one applied, the agent must be moved back.
                if self._inflight.get(info.agent_id, target) != target:
                    self._superseded.add(info.agent_id)
                continue
            trace = self._traces.get((workspace, version.number))
            material = await self.material_for(version)
            # `sessions` was taken before this pass awaited storage; an agent may have
            # reported meanwhile (a status, a heartbeat) that it runs `target` now, and
            # would get it again (seen in trio runs of tests/master/test_orchestration.py).
            live = hub.running(info.agent_id)
            if live is None or not self._due(info.agent_id, live, target, recert):
                continue
            if hub.offer(info.agent_id, version, trace=trace, material=material):
                self._inflight[info.agent_id] = target
                offered.append(info.agent_id)
        if offered:
            log.info("rollout", workspace=workspace, version=latest.number, agents=len(offered))
        return offered

    def _due(
        self,
        agent_id: str,
        running: tuple[int | None, str | None],
        target: tuple[int, str],
        recert: bool,
    ) -> bool:
        """Whether to offer `target` (version, digest) to the agent: it runs another
        (`running`), was not sent it yet and did not refuse it — or its certificates
        changed."""
        if recert:
            return True
        return running != target and target not in (
            self._inflight.get(agent_id),
            self._failed.get(agent_id),
        )

    def _session_agent(self, info: SessionInfo) -> Agent:
        agent = self._session_agents.get(info.agent_id)
        if agent is None or agent.workspace != info.workspace or agent.labels != info.labels:
            agent = self._session_agents[info.agent_id] = _agent_of(info)
        return agent

    # -- hub observers ---------------------------------------------------------------------

    def on_session(self, info: SessionInfo, connected: bool) -> None:
        gauge = self.metrics.connected_agents.labels(transport=info.transport or "unknown")
        if connected:
            gauge.inc()
            return
        gauge.dec()
        self._inflight.pop(info.agent_id, None)
        self._superseded.discard(info.agent_id)
        self._session_agents.pop(info.agent_id, None)
        self._write(lambda: self._set_offline(info))

    def _pushed(self, outcome: str) -> None:
        # `labels()` costs more than the increment (validation, a lock): done once each.
        counter = self._push_counters.get(outcome)
        if counter is None:
            counter = self._push_counters[outcome] = self.metrics.pushes.labels(outcome=outcome)
        counter.inc()

    def on_sent(self, agent_id: str, version: ConfigVersion) -> None:
        self._pushed("sent")
        self._inflight[agent_id] = (version.number, version.digest)
        status = AgentStatus(
            agent_id=agent_id,
            version=version.number,
            digest=version.digest,
            phase="sent",
            ts=self.clock(),
        )
        self._write(_StatusWrite(status, version.workspace))

    async def on_message(self, agent_id: str, message: Message) -> None:
        """What an agent sent (statuses, health): queued for the writer, never blocking."""
        if isinstance(message, ConfigStatus):
            self._on_status(agent_id, message)
        elif isinstance(message, HealthReport):
            report = message
            if report.agent_id != agent_id:
                report = attrs.evolve(report, agent_id=agent_id)
            self.services.health.update(report)

    def _on_status(self, agent_id: str, status: ConfigStatus) -> None:
        if status.final:
            if self._inflight.get(agent_id, (status.version, status.digest))[0] == status.version:
                self._inflight.pop(agent_id, None)
            if agent_id in self._superseded and agent_id not in self._inflight:
                self._superseded.discard(agent_id)
                if (workspace := self._workspace_of(agent_id)) is not None:
                    self.mark(workspace)
            if status.phase in ("applied", "noop"):
                self._failed.pop(agent_id, None)
            else:
                self._failed[agent_id] = (status.version, status.digest)
            self._pushed(status.phase)
        message = status.error
        if status.nginx_output and status.nginx_output not in message:
            message = f"{message}\n{status.nginx_output}" if message else status.nginx_output
        # An agent's text is shown to admins: cleaned here too, not only by honest agents.
        message = validation.printable(message)
        record = AgentStatus(
            agent_id=agent_id,
            version=status.version,
            digest=status.digest,
            phase=status.phase,
            message=message[:4000],
            ts=self.clock(),
        )
        workspace = self._workspace_of(agent_id)
        self._write(_StatusWrite(record, workspace))
        if status.phase in ("applied", "noop"):
            self._write(_RunningWrite(agent_id, status.version, status.digest, self.clock()))
            if workspace is not None:
                self._write(_ConvergedCheck(workspace, status.version))
        if status.phase in ("failed", "rolled_back", "vetoed"):
            log.warning(
                "rollout step failed on an agent",
                agent_id=agent_id,
                version=status.version,
                phase=status.phase,
                error=status.error,
            )

    def _workspace_of(self, agent_id: str) -> str | None:
        info = self.hub.session(agent_id) if self.hub is not None else None
        return info.workspace if info is not None else None

    # -- storage writes (one writer, in order) ---------------------------------------------

    def _write(self, op: Write) -> None:
        self._writes.append(op)
        self._idle = anyio.Event() if self._idle.is_set() else self._idle
        self._write_wake.set()

    async def wait_written(self) -> None:
        """Return once every queued write is done (tests)."""
        await self._idle.wait()

    @property
    def idle(self) -> bool:
        """Nothing to reconcile or write, and no reconcile or write under way (tests: with
        the hub's queues and the agents' streams, that nothing more is about to happen)."""
        return not self._dirty and not self._reconciling and self._idle.is_set()

    async def _record(self, writes: list[_StatusWrite]) -> None:
        """Store statuses (one transaction on the SQL backends), then announce each."""
        bulk = getattr(self.storage, "set_agent_statuses", None)
        if bulk is not None:
            kept = {s.agent_id for s in await bulk([w.status for w in writes])}
            writes = [w for w in writes if w.status.agent_id in kept]
        else:  # another backend: one by one
            stored = []
            for w in writes:
                try:
                    await self.storage.set_agent_status(w.status)
                except NotFoundError:
                    continue  # deleted meanwhile
                stored.append(w)
            writes = stored
        for w in writes:
            if w.workspace is None:
                continue
            # Subscribers take one event per turn of the loop: a batch published in one go
            # would overflow their buffers (the memory bus drops one 1,024 behind).
            await anyio.lowlevel.checkpoint()
            status = w.status
            payload = {
                "agent_id": status.agent_id,
                "version": status.version,
                "digest": status.digest,
                "phase": status.phase,
                "message": status.message,
            }
            try:
                await self.services.publish("rollout.status", payload, workspace=w.workspace)
            except Exception as exc:
                # The statuses are stored; only their announcement is lost. Said once per
                # outage (not a traceback per batch), and the rest of this batch is not
                # tried: each attempt could wait out the bus's connect timeout.
                if not self._announce_failing:
                    self._announce_failing = True
                    log.warning("rollout statuses stored but not announced: the event bus "
                                "refused them", error=str(exc) or type(exc).__name__)  # fmt: skip
                return
            if self._announce_failing:
                self._announce_failing = False
                log.info("rollout statuses announced on the event bus again")

    async def _set_running(self, writes: list[_RunningWrite]) -> None:
        bulk = getattr(self.storage, "set_running_versions", None)
        if bulk is not None:
            await bulk([(w.agent_id, w.version, w.digest, w.ts) for w in writes])
            return
        for w in writes:
            agent = await self.storage.get_agent(w.agent_id)
            if agent is None:
                continue
            await self.storage.upsert_agent(
                attrs.evolve(
                    agent, running_version=w.version, running_digest=w.digest, last_seen=w.ts
                )
            )

    async def _set_offline(self, info: SessionInfo) -> None:
        if self.hub is not None and self.hub.session(info.agent_id) is not None:
            return  # it reconnected meanwhile
        # One conditional write, not read-modify-write: a revocation (or a reconnect to
        # another master process, which moves last_seen on) in between is kept.
        await self.storage.set_agent_offline(
            info.agent_id,
            last_seen=info.last_seen,
            running_version=info.running_version,
            running_digest=info.running_digest,
            unless_seen_after=info.last_seen + 1.0,
        )

    async def _check_converged(self, workspace: str, number: int) -> None:
        """Observe the convergence time once every targeted agent runs version `number`."""
        key = (workspace, number)
        if key in self._converged:
            return
        latest = await self.storage.latest_version(workspace)
        if latest is None:
            return
        version = latest if latest.number == number else None
        if version is None:
            version = await self.storage.get_version(workspace, number)
            if version is None:
                return
        assignments = await self.storage.list_assignments(workspace)
        targeted = [
            a
            for a in await self.storage.list_agents(workspace)
            if a.status != "revoked"
            and desired_version(a, assignments, latest.number).version == number
        ]
        if not targeted or any(
            (a.running_version, a.running_digest) != (number, version.digest) for a in targeted
        ):
            return
        self._converged[key] = None
        while len(self._converged) > _CONVERGED:
            self._converged.popitem(last=False)
        seconds = max(0.0, self.clock() - version.created_at)
        self.metrics.convergence_seconds.observe(seconds)
        log.info(
            "rollout complete",
            workspace=workspace,
            version=number,
            agents=len(targeted),
            seconds=round(seconds, 3),
        )
        await self.services.publish(
            "rollout.completed",
            {
                "version": number,
                "digest": version.digest,
                "agents": len(targeted),
                "seconds": seconds,
            },
            workspace=workspace,
        )

    # -- running ---------------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Reconcile, write and follow the event bus until cancelled."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._writer)
            await tg.start(self._follow_bus)
            tg.start_soon(self._reconciler)
            tg.start_soon(self._reconcile_periodically)
            task_status.started()

    async def _reconciler(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            self._reconciling = True  # for `idle`: a workspace popped is still in the works
            while self._dirty:
                workspace = self._dirty.pop()
                certificates = self._cert_changes.pop(workspace, None)
                try:
                    if workspace in self._stale:
                        self._stale.discard(workspace)
                        await self._refresh_sessions(workspace)
                    await self.reconcile(workspace, certificates=certificates)
                except Exception:  # storage hiccup: try again on the next change
                    log.exception("reconcile failed", workspace=workspace)
            self._reconciling = False

    async def _writer(self) -> None:
        try:
            while True:
                await self._drain()
                self._idle.set()
                await self._write_wake.wait()
                self._write_wake = anyio.Event()
        finally:
            # Shutting down: what the agents reported is still worth keeping (bounded).
            with anyio.move_on_after(_FLUSH_TIMEOUT, shield=True):
                await self._drain()

    async def _drain(self) -> None:
        """Apply the queued writes. Statuses, running versions and convergence checks
        queued together go to storage in one transaction each (a rollout to 1,000 agents
        queues ~4,000 of them: one transaction and thread hop apiece kept the event loop
        and the database busy); any other write runs in its place in the queue, after
        what was gathered before it."""
        while self._writes:
            statuses: list[_StatusWrite] = []
            running: list[_RunningWrite] = []
            checks: dict[_ConvergedCheck, None] = {}
            call: Callable[[], Awaitable[None]] | None = None
            while self._writes and len(statuses) + len(running) < _BATCH:
                op = self._writes.popleft()
                if isinstance(op, _StatusWrite):
                    statuses.append(op)
                elif isinstance(op, _RunningWrite):
                    running.append(op)
                elif isinstance(op, _ConvergedCheck):
                    checks[op] = None
                else:
                    call = op
                    break
            # Running versions before the checks that read them.
            if statuses:
                await self._guarded(self._record(statuses))
            if running:
                await self._guarded(self._set_running(running))
            for check in checks:
                await self._guarded(self._check_converged(check.workspace, check.number))
            if call is not None:
                await self._guarded(call())

    @staticmethod
    async def _guarded(write: Awaitable[None]) -> None:
        try:
            await write
        except Exception:  # one failed write must not stop the others
            log.exception("rollout bookkeeping failed")

    async def _follow_bus(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Changes made through other master processes (and this one: harmless twice).

        A bus outage does not end it (`nxmesh.master.bus_follow.follow_bus` subscribes again);
        events published meanwhile are lost, so every resubscription is followed by a
        full reconcile."""
        await follow_bus(
            self.services.bus,
            self._on_event,
            subscriber="rollout orchestrator",
            resubscribed=self.mark_all,
            task_status=task_status,
        )

    async def _reconcile_periodically(self) -> None:
        """A full reconcile every `reconcile_interval` seconds: whatever no event announced
        (a version whose announcement failed, one missed before a resubscription) still
        reaches the agents."""
        while True:
            await anyio.sleep(self.reconcile_interval)
            self.mark_all()
            self._record_last_seen()

    def _record_last_seen(self) -> None:
        """Store when each connected agent was last heard from: its heartbeats reach only
        its session, and without this `agents` shows an online agent as seen minutes
        ago. One batched write per pass (with the running version it reported)."""
        if self.hub is None:
            return
        for agent_id in self.hub.connected:
            info = self.hub.session(agent_id)
            if info is None or info.running_version is None or info.running_digest is None:
                continue  # nothing applied yet: a write would need a version to store
            self._write(
                _RunningWrite(agent_id, info.running_version, info.running_digest, info.last_seen)
            )

    def _on_event(self, event: Event) -> None:
        kind = event.kind
        if kind == "version.created":
            trace = event.payload.get("trace")
            number = event.payload.get("number")
            if isinstance(trace, Mapping) and isinstance(number, int) and trace:
                self._remember_trace(
                    event.workspace, number, {str(k): str(v) for k, v in trace.items()}
                )
            self.mark(event.workspace)
        elif kind.startswith("assignment."):
            self.mark(event.workspace)
        elif kind == "agent.updated":
            agent_id = event.payload.get("agent_id")
            labels = event.payload.get("labels")
            if self.hub is not None and isinstance(agent_id, str) and isinstance(labels, Mapping):
                info = self.hub.session(agent_id)
                if info is not None:
                    self.hub.update_agent(attrs.evolve(_agent_of(info), labels=labels))
            self.mark(event.workspace)
        elif kind in _CERT_EVENTS:
            name = event.payload.get("name")
            self.certificates_changed(event.workspace, {name} if isinstance(name, str) else None)
        elif kind == "agent.revoked":
            agent_id = event.payload.get("agent_id")
            if self.hub is not None and isinstance(agent_id, str):
                self._inflight.pop(agent_id, None)
                self.hub.disconnect(agent_id)

    def _remember_trace(self, workspace: str, number: int, trace: dict[str, str]) -> None:
        self._traces.setdefault((workspace, number), trace)
        while len(self._traces) > _TRACES:
            self._traces.popitem(last=False)


def _uses_tls(state: DesiredState) -> bool:
    """Whether a site or stream of `state` serves TLS (needs certificate material)."""
    return any(site.tls is not None for site in state.sites) or any(
        stream.tls is not None for stream in state.streams
    )


def _uses_certificates(state: DesiredState, names: set[str]) -> bool:
    """Whether a site or stream of `state` uses one of the certificates `names` (``"*"``:
    any)."""
    if not _uses_tls(state):
        return False
    if "*" in names:
        return True
    from nxmesh.certs.distribution import certificate_needs

    return any(need.name in names and need.used for need in certificate_needs(state))


def _agent_of(info: SessionInfo) -> Agent:
    return Agent(id=info.agent_id, name="agent", labels=info.labels, workspace=info.workspace)
