"""Revision 0002 brings the auth token tables under Alembic: a database at the previous
head (0001) upgrades — with the tables a pre-0002 master created by itself (adopted with
their rows) or without them (created) — to exactly the schema of `nxmesh.sql.tables`,
on SQLite and PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import (
    Boolean,
    Column,
    Engine,
    Float,
    MetaData,
    Table,
    Text,
    create_engine,
    insert,
    inspect,
)
from sqlalchemy.engine import make_url

from nxmesh.master.auth.store import ApiTokenRecord, RefreshRecord, SqlAuthStore
from nxmesh.sql.migrations import alembic_config, current_revision, head_revision, upgrade_to_head
from nxmesh.sql.tables import metadata

pytestmark = pytest.mark.anyio

# The tables exactly as `SqlAuthStore` created them before revision 0002 (create_all).
legacy = MetaData()
Table(
    "auth_refresh_tokens",
    legacy,
    Column("id", Text, primary_key=True),
    Column("family", Text, nullable=False, index=True),
    Column("subject", Text, nullable=False, index=True),
    Column("authenticator", Text, nullable=False),
    Column("roles", Text, nullable=False),
    Column("secret_hash", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("used_at", Float),
    Column("revoked", Boolean, nullable=False),
)
Table(
    "auth_api_tokens",
    legacy,
    Column("id", Text, primary_key=True),
    Column("owner", Text, nullable=False, index=True),
    Column("name", Text, nullable=False),
    Column("scopes", Text, nullable=False),
    Column("secret_hash", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float),
    Column("last_used_at", Float),
    Column("revoked", Boolean, nullable=False),
)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An engine on a new database migrated to revision 0001 (the previous head)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'master.db'}"
    else:
        url = make_url(request.getfixturevalue("pg_database")).set(drivername="postgresql+psycopg")
    engine = create_engine(url)
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0001")
    yield engine
    engine.dispose()


def _at_head_matching_tables(engine: Engine) -> None:
    with engine.connect() as conn:
        assert current_revision(conn) == head_revision()
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []


class TestUpgradeFrom0001:
    async def test_tables_made_by_an_older_master_are_adopted(self, engine: Engine) -> None:
        now = time.time()
        legacy.create_all(engine)
        with engine.begin() as conn:
            conn.execute(insert(legacy.tables["auth_refresh_tokens"]).values(
                id="r1", family="f1", subject="admin", authenticator="password",
                roles='["admin"]', secret_hash="h" * 64, created_at=now,
                expires_at=now + 3600, used_at=None, revoked=False))  # fmt: skip
            conn.execute(insert(legacy.tables["auth_api_tokens"]).values(
                id="a1", owner="admin", name="ci", scopes='["config:read"]',
                secret_hash="s" * 64, created_at=now, expires_at=None, last_used_at=None,
                revoked=False))  # fmt: skip

        assert upgrade_to_head(engine) is True
        _at_head_matching_tables(engine)
        store = SqlAuthStore(engine)
        found = await store.find_refresh("r1", "h" * 64)
        assert found is not None
        assert (found.family, found.roles) == ("f1", ("admin",))
        token = await store.get_api_token("a1")
        assert token is not None
        assert token.scopes == ("config:read",)

    async def test_missing_tables_are_created(self, engine: Engine) -> None:
        assert not {"auth_refresh_tokens", "auth_api_tokens"} & set(
            inspect(engine).get_table_names()
        )
        assert upgrade_to_head(engine) is True
        _at_head_matching_tables(engine)
        store = SqlAuthStore(engine)
        now = time.time()
        await store.add_refresh(RefreshRecord(
            id="r2", family="f2", subject="alice", authenticator="password",
            secret_hash="x" * 64, created_at=now, expires_at=now + 60))  # fmt: skip
        await store.add_api_token(ApiTokenRecord(
            id="a2", owner="alice", name="deploy", scopes=("config:write",),
            secret_hash="y" * 64, created_at=now))  # fmt: skip
        assert await store.find_refresh("r2", "x" * 64) is not None
        assert [t.id for t in await store.list_api_tokens("alice")] == ["a2"]

    async def test_downgrade_to_0001_drops_them(self, engine: Engine) -> None:
        upgrade_to_head(engine)
        with engine.begin() as conn:
            command.downgrade(alembic_config(conn), "0001")
        assert not {"auth_refresh_tokens", "auth_api_tokens"} & set(
            inspect(engine).get_table_names()
        )
