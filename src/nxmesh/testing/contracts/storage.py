"""Behaviour every storage backend provides.

Subclass `StorageContract` and provide ``storage_factory``::

    class TestMyStorage(StorageContract):
        @pytest.fixture
        def storage_factory(self, tmp_path, master_keyring):
            url = f"mine:///{tmp_path}/db"
            return lambda *, keyring=master_keyring: MyStorage(url, keyring=keyring)

Backends built on `nxmesh.sql.SqlStorage` need nothing else. Others also override
``dump_raw`` (every stored byte), ``fail_between_statements`` and ``killed_writer_argv``
(fault injection inside a write), which default to `SqlStorage`'s hooks.
"""

# The secret_hash/password_hash literals below are test values, not credentials.
# ruff: noqa: S106

from __future__ import annotations

import base64
import os
import select
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

import anyio
import attrs
import pytest

from nxmesh.core.interfaces import StorageBackend
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
    StoredCertificate,
    User,
    VersionConflictError,
)
from nxmesh.crypto.secrets import MasterKeyring, SecretError, generate_key
from nxmesh.testing.factories import make_state, make_version

__all__ = ["InjectedFault", "StorageContract", "StorageFactory"]


class InjectedFault(Exception):
    """Raised by ``fail_between_statements`` in the middle of a write."""


class StorageFactory(Protocol):
    """Makes a new, unopened backend on the test's database (the same one every call)."""

    def __call__(self, *, keyring: MasterKeyring | None = ...) -> StorageBackend: ...


DumpRaw = Callable[[StorageBackend], Awaitable[bytes]]
FaultInjector = Callable[[StorageBackend], AbstractContextManager[None]]

_KILLED_WRITER = textwrap.dedent(
    """
    import importlib, sys, time
    import anyio
    from nxmesh.testing.factories import make_state, make_version

    module, qualname, url = sys.argv[1:4]
    cls = getattr(importlib.import_module(module), qualname)

    def pause(self, operation):
        print("paused", operation, flush=True)
        time.sleep(600)  # the test kills us here, mid-transaction

    cls._checkpoint = pause

    async def main():
        storage = cls(url)
        await storage.open()
        await storage.add_version(make_version(2, state=make_state(3), message="torn"))

    anyio.run(main)
    """
)


def _key(agent_id: str = "a1", key_id: str = "k1", **kwargs: object) -> AgentKey:
    fields: dict[str, object] = {
        "agent_id": agent_id,
        "key_id": key_id,
        "secret": os.urandom(32),
        "created_at": time.time(),
        "expires_at": time.time() + 3600,
    }
    fields.update(kwargs)
    return AgentKey(**fields)  # type: ignore[arg-type]


async def _attempt(
    backend: StorageBackend, version: ConfigVersion, writer: int, won: list[int], lost: list[int]
) -> None:
    try:
        await backend.add_version(version)
    except VersionConflictError:
        lost.append(writer)
    else:
        won.append(writer)


def _certificate(
    name: str = "www", workspace: str = "default", **kwargs: object
) -> StoredCertificate:
    body = base64.b64encode(os.urandom(48)).decode()
    fields: dict[str, object] = {
        "workspace": workspace,
        "name": name,
        "cert_pem": f"-----BEGIN CERTIFICATE-----\nCERT{name}\n-----END CERTIFICATE-----\n",
        "chain_pem": "",
        "key_pem": f"-----BEGIN PRIVATE KEY-----\n{body}\n-----END PRIVATE KEY-----\n",
        "not_after": time.time() + 86400 * 90,
        "domains": (f"{name}.example.test",),
        "source": "upload",
    }
    fields.update(kwargs)
    return StoredCertificate(**fields)  # type: ignore[arg-type]


class StorageContract:
    """Provide ``storage_factory``: a `StorageFactory` on an empty database; calling it
    twice must reach the *same* database (reopen and multi-instance tests), and its
    ``keyring`` defaults to the ``master_keyring`` fixture."""

    pytestmark = pytest.mark.anyio

    # -- fixtures ------------------------------------------------------------------------

    @pytest.fixture
    def master_key(self) -> bytes:
        """The master key the default keyring is made of."""
        return generate_key()

    @pytest.fixture
    def master_keyring(self, master_key: bytes) -> MasterKeyring:
        return MasterKeyring(master_key)

    @pytest.fixture
    def storage_factory(self) -> StorageFactory:
        raise NotImplementedError("subclasses provide storage_factory")

    @pytest.fixture
    async def storage(self, storage_factory: StorageFactory) -> AsyncIterator[StorageBackend]:
        backend = storage_factory()
        await backend.open()
        try:
            yield backend
        finally:
            await backend.aclose()

    @pytest.fixture
    def dump_raw(self) -> DumpRaw:
        """Every byte the backend persisted, as stored (``SqlStorage.dump_raw``)."""

        async def dump(storage: StorageBackend) -> bytes:
            method = getattr(storage, "dump_raw", None)
            if method is None:
                raise NotImplementedError("override the dump_raw fixture for this backend")
            raw: bytes = await method()
            return raw

        return dump

    @pytest.fixture
    def fail_between_statements(self, monkeypatch: pytest.MonkeyPatch) -> FaultInjector:
        """While active, the backend's writes raise `InjectedFault` after their first
        statement (``SqlStorage._checkpoint``)."""

        @contextmanager
        def inject(storage: StorageBackend) -> Iterator[None]:
            if not hasattr(storage, "_checkpoint"):
                raise NotImplementedError("override fail_between_statements for this backend")

            def fail(operation: str) -> None:
                raise InjectedFault(operation)

            with monkeypatch.context() as patch:
                patch.setattr(storage, "_checkpoint", fail)
                yield

        return inject

    @pytest.fixture
    def killed_writer_argv(self, storage_factory: StorageFactory) -> list[str]:
        """A command that opens the database, starts adding version 2 (a state with three
        sites), prints ``paused`` after the first statement of that write and waits."""
        backend = storage_factory(keyring=None)
        url = getattr(backend, "url", None)
        if url is None or not hasattr(backend, "_checkpoint"):
            raise NotImplementedError("override killed_writer_argv for this backend")
        cls = type(backend)
        return [sys.executable, "-c", _KILLED_WRITER, cls.__module__, cls.__qualname__, url]

    def test_has_the_whole_protocol(self, storage_factory: StorageFactory) -> None:
        """A backend class carries a name and URL schemes and every protocol method."""
        backend = storage_factory()
        assert isinstance(backend, StorageBackend)
        assert backend.name
        assert backend.schemes

    # -- versions ------------------------------------------------------------------------

    async def test_version_round_trips(self, storage: StorageBackend) -> None:
        """A stored version reads back equal, by number and as the latest."""
        version = make_version(1)
        await storage.add_version(version)
        assert await storage.get_version("default", 1) == version
        assert await storage.latest_version("default") == version

    async def test_versions_are_listed_newest_first_per_workspace(
        self, storage: StorageBackend
    ) -> None:
        """Listing returns one workspace's versions, newest first, honouring limit and before."""
        for n in (1, 2, 3):
            await storage.add_version(make_version(n))
        await storage.add_version(make_version(1, workspace="other"))
        listed = await storage.list_versions("default")
        assert [v.number for v in listed] == [3, 2, 1]
        assert [v.number for v in await storage.list_versions("default", limit=1)] == [3]
        assert [v.number for v in await storage.list_versions("default", before=3)] == [2, 1]

    async def test_version_numbers_cannot_be_reused(self, storage: StorageBackend) -> None:
        """Adding a second version with an existing number fails and keeps the first."""
        first = make_version(1)
        await storage.add_version(first)
        with pytest.raises(VersionConflictError):
            await storage.add_version(make_version(1, message="impostor"))
        assert await storage.get_version("default", 1) == first

    async def test_version_numbers_cannot_leave_a_gap(self, storage: StorageBackend) -> None:
        """The first version is 1 and each next one is latest + 1; anything else fails."""
        with pytest.raises(VersionConflictError):
            await storage.add_version(make_version(2))
        await storage.add_version(make_version(1))
        with pytest.raises(VersionConflictError):
            await storage.add_version(make_version(3))
        assert [v.number for v in await storage.list_versions("default")] == [1]

    async def test_rollback_to_an_identical_state_reads_back(self, storage: StorageBackend) -> None:
        """Versions sharing one state (a rollback) each read back whole and signed."""
        state = make_state(2)
        first = make_version(1, state=state)
        second = make_version(2, state=make_state(1))
        third = make_version(3, state=state, message="rollback to 1")
        third = attrs.evolve(third, signature="c2ln", key_id="ed25519:abc")
        for version in (first, second, third):
            await storage.add_version(version)
        assert await storage.get_version("default", 3) == third
        assert await storage.get_version("default", 1) == first

    async def test_unknown_version_is_none(self, storage: StorageBackend) -> None:
        """Reading a version that was never stored gives None."""
        assert await storage.get_version("default", 42) is None
        assert await storage.latest_version("nowhere") is None

    async def test_concurrent_writers_get_one_winner_per_number(
        self, storage_factory: StorageFactory
    ) -> None:
        """Eight writers on two backend instances race for each number: one wins, seven
        get VersionConflictError, and the winner's version is the one stored."""
        instances = [storage_factory(), storage_factory()]
        for instance in instances:
            await instance.open()
        try:
            for number in (1, 2, 3):
                won: list[int] = []
                lost: list[int] = []
                async with anyio.create_task_group() as tg:
                    for writer in range(8):
                        tg.start_soon(
                            _attempt,
                            instances[writer % 2],
                            make_version(number, message=f"w{writer}"),
                            writer,
                            won,
                            lost,
                        )
                assert len(won) == 1
                assert sorted(won + lost) == list(range(8))
                stored = await instances[1].get_version("default", number)
                assert stored is not None
                assert stored.message == f"w{won[0]}"
            listed = await instances[0].list_versions("default")
            assert [v.number for v in listed] == [3, 2, 1]
        finally:
            for instance in instances:
                await instance.aclose()

    async def test_racing_writers_leave_no_gaps(self, storage_factory: StorageFactory) -> None:
        """Writers that read the latest and add the next, retrying on conflict, end with
        exactly the numbers 1..N, each added once."""
        instances = [storage_factory(), storage_factory()]
        for instance in instances:
            await instance.open()
        target = 12
        added: list[int] = []

        async def writer(backend: StorageBackend) -> None:
            while True:
                latest = await backend.latest_version("default")
                number = (latest.number if latest else 0) + 1
                if number > target:
                    return
                try:
                    await backend.add_version(make_version(number))
                except VersionConflictError:
                    continue
                added.append(number)

        try:
            async with anyio.create_task_group() as tg:
                for i in range(6):
                    tg.start_soon(writer, instances[i % 2])
            listed = await instances[0].list_versions("default")
        finally:
            for instance in instances:
                await instance.aclose()
        assert sorted(added) == list(range(1, target + 1))
        assert [v.number for v in listed] == list(range(target, 0, -1))

    async def test_failure_between_statements_leaves_no_torn_version(
        self,
        storage: StorageBackend,
        storage_factory: StorageFactory,
        fail_between_statements: FaultInjector,
        dump_raw: DumpRaw,
    ) -> None:
        """A write that dies after its first statement leaves no trace of itself."""
        await storage.add_version(make_version(1))
        with fail_between_statements(storage), pytest.raises(InjectedFault):
            await storage.add_version(make_version(2, state=make_state(3)))
        assert await storage.get_version("default", 2) is None
        # The state of the failed write (its third site) was rolled back too.
        assert b"site2.example.test" not in await dump_raw(storage)
        await storage.add_version(make_version(2))
        reopened = storage_factory()
        await reopened.open()
        try:
            assert [v.number for v in await reopened.list_versions("default")] == [2, 1]
        finally:
            await reopened.aclose()

    async def test_failed_key_rotation_keeps_the_old_primary(
        self, storage: StorageBackend, fail_between_statements: FaultInjector
    ) -> None:
        """Adding a primary key that fails half-way leaves the previous key primary."""
        await storage.upsert_agent(Agent(id="a1", name="edge-1"))
        await storage.add_agent_key(_key(key_id="old"))
        with fail_between_statements(storage), pytest.raises(InjectedFault):
            await storage.add_agent_key(_key(key_id="new"))
        keys = await storage.list_agent_keys("a1")
        assert [(k.key_id, k.primary) for k in keys] == [("old", True)]

    def test_killed_writer_leaves_no_torn_version(
        self, storage_factory: StorageFactory, killed_writer_argv: list[str]
    ) -> None:
        """A writer process killed (SIGKILL) in the middle of adding a version leaves the
        database at the previous version, and the next writer can add that number."""

        async def add_first() -> None:
            backend = storage_factory()
            await backend.open()
            try:
                await backend.add_version(make_version(1))
            finally:
                await backend.aclose()

        anyio.run(add_first)
        proc = subprocess.Popen(  # noqa: S603 - our own interpreter and script
            killed_writer_argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 60)
            line = proc.stdout.readline() if ready else ""
            if not line.startswith("paused"):
                proc.kill()
                _, err = proc.communicate(timeout=10)
                pytest.fail(f"the writer never reached the middle of its write:\n{err}")
            proc.kill()
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=10)

        async def check() -> tuple[list[int], bytes, list[int]]:
            backend = storage_factory()
            await backend.open()
            try:
                before = [v.number for v in await backend.list_versions("default")]
                raw = await getattr(backend, "dump_raw", _no_dump)()
                await backend.add_version(make_version(2))
                after = [v.number for v in await backend.list_versions("default")]
                return before, raw, after
            finally:
                await backend.aclose()

        before, raw, after = anyio.run(check)
        assert before == [1]
        assert b"site2.example.test" not in raw
        assert after == [2, 1]

    # -- agents --------------------------------------------------------------------------

    async def test_agent_upsert_updates_in_place(self, storage: StorageBackend) -> None:
        """Upserting the same agent id twice keeps one record with the latest fields."""
        await storage.upsert_agent(Agent(id="a1", name="edge-1", labels={"env": "prod"}))
        await storage.upsert_agent(Agent(id="a1", name="edge-1", status="online"))
        agent = await storage.get_agent("a1")
        assert agent is not None
        assert agent.status == "online"
        assert [a.id for a in await storage.list_agents()] == ["a1"]
        assert await storage.get_agent("missing") is None

    async def test_agent_round_trips_every_field(self, storage: StorageBackend) -> None:
        """An agent with every field set reads back equal; listing filters by workspace."""
        agent = Agent(
            id="a1",
            name="edge-1",
            labels={"env": "prod", "zone": "eu-1"},
            workspace="shop",
            status="online",
            nginx_version="1.26.2",
            deployment_mode="standalone",
            running_version=7,
            running_digest="sha256:" + "ab" * 32,
            last_seen=1_700_000_000.25,
        )
        await storage.upsert_agent(agent)
        await storage.upsert_agent(Agent(id="a2", name="edge-2"))
        assert await storage.get_agent("a1") == agent
        assert [a.id for a in await storage.list_agents("shop")] == ["a1"]
        assert [a.id for a in await storage.list_agents()] == ["a1", "a2"]

    async def test_set_agent_offline_changes_only_an_online_agent(
        self, storage: StorageBackend
    ) -> None:
        """Going offline is one conditional write: it applies to an online agent not seen
        later elsewhere, and never turns a revoked (or unknown) agent into an offline one."""
        await storage.upsert_agent(Agent(id="a1", name="edge-1", status="online", last_seen=10.0))
        assert await storage.set_agent_offline(
            "a1", last_seen=12.0, running_version=3, running_digest="d3"
        )
        agent = await storage.get_agent("a1")
        assert agent is not None
        assert (agent.status, agent.last_seen) == ("offline", 12.0)
        assert (agent.running_version, agent.running_digest) == (3, "d3")
        assert not await storage.set_agent_offline("a1", last_seen=13.0)  # offline already
        # Seen by another master after this one lost it: connected there, stays online.
        await storage.upsert_agent(Agent(id="a1", name="edge-1", status="online", last_seen=20.0))
        assert not await storage.set_agent_offline("a1", last_seen=15.0, unless_seen_after=16.0)
        assert await storage.set_agent_offline("a1", last_seen=15.0, unless_seen_after=21.0)
        await storage.upsert_agent(Agent(id="a2", name="edge-2", status="revoked"))
        assert not await storage.set_agent_offline("a2", last_seen=30.0)
        revoked = await storage.get_agent("a2")
        assert revoked is not None
        assert revoked.status == "revoked"
        assert not await storage.set_agent_offline("ghost", last_seen=1.0)

    async def test_revocation_is_final_and_atomic(
        self, storage: StorageBackend, fail_between_statements: FaultInjector
    ) -> None:
        """Revoking marks the agent revoked and deletes its keys together (an injected
        failure in between leaves both); a later upsert built on an earlier read of the
        agent (``online``) does not undo it."""
        stale = Agent(id="a1", name="edge-1", status="online", last_seen=1.0)
        await storage.upsert_agent(stale)
        await storage.add_agent_key(_key())
        with fail_between_statements(storage), pytest.raises(InjectedFault):
            await storage.revoke_agent("a1")
        assert (await storage.get_agent("a1")) == stale
        assert len(await storage.list_agent_keys("a1")) == 1
        assert await storage.revoke_agent("a1") is True
        assert await storage.list_agent_keys("a1") == []
        await storage.upsert_agent(attrs.evolve(stale, labels={"env": "prod"}, last_seen=2.0))
        agent = await storage.get_agent("a1")
        assert agent is not None
        assert (agent.status, dict(agent.labels)) == ("revoked", {"env": "prod"})
        assert await storage.revoke_agent("ghost") is False

    async def test_deleting_an_agent_removes_its_keys_and_statuses(
        self, storage: StorageBackend
    ) -> None:
        """Deleting an agent also forgets its session keys and rollout statuses."""
        await storage.add_version(make_version(1))
        await storage.upsert_agent(Agent(id="a1", name="edge-1"))
        await storage.add_agent_key(_key())
        await storage.set_agent_status(
            AgentStatus(agent_id="a1", version=1, digest="d1", phase="applied")
        )
        assert await storage.delete_agent("a1") is True
        assert await storage.get_agent("a1") is None
        assert await storage.delete_agent("a1") is False
        await storage.upsert_agent(Agent(id="a1", name="edge-1"))
        assert await storage.list_agent_keys("a1") == []
        assert await storage.list_agent_statuses("default") == []

    async def test_data_survives_reopen(self, storage_factory: StorageFactory) -> None:
        """What one backend instance stored, a new instance on the same URL reads."""
        first = storage_factory()
        await first.open()
        await first.add_version(make_version(1))
        await first.aclose()
        second = storage_factory()
        await second.open()
        try:
            stored = await second.get_version("default", 1)
        finally:
            await second.aclose()
        assert stored is not None
        assert stored.number == 1

    # -- bootstrap tokens ----------------------------------------------------------------

    async def test_token_is_consumed_once(self, storage: StorageBackend) -> None:
        """The right secret hash consumes a token once; the returned record is marked used."""
        token = BootstrapToken(id="t1", secret_hash="h1", labels={"env": "prod"})
        await storage.add_token(token)
        assert await storage.list_tokens() == [token]
        used = await storage.consume_token("t1", secret_hash="h1", now=token.created_at + 5)
        assert used is not None
        assert used.used_at == token.created_at + 5
        assert used.labels == {"env": "prod"}
        assert await storage.consume_token("t1", secret_hash="h1") is None
        assert [t.used_at for t in await storage.list_tokens()] == [token.created_at + 5]

    async def test_wrong_secret_does_not_use_up_the_token(self, storage: StorageBackend) -> None:
        """A wrong secret hash gets None and leaves the token usable."""
        await storage.add_token(BootstrapToken(id="t1", secret_hash="right"))
        assert await storage.consume_token("t1", secret_hash="wrong") is None
        assert await storage.consume_token("nope", secret_hash="right") is None
        assert await storage.consume_token("t1", secret_hash="right") is not None

    async def test_expired_and_revoked_tokens_cannot_be_consumed(
        self, storage: StorageBackend
    ) -> None:
        """A token past its expiry or revoked gives None."""
        now = time.time()
        await storage.add_token(BootstrapToken(id="old", secret_hash="h", expires_at=now - 1))
        await storage.add_token(BootstrapToken(id="rev", secret_hash="h", expires_at=now + 60))
        assert await storage.revoke_token("rev") is True
        assert await storage.revoke_token("missing") is False
        assert await storage.consume_token("old", secret_hash="h") is None
        assert await storage.consume_token("rev", secret_hash="h") is None
        assert [t.revoked for t in await storage.list_tokens()] == [False, True]

    async def test_a_token_is_found_by_id(self, storage: StorageBackend) -> None:
        """`get_token` returns one token as stored, used or revoked; None when unknown."""
        token = BootstrapToken(id="t1", secret_hash="h1", labels={"env": "prod"})
        await storage.add_token(token)
        await storage.add_token(BootstrapToken(id="t2", secret_hash="h2"))
        assert await storage.get_token("t1") == token
        assert await storage.get_token("nope") is None
        await storage.revoke_token("t1")
        revoked = await storage.get_token("t1")
        assert revoked is not None
        assert revoked.revoked

    async def test_token_ids_are_unique(self, storage: StorageBackend) -> None:
        """Adding a token with an existing id raises ConflictError."""
        await storage.add_token(BootstrapToken(id="t1", secret_hash="a"))
        with pytest.raises(ConflictError):
            await storage.add_token(BootstrapToken(id="t1", secret_hash="b"))

    async def test_tokens_are_listed_per_workspace(self, storage: StorageBackend) -> None:
        """Listing with a workspace returns only that workspace's tokens."""
        await storage.add_token(BootstrapToken(id="t1", secret_hash="a", workspace="shop"))
        await storage.add_token(BootstrapToken(id="t2", secret_hash="b"))
        assert [t.id for t in await storage.list_tokens("shop")] == ["t1"]

    async def test_token_is_single_use_under_concurrency(
        self, storage_factory: StorageFactory
    ) -> None:
        """Ten concurrent consumers on two instances: exactly one gets the token."""
        instances = [storage_factory(), storage_factory()]
        for instance in instances:
            await instance.open()
        results: list[BootstrapToken | None] = []

        async def consume(backend: StorageBackend) -> None:
            results.append(await backend.consume_token("t1", secret_hash="h"))

        try:
            await instances[0].add_token(BootstrapToken(id="t1", secret_hash="h"))
            async with anyio.create_task_group() as tg:
                for i in range(10):
                    tg.start_soon(consume, instances[i % 2])
        finally:
            for instance in instances:
                await instance.aclose()
        assert len(results) == 10
        assert len([r for r in results if r is not None]) == 1

    # -- agent keys ----------------------------------------------------------------------

    async def test_agent_keys_round_trip_and_rotate(self, storage: StorageBackend) -> None:
        """Keys read back with their secret; a new primary demotes the previous one."""
        await storage.upsert_agent(Agent(id="a1", name="edge-1"))
        old = _key(key_id="k1", created_at=100.0)
        new = _key(key_id="k2", created_at=200.0)
        await storage.add_agent_key(old)
        await storage.add_agent_key(new)
        keys = await storage.list_agent_keys("a1")
        assert [(k.key_id, k.primary) for k in keys] == [("k2", True), ("k1", False)]
        assert keys[1].secret == old.secret
        assert await storage.get_agent_key("a1", "k2") == new
        assert await storage.get_agent_key("a1", "k9") is None

    async def test_agent_keys_are_revoked_together(self, storage: StorageBackend) -> None:
        """Revoking an agent's keys deletes all of them and reports how many."""
        await storage.upsert_agent(Agent(id="a1", name="edge-1"))
        await storage.upsert_agent(Agent(id="a2", name="edge-2"))
        await storage.add_agent_key(_key(key_id="k1"))
        await storage.add_agent_key(_key(key_id="k2", primary=False))
        await storage.add_agent_key(_key(agent_id="a2"))
        assert await storage.revoke_agent_keys("a1") == 2
        assert await storage.list_agent_keys("a1") == []
        assert len(await storage.list_agent_keys("a2")) == 1

    async def test_agent_key_needs_a_known_agent_and_a_new_id(
        self, storage: StorageBackend
    ) -> None:
        """A key for an unknown agent is NotFoundError, a reused key id ConflictError."""
        with pytest.raises(NotFoundError):
            await storage.add_agent_key(_key(agent_id="ghost"))
        await storage.upsert_agent(Agent(id="a1", name="edge-1"))
        await storage.add_agent_key(_key())
        with pytest.raises(ConflictError):
            await storage.add_agent_key(_key())

    # -- assignments ---------------------------------------------------------------------

    async def test_assignments_are_set_replaced_and_deleted(self, storage: StorageBackend) -> None:
        """Setting an assignment twice replaces it; it is listed per workspace and deleted."""
        for n in (1, 2):
            await storage.add_version(make_version(n))
        await storage.add_version(make_version(1, workspace="other"))
        prod = LabelSelector(match_labels={"env": "prod"})
        await storage.set_assignment(
            Assignment(workspace="default", name="prod", selector=prod, version=1)
        )
        await storage.set_assignment(Assignment(workspace="other", name="prod", version=1))
        latest = Assignment(workspace="default", name="prod", selector=prod, version=2)
        await storage.set_assignment(latest)
        assert await storage.list_assignments("default") == [latest]
        assert await storage.delete_assignment("default", "prod") is True
        assert await storage.delete_assignment("default", "prod") is False
        assert await storage.list_assignments("default") == []
        assert len(await storage.list_assignments("other")) == 1

    async def test_assignment_needs_an_existing_version(self, storage: StorageBackend) -> None:
        """Assigning a version the workspace does not have raises NotFoundError."""
        await storage.add_version(make_version(1, workspace="other"))
        with pytest.raises(NotFoundError):
            await storage.set_assignment(Assignment(workspace="default", name="all", version=1))
        assert await storage.list_assignments("default") == []

    # -- certificates --------------------------------------------------------------------

    async def test_certificates_round_trip(self, storage: StorageBackend) -> None:
        """A certificate reads back equal (key included), is replaced, listed and deleted."""
        www, api = _certificate("www"), _certificate("api", source="acme")
        await storage.put_certificate(www)
        await storage.put_certificate(api)
        await storage.put_certificate(_certificate("www", workspace="other"))
        assert await storage.get_certificate("default", "www") == www
        renewed = _certificate("www", chain_pem="CHAIN")
        await storage.put_certificate(renewed)
        assert await storage.list_certificates("default") == [api, renewed]
        assert await storage.delete_certificate("default", "www") is True
        assert await storage.get_certificate("default", "www") is None
        assert await storage.delete_certificate("default", "www") is False

    # -- audit log -----------------------------------------------------------------------

    async def test_audit_log_is_listed_newest_first(self, storage: StorageBackend) -> None:
        """Entries come back newest first, limited, filtered by since, details intact."""
        entries = [
            AuditEntry(
                ts=100.0 + i,
                actor="alice",
                action="version.create",
                resource=f"default/{i}",
                remote_addr="192.0.2.1",
                details={"number": i, "sites": ["a", "b"], "nested": {"ok": True}},
            )
            for i in range(5)
        ]
        for entry in entries:
            await storage.append_audit(entry)
        assert await storage.list_audit() == entries[::-1]
        assert [e.ts for e in await storage.list_audit(limit=2)] == [104.0, 103.0]
        assert [e.ts for e in await storage.list_audit(since=102.0)] == [104.0, 103.0, 102.0]
        with pytest.raises(ConflictError):
            await storage.append_audit(entries[0])

    async def test_audit_log_pages_by_entry(self, storage: StorageBackend) -> None:
        """`before` continues after an entry, in append order even when clocks went
        backwards; with `since` too; an unknown entry id gives no entries."""
        clock = [5.0, 3.0, 4.0, 1.0, 2.0]  # another master's clock was behind
        entries = [AuditEntry(ts=ts, actor="a", action="x") for ts in clock]
        for entry in entries:
            await storage.append_audit(entry)
        pages, before = [], None
        while page := await storage.list_audit(limit=2, before=before):
            pages.append(page)
            before = page[-1].id
        assert [len(p) for p in pages] == [2, 2, 1]
        assert [e for p in pages for e in p] == entries[::-1]
        after_second = await storage.list_audit(before=entries[3].id, since=3.5)
        assert after_second == [entries[2], entries[0]]
        assert await storage.list_audit(before="no-such-entry") == []

    # -- users ---------------------------------------------------------------------------

    async def test_users_are_put_listed_and_deleted(self, storage: StorageBackend) -> None:
        """Putting a user twice updates it; users are listed by name and deleted."""
        await storage.put_user(User(username="bob", password_hash="h1", roles=("viewer",)))
        alice = User(username="alice", password_hash="h2", roles=("admin", "operator"))
        await storage.put_user(alice)
        disabled = User(username="bob", password_hash="h3", roles=(), disabled=True)
        await storage.put_user(disabled)
        assert await storage.get_user("bob") == disabled
        assert await storage.list_users() == [alice, disabled]
        assert await storage.delete_user("bob") is True
        assert await storage.delete_user("bob") is False
        assert await storage.get_user("bob") is None

    # -- rollout status ------------------------------------------------------------------

    async def test_agent_statuses_per_workspace_and_version(self, storage: StorageBackend) -> None:
        """Statuses are replaced per (agent, version) and listed by workspace and version."""
        await storage.upsert_agent(Agent(id="a1", name="edge-1"))
        await storage.upsert_agent(Agent(id="a2", name="edge-2"))
        await storage.upsert_agent(Agent(id="b1", name="shop-1", workspace="shop"))
        await storage.set_agent_status(
            AgentStatus(agent_id="a1", version=1, digest="d1", phase="sent")
        )
        applied = AgentStatus(agent_id="a1", version=1, digest="d1", phase="applied", ts=5.0)
        failed = AgentStatus(
            agent_id="a2", version=2, digest="d2", phase="failed", message="nginx -t: bad", ts=6.0
        )
        other = AgentStatus(agent_id="b1", version=1, digest="x", phase="applied", ts=7.0)
        for status in (applied, failed, other):
            await storage.set_agent_status(status)
        assert await storage.list_agent_statuses("default") == [applied, failed]
        assert await storage.list_agent_statuses("default", version=2) == [failed]
        assert await storage.list_agent_statuses("shop") == [other]
        with pytest.raises(NotFoundError):
            await storage.set_agent_status(
                AgentStatus(agent_id="ghost", version=1, digest="d", phase="sent")
            )

    # -- retention -----------------------------------------------------------------------

    async def test_prune_without_limits_deletes_nothing(self, storage: StorageBackend) -> None:
        """A policy with no limit visits nothing and deletes nothing."""
        await storage.append_audit(AuditEntry(ts=1.0, actor="a", action="x"))
        await storage.add_token(BootstrapToken(id="t1", secret_hash="h", created_at=1.0))
        assert dict(await storage.prune(RetentionPolicy())) == {}
        assert len(await storage.list_audit()) == 1
        assert len(await storage.list_tokens()) == 1

    async def test_prune_deletes_audit_entries_older_than_the_cutoff(
        self, storage: StorageBackend
    ) -> None:
        """Entries before ``audit_before`` go, in batches; later ones (and ones a clock
        put later) stay; a second pass finds nothing more to delete."""
        now = time.time()
        old = [AuditEntry(ts=now - 400 * 86400 + i, actor="a", action="x") for i in range(7)]
        recent = [
            AuditEntry(ts=now - 86400, actor="b", action="y"),
            AuditEntry(ts=now, actor="c", action="z"),
        ]
        for entry in [old[0], recent[0], *old[1:], recent[1]]:
            await storage.append_audit(entry)
        policy = RetentionPolicy(audit_before=now - 365 * 86400, batch_size=3)
        assert dict(await storage.prune(policy)) == {"audit_log": 7}
        assert await storage.list_audit() == recent[::-1]
        assert dict(await storage.prune(policy)) == {"audit_log": 0}

    async def test_prune_deletes_spent_and_expired_bootstrap_tokens_only(
        self, storage: StorageBackend
    ) -> None:
        """Tokens used or expired before ``tokens_before`` go (revoked ones once they have
        expired); live tokens, recently used or expired ones and revoked ones still
        within their lifetime stay."""
        now = time.time()
        long_ago, cutoff = now - 30 * 86400, now - 7 * 86400
        recently, later = now - 3600, now + 3600

        def token(token_id: str, **fields: object) -> BootstrapToken:
            values: dict[str, object] = {"created_at": long_ago, "expires_at": later}
            values.update(fields)
            return BootstrapToken(id=token_id, secret_hash="h", **values)  # type: ignore[arg-type]

        gone = [
            token("used-long-ago", used_at=long_ago + 60),
            token("expired-long-ago", expires_at=long_ago + 3600),
            token("revoked-and-expired", revoked=True, expires_at=long_ago + 3600),
        ]
        kept = [
            token("live", created_at=recently),
            token("used-recently", used_at=recently),
            token("expired-recently", expires_at=recently),
            token("revoked-not-expired", revoked=True),
        ]
        for t in [*gone, *kept]:
            await storage.add_token(t)
        policy = RetentionPolicy(tokens_before=cutoff, batch_size=2)
        assert dict(await storage.prune(policy)) == {"bootstrap_tokens": 3}
        assert {t.id for t in await storage.list_tokens()} == {t.id for t in kept}
        assert await storage.consume_token("live", secret_hash="h") is not None

    async def test_prune_keeps_the_statuses_of_current_rollouts(
        self, storage: StorageBackend
    ) -> None:
        """Statuses beyond each workspace's latest N versions go, except each agent's
        latest status, the status of the version it runs and those of versions an
        assignment pins; a workspace without versions keeps everything."""
        for n in range(1, 7):
            await storage.add_version(make_version(n))
        for n in range(1, 4):
            await storage.add_version(make_version(n, workspace="edge"))
        await storage.set_assignment(
            Assignment(
                workspace="default",
                name="pinned",
                selector=LabelSelector(match_labels={"pin": "yes"}),
                version=4,
            )
        )
        agents = {
            "a1": ("default", 3),  # runs version 3
            "a2": ("default", None),
            "a3": ("default", None),
            "b1": ("shop", None),  # a workspace without versions
            "c1": ("edge", None),
        }
        for agent_id, (workspace, running) in agents.items():
            await storage.upsert_agent(
                Agent(id=agent_id, name=agent_id, workspace=workspace, running_version=running)
            )
        history = {
            "a1": [1, 2, 3, 6],
            "a2": [1, 2],
            "a3": [1, 4, 5],
            "b1": [1, 2],
            "c1": [1, 3],
        }
        for agent_id, versions in history.items():
            for number in versions:
                await storage.set_agent_status(
                    AgentStatus(agent_id=agent_id, version=number, digest="d", phase="applied")
                )
        policy = RetentionPolicy(status_versions=2, batch_size=2)
        assert dict(await storage.prune(policy)) == {"agent_status": 5}

        async def kept(workspace: str) -> dict[str, list[int]]:
            found: dict[str, list[int]] = {}
            for status in await storage.list_agent_statuses(workspace):
                found.setdefault(status.agent_id, []).append(status.version)
            return found

        assert await kept("default") == {
            "a1": [3, 6],  # 3: the version it runs; 6: within the latest two
            "a2": [2],  # its latest status, though far behind
            "a3": [4, 5],  # 4: pinned by an assignment
        }
        assert await kept("shop") == {"b1": [1, 2]}
        assert await kept("edge") == {"c1": [3]}
        assert dict(await storage.prune(policy)) == {"agent_status": 0}
        assert dict(await storage.prune(RetentionPolicy(status_versions=0))) == {}

    async def test_concurrent_prunes_delete_each_row_once(
        self, storage_factory: StorageFactory
    ) -> None:
        """Two backend instances (two masters) pruning the same rows at once: every row
        is deleted once and the counts add up to the rows there were."""
        instances = [storage_factory(), storage_factory()]
        for instance in instances:
            await instance.open()
        counts: list[int] = []
        policy = RetentionPolicy(audit_before=1000.0, batch_size=4)

        async def prune(backend: StorageBackend) -> None:
            counts.append((await backend.prune(policy))["audit_log"])

        try:
            for i in range(30):
                await instances[0].append_audit(AuditEntry(ts=float(i), actor="a", action="x"))
            await instances[0].append_audit(AuditEntry(ts=2000.0, actor="a", action="kept"))
            async with anyio.create_task_group() as tg:
                for instance in instances:
                    tg.start_soon(prune, instance)
            remaining = await instances[1].list_audit()
        finally:
            for instance in instances:
                await instance.aclose()
        assert sum(counts) == 30
        assert [e.action for e in remaining] == ["kept"]

    async def test_prune_forgets_stale_login_failures(self, storage: StorageBackend) -> None:
        """Failed-login counters (optional storage methods) idle before
        ``login_failures_before`` go; a fresh one stays and keeps counting."""
        count = getattr(storage, "count_login_failure", None)
        if count is None:
            pytest.skip("the backend keeps no failed-login counters (optional methods)")
        policy = {"threshold": 5, "base_delay": 1.0, "max_delay": 900.0, "forget_after": 1800.0}
        await count("alice", "192.0.2.1", now=1000.0, **policy)
        await count("bob", "192.0.2.2", now=5000.0, **policy)
        pruned = await storage.prune(RetentionPolicy(login_failures_before=4000.0))
        assert dict(pruned) == {"auth_login_failures": 1}
        assert (await count("bob", "192.0.2.2", now=5001.0, **policy))[1] == 2
        assert (await count("alice", "192.0.2.1", now=5001.0, **policy))[1] == 1

    # -- secrets at rest -----------------------------------------------------------------

    async def test_secrets_are_not_stored_in_plaintext(
        self, storage: StorageBackend, dump_raw: DumpRaw
    ) -> None:
        """Session keys and private keys are absent from what is stored, in any encoding."""
        await storage.upsert_agent(Agent(id="a1", name="edge-1"))
        key = _key()
        cert = _certificate()
        await storage.add_agent_key(key)
        await storage.put_certificate(cert)
        raw = await dump_raw(storage)
        key_body = cert.key_pem.splitlines()[1]
        assert b"edge-1" in raw
        assert cert.cert_pem.splitlines()[1].encode() in raw  # the dump shows stored data
        for secret in (key.secret, key.secret.hex().encode(), base64.b64encode(key.secret)):
            assert secret not in raw
        assert key_body.encode() not in raw
        assert b"PRIVATE KEY" not in raw

    async def test_wrong_master_key_is_a_clear_error(
        self, storage_factory: StorageFactory, master_keyring: MasterKeyring
    ) -> None:
        """Secrets stored under one master key cannot be read with another: SecretError
        names the key they need; everything else stays readable."""
        first = storage_factory()
        await first.open()
        try:
            await first.upsert_agent(Agent(id="a1", name="edge-1"))
            await first.add_agent_key(_key())
            await first.put_certificate(_certificate())
        finally:
            await first.aclose()
        other = storage_factory(keyring=MasterKeyring(generate_key()))
        await other.open()
        try:
            with pytest.raises(SecretError, match=master_keyring.key_id):
                await other.list_agent_keys("a1")
            with pytest.raises(SecretError, match=master_keyring.key_id):
                await other.get_certificate("default", "www")
            assert await other.get_agent("a1") is not None
        finally:
            await other.aclose()

    async def test_secrets_are_refused_without_a_keyring(
        self, storage_factory: StorageFactory
    ) -> None:
        """Without a keyring, storing a secret raises SecretError and stores nothing."""
        bare = storage_factory(keyring=None)
        await bare.open()
        try:
            await bare.upsert_agent(Agent(id="a1", name="edge-1"))
            with pytest.raises(SecretError):
                await bare.add_agent_key(_key())
            with pytest.raises(SecretError):
                await bare.put_certificate(_certificate())
        finally:
            await bare.aclose()
        keyed = storage_factory()
        await keyed.open()
        try:
            assert await keyed.list_agent_keys("a1") == []
            assert await keyed.list_certificates("default") == []
        finally:
            await keyed.aclose()

    async def test_master_key_rotation_rewraps_secrets(
        self, storage_factory: StorageFactory, master_key: bytes
    ) -> None:
        """After rotating the master key, rewrapping moves every secret to the new key,
        and the old key is no longer needed."""
        key, cert = _key(), _certificate()
        first = storage_factory()
        await first.open()
        try:
            await first.upsert_agent(Agent(id="a1", name="edge-1"))
            await first.add_agent_key(key)
            await first.put_certificate(cert)
        finally:
            await first.aclose()
        new_key = generate_key()
        rotating = storage_factory(keyring=MasterKeyring(new_key, previous=(master_key,)))
        await rotating.open()
        try:
            assert await rotating.rewrap_secrets() == 2
            assert await rotating.rewrap_secrets() == 0
        finally:
            await rotating.aclose()
        rotated = storage_factory(keyring=MasterKeyring(new_key))
        await rotated.open()
        try:
            assert await rotated.get_agent_key("a1", "k1") == key
            assert await rotated.get_certificate("default", "www") == cert
        finally:
            await rotated.aclose()


async def _no_dump() -> bytes:
    raise NotImplementedError("the backend has no dump_raw(); override killed_writer_argv")
