"""One apply, end to end — the single code path every update takes.

Master push, masterless state file, island boot from the cache and drift revert all go
through `Applier.apply` (or `Applier.apply_entry` for an already-rendered cached
bundle), in this order:

1. ``nxmesh_before_apply`` — any plugin may veto (``vetoed``; nothing is touched);
2. verify the digest (and the master's signature when the agent knows its key);
3. record the update as *desired* in the cache (alongside the next step);
4. render through the renderer plugin (in a worker thread: it is CPU-bound);
5. ``driver.apply`` — stage, test, swap, reload, confirm (see the driver);
6. ``nxmesh_after_apply`` with the report, then the report listeners (master link);
7. on ``applied``/``noop``, the update and its bundle become the cache's last-known-good.

Applies are serialised by `lock`; the watchdog holds the same lock while it compares
the live tree, so it never mistakes an apply's own writes for drift.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread
import pluggy
import structlog

from nxmesh.agent.cache import AgentCache, CacheEntry, Source
from nxmesh.agent.events import EventRecorder
from nxmesh.agent.tracing import apply_span
from nxmesh.agent.verify import verify_update
from nxmesh.core.errors import NxMeshError
from nxmesh.core.model import ApplyReport, PendingApply
from nxmesh.core.observers import apply_veto, notify_after_apply

if TYPE_CHECKING:
    from nxmesh.core.bundle import Bundle
    from nxmesh.core.interfaces import NginxDriver, Renderer
    from nxmesh.crypto.signing import VerifyKey

__all__ = ["Applier", "ReportListener"]

log = structlog.get_logger("nxmesh.agent.applier")

ReportListener = Callable[[ApplyReport], Awaitable[None] | None]
StartListener = Callable[[PendingApply], Awaitable[None] | None]
ExtraFiles = Callable[[PendingApply], Mapping[str, bytes]]


class Applier:
    """Apply updates through the renderer and the nginx driver, with hooks and cache.

    :param pm: the plugin manager (``nxmesh_before_apply`` / ``nxmesh_after_apply``).
    :param driver: the nginx driver.
    :param renderer: turns the desired state into a bundle.
    :param cache: where desired and last-known-good entries are kept (None: no cache).
    :param agent_id: written into reports the applier makes itself (veto, bad digest).
    :param verify_key: the master's key; signed updates must verify against it.
    :param require_signature: refuse unsigned updates from the master.
    :param extra_files: certificate files to render along (``certs/...``), per update.
    """

    def __init__(
        self,
        pm: pluggy.PluginManager,
        driver: NginxDriver,
        renderer: Renderer,
        *,
        cache: AgentCache | None = None,
        agent_id: str = "local",
        events: EventRecorder | None = None,
        verify_key: VerifyKey | None = None,
        require_signature: bool = False,
        extra_files: ExtraFiles | None = None,
    ) -> None:
        self.pm = pm
        self.driver = driver
        self.renderer = renderer
        self.cache = cache
        self.agent_id = agent_id
        self.events = events or EventRecorder()
        self.verify_key = verify_key
        self.require_signature = require_signature
        self.extra_files = extra_files
        self.lock = anyio.Lock()
        self.current: CacheEntry | None = None
        """What runs now: the last update applied (or found live) and its bundle."""
        self.listeners: list[ReportListener] = []
        self.start_listeners: list[StartListener] = []

    @property
    def applying(self) -> bool:
        return self.lock.locked()

    def subscribe(self, listener: ReportListener) -> None:
        """Call `listener` with every report (after the ``nxmesh_after_apply`` hooks)."""
        self.listeners.append(listener)

    def on_start(self, listener: StartListener) -> None:
        """Call `listener` when an update from the master passed its checks and is about
        to be rendered and applied (the master records ``applying``)."""
        self.start_listeners.append(listener)

    def trust(self, key: VerifyKey) -> None:
        """Verify master updates with `key` from now on, and refuse unsigned ones."""
        self.verify_key = key
        self.require_signature = True

    # -- entry points -------------------------------------------------------------------

    async def apply(
        self, update: PendingApply, *, source: Source = "master", force: bool = False
    ) -> ApplyReport:
        """Veto, verify, render and apply `update`; the report says how it went."""
        async with self.lock:
            return await self.apply_locked(update, source=source, force=force)

    async def apply_entry(self, entry: CacheEntry, *, force: bool = False) -> ApplyReport:
        """Apply a verified cache entry exactly as it was rendered (island boot)."""
        async with self.lock:
            return await self._run(entry.update, entry.source, force, bundle=entry.bundle)

    async def apply_entry_locked(self, entry: CacheEntry, *, force: bool = False) -> ApplyReport:
        """`apply_entry` for a caller already holding `lock` (the watchdog's revert: the
        last good bundle exactly, certificates included, without rendering again)."""
        return await self._run(entry.update, entry.source, force, bundle=entry.bundle)

    async def apply_locked(
        self, update: PendingApply, *, source: Source = "master", force: bool = False
    ) -> ApplyReport:
        """`apply` for a caller already holding `lock` (the watchdog's revert)."""
        return await self._run(update, source, force, bundle=None)

    # -- the pipeline -------------------------------------------------------------------

    async def _run(
        self, update: PendingApply, source: Source, force: bool, *, bundle: Bundle | None
    ) -> ApplyReport:
        attributes = {
            "nxmesh.version": update.version,
            "nxmesh.digest": update.digest,
            "nxmesh.source": source,
        }
        with apply_span("nxmesh.agent.apply", update.trace, attributes):
            return await self._pipeline(update, source, force, bundle=bundle)

    async def _pipeline(
        self, update: PendingApply, source: Source, force: bool, *, bundle: Bundle | None
    ) -> ApplyReport:
        started = time.time()
        veto = apply_veto(self.pm, update)
        if veto:
            return await self._finish(
                self._report(update, "vetoed", veto, started), update, None, source
            )
        problem = verify_update(
            update,
            self.verify_key,
            require_signature=self.require_signature and source == "master",
        )
        if problem:
            report = self._report(update, "failed", f"refused: {problem}", started)
            return await self._finish(report, update, None, source)
        if source == "master":
            await self._notify_start(update)
        if bundle is None:
            try:
                bundle = await anyio.to_thread.run_sync(self._render, update)
            except NxMeshError as exc:
                report = self._report(update, "failed", f"render failed: {exc}", started)
                return await self._finish(report, update, None, source)
            except Exception as exc:  # a renderer's bug: still a report, not a lost apply
                log.exception("renderer crashed", version=update.version)
                message = f"render failed: {type(exc).__name__}: {exc}"
                report = self._report(update, "failed", message, started)
                return await self._finish(report, update, None, source)
        result: list[ApplyReport] = []
        async with anyio.create_task_group() as tg:
            if self.cache is not None:
                # Off the critical path: recording what was asked for need not delay it.
                tg.start_soon(self._save_desired, CacheEntry(update, bundle, source))
            result.append(await self.driver.apply(update, bundle, force=force))
        return await self._finish(result[0], update, bundle, source)

    async def _notify_start(self, update: PendingApply) -> None:
        for listener in self.start_listeners:
            try:
                result = listener(update)
                if result is not None:
                    await result
            except Exception:  # an observer must not fail an apply
                log.exception("apply start listener failed")

    async def _save_desired(self, entry: CacheEntry) -> None:
        assert self.cache is not None
        try:
            await anyio.to_thread.run_sync(self.cache.save_desired, entry)
        except (OSError, NxMeshError):
            log.exception("cannot record the desired update in the cache")

    def _render(self, update: PendingApply) -> Bundle:
        extra = self.extra_files(update) if self.extra_files is not None else {}
        return self.renderer.render(update.state, extra_files=extra)

    def _report(
        self, update: PendingApply, outcome: str, message: str, started: float
    ) -> ApplyReport:
        now = time.time()
        return ApplyReport(
            agent_id=self.agent_id,
            version=update.version,
            digest=update.digest,
            outcome=outcome,  # type: ignore[arg-type]  # one of the literals above
            message=message,
            durations={"total": round(now - started, 6)},
            started_at=started,
            finished_at=now,
        )

    async def _finish(
        self, report: ApplyReport, update: PendingApply, bundle: Bundle | None, source: Source
    ) -> ApplyReport:
        if bundle is None:  # refused before the driver: the driver recorded nothing
            self.events.record(
                f"apply.{report.outcome}", version=report.version, message=report.message
            )
        elif report.outcome in ("applied", "noop"):
            entry = CacheEntry(update=update, bundle=bundle, source=source)
            self.current = entry
            if self.cache is not None:
                await anyio.to_thread.run_sync(self.cache.save_last_good, entry)
        notify_after_apply(self.pm, report)
        for listener in self.listeners:
            try:
                result = listener(report)
                if result is not None:
                    await result
            except Exception:  # a listener (metrics, master link) must not fail an apply
                log.exception("apply report listener failed")
        return report
