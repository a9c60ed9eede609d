"""Enrollment on the real SQLite storage: bootstrap tokens, session keys, rotation, revocation."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nxmesh.core.protocol import EnrollmentError, Register, enrollment_keypair
from nxmesh.crypto.secrets import MasterKeyring, generate_key
from nxmesh.enrollment import DEFAULT_TOKEN_TTL, Enrollment, hash_secret, parse_token
from nxmesh.plugins.storage_sqlite import SqliteStorage

pytestmark = pytest.mark.anyio


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[SqliteStorage]:
    store = SqliteStorage(
        f"sqlite:///{tmp_path / 'master.db'}", keyring=MasterKeyring(generate_key())
    )
    await store.open()
    try:
        yield store
    finally:
        await store.aclose()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def enrollment(storage: SqliteStorage, clock: Clock) -> Enrollment:
    return Enrollment(storage, clock=clock, key_lifetime=1000.0)


def register(token: str, **labels: str) -> Register:
    return Register(
        bootstrap_token=token, labels=labels, name="web-1", enroll_key=enrollment_keypair()[1]
    )


class TestBootstrapTokens:
    async def test_token_shape_and_entropy(self, enrollment: Enrollment) -> None:
        """Tokens are id.secret with a 64-bit id and a 160-bit secret, unique every time."""
        issued = {(await enrollment.create_token()).token for _ in range(20)}
        assert len(issued) == 20
        token_id, secret = parse_token(next(iter(issued)))
        assert len(bytes.fromhex(token_id)) == 8
        assert len(bytes.fromhex(secret)) * 8 >= 128

    async def test_only_a_hash_of_the_secret_is_stored(
        self, enrollment: Enrollment, storage: SqliteStorage
    ) -> None:
        """The database holds sha256(secret), never the secret or the token."""
        issued = await enrollment.create_token()
        _, secret = parse_token(issued.token)
        raw = await storage.dump_raw()
        assert secret.encode() not in raw
        assert hashlib.sha256(secret.encode()).hexdigest().encode() in raw
        assert issued.record.secret_hash == hash_secret(secret)
        assert secret not in repr(issued)

    async def test_default_lifetime_is_one_hour(self, enrollment: Enrollment) -> None:
        """A token expires an hour after it was created unless told otherwise."""
        issued = await enrollment.create_token()
        assert issued.record.expires_at - issued.record.created_at == DEFAULT_TOKEN_TTL == 3600

    async def test_single_use(self, enrollment: Enrollment) -> None:
        """The second exchange of a token is refused as used."""
        issued = await enrollment.create_token()
        await enrollment.enroll(issued.token, register(issued.token))
        with pytest.raises(EnrollmentError, match="already used") as info:
            await enrollment.enroll(issued.token, register(issued.token))
        assert info.value.code == "token_used"

    async def test_expired(self, enrollment: Enrollment, clock: Clock) -> None:
        """After its TTL a token is refused as expired, saying how long ago."""
        issued = await enrollment.create_token(ttl=60)
        clock.now += 61
        with pytest.raises(EnrollmentError, match="expired 1 s ago") as info:
            await enrollment.enroll(issued.token, register(issued.token))
        assert info.value.code == "token_expired"

    async def test_revoked(self, enrollment: Enrollment) -> None:
        """A revoked token is refused as revoked."""
        issued = await enrollment.create_token()
        assert await enrollment.revoke_token(issued.id)
        with pytest.raises(EnrollmentError) as info:
            await enrollment.enroll(issued.token, register(issued.token))
        assert info.value.code == "token_revoked"

    async def test_wrong_secret_reveals_nothing_and_spends_nothing(
        self, enrollment: Enrollment
    ) -> None:
        """A wrong secret is 'invalid' (no state leaked) and the token stays usable."""
        issued = await enrollment.create_token()
        await enrollment.revoke_token((await enrollment.create_token()).id)
        wrong = f"{issued.id}.{'0' * 40}"
        with pytest.raises(EnrollmentError) as info:
            await enrollment.enroll(wrong, register(wrong))
        assert info.value.code == "token_invalid"
        enrolled = await enrollment.enroll(issued.token, register(issued.token))
        assert enrolled.agent.name == "web-1"

    async def test_a_failed_enrollment_reads_one_token(
        self, enrollment: Enrollment, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Explaining a refusal looks the token up by id: anyone may send an enrollment
        frame, and it must not cost a scan of every token ever issued."""
        for _ in range(3):
            await enrollment.create_token()
        used = await enrollment.create_token()
        await enrollment.enroll(used.token, register(used.token))

        async def scan(*args: object) -> None:
            raise AssertionError("list_tokens called to explain a refusal")

        monkeypatch.setattr(enrollment.store, "list_tokens", scan)
        for token in (used.token, f"{used.id}.{'0' * 40}", "unknown.secret"):
            with pytest.raises(EnrollmentError) as info:
                await enrollment.enroll(token, register(token))
            assert info.value.code in ("token_used", "token_invalid")

    @pytest.mark.parametrize("token", ["nodot", ".secret", "id.", "a.b.c"])
    async def test_malformed(self, enrollment: Enrollment, token: str) -> None:
        """Anything that is not id.secret is refused as invalid."""
        with pytest.raises(EnrollmentError) as info:
            await enrollment.enroll(token, Register(agent_id="x"))
        assert info.value.code == "token_invalid"

    async def test_bound_labels_are_added(self, enrollment: Enrollment) -> None:
        """The agent gets the token's labels on top of its own."""
        issued = await enrollment.create_token(labels={"env": "prod"}, workspace="shop")
        enrolled = await enrollment.enroll(issued.token, register(issued.token, zone="a"))
        assert dict(enrolled.agent.labels) == {"env": "prod", "zone": "a"}
        assert enrolled.agent.workspace == "shop"

    async def test_bound_labels_cannot_be_overridden(self, enrollment: Enrollment) -> None:
        """An agent asking for another value of a bound label is refused, naming it."""
        issued = await enrollment.create_token(labels={"env": "prod"})
        with pytest.raises(EnrollmentError, match="'env' is bound to 'prod'") as info:
            await enrollment.enroll(issued.token, register(issued.token, env="dev"))
        assert info.value.code == "labels_conflict"
        assert "the token is now spent" in str(info.value)  # the retry's token_used, said now
        with pytest.raises(EnrollmentError) as again:
            await enrollment.enroll(issued.token, register(issued.token, env="prod"))
        assert again.value.code == "token_used"


class TestSessionKeys:
    async def test_enrollment_creates_an_encrypted_key(
        self, enrollment: Enrollment, storage: SqliteStorage
    ) -> None:
        """The session key is 256 random bits, stored encrypted, and the agent exists."""
        issued = await enrollment.create_token()
        enrolled = await enrollment.enroll(issued.token, register(issued.token))
        assert len(enrolled.key.secret) == 32
        assert enrolled.key.secret not in await storage.dump_raw()
        stored = await storage.get_agent(enrolled.agent.id)
        assert stored is not None
        assert stored.status == "online"
        assert [k.key_id for k in await enrollment.valid_keys(enrolled.agent.id)] == [
            enrolled.key.key_id
        ]

    async def test_rotation_keeps_the_previous_key_valid(self, enrollment: Enrollment) -> None:
        """A new key becomes primary; the old one stays valid (secondary) until it expires."""
        issued = await enrollment.create_token()
        first = (await enrollment.enroll(issued.token, register(issued.token))).key
        second = await enrollment.new_key(first.agent_id)
        keys = await enrollment.valid_keys(first.agent_id)
        assert [(k.key_id, k.primary) for k in keys] == [
            (second.key_id, True),
            (first.key_id, False),
        ]

    async def test_expired_keys_are_not_valid(self, enrollment: Enrollment, clock: Clock) -> None:
        """Once past its lifetime a key no longer authenticates anything."""
        issued = await enrollment.create_token()
        key = (await enrollment.enroll(issued.token, register(issued.token))).key
        clock.now += 999
        assert await enrollment.valid_keys(key.agent_id)
        clock.now += 2
        assert await enrollment.valid_keys(key.agent_id) == []

    async def test_rotation_is_due_at_half_life_with_jitter(self, enrollment: Enrollment) -> None:
        """Rotation falls within half the lifetime ± 10 %, spread across keys."""
        issued = await enrollment.create_token()
        key = (await enrollment.enroll(issued.token, register(issued.token))).key
        due = [enrollment.rotation_due(key) for _ in range(200)]
        assert all(key.created_at + 400 <= d <= key.created_at + 600 for d in due)
        assert max(due) - min(due) > 100

    async def test_revoking_an_agent_deletes_its_keys(
        self, enrollment: Enrollment, storage: SqliteStorage
    ) -> None:
        """Revocation removes every key and marks the agent revoked."""
        issued = await enrollment.create_token()
        agent = (await enrollment.enroll(issued.token, register(issued.token))).agent
        await enrollment.new_key(agent.id)
        assert await enrollment.revoke_agent(agent.id)
        assert await storage.list_agent_keys(agent.id) == []
        stored = await storage.get_agent(agent.id)
        assert stored is not None
        assert stored.status == "revoked"
        assert not await enrollment.revoke_agent("nobody")
