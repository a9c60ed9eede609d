"""`SqlStorage`: the `StorageBackend` both SQL backends share, on SQLAlchemy 2 Core.

The engine is synchronous and every operation runs in a worker thread through
``anyio.to_thread.run_sync``, so the backend works on asyncio and trio alike. Each
operation is one transaction: a write either lands completely or not at all, even when
the process dies between two of its statements (`_checkpoint` marks those points for
fault-injection tests).

Subclasses only build the engine (`_create_engine`); dialect differences in SQL are
limited to ``INSERT ... ON CONFLICT``, which SQLite and PostgreSQL spell the same way.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Self, TypeVar

import anyio
from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Row,
    Table,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from nxmesh.core.model import Agent, ConfigVersion, LabelSelector
from nxmesh.core.records import (
    AgentKey,
    AgentStatus,
    Assignment,
    AuditEntry,
    BootstrapToken,
    ConflictError,
    NotFoundError,
    RetentionPolicy,
    StorageError,
    StoredCertificate,
    User,
    VersionConflictError,
)
from nxmesh.core.serialization import canonical_json, structure, unstructure
from nxmesh.crypto.secrets import SecretError
from nxmesh.sql import tables as t
from nxmesh.sql.migrations import upgrade_to_head
from nxmesh.sql.prune import bounded_delete, delete_in_batches

if TYPE_CHECKING:
    from nxmesh.core.settings import Settings
    from nxmesh.crypto.secrets import MasterKeyring

__all__ = ["SqlStorage"]

T = TypeVar("T")

_WRITE = {"nxmesh_write": True}
"""Execution option marking a write transaction (SQLite takes its write lock at BEGIN)."""


def _json(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class SqlStorage:
    """Storage on a SQL database through SQLAlchemy Core; subclasses create the engine.

    Constructed as ``cls(url, keyring=...)``. Secret columns (agent session keys,
    certificate private keys) are AES-GCM tokens under `keyring`, bound to their row;
    without a keyring, storing or reading a secret raises `SecretError` — a secret is
    never written in plaintext.
    """

    name: ClassVar[str]
    schemes: ClassVar[tuple[str, ...]]

    def __init__(self, url: str, *, keyring: MasterKeyring | None = None) -> None:
        self.url = url
        self.keyring = keyring
        self._engine: Engine | None = None
        # Set by backends whose connections cannot run in parallel (in-memory SQLite).
        self._serial: threading.Lock | None = None
        self._login_failure_calls = 0
        self._ping_pending = threading.Event()  # set while a ping's thread runs

    @classmethod
    def from_settings(cls, settings: Settings, *, keyring: MasterKeyring | None = None) -> Self:
        """The backend for the ``storage_url`` of `settings` (SQLite in ``state_dir`` when
        unset); subclasses also read their plugin's settings section."""
        return cls(settings.effective_storage_url(), keyring=keyring)

    def __repr__(self) -> str:
        shown = make_url(self.url).render_as_string(hide_password=True)
        return f"{type(self).__name__}({shown!r})"

    # -- lifecycle -----------------------------------------------------------------------

    def _create_engine(self) -> Engine:
        """Build the engine (blocking; runs in a worker thread)."""
        raise NotImplementedError

    def _migrate(self, engine: Engine) -> bool:
        """Bring the schema to head (blocking); True if a migration ran."""
        return upgrade_to_head(engine)

    @property
    def engine(self) -> Engine:
        """The open engine; raises `StorageError` before `open` or after `aclose`."""
        if self._engine is None:
            raise StorageError(f"{self!r} is not open")
        return self._engine

    async def open(self) -> None:
        """Connect and migrate the schema to head."""
        if self._engine is not None:
            return
        engine = await anyio.to_thread.run_sync(self._create_engine)
        try:
            await anyio.to_thread.run_sync(self._migrate, engine)
        except BaseException:
            engine.dispose()
            raise
        self._engine = engine

    async def aclose(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            await anyio.to_thread.run_sync(engine.dispose)

    # -- plumbing ------------------------------------------------------------------------

    async def _run(self, fn: Callable[[Connection], T], *, write: bool = False) -> T:
        """Run `fn` in one transaction in a worker thread; commit unless it raises."""
        engine = self.engine

        def work() -> T:
            with engine.connect() as conn:
                if write:
                    conn = conn.execution_options(**_WRITE)
                with conn.begin():
                    return fn(conn)

        if self._serial is None:
            return await anyio.to_thread.run_sync(work)
        lock = self._serial

        def serialised() -> T:
            with lock:
                return work()

        return await anyio.to_thread.run_sync(serialised)

    async def ping(self) -> None:
        """One round trip to the database (``/readyz``). Its worker thread is abandoned
        when the caller is cancelled: a hung database cannot hold the probe past its
        timeout (the thread ends when the driver gives up)."""
        engine, lock = self.engine, self._serial
        pending = self._ping_pending
        if pending.is_set():
            # One ping thread at a time: while the database hangs, each probe would
            # otherwise leave one more blocked thread behind.
            raise StorageError("the database has not answered the previous check yet")

        def work() -> None:
            try:
                # Serialised like `_run` where connections must be (in-memory SQLite).
                with lock or threading.Lock(), engine.connect() as conn:
                    conn.execute(select(1))
            finally:
                pending.clear()

        pending.set()
        await anyio.to_thread.run_sync(work, abandon_on_cancel=True)

    def _checkpoint(self, operation: str) -> None:
        """Called between the statements of a multi-statement write. A no-op; tests patch
        it to fail or to pause (and get killed) right there."""

    @staticmethod
    def _upsert(
        conn: Connection, table: Table, values: Mapping[str, Any], keys: Sequence[str]
    ) -> None:
        insert_ = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
        stmt = insert_(table).values(dict(values))
        changes = {c: stmt.excluded[c] for c in values if c not in keys}
        conn.execute(stmt.on_conflict_do_update(index_elements=list(keys), set_=changes))

    @staticmethod
    def _insert_missing(conn: Connection, table: Table, values: Mapping[str, Any]) -> None:
        insert_ = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
        conn.execute(insert_(table).values(dict(values)).on_conflict_do_nothing())

    # -- secrets -------------------------------------------------------------------------

    def _require_keyring(self, what: str) -> MasterKeyring:
        if self.keyring is None:
            raise SecretError(
                f"{what}: no master keyring configured; {type(self).__name__} never stores "
                "secrets in plaintext (set master_key or let the master create its key file)"
            )
        return self.keyring

    def _seal(self, plaintext: bytes, aad: bytes, what: str) -> bytes:
        return self._require_keyring(f"cannot store {what}").encrypt(plaintext, aad=aad)

    def _open_secret(self, token: bytes, aad: bytes, what: str) -> bytes:
        keyring = self._require_keyring(f"cannot read {what}")
        try:
            return keyring.decrypt(bytes(token), aad=aad)
        except SecretError as exc:
            raise SecretError(f"cannot decrypt {what}: {exc}") from None

    @staticmethod
    def _key_aad(agent_id: str, key_id: str) -> bytes:
        # Binding the token to its row: a token copied into another row fails to decrypt.
        return f"nxmesh:agent_keys:{agent_id}:{key_id}".encode()

    @staticmethod
    def _cert_aad(workspace: str, name: str) -> bytes:
        return f"nxmesh:certificates:{workspace}:{name}".encode()

    async def rewrap_secrets(self) -> int:
        """Re-encrypt every secret not under the keyring's primary key; returns how many.

        Run after a master key rotation (old key as a previous key of the ring); once it
        returns, the previous keys can be dropped. One transaction: all or nothing.

        Each row is replaced only if it still holds the token that was read (compare and
        swap): another master may store a new private key or session key meanwhile (an
        ACME renewal), and that one must not be overwritten with the old secret. A row
        changed meanwhile is skipped: its new token is already under the current primary
        key (or, written by a master still on the old key, is rewrapped by the next run).
        """
        keyring = self._require_keyring("cannot rewrap secrets")
        keys, certs = t.agent_keys, t.certificates
        # Every encrypted column: (its column, the row's key columns, its AAD, its name).
        secrets: list[tuple[Column[Any], tuple[Column[Any], ...], Callable[[Any], bytes], str]] = [
            (
                keys.c.secret,
                (keys.c.agent_id, keys.c.key_id),
                lambda r: self._key_aad(r.agent_id, r.key_id),
                "agent key",
            ),
            (
                certs.c.key_pem,
                (certs.c.workspace, certs.c.name),
                lambda r: self._cert_aad(r.workspace, r.name),
                "private key",
            ),
        ]

        def op(conn: Connection) -> int:
            stale = [
                [
                    r
                    for r in conn.execute(select(column.table)).all()
                    if keyring.needs_rewrap(r._mapping[column.name])
                ]
                for column, *_ in secrets
            ]
            self._checkpoint("rewrap_secrets")
            count = 0
            for (column, ids, aad_of, what), rows in zip(secrets, stale, strict=True):
                for row in rows:
                    token = row._mapping[column.name]
                    result = conn.execute(
                        update(column.table)
                        .where(*(c == row._mapping[c.name] for c in ids))
                        .where(column == token)  # compare and swap, see above
                        .values({column.name: self._rewrap(keyring, token, aad_of(row), what)})
                    )
                    count += result.rowcount
            return count

        return await self._run(op, write=True)

    @staticmethod
    def _rewrap(keyring: MasterKeyring, token: bytes, aad: bytes, what: str) -> bytes:
        try:
            return keyring.rewrap(bytes(token), aad=aad)
        except SecretError as exc:
            raise SecretError(f"cannot rewrap {what}: {exc}") from None

    async def dump_raw(self) -> bytes:
        """Every stored value exactly as the database holds it, one row per line.

        For tests and audits: proves what is (not) at rest in plaintext.
        """

        def op(conn: Connection) -> bytes:
            lines: list[bytes] = []
            for table in t.metadata.sorted_tables:
                for row in conn.execute(select(table)):
                    cells = [
                        bytes(v) if isinstance(v, bytes | memoryview) else repr(v).encode()
                        for v in row
                    ]
                    lines.append(table.name.encode() + b"|" + b"|".join(cells))
            return b"\n".join(lines)

        return await self._run(op)

    # -- versions ------------------------------------------------------------------------

    async def add_version(self, version: ConfigVersion) -> None:
        """Store `version` if its number is the next one of its workspace.

        :raises VersionConflictError: the number is taken or would leave a gap.
        """
        body = canonical_json(version.state).decode("utf-8")
        sha = hashlib.sha256(body.encode("utf-8")).hexdigest()

        def op(conn: Connection) -> None:
            latest = conn.execute(
                select(func.max(t.config_versions.c.number)).where(
                    t.config_versions.c.workspace == version.workspace
                )
            ).scalar_one_or_none()
            if version.number != (latest or 0) + 1:
                raise VersionConflictError(version.workspace, version.number, latest or 0)
            self._insert_missing(conn, t.config_states, {"sha256": sha, "body": body})
            self._checkpoint("add_version")
            try:
                conn.execute(
                    insert(t.config_versions).values(
                        workspace=version.workspace,
                        number=version.number,
                        digest=version.digest,
                        parent_digest=version.parent_digest,
                        author=version.author,
                        message=version.message,
                        created_at=version.created_at,
                        state_sha256=sha,
                        signature=version.signature,
                        key_id=version.key_id,
                    )
                )
            except IntegrityError:
                # A concurrent writer committed this number after we read the maximum.
                raise VersionConflictError(version.workspace, version.number, None) from None

        await self._run(op, write=True)

    def _versions_query(self) -> Any:
        v, s = t.config_versions, t.config_states
        return select(v, s.c.body).join(s, v.c.state_sha256 == s.c.sha256)

    @staticmethod
    def _version(row: Row[Any]) -> ConfigVersion:
        data = {
            "workspace": row.workspace,
            "number": row.number,
            "digest": row.digest,
            "parent_digest": row.parent_digest,
            "author": row.author,
            "message": row.message,
            "created_at": row.created_at,
            "state": json.loads(row.body),
            "signature": row.signature,
            "key_id": row.key_id,
        }
        # Through the validating converter: a row edited by hand into something the model
        # refuses raises ValidationError naming the version, not a bare TypeError.
        return structure(data, ConfigVersion, source=f"stored version {row.workspace}/{row.number}")

    async def get_version(self, workspace: str, number: int) -> ConfigVersion | None:
        v = t.config_versions
        query = self._versions_query().where(v.c.workspace == workspace, v.c.number == number)
        row = await self._run(lambda conn: conn.execute(query).first())
        return None if row is None else self._version(row)

    async def latest_version(self, workspace: str) -> ConfigVersion | None:
        v = t.config_versions
        query = (
            self._versions_query()
            .where(v.c.workspace == workspace)
            .order_by(v.c.number.desc())
            .limit(1)
        )
        row = await self._run(lambda conn: conn.execute(query).first())
        return None if row is None else self._version(row)

    async def list_versions(
        self, workspace: str, *, limit: int = 100, before: int | None = None
    ) -> Sequence[ConfigVersion]:
        v = t.config_versions
        query = self._versions_query().where(v.c.workspace == workspace)
        if before is not None:
            query = query.where(v.c.number < before)
        query = query.order_by(v.c.number.desc()).limit(limit)
        rows = await self._run(lambda conn: conn.execute(query).all())
        return [self._version(r) for r in rows]

    # -- agents --------------------------------------------------------------------------

    async def upsert_agent(self, agent: Agent) -> None:
        values = {
            "id": agent.id,
            "name": agent.name,
            "labels": _json(dict(agent.labels)),
            "workspace": agent.workspace,
            "status": agent.status,
            "nginx_version": agent.nginx_version,
            "deployment_mode": agent.deployment_mode,
            "running_version": agent.running_version,
            "running_digest": agent.running_digest,
            "last_seen": agent.last_seen,
        }
        a = t.agents

        def op(conn: Connection) -> None:
            insert_ = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
            stmt = insert_(a).values(values)
            changes: dict[str, Any] = {c: stmt.excluded[c] for c in values if c != "id"}
            # Revocation is final (an agent id is never enrolled again): a write built on a
            # read from before the revocation must not bring the agent back.
            changes["status"] = case(
                (a.c.status == "revoked", a.c.status), else_=stmt.excluded.status
            )
            conn.execute(stmt.on_conflict_do_update(index_elements=["id"], set_=changes))

        await self._run(op, write=True)

    async def set_agent_offline(
        self,
        agent_id: str,
        *,
        last_seen: float,
        running_version: int | None = None,
        running_digest: str | None = None,
        unless_seen_after: float | None = None,
    ) -> bool:
        """Mark the agent offline with what it ran and when it was last seen — only if it
        is ``online`` and was not seen after `unless_seen_after` (default `last_seen`);
        True when it was. One conditional UPDATE: a concurrent revocation, or another
        master the agent reconnected to meanwhile, is never overwritten."""
        a = t.agents
        seen = last_seen if unless_seen_after is None else unless_seen_after
        stmt = (
            update(a)
            .where(a.c.id == agent_id, a.c.status == "online")
            .where(a.c.last_seen.is_(None) | (a.c.last_seen <= seen))
            .values(
                status="offline",
                running_version=running_version,
                running_digest=running_digest,
                last_seen=last_seen,
            )
        )
        result = await self._run(lambda conn: conn.execute(stmt), write=True)
        return bool(result.rowcount)

    async def revoke_agent(self, agent_id: str) -> bool:
        """Mark the agent revoked and delete every session key of it, in one transaction;
        False when there is no such agent."""
        a, keys = t.agents, t.agent_keys

        def op(conn: Connection) -> bool:
            marked = conn.execute(update(a).where(a.c.id == agent_id).values(status="revoked"))
            if not marked.rowcount:
                return False
            self._checkpoint("revoke_agent")
            conn.execute(delete(keys).where(keys.c.agent_id == agent_id))
            return True

        return await self._run(op, write=True)

    @staticmethod
    def _agent(row: Row[Any]) -> Agent:
        data = dict(row._mapping)
        data["labels"] = json.loads(row.labels)
        return structure(data, Agent, source=f"stored agent {row.id}")

    async def get_agent(self, agent_id: str) -> Agent | None:
        query = select(t.agents).where(t.agents.c.id == agent_id)
        row = await self._run(lambda conn: conn.execute(query).first())
        return None if row is None else self._agent(row)

    async def list_agents(
        self,
        workspace: str | None = None,
        *,
        workspaces: Collection[str] | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> Sequence[Agent]:
        """Agents by id; optionally only those in `workspace` and in `workspaces`, with an
        id after `after`, at most `limit` (a page: the primary key orders and seeks)."""
        a = t.agents
        query = select(a).order_by(a.c.id)
        if workspace is not None:
            query = query.where(a.c.workspace == workspace)
        if workspaces is not None:
            query = query.where(a.c.workspace.in_(sorted(workspaces)))
        if after is not None:
            query = query.where(a.c.id > after)
        if limit is not None:
            query = query.limit(limit)
        rows = await self._run(lambda conn: conn.execute(query).all())
        return [self._agent(r) for r in rows]

    async def delete_agent(self, agent_id: str) -> bool:
        """Forget an agent with its session keys and rollout statuses (cascade)."""
        stmt = delete(t.agents).where(t.agents.c.id == agent_id)
        result = await self._run(lambda conn: conn.execute(stmt), write=True)
        return bool(result.rowcount)

    # -- bootstrap tokens ----------------------------------------------------------------

    async def add_token(self, token: BootstrapToken) -> None:
        values = {
            "id": token.id,
            "secret_hash": token.secret_hash,
            "workspace": token.workspace,
            "labels": _json(dict(token.labels)),
            "created_at": token.created_at,
            "expires_at": token.expires_at,
            "used_at": token.used_at,
            "revoked": token.revoked,
        }

        def op(conn: Connection) -> None:
            try:
                conn.execute(insert(t.bootstrap_tokens).values(values))
            except IntegrityError:
                raise ConflictError(f"a bootstrap token with id {token.id!r} exists") from None

        await self._run(op, write=True)

    @staticmethod
    def _token(row: Row[Any]) -> BootstrapToken:
        return BootstrapToken(
            id=row.id,
            secret_hash=row.secret_hash,
            workspace=row.workspace,
            labels=json.loads(row.labels),
            created_at=row.created_at,
            expires_at=row.expires_at,
            used_at=row.used_at,
            revoked=bool(row.revoked),
        )

    async def consume_token(
        self, token_id: str, *, secret_hash: str, now: float | None = None
    ) -> BootstrapToken | None:
        """Mark a token used if it is usable and `secret_hash` matches; else None.

        One conditional UPDATE decides, so of many concurrent callers exactly one wins.
        A wrong secret does not use the token up.
        """
        at = time.time() if now is None else now
        tok = t.bootstrap_tokens

        def op(conn: Connection) -> BootstrapToken | None:
            row = conn.execute(select(tok.c.secret_hash).where(tok.c.id == token_id)).first()
            # Compared here in constant time rather than in the WHERE clause.
            if row is None or not hmac.compare_digest(
                row.secret_hash.encode(), secret_hash.encode()
            ):
                return None
            claimed = conn.execute(
                update(tok)
                .where(
                    tok.c.id == token_id,
                    tok.c.used_at.is_(None),
                    tok.c.revoked.is_(False),
                    tok.c.expires_at > at,
                )
                .values(used_at=at)
            )
            if claimed.rowcount != 1:
                return None
            return self._token(conn.execute(select(tok).where(tok.c.id == token_id)).one())

        return await self._run(op, write=True)

    async def revoke_token(self, token_id: str) -> bool:
        stmt = update(t.bootstrap_tokens).where(t.bootstrap_tokens.c.id == token_id)
        result = await self._run(lambda conn: conn.execute(stmt.values(revoked=True)), write=True)
        return bool(result.rowcount)

    async def get_token(self, token_id: str) -> BootstrapToken | None:
        tok = t.bootstrap_tokens
        query = select(tok).where(tok.c.id == token_id)
        row = await self._run(lambda conn: conn.execute(query).first())
        return None if row is None else self._token(row)

    async def list_tokens(self, workspace: str | None = None) -> Sequence[BootstrapToken]:
        tok = t.bootstrap_tokens
        query = select(tok).order_by(tok.c.created_at, tok.c.id)
        if workspace is not None:
            query = query.where(tok.c.workspace == workspace)
        rows = await self._run(lambda conn: conn.execute(query).all())
        return [self._token(r) for r in rows]

    # -- agent keys ----------------------------------------------------------------------

    async def add_agent_key(self, key: AgentKey) -> None:
        """Store a session key (encrypted); a primary key demotes the agent's others."""
        token = self._seal(key.secret, self._key_aad(key.agent_id, key.key_id), "an agent key")
        keys = t.agent_keys

        def op(conn: Connection) -> None:
            # Checked first: after a failed statement PostgreSQL refuses any further query
            # in the transaction, so the error could not be told apart afterwards.
            if (
                conn.execute(select(t.agents.c.id).where(t.agents.c.id == key.agent_id)).first()
                is None
            ):
                raise NotFoundError(f"no agent {key.agent_id!r} to add a key to")
            if key.primary:
                conn.execute(
                    update(keys).where(keys.c.agent_id == key.agent_id).values(is_primary=False)
                )
                self._checkpoint("add_agent_key")
            try:
                conn.execute(
                    insert(keys).values(
                        agent_id=key.agent_id,
                        key_id=key.key_id,
                        secret=token,
                        created_at=key.created_at,
                        expires_at=key.expires_at,
                        is_primary=key.primary,
                    )
                )
            except IntegrityError:
                raise ConflictError(
                    f"agent {key.agent_id!r} already has a key {key.key_id!r}"
                ) from None

        await self._run(op, write=True)

    def _agent_key(self, row: Row[Any]) -> AgentKey:
        secret = self._open_secret(
            row.secret,
            self._key_aad(row.agent_id, row.key_id),
            f"key {row.key_id!r} of agent {row.agent_id!r}",
        )
        return AgentKey(
            agent_id=row.agent_id,
            key_id=row.key_id,
            secret=secret,
            created_at=row.created_at,
            expires_at=row.expires_at,
            primary=bool(row.is_primary),
        )

    async def get_agent_key(self, agent_id: str, key_id: str) -> AgentKey | None:
        keys = t.agent_keys
        query = select(keys).where(keys.c.agent_id == agent_id, keys.c.key_id == key_id)
        row = await self._run(lambda conn: conn.execute(query).first())
        return None if row is None else self._agent_key(row)

    async def list_agent_keys(self, agent_id: str) -> Sequence[AgentKey]:
        """The agent's keys, the primary first, then newest first."""
        keys = t.agent_keys
        query = (
            select(keys)
            .where(keys.c.agent_id == agent_id)
            .order_by(keys.c.is_primary.desc(), keys.c.created_at.desc(), keys.c.key_id)
        )
        rows = await self._run(lambda conn: conn.execute(query).all())
        return [self._agent_key(r) for r in rows]

    async def revoke_agent_keys(self, agent_id: str) -> int:
        """Delete every session key of the agent; returns how many there were."""
        stmt = delete(t.agent_keys).where(t.agent_keys.c.agent_id == agent_id)
        result = await self._run(lambda conn: conn.execute(stmt), write=True)
        return int(result.rowcount)

    # -- assignments ---------------------------------------------------------------------

    async def set_assignment(self, assignment: Assignment) -> None:
        """Create or replace the assignment named ``(workspace, name)``.

        :raises NotFoundError: the version does not exist in the workspace.
        """
        values = {
            "workspace": assignment.workspace,
            "name": assignment.name,
            "selector": _json(unstructure(assignment.selector)),
            "version": assignment.version,
            "created_at": assignment.created_at,
        }

        def op(conn: Connection) -> None:
            try:
                self._upsert(conn, t.assignments, values, ["workspace", "name"])
            except IntegrityError:
                raise NotFoundError(
                    f"workspace {assignment.workspace!r} has no version {assignment.version} "
                    f"to assign as {assignment.name!r}"
                ) from None

        await self._run(op, write=True)

    async def list_assignments(self, workspace: str) -> Sequence[Assignment]:
        a = t.assignments
        query = select(a).where(a.c.workspace == workspace).order_by(a.c.name)
        rows = await self._run(lambda conn: conn.execute(query).all())
        return [
            Assignment(
                workspace=r.workspace,
                name=r.name,
                selector=structure(json.loads(r.selector), LabelSelector),
                version=r.version,
                created_at=r.created_at,
            )
            for r in rows
        ]

    async def delete_assignment(self, workspace: str, name: str) -> bool:
        a = t.assignments
        stmt = delete(a).where(a.c.workspace == workspace, a.c.name == name)
        result = await self._run(lambda conn: conn.execute(stmt), write=True)
        return bool(result.rowcount)

    # -- certificates --------------------------------------------------------------------

    async def put_certificate(self, cert: StoredCertificate) -> None:
        """Create or replace a certificate; its private key is stored encrypted."""
        token = self._seal(
            cert.key_pem.encode("utf-8"), self._cert_aad(cert.workspace, cert.name), "a private key"
        )
        values = {
            "workspace": cert.workspace,
            "name": cert.name,
            "cert_pem": cert.cert_pem,
            "chain_pem": cert.chain_pem,
            "key_pem": token,
            "not_after": cert.not_after,
            "domains": _json(list(cert.domains)),
            "source": cert.source,
        }
        await self._run(
            lambda conn: self._upsert(conn, t.certificates, values, ["workspace", "name"]),
            write=True,
        )

    def _certificate(self, row: Row[Any]) -> StoredCertificate:
        key = self._open_secret(
            row.key_pem,
            self._cert_aad(row.workspace, row.name),
            f"the private key of certificate {row.name!r} in workspace {row.workspace!r}",
        )
        return StoredCertificate(
            workspace=row.workspace,
            name=row.name,
            cert_pem=row.cert_pem,
            chain_pem=row.chain_pem,
            key_pem=key.decode("utf-8"),
            not_after=row.not_after,
            domains=tuple(json.loads(row.domains)),
            source=row.source,
        )

    async def get_certificate(self, workspace: str, name: str) -> StoredCertificate | None:
        c = t.certificates
        query = select(c).where(c.c.workspace == workspace, c.c.name == name)
        row = await self._run(lambda conn: conn.execute(query).first())
        return None if row is None else self._certificate(row)

    async def list_certificates(self, workspace: str) -> Sequence[StoredCertificate]:
        c = t.certificates
        query = select(c).where(c.c.workspace == workspace).order_by(c.c.name)
        rows = await self._run(lambda conn: conn.execute(query).all())
        return [self._certificate(r) for r in rows]

    async def delete_certificate(self, workspace: str, name: str) -> bool:
        c = t.certificates
        stmt = delete(c).where(c.c.workspace == workspace, c.c.name == name)
        result = await self._run(lambda conn: conn.execute(stmt), write=True)
        return bool(result.rowcount)

    # -- audit log -----------------------------------------------------------------------

    async def append_audit(self, entry: AuditEntry) -> None:
        values = {
            "id": entry.id,
            "ts": entry.ts,
            "actor": entry.actor,
            "action": entry.action,
            "resource": entry.resource,
            "remote_addr": entry.remote_addr,
            "details": _json(_plain(entry.details)),
        }

        def op(conn: Connection) -> None:
            try:
                conn.execute(insert(t.audit_log).values(values))
            except IntegrityError:
                raise ConflictError(f"audit entry {entry.id!r} exists") from None

        await self._run(op, write=True)

    async def list_audit(
        self, *, limit: int = 100, since: float | None = None, before: str | None = None
    ) -> Sequence[AuditEntry]:
        """Entries newest first (in append order), at most `limit`, with ``ts >= since``,
        appended before entry `before` (its ``seq``: clocks may disagree, the order not)."""
        log = t.audit_log
        query = select(log).order_by(log.c.seq.desc()).limit(limit)
        if since is not None:
            query = query.where(log.c.ts >= since)
        if before is not None:
            # An unknown id gives NULL, and ``seq < NULL`` no rows: an empty page.
            query = query.where(
                log.c.seq < select(log.c.seq).where(log.c.id == before).scalar_subquery()
            )
        rows = await self._run(lambda conn: conn.execute(query).all())
        return [
            AuditEntry(
                id=r.id,
                ts=r.ts,
                actor=r.actor,
                action=r.action,
                resource=r.resource,
                remote_addr=r.remote_addr,
                details=json.loads(r.details),
            )
            for r in rows
        ]

    # -- users ---------------------------------------------------------------------------

    async def put_user(self, user: User) -> None:
        values = {
            "username": user.username,
            "password_hash": user.password_hash,
            "roles": _json(list(user.roles)),
            "disabled": user.disabled,
        }
        await self._run(lambda conn: self._upsert(conn, t.users, values, ["username"]), write=True)

    @staticmethod
    def _user(row: Row[Any]) -> User:
        return User(
            username=row.username,
            password_hash=row.password_hash,
            roles=tuple(json.loads(row.roles)),
            disabled=bool(row.disabled),
        )

    async def get_user(self, username: str) -> User | None:
        query = select(t.users).where(t.users.c.username == username)
        row = await self._run(lambda conn: conn.execute(query).first())
        return None if row is None else self._user(row)

    async def list_users(self) -> Sequence[User]:
        query = select(t.users).order_by(t.users.c.username)
        rows = await self._run(lambda conn: conn.execute(query).all())
        return [self._user(r) for r in rows]

    async def delete_user(self, username: str) -> bool:
        stmt = delete(t.users).where(t.users.c.username == username)
        result = await self._run(lambda conn: conn.execute(stmt), write=True)
        return bool(result.rowcount)

    async def replace_password_hash(self, username: str, old_hash: str, new_hash: str) -> bool:
        """Set `username`'s password hash to `new_hash` if it still is `old_hash`, and
        nothing else (an optional method: see `nxmesh.master.auth.passwords.replace_hash`).
        One statement: a user disabled, re-roled, deleted or given another password while
        the new hash was computed stays so. False when it did not apply."""
        users = t.users
        stmt = (
            update(users)
            .where(users.c.username == username, users.c.password_hash == old_hash)
            .values(password_hash=new_hash)
        )
        result = await self._run(lambda conn: conn.execute(stmt), write=True)
        return bool(result.rowcount)

    # -- failed password logins (shared lockout) -----------------------------------------
    # Optional storage methods: `nxmesh.plugins.auth_password` uses them when a backend
    # has both, and keeps its counters in process memory otherwise.

    _PRUNE_EVERY = 64

    async def count_login_failure(
        self,
        username: str,
        remote_addr: str,
        *,
        now: float,
        threshold: int,
        base_delay: float,
        max_delay: float,
        forget_after: float,
    ) -> tuple[bool, int, float]:
        """Count one login attempt of (`username`, `remote_addr`) as failed, unless locked.

        One ``INSERT ... ON CONFLICT DO UPDATE ... WHERE ... RETURNING`` statement checks
        the lock, increments the counter and sets the lock, so masters racing on one
        database never lose an increment nor slip past a lock. The policy is the
        in-memory one: a counter idle for more than `forget_after` seconds restarts at 1;
        from `threshold` failures on, the key is locked for ``base_delay * 2**(failures -
        threshold)`` seconds (exponent at most 32), at most `max_delay`. Times are epoch
        seconds (`now`), comparable between masters.

        :returns: ``(counted, failures, locked_until)``; ``counted`` is False when the key
            was locked (nothing counted; `locked_until` says until when).
        """
        lf = t.auth_login_failures
        stale = lf.c.last_failure < now - forget_after
        new_failures = case((stale, 1), else_=lf.c.failures + 1)

        def lock(failures: Any) -> Any:
            whens: list[tuple[Any, float]] = []
            for exponent in range(33):
                delay = min(max_delay, base_delay * 2**exponent)
                if delay >= max_delay:
                    break
                whens.append((failures == threshold + exponent, now + delay))
            longest = now + min(max_delay, base_delay * 2**32)
            return case(*whens, else_=longest) if whens else longest

        first_lock = now + min(max_delay, base_delay) if threshold <= 1 else 0.0
        self._login_failure_calls += 1
        prune = self._login_failure_calls % self._PRUNE_EVERY == 0

        def op(conn: Connection) -> tuple[bool, int, float]:
            insert_ = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
            stmt = insert_(lf).values(
                username=username,
                remote_addr=remote_addr,
                failures=1,
                locked_until=first_lock,
                last_failure=now,
            )
            upsert = stmt.on_conflict_do_update(
                index_elements=[lf.c.username, lf.c.remote_addr],
                set_={
                    "failures": new_failures,
                    "locked_until": case(
                        (new_failures >= threshold, lock(new_failures)), else_=lf.c.locked_until
                    ),
                    "last_failure": now,
                },
                where=(lf.c.locked_until <= now) | stale,
            ).returning(lf.c.failures, lf.c.locked_until)
            row = conn.execute(upsert).first()
            if prune:
                conn.execute(delete(lf).where(lf.c.last_failure < now - forget_after))
            if row is not None:
                return True, int(row.failures), float(row.locked_until)
            key = (lf.c.username == username) & (lf.c.remote_addr == remote_addr)
            locked = conn.execute(select(lf.c.failures, lf.c.locked_until).where(key)).one()
            return False, int(locked.failures), float(locked.locked_until)

        return await self._run(op, write=True)

    async def clear_login_failures(self, username: str, remote_addr: str) -> None:
        """Forget the failures of (`username`, `remote_addr`) after a successful login."""
        lf = t.auth_login_failures
        stmt = delete(lf).where((lf.c.username == username) & (lf.c.remote_addr == remote_addr))
        await self._run(lambda conn: conn.execute(stmt), write=True)

    # -- rollout status ------------------------------------------------------------------

    async def set_agent_status(self, status: AgentStatus) -> None:
        """Record (or replace) how the agent's rollout of one version went."""
        values = {
            "agent_id": status.agent_id,
            "version": status.version,
            "digest": status.digest,
            "phase": status.phase,
            "message": status.message,
            "ts": status.ts,
        }

        def op(conn: Connection) -> None:
            try:
                self._upsert(conn, t.agent_status, values, ["agent_id", "version"])
            except IntegrityError:
                raise NotFoundError(
                    f"no agent {status.agent_id!r} to record a status for"
                ) from None

        await self._run(op, write=True)

    async def set_agent_statuses(self, statuses: Sequence[AgentStatus]) -> list[AgentStatus]:
        """Record (or replace) many statuses in one transaction; returns those stored.

        For one ``(agent, version)`` the last status given wins, as if stored one by one
        in order; statuses of agents that do not exist (deleted meanwhile) are skipped.
        """
        latest = {(s.agent_id, s.version): s for s in statuses}
        if not latest:
            return []
        a = t.agent_status

        def op(conn: Connection) -> list[AgentStatus]:
            ids = sorted({agent_id for agent_id, _ in latest})
            known = set(conn.execute(select(t.agents.c.id).where(t.agents.c.id.in_(ids))).scalars())
            stored = [s for s in latest.values() if s.agent_id in known]
            rows = [
                {
                    "agent_id": s.agent_id,
                    "version": s.version,
                    "digest": s.digest,
                    "phase": s.phase,
                    "message": s.message,
                    "ts": s.ts,
                }
                for s in stored
            ]
            if rows:
                insert_ = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
                stmt = insert_(a)
                changes = {c: stmt.excluded[c] for c in ("digest", "phase", "message", "ts")}
                # One statement, many parameter sets (executemany): one round of the
                # driver instead of a transaction per agent.
                conn.execute(
                    stmt.on_conflict_do_update(
                        index_elements=["agent_id", "version"], set_=changes
                    ),
                    rows,
                )
            return stored

        return await self._run(op, write=True)

    async def set_running_versions(self, running: Sequence[tuple[str, int, str, float]]) -> int:
        """Set ``(agent id, running version, running digest, last seen)`` of many agents in
        one transaction (the last entry per agent wins); returns how many agents exist."""
        latest = {entry[0]: entry for entry in running}
        if not latest:
            return 0
        a = t.agents
        stmt = (
            update(a)
            .where(a.c.id == bindparam("b_id"))
            .values(
                running_version=bindparam("b_version"),
                running_digest=bindparam("b_digest"),
                last_seen=bindparam("b_seen"),
            )
        )
        rows = [
            {"b_id": i, "b_version": v, "b_digest": d, "b_seen": ts}
            for i, v, d, ts in latest.values()
        ]
        result = await self._run(lambda conn: conn.execute(stmt, rows), write=True)
        return int(result.rowcount)

    async def list_agent_statuses(
        self, workspace: str, *, version: int | None = None, agent_id: str | None = None
    ) -> Sequence[AgentStatus]:
        """Statuses of the workspace's agents (optionally for one version, of one agent),
        by agent."""
        s, a = t.agent_status, t.agents
        query = (
            select(s)
            .join(a, and_(a.c.id == s.c.agent_id, a.c.workspace == workspace))
            .order_by(s.c.agent_id, s.c.version)
        )
        if version is not None:
            query = query.where(s.c.version == version)
        if agent_id is not None:
            query = query.where(s.c.agent_id == agent_id)
        rows = await self._run(lambda conn: conn.execute(query).all())
        return [
            AgentStatus(
                agent_id=r.agent_id,
                version=r.version,
                digest=r.digest,
                phase=r.phase,
                message=r.message,
                ts=r.ts,
            )
            for r in rows
        ]

    # -- retention -----------------------------------------------------------------------

    async def prune(self, policy: RetentionPolicy) -> dict[str, int]:
        """Delete what `policy` lets go; returns the rows deleted per table.

        Only the tables `policy` names a limit for are visited (and counted, 0 included).
        Each table is pruned in batches of `policy.batch_size` rows, one short write
        transaction per batch (`nxmesh.sql.prune`), so neither SQLite's write lock nor
        PostgreSQL's row locks are held across a whole table. Idempotent: a pass cut
        short, or two masters pruning at once, delete each row once.

        Rollout statuses are kept for the latest `policy.status_versions` versions of
        each workspace; an older one goes unless it is its agent's latest status, the
        status of the version its agent runs, or of a version an assignment of its
        workspace pins. A workspace without versions keeps all its statuses.
        """
        size = policy.batch_size
        counts: dict[str, int] = {}

        async def execute(stmt: Any) -> int:
            result = await self._run(lambda conn: conn.execute(stmt), write=True)
            return int(result.rowcount)

        async def prune(table: Table, picked: Any) -> None:
            stmt = bounded_delete(table, picked, size)
            counts[table.name] = await delete_in_batches(execute, stmt, size)

        if policy.audit_before is not None:
            log = t.audit_log.alias("old")
            await prune(
                t.audit_log,
                select(log.c.seq).where(log.c.ts < policy.audit_before).order_by(log.c.seq),
            )
        if policy.status_versions:
            await prune(t.agent_status, self._stale_statuses(policy.status_versions))
        if policy.tokens_before is not None:
            tok = t.bootstrap_tokens.alias("old")
            before = policy.tokens_before
            await prune(
                t.bootstrap_tokens,
                select(tok.c.id).where((tok.c.used_at < before) | (tok.c.expires_at < before)),
            )
        if policy.event_payloads_before is not None:
            ev = t.event_payloads.alias("old")
            await prune(
                t.event_payloads,
                select(ev.c.id).where(ev.c.created_at < policy.event_payloads_before),
            )
        if policy.login_failures_before is not None:
            lf = t.auth_login_failures.alias("old")
            await prune(
                t.auth_login_failures,
                select(lf.c.username, lf.c.remote_addr).where(
                    lf.c.last_failure < policy.login_failures_before
                ),
            )
        return counts

    @staticmethod
    def _stale_statuses(keep_versions: int) -> Any:
        """The keys of the statuses `prune` may delete (see there), as a query."""
        old = t.agent_status.alias("old")
        newer = t.agent_status.alias("newer")
        a, v, pins = t.agents, t.config_versions, t.assignments
        latest = select(func.max(v.c.number)).where(v.c.workspace == a.c.workspace)
        agents_latest = select(func.max(newer.c.version)).where(newer.c.agent_id == old.c.agent_id)
        pinned = select(pins.c.version).where(pins.c.workspace == a.c.workspace)
        return (
            select(old.c.agent_id, old.c.version)
            .join(a, a.c.id == old.c.agent_id)
            # NULL (no versions) compares to nothing: such a workspace keeps everything.
            .where(old.c.version <= latest.scalar_subquery() - keep_versions)
            .where(old.c.version < agents_latest.scalar_subquery())
            .where(a.c.running_version.is_(None) | (old.c.version != a.c.running_version))
            .where(old.c.version.not_in(pinned))
        )


def _plain(value: Any) -> Any:
    """JSON-ready copy of audit details (FrozenMaps and tuples become dicts and lists)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
