"""Advisory locks: one master at a time runs a leader-only job (ACME renewals...).

::

    async with advisory_lock(storage.engine, "acme-renewals") as leader:
        if leader:
            await renew_certificates()

The lock is a session-level ``pg_try_advisory_lock`` on a connection dedicated to it
for as long as it is held, in autocommit mode (an open transaction would sit "idle in
transaction" and could be killed by ``idle_in_transaction_session_timeout``). If the
holder dies, PostgreSQL drops its session and the lock with it.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from sqlalchemy import Connection, Engine, text

__all__ = ["advisory_lock", "lock_key"]


def lock_key(name: str) -> int:
    """The signed 64-bit key PostgreSQL uses for lock `name` (stable across processes)."""
    digest = hashlib.sha256(f"nxmesh:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@asynccontextmanager
async def advisory_lock(engine: Engine, name: str) -> AsyncIterator[bool]:
    """Try to take the cluster-wide lock `name` without waiting; yield whether we hold it.

    Held until the block exits, released even when the block is cancelled.
    """
    key = lock_key(name)

    def acquire() -> tuple[Connection, bool]:
        conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            held = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar())
        except BaseException:
            conn.close()
            raise
        return conn, held

    def release(conn: Connection, held: bool) -> None:
        try:
            if held:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        except Exception:
            # Unlock failed (connection lost?): discard the session, which drops the lock.
            conn.invalidate()
        finally:
            conn.close()

    conn, held = await anyio.to_thread.run_sync(acquire)
    try:
        yield held
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(release, conn, held)
