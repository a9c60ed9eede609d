"""The agent's master link: the MasterLink seam, backoff, credentials, endpoint fallback."""

from __future__ import annotations

import json
import os
import random
import stat
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from nxmesh.agent.link import AgentSession, MasterLink
from nxmesh.agent_link import (
    AgentCredentials,
    AgentLink,
    Backoff,
    Endpoint,
    FileCredentialStore,
    MemoryCredentialStore,
    NoEndpointError,
    SessionEnded,
)
from nxmesh.core.envelope import BadSignatureError, EncodedBody, MessageType, unseal
from nxmesh.core.events import Event
from nxmesh.core.model import Agent, ApplyReport, LabelSelector, PendingApply
from nxmesh.core.protocol import (
    ConfigStatus,
    ConfigUpdate,
    LogBatch,
    Register,
    RegisterResponse,
    RejectedError,
    decode_body,
    encode_body,
    enrollment_keypair,
    enrollment_secret,
    open_key,
)
from nxmesh.crypto.errors import SecretError
from nxmesh.crypto.secrets import MasterKeyring, generate_key
from nxmesh.enrollment import Enrollment
from nxmesh.plugins.storage_sqlite import SqliteStorage
from nxmesh.session_hub import MasterSessionHub, _PushedVersion
from nxmesh.testing.contracts.transport import signed_version
from nxmesh.testing.memory_transport import MemoryTransport

pytestmark = pytest.mark.anyio


@pytest.fixture
async def storage() -> AsyncIterator[SqliteStorage]:
    store = SqliteStorage("sqlite://", keyring=MasterKeyring(generate_key()))
    await store.open()
    try:
        yield store
    finally:
        await store.aclose()


async def provision(storage: SqliteStorage, enrollment: Enrollment) -> AgentCredentials:
    agent = Agent(id="agent-1", name="a")
    await storage.upsert_agent(agent)
    key = await enrollment.new_key(agent.id)
    return AgentCredentials(agent_id=agent.id, key_id=key.key_id, key=key.secret)


class TestMasterLinkSeam:
    async def test_is_a_master_link(self) -> None:
        """AgentLink satisfies the agent app's MasterLink protocol."""
        link = AgentLink([Endpoint(MemoryTransport(), "memory://")], MemoryCredentialStore())
        assert isinstance(link, MasterLink)

    async def test_run_registers_delivers_and_reports(self, storage: SqliteStorage) -> None:
        """run() registers with the session's identity, submits updates and reports back."""
        enrollment = Enrollment(storage)
        received: list[tuple[str, object]] = []

        async def record(agent_id: str, message: object) -> None:
            received.append((agent_id, message))

        hub = MasterSessionHub(enrollment, on_message=record)
        creds = await provision(storage, enrollment)
        transport = MemoryTransport()
        submitted: list[PendingApply] = []
        old = signed_version(1)
        session = AgentSession(
            agent_id="web-1",
            labels={"env": "prod"},
            deployment_mode="standalone",
            submit=submitted.append,
            running=lambda: (1, old.digest),
        )
        link = AgentLink([Endpoint(transport, "memory://")], MemoryCredentialStore(creds))
        async with anyio.create_task_group() as tg:
            await tg.start(transport.serve, hub)
            await tg.start(link.run, session)
            info = hub.session("agent-1")
            assert info is not None
            assert (info.running_version, info.running_digest) == (1, old.digest)
            stored = await storage.get_agent("agent-1")
            assert stored is not None
            assert stored.deployment_mode == "standalone"

            version = signed_version(2)
            hub.push(version)
            with anyio.fail_after(5):
                await hub.wait_for_status(2, ["agent-1"])
            assert [(p.version, p.digest) for p in submitted] == [(2, version.digest)]

            await link.report_apply(
                ApplyReport(
                    agent_id="web-1",
                    version=2,
                    digest=version.digest,
                    outcome="failed",
                    message="nginx -t failed",
                    nginx_output="nginx: [emerg] \x1b[31mbad\x1b[0m in \u202etxt.exe",
                )
            )
            await link.report_event(Event(kind="apply.failed", payload={"version": 2}))
            with anyio.fail_after(5):
                final = await hub.wait_for_status(2, ["agent-1"], final=True)
                while not any(isinstance(m, LogBatch) for _, m in received):
                    await anyio.sleep(0.01)
            status = final["agent-1"]
            assert (status.phase, status.error) == ("failed", "nginx -t failed")
            assert status.nginx_output == "nginx: [emerg] [31mbad[0m in txt.exe"
            logs = [m for _, m in received if isinstance(m, LogBatch)]
            assert "apply.failed" in logs[0].entries[0].message
            tg.cancel_scope.cancel()

    async def test_a_version_the_agent_cannot_read_is_reported_failed(
        self, storage: SqliteStorage
    ) -> None:
        """A signed version whose body this agent cannot decode (a newer master's field)
        is answered with a failed status naming the field, not dropped: the rollout
        stops and says why instead of waiting for an answer that never comes."""
        enrollment = Enrollment(storage)
        hub = MasterSessionHub(enrollment)
        creds = await provision(storage, enrollment)
        transport = MemoryTransport()
        submitted: list[PendingApply] = []
        session = AgentSession(
            agent_id="web-1",
            labels={},
            deployment_mode="standalone",
            submit=submitted.append,
            running=lambda: (None, None),
        )
        link = AgentLink(
            [Endpoint(transport, "memory://")],
            MemoryCredentialStore(creds),
            agent_version="0.1.0",
        )
        version = signed_version(2)
        data = json.loads(encode_body(ConfigUpdate.of(version)).data)
        data["state"]["tunnels"] = []  # a field of a newer master
        body = EncodedBody.of(MessageType.CONFIG_UPDATE, json.dumps(data).encode())
        async with anyio.create_task_group() as tg:
            await tg.start(transport.serve, hub)
            await tg.start(link.run, session)
            hub._sessions["agent-1"].offer_update(_PushedVersion(version, body, LabelSelector()))
            with anyio.fail_after(5):
                final = await hub.wait_for_status(2, ["agent-1"], final=True)
            tg.cancel_scope.cancel()
        status = final["agent-1"]
        assert (status.phase, status.digest) == ("failed", version.digest)
        assert "state.tunnels: unknown field 'tunnels'" in status.error
        assert "this agent (0.1.0) is older than the master, upgrade it" in status.error
        assert submitted == []

    async def test_unreachable_master_raises_oserror_before_started(self) -> None:
        """With no endpoint reachable, run() raises an OSError naming each endpoint."""
        link = AgentLink(
            [Endpoint(MemoryTransport(), "memory://a"), Endpoint(MemoryTransport(), "memory://b")],
            MemoryCredentialStore(),
        )
        with pytest.raises(NoEndpointError, match=r"memory://a.*memory://b") as info:
            await link.run()
        assert isinstance(info.value, OSError)

    async def test_a_broken_session_ends_run_with_an_oserror(self, storage: SqliteStorage) -> None:
        """After started, losing the master raises an OSError so the app goes island."""
        enrollment = Enrollment(storage)
        hub = MasterSessionHub(enrollment)
        transport = MemoryTransport()
        link = AgentLink(
            [Endpoint(transport, "memory://")],
            MemoryCredentialStore(await provision(storage, enrollment)),
        )
        async with anyio.create_task_group() as tg:
            await tg.start(transport.serve, hub)

            async def run() -> None:
                with pytest.raises(SessionEnded):
                    await link.run()

            tg.start_soon(run)
            await link.wait_registered()
            hub.disconnect("agent-1")
            with anyio.fail_after(5):
                while link.connected:
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
        assert isinstance(link.last_error, OSError)

    async def test_statuses_wait_for_the_connection(self, storage: SqliteStorage) -> None:
        """A status queued while offline is delivered once the link connects."""
        enrollment = Enrollment(storage)
        hub = MasterSessionHub(enrollment)
        transport = MemoryTransport()
        link = AgentLink(
            [Endpoint(transport, "memory://")],
            MemoryCredentialStore(await provision(storage, enrollment)),
        )
        link.send_status(ConfigStatus(version=7, digest="d7", phase="applied"))
        async with anyio.create_task_group() as tg:
            await tg.start(transport.serve, hub)
            tg.start_soon(link.run_forever)
            with anyio.fail_after(5):
                result = await hub.wait_for_status(7, ["agent-1"], final=True)
            assert result["agent-1"].digest == "d7"
            tg.cancel_scope.cancel()

    async def test_each_registration_reports_the_nginx_version_read_then(
        self, storage: SqliteStorage
    ) -> None:
        """nginx upgraded under a running agent: the master learns the new version at the
        agent's next registration, not only the one read when the agent started."""
        enrollment = Enrollment(storage)
        hub = MasterSessionHub(enrollment)
        transport = MemoryTransport()
        installed = ["1.22.1"]
        link = AgentLink(
            [Endpoint(transport, "memory://")],
            MemoryCredentialStore(await provision(storage, enrollment)),
            nginx_version=lambda: installed[0],
            backoff=_FAST,
        )
        async with anyio.create_task_group() as tg:
            await tg.start(transport.serve, hub)
            tg.start_soon(link.run_forever)
            with anyio.fail_after(5):
                await link.wait_registered()
            stored = await storage.get_agent("agent-1")
            assert stored is not None
            assert stored.nginx_version == "1.22.1"
            installed[0] = "1.26.2"
            hub.disconnect("agent-1")
            with anyio.fail_after(5):
                while (stored := await storage.get_agent("agent-1")) is None or (
                    stored.nginx_version != "1.26.2"
                ):
                    await anyio.sleep(0.01)
            assert link.nginx_version == "1.26.2"
            tg.cancel_scope.cancel()


class _TappedTransport(MemoryTransport):
    """A memory transport whose client side records every frame both ways: what an
    eavesdropper on a connection without TLS sees."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bytes] = []

    @asynccontextmanager
    async def connect(self, url: str) -> AsyncIterator[Any]:
        async with super().connect(url) as channel:
            seen = self.seen

            class Tap:
                async def send(self, frame: bytes) -> None:
                    seen.append(frame)
                    await channel.send(frame)

                async def receive(self) -> bytes:
                    frame = await channel.receive()
                    seen.append(frame)
                    return frame

                async def aclose(self) -> None:
                    await channel.aclose()

            yield Tap()


class TestEnrollmentOnTheWire:
    async def test_the_token_seen_in_transit_does_not_open_the_session_key(
        self, storage: SqliteStorage
    ) -> None:
        """Enrollment works, and everything that crossed the wire plus the bootstrap token
        (which `Register` carries) does not open the session key the master sealed."""
        enrollment = Enrollment(storage)
        hub = MasterSessionHub(enrollment)
        issued = await enrollment.create_token()
        transport = _TappedTransport()
        store = MemoryCredentialStore()
        await _serve_until_registered(transport, hub, store, issued.token)
        creds = await store.load()
        assert creds is not None
        register, response = (decode_body(unseal(f)) for f in transport.seen[:2])
        assert isinstance(register, Register)
        assert isinstance(response, RegisterResponse)
        assert register.bootstrap_token == issued.token  # in the clear without TLS
        secret = issued.token.split(".", 1)[1]
        aad = f"{creds.agent_id}|{creds.key_id}".encode()
        eve, _ = enrollment_keypair()
        for guess in (
            secret.encode(),
            enrollment_secret(secret, eve, register.enroll_key),
            enrollment_secret(secret, eve, response.enroll_key),
        ):
            with pytest.raises(BadSignatureError):
                open_key(guess, response.sealed_key, aad=aad)


async def _enroll_and_revoke(
    storage: SqliteStorage, transport: MemoryTransport, store: MemoryCredentialStore
) -> tuple[MasterSessionHub, AgentCredentials, str]:
    """An agent enrolled through `transport` into `store` (with the token returned),
    then revoked on the master."""
    enrollment = Enrollment(storage)
    hub = MasterSessionHub(enrollment)
    token = (await enrollment.create_token()).token
    await _serve_until_registered(transport, hub, store, token)
    creds = await store.load()
    assert creds is not None
    assert await enrollment.revoke_agent(creds.agent_id)
    return hub, creds, token


async def _serve_until_registered(
    transport: MemoryTransport, hub: MasterSessionHub, store: MemoryCredentialStore, token: str
) -> None:
    """Serve `hub` on `transport` until an agent with `token` registered, then stop both."""
    link = AgentLink(
        [Endpoint(transport, "memory://")], store, bootstrap_token=token, backoff=_FAST
    )
    async with anyio.create_task_group() as tg:
        await tg.start(transport.serve, hub)
        tg.start_soon(link.run_forever)
        with anyio.fail_after(5):
            await link.wait_registered()
        tg.cancel_scope.cancel()


_FAST = Backoff(0.01, 0.05)


class TestReenrollment:
    """A revoked agent given a new bootstrap token enrolls again with it, as the master's
    refusal ("enroll it again with a new bootstrap token") says."""

    async def test_a_revoked_agent_enrolls_again_with_a_new_token(
        self, storage: SqliteStorage
    ) -> None:
        store, transport = MemoryCredentialStore(), MemoryTransport()
        hub, old, _ = await _enroll_and_revoke(storage, transport, store)
        second = await hub.enrollment.create_token()
        await _serve_until_registered(transport, hub, store, second.token)
        new = await store.load()
        assert new is not None
        assert new.agent_id != old.agent_id  # a new identity; the revoked one stays revoked
        revoked = await storage.get_agent(old.agent_id)
        assert revoked is not None
        assert revoked.status == "revoked"
        used = await storage.get_token(second.id)
        assert used is not None
        assert used.used_at is not None

    async def test_without_a_fresh_token_the_revocation_stands(
        self, storage: SqliteStorage
    ) -> None:
        """The spent token it enrolled with cannot bring it back: the agent stops, saying
        both why its credentials were refused and why the token was."""
        store, transport = MemoryCredentialStore(), MemoryTransport()
        hub, creds, spent = await _enroll_and_revoke(storage, transport, store)
        again = AgentLink(
            [Endpoint(transport, "memory://")], store, bootstrap_token=spent, backoff=_FAST
        )
        refused: RejectedError | None = None
        async with anyio.create_task_group() as tg:
            await tg.start(transport.serve, hub)
            try:
                with anyio.fail_after(5):
                    await again.run_forever()
            except RejectedError as exc:
                refused = exc
            tg.cancel_scope.cancel()
        assert refused is not None
        assert refused.code == "token_used"
        assert "revoked" in str(refused)
        assert await store.load() == creds  # nothing overwritten


class TestBackoff:
    def test_doubles_from_one_second_to_sixty_with_jitter(self) -> None:
        """Delays grow 1, 2, 4... capped at 60 s, each drawn from [d/2, d]."""
        backoff = Backoff(rng=random.Random(7))
        delays = [backoff.next() for _ in range(12)]
        ceilings = [min(60.0, 2.0**i) for i in range(12)]
        for delay, ceiling in zip(delays, ceilings, strict=True):
            assert ceiling / 2 <= delay <= ceiling
        assert max(delays) <= 60
        assert len({round(d, 6) for d in delays[-4:]}) == 4  # jittered, not constant

    def test_resets_after_success(self) -> None:
        """After a reset the next delay is back to at most one second."""
        backoff = Backoff()
        for _ in range(10):
            backoff.next()
        backoff.reset()
        assert backoff.next() <= 1.0


class TestCredentialFile:
    async def test_round_trip_is_private(self, tmp_path: Path) -> None:
        """Credentials survive a restart in a file only the owner can read."""
        path = tmp_path / "agent.json"
        store = FileCredentialStore(path)
        assert await store.load() is None
        creds = AgentCredentials(
            agent_id="a",
            key_id="k2",
            key=b"\x00" * 32,
            expires_at=time.time(),
            previous=("k1", b"\x01" * 32),
        )
        await store.save(creds)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert await FileCredentialStore(path).load() == creds
        await store.save(AgentCredentials(agent_id="a", key_id="k3", key=b"\x02" * 32))
        loaded = await store.load()
        assert loaded is not None
        assert loaded.key_id == "k3"
        assert loaded.previous is None

    async def test_a_file_others_can_read_is_refused(self, tmp_path: Path) -> None:
        """A session key readable by group or world is not used; the error says the fix."""
        path = tmp_path / "credentials.json"
        store = FileCredentialStore(path)
        await store.save(AgentCredentials(agent_id="a", key_id="k", key=b"K" * 32))
        path.chmod(0o644)
        with pytest.raises(SecretError, match=rf"{path} is accessible by other users") as caught:
            await store.load()
        assert f"chmod 600 {path}" in str(caught.value)

    async def test_the_directory_is_synced_after_the_rename(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The rename into place is made durable: the directory is fsynced after it (a
        power cut must not lose the key once the single-use token is spent)."""
        path = tmp_path / "credentials.json"
        calls: list[str] = []
        real_fsync, real_replace, real_link = os.fsync, os.replace, os.link

        def fsync(fd: int) -> None:
            calls.append(f"fsync {os.readlink(f'/proc/self/fd/{fd}')}")
            real_fsync(fd)

        def replace(src: Any, dst: Any, **kwargs: Any) -> None:
            calls.append(f"rename {dst}")
            real_replace(src, dst, **kwargs)

        def link(src: Any, dst: Any, **kwargs: Any) -> None:
            calls.append(f"rename {dst}")
            real_link(src, dst, **kwargs)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "link", link)
        await FileCredentialStore(path).save(AgentCredentials(agent_id="a", key_id="k", key=b"K"))
        moved = calls.index(f"rename {path}")
        assert f"fsync {tmp_path}" in calls[moved:]
