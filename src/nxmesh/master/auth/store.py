"""Where the master keeps refresh tokens and API tokens (hashed, never in plaintext).

`AuthStore` is what `Sessions` needs. `SqlAuthStore` keeps both in two tables of the
master's own SQL database (SQLite or PostgreSQL; part of its migrated schema), so refresh
rotation is one transaction and several masters share one view; `MemoryAuthStore` is
the fallback for storage backends that are not SQL (tokens then die with the process).

Only ``sha256(secret)`` is stored: the secrets carry 256 (refresh) and 192 (API token)
random bits, so a fast hash is enough and comparison is constant-time.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Sequence
from typing import Literal, Protocol, TypeVar

import anyio
import attrs
from sqlalchemy import Connection, Delete, Engine, Row, exists, insert, select, update

from nxmesh.sql import tables
from nxmesh.sql.prune import bounded_delete, delete_in_batches

__all__ = [
    "ApiTokenRecord",
    "AuthStore",
    "MemoryAuthStore",
    "NewRefresh",
    "RefreshRecord",
    "Rotation",
    "SqlAuthStore",
]

T = TypeVar("T")


@attrs.frozen(kw_only=True)
class RefreshRecord:
    """One refresh token of a login session (`family`); single use.

    `roles` are those the authenticator granted at login; local users' roles are
    re-read from storage on every refresh instead, so a demotion applies at once.
    """

    id: str
    family: str
    subject: str
    authenticator: str
    roles: tuple[str, ...] = ()
    secret_hash: str = attrs.field(repr=False)
    created_at: float
    expires_at: float
    used_at: float | None = None
    revoked: bool = False


@attrs.frozen(kw_only=True)
class ApiTokenRecord:
    """A long-lived token for automation; `scopes` are the permissions it may use."""

    id: str
    owner: str
    name: str
    scopes: tuple[str, ...]
    secret_hash: str = attrs.field(repr=False)
    created_at: float
    expires_at: float | None = None
    last_used_at: float | None = None
    revoked: bool = False


@attrs.frozen
class Rotation:
    """The outcome of presenting a refresh token.

    ``rotated``: `record` was the valid token, now spent; `replacement` was stored.
    ``reused``: a spent token was presented again — its whole family is now revoked.
    ``invalid`` / ``expired`` / ``revoked``: refused, nothing changed.
    """

    outcome: Literal["rotated", "reused", "invalid", "expired", "revoked"]
    record: RefreshRecord | None = None
    replacement: RefreshRecord | None = None


@attrs.frozen
class NewRefresh:
    """The identity of the token that replaces a spent one (the rest is inherited)."""

    id: str
    secret_hash: str = attrs.field(repr=False)
    created_at: float
    expires_at: float

    def replacing(self, old: RefreshRecord) -> RefreshRecord:
        return attrs.evolve(
            old,
            id=self.id,
            secret_hash=self.secret_hash,
            created_at=self.created_at,
            expires_at=self.expires_at,
            used_at=None,
            revoked=False,
        )


class AuthStore(Protocol):
    """Persistence of refresh tokens and API tokens."""

    async def open(self) -> None: ...
    async def aclose(self) -> None: ...
    async def add_refresh(self, record: RefreshRecord) -> None: ...
    async def rotate_refresh(self, token_id: str, secret_hash: str, new: NewRefresh) -> Rotation:
        """Spend the token and store its replacement (same session) atomically."""
        ...

    async def find_refresh(self, token_id: str, secret_hash: str) -> RefreshRecord | None: ...
    async def revoke_family(self, family: str) -> int: ...
    async def revoke_subject(self, subject: str) -> int: ...
    async def session_active(self, family: str) -> bool:
        """True while session `family` has a token that is not revoked (logout, a new
        password, a removed or demoted user and refresh reuse revoke them all)."""
        ...

    async def add_api_token(self, record: ApiTokenRecord) -> None: ...
    async def get_api_token(self, token_id: str) -> ApiTokenRecord | None: ...
    async def list_api_tokens(self, owner: str | None = None) -> Sequence[ApiTokenRecord]: ...
    async def revoke_api_token(self, token_id: str) -> bool: ...
    async def touch_api_token(self, token_id: str, now: float) -> None: ...
    async def prune(self, before: float, *, batch_size: int = 1000) -> dict[str, int]:
        """Delete refresh tokens and API tokens that expired before `before`; returns how
        many went per table (``auth_refresh_tokens``, ``auth_api_tokens``).

        A token that has not expired stays, whatever else. A spent refresh token stays
        as long as its session (`family`) has an unrevoked token not expired before
        `before`: rotation gives each new token a fresh lifetime, so a session outlives
        its old tokens, and replaying one of them must still be recognised as reuse
        (which revokes the session). Revoked API tokens without an expiry stay
        (revocation has no time).
        """
        ...


def _decide(
    row: RefreshRecord | None, secret_hash: str, now: float
) -> Literal["ok", "reused", "invalid", "expired", "revoked"]:
    # Without the right secret the presenter proves nothing: never revoke on its word.
    if row is None or not hmac.compare_digest(row.secret_hash, secret_hash):
        return "invalid"
    if row.revoked:
        return "revoked"
    if row.used_at is not None:
        return "reused"
    if row.expires_at <= now:
        return "expired"
    return "ok"


# ---------------------------------------------------------------------------------------
# In memory
# ---------------------------------------------------------------------------------------


class MemoryAuthStore:
    """Process-local store: for storage backends without SQL, and for tests."""

    def __init__(self) -> None:
        self._refresh: dict[str, RefreshRecord] = {}
        self._api: dict[str, ApiTokenRecord] = {}

    async def open(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def add_refresh(self, record: RefreshRecord) -> None:
        self._refresh[record.id] = record

    async def rotate_refresh(self, token_id: str, secret_hash: str, new: NewRefresh) -> Rotation:
        # No await between reading and writing: atomic within one event loop.
        row = self._refresh.get(token_id)
        verdict = _decide(row, secret_hash, new.created_at)
        if row is None or verdict == "invalid":
            return Rotation("invalid", row)
        if verdict == "reused":
            self._revoke_family(row.family)
            return Rotation("reused", row)
        if verdict != "ok":
            return Rotation(verdict, row)
        replacement = new.replacing(row)
        self._refresh[token_id] = attrs.evolve(row, used_at=new.created_at)
        self._refresh[replacement.id] = replacement
        return Rotation("rotated", row, replacement)

    async def find_refresh(self, token_id: str, secret_hash: str) -> RefreshRecord | None:
        row = self._refresh.get(token_id)
        if row is None or not hmac.compare_digest(row.secret_hash, secret_hash):
            return None
        return row

    def _revoke_family(self, family: str) -> int:
        hits = [r for r in self._refresh.values() if r.family == family and not r.revoked]
        for r in hits:
            self._refresh[r.id] = attrs.evolve(r, revoked=True)
        return len(hits)

    async def revoke_family(self, family: str) -> int:
        return self._revoke_family(family)

    async def revoke_subject(self, subject: str) -> int:
        families = {r.family for r in self._refresh.values() if r.subject == subject}
        return sum(self._revoke_family(f) for f in families)

    async def session_active(self, family: str) -> bool:
        return any(r.family == family and not r.revoked for r in self._refresh.values())

    async def add_api_token(self, record: ApiTokenRecord) -> None:
        self._api[record.id] = record

    async def get_api_token(self, token_id: str) -> ApiTokenRecord | None:
        return self._api.get(token_id)

    async def list_api_tokens(self, owner: str | None = None) -> Sequence[ApiTokenRecord]:
        rows = [r for r in self._api.values() if owner is None or r.owner == owner]
        return sorted(rows, key=lambda r: (r.created_at, r.id))

    async def revoke_api_token(self, token_id: str) -> bool:
        row = self._api.get(token_id)
        if row is None or row.revoked:
            return False
        self._api[token_id] = attrs.evolve(row, revoked=True)
        return True

    async def touch_api_token(self, token_id: str, now: float) -> None:
        row = self._api.get(token_id)
        if row is not None:
            self._api[token_id] = attrs.evolve(row, last_used_at=now)

    async def prune(self, before: float, *, batch_size: int = 1000) -> dict[str, int]:
        live = {
            r.family for r in self._refresh.values() if r.expires_at >= before and not r.revoked
        }
        refresh = [
            k for k, r in self._refresh.items() if r.expires_at < before and r.family not in live
        ]
        api = [
            k for k, r in self._api.items() if r.expires_at is not None and r.expires_at < before
        ]
        for key in refresh:
            del self._refresh[key]
        for key in api:
            del self._api[key]
        return {"auth_refresh_tokens": len(refresh), "auth_api_tokens": len(api)}


# ---------------------------------------------------------------------------------------
# SQL
# ---------------------------------------------------------------------------------------

# The tables are part of the master's schema (`nxmesh.sql.tables`, Alembic revision 0002):
# the storage backend migrates them when it opens, before this store is built.
refresh_tokens = tables.auth_refresh_tokens
api_tokens = tables.auth_api_tokens

_WRITE = {"nxmesh_write": True}  # SQLite: take the write lock at BEGIN (see storage_sqlite)


def _refresh(row: Row[tuple[object, ...]]) -> RefreshRecord:
    m = row._mapping
    return RefreshRecord(
        id=m["id"],
        family=m["family"],
        subject=m["subject"],
        authenticator=m["authenticator"],
        roles=tuple(json.loads(m["roles"])),
        secret_hash=m["secret_hash"],
        created_at=m["created_at"],
        expires_at=m["expires_at"],
        used_at=m["used_at"],
        revoked=bool(m["revoked"]),
    )


def _refresh_values(record: RefreshRecord) -> dict[str, object]:
    values = attrs.asdict(record)
    values["roles"] = json.dumps(list(record.roles))
    return values


def _api(row: Row[tuple[object, ...]]) -> ApiTokenRecord:
    m = row._mapping
    return ApiTokenRecord(
        id=m["id"],
        owner=m["owner"],
        name=m["name"],
        scopes=tuple(json.loads(m["scopes"])),
        secret_hash=m["secret_hash"],
        created_at=m["created_at"],
        expires_at=m["expires_at"],
        last_used_at=m["last_used_at"],
        revoked=bool(m["revoked"]),
    )


class SqlAuthStore:
    """Both token kinds in the master's SQL database, one transaction per operation.

    `engine` is the storage backend's, already migrated: the tables are in its schema.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def open(self) -> None:
        return None

    async def aclose(self) -> None:
        return None  # the engine belongs to the storage backend

    async def _run(self, fn: Callable[[Connection], T], *, write: bool = False) -> T:
        def work() -> T:
            with self._engine.connect() as conn:
                if write:
                    conn = conn.execution_options(**_WRITE)
                with conn.begin():
                    return fn(conn)

        return await anyio.to_thread.run_sync(work)

    async def add_refresh(self, record: RefreshRecord) -> None:
        values = _refresh_values(record)
        await self._run(lambda c: c.execute(insert(refresh_tokens).values(values)), write=True)

    async def rotate_refresh(self, token_id: str, secret_hash: str, new: NewRefresh) -> Rotation:
        t = refresh_tokens
        now = new.created_at

        def op(conn: Connection) -> Rotation:
            found = conn.execute(select(t).where(t.c.id == token_id)).first()
            row = None if found is None else _refresh(found)
            verdict = _decide(row, secret_hash, now)
            if row is None or verdict == "invalid":
                return Rotation("invalid", row)
            if verdict in ("expired", "revoked"):
                return Rotation(verdict, row)
            spent = conn.execute(
                update(t).where(t.c.id == token_id, t.c.used_at.is_(None)).values(used_at=now)
            )
            if verdict == "reused" or spent.rowcount != 1:
                # A second use (or a concurrent first one that lost): the token leaked.
                conn.execute(update(t).where(t.c.family == row.family).values(revoked=True))
                return Rotation("reused", row)
            replacement = new.replacing(row)
            conn.execute(insert(t).values(_refresh_values(replacement)))
            return Rotation("rotated", row, replacement)

        return await self._run(op, write=True)

    async def find_refresh(self, token_id: str, secret_hash: str) -> RefreshRecord | None:
        t = refresh_tokens
        found = await self._run(lambda c: c.execute(select(t).where(t.c.id == token_id)).first())
        if found is None:
            return None
        row = _refresh(found)
        return row if hmac.compare_digest(row.secret_hash, secret_hash) else None

    async def revoke_family(self, family: str) -> int:
        t = refresh_tokens
        stmt = update(t).where(t.c.family == family, t.c.revoked.is_(False)).values(revoked=True)
        result = await self._run(lambda c: c.execute(stmt), write=True)
        return int(result.rowcount)

    async def revoke_subject(self, subject: str) -> int:
        t = refresh_tokens
        stmt = update(t).where(t.c.subject == subject, t.c.revoked.is_(False)).values(revoked=True)
        result = await self._run(lambda c: c.execute(stmt), write=True)
        return int(result.rowcount)

    async def session_active(self, family: str) -> bool:
        t = refresh_tokens
        query = select(t.c.id).where(t.c.family == family, t.c.revoked.is_(False)).limit(1)
        return await self._run(lambda c: c.execute(query).first()) is not None

    async def add_api_token(self, record: ApiTokenRecord) -> None:
        values = attrs.asdict(record)
        values["scopes"] = json.dumps(list(record.scopes))
        await self._run(lambda c: c.execute(insert(api_tokens).values(values)), write=True)

    async def get_api_token(self, token_id: str) -> ApiTokenRecord | None:
        t = api_tokens
        found = await self._run(lambda c: c.execute(select(t).where(t.c.id == token_id)).first())
        return None if found is None else _api(found)

    async def list_api_tokens(self, owner: str | None = None) -> Sequence[ApiTokenRecord]:
        t = api_tokens
        query = select(t).order_by(t.c.created_at, t.c.id)
        if owner is not None:
            query = query.where(t.c.owner == owner)
        rows = await self._run(lambda c: c.execute(query).all())
        return [_api(r) for r in rows]

    async def revoke_api_token(self, token_id: str) -> bool:
        t = api_tokens
        stmt = update(t).where(t.c.id == token_id, t.c.revoked.is_(False)).values(revoked=True)
        result = await self._run(lambda c: c.execute(stmt), write=True)
        return bool(result.rowcount)

    async def touch_api_token(self, token_id: str, now: float) -> None:
        t = api_tokens
        stmt = update(t).where(t.c.id == token_id).values(last_used_at=now)
        await self._run(lambda c: c.execute(stmt), write=True)

    async def prune(self, before: float, *, batch_size: int = 1000) -> dict[str, int]:
        """Delete tokens expired before `before` (refresh tokens only once their session
        has ended too, see `AuthStore.prune`) in batches of `batch_size` rows, one short
        transaction each (`nxmesh.sql.prune`); idempotent across masters."""

        async def execute(stmt: Delete) -> int:
            result = await self._run(lambda c: c.execute(stmt), write=True)
            return int(result.rowcount)

        counts: dict[str, int] = {}
        for table in (refresh_tokens, api_tokens):
            old = table.alias("old")
            picked = select(old.c.id).where(old.c.expires_at < before)
            if table is refresh_tokens:
                alive = refresh_tokens.alias("alive")
                picked = picked.where(
                    ~exists().where(
                        alive.c.family == old.c.family,
                        alive.c.expires_at >= before,
                        alive.c.revoked.is_(False),
                    )
                )
            stmt = bounded_delete(table, picked, batch_size)
            counts[table.name] = await delete_in_batches(execute, stmt, batch_size)
        return counts
