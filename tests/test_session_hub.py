"""The master's session hub over an in-memory transport: fan-out, refusals, silence, drain."""

from __future__ import annotations

import time
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from anyio.abc import TaskGroup
from structlog.testing import capture_logs

import nxmesh.core.protocol as protocol_module
import nxmesh.session_hub as hub_module
from nxmesh.agent_link import AgentCredentials, AgentLink, Backoff, Endpoint, MemoryCredentialStore
from nxmesh.core.envelope import EncodedBody, MessageType, ProtocolCounters, seal, unseal
from nxmesh.core.model import Agent, HealthReport, LabelSelector
from nxmesh.core.protocol import (
    COMPRESSION_CAPABILITY,
    MAX_REGISTER_BODY,
    Ack,
    ConfigStatus,
    ConfigUpdate,
    Heartbeat,
    Register,
    RegisterResponse,
    RejectedError,
    SessionCrypto,
    body_bytes,
    compress_body,
    decode_body,
    encode_body,
)
from nxmesh.crypto.secrets import MasterKeyring, generate_key
from nxmesh.enrollment import Enrollment
from nxmesh.plugins.storage_sqlite import SqliteStorage
from nxmesh.session_hub import MasterSessionHub
from nxmesh.testing.contracts.transport import signed_version
from nxmesh.testing.memory_transport import MemoryTransport

pytestmark = pytest.mark.anyio


class Master:
    """A hub on in-memory SQLite, served over `MemoryTransport` inside a task group."""

    def __init__(self, tg: TaskGroup, storage: SqliteStorage, **hub_options: Any) -> None:
        self.tg = tg
        self.storage = storage
        self.enrollment = Enrollment(storage)
        self.hub = MasterSessionHub(self.enrollment, **hub_options)
        self.transport = MemoryTransport()

    async def credentials(self, **labels: str) -> AgentCredentials:
        agent = Agent(id=f"agent-{time.perf_counter_ns()}", name="a", labels=labels)
        await self.storage.upsert_agent(agent)
        key = await self.enrollment.new_key(agent.id)
        return AgentCredentials(agent_id=agent.id, key_id=key.key_id, key=key.secret)

    def link(self, creds: AgentCredentials | None = None, **options: Any) -> AgentLink:
        return AgentLink(
            [Endpoint(self.transport, "memory://")],
            MemoryCredentialStore(creds),
            backoff=Backoff(0.01, 0.05),
            **options,
        )

    async def agent(self, **labels: str) -> AgentLink:
        link = self.link(await self.credentials(**labels))
        self.tg.start_soon(link.run_forever)
        with anyio.fail_after(5):
            await link.wait_registered()
        return link


def sealed_by(creds: AgentCredentials, body: EncodedBody) -> bytes:
    """`body` as the first frame of a stream, signed with `creds`."""
    return seal(
        body,
        agent_id=creds.agent_id,
        key_id=creds.key_id,
        key=creds.key,
        seq=1,
        ts_ms=int(time.time() * 1000),
    )


async def register_by_hand(channel: Any, creds: AgentCredentials, register: Register) -> None:
    """Open a session as an agent without `AgentLink`: send `register`, expect acceptance."""
    await channel.send(sealed_by(creds, encode_body(register)))
    assert decode_body(unseal(await channel.receive())).accepted  # type: ignore[union-attr]


async def answer_to_first_frame(
    master: Master, creds: AgentCredentials, body: EncodedBody
) -> RegisterResponse:
    """What the master answers a stream whose first frame carries `body`."""
    async with master.transport.connect("memory://") as channel:
        await channel.send(sealed_by(creds, body))
        answer = decode_body(unseal(await channel.receive()))
    assert isinstance(answer, RegisterResponse)
    return answer


def agent_crypto(creds: AgentCredentials) -> SessionCrypto:
    """The agent's side of a session opened by hand (`register_by_hand`)."""
    return SessionCrypto(
        agent_id=creds.agent_id,
        key_id=creds.key_id,
        keys={creds.key_id: creds.key},
        receives_from_agent=False,
        counters=ProtocolCounters(),
    )


@asynccontextmanager
async def rotated_session(
    master: Master, creds: AgentCredentials
) -> AsyncIterator[tuple[Any, Any, SessionCrypto]]:
    """A session opened by hand with `creds` and rotated once: its channel, the hub's
    session, and the agent's side (still signing with the first key)."""
    async with master.transport.connect("memory://") as channel:
        await register_by_hand(channel, creds, Register(agent_id=creds.agent_id))
        session = master.hub._sessions[creds.agent_id]
        await master.hub._rotate(session)
        yield channel, session, agent_crypto(creds)


async def accepted_heartbeat(master: Master, channel: Any, crypto: SessionCrypto) -> None:
    """Send a heartbeat and wait until the hub accepted it."""
    accepted = master.hub.counters.accepted
    await channel.send(crypto.seal(Heartbeat()))
    with anyio.fail_after(5):
        while master.hub.counters.accepted == accepted:
            await anyio.sleep(0.01)


async def heartbeats_without_reading(
    master: Master, *, limit: int, slow_after: int | None = None
) -> tuple[int, list[dict[str, Any]]]:
    """Register by hand and send heartbeats without reading a frame until the master
    hangs up (or `limit` are sent), from `slow_after` on one every 50 ms. Returns how many
    were sent and the master's "agent not reading its stream" log entries."""
    creds = await master.credentials()
    crypto = agent_crypto(creds)
    sent = 0
    with capture_logs() as logs:
        async with master.transport.connect("memory://") as channel:
            await register_by_hand(channel, creds, Register(agent_id=creds.agent_id))
            with anyio.fail_after(20):
                while sent < limit:
                    try:
                        await channel.send(crypto.seal(Heartbeat()))
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                        break
                    sent += 1
                    if slow_after is not None and sent > slow_after:
                        await anyio.sleep(0.05)
            await wait_disconnected(master)
    closing = [e for e in logs if e["event"] == "agent not reading its stream, closing it"]
    return sent, closing


async def wait_disconnected(master: Master) -> None:
    with anyio.fail_after(10):
        while master.hub.connected:
            await anyio.sleep(0.01)


@pytest.fixture
async def master_factory() -> AsyncIterator[Callable[..., Any]]:
    storage = SqliteStorage("sqlite://", keyring=MasterKeyring(generate_key()))
    await storage.open()
    async with anyio.create_task_group() as tg:

        async def make(**hub_options: Any) -> Master:
            master = Master(tg, storage, **hub_options)
            await tg.start(master.transport.serve, master.hub)
            return master

        yield make
        tg.cancel_scope.cancel()
    await storage.aclose()


class TestFanout:
    async def test_a_version_is_encoded_once_for_all_agents(
        self, master_factory: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Pushing to 20 agents encodes the ConfigUpdate body once; all get identical bytes."""
        master = await master_factory()
        agents = [await master.agent() for _ in range(20)]
        encoded: list[EncodedBody] = []

        def counting(message: Any) -> EncodedBody:
            body = encode_body(message)
            encoded.append(body)
            return body

        monkeypatch.setattr(hub_module, "encode_body", counting)
        version = signed_version(1, sites=20)
        targets = master.hub.push(version)
        with anyio.fail_after(5):
            await master.hub.wait_for_status(1, targets)
        updates = [await a.updates.receive() for a in agents]
        assert len(encoded) == 1
        assert len(targets) == 20
        assert {u.digest for u in updates} == {version.digest}

    @pytest.mark.parametrize(
        "trace", [None, {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}]
    )
    async def test_offers_of_one_rollout_share_one_encoding_and_compression(
        self,
        master_factory: Callable[..., Any],
        monkeypatch: pytest.MonkeyPatch,
        trace: dict[str, str] | None,
    ) -> None:
        """The orchestrator offers a version agent by agent (with its rollout's trace): it
        is encoded and compressed once, and every agent applies the same version."""
        master = await master_factory()
        agents = [await master.agent() for _ in range(10)]
        calls: list[str] = []

        def counting(name: str, real: Callable[[Any], EncodedBody]) -> Callable[[Any], EncodedBody]:
            def wrapped(arg: Any) -> EncodedBody:
                calls.append(name)
                return real(arg)

            return wrapped

        monkeypatch.setattr(hub_module, "encode_body", counting("encode", encode_body))
        monkeypatch.setattr(hub_module, "compress_body", counting("compress", compress_body))
        version = signed_version(1, sites=30)
        for agent in agents:
            assert master.hub.offer(str(agent.agent_id), version, trace=trace)
        updates = [await a.updates.receive() for a in agents]
        assert sorted(calls) == ["compress", "encode"]
        assert {(u.digest, u.trace.get("traceparent")) for u in updates} == {
            (version.digest, (trace or {}).get("traceparent"))
        }

    @pytest.mark.parametrize("capable", [True, False])
    async def test_versions_are_compressed_only_for_agents_that_read_them(
        self, master_factory: Callable[..., Any], capable: bool
    ) -> None:
        """An agent announcing COMPRESSION_CAPABILITY gets the version compressed; one
        without it (an older agent) gets the plain body it always got."""
        master = await master_factory()
        creds = await master.credentials()
        register = Register(
            agent_id=creds.agent_id, capabilities=(COMPRESSION_CAPABILITY,) if capable else ()
        )
        async with master.transport.connect("memory://") as channel:
            await register_by_hand(channel, creds, register)
            version = signed_version(1, sites=30)
            assert master.hub.push(version) == [creds.agent_id]
            with anyio.fail_after(5):
                env = unseal(await channel.receive())
        env.verify(creds.key)
        assert env.compressed is capable
        update = decode_body(env)
        assert isinstance(update, ConfigUpdate)
        assert update.digest == version.digest
        if capable:
            assert len(env.body) * 5 < len(body_bytes(env))

    async def test_agents_announce_that_they_read_compressed_bodies(
        self, master_factory: Callable[..., Any]
    ) -> None:
        """`AgentLink` always announces the capability, besides any it is given."""
        master = await master_factory()
        link = master.link(await master.credentials(), capabilities=("custom",))
        assert link.capabilities == (COMPRESSION_CAPABILITY, "custom")

    async def test_agents_running_the_digest_are_skipped(
        self, master_factory: Callable[..., Any]
    ) -> None:
        """An agent already running the version's digest is not sent it again (unless forced)."""
        master = await master_factory()
        version = signed_version(1)
        current = master.link(await master.credentials())
        current.set_running(1, version.digest)
        master.tg.start_soon(current.run_forever)
        await current.wait_registered()
        other = await master.agent()
        assert master.hub.push(version) == [other.agent_id]
        assert sorted(master.hub.push(version, force=True)) == sorted(
            [str(current.agent_id), str(other.agent_id)]
        )

    async def test_selector_and_workspace_pick_the_agents(
        self, master_factory: Callable[..., Any]
    ) -> None:
        """Only agents of the version's workspace whose labels match are targeted."""
        master = await master_factory()
        prod = await master.agent(env="prod")
        await master.agent(env="dev")
        assert master.hub.push(signed_version(1), LabelSelector({"env": "prod"})) == [prod.agent_id]
        assert master.hub.push(signed_version(2, workspace="other")) == []

    async def test_late_agents_get_the_version_their_labels_match(
        self, master_factory: Callable[..., Any]
    ) -> None:
        """A version pushed before an agent connects is sent when it registers."""
        master = await master_factory()
        master.hub.push(signed_version(1), LabelSelector({"env": "prod"}))
        master.hub.push(signed_version(2), LabelSelector({"env": "dev"}))
        late = await master.agent(env="prod")
        with anyio.fail_after(5):
            assert (await late.updates.receive()).version == 1

    async def test_statuses_that_arrived_first_still_count(
        self, master_factory: Callable[..., Any]
    ) -> None:
        """wait_for_status sees acknowledgements that came before it was called."""
        master = await master_factory()
        agent = await master.agent()
        targets = master.hub.push(signed_version(1))
        await agent.updates.receive()
        with anyio.fail_after(5):
            while master.hub.session(str(agent.agent_id)) is None:
                await anyio.sleep(0.01)
            await master.hub.wait_for_status(1, targets)  # the ack
        with anyio.fail_after(1):
            result = await master.hub.wait_for_status(1, targets)
        assert result[str(agent.agent_id)].phase == "received"


class TestRefusals:
    async def test_clock_skew_is_refused_with_the_offset(
        self, master_factory: Callable[..., Any]
    ) -> None:
        """An agent 400 s behind is told so, counted, and keeps retrying (not final)."""
        master = await master_factory(clock=lambda: time.time() + 400)
        link = master.link(await master.credentials())
        with pytest.raises(ConnectionError, match=r"400 s behind.*NTP"):
            await link.run()
        assert isinstance(link.last_error, RejectedError)
        assert link.last_error.code == "clock_skew"
        assert not link.last_error.final
        assert master.hub.counters.clock_skew == 1

    async def test_incompatible_agent_is_told_which_side_to_upgrade(
        self, master_factory: Callable[..., Any]
    ) -> None:
        """No common protocol version is a final refusal naming the side to upgrade."""
        master = await master_factory()
        link = master.link(await master.credentials(), protocol_range=(2, 3))
        with pytest.raises(RejectedError, match="upgrade the master") as info:
            await link.run()
        assert info.value.code == "protocol_incompatible"
        assert info.value.final
        assert master.hub.counters.incompatible == 1

    async def test_first_frame_must_be_register(self, master_factory: Callable[..., Any]) -> None:
        """A stream that does not start with Register is refused as malformed."""
        master = await master_factory()
        creds = await master.credentials()
        status = encode_body(ConfigStatus(version=1, digest="d", phase="applied"))
        answer = await answer_to_first_frame(master, creds, status)
        assert (answer.accepted, answer.code) == (False, "malformed")
        assert "must be REGISTER" in answer.error
        assert master.hub.counters.malformed == 1

    async def test_a_compressed_register_is_refused_uninflated(
        self, master_factory: Callable[..., Any]
    ) -> None:
        """The Register is read before its signature can be checked: a compressed one
        (here a zlib bomb of 64 MiB) is refused as malformed, never inflated."""
        master = await master_factory()
        creds = await master.credentials()
        bomb = zlib.compress(
            encode_body(Register(agent_id=creds.agent_id)).data + bytes(64 * 1024 * 1024), 9
        )
        body = EncodedBody.of(MessageType.REGISTER, bomb, compressed=True)
        answer = await answer_to_first_frame(master, creds, body)
        assert (answer.accepted, answer.code) == (False, "malformed")
        assert "never sent compressed" in answer.error
        assert master.hub.counters.malformed == 1

    async def test_an_oversized_register_is_refused_unparsed(
        self, master_factory: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The Register is parsed before anything authenticates it: a body over
        MAX_REGISTER_BODY (here 1 MiB of nested lists, cheap to send, costly to parse) is
        refused as malformed, naming the limit, counted, and never parsed."""
        master = await master_factory()
        creds = await master.credentials()
        parsed: list[MessageType] = []
        decode = protocol_module._decode

        def spy(env: Any) -> Any:
            parsed.append(env.type)
            return decode(env)

        monkeypatch.setattr(protocol_module, "_decode", spy)
        body = EncodedBody.of(MessageType.REGISTER, b"[" + b"[]," * 349_525 + b"[]]")
        answer = await answer_to_first_frame(master, creds, body)
        assert (answer.accepted, answer.code) == (False, "malformed")
        assert f"exceeds the {MAX_REGISTER_BODY} byte limit" in answer.error
        assert master.hub.counters.malformed == 1
        assert parsed == [MessageType.REGISTER_RESPONSE]  # the answer, read here

    async def test_unknown_agent_is_refused(self, master_factory: Callable[..., Any]) -> None:
        """Credentials the master never issued are refused and counted."""
        master = await master_factory()
        link = master.link(AgentCredentials(agent_id="ghost", key_id="k1", key=b"k" * 32))
        with pytest.raises(ConnectionError, match="unknown agent"):
            await link.run()
        assert master.hub.counters.unknown_key == 1


class TestLifecycle:
    async def test_a_silent_agent_is_disconnected(self, master_factory: Callable[..., Any]) -> None:
        """No frame for three heartbeat intervals closes the session."""
        master = await master_factory(heartbeat_interval=0.1)
        creds = await master.credentials()
        async with master.transport.connect("memory://") as channel:
            await register_by_hand(channel, creds, Register(agent_id=creds.agent_id))
            assert master.hub.connected == [creds.agent_id]
            with anyio.fail_after(3), pytest.raises(anyio.EndOfStream):
                await channel.receive()
        assert master.hub.connected == []

    async def test_a_key_two_rotations_old_verifies_nothing(
        self, master_factory: Callable[..., Any]
    ) -> None:
        """After a rotation the previous key still verifies (the agent may have sent under
        it before the command arrived); after the next one it does not, and a frame under
        it ends the session as any untrusted frame does. (Every key used to verify for
        the session's life: the filter compared the current key's expiry.)"""
        master = await master_factory()
        creds = await master.credentials()
        async with rotated_session(master, creds) as (channel, session, crypto):
            await accepted_heartbeat(master, channel, crypto)  # the previous key
            assert master.hub.connected == [creds.agent_id]
            await master.hub._rotate(session)
            assert creds.key_id not in session.crypto.keys
            assert len(session.crypto.keys) == 2
            await channel.send(crypto.seal(Heartbeat()))
            await wait_disconnected(master)

    async def test_a_previous_key_verifies_until_it_expires(
        self, master_factory: Callable[..., Any]
    ) -> None:
        """After a rotation the previous key verifies until its expiry, or for a grace
        when it had expired already; then a frame under it ends the session, unary
        reports included. (It used to verify until the next rotation: up to a fifth of
        a key's lifetime past its expiry, 0.6 for an agent that connected late.)"""
        now = [time.time()]
        master = await master_factory(clock=lambda: now[0])
        master.enrollment.key_lifetime = 2.0  # expired before the grace ends
        creds = await master.credentials()
        master.enrollment.key_lifetime = 3600.0  # the next key: no rotation in this test
        async with rotated_session(master, creds) as (channel, _, crypto):
            now[0] += 59  # within the grace: still verifies
            await accepted_heartbeat(master, channel, crypto)
            now[0] += 2  # past it
            report = HealthReport(agent_id=creds.agent_id, ts=now[0], results=())
            unary = await master.hub.handle_unary(crypto.seal(report), "test")
            answer = decode_body(unseal(unary))
            assert isinstance(answer, Ack)
            assert not answer.ok
            assert "unknown, expired or revoked" in answer.error
            await channel.send(crypto.seal(Heartbeat()))
            await wait_disconnected(master)

    async def test_heartbeats_keep_a_session_alive(
        self, master_factory: Callable[..., Any]
    ) -> None:
        """An agent sending heartbeats outlives several idle timeouts."""
        master = await master_factory(heartbeat_interval=0.1)
        agent = await master.agent()
        await anyio.sleep(1.0)
        assert master.hub.connected == [agent.agent_id]
        assert agent.registrations == 1

    async def test_an_agent_that_stops_reading_is_closed_when_its_acks_pile_up(
        self, master_factory: Callable[..., Any]
    ) -> None:
        """An agent that sends but never reads fills its stream (the memory transport
        buffers 64 frames, then the master's send blocks); each of its heartbeats queues
        another ack. At 256 queued the session is closed with a warning, long before the
        idle timeout (its heartbeats would keep it alive anyway)."""
        master = await master_factory()
        sent, closing = await heartbeats_without_reading(master, limit=1000)
        assert sent < 1000  # the master hung up
        assert [e["queued"] for e in closing] == [256]

    async def test_an_agent_that_stops_reading_is_closed_after_the_idle_timeout(
        self, master_factory: Callable[..., Any]
    ) -> None:
        """A send to an agent that does not read gets the idle timeout to complete, even
        while the agent's own heartbeats keep the session from being silent."""
        master = await master_factory(heartbeat_interval=0.1)  # idle timeout 0.3 s
        # acks: 64 in the stream + 136 queued, under the cap; the master's sends block
        # from the 65th ack, so the agent then slows down to let the deadline pass.
        sent, closing = await heartbeats_without_reading(master, limit=200, slow_after=70)
        assert sent < 200
        assert [e.get("idle_timeout") for e in closing] == [pytest.approx(0.3)]

    async def test_drain_makes_agents_reconnect(self, master_factory: Callable[..., Any]) -> None:
        """Draining asks every agent to go; they come back on their own."""
        master = await master_factory()
        agent = await master.agent()
        await master.hub.drain()
        with anyio.fail_after(5):
            await agent.wait_registered(2)

    async def test_a_newer_stream_replaces_the_older(
        self, master_factory: Callable[..., Any]
    ) -> None:
        """When an agent connects twice, the older stream is closed."""
        master = await master_factory()
        creds = await master.credentials()
        first, second = master.link(creds), master.link(creds)
        master.tg.start_soon(first.run_forever)
        await first.wait_registered()
        master.tg.start_soon(second.run_forever)
        await second.wait_registered()
        # Bounded generously: the reconnect waits out a jittered backoff, and busy
        # machines stretch it (this once tripped a 5 s bound under load).
        with anyio.fail_after(15):
            await first.wait_registered(2)  # it was cut off and came back
        assert master.hub.connected == [creds.agent_id]


class TestWake:
    """The sender's wake-up: one semaphore for a session's life instead of an event per
    wake-up."""

    async def test_sets_before_a_wait_make_it_return_once(self) -> None:
        wake = hub_module._Wake()
        wake.set()
        wake.set()  # coalesced: a burst is one wake-up
        with anyio.fail_after(1):
            await wake.wait()
        with anyio.move_on_after(0.05) as idle:
            await wake.wait()
        assert idle.cancelled_caught

    async def test_a_set_wakes_the_waiter_and_a_set_meanwhile_is_kept(self) -> None:
        wake = hub_module._Wake()
        woken: list[int] = []

        async def sender() -> None:
            for i in range(2):
                await wake.wait()
                woken.append(i)

        async with anyio.create_task_group() as tg:
            tg.start_soon(sender)
            await anyio.wait_all_tasks_blocked()
            wake.set()  # wakes the waiter
            wake.set()  # arrives before it runs: its next wait returns at once
            with anyio.fail_after(1):
                while len(woken) < 2:
                    await anyio.sleep(0.01)
        assert woken == [0, 1]
