"""The built-in SQLite storage: the storage contract, its migrations and its pragmas."""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, create_engine, event, insert, select, text

from nxmesh.core.model import Agent
from nxmesh.core.pluginmanager import NxMeshPluginManager
from nxmesh.core.records import (
    AgentKey,
    AuditEntry,
    RetentionPolicy,
    StorageError,
    VersionConflictError,
)
from nxmesh.core.registry import ProviderRegistries
from nxmesh.core.settings import load_settings
from nxmesh.crypto.secrets import MasterKeyring, SecretError
from nxmesh.plugins.storage_sqlite import SqliteStorage
from nxmesh.sql.migrations import (
    alembic_config,
    current_revision,
    head_revision,
    upgrade_to_head,
)
from nxmesh.sql.tables import event_payloads, metadata
from nxmesh.testing.contracts import StorageContract
from nxmesh.testing.contracts.storage import StorageFactory
from nxmesh.testing.factories import make_version

KEYRING = MasterKeyring(b"k" * 32)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "master.db"


@pytest.fixture
async def opened(db_path: Path) -> AsyncIterator[SqliteStorage]:
    storage = SqliteStorage(f"sqlite:///{db_path}", keyring=KEYRING)
    await storage.open()
    try:
        yield storage
    finally:
        await storage.aclose()


@pytest.fixture
def raw_engine(db_path: Path) -> Iterator[Engine]:
    """A plain engine on the database file, without the backend's connection setup."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(f"sqlite:///{db_path}")
    yield engine
    engine.dispose()


class TestSqlite(StorageContract):
    """The storage contract on a SQLite file."""

    @pytest.fixture
    def storage_factory(self, db_path: Path, master_keyring: MasterKeyring) -> StorageFactory:
        url = f"sqlite:///{db_path}"

        def factory(*, keyring: MasterKeyring | None = master_keyring) -> SqliteStorage:
            return SqliteStorage(url, keyring=keyring)

        return factory


class TestRegistration:
    def test_sqlite_urls_pick_this_backend(self, plugin_manager: NxMeshPluginManager) -> None:
        """The built-in plugin registers the backend for sqlite:// URLs."""
        storage = ProviderRegistries.collect(plugin_manager)["storage"]
        assert storage.by_scheme("sqlite:///var/lib/nxmesh/master.db") is SqliteStorage
        assert storage.get("sqlite") is SqliteStorage

    def test_built_from_settings(self, tmp_path: Path, plugin_manager: NxMeshPluginManager) -> None:
        """Without a storage_url the database is master.db in the state directory."""
        settings = load_settings(plugin_manager, environ={"NXMESH_STATE_DIR": str(tmp_path)})
        storage = SqliteStorage.from_settings(settings, keyring=KEYRING)
        assert storage.path == tmp_path / "master.db"
        assert storage.keyring is KEYRING


@pytest.mark.anyio
class TestMigrations:
    async def test_fresh_database_migrates_to_head(self, opened: SqliteStorage) -> None:
        """Opening an empty file creates every table at the newest revision."""
        with opened.engine.connect() as conn:
            assert current_revision(conn) == head_revision()
            tables = {r[0] for r in conn.execute(text("SELECT name FROM sqlite_master"))}
        assert set(metadata.tables) <= tables

    async def test_reopening_runs_no_migration(self, opened: SqliteStorage, db_path: Path) -> None:
        """Migrating a database at head is a no-op: no DDL, no writes, data kept."""
        await opened.add_version(make_version(1))
        statements: list[str] = []
        event.listen(
            opened.engine,
            "before_cursor_execute",
            lambda _c, _cur, statement, *_a: statements.append(statement),
        )
        assert upgrade_to_head(opened.engine) is False
        changing = {"CREATE", "ALTER", "DROP", "INSERT", "UPDATE", "DELETE"}
        assert not [s for s in statements if s.split()[0].upper() in changing]
        again = SqliteStorage(f"sqlite:///{db_path}")
        await again.open()
        try:
            assert await again.get_version("default", 1) is not None
        finally:
            await again.aclose()

    async def test_migrations_match_the_table_definitions(self, opened: SqliteStorage) -> None:
        """A database migrated to head has exactly the schema `nxmesh.sql.tables` describes."""
        with opened.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
        assert diff == []

    async def test_downgrade_to_base_and_back(self, opened: SqliteStorage) -> None:
        """The revisions downgrade to an empty database and upgrade again (development)."""
        with opened.engine.begin() as conn:
            command.downgrade(alembic_config(conn), "base")
        with opened.engine.connect() as conn:
            left = conn.execute(text("SELECT name FROM sqlite_master WHERE type = 'table'"))
            assert {r[0] for r in left} == {"alembic_version"}
        assert upgrade_to_head(opened.engine) is True
        await opened.add_version(make_version(1))

    async def test_unknown_newer_revision_is_refused(
        self, opened: SqliteStorage, db_path: Path
    ) -> None:
        """A database migrated by a newer release is not touched; the error says why."""
        with opened.engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = 'ffff'"))
        newer = SqliteStorage(f"sqlite:///{db_path}")
        with pytest.raises(StorageError, match=r"'ffff'.*newer release"):
            await newer.open()

    async def test_concurrent_first_opens_migrate_once(self, db_path: Path) -> None:
        """Several backends opening the same new file at once all end up at head."""
        instances = [SqliteStorage(f"sqlite:///{db_path}") for _ in range(4)]
        async with anyio.create_task_group() as tg:
            for instance in instances:
                tg.start_soon(instance.open)
        try:
            await instances[0].add_version(make_version(1))
            assert await instances[3].get_version("default", 1) is not None
        finally:
            for instance in instances:
                await instance.aclose()


@pytest.mark.anyio
class TestRetention:
    async def test_pruning_deletes_in_bounded_batches(self, opened: SqliteStorage) -> None:
        """Each batch of ``batch_size`` rows is one DELETE in its own write transaction:
        a large backlog never holds the write lock for the whole table."""
        for i in range(25):
            await opened.append_audit(AuditEntry(ts=float(i), actor="a", action="x"))
        statements: list[str] = []
        event.listen(
            opened.engine,
            "before_cursor_execute",
            lambda _c, _cur, statement, *_a: statements.append(statement),
        )
        counts = await opened.prune(RetentionPolicy(audit_before=100.0, batch_size=10))
        assert counts == {"audit_log": 25}
        deletes = [s for s in statements if s.lstrip().upper().startswith("DELETE")]
        assert len(deletes) == 3  # 10, 10, 5: the short batch ends the table
        assert statements.count("BEGIN IMMEDIATE") == 3
        assert await opened.list_audit() == []

    async def test_old_event_payloads_are_pruned(self, opened: SqliteStorage) -> None:
        """Parked event payloads (the PostgreSQL bus's table, empty on SQLite unless a
        bus shares the file) older than the cutoff go; newer ones stay."""
        with opened.engine.begin() as conn:
            conn.execute(
                insert(event_payloads),
                [{"created_at": 10.0, "body": "{}"}, {"created_at": 5000.0, "body": "{}"}],
            )
        policy = RetentionPolicy(event_payloads_before=4000.0)
        assert await opened.prune(policy) == {"event_payloads": 1}
        with opened.engine.connect() as conn:
            left = conn.execute(select(event_payloads.c.created_at)).scalars().all()
        assert left == [5000.0]


@pytest.mark.anyio
class TestConnections:
    async def test_every_connection_uses_wal_and_foreign_keys(self, opened: SqliteStorage) -> None:
        """Pooled connections run in WAL mode with foreign keys enforced and a busy timeout."""
        engine = opened.engine
        with engine.connect() as first, engine.connect() as second:
            for conn in (first, second):
                assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
                assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
                assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000

    async def test_files_are_private(self, opened: SqliteStorage, db_path: Path) -> None:
        """The database directory is created 0700 and the database file 0600."""
        modes = [stat.S_IMODE(os.stat(p).st_mode) for p in (db_path.parent, db_path)]
        assert modes == [0o700, 0o600]

    async def test_secrets_are_absent_from_the_files(
        self, opened: SqliteStorage, db_path: Path
    ) -> None:
        """The session key's bytes appear nowhere in the database file or its WAL."""
        secret = os.urandom(32)
        await opened.upsert_agent(Agent(id="a1", name="edge-1"))
        await opened.add_agent_key(
            AgentKey(agent_id="a1", key_id="k1", secret=secret, expires_at=9e9)
        )
        on_disk = b"".join(p.read_bytes() for p in db_path.parent.iterdir())
        assert b"edge-1" in on_disk  # the data did reach the files
        assert secret not in on_disk

    async def test_a_secret_moved_to_another_row_does_not_decrypt(
        self, opened: SqliteStorage
    ) -> None:
        """Encrypted columns are bound to their row: copying one over another fails."""
        await opened.upsert_agent(Agent(id="a1", name="edge-1"))
        for key_id in ("k1", "k2"):
            await opened.add_agent_key(
                AgentKey(agent_id="a1", key_id=key_id, secret=os.urandom(32), expires_at=9e9)
            )
        with opened.engine.begin() as conn:
            conn.execute(
                text(
                    "UPDATE agent_keys SET secret = "
                    "(SELECT secret FROM agent_keys WHERE key_id = 'k1') WHERE key_id = 'k2'"
                )
            )
        with pytest.raises(SecretError, match="another record"):
            await opened.get_agent_key("a1", "k2")

    async def test_in_memory_database_serialises_operations(self) -> None:
        """``sqlite://`` is one private in-memory database; concurrent writers still race
        correctly for a version number."""
        storage = SqliteStorage("sqlite://", keyring=KEYRING)
        await storage.open()
        outcomes: list[bool] = []

        async def attempt() -> None:
            try:
                await storage.add_version(make_version(1))
            except VersionConflictError:
                outcomes.append(False)
            else:
                outcomes.append(True)

        try:
            async with anyio.create_task_group() as tg:
                for _ in range(5):
                    tg.start_soon(attempt)
            assert sorted(outcomes) == [False] * 4 + [True]
            assert await storage.get_version("default", 1) is not None
        finally:
            await storage.aclose()

    async def test_closed_backend_says_so(self, db_path: Path) -> None:
        """Using a backend before open raises StorageError instead of a driver error."""
        with pytest.raises(StorageError, match="not open"):
            await SqliteStorage(f"sqlite:///{db_path}").get_agent("a1")
