"""Deleting many rows without holding a lock for long: bounded batches, one transaction each.

`bounded_delete` turns a query picking rows (by the primary key of an alias of the table)
into ``DELETE FROM t WHERE <key> IN (SELECT <key> ... LIMIT n)``; `delete_in_batches`
runs it until a batch deletes fewer than `n` rows. Every batch commits on its own, so a
pass over a huge table never holds SQLite's write lock (or PostgreSQL row locks) for
more than one batch, other writers go in between, and a pass interrupted anywhere (a
crash, a cancellation, a lost connection) leaves only whole batches done: the next pass
finishes the job. The deletes are idempotent, so two masters pruning at once only
delete each row once (the loser of a row finds nothing to delete).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import Delete, Select, Table, delete, tuple_

__all__ = ["bounded_delete", "delete_in_batches"]


def bounded_delete(table: Table, picked: Select[Any], batch_size: int) -> Delete:
    """``DELETE FROM table WHERE <primary key> IN (picked LIMIT batch_size)``.

    `picked` selects the primary key columns (in the table's key order) of the rows to
    delete from an *alias* of `table` (``table.alias()``): selecting from `table` itself
    would correlate the subquery to the deleted row and lose the limit.
    """
    key = list(table.primary_key.columns)
    target: Any = key[0] if len(key) == 1 else tuple_(*key)
    return delete(table).where(target.in_(picked.limit(batch_size)))


async def delete_in_batches(
    execute: Callable[[Delete], Awaitable[int]], stmt: Delete, batch_size: int
) -> int:
    """Run `stmt` (from `bounded_delete`) until a batch deletes fewer than `batch_size`
    rows; returns how many rows went. `execute` runs one statement in its own write
    transaction and returns its row count."""
    total = 0
    while True:
        deleted = await execute(stmt)
        total += deleted
        if deleted < batch_size:
            return total
