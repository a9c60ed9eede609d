"""Alembic migrations of the master's schema, shared by SQLite and PostgreSQL.

Backends call `upgrade_to_head` when they open; it is a cheap no-op on a current
database. Concurrent starters are serialised by the database itself (``BEGIN IMMEDIATE``
on SQLite, a transaction-scoped advisory lock on PostgreSQL), and every upgrade runs in
one transaction, so a crash mid-migration leaves the previous schema intact.

Developers add revisions with the Alembic CLI (see ``docs/storage.md``)::

    alembic -c src/nxmesh/sql/migrations/alembic.ini revision --autogenerate -m "..."
"""

from __future__ import annotations

import functools
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, text

from nxmesh.core.records import StorageError

__all__ = [
    "MIGRATIONS_DIR",
    "alembic_config",
    "current_revision",
    "head_revision",
    "upgrade_to_head",
]

MIGRATIONS_DIR = Path(__file__).resolve().parent
"""The Alembic script directory (``env.py``, ``versions/``)."""

# Any fixed 64-bit number unlikely to collide with an application's own advisory locks.
_PG_MIGRATION_LOCK = 0x6E786D6573680001  # "nxmesh" + 1


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config for this script directory; `env.py` uses `connection` if given."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@functools.cache
def head_revision() -> str:
    """The newest revision id (the scripts are read once per process)."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "the migrations directory has no revisions"
    return head


def current_revision(connection: Connection) -> str | None:
    """The revision the database is at; None for an empty database."""
    return MigrationContext.configure(connection).get_current_revision()


def upgrade_to_head(engine: Engine) -> bool:
    """Migrate the database of `engine` to the newest revision; True if anything ran.

    :raises StorageError: the database is at a revision this NxMesh does not know (it was
        migrated by a newer release), or SQLite found broken foreign keys after migrating.
    """
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as conn:
        if current_revision(conn) == head_revision():
            conn.rollback()
            return False
        conn.rollback()
        if sqlite:
            # Batch mode rebuilds tables (copy, drop, rename); with foreign keys enforced the
            # drop would cascade into child rows. The pragma is ignored inside a
            # transaction, so it is set on the raw connection, before BEGIN.
            conn.connection.driver_connection.execute("PRAGMA foreign_keys=OFF")  # type: ignore[union-attr]
        try:
            # nxmesh_write: SQLite takes the write lock at BEGIN (see the SQLite backend).
            conn = conn.execution_options(nxmesh_write=True)
            with conn.begin():
                if engine.dialect.name == "postgresql":
                    # Several masters starting at once: one migrates, the others wait here
                    # and then find the database at head.
                    conn.execute(
                        text("SELECT pg_advisory_xact_lock(:k)"), {"k": _signed(_PG_MIGRATION_LOCK)}
                    )
                before = current_revision(conn)
                if before is not None and before != head_revision():
                    _check_known(before)
                command.upgrade(alembic_config(conn), "head")
                if sqlite:
                    broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise StorageError(
                            f"migration left {len(broken)} rows with broken foreign keys "
                            f"(first: {tuple(broken[0])}); nothing was changed"
                        )
        finally:
            if sqlite:
                conn.connection.driver_connection.execute("PRAGMA foreign_keys=ON")  # type: ignore[union-attr]
        return before != head_revision()


def _check_known(revision: str) -> None:
    script = ScriptDirectory.from_config(alembic_config())
    if revision not in {s.revision for s in script.walk_revisions()}:
        raise StorageError(
            f"the database schema is at revision {revision!r}, which this NxMesh does not "
            "know: it was migrated by a newer release. Upgrade NxMesh, or restore a backup."
        )


def _signed(n: int) -> int:
    """`n` as the signed 64-bit integer PostgreSQL's bigint advisory locks take."""
    return n - (1 << 64) if n >= 1 << 63 else n
