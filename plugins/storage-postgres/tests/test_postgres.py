"""The PostgreSQL backend, event bus and advisory lock against the real PostgreSQL.

Each test session creates its own database ``nxmesh_test_<random>`` (dropped at the end)
on ``NXMESH_TEST_POSTGRES_URL`` (default ``postgresql://postgres@127.0.0.1:5432/postgres``);
tests start from empty tables. Without a reachable server the tests skip locally and
fail in CI.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from psycopg import sql
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from nxmesh.core.events import Event
from nxmesh.core.model import Agent
from nxmesh.core.records import AgentKey, RetentionPolicy, StorageError, StoredCertificate
from nxmesh.core.registry import ProviderRegistries
from nxmesh.core.settings import load_settings
from nxmesh.crypto.secrets import MasterKeyring, generate_key
from nxmesh.sql.migrations import current_revision, head_revision, upgrade_to_head
from nxmesh.sql.tables import metadata
from nxmesh.testing.contracts import EventBusContract, StorageContract
from nxmesh.testing.contracts.storage import StorageFactory
from nxmesh.testing.factories import make_version
from nxmesh.testing.services import missing_service
from nxmesh_storage_postgres import PostgresEventBus, PostgresSettings, PostgresStorage
from nxmesh_storage_postgres.eventbus import LISTENER_APPLICATION_NAME, MAX_NOTIFY_BYTES
from nxmesh_storage_postgres.locks import advisory_lock

pytestmark = pytest.mark.postgres

ADMIN_URL = os.environ.get(
    "NXMESH_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


class _Server:
    """Creates and drops scratch databases through the maintenance database."""

    def __init__(self, admin: psycopg.Connection[tuple[object, ...]]) -> None:
        self.admin = admin

    def create(self) -> str:
        name = f"nxmesh_test_{secrets.token_hex(6)}"
        self.admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)

    def drop(self, url: str) -> None:
        name = make_url(url).database
        assert name is not None
        self.admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture(scope="session")
def pg_server() -> Iterator[_Server]:
    try:
        admin = psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError:
        missing_service("PostgreSQL on 127.0.0.1:5432")
        raise AssertionError("unreachable") from None  # pragma: no cover
    with admin:
        yield _Server(admin)


@pytest.fixture(scope="session")
def pg_url(pg_server: _Server) -> Iterator[str]:
    """This session's database, migrated to head once."""
    url = pg_server.create()
    engine = create_engine(make_url(url).set(drivername="postgresql+psycopg"))
    try:
        upgrade_to_head(engine)
    finally:
        engine.dispose()
    yield url
    pg_server.drop(url)


@pytest.fixture
def scratch_url(pg_server: _Server) -> Iterator[str]:
    """A new, empty database for this test only."""
    url = pg_server.create()
    yield url
    pg_server.drop(url)


@pytest.fixture
def empty_db(pg_url: str) -> str:
    """The session database with every table emptied."""
    # DELETE, children first: on a handful of rows it is much cheaper than TRUNCATE.
    with psycopg.connect(pg_url) as conn:
        for table in reversed(metadata.sorted_tables):
            conn.execute(sql.SQL("DELETE FROM {}").format(sql.Identifier(table.name)))
    return pg_url


@pytest.fixture
def pg_engine(pg_url: str) -> Iterator[Engine]:
    engine = create_engine(make_url(pg_url).set(drivername="postgresql+psycopg"))
    yield engine
    engine.dispose()


class TestPostgres(StorageContract):
    """The storage contract on PostgreSQL."""

    @pytest.fixture
    def storage_factory(self, empty_db: str, master_keyring: MasterKeyring) -> StorageFactory:
        def factory(*, keyring: MasterKeyring | None = master_keyring) -> PostgresStorage:
            return PostgresStorage(empty_db, keyring=keyring)

        return factory


class TestPostgresBus(EventBusContract):
    """The event bus contract over LISTEN/NOTIFY."""

    @pytest.fixture
    def bus_factory(self, empty_db: str) -> Callable[[], PostgresEventBus]:
        return lambda: PostgresEventBus(empty_db)


@pytest.fixture
async def two_buses(empty_db: str) -> AsyncIterator[tuple[PostgresEventBus, PostgresEventBus]]:
    """Two buses, as two master processes would have, on the same database."""
    first, second = PostgresEventBus(empty_db), PostgresEventBus(empty_db)
    await first.open()
    try:
        await second.open()
        try:
            yield first, second
        finally:
            await second.aclose()
    finally:
        await first.aclose()


@pytest.mark.anyio
class TestBetweenMasters:
    async def test_an_event_reaches_the_other_bus(
        self, two_buses: tuple[PostgresEventBus, PostgresEventBus]
    ) -> None:
        """An event published on one bus reaches subscribers of both, intact."""
        first, second = two_buses
        sent = Event(kind="version.created", payload={"number": 7, "sites": ["a", "b"]})
        async with first.subscribe() as mine, second.subscribe() as theirs:
            await first.publish(sent)
            with anyio.fail_after(10):
                got_mine = await mine.__anext__()
                got_theirs = await theirs.__anext__()
        for got in (got_mine, got_theirs):
            assert (got.id, got.kind, got.ts, got.workspace) == (
                sent.id,
                sent.kind,
                sent.ts,
                sent.workspace,
            )
            assert got.payload == {"number": 7, "sites": ["a", "b"]}

    async def test_large_events_travel_through_the_payload_table(
        self, two_buses: tuple[PostgresEventBus, PostgresEventBus], empty_db: str
    ) -> None:
        """An event larger than a NOTIFY payload arrives whole, in order with small ones."""
        first, second = two_buses
        big = Event(kind="big", payload={"blob": "x" * (MAX_NOTIFY_BYTES + 5000)})
        async with second.subscribe() as events:
            await first.publish(Event(kind="before"))
            await first.publish(big)
            await first.publish(Event(kind="after"))
            with anyio.fail_after(10):
                received = [await events.__anext__() for _ in range(3)]
        assert [e.kind for e in received] == ["before", "big", "after"]
        assert received[1].payload == big.payload
        with psycopg.connect(empty_db) as conn:
            row = conn.execute("SELECT count(*) FROM event_payloads").fetchone()
        assert row == (1,)

    async def test_retention_prunes_the_payload_table(
        self, two_buses: tuple[PostgresEventBus, PostgresEventBus], empty_db: str
    ) -> None:
        """A large event's parked payload stays while it is recent and goes once the
        storage's retention pass (`prune`) is given a later cutoff."""
        first, _ = two_buses
        await first.publish(Event(kind="big", payload={"blob": "x" * (MAX_NOTIFY_BYTES + 10)}))
        storage = PostgresStorage(empty_db)
        await storage.open()
        try:
            recent = RetentionPolicy(event_payloads_before=time.time() - 3600)
            assert await storage.prune(recent) == {"event_payloads": 0}
            later = RetentionPolicy(event_payloads_before=time.time() + 60)
            assert await storage.prune(later) == {"event_payloads": 1}
        finally:
            await storage.aclose()
        with psycopg.connect(empty_db) as conn:
            assert conn.execute("SELECT count(*) FROM event_payloads").fetchone() == (0,)

    async def test_a_lost_listener_ends_subscriptions_and_recovers(
        self, two_buses: tuple[PostgresEventBus, PostgresEventBus], empty_db: str
    ) -> None:
        """When the listening connection dies, subscriptions end (resync needed) and new
        ones work once the bus has reconnected."""
        first, second = two_buses
        async with second.subscribe() as events:
            with psycopg.connect(empty_db, autocommit=True) as conn:
                killed = conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = %s AND datname = current_database() "
                    "AND pid <> pg_backend_pid()",
                    (LISTENER_APPLICATION_NAME,),
                ).fetchall()
            assert len(killed) >= 2  # one listener per bus (and any still exiting)
            with anyio.fail_after(10):
                leftover = [e async for e in events]
        assert leftover == []
        with anyio.fail_after(15):
            async with second.subscribe() as events:
                await first.publish(Event(kind="after.reconnect"))
                event = await events.__anext__()
        assert event.kind == "after.reconnect"

    async def test_unreachable_database_fails_open_clearly(self) -> None:
        """Opening a bus on a server that does not answer raises StorageError."""
        bus = PostgresEventBus(
            "postgresql://postgres@127.0.0.1:1/nothing",
            settings=PostgresSettings(connect_timeout=2),
        )
        with pytest.raises(StorageError, match="cannot connect"):
            await bus.open()


@pytest.mark.anyio
class TestAdvisoryLock:
    async def test_only_one_holder_at_a_time(self, pg_url: str, pg_engine: Engine) -> None:
        """A second engine (another master), or another connection of the same engine,
        cannot take a held lock; once released, it can."""
        other = create_engine(make_url(pg_url).set(drivername="postgresql+psycopg"))
        try:
            async with advisory_lock(pg_engine, "acme") as first:
                assert first is True
                async with advisory_lock(other, "acme") as second:
                    assert second is False
                async with advisory_lock(pg_engine, "acme") as same_engine:
                    assert same_engine is False
                async with advisory_lock(other, "another-job") as unrelated:
                    assert unrelated is True
            async with advisory_lock(other, "acme") as after:
                assert after is True
        finally:
            other.dispose()

    async def test_lock_is_released_when_the_block_is_cancelled(self, pg_engine: Engine) -> None:
        """Cancelling the holder releases the lock."""
        with anyio.move_on_after(0.1):
            async with advisory_lock(pg_engine, "renewals") as held:
                assert held is True
                await anyio.sleep(5)
        async with advisory_lock(pg_engine, "renewals") as again:
            assert again is True


@pytest.mark.anyio
class TestPostgresBackend:
    async def test_pool_is_sized_from_settings(self, empty_db: str) -> None:
        """The pool holds pool_max_size connections and opens pool_min_size up front."""
        storage = PostgresStorage(
            empty_db, settings=PostgresSettings(pool_min_size=3, pool_max_size=7)
        )
        await storage.open()
        try:
            pool = storage.engine.pool
            assert pool.size() == 7  # type: ignore[attr-defined]
            assert pool.checkedin() == 3  # type: ignore[attr-defined]
        finally:
            await storage.aclose()

    def test_built_from_settings(self, make_plugin_manager: Callable[..., Any]) -> None:
        """from_settings uses storage_url / event_bus_url and the plugin's pool section."""
        pm = make_plugin_manager(autoload=True)
        settings = load_settings(
            pm,
            environ={
                "NXMESH_STORAGE_URL": "postgresql://db.internal/nxmesh",
                "NXMESH_EVENT_BUS_URL": "postgresql://bus.internal/nxmesh",
                "NXMESH_PLUGINS__STORAGE_POSTGRES__POOL_MAX_SIZE": "25",
            },
        )
        storage = PostgresStorage.from_settings(settings)
        bus = PostgresEventBus.from_settings(settings)
        assert (storage.url, storage.settings.pool_max_size) == (
            "postgresql://db.internal/nxmesh",
            25,
        )
        assert (bus.url, bus.settings.pool_max_size) == ("postgresql://bus.internal/nxmesh", 25)

    async def test_postgres_scheme_is_accepted(self, empty_db: str) -> None:
        """``postgres://`` URLs work like ``postgresql://`` (both pick this backend: see
        `test_registered_for_postgres_urls`)."""
        url = empty_db.replace("postgresql://", "postgres://", 1)
        storage = PostgresStorage(url)
        await storage.open()
        try:
            await storage.add_version(make_version(1))
        finally:
            await storage.aclose()

    def test_registered_for_postgres_urls(self, make_plugin_manager: Callable[..., Any]) -> None:
        """The plugin registers the backend and the bus for postgresql:// URLs."""
        registries = ProviderRegistries.collect(make_plugin_manager(autoload=True))
        for scheme in ("postgresql", "postgres"):
            assert registries["storage"].by_scheme(f"{scheme}://db/nxmesh") is PostgresStorage
            assert registries["event_bus"].by_scheme(f"{scheme}://db/nxmesh") is PostgresEventBus

    async def test_unreachable_server_is_a_clear_error(self) -> None:
        """A server that does not answer gives StorageError naming it, without the password."""
        storage = PostgresStorage(
            "postgresql://nx:hunter2@127.0.0.1:1/nxmesh",
            settings=PostgresSettings(connect_timeout=2),
        )
        with pytest.raises(StorageError, match=r"127\.0\.0\.1:1/nxmesh") as caught:
            await storage.open()
        assert "hunter2" not in str(caught.value)


@pytest.mark.anyio
class TestRewrapBetweenMasters:
    async def test_a_secret_stored_during_a_rewrap_is_not_overwritten(
        self, empty_db: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Another master stores a new private key (an ACME renewal) and replaces a session
        key between the rewrap's read and its updates: the new secrets survive, the rewrap
        skips those rows (they are under the current key already)."""
        old, new = generate_key(), generate_key()

        def cert(tag: str) -> StoredCertificate:
            return StoredCertificate(workspace="default", name="www", cert_pem=f"CERT-{tag}",
                                     key_pem=f"KEY-{tag}", not_after=2e9)  # fmt: skip

        def key(secret: bytes) -> AgentKey:
            return AgentKey(agent_id="a1", key_id="k1", secret=secret, created_at=1.0,
                            expires_at=2e9)  # fmt: skip

        before = PostgresStorage(empty_db, keyring=MasterKeyring(old))
        ring = MasterKeyring(new, previous=[old])
        rotator, other = (
            PostgresStorage(empty_db, keyring=ring),
            PostgresStorage(empty_db, keyring=ring),
        )
        for storage in (before, rotator, other):
            await storage.open()
        try:
            await before.put_certificate(cert("v1"))
            await before.upsert_agent(Agent(id="a1", name="edge-1"))
            await before.add_agent_key(key(b"old-secret" * 4))

            async def meanwhile() -> None:
                await other.put_certificate(cert("v2"))
                await other.revoke_agent_keys("a1")
                await other.add_agent_key(key(b"new-secret" * 4))

            def interleave(operation: str) -> None:
                # In the rewrap's worker thread, after its reads, before its updates.
                assert operation == "rewrap_secrets"
                anyio.from_thread.run(meanwhile)

            monkeypatch.setattr(rotator, "_checkpoint", interleave)
            assert await rotator.rewrap_secrets() == 0
            monkeypatch.undo()
            current = PostgresStorage(empty_db, keyring=MasterKeyring(new))
            await current.open()
            try:
                got = await current.get_certificate("default", "www")
                assert got is not None
                assert (got.cert_pem, got.key_pem) == ("CERT-v2", "KEY-v2")
                stored = await current.get_agent_key("a1", "k1")
                assert stored is not None
                assert stored.secret == b"new-secret" * 4
            finally:
                await current.aclose()
        finally:
            for storage in (before, rotator, other):
                await storage.aclose()


@pytest.mark.anyio
class TestPostgresMigrations:
    async def test_fresh_database_migrates_to_head_once(self, scratch_url: str) -> None:
        """An empty database is migrated when first opened; later opens change nothing."""
        storage = PostgresStorage(scratch_url)
        await storage.open()
        try:
            with storage.engine.connect() as conn:
                assert current_revision(conn) == head_revision()
            assert upgrade_to_head(storage.engine) is False
        finally:
            await storage.aclose()

    async def test_migrations_match_the_table_definitions(self, pg_engine: Engine) -> None:
        """A database migrated to head has exactly the schema `nxmesh.sql.tables` describes."""
        with pg_engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
        assert diff == []

    async def test_concurrent_first_opens_migrate_once(self, scratch_url: str) -> None:
        """Several masters opening a new database at once all end up at head."""
        instances = [PostgresStorage(scratch_url) for _ in range(4)]
        try:
            async with anyio.create_task_group() as tg:
                for instance in instances:
                    tg.start_soon(instance.open)
            await instances[0].add_version(make_version(1))
            assert await instances[3].get_version("default", 1) is not None
            with instances[0].engine.connect() as conn:
                count = conn.execute(text("SELECT count(*) FROM alembic_version")).scalar()
            assert count == 1
        finally:
            for instance in instances:
                await instance.aclose()
