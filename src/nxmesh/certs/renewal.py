"""The renewal scheduler: ACME certificates obtained on time, on exactly one master.

Every pass (`RenewalScheduler.run_once`), for each workspace's latest desired state:

- each ACME certificate it needs (`acme_needs`) is *issued* when missing (or only a
  placeholder), *re-issued* when its domains changed, and *renewed* from
  ``renew_before_days`` (30) before expiry, minus a per-certificate jitter of up to
  ``renew_jitter_hours`` — derived from the certificate, so every master computes the
  same moment and a fleet's renewals spread out instead of hitting the CA together;
- a failed attempt is retried with exponential backoff (``retry_initial`` doubling up to
  ``retry_max``); a rate limit waits at least until the CA's ``Retry-After``;
- every stored certificate (ACME or uploaded) updates the days-to-expiry gauge and, below
  ``expiry_warning_days``, emits ``cert.expiring`` (once a day per certificate).

Outcomes become events (``cert.renewed``, ``cert.renewal_failed``, ``cert.expiring``),
Prometheus metrics (`CertificateMetrics`) and a health result (`RenewalHealthCheck`).

Passes run under a leader lock (`leader_lock`): a PostgreSQL advisory lock when the
storage is PostgreSQL, so with several masters one renews and the others skip; trivially
held on SQLite, which serves one master. Backoff state lives in the leader's memory; a new
leader starts afresh (at worst one early retry).
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import anyio
import anyio.abc
import attrs
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from nxmesh.certs.distribution import CertificateNeed, acme_needs, is_placeholder
from nxmesh.certs.errors import (
    AcmeRateLimitedError,
    CertificateConflictError,
    CertificateError,
)
from nxmesh.certs.settings import CertsSettings
from nxmesh.core.events import Event
from nxmesh.core.model import HealthResult

if TYPE_CHECKING:
    from nxmesh.certs.acme_client import IssuedCertificate
    from nxmesh.core.interfaces import StorageBackend
    from nxmesh.core.records import StoredCertificate

__all__ = [
    "DAY",
    "LOCK_NAME",
    "CertificateIssuer",
    "CertificateMetrics",
    "LeaderLock",
    "RenewalHealthCheck",
    "RenewalOutcome",
    "RenewalPolicy",
    "RenewalScheduler",
    "leader_lock",
]

DAY = 86400.0
LOCK_NAME = "acme-renewals"
"""Name of the advisory lock renewal passes run under."""

_MIN_SLEEP = 1.0

log = structlog.get_logger("nxmesh.certs.renewal")

LeaderLock = Callable[[], AbstractAsyncContextManager[bool]]
"""Enter to try to become the leader for one pass; yields whether we are."""

Publish = Callable[[Event], Awaitable[None]]


class CertificateIssuer(Protocol):
    """Obtains a certificate for some names (`nxmesh.certs.acme_client.AcmeIssuer`)."""

    async def issue(self, domains: Sequence[str]) -> IssuedCertificate: ...


# ---------------------------------------------------------------------------------------
# Policy
# ---------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class RenewalPolicy:
    """When to renew, warn and retry (the ``[plugins.certs]`` values, in one place)."""

    renew_before_days: float = 30.0
    renew_jitter_hours: float = 24.0
    expiry_warning_days: float = 21.0
    check_interval: float = 3600.0
    retry_initial: float = 300.0
    retry_max: float = 6 * 3600.0

    @classmethod
    def from_settings(cls, certs: CertsSettings) -> RenewalPolicy:
        return cls(
            renew_before_days=certs.renew_before_days,
            renew_jitter_hours=certs.renew_jitter_hours,
            expiry_warning_days=certs.expiry_warning_days,
            check_interval=certs.check_interval,
            retry_initial=certs.retry_initial,
            retry_max=certs.retry_max,
        )

    def jitter(self, workspace: str, name: str, not_after: float) -> float:
        """Seconds to renew earlier than ``renew_before_days``: stable per certificate."""
        digest = hashlib.sha256(f"{workspace}/{name}/{not_after:.0f}".encode()).digest()
        fraction: float = int.from_bytes(digest[:8], "big") / 2**64
        return fraction * self.renew_jitter_hours * 3600.0

    def renew_at(self, workspace: str, name: str, not_after: float) -> float:
        """When a certificate expiring at `not_after` is due for renewal."""
        return not_after - self.renew_before_days * DAY - self.jitter(workspace, name, not_after)

    def backoff(self, failures: int, rng: random.Random) -> float:
        """Delay before attempt ``failures + 1``: exponential, capped, with 10 % jitter."""
        base = min(self.retry_max, self.retry_initial * 2.0 ** max(0, failures - 1))
        return base * (1.0 + 0.1 * rng.random())


# ---------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------


class CertificateMetrics:
    """Prometheus metrics of certificate management.

    Pass the master's registry (``services.metrics.registry``) so they appear on its
    ``/metrics``; by default a registry of their own.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.days_to_expiry = Gauge(
            "nxmesh_certificate_days_to_expiry",
            "Days until a stored certificate expires (negative: expired).",
            ["workspace", "name", "source"],
            registry=self.registry,
        )
        self.renewals = Counter(
            "nxmesh_certificate_renewals_total",
            "ACME issuance and renewal attempts, by result.",
            ["result"],
            registry=self.registry,
        )
        for result in ("success", "failure", "rate_limited"):
            self.renewals.labels(result=result)
        self._series: set[tuple[str, str, str]] = set()

    def observe(self, certificates: Iterable[StoredCertificate], now: float) -> None:
        """Set the expiry gauge to exactly these certificates (forgetting deleted ones)."""
        seen = set()
        for cert in certificates:
            labels = (cert.workspace, cert.name, cert.source)
            self.days_to_expiry.labels(*labels).set((cert.not_after - now) / DAY)
            seen.add(labels)
        for stale in self._series - seen:
            with contextlib.suppress(KeyError):
                self.days_to_expiry.remove(*stale)
        self._series = seen

    def render(self) -> bytes:
        return generate_latest(self.registry)


# ---------------------------------------------------------------------------------------
# Leader lock
# ---------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _always_leader() -> AsyncIterator[bool]:
    yield True


def leader_lock(storage: object, name: str = LOCK_NAME) -> LeaderLock:
    """The lock renewal passes take, chosen from the storage backend at each pass.

    A backend offering ``leader_lock(name)`` (an async context manager yielding a bool)
    decides itself; on PostgreSQL it is a non-blocking session advisory lock
    (``nxmesh_storage_postgres.locks.advisory_lock``); SQLite serves a single master, so
    the lock is always held there.
    """

    def enter() -> AbstractAsyncContextManager[bool]:
        custom = getattr(storage, "leader_lock", None)
        if callable(custom):
            lock: AbstractAsyncContextManager[bool] = custom(name)
            return lock
        engine = getattr(storage, "engine", None)
        dialect = getattr(getattr(engine, "dialect", None), "name", None)
        if dialect == "postgresql" and engine is not None:
            # The engine came from the storage-postgres plugin, so its helper is installed.
            from nxmesh_storage_postgres.locks import advisory_lock

            pg_lock: AbstractAsyncContextManager[bool] = advisory_lock(engine, name)
            return pg_lock
        return _always_leader()

    return enter


# ---------------------------------------------------------------------------------------
# The scheduler
# ---------------------------------------------------------------------------------------

Result = Literal["issued", "renewed", "failed", "rate_limited", "backing_off"]


@attrs.frozen
class RenewalOutcome:
    """What one pass did for one certificate."""

    workspace: str
    name: str
    result: Result
    message: str = ""
    next_attempt: float | None = None


@attrs.define
class _Failure:
    count: int
    next_attempt: float
    message: str
    rate_limited: bool
    missing: bool


class RenewalScheduler:
    """Issues and renews the ACME certificates of every workspace's latest state.

    :param storage: the master's storage (versions and certificates).
    :param issuer: obtains certificates (`AcmeIssuer`).
    :param policy: when to renew, warn and retry.
    :param publish: puts events on the bus (``services.bus.publish``); None: log only.
    :param metrics: where to record expiry and attempts.
    :param lock: the leader lock (default: `leader_lock` of `storage`).
    :param workspaces: the workspaces to look at, or an async callable returning them.
    :param clock: seconds since the epoch (tests move time with it).
    """

    def __init__(
        self,
        storage: StorageBackend,
        issuer: CertificateIssuer,
        *,
        policy: RenewalPolicy | None = None,
        publish: Publish | None = None,
        metrics: CertificateMetrics | None = None,
        lock: LeaderLock | None = None,
        workspaces: Sequence[str] | Callable[[], Awaitable[Iterable[str]]] = ("default",),
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.storage = storage
        self.issuer = issuer
        self.policy = policy or RenewalPolicy()
        self.publish = publish
        self.metrics = metrics or CertificateMetrics()
        self.lock = lock or leader_lock(storage)
        self.workspaces = workspaces
        self.clock = clock
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not secrecy
        self._failures: dict[tuple[str, str], _Failure] = {}
        self._expiring_sent: dict[tuple[str, str], float] = {}
        self._due: dict[tuple[str, str], float] = {}
        self._certificates: dict[tuple[str, str], StoredCertificate] = {}
        self._last_pass: float | None = None
        self._wakeup: anyio.Event | None = None

    # -- running ---------------------------------------------------------------------------

    def wake(self) -> None:
        """Run the next pass now instead of at the next due time: a new version may have
        added a ``tls: acme`` site. Backoff of failed certificates still holds."""
        if self._wakeup is not None:
            self._wakeup.set()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run passes until cancelled; sleeps until the next certificate is due or `wake`.

        A pass that fails unexpectedly (storage down) is logged and retried after
        ``retry_initial``; cancellation always propagates. A `wake` during a pass makes
        the next one start right after it.
        """
        task_status.started()
        while True:
            self._wakeup = wakeup = anyio.Event()
            try:
                await self.run_once()
                delay = self.next_due() - self.clock()
            except Exception as exc:  # a broken pass must not end renewals for good
                log.exception("certificate renewal pass failed", error_type=type(exc).__name__)
                delay = self.policy.retry_initial
            with anyio.move_on_after(min(self.policy.check_interval, max(_MIN_SLEEP, delay))):
                await wakeup.wait()

    async def run_once(self) -> list[RenewalOutcome]:
        """One pass if this master is the leader; an empty list when another one is."""
        async with self.lock() as leader:
            if not leader:
                log.debug("certificate renewal pass skipped: another master is the leader")
                return []
            return await self.check()

    def next_due(self) -> float:
        """When the next certificate is due or the next retry is allowed."""
        times = [*self._due.values(), *(f.next_attempt for f in self._failures.values())]
        now = self.clock()
        return min(times, default=now + self.policy.check_interval)

    async def _workspace_names(self) -> list[str]:
        if callable(self.workspaces):
            return sorted(set(await self.workspaces()))
        return list(self.workspaces)

    # -- one pass --------------------------------------------------------------------------

    async def check(self) -> list[RenewalOutcome]:
        """One pass over every workspace, without the leader lock (callers hold it)."""
        outcomes: list[RenewalOutcome] = []
        due: dict[tuple[str, str], float] = {}
        certificates: dict[tuple[str, str], StoredCertificate] = {}
        for workspace in await self._workspace_names():
            latest = await self.storage.latest_version(workspace)
            needs = acme_needs(latest.state) if latest is not None else []
            stored = {c.name: c for c in await self.storage.list_certificates(workspace)}
            for need in needs:
                outcome = await self._consider(workspace, need, stored.get(need.name))
                if outcome is not None:
                    outcomes.append(outcome)
                if outcome is not None and outcome.result in ("issued", "renewed"):
                    refreshed = await self.storage.get_certificate(workspace, need.name)
                    if refreshed is not None:
                        stored[need.name] = refreshed
                current = stored.get(need.name)
                if current is not None and current.source == "acme":
                    due[(workspace, need.name)] = self.policy.renew_at(
                        workspace, need.name, current.not_after
                    )
            wanted = {need.name for need in needs}
            for key in [k for k in self._failures if k[0] == workspace and k[1] not in wanted]:
                del self._failures[key]  # no longer needed: forget its backoff
            for cert in stored.values():
                certificates[(workspace, cert.name)] = cert
            await self._expiry(workspace, stored.values())
        self._due = due
        self._certificates = certificates
        self._last_pass = self.clock()
        self.metrics.observe(certificates.values(), self.clock())
        return outcomes

    async def _consider(
        self, workspace: str, need: CertificateNeed, stored: StoredCertificate | None
    ) -> RenewalOutcome | None:
        now = self.clock()
        key = (workspace, need.name)
        if stored is not None and stored.source != "acme":
            exc = CertificateConflictError(
                f"certificate {need.name!r} of workspace {workspace!r} is an uploaded "
                "certificate; the ACME certificate of that name would replace it. Rename "
                "the site or certificate, or delete the upload"
            )
            return await self._failed(workspace, need, exc, stored)
        if stored is None or is_placeholder(stored.cert_pem):
            reason = "missing"
        elif set(stored.domains) != set(need.domains):
            reason = "domains changed"
        elif now >= self.policy.renew_at(workspace, need.name, stored.not_after):
            reason = "due"
        else:
            return None
        failure = self._failures.get(key)
        if failure is not None and now < failure.next_attempt:
            return RenewalOutcome(
                workspace, need.name, "backing_off", failure.message, failure.next_attempt
            )
        log.info(
            "obtaining certificate",
            workspace=workspace,
            name=need.name,
            domains=list(need.domains),
            reason=reason,
        )
        try:
            issued = await self.issuer.issue(need.domains)
            record = issued.stored(workspace, need.name)
            await self.storage.put_certificate(record)
        except Exception as exc:  # every failure is recorded and retried with backoff
            return await self._failed(workspace, need, exc, stored)
        self._failures.pop(key, None)
        self.metrics.renewals.labels(result="success").inc()
        initial = stored is None or is_placeholder(stored.cert_pem)
        await self._emit(
            "cert.renewed",
            workspace,
            {
                "name": need.name,
                "domains": list(issued.domains),
                "sites": list(need.sites),
                "streams": list(need.streams),
                "reason": reason,
                "initial": initial,
                "fingerprint": issued.fingerprint,
                "not_after": issued.not_after,
            },
        )
        log.info(
            "certificate obtained",
            workspace=workspace,
            name=need.name,
            fingerprint=issued.fingerprint,
            reason=reason,
        )
        return RenewalOutcome(workspace, need.name, "issued" if initial else "renewed", reason)

    async def _failed(
        self,
        workspace: str,
        need: CertificateNeed,
        exc: Exception,
        stored: StoredCertificate | None,
    ) -> RenewalOutcome:
        now = self.clock()
        key = (workspace, need.name)
        previous = self._failures.get(key)
        count = (previous.count if previous else 0) + 1
        next_attempt = now + self.policy.backoff(count, self.rng)
        rate_limited = isinstance(exc, AcmeRateLimitedError)
        if isinstance(exc, AcmeRateLimitedError) and exc.retry_at is not None:
            next_attempt = max(next_attempt, exc.retry_at)
        message = str(exc) if isinstance(exc, CertificateError) else f"{type(exc).__name__}: {exc}"
        self._failures[key] = _Failure(
            count=count,
            next_attempt=next_attempt,
            message=message,
            rate_limited=rate_limited,
            missing=stored is None or is_placeholder(stored.cert_pem),
        )
        self.metrics.renewals.labels(result="rate_limited" if rate_limited else "failure").inc()
        log.warning(
            "certificate renewal failed",
            workspace=workspace,
            name=need.name,
            attempt=count,
            retry_in=round(next_attempt - now),
            error_type=type(exc).__name__,
            error=message,
        )
        await self._emit(
            "cert.renewal_failed",
            workspace,
            {
                "name": need.name,
                "domains": list(need.domains),
                "error": message,
                "error_type": type(exc).__name__,
                "attempt": count,
                "rate_limited": rate_limited,
                "next_attempt": next_attempt,
                "not_after": stored.not_after if stored is not None else None,
            },
        )
        return RenewalOutcome(
            workspace,
            need.name,
            "rate_limited" if rate_limited else "failed",
            message,
            next_attempt,
        )

    async def _expiry(self, workspace: str, certificates: Iterable[StoredCertificate]) -> None:
        now = self.clock()
        for cert in certificates:
            days = (cert.not_after - now) / DAY
            if days >= self.policy.expiry_warning_days or is_placeholder(cert.cert_pem):
                continue
            key = (workspace, cert.name)
            if now - self._expiring_sent.get(key, -DAY) < DAY:
                continue
            self._expiring_sent[key] = now
            await self._emit(
                "cert.expiring",
                workspace,
                {
                    "name": cert.name,
                    "source": cert.source,
                    "domains": list(cert.domains),
                    "days_left": round(days, 2),
                    "not_after": cert.not_after,
                    "expired": days <= 0,
                },
            )

    async def _emit(self, kind: str, workspace: str, payload: dict[str, Any]) -> None:
        if self.publish is None:
            return
        try:
            await self.publish(Event(kind, payload=payload, workspace=workspace))
        except Exception as exc:  # an event bus hiccup must not undo a stored renewal
            log.warning("certificate event not published", kind=kind, error=str(exc))

    # -- health ----------------------------------------------------------------------------

    def health(self) -> list[HealthResult]:
        """One result for certificate management, from the last pass.

        ``fail``: a certificate has expired, or an ACME certificate could never be
        obtained. ``warn``: renewals are failing, or a certificate expires within
        ``expiry_warning_days``. ``ok`` otherwise (also before the first pass).
        """
        now = self.clock()
        days = {k: (c.not_after - now) / DAY for k, c in self._certificates.items()}
        failing = dict(self._failures)
        expired = sorted(f"{w}/{n}" for (w, n), d in days.items() if d <= 0)
        never = sorted(f"{w}/{n}" for (w, n), f in failing.items() if f.missing)
        soon = sorted(
            f"{w}/{n}"
            for (w, n), d in days.items()
            if 0 < d < self.policy.expiry_warning_days
            and not is_placeholder(self._certificates[(w, n)].cert_pem)
        )
        if expired or never:
            status: Literal["ok", "warn", "fail"] = "fail"
            message = "; ".join(
                [*(f"{n} has expired" for n in expired), *(f"{n} was never issued" for n in never)]
            )
        elif failing or soon:
            status = "warn"
            parts = [f"renewal of {w}/{n} failing: {f.message}" for (w, n), f in failing.items()]
            parts += [
                f"{n} expires in less than {self.policy.expiry_warning_days:g} days" for n in soon
            ]
            message = "; ".join(parts)
        else:
            status = "ok"
            message = f"{len(days)} certificates valid"
        metrics = {
            "certificates": float(len(days)),
            "failing": float(len(failing)),
            "min_days_left": min(days.values(), default=0.0),
        }
        if self._last_pass is not None:
            metrics["seconds_since_pass"] = now - self._last_pass
        return [
            HealthResult(check="certs.renewal", status=status, message=message, metrics=metrics)
        ]


class RenewalHealthCheck:
    """The scheduler's verdict as a health check object (``run()`` like agent checks).

    Not registered through ``nxmesh_register_health_checks`` (agents run those): the
    master adds it to its own health report.
    """

    name: ClassVar[str] = "certs"

    def __init__(self, scheduler: RenewalScheduler) -> None:
        self.scheduler = scheduler

    async def run(self) -> Sequence[HealthResult]:
        return self.scheduler.health()
