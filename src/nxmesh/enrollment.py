"""Enrollment: bootstrap tokens, agent session keys, their rotation and revocation.

A **bootstrap token** ``<id>.<secret>`` (64-bit id, 160-bit secret, hex) is created by an
operator (`Enrollment.create_token`) and handed to one new agent. The master stores only
``sha256(secret)``; the token is single use, expires after one hour by default, can be
revoked, and may *bind labels*: the agent then carries exactly those labels (it may add
others, never override them).

Exchanging a token (`Enrollment.enroll`) creates the agent, a random 256-bit **session
key** and its key id; the key is stored encrypted by the storage backend (AES-GCM under
the master key) and sent to the agent sealed under a key derived from the token secret.

Keys live `key_lifetime` (30 days by default) and are **rotated at half their lifetime**
plus or minus `rotation_jitter` (10 % of the lifetime), so a fleet enrolled at once does
not rotate at once. A rotation adds a new *primary* key; the previous one stays valid
(*secondary*) until it expires, so frames signed with either verify while both sides
switch and nothing is lost. An agent offline for longer than a key lifetime must be
enrolled again.

`revoke_agent` deletes every key of the agent and marks it revoked; the session hub closes
its stream at once (`nxmesh.session_hub.MasterSessionHub.revoke_agent`).
"""

from __future__ import annotations

import hashlib
import hmac
import random
import secrets
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Final, Protocol

import attrs

from nxmesh.core.model import Agent, FrozenMap
from nxmesh.core.protocol import EnrollmentError, Register
from nxmesh.core.records import AgentKey, BootstrapToken

__all__ = [
    "DEFAULT_KEY_LIFETIME",
    "DEFAULT_TOKEN_TTL",
    "Enrolled",
    "Enrollment",
    "EnrollmentStore",
    "IssuedToken",
    "hash_secret",
    "parse_token",
]

DEFAULT_TOKEN_TTL: Final = 3600.0
DEFAULT_KEY_LIFETIME: Final = 30 * 24 * 3600.0
_ID_BYTES: Final = 8
_SECRET_BYTES: Final = 20  # 160 bits


class EnrollmentStore(Protocol):
    """The storage operations enrollment needs: a subset of `StorageBackend`."""

    async def add_token(self, token: BootstrapToken) -> None: ...
    async def consume_token(
        self, token_id: str, *, secret_hash: str, now: float | None = None
    ) -> BootstrapToken | None: ...
    async def revoke_token(self, token_id: str) -> bool: ...
    async def get_token(self, token_id: str) -> BootstrapToken | None: ...
    async def list_tokens(self, workspace: str | None = None) -> Sequence[BootstrapToken]: ...
    async def upsert_agent(self, agent: Agent) -> None: ...
    async def get_agent(self, agent_id: str) -> Agent | None: ...
    async def add_agent_key(self, key: AgentKey) -> None: ...
    async def list_agent_keys(self, agent_id: str) -> Sequence[AgentKey]: ...
    async def revoke_agent_keys(self, agent_id: str) -> int: ...
    async def revoke_agent(self, agent_id: str) -> bool: ...


@attrs.frozen
class IssuedToken:
    """A freshly created token: `token` is shown to the operator once and never stored."""

    token: str = attrs.field(repr=False)
    record: BootstrapToken

    @property
    def id(self) -> str:
        return self.record.id


@attrs.frozen
class Enrolled:
    """The result of a successful token exchange."""

    agent: Agent
    key: AgentKey


def hash_secret(secret: str) -> str:
    """How a token secret is stored: hex sha256 (the secret has 160 random bits)."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def parse_token(token: str) -> tuple[str, str]:
    """Split ``id.secret``; `EnrollmentError` (``token_invalid``) when it is not one."""
    token_id, dot, secret = token.partition(".")
    if not dot or not token_id or not secret or "." in secret:
        raise EnrollmentError("token_invalid", "malformed bootstrap token: expected <id>.<secret>")
    return token_id, secret


class Enrollment:
    """Issues tokens, exchanges them for session keys, rotates and revokes keys."""

    def __init__(
        self,
        store: EnrollmentStore,
        *,
        token_ttl: float = DEFAULT_TOKEN_TTL,
        key_lifetime: float = DEFAULT_KEY_LIFETIME,
        rotation_jitter: float = 0.1,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 <= rotation_jitter < 0.5:
            raise ValueError("rotation_jitter must be in [0, 0.5) of the key lifetime")
        self.store = store
        self.token_ttl = token_ttl
        self.key_lifetime = key_lifetime
        self.rotation_jitter = rotation_jitter
        self.clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrecy

    # -- tokens --------------------------------------------------------------------------

    async def create_token(
        self,
        *,
        workspace: str = "default",
        labels: Mapping[str, str] | None = None,
        ttl: float | None = None,
    ) -> IssuedToken:
        """Create and store a single-use token; the returned `IssuedToken.token` is secret."""
        token_id = secrets.token_hex(_ID_BYTES)
        secret = secrets.token_hex(_SECRET_BYTES)
        now = self.clock()
        record = BootstrapToken(
            id=token_id,
            secret_hash=hash_secret(secret),
            workspace=workspace,
            labels=FrozenMap(labels or {}),
            created_at=now,
            expires_at=now + (self.token_ttl if ttl is None else ttl),
        )
        await self.store.add_token(record)
        return IssuedToken(f"{token_id}.{secret}", record)

    async def revoke_token(self, token_id: str) -> bool:
        return await self.store.revoke_token(token_id)

    async def _diagnose(self, token_id: str, secret: str) -> EnrollmentError:
        # Only after the atomic consume failed: say *why*, but never to a wrong secret.
        # By id: anyone can send an enrollment frame, so a failed one costs one lookup.
        now = self.clock()
        tok = await self.store.get_token(token_id)
        if tok is not None and hmac.compare_digest(tok.secret_hash, hash_secret(secret)):
            if tok.revoked:
                return EnrollmentError("token_revoked", f"bootstrap token {token_id} was revoked")
            if tok.used_at is not None:
                return EnrollmentError(
                    "token_used",
                    f"bootstrap token {token_id} was already used; tokens are single use — "
                    "create a new one",
                )
            if now >= tok.expires_at:
                return EnrollmentError(
                    "token_expired",
                    f"bootstrap token {token_id} expired {now - tok.expires_at:.0f} s ago",
                )
        return EnrollmentError("token_invalid", "unknown bootstrap token or wrong secret")

    async def enroll(self, token: str, register: Register) -> Enrolled:
        """Consume `token` and create the agent with its first session key.

        Raises `EnrollmentError` with code ``token_invalid``, ``token_used``,
        ``token_expired``, ``token_revoked`` or ``labels_conflict``.
        """
        token_id, secret = parse_token(token)
        now = self.clock()
        record = await self.store.consume_token(token_id, secret_hash=hash_secret(secret), now=now)
        if record is None:
            raise await self._diagnose(token_id, secret)
        labels = dict(register.labels)
        for name, value in record.labels.items():
            if labels.get(name, value) != value:
                # The token is spent: a bound token is for one specific kind of agent.
                raise EnrollmentError(
                    "labels_conflict",
                    f"label {name!r} is bound to {value!r} by the bootstrap token, "
                    f"but the agent asked for {labels[name]!r}; the token is now spent "
                    "(a bound token is for one kind of agent): fix agent.labels and "
                    "create a new token",
                )
            labels[name] = value
        agent = Agent(
            id=uuid.uuid4().hex,
            name=register.name,
            labels=labels,
            workspace=record.workspace,
            status="online",
            nginx_version=register.nginx_version,
            deployment_mode=register.deployment_mode,
            running_version=register.running_version,
            running_digest=register.running_digest,
            last_seen=now,
        )
        await self.store.upsert_agent(agent)
        return Enrolled(agent, await self.new_key(agent.id))

    # -- keys ----------------------------------------------------------------------------

    async def new_key(self, agent_id: str) -> AgentKey:
        """Create and store a new primary key for the agent (its others become secondary)."""
        now = self.clock()
        key = AgentKey(
            agent_id=agent_id,
            key_id=f"k{int(now)}-{secrets.token_hex(4)}",
            secret=secrets.token_bytes(32),
            created_at=now,
            expires_at=now + self.key_lifetime,
            primary=True,
        )
        await self.store.add_agent_key(key)
        return key

    async def valid_keys(self, agent_id: str) -> list[AgentKey]:
        """The agent's unexpired keys, primary first."""
        now = self.clock()
        return [k for k in await self.store.list_agent_keys(agent_id) if k.expires_at > now]

    def rotation_due(self, key: AgentKey) -> float:
        """When to replace `key`: half its lifetime, ± the jitter."""
        lifetime = key.expires_at - key.created_at
        jitter = self._rng.uniform(-self.rotation_jitter, self.rotation_jitter) * lifetime
        return key.created_at + lifetime / 2 + jitter

    async def revoke_agent(self, agent_id: str) -> bool:
        """Delete every key of the agent and mark it revoked, in one transaction (a
        concurrent write of the agent cannot undo it); False if it is unknown."""
        return await self.store.revoke_agent(agent_id)
