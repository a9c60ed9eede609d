"""The reference agent app: plugins composed into a running agent.

`AgentApp.build` picks the providers the settings name — deployment mode (or the first
whose ``detect()`` answers, by priority), nginx driver, renderer, health checks — and
wires them to the agent's own parts: cache, applier, coalescer, watchdog, health
monitor, metrics. `AgentApp.run` runs them in one task group:

1. **recover** — the driver undoes a swap a crash interrupted;
2. **boot** — the cache's last-known-good entry, if it verifies, is applied (a no-op
   when it is already live; a *cold start* that launches nginx when nginx is down).
   This is island mode: the agent serves its last good configuration whether or not a
   master is reachable, and never boots from an entry that fails verification;
3. **serve** — metrics endpoint, coalescer, watchdog, health monitor, and the source
   of updates: the state file (masterless) or the `MasterLink` (retried with backoff
   while the master is unreachable). Without either, the agent keeps what it runs.

`run_agent` runs an `AgentApp` inside the core runtime (`nxmesh.core.runtime.run`):
plugin lifespans, signals and shutdown come from there.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import random
import re
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import anyio.abc
import attrs
import pluggy
import structlog

from nxmesh.agent.applier import Applier
from nxmesh.agent.cache import AgentCache, CacheError, Source
from nxmesh.agent.coalescer import Coalescer
from nxmesh.agent.events import EventRecorder
from nxmesh.agent.health import HealthMonitor
from nxmesh.agent.layout import render_settings_of
from nxmesh.agent.link import AgentSession, MasterLink
from nxmesh.agent.metrics import AgentMetrics, serve_metrics
from nxmesh.agent.watchdog import BackoffPolicy, Watchdog
from nxmesh.core.errors import ConfigurationError, NxMeshError
from nxmesh.core.events import Event
from nxmesh.core.interfaces import DeploymentMode, HealthCheck, NginxDriver
from nxmesh.core.model import ApplyReport, PendingApply
from nxmesh.core.registry import ProviderRegistries, from_settings_or
from nxmesh.core.runtime import Runtime, StashKey, run
from nxmesh.core.settings import Settings
from nxmesh.plugins.nginx_driver import DriverSettings
from nxmesh.plugins.render_nginx import RenderSettings, renderer_for

if TYPE_CHECKING:
    from nxmesh.agent.masterless import StateFileSource
    from nxmesh.crypto.signing import VerifyKey

__all__ = [
    "AGENT",
    "VAULT_DIR",
    "AgentApp",
    "AgentRefusedError",
    "AgentTuning",
    "certificate_files",
    "choose_mode",
    "default_agent_id",
    "prune_vault",
    "run_agent",
]

log = structlog.get_logger("nxmesh.agent")

AGENT: StashKey[AgentApp] = StashKey("agent")
"""Where `run_agent` puts the running `AgentApp` in ``runtime.stash``."""


@attrs.frozen
class AgentTuning:
    """Intervals the settings do not expose; tests shorten them."""

    nginx_check_interval: float = 1.0
    state_poll_interval: float = 1.0
    health_change_interval: float | None = None
    link_backoff_max: float = 60.0
    backoff: BackoffPolicy = attrs.field(factory=BackoffPolicy)


def default_agent_id() -> str:
    """This host's name, reduced to the characters an agent id may hold."""
    name = re.sub(r"[^A-Za-z0-9._:+/-]", "-", socket.gethostname()) or "agent"
    return name if name[0].isalnum() else f"agent-{name}"[:128]


def choose_mode(registry: ProviderRegistries, settings: Settings) -> DeploymentMode:
    """The deployment mode the settings name, or with ``auto`` the first that detects."""
    modes = registry["deployment_mode"]
    wanted = settings.agent.deployment_mode
    if wanted != "auto":
        cls = modes.get(wanted)
    else:
        ranked = sorted(modes.classes(), key=lambda c: getattr(c, "priority", 0), reverse=True)
        found = [c for c in ranked if c.detect()]
        if not found:
            raise ConfigurationError(
                "agent.deployment_mode is 'auto' but no mode detects this host "
                f"(known: {', '.join(modes.names()) or 'none'}); set one explicitly"
            )
        cls = found[0]
    mode: DeploymentMode = from_settings_or(cls, settings, cls)
    return mode


VAULT_DIR = "vault"
"""Directory (in ``<state_dir>/agent``) of the encrypted private keys and their passphrase."""


def certificate_files(vault_dir: Path, update: PendingApply) -> dict[str, bytes]:
    """The bundle files of the certificate material an update from the master carries:
    chains, private keys encrypted under the vault's passphrase (``ssl_password_file``),
    HTTP-01 tokens. Blocking (the applier renders in a worker thread)."""
    if not update.certificates and not update.challenges:
        return {}
    from nxmesh.certs.distribution import AgentKeyVault, AgentMaterial, CertificateMaterial

    material = AgentMaterial(
        certificates=tuple(
            # Same fields on both sides of the wire: copy them all, not one by one.
            CertificateMaterial(**attrs.asdict(c, recurse=False))
            for c in update.certificates
        ),
        challenges=dict(update.challenges),
    )
    return AgentKeyVault(vault_dir).extra_files(material)


def prune_vault(vault_dir: Path, conf_dir: Path) -> int:
    """Delete the vault's encrypted keys that no release kept under `conf_dir` holds
    (the live tree and its rollback targets); returns how many. Blocking.

    Every renewal or replaced certificate would otherwise leave its key behind for good.
    """
    if not (vault_dir / "keys").is_dir():
        return 0  # no certificate ever came: spare the agent the crypto import
    releases = conf_dir / "releases"
    trees = [p.resolve() for p in releases.iterdir() if p.is_dir()] if releases.is_dir() else []
    if (conf_dir / "current").resolve() not in trees:
        return 0  # not the reload driver's layout: what it keeps on disk is unknown
    from nxmesh.certs.distribution import AgentKeyVault

    return AgentKeyVault(vault_dir).prune_unreferenced(trees)


async def _prune_vault_after(vault_dir: Path, conf_dir: Path, report: ApplyReport) -> None:
    # A report listener: it runs under the applier's lock, so no render is adding a key
    # to the vault meanwhile.
    if report.outcome == "applied":
        removed = await anyio.to_thread.run_sync(prune_vault, vault_dir, conf_dir)
        if removed:
            log.info("retired private keys deleted from the vault", count=removed)


def _lock_conf_dir(conf_dir: Path) -> int:
    """Hold an exclusive lock on the config root for the agent's lifetime.

    Two agents driving one tree would undo each other's applies (each one's recovery
    takes the other's in-flight swap for a crashed one). The lock dies with the
    process, so a ``kill -9`` never leaves it stale.
    """
    conf_dir.mkdir(parents=True, exist_ok=True)
    path = conf_dir / "agent.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise NxMeshError(
            f"another agent (pid {holder}) already drives {conf_dir}; stop it first"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@attrs.frozen
class _Submitted:
    """An update waiting in the coalescer, with where it came from."""

    update: PendingApply
    source: Source


class _Started:
    """A TaskStatus that remembers whether ``started`` was called."""

    def __init__(self, inner: anyio.abc.TaskStatus[None]) -> None:
        self.inner = inner
        self.called = False

    def started(self, value: None = None) -> None:
        self.called = True
        self.inner.started(value)


class AgentRefusedError(NxMeshError):
    """The master refused this agent for good before it ever served a configuration: the
    agent stops (`nxmesh agent` exits with `EXIT_REFUSED`)."""


@attrs.define(eq=False)
class AgentApp:
    """Every part of a running agent (see the module docstring for the lifecycle)."""

    pm: pluggy.PluginManager
    settings: Settings
    agent_id: str
    mode: DeploymentMode
    driver: NginxDriver
    cache: AgentCache
    events: EventRecorder
    metrics: AgentMetrics
    applier: Applier
    coalescer: Coalescer[_Submitted]
    watchdog: Watchdog
    health: HealthMonitor
    tuning: AgentTuning
    state_file: Path | None = None
    link: MasterLink | None = None
    metrics_port: int | None = None
    island: bool = True
    """True while no master is connected (always, without a link)."""
    state_source: StateFileSource | None = None
    boot_report: ApplyReport | None = None

    @classmethod
    def build(
        cls,
        pm: pluggy.PluginManager,
        settings: Settings,
        registry: ProviderRegistries | None = None,
        *,
        state_file: Path | None = None,
        link: MasterLink | None = None,
        agent_id: str | None = None,
        mode: DeploymentMode | None = None,
        tuning: AgentTuning | None = None,
        render_settings: RenderSettings | None = None,
    ) -> AgentApp:
        """Assemble an agent from settings; nothing runs until `run`.

        `render_settings` overrides the renderer's host knobs (status port, workers),
        which otherwise come from a ``[plugins.render_nginx]`` section when one is
        declared, else the renderer's defaults.
        """
        registry = registry or ProviderRegistries(pm)
        agent_id = agent_id or default_agent_id()
        tuning = tuning or AgentTuning()
        events = EventRecorder(workspace=settings.workspace)
        mode = mode or choose_mode(registry, settings)
        driver_cls = registry["nginx_driver"].get(settings.agent.nginx_driver)
        driver: NginxDriver = driver_cls.from_settings(
            settings, mode=mode, agent_id=agent_id, events=events
        )
        vault_dir = settings.state_dir / "agent" / VAULT_DIR
        render = render_settings or render_settings_of(settings)
        if render.ssl_password_file is None:
            # Certificates from the master are written encrypted under this passphrase.
            render = attrs.evolve(
                render, ssl_password_file=str((vault_dir / "ssl_password").absolute())
            )
        renderer = renderer_for(pm, settings, render_settings=render)
        cache = AgentCache(settings.state_dir / "agent")
        metrics = AgentMetrics()
        events.subscribe(metrics.on_event)
        applier = Applier(
            pm,
            driver,
            renderer,
            cache=cache,
            agent_id=agent_id,
            events=events,
            verify_key=cache.verify_key,
            require_signature=cache.verify_key is not None,
            extra_files=lambda update: certificate_files(vault_dir, update),
        )
        applier.subscribe(metrics.on_report)
        applier.subscribe(functools.partial(_prune_vault_after, vault_dir, settings.agent.conf_dir))
        knobs = settings.plugins.get("nginx_driver")
        knobs = knobs if isinstance(knobs, DriverSettings) else DriverSettings()
        coalescer: Coalescer[_Submitted] = Coalescer(
            lambda item: applier.apply(item.update, source=item.source),
            debounce=knobs.debounce,
            min_interval=knobs.min_reload_interval,
        )
        watchdog = Watchdog(
            applier,
            driver,
            mode,
            events=events,
            drift_interval=settings.agent.drift_interval,
            drift_policy=settings.agent.drift_policy,
            check_interval=tuning.nginx_check_interval,
            backoff=tuning.backoff,
        )
        checks: list[HealthCheck] = []
        for check_cls in registry["health_check"].classes():
            try:
                checks.append(from_settings_or(check_cls, settings, check_cls))
            except (TypeError, NxMeshError) as exc:
                log.warning("health check not usable", check=check_cls.name, error=str(exc))
        health = HealthMonitor(
            checks,
            agent_id=agent_id,
            interval=settings.agent.health_interval,
            change_interval=tuning.health_change_interval,
        )
        health.subscribe(metrics.on_health)
        applier.subscribe(lambda _report: health.poke())
        return cls(
            pm=pm,
            settings=settings,
            agent_id=agent_id,
            mode=mode,
            driver=driver,
            cache=cache,
            events=events,
            metrics=metrics,
            applier=applier,
            coalescer=coalescer,
            watchdog=watchdog,
            health=health,
            tuning=tuning,
            state_file=state_file,
            link=link,
        )

    # -- lifecycle ----------------------------------------------------------------------

    def running(self) -> tuple[int | None, str | None]:
        """Version and digest of the update serving now (None before the first apply)."""
        entry = self.applier.current
        return (entry.update.version, entry.update.digest) if entry else (None, None)

    def submit(self, update: PendingApply, source: Source = "master") -> None:
        """Queue an update for the coalescer; `source` says who sent it (``file``: the
        operator's own state file, which needs no master signature)."""
        self.coalescer.submit(_Submitted(update, source))

    def submit_file(self, update: PendingApply) -> None:
        self.submit(update, "file")

    async def boot(self) -> ApplyReport | None:
        """Recover an interrupted apply, then apply the verified last-known-good entry."""
        recover = getattr(self.driver, "recover", None)
        if recover is not None:
            done = await recover()
            if done:
                log.info("recovered", what=done)
        entry = self.cache.load_verified("last_good")
        if entry is None:
            if self.cache.last_error and self.cache.path("last_good").exists():
                self.events.record("cache.refused", reason=self.cache.last_error)
            return None
        report = await self.applier.apply_entry(entry)
        self.boot_report = report
        self.events.record(
            "agent.booted",
            version=entry.update.version,
            outcome=report.outcome,
            source=entry.source,
        )
        return report

    async def run_once(self) -> ApplyReport | None:
        """Boot, apply the state file once (when there is one) and return its report.

        Takes the config root's lock like `run`: a running agent's in-flight swap would
        look like a crashed one to this recovery, which would undo it.
        """
        lock = _lock_conf_dir(self.settings.agent.conf_dir)
        try:
            report = await self.boot()
            if self.state_file is not None:
                from nxmesh.agent.masterless import load_update

                version, _digest = self.running()
                update = await anyio.to_thread.run_sync(
                    load_update, self.pm, self.state_file, (version or 0) + 1
                )
                report = await self.applier.apply(update, source="file")
            return report
        finally:
            try:
                await self.aclose()
            finally:
                os.close(lock)

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[AgentApp] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Boot, start every service, report ready with ``task_status``, run until cancelled."""
        lock = _lock_conf_dir(self.settings.agent.conf_dir)
        try:
            async with anyio.create_task_group() as tg:
                await self.boot()
                agent = self.settings.agent
                self.metrics_port = await tg.start(
                    serve_metrics, self.metrics, agent.metrics_host, agent.metrics_port
                )
                await tg.start(self.coalescer.run)
                await tg.start(self.watchdog.run)
                await tg.start(self.health.run)
                if self.state_file is not None:
                    # Imported here: only a masterless agent reads a state file (the
                    # loader brings PyYAML).
                    from nxmesh.agent.masterless import StateFileSource

                    entry = self.applier.current
                    last = (
                        (entry.update.version, entry.update.digest)
                        if entry is not None and entry.source == "file"
                        else None
                    )
                    self.state_source = StateFileSource(
                        self.pm,
                        self.state_file,
                        self.submit_file,
                        interval=self.tuning.state_poll_interval,
                        last=last,
                        events=self.events,
                    )
                    await tg.start(self.state_source.run)
                if self.link is not None:
                    tg.start_soon(self._link_loop, self.link)
                log.info(
                    "agent running",
                    # Its name (agent.name, else the host name); the id the master gives
                    # it is logged with "registered with the master".
                    name=self.agent_id,
                    mode=self.mode.name,
                    masterless=self.state_file is not None,
                    metrics_port=self.metrics_port,
                )
                task_status.started(self)
        finally:
            try:
                await self.aclose()
            finally:
                os.close(lock)

    async def aclose(self) -> None:
        """Release the deployment mode (a supervised nginx is stopped if so configured)."""
        closer = getattr(self.mode, "aclose", None)
        if closer is not None:
            with anyio.move_on_after(15, shield=True):
                await closer()

    # -- the master link ----------------------------------------------------------------

    def session(self) -> AgentSession:
        return AgentSession(
            agent_id=self.agent_id,
            labels=dict(self.settings.agent.labels),
            deployment_mode=self.mode.name,
            submit=self.submit,
            running=self.running,
        )

    async def _link_loop(self, link: MasterLink) -> None:
        """Keep the master link up; while it is down the agent is in island mode."""
        send, receive = anyio.create_memory_object_stream[Event](256)

        def forward(event: Event) -> None:
            # Offline for long, or shutting down: drop; the recorder keeps the history.
            with contextlib.suppress(anyio.WouldBlock, anyio.ClosedResourceError):
                send.send_nowait(event)

        self.events.subscribe(forward)
        self.applier.subscribe(link.report_apply)
        self.health.subscribe(link.report_health)
        # Imported here: a masterless agent needs neither it nor the wire protocol's crypto.
        from nxmesh.agent_link import AgentLink

        if isinstance(link, AgentLink):
            self.applier.on_start(link.report_applying)
            link.on_master_key = self.pin_master_key
        delay = min(1.0, self.tuning.link_backoff_max)
        with send:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._forward_events, link, receive)
                while True:
                    rejected = False
                    try:
                        async with anyio.create_task_group() as session_tg:
                            await session_tg.start(self._link_session, link)
                            self.island = False
                            delay = min(1.0, self.tuning.link_backoff_max)
                            self.events.record("master.connected")
                    except* OSError as group:
                        reason = "; ".join(str(e) for e in group.exceptions)
                        self.events.record("master.unreachable", reason=reason, retry_in=delay)
                    except* Exception as group:
                        reason = "; ".join(str(e) for e in group.exceptions)
                        rejected = any(getattr(e, "final", False) for e in group.exceptions)
                        if rejected:
                            self.events.record("master.rejected", reason=reason)
                        else:
                            # NxMesh's own errors say what is wrong (an unsafe credentials
                            # file...): the message, not a traceback on every retry. The
                            # retry stays: the operator may fix it while the agent runs.
                            if all(isinstance(e, NxMeshError) for e in group.exceptions):
                                log.error("master link failed", reason=reason, retry_in=delay)  # noqa: TRY400
                            else:
                                log.exception("master link failed", reason=reason)
                            self.events.record("master.error", reason=reason, retry_in=delay)
                    self.island = True
                    if rejected:
                        if self.applier.current is None:
                            # Never served anything (a wrong or used-up bootstrap token):
                            # no cache to keep serving, and the master will not change its
                            # mind. Stop, so the supervisor shows the failure rather than
                            # an agent idling healthy-looking.
                            raise AgentRefusedError(
                                f"the master refused this agent ({reason}) and it has no "
                                "configuration to serve; give it a new bootstrap token "
                                "(`nxmesh token create` on the master) and start it again"
                            )
                        # Refused for good (revoked, token used up): keep serving the
                        # cache, stop asking.
                        return
                    await anyio.sleep(delay * random.uniform(0.8, 1.2))  # noqa: S311 - jitter
                    delay = min(delay * 2, self.tuning.link_backoff_max)

    def pin_master_key(self, key: VerifyKey, enrolled: bool) -> None:
        """The master's version-signing key, from its answer to our registration.

        At enrollment (or when no key is pinned yet) it is pinned in the cache directory
        (``master.pub``) and every master update must be signed by it from then on. A
        resumed session naming another key changes nothing: updates signed by it are
        refused, and the log says why.
        """
        try:
            pinned = self.cache.verify_key
        except CacheError:
            pinned = None
        if pinned is None or enrolled:
            if self.cache.pin_master_key(key):
                log.info("master signing key pinned", key_id=key.key_id)
                self.events.record("master.key_pinned", key_id=key.key_id)
            self.applier.trust(key)
        elif pinned != key:
            log.error(
                "the master signs with another key than the one pinned at enrollment; its "
                "updates will be refused (enroll again with a new token to trust it)",
                pinned=pinned.key_id,
                offered=key.key_id,
            )
            self.events.record("master.key_mismatch", pinned=pinned.key_id, offered=key.key_id)

    async def _link_session(
        self, link: MasterLink, *, task_status: anyio.abc.TaskStatus[None]
    ) -> None:
        status = _Started(task_status)
        try:
            await link.run(self.session(), task_status=status)
        except OSError as exc:
            if not status.called:
                raise
            self.events.record("master.disconnected", reason=str(exc))

    async def _forward_events(
        self, link: MasterLink, receive: anyio.abc.ObjectReceiveStream[Event]
    ) -> None:
        async with receive:
            async for event in receive:
                if self.island:
                    continue
                try:
                    await link.report_event(event)
                except OSError:
                    continue


async def run_agent(
    pm: pluggy.PluginManager,
    settings: Settings,
    *,
    state_file: Path | None = None,
    once: bool = False,
    link: MasterLink | None = None,
    tuning: AgentTuning | None = None,
    render_settings: RenderSettings | None = None,
    handle_signals: bool = True,
) -> ApplyReport | None:
    """Run the agent inside the core runtime until a signal (or, with `once`, one apply).

    :param state_file: masterless mode: keep this desired-state file applied.
    :param once: apply once (boot from the cache, then the state file) and return the
        report; nginx keeps running after the agent exits.
    :param link: the connection to a master (from a transport plugin).
    :param render_settings: the renderer's host knobs (status port...), when not from
        settings.
    :returns: with `once`, the last apply's report (None when nothing was applied).
    """
    result: dict[str, ApplyReport | None] = {}

    async def main(runtime: Runtime) -> None:
        mode = choose_mode(runtime.registry, settings)
        if once:
            mode = _detached(mode)
        app = AgentApp.build(
            pm,
            settings,
            runtime.registry,
            agent_id=settings.agent.name or None,
            state_file=state_file,
            link=link,
            mode=mode,
            tuning=tuning,
            render_settings=render_settings,
        )
        runtime.stash[AGENT] = app
        if once:
            result["report"] = await app.run_once()
            return
        await app.run()

    await run(pm, settings, main, handle_signals=handle_signals)
    return result.get("report")


def _detached(mode: DeploymentMode) -> DeploymentMode:
    """For ``--once``: a supervised nginx must outlive the agent, so start it daemonized."""
    from nxmesh.plugins.deploy_standalone import StandaloneMode

    if isinstance(mode, StandaloneMode) and mode.settings.supervise:
        return StandaloneMode(
            mode.layout,
            nginx_binary=mode.nginx_binary,
            settings=attrs.evolve(mode.settings, supervise=False),
        )
    return mode
