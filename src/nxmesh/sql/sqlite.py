"""Built-in SQLite storage (``sqlite:///path/to/master.db``): the embedded default.

One file next to the master, no server. Connections use WAL (readers never block the
writer), enforce foreign keys and wait up to `busy_timeout` seconds for a lock instead of
failing. Write transactions start with ``BEGIN IMMEDIATE`` so concurrent writers queue
at BEGIN rather than failing half-way when a read turns into a write.

``sqlite://`` (no path) is an in-memory database for tests: one connection shared by
all operations, which run one at a time.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.pool import StaticPool

from nxmesh.core.records import StorageError
from nxmesh.sql.backend import SqlStorage

__all__ = ["SqliteStorage"]


class SqliteStorage(SqlStorage):
    """`SqlStorage` on a SQLite file (WAL, foreign keys on, ``BEGIN IMMEDIATE`` writes)."""

    name: ClassVar[str] = "sqlite"
    schemes: ClassVar[tuple[str, ...]] = ("sqlite",)

    busy_timeout: ClassVar[float] = 30.0
    """Seconds a connection waits for another one's lock before failing."""

    @property
    def path(self) -> Path | None:
        """The database file, or None for an in-memory database."""
        database = make_url(self.url).database
        if not database or database == ":memory:":
            return None
        return Path(database).expanduser()

    def _create_engine(self) -> Engine:
        url = make_url(self.url)
        if url.get_backend_name() != "sqlite":
            raise StorageError(f"{self!r}: not a sqlite:// URL")
        path = self.path
        engine_url = url.set(drivername="sqlite+pysqlite")
        kwargs: dict[str, Any] = {"connect_args": {"timeout": self.busy_timeout}}
        if path is None:
            engine_url = engine_url.set(database=":memory:")
            kwargs["poolclass"] = StaticPool
            kwargs["connect_args"]["check_same_thread"] = False
            self._serial = threading.Lock()
        else:
            _create_private_file(path)
            engine_url = engine_url.set(database=str(path))
        engine = create_engine(engine_url, **kwargs)
        event.listen(engine, "connect", _on_connect)
        event.listen(engine, "begin", _on_begin)
        return engine


def _on_connect(dbapi_connection: sqlite3.Connection, _record: object) -> None:
    # Autocommit at the driver level: pysqlite's own implicit BEGIN is deferred and
    # skipped before SELECTs; `_on_begin` issues the right BEGIN instead.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout={int(SqliteStorage.busy_timeout * 1000)}")
        _enable_wal(cursor)
        cursor.execute("PRAGMA foreign_keys=ON")
        # FULL: a committed version survives power loss, not only a process crash.
        cursor.execute("PRAGMA synchronous=FULL")
    finally:
        cursor.close()


def _enable_wal(cursor: sqlite3.Cursor) -> None:
    # Switching a new file to WAL takes an exclusive lock, and SQLite answers a switch
    # racing another connection's with "database is locked" at once, without waiting on
    # busy_timeout (several processes opening a new database together); retry briefly.
    deadline = time.monotonic() + SqliteStorage.busy_timeout
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _on_begin(conn: Connection) -> None:
    # IMMEDIATE takes the write lock now, waiting on busy_timeout if needed; a deferred
    # transaction that reads and then writes fails at once with SQLITE_BUSY instead.
    write = conn.get_execution_options().get("nxmesh_write", False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def _create_private_file(path: Path) -> None:
    """Create missing parent directories 0700 and the database file 0600.

    The file holds password hashes and (encrypted) keys: nobody but the master's user
    needs to read it. SQLite gives its -wal and -shm files the database file's mode.
    """
    missing: list[Path] = []
    parent = path.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=0o700)
            directory.chmod(0o700)  # mkdir's mode is narrowed by the umask only
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    except OSError as exc:
        raise StorageError(f"cannot create the SQLite database {path}: {exc.strerror}") from None
    os.close(fd)
