"""The renewal scheduler: when it renews, how it backs off, what it reports, who leads."""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import anyio
import pytest

from nxmesh.certs.acme_client import IssuedCertificate
from nxmesh.certs.distribution import placeholder_material
from nxmesh.certs.errors import AcmeChallengeError, AcmeRateLimitedError, ChallengeFailure
from nxmesh.certs.renewal import (
    DAY,
    CertificateMetrics,
    RenewalHealthCheck,
    RenewalPolicy,
    RenewalScheduler,
    leader_lock,
)
from nxmesh.certs.validate import fingerprint
from nxmesh.core.events import Event
from nxmesh.core.model import (
    CertificateRef,
    DesiredState,
    Listener,
    Location,
    Return,
    Site,
    TLSConfig,
)
from nxmesh.core.records import StoredCertificate
from nxmesh.plugins.storage_sqlite import SqliteStorage
from nxmesh.testing.pki import Pki
from nxmesh.testing.services import missing_service, require_module

pytestmark = pytest.mark.anyio

StoreState = Callable[[DesiredState], Awaitable[None]]
T0 = 1_900_000_000.0


def site(name: str, *names: str, acme: bool = True, certificate: str | None = None) -> Site:
    return Site(
        name=name,
        server_names=names,
        listeners=(Listener(port=80), Listener(port=443, tls=True)),
        tls=TLSConfig(acme=True) if acme else TLSConfig(certificate=certificate),
        locations=(Location(path="/", return_=Return(code=200)),),
    )


class FakeCa:
    """Issues from the test PKI, or raises the queued errors first."""

    def __init__(self, pki: Pki, *, days: float = 90, clock: Callable[[], float]) -> None:
        self.pki = pki
        self.days = days
        self.clock = clock
        self.errors: list[Exception] = []
        self.issued: list[tuple[str, ...]] = []

    async def issue(self, domains: Sequence[str]) -> IssuedCertificate:
        if self.errors:
            raise self.errors.pop(0)
        # Validity relative to the scheduler's clock, as a CA's would be.
        leaf = self.pki.leaf(*domains, days=(self.clock() - _now()) / DAY + self.days)
        self.issued.append(tuple(domains))
        return IssuedCertificate(
            domains=tuple(domains),
            cert_pem=leaf.pem,
            chain_pem=self.pki.intermediate.pem,
            key_pem=leaf.key_pem,
            not_before=leaf.cert.not_valid_before_utc.timestamp(),
            not_after=leaf.cert.not_valid_after_utc.timestamp(),
            fingerprint=fingerprint(leaf.cert),
            serial=leaf.cert.serial_number,
        )


def _now() -> float:
    return time.time()


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(_now())


@pytest.fixture
def ca(pki: Pki, clock: Clock) -> FakeCa:
    return FakeCa(pki, clock=clock)


@pytest.fixture
def events() -> list[Event]:
    return []


@pytest.fixture
def scheduler(
    storage: SqliteStorage, ca: FakeCa, clock: Clock, events: list[Event]
) -> RenewalScheduler:
    async def publish(event: Event) -> None:
        events.append(event)

    policy = RenewalPolicy(renew_jitter_hours=0, retry_initial=60, retry_max=3600)
    return RenewalScheduler(
        storage,
        ca,
        policy=policy,
        publish=publish,
        metrics=CertificateMetrics(),
        clock=clock,
        rng=random.Random(7),
    )


def counter(scheduler: RenewalScheduler, result: str) -> float:
    value: float = scheduler.metrics.renewals.labels(result=result)._value.get()
    return value


class TestSchedule:
    """Certificates are obtained when missing, changed or due, and not otherwise."""

    async def test_missing_certificate_is_issued_once(
        self, scheduler: RenewalScheduler, store_state: StoreState, ca: FakeCa, events: list[Event]
    ) -> None:
        """The first pass issues and stores; the second finds nothing to do."""
        await store_state(DesiredState(sites=(site("shop", "shop.example.test"),)))
        outcomes = await scheduler.run_once()
        assert [(o.name, o.result) for o in outcomes] == [("shop", "issued")]
        stored = await scheduler.storage.get_certificate("default", "shop")
        assert stored is not None
        assert stored.source == "acme"
        assert stored.domains == ("shop.example.test",)
        assert [e.kind for e in events] == ["cert.renewed"]
        assert events[0].payload["initial"] is True
        assert events[0].payload["sites"] == ["shop"]
        assert await scheduler.run_once() == []
        assert ca.issued == [("shop.example.test",)]

    async def test_wake_runs_a_pass_before_the_next_due_time(
        self, storage: SqliteStorage, ca: FakeCa, store_state: StoreState
    ) -> None:
        """A site added after a pass is ordered on `wake`, not an hour later."""
        scheduler = RenewalScheduler(storage, ca, policy=RenewalPolicy(check_interval=3600))
        async with anyio.create_task_group() as tg:
            await tg.start(scheduler.run)
            with anyio.fail_after(5):
                while scheduler._last_pass is None:  # the first pass: nothing to do
                    await anyio.sleep(0.01)
            assert not ca.issued
            await store_state(DesiredState(sites=(site("shop", "shop.example.test"),)))
            scheduler.wake()
            with anyio.fail_after(5):
                while not ca.issued:
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
        assert ca.issued == [("shop.example.test",)]
        assert counter(scheduler, "success") == 1

    async def test_placeholder_counts_as_missing(
        self, scheduler: RenewalScheduler, store_state: StoreState, storage: SqliteStorage
    ) -> None:
        """A stored stand-in certificate is replaced by a real one."""
        await store_state(DesiredState(sites=(site("shop", "shop.example.test"),)))
        stand_in = placeholder_material("shop", "certs/acme/shop", ["shop.example.test"])
        await storage.put_certificate(
            StoredCertificate(
                workspace="default",
                name="shop",
                cert_pem=stand_in.fullchain_pem,
                key_pem=stand_in.key_pem,
                not_after=stand_in.not_after,
                domains=("shop.example.test",),
                source="acme",
            )
        )
        assert [o.result for o in await scheduler.run_once()] == ["issued"]

    async def test_renews_inside_the_window_only(
        self, scheduler: RenewalScheduler, store_state: StoreState, ca: FakeCa, clock: Clock
    ) -> None:
        """61 days before expiry nothing happens; 29 days before, it renews."""
        await store_state(DesiredState(sites=(site("shop", "shop.example.test"),)))
        await scheduler.run_once()
        stored = await scheduler.storage.get_certificate("default", "shop")
        assert stored is not None
        clock.now = stored.not_after - 61 * DAY
        assert await scheduler.run_once() == []
        assert scheduler.next_due() == pytest.approx(stored.not_after - 30 * DAY)
        clock.now = stored.not_after - 29 * DAY
        outcomes = await scheduler.run_once()
        assert [(o.result, o.message) for o in outcomes] == [("renewed", "due")]
        assert len(ca.issued) == 2

    async def test_changed_domains_are_reissued_at_once(
        self, scheduler: RenewalScheduler, store_state: StoreState, ca: FakeCa
    ) -> None:
        """Adding a server name to the site orders a certificate for the new set."""
        await store_state(DesiredState(sites=(site("shop", "shop.example.test"),)))
        await scheduler.run_once()
        await store_state(
            DesiredState(sites=(site("shop", "shop.example.test", "www.shop.example.test"),))
        )
        outcomes = await scheduler.run_once()
        assert [(o.result, o.message) for o in outcomes] == [("renewed", "domains changed")]
        assert ca.issued[-1] == ("shop.example.test", "www.shop.example.test")

    async def test_acme_certificate_refs_are_obtained_too(
        self, scheduler: RenewalScheduler, store_state: StoreState, ca: FakeCa
    ) -> None:
        """A certificate listed with source acme is issued for its own domains."""
        state = DesiredState(
            certificates=(CertificateRef(name="wild", domains=("*.example.test",), source="acme"),),
            sites=(site("app", "app.example.test", acme=False, certificate="wild"),),
        )
        await store_state(state)
        await scheduler.run_once()
        assert ca.issued == [("*.example.test",)]

    async def test_uploaded_certificate_is_never_replaced(
        self,
        scheduler: RenewalScheduler,
        store_state: StoreState,
        storage: SqliteStorage,
        pki: Pki,
        events: list[Event],
    ) -> None:
        """An ACME site named like an uploaded certificate fails clearly instead."""
        await storage.put_certificate(pki.stored("shop", "shop.example.test"))
        await store_state(DesiredState(sites=(site("shop", "shop.example.test"),)))
        (outcome,) = await scheduler.run_once()
        assert outcome.result == "failed"
        assert "uploaded certificate" in outcome.message
        stored = await storage.get_certificate("default", "shop")
        assert stored is not None
        assert stored.source == "upload"
        assert events[-1].kind == "cert.renewal_failed"
        assert events[-1].payload["error_type"] == "CertificateConflictError"

    def test_jitter_is_stable_and_bounded(self) -> None:
        """Each certificate has its own renewal moment within the jitter window."""
        policy = RenewalPolicy(renew_before_days=30, renew_jitter_hours=24)
        not_after = T0 + 90 * DAY
        moments = {policy.renew_at("default", f"c{i}", not_after) for i in range(50)}
        latest = not_after - 30 * DAY
        assert all(latest - DAY <= m <= latest for m in moments)
        assert len(moments) == 50
        assert policy.renew_at("default", "c1", not_after) == policy.renew_at(
            "default", "c1", not_after
        )


class TestFailures:
    """Failures back off exponentially; rate limits wait for the CA's Retry-After."""

    async def test_backoff_doubles_and_resets_on_success(
        self,
        scheduler: RenewalScheduler,
        store_state: StoreState,
        ca: FakeCa,
        clock: Clock,
        events: list[Event],
    ) -> None:
        """Retries wait 60 s, then 120 s (+10 % jitter); a success clears the backoff."""
        await store_state(DesiredState(sites=(site("shop", "shop.example.test"),)))
        failure = ChallengeFailure("shop.example.test", "http-01", "unauthorized", "404")
        ca.errors = [AcmeChallengeError("no", failures=[failure])] * 2
        start = clock.now
        first = (await scheduler.run_once())[0]
        assert first.result == "failed"
        assert first.next_attempt is not None
        assert 60 <= first.next_attempt - start <= 66
        assert [o.result for o in await scheduler.run_once()] == ["backing_off"]
        assert len(ca.issued) == 0
        clock.now = first.next_attempt
        second = (await scheduler.run_once())[0]
        assert second.next_attempt is not None
        assert 120 <= second.next_attempt - clock.now <= 132
        clock.now = second.next_attempt
        assert [o.result for o in await scheduler.run_once()] == ["issued"]
        assert counter(scheduler, "failure") == 2
        assert [e.kind for e in events] == [
            "cert.renewal_failed",
            "cert.renewal_failed",
            "cert.renewed",
        ]
        assert events[1].payload["attempt"] == 2
        assert scheduler.next_due() > clock.now + 29 * DAY

    async def test_rate_limit_waits_for_retry_after(
        self, scheduler: RenewalScheduler, store_state: StoreState, ca: FakeCa, clock: Clock
    ) -> None:
        """A rateLimited error is not retried before its retry_at, however short the backoff."""
        await store_state(DesiredState(sites=(site("shop", "shop.example.test"),)))
        retry_at = clock.now + 3 * 3600
        ca.errors = [AcmeRateLimitedError("too many certificates", retry_at=retry_at)]
        (outcome,) = await scheduler.run_once()
        assert outcome.result == "rate_limited"
        assert outcome.next_attempt == retry_at
        assert counter(scheduler, "rate_limited") == 1
        clock.now = retry_at - 1
        assert [o.result for o in await scheduler.run_once()] == ["backing_off"]
        clock.now = retry_at
        assert [o.result for o in await scheduler.run_once()] == ["issued"]


class TestReporting:
    """Expiry becomes a gauge, an event and a health verdict."""

    async def test_expiring_upload_emits_one_event_a_day(
        self,
        scheduler: RenewalScheduler,
        storage: SqliteStorage,
        pki: Pki,
        clock: Clock,
        events: list[Event],
    ) -> None:
        """An uploaded certificate with 10 days left warns once, then again a day later."""
        await storage.put_certificate(pki.stored("web", "www.example.test", days=10))
        await scheduler.run_once()
        await scheduler.run_once()
        assert [e.kind for e in events] == ["cert.expiring"]
        assert events[0].payload["source"] == "upload"
        assert 9 < events[0].payload["days_left"] <= 10
        clock.now += DAY
        await scheduler.run_once()
        assert [e.kind for e in events] == ["cert.expiring", "cert.expiring"]

    async def test_days_to_expiry_gauge_follows_storage(
        self, scheduler: RenewalScheduler, storage: SqliteStorage, pki: Pki
    ) -> None:
        """The gauge has one series per stored certificate and drops deleted ones."""
        await storage.put_certificate(pki.stored("web", "www.example.test", days=50))
        await scheduler.run_once()
        text = scheduler.metrics.render().decode()
        assert (
            'nxmesh_certificate_days_to_expiry{name="web",source="upload",workspace="default"}'
            in text
        )
        await storage.delete_certificate("default", "web")
        await scheduler.run_once()
        assert 'name="web"' not in scheduler.metrics.render().decode()

    async def test_health_ok_warn_fail(
        self,
        scheduler: RenewalScheduler,
        store_state: StoreState,
        storage: SqliteStorage,
        pki: Pki,
        ca: FakeCa,
    ) -> None:
        """ok when valid, warn when expiring, fail when an ACME certificate never came."""
        await storage.put_certificate(pki.stored("web", "www.example.test", days=80))
        await scheduler.run_once()
        (result,) = await RenewalHealthCheck(scheduler).run()
        assert (result.check, result.status) == ("certs.renewal", "ok")
        await storage.put_certificate(pki.stored("web", "www.example.test", days=5))
        await scheduler.run_once()
        (result,) = scheduler.health()
        assert result.status == "warn"
        assert "default/web expires" in result.message
        await store_state(DesiredState(sites=(site("shop", "shop.example.test"),)))
        ca.errors = [AcmeRateLimitedError("slow down")]
        await scheduler.run_once()
        (result,) = scheduler.health()
        assert result.status == "fail"
        assert "default/shop was never issued" in result.message
        assert result.metrics["failing"] == 1


class TestLeadership:
    """Only the leader renews."""

    async def test_non_leader_does_nothing(
        self, storage: SqliteStorage, ca: FakeCa, store_state: StoreState
    ) -> None:
        """With the lock held elsewhere a pass returns at once without issuing."""

        @contextlib.asynccontextmanager
        async def follower() -> AsyncIterator[bool]:
            yield False

        await store_state(DesiredState(sites=(site("shop", "shop.example.test"),)))
        scheduler = RenewalScheduler(storage, ca, lock=follower)
        assert await scheduler.run_once() == []
        assert ca.issued == []

    async def test_sqlite_master_is_always_leader(self, storage: SqliteStorage) -> None:
        """SQLite serves one master: its lock is always held."""
        async with leader_lock(storage)() as leader:
            assert leader is True

    async def test_postgres_advisory_lock_elects_one_master(self) -> None:
        """Two masters on one PostgreSQL: the second cannot lead while the first does."""
        require_module("nxmesh_storage_postgres")
        from sqlalchemy import create_engine

        url = os.environ.get(
            "NXMESH_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ).replace("postgresql://", "postgresql+psycopg://", 1)

        class PgMaster:
            def __init__(self) -> None:
                self.engine = create_engine(url, connect_args={"connect_timeout": 3})

        first, second = PgMaster(), PgMaster()
        try:
            try:
                async with (
                    leader_lock(first, "test-renewals")() as one,
                    leader_lock(second, "test-renewals")() as two,
                ):
                    assert (one, two) == (True, False)
                async with leader_lock(second, "test-renewals")() as again:
                    assert again is True
            except Exception as exc:
                if "connect" in str(exc).lower():
                    missing_service("PostgreSQL on 127.0.0.1:5432")
                raise
        finally:
            first.engine.dispose()
            second.engine.dispose()

    async def test_run_loop_passes_and_stops_on_cancel(
        self, scheduler: RenewalScheduler, store_state: StoreState, ca: FakeCa
    ) -> None:
        """The background loop issues on its first pass and ends cleanly when cancelled."""
        await store_state(DesiredState(sites=(site("shop", "shop.example.test"),)))
        async with anyio.create_task_group() as tg:
            await tg.start(scheduler.run)
            with anyio.fail_after(5):
                while not ca.issued:
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
        assert ca.issued == [("shop.example.test",)]
