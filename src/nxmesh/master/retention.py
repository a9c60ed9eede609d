"""Retention: the master deletes what its tables no longer need, every ``retention_interval``.

Without it the audit log, the per-agent rollout statuses (one row per agent per
version), spent enrollment tokens, expired login sessions and stale failed-login
counters grow forever. `RetentionJob` runs one pass at start and then every
``[master] retention_interval`` seconds (1 h); a pass deletes, in bounded batches (one
short transaction each, `nxmesh.sql.prune`):

===========================  ===========================================================
table                        goes when
===========================  ===========================================================
``audit_log``                older than ``audit_retention_days`` (365)
``agent_status``             beyond the workspace's latest ``status_retention_versions``
                             versions (20) — never an agent's latest status, the one of
                             the version it runs, nor those of versions assignments pin
``bootstrap_tokens``         used or expired ``token_retention_days`` (7) ago
``auth_refresh_tokens``      expired ``token_retention_days`` ago, and so did (or was
                             revoked) every token of its session: replaying a spent
                             token must revoke a session still alive
``auth_api_tokens``          expired ``token_retention_days`` ago
``event_payloads``           older than an hour (as the PostgreSQL event bus does)
``auth_login_failures``      idle for twice ``[auth] lockout_max_delay`` (the counter
                             restarts from zero then anyway)
===========================  ===========================================================

A setting of 0 keeps that kind forever. Passes run under the leader lock of
`nxmesh.certs.renewal.leader_lock` (a PostgreSQL advisory lock ``retention``): of
several masters sharing a database one prunes, the others skip that round; on SQLite
the lock is always held. The deletes are idempotent anyway, so a pass cut short is
finished by the next one.

Each pass logs its counts (``retention pass done``; table names and numbers only) and
adds them to ``nxmesh_master_retention_deleted_rows_total{table}``; a failing pass (the
database is down) is logged and counted (``nxmesh_master_retention_runs_total
{outcome="failed"}``) and the job tries again at the next interval — the master keeps
running.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Final

import anyio
import anyio.abc
import structlog

from nxmesh.core.records import RetentionPolicy

if TYPE_CHECKING:
    from nxmesh.core.interfaces import StorageBackend
    from nxmesh.core.settings import Settings
    from nxmesh.master.app import MasterServices
    from nxmesh.master.auth.store import AuthStore
    from nxmesh.master.metrics import MasterMetrics

__all__ = [
    "EVENT_PAYLOAD_RETENTION",
    "LOCK_NAME",
    "RetentionJob",
    "retention_policy",
    "run_retention",
]

log = structlog.get_logger("nxmesh.master.retention")

DAY: Final = 86400.0
LOCK_NAME: Final = "retention"
"""Name of the leader lock (PostgreSQL advisory lock) passes run under."""
EVENT_PAYLOAD_RETENTION: Final = 3600.0
"""Seconds a large event's payload is kept for the PostgreSQL event bus's receivers."""

MAX_STATUS_VERSIONS: Final = 2**31 - 1
"""The most versions `RetentionPolicy.status_versions` takes (a larger setting keeps all)."""

LeaderLock = Callable[[], AbstractAsyncContextManager[bool]]


def _cutoff(now: float, seconds: float) -> float | None:
    # A period so long its cutoff is no number (1e306 days, an endless lockout delay)
    # keeps everything, like 0 does: the policy would refuse it and fail every pass.
    cutoff = now - seconds
    return cutoff if math.isfinite(cutoff) else None


def _before(now: float, days: float) -> float | None:
    return None if days == 0 else _cutoff(now, days * DAY)


def retention_policy(settings: Settings, now: float) -> RetentionPolicy:
    """What a pass at `now` may delete from the master's storage, from `settings`."""
    master = settings.master
    return RetentionPolicy(
        audit_before=_before(now, master.audit_retention_days),
        tokens_before=_before(now, master.token_retention_days),
        # More versions than a workspace can number: every status is kept anyway.
        status_versions=min(master.status_retention_versions, MAX_STATUS_VERSIONS),
        event_payloads_before=now - EVENT_PAYLOAD_RETENTION,
        # `nxmesh.plugins.auth_password` forgets a counter idle for this long.
        login_failures_before=_cutoff(now, 2 * settings.auth.lockout_max_delay),
        batch_size=master.retention_batch_size,
    )


class RetentionJob:
    """Prunes the storage backend and the auth store on a schedule (module docstring).

    :param storage: the master's storage; a backend without ``prune`` is skipped.
    :param auth_store: where refresh and API tokens live (`nxmesh.master.auth.store`).
    :param settings: the ``[master]`` retention settings are read from it.
    :param metrics: the master's metrics (None: counts are only logged).
    :param lock: the leader lock (default: `nxmesh.certs.renewal.leader_lock` of
        `storage`, named `LOCK_NAME`).
    :param clock: seconds since the epoch.
    :param sleep: waits between passes (tests pass one that does not wait).
    """

    def __init__(
        self,
        storage: StorageBackend,
        auth_store: AuthStore | None,
        settings: Settings,
        *,
        metrics: MasterMetrics | None = None,
        lock: LeaderLock | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        if lock is None:
            from nxmesh.certs.renewal import leader_lock

            lock = leader_lock(storage, LOCK_NAME)
        self.storage = storage
        self.auth_store = auth_store
        self.settings = settings
        self.metrics = metrics
        self.lock = lock
        self.clock = clock
        self.sleep = sleep
        self._warned_unsupported = False

    @property
    def interval(self) -> float:
        return self.settings.master.retention_interval

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """A pass now, then one every `interval` seconds, until cancelled; never raises
        for a failed pass (`run_once_safely`)."""
        task_status.started()
        while True:
            await self.run_once_safely()
            await self.sleep(self.interval)

    async def run_once_safely(self) -> dict[str, int] | None:
        """`run_once`, with a failure logged and counted instead of raised (None then)."""
        try:
            return await self.run_once()
        except Exception as exc:  # the database may be down: try again next interval
            if self.metrics is not None:
                self.metrics.retention_runs.labels(outcome="failed").inc()
            log.error("retention pass failed; retrying at the next interval",  # noqa: TRY400
                      error=str(exc).strip() or type(exc).__name__,
                      error_type=type(exc).__name__, retry_in=self.interval)  # fmt: skip
            return None

    async def run_once(self) -> dict[str, int] | None:
        """One pass if this master holds the lock; the rows deleted per table, or None
        when another master is pruning."""
        async with self.lock() as leader:
            if not leader:
                if self.metrics is not None:
                    self.metrics.retention_runs.labels(outcome="skipped").inc()
                log.debug("retention pass skipped: another master is running it")
                return None
            return await self._pass()

    async def _pass(self) -> dict[str, int]:
        started = time.monotonic()
        policy = retention_policy(self.settings, self.clock())
        counts: dict[str, int] = {}
        prune = getattr(self.storage, "prune", None)
        if callable(prune):
            self._count(counts, await prune(policy))
        elif not self._warned_unsupported:
            self._warned_unsupported = True
            log.warning("storage backend cannot prune; its tables are not trimmed",
                        storage=type(self.storage).__name__)  # fmt: skip
        if self.auth_store is not None and policy.tokens_before is not None:
            pruned = await self.auth_store.prune(policy.tokens_before, batch_size=policy.batch_size)
            self._count(counts, pruned)
        if self.metrics is not None:
            self.metrics.retention_runs.labels(outcome="ok").inc()
        deleted = sum(counts.values())
        (log.info if deleted else log.debug)(
            "retention pass done",
            deleted=deleted,
            tables=dict(sorted(counts.items())),
            seconds=round(time.monotonic() - started, 3),
        )
        return counts

    def _count(self, counts: dict[str, int], pruned: Mapping[str, int]) -> None:
        for table, rows in pruned.items():
            counts[table] = counts.get(table, 0) + rows
            if self.metrics is not None:
                self.metrics.retention_deleted.labels(table=table).inc(rows)


async def run_retention(
    services: MasterServices,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """The master's retention job (`RetentionJob` on `services`), until cancelled."""
    job = RetentionJob(
        services.storage,
        services.auth.store,
        services.settings,
        metrics=services.metrics,
    )
    await job.run(task_status=task_status)
