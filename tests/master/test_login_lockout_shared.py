"""The password lockout kept in the master's SQL storage (revision 0003): shared by every
master on one database, kept across a restart, counted exactly under concurrency; and the
in-memory fallback for storage backends without the two optional methods."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from litestar.testing import TestClient
from sqlalchemy import Engine, create_engine, inspect, select
from sqlalchemy.engine import make_url

from nxmesh.core.interfaces import Credentials
from nxmesh.core.pluginmanager import NxMeshPluginManager
from nxmesh.core.records import User
from nxmesh.core.settings import AuthSettings, Settings
from nxmesh.master.app import build_app
from nxmesh.master.auth.errors import AuthenticationError, LockedOutError
from nxmesh.master.auth.passwords import Passwords
from nxmesh.plugins.auth_password import PasswordAuthenticator
from nxmesh.sql import tables
from nxmesh.sql.backend import SqlStorage
from nxmesh.sql.migrations import alembic_config, current_revision, head_revision
from nxmesh.sql.sqlite import SqliteStorage

from .conftest import FAST_HASHING

SETTINGS = AuthSettings(
    argon2_time_cost=FAST_HASHING["auth.argon2_time_cost"],
    argon2_memory_kib=FAST_HASHING["auth.argon2_memory_kib"],
    argon2_parallelism=FAST_HASHING["auth.argon2_parallelism"],
)


class _Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def password(username: str, secret: str, addr: str = "192.0.2.1") -> Credentials:
    return Credentials("password", {"username": username, "password": secret}, remote_addr=addr)


def _url(request: pytest.FixtureRequest, tmp_path: Path, kind: str) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'master.db'}"
    url: str = request.getfixturevalue("pg_database")
    return url


def _storage(url: str) -> SqlStorage:
    if url.startswith("sqlite"):
        return SqliteStorage(url)
    from nxmesh_storage_postgres import PostgresStorage

    return PostgresStorage(url)


def _failures(storage: SqlStorage, username: str, addr: str = "192.0.2.1") -> int | None:
    lf = tables.auth_login_failures
    query = select(lf.c.failures).where((lf.c.username == username) & (lf.c.remote_addr == addr))
    with storage.engine.connect() as conn:
        value = conn.execute(query).scalar()
    return None if value is None else int(value)


# -- migration ---------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def engine_at_0002(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An engine on a new database migrated to revision 0002."""
    url = make_url(_url(request, tmp_path, request.param))
    if url.get_backend_name() == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    engine = create_engine(url)
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0002")
    yield engine
    engine.dispose()


class TestMigration0003:
    def test_upgrade_from_0002_and_downgrade(self, engine_at_0002: Engine) -> None:
        assert "auth_login_failures" not in inspect(engine_at_0002).get_table_names()
        with engine_at_0002.begin() as conn:
            command.upgrade(alembic_config(conn), "head")
        with engine_at_0002.connect() as conn:
            assert current_revision(conn) == head_revision() == "0003"
            assert compare_metadata(MigrationContext.configure(conn), tables.metadata) == []
        with engine_at_0002.begin() as conn:
            command.downgrade(alembic_config(conn), "0002")
        assert "auth_login_failures" not in inspect(engine_at_0002).get_table_names()
        with engine_at_0002.connect() as conn:
            assert current_revision(conn) == "0002"


# -- shared counters ---------------------------------------------------------------------


@pytest.mark.anyio
class TestSharedLockout:
    @pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
    async def url(self, request: pytest.FixtureRequest, tmp_path: Path) -> str:
        return _url(request, tmp_path, request.param)

    @pytest.fixture
    async def two(self, url: str) -> AsyncIterator[tuple[SqlStorage, SqlStorage]]:
        """Two storages (as two masters would have) over one database."""
        first, second = _storage(url), _storage(url)
        await first.open()
        await second.open()
        try:
            yield first, second
        finally:
            await first.aclose()
            await second.aclose()

    async def test_two_masters_share_one_lockout(self, two: tuple[SqlStorage, SqlStorage]) -> None:
        """Failures on either master count toward one lock, which both enforce; a success
        on one clears it for both."""
        passwords = Passwords(SETTINGS)
        clock = _Clock()
        await two[0].put_user(User(username="ann", password_hash=passwords.hash("s3cret-pass")))
        a, b = (PasswordAuthenticator(s, passwords, SETTINGS, clock=clock) for s in two)
        assert a.shared is not None
        assert b.shared is not None
        for i in range(SETTINGS.lockout_threshold):
            with pytest.raises(AuthenticationError) as failed:
                await (a if i % 2 else b).authenticate(password("ann", "wrong"))
            assert not isinstance(failed.value, LockedOutError)
        for auth in (a, b):
            with pytest.raises(LockedOutError) as locked:
                await auth.authenticate(password("ann", "s3cret-pass"))
            assert locked.value.retry_after == 1
        assert a.lockout.failures(("ann", "192.0.2.1")) == 0  # not in process memory
        assert _failures(two[1], "ann") == SETTINGS.lockout_threshold
        # another address is unaffected; the doubling delay continues across masters
        assert await b.authenticate(password("ann", "s3cret-pass", addr="198.51.100.7"))
        clock.now += 1.5
        with pytest.raises(AuthenticationError):
            await b.authenticate(password("ann", "wrong"))
        with pytest.raises(LockedOutError) as longer:
            await a.authenticate(password("ann", "s3cret-pass"))
        assert longer.value.retry_after == 2
        clock.now += 2.5
        assert await a.authenticate(password("ann", "s3cret-pass"))
        assert _failures(two[1], "ann") is None

    async def test_concurrent_failures_count_exactly(
        self, two: tuple[SqlStorage, SqlStorage]
    ) -> None:
        """Two tasks per master hammering one key lose no increment."""
        per_task, now = 25, 1_000_000.0

        async def fail(storage: SqlStorage) -> None:
            for _ in range(per_task):
                counted, _, _ = await storage.count_login_failure(
                    "ann", "192.0.2.1", now=now, threshold=10_000, base_delay=1.0,
                    max_delay=900.0, forget_after=1800.0)  # fmt: skip
                assert counted

        async with anyio.create_task_group() as tg:
            for storage in (*two, *two):
                tg.start_soon(fail, storage)
        assert _failures(two[0], "ann") == 4 * per_task

    async def test_parallel_guesses_cannot_pass_the_lock(
        self, two: tuple[SqlStorage, SqlStorage]
    ) -> None:
        """Of many parallel attempts only `threshold` are counted; the rest are refused."""
        results: list[bool] = []

        async def attempt(storage: SqlStorage) -> None:
            counted, _, _ = await storage.count_login_failure(
                "ann", "192.0.2.1", now=1_000_000.0, threshold=5, base_delay=60.0,
                max_delay=900.0, forget_after=1800.0)  # fmt: skip
            results.append(counted)

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(attempt, two[i % 2])
        assert results.count(True) == 5
        assert _failures(two[0], "ann") == 5

    async def test_stale_failures_are_forgotten_and_pruned(
        self, two: tuple[SqlStorage, SqlStorage]
    ) -> None:
        """A counter idle longer than `forget_after` restarts at 1; idle rows get pruned."""
        storage = two[0]
        policy: dict[str, Any] = {
            "threshold": 5, "base_delay": 1.0, "max_delay": 10.0, "forget_after": 20.0
        }  # fmt: skip
        for _ in range(3):
            await storage.count_login_failure("ann", "192.0.2.1", now=100.0, **policy)
        counted, failures, _ = await storage.count_login_failure(
            "ann", "192.0.2.1", now=200.0, **policy
        )
        assert (counted, failures) == (True, 1)
        await storage.count_login_failure("bob", "192.0.2.1", now=100.0, **policy)
        for _ in range(SqlStorage._PRUNE_EVERY):
            await storage.count_login_failure("eve", "192.0.2.1", now=500.0, **policy)
        assert _failures(storage, "ann") is None
        assert _failures(storage, "bob") is None
        assert _failures(storage, "eve") == 5  # locked at the threshold, refused since


# -- restart -----------------------------------------------------------------------------


def test_lockout_survives_a_restart(
    plugin_manager: NxMeshPluginManager, master_settings: Settings
) -> None:
    """A new master over the same SQLite file still refuses the locked-out login."""
    threshold = master_settings.auth.lockout_threshold
    with TestClient(build_app(pm=plugin_manager, settings=master_settings)) as client:
        right = (client.app.state.services.state_dir / "initial-admin-password").read_text()
        for _ in range(threshold):
            r = client.post("/api/v1/auth/login", json={"username": "admin", "password": "bad"})
            assert r.status_code == 401
    with TestClient(build_app(pm=plugin_manager, settings=master_settings)) as client:
        login = {"username": "admin", "password": right.strip()}
        r = client.post("/api/v1/auth/login", json=login)
        assert r.status_code == 429
        assert r.json()["type"] == "urn:nxmesh:problem:locked-out"
        assert int(r.headers["retry-after"]) >= 1


# -- fallback ----------------------------------------------------------------------------


class _PlainUsers:
    """A storage backend without the optional lockout methods."""

    def __init__(self, *users: User) -> None:
        self.users = {u.username: u for u in users}

    async def get_user(self, username: str) -> User | None:
        return self.users.get(username)


@pytest.mark.anyio
async def test_backends_without_the_methods_keep_counters_in_memory() -> None:
    passwords = Passwords(SETTINGS)
    users = _PlainUsers(User(username="ann", password_hash=passwords.hash("s3cret-pass")))
    auth = PasswordAuthenticator(users, passwords, SETTINGS, clock=_Clock())  # type: ignore[arg-type]
    assert auth.shared is None
    for _ in range(SETTINGS.lockout_threshold):
        with pytest.raises(AuthenticationError):
            await auth.authenticate(password("ann", "wrong"))
    assert auth.lockout.failures(("ann", "192.0.2.1")) == SETTINGS.lockout_threshold
    with pytest.raises(LockedOutError):
        await auth.authenticate(password("ann", "s3cret-pass"))
