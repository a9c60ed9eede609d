"""Retention: the settings, the auth store's token pruning and the master's periodic job
(`nxmesh.master.retention`). The storage side is in the storage contract suite
(`StorageContract.test_prune_*`, on SQLite and PostgreSQL)."""

from __future__ import annotations

import contextlib
import gc
import shutil
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from structlog.testing import capture_logs

from nxmesh.core.errors import ConfigurationError
from nxmesh.core.pluginmanager import NxMeshPluginManager
from nxmesh.core.records import AuditEntry, BootstrapToken, RetentionPolicy, StorageError
from nxmesh.core.runtime import Runtime, run
from nxmesh.core.settings import MasterSettings, Settings
from nxmesh.master.auth.store import (
    ApiTokenRecord,
    AuthStore,
    MemoryAuthStore,
    NewRefresh,
    RefreshRecord,
    SqlAuthStore,
)
from nxmesh.master.metrics import MasterMetrics
from nxmesh.master.retention import (
    EVENT_PAYLOAD_RETENTION,
    LOCK_NAME,
    RetentionJob,
    retention_policy,
    run_retention,
)
from nxmesh.master.server import DEFAULT_COMPONENTS, MASTER_SERVICES, run_master
from nxmesh.plugins.storage_sqlite import SqliteStorage

from .conftest import make_settings

pytestmark = pytest.mark.anyio

DAY = 86400.0
NOW = 1_800_000_000.0


@pytest.fixture(autouse=True)
def _restore_gc_threshold() -> Iterator[None]:
    """`run_master` tunes the collector process-wide; the rest of the suite keeps its own."""
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)


@pytest.fixture
def settings(plugin_manager: NxMeshPluginManager, tmp_path: Path) -> Settings:
    return make_settings(plugin_manager, tmp_path / "state")


@pytest.fixture
async def sqlite(tmp_path: Path) -> AsyncIterator[SqliteStorage]:
    storage = SqliteStorage(f"sqlite:///{tmp_path / 'master.db'}")
    await storage.open()
    try:
        yield storage
    finally:
        await storage.aclose()


@contextlib.asynccontextmanager
async def _leader(held: bool = True) -> AsyncIterator[bool]:
    yield held


def _sample(metrics: MasterMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# ---------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------


class TestSettings:
    def test_defaults(self) -> None:
        """Hourly passes; a year of audit log; statuses of the latest 20 versions; spent
        tokens kept a week; 1000 rows per delete."""
        master = MasterSettings()
        assert master.retention_interval == 3600.0
        assert master.audit_retention_days == 365.0
        assert master.status_retention_versions == 20
        assert master.token_retention_days == 7.0
        assert master.retention_batch_size == 1000

    @pytest.mark.parametrize(
        ("key", "value", "reason"),
        [
            ("retention_interval", 0, "must be greater than 0"),
            ("audit_retention_days", -1, "0 or more"),
            ("audit_retention_days", "inf", "0 or more"),
            ("token_retention_days", "nan", "0 or more"),
            ("status_retention_versions", -1, "0 or more"),
            ("retention_batch_size", 0, ">= 1"),
            ("retention_batch_size", 1_000_000, "<= 100000"),
        ],
    )
    def test_bad_values_name_the_setting(
        self, plugin_manager: NxMeshPluginManager, key: str, value: object, reason: str
    ) -> None:
        """A bad retention setting is refused with its key, where it came from and why."""
        with pytest.raises(ConfigurationError) as info:
            make_settings(plugin_manager, Path("state"), **{f"master.{key}": value})
        message = str(info.value)
        assert f"'master.{key}'" in message
        assert reason in message

    def test_environment_variables_set_them(self, plugin_manager: NxMeshPluginManager) -> None:
        """Like every setting, ``NXMESH_MASTER__…`` variables set them."""
        from nxmesh.core.settings import load_settings

        settings = load_settings(
            plugin_manager,
            environ={
                "NXMESH_MASTER__AUDIT_RETENTION_DAYS": "0",
                "NXMESH_MASTER__STATUS_RETENTION_VERSIONS": "5",
            },
        )
        assert settings.master.audit_retention_days == 0
        assert settings.master.status_retention_versions == 5

    def test_policy_from_settings(self, plugin_manager: NxMeshPluginManager) -> None:
        """Days become cutoffs before now; 0 keeps forever (no cutoff); stale failed-login
        counters and parked event payloads always go."""
        settings = make_settings(
            plugin_manager,
            Path("state"),
            **{
                "master.audit_retention_days": 30,
                "master.token_retention_days": 0,
                "master.status_retention_versions": 3,
                "master.retention_batch_size": 50,
                "auth.lockout_max_delay": 600,
            },
        )
        assert retention_policy(settings, NOW) == RetentionPolicy(
            audit_before=NOW - 30 * DAY,
            tokens_before=None,
            status_versions=3,
            event_payloads_before=NOW - EVENT_PAYLOAD_RETENTION,
            login_failures_before=NOW - 1200,
            batch_size=50,
        )

    def test_settings_meaning_keep_forever_never_fail_a_pass(
        self, plugin_manager: NxMeshPluginManager
    ) -> None:
        """Settings the validation accepts always give a policy: days so many their
        cutoff is no number, an endless lockout delay and more versions than a workspace
        can have keep those rows (the pass would otherwise fail every time, for every
        table, naming no setting)."""
        settings = make_settings(
            plugin_manager,
            Path("state"),
            **{
                "master.audit_retention_days": 1e306,
                "master.token_retention_days": 1e306,
                "master.status_retention_versions": 2**40,
                "auth.lockout_max_delay": "inf",
            },
        )
        policy = retention_policy(settings, NOW)
        assert policy.audit_before is None
        assert policy.tokens_before is None
        assert policy.login_failures_before is None
        assert policy.status_versions == 2**31 - 1


# ---------------------------------------------------------------------------------------
# The auth store: refresh tokens and API tokens
# ---------------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def auth_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'auth.db'}"
    url: str = request.getfixturevalue("pg_database")
    return url


@pytest.fixture
async def auth_store(auth_store_url: str) -> AsyncIterator[AuthStore]:
    if auth_store_url == "memory://":
        yield MemoryAuthStore()
        return
    storage: Any
    if auth_store_url.startswith("sqlite"):
        storage = SqliteStorage(auth_store_url)
    else:
        from nxmesh_storage_postgres import PostgresStorage

        storage = PostgresStorage(auth_store_url)
    await storage.open()
    try:
        yield SqlAuthStore(storage.engine)
    finally:
        await storage.aclose()


def _refresh(
    token_id: str, *, expires_at: float, family: str | None = None, **fields: Any
) -> RefreshRecord:
    return RefreshRecord(
        id=token_id,
        family=family or token_id,
        subject="alice",
        authenticator="password",
        secret_hash="h" * 64,
        created_at=expires_at - 14 * DAY,
        expires_at=expires_at,
        **fields,
    )


def _api(token_id: str, *, expires_at: float | None, revoked: bool = False) -> ApiTokenRecord:
    return ApiTokenRecord(
        id=token_id,
        owner="alice",
        name=token_id,
        scopes=("config:read",),
        secret_hash="a" * 64,
        created_at=NOW - 400 * DAY,
        expires_at=expires_at,
        revoked=revoked,
    )


class TestAuthStorePrune:
    async def test_expired_tokens_go_and_the_rest_stays(self, auth_store: AuthStore) -> None:
        """Refresh and API tokens that expired before the cutoff go, used or revoked or
        not; a spent refresh token within its lifetime stays, so presenting it again is
        still caught as reuse; non-expiring API tokens stay, revoked or not."""
        cutoff = NOW - 7 * DAY
        for record in (
            _refresh("old-used", expires_at=cutoff - DAY, used_at=cutoff - 2 * DAY),
            _refresh("old-revoked", expires_at=cutoff - 1, revoked=True),
            _refresh("old-unused", expires_at=cutoff - 3 * DAY),
            _refresh("expired-recently", expires_at=NOW - DAY),
            _refresh("spent", expires_at=NOW + DAY, used_at=NOW - 60, family="f"),
            _refresh("live", expires_at=NOW + DAY, family="f"),
        ):
            await auth_store.add_refresh(record)
        for api in (
            _api("api-expired", expires_at=cutoff - DAY),
            _api("api-revoked-forever", expires_at=None, revoked=True),
            _api("api-forever", expires_at=None),
            _api("api-later", expires_at=NOW + DAY),
        ):
            await auth_store.add_api_token(api)

        pruned = await auth_store.prune(cutoff, batch_size=2)

        assert pruned == {"auth_refresh_tokens": 3, "auth_api_tokens": 1}
        for gone in ("old-used", "old-revoked", "old-unused"):
            assert await auth_store.find_refresh(gone, "h" * 64) is None
        for kept in ("expired-recently", "spent", "live"):
            assert await auth_store.find_refresh(kept, "h" * 64) is not None
        assert {t.id for t in await auth_store.list_api_tokens()} == {
            "api-revoked-forever",
            "api-forever",
            "api-later",
        }
        replay = await auth_store.rotate_refresh(
            "spent",
            "h" * 64,
            NewRefresh(id="n", secret_hash="n" * 64, created_at=NOW, expires_at=NOW + DAY),
        )
        assert replay.outcome == "reused"
        assert await auth_store.prune(cutoff) == {"auth_refresh_tokens": 0, "auth_api_tokens": 0}

    async def test_spent_tokens_of_a_live_session_stay(self, auth_store: AuthStore) -> None:
        """Rotation slides a session on (each new token gets a fresh lifetime): a token
        spent long ago stays while its session has a live token, so replaying it (a
        stolen copy, or the victim's after the thief rotated first) still revokes the
        session. Once the session is revoked, or ended before the cutoff, it goes."""
        cutoff = NOW - 7 * DAY
        for record in (
            _refresh("spent-long-ago", expires_at=cutoff - DAY, used_at=cutoff - 2 * DAY),
            _refresh("current", expires_at=NOW + DAY, family="spent-long-ago"),
            _refresh("spent-revoked", expires_at=cutoff - DAY, used_at=cutoff, revoked=True),
            _refresh("current-revoked", expires_at=NOW + DAY, revoked=True, family="spent-revoked"),
            _refresh("spent-ended", expires_at=cutoff - 2 * DAY, used_at=cutoff - 3 * DAY),
            _refresh("last-ended", expires_at=cutoff - DAY, family="spent-ended"),
        ):
            await auth_store.add_refresh(record)

        pruned = await auth_store.prune(cutoff, batch_size=1)

        assert pruned == {"auth_refresh_tokens": 3, "auth_api_tokens": 0}
        replay = await auth_store.rotate_refresh(
            "spent-long-ago",
            "h" * 64,
            NewRefresh(id="n", secret_hash="n" * 64, created_at=NOW, expires_at=NOW + DAY),
        )
        assert replay.outcome == "reused"
        current = await auth_store.find_refresh("current", "h" * 64)
        assert current is not None
        assert current.revoked


# ---------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------


class FlakyStorage:
    """A storage whose first `prune` fails (the database is down) and the rest succeed."""

    def __init__(self, failures: int = 1) -> None:
        self.failures = failures
        self.policies: list[RetentionPolicy] = []

    async def prune(self, policy: RetentionPolicy) -> Mapping[str, int]:
        self.policies.append(policy)
        if self.failures:
            self.failures -= 1
            raise StorageError("cannot connect to PostgreSQL at postgresql://db/nxmesh")
        return {"audit_log": 2, "agent_status": 0}


class TestRetentionJob:
    async def test_a_pass_prunes_storage_and_tokens_and_reports_counts(
        self, sqlite: SqliteStorage, settings: Settings
    ) -> None:
        """A pass deletes old audit entries, spent bootstrap tokens and expired refresh
        tokens, keeps the recent ones, logs the counts (no secrets) and exports them."""
        now = time.time()
        await sqlite.append_audit(AuditEntry(ts=now - 400 * DAY, actor="a", action="old"))
        await sqlite.append_audit(AuditEntry(ts=now - DAY, actor="a", action="recent"))
        await sqlite.add_token(
            BootstrapToken(
                id="spent",
                secret_hash="secret-hash-1",
                created_at=now - 30 * DAY,
                used_at=now - 29 * DAY,
            )
        )
        await sqlite.add_token(BootstrapToken(id="live", secret_hash="secret-hash-2"))
        auth_store = SqlAuthStore(sqlite.engine)
        await auth_store.add_refresh(_refresh("gone", expires_at=now - 30 * DAY))
        await auth_store.add_refresh(_refresh("kept", expires_at=now + DAY))
        metrics = MasterMetrics()
        job = RetentionJob(sqlite, auth_store, settings, metrics=metrics)

        with capture_logs() as logs:
            counts = await job.run_once()

        assert counts is not None
        assert {k: v for k, v in counts.items() if v} == {
            "audit_log": 1,
            "bootstrap_tokens": 1,
            "auth_refresh_tokens": 1,
        }
        assert set(counts) >= {"agent_status", "event_payloads", "auth_login_failures"}
        assert [e.action for e in await sqlite.list_audit()] == ["recent"]
        assert [t.id for t in await sqlite.list_tokens()] == ["live"]
        assert await auth_store.find_refresh("kept", "h" * 64) is not None
        done = [e for e in logs if e["event"] == "retention pass done"]
        assert len(done) == 1
        assert done[0]["log_level"] == "info"
        assert done[0]["deleted"] == 3
        assert done[0]["tables"]["audit_log"] == 1
        assert "secret-hash" not in repr(logs)
        assert "h" * 64 not in repr(logs)
        name = "nxmesh_master_retention_deleted_rows_total"
        assert _sample(metrics, name, table="audit_log") == 1
        assert _sample(metrics, name, table="auth_refresh_tokens") == 1
        assert _sample(metrics, name, table="agent_status") == 0
        assert _sample(metrics, "nxmesh_master_retention_runs_total", outcome="ok") == 1

    async def test_a_failing_pass_is_logged_and_the_job_goes_on(self, settings: Settings) -> None:
        """The database is down for one pass: the failure is logged and counted, the job
        sleeps one interval and the next pass works; the job never raises."""
        storage = FlakyStorage()
        metrics = MasterMetrics()
        sleeps: list[float] = []

        async def sleep(seconds: float) -> None:
            sleeps.append(seconds)
            if len(sleeps) == 2:
                scope.cancel()
            await anyio.lowlevel.checkpoint()

        job = RetentionJob(
            storage,  # type: ignore[arg-type]
            None,
            settings,
            metrics=metrics,
            lock=_leader,
            clock=lambda: NOW,
            sleep=sleep,
        )
        with capture_logs() as logs, anyio.CancelScope() as scope:
            await job.run()

        assert sleeps == [3600.0, 3600.0]
        assert len(storage.policies) == 2
        failed = [e for e in logs if e["event"].startswith("retention pass failed")]
        assert len(failed) == 1
        assert failed[0]["log_level"] == "error"
        assert failed[0]["error_type"] == "StorageError"
        runs = "nxmesh_master_retention_runs_total"
        assert _sample(metrics, runs, outcome="failed") == 1
        assert _sample(metrics, runs, outcome="ok") == 1
        deleted = "nxmesh_master_retention_deleted_rows_total"
        assert _sample(metrics, deleted, table="audit_log") == 2

    async def test_another_master_holding_the_lock_skips_the_pass(self, settings: Settings) -> None:
        """Without the leader lock a pass deletes nothing and counts as skipped."""
        storage = FlakyStorage(failures=0)
        metrics = MasterMetrics()
        job = RetentionJob(
            storage,  # type: ignore[arg-type]
            MemoryAuthStore(),
            settings,
            metrics=metrics,
            lock=lambda: _leader(held=False),
        )
        assert await job.run_once() is None
        assert storage.policies == []
        assert _sample(metrics, "nxmesh_master_retention_runs_total", outcome="skipped") == 1

    async def test_a_backend_without_prune_is_skipped_with_one_warning(
        self, settings: Settings
    ) -> None:
        """A third-party backend without ``prune``: its tables are left alone (a warning,
        once), the auth store is still pruned."""
        store = MemoryAuthStore()
        await store.add_refresh(_refresh("old", expires_at=time.time() - 30 * DAY))
        job = RetentionJob(object(), store, settings, lock=_leader)  # type: ignore[arg-type]
        with capture_logs() as logs:
            first = await job.run_once()
            await job.run_once()
        assert first == {"auth_refresh_tokens": 1, "auth_api_tokens": 0}
        warnings = [e for e in logs if e["event"].startswith("storage backend cannot prune")]
        assert len(warnings) == 1

    async def test_on_postgres_one_master_prunes_at_a_time(
        self, pg_database: str, settings: Settings
    ) -> None:
        """With several masters on one PostgreSQL, the one holding the advisory lock
        ``retention`` prunes; another skips that round and prunes once it is free."""
        from nxmesh_storage_postgres import PostgresStorage, advisory_lock

        first, second = PostgresStorage(pg_database), PostgresStorage(pg_database)
        await first.open()
        await second.open()
        try:
            await first.append_audit(AuditEntry(ts=1.0, actor="a", action="old"))
            job = RetentionJob(second, SqlAuthStore(second.engine), settings)
            async with advisory_lock(first.engine, LOCK_NAME) as held:
                assert held
                assert await job.run_once() is None
            counts = await job.run_once()
            assert counts is not None
            assert counts["audit_log"] == 1
            assert await first.list_audit() == []
        finally:
            await second.aclose()
            await first.aclose()


class TestInTheMaster:
    async def test_run_master_runs_a_pass_at_start(
        self,
        plugin_manager: NxMeshPluginManager,
        tmp_path: Path,
        template_state: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """``nxmesh master`` starts the job in its task group: the first pass runs at
        start (an audit entry from 400 days ago is gone) and is counted on ``/metrics``."""
        state = tmp_path / "state"
        shutil.copytree(template_state, state)
        storage = SqliteStorage(f"sqlite:///{state / 'master.db'}")
        await storage.open()
        try:
            old = AuditEntry(ts=time.time() - 400 * DAY, actor="a", action="old")
            await storage.append_audit(old)
        finally:
            await storage.aclose()
        settings = make_settings(plugin_manager, state, **{"master.api_port": 0})
        passes: list[dict[str, int] | None] = []
        done = anyio.Event()
        original = RetentionJob.run_once_safely

        async def observed(self: RetentionJob) -> dict[str, int] | None:
            result = await original(self)
            passes.append(result)
            done.set()
            return result

        monkeypatch.setattr(RetentionJob, "run_once_safely", observed)
        seen: dict[str, Any] = {}

        async def main(runtime: Runtime) -> None:
            async with anyio.create_task_group() as tg:
                # Retention alone of the default components (no agent plane needed here).
                assert run_retention in DEFAULT_COMPONENTS
                tg.start_soon(run_master, runtime, (run_retention,))
                with anyio.fail_after(30):  # a bound for slow machines, not a timing check
                    await done.wait()
                services = runtime.stash[MASTER_SERVICES]
                seen["audit"] = [e.id for e in await services.storage.list_audit(limit=1000)]
                seen["metrics"] = services.metrics.render().decode()
                tg.cancel_scope.cancel()

        await run(plugin_manager, settings, main, handle_signals=False)
        assert passes[0] is not None
        assert passes[0]["audit_log"] == 1
        assert old.id not in seen["audit"]
        exported = 'nxmesh_master_retention_deleted_rows_total{table="audit_log"} 1.0'
        assert exported in seen["metrics"]
