"""The agent's link to its master, over any transport: `AgentLink`.

`AgentLink` implements the agent app's `nxmesh.agent.link.MasterLink`:

- **Endpoints in order.** Each connection tries the configured endpoints (a transport
  + URL, e.g. gRPC first, WebSocket second) in order and uses the first that connects;
  one that cannot connect (`OSError`: refused, TLS failure, timeout) is skipped, and when
  none connects `run` raises `NoEndpointError` (an `OSError`) before signalling started.
- **Register and resync.** Every connection starts with `Register`: a bootstrap token
  the first time (the credentials received are saved through a `CredentialStore`
  *before* they are used), the agent id and session key afterwards. It carries the
  running version + digest, so the master resends the desired version only when they
  differ. Heartbeats (the master's interval, 30 s by default) carry them too.
- **One session per `run`.** `run` returns control (raising `ConnectionError`) when the
  session breaks, so the agent app knows it is in island mode and calls `run` again with
  its backoff. `run_forever` does the reconnecting itself — exponential backoff from 1 s
  doubling to 60 s, each delay drawn from [d/2, d], reset after a registration — for
  users without the agent app (simulations, tests, embedding).
- **Updates** are acknowledged at once with a ``received`` `ConfigStatus` and handed to
  the agent (`AgentSession.submit`) — or, without a session, put on `updates`.
  Outcomes go up with `report_apply` (or `send_status`).
- **Key rotation** is handled here: the new key is saved, then used; frames signed with
  the previous key keep verifying while the master switches.
- **The master's signing key** arrives in every accepted `RegisterResponse` (inside the
  authenticated session): `on_master_key(key, enrolled)` is called with it, so the
  agent app pins it at enrollment and notices a master that signs with another key.
- A rejection the master marks final (token used/expired/revoked, agent revoked,
  incompatible protocol) raises that `RejectedError` (not an `OSError`: retrying cannot
  help); other rejections (clock skew...) raise a `ConnectionError` carrying it, and
  `last_error` says precisely what is wrong (how far the clocks are apart).
"""

from __future__ import annotations

import base64
import functools
import json
import random
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Final, Generic, Protocol, TypeVar

import anyio
import attrs
import structlog
from anyio.abc import TaskStatus

from nxmesh._concurrency import unwrap_group
from nxmesh.core import validation as v
from nxmesh.core.envelope import (
    MAX_SKEW,
    ClockSkewError,
    EncodedBody,
    Envelope,
    MalformedFrameError,
    MessageType,
    ProtocolCounters,
    ProtocolError,
    ReplayGuard,
    SequenceSource,
    seal,
    unseal,
)
from nxmesh.core.errors import ConfigurationError
from nxmesh.core.events import Event
from nxmesh.core.interfaces import Channel, TransportClient
from nxmesh.core.model import ApplyReport, FrozenMap, HealthReport, PendingApply
from nxmesh.core.protocol import (
    COMPRESSION_CAPABILITY,
    MAX_BODY,
    PROTOCOL_MAX,
    PROTOCOL_MIN,
    Ack,
    Command,
    ConfigStatus,
    ConfigUpdate,
    Heartbeat,
    IncompatibleProtocolError,
    LogBatch,
    LogEntry,
    Message,
    MetricsBatch,
    Register,
    RegisterResponse,
    RejectedError,
    SessionCrypto,
    UndecodableBodyError,
    body_bytes,
    bootstrap_mac_key,
    decode_body,
    encode_body,
    encode_received,
    enrollment_keypair,
    enrollment_secret,
    open_certificates,
    open_key,
)
from nxmesh.crypto.secrets import read_private_file, write_private_file
from nxmesh.crypto.signing import SigningError, VerifyKey
from nxmesh.enrollment import parse_token

if TYPE_CHECKING:
    from nxmesh.agent.link import AgentSession

__all__ = [
    "AgentCredentials",
    "AgentLink",
    "Backoff",
    "CredentialStore",
    "Endpoint",
    "FileCredentialStore",
    "Mailbox",
    "MemoryCredentialStore",
    "NoEndpointError",
    "SessionEnded",
    "status_from_report",
]

log = structlog.get_logger("nxmesh.agent.link")

T = TypeVar("T")

_OUTBOX: Final = 256
_TEXT_LIMIT: Final = 4000


def _text(value: str) -> str:
    """Fit free text into a protocol text field: no control characters, bounded."""
    value = v.printable(value)  # nginx quotes file contents in its errors
    return value if len(value) <= _TEXT_LIMIT else value[: _TEXT_LIMIT - 15] + "\n...[truncated]"


def status_from_report(report: ApplyReport) -> ConfigStatus:
    """The `ConfigStatus` telling the master how an apply went."""
    return ConfigStatus(
        version=report.version,
        digest=report.digest,
        phase=report.outcome,
        error=_text(report.message),
        nginx_output=_text(report.nginx_output),
        durations=report.durations,
    )


class NoEndpointError(ConnectionError):
    """No configured endpoint could be connected; `errors` holds each one's failure."""

    def __init__(self, errors: Sequence[tuple[str, BaseException]]) -> None:
        self.errors = list(errors)
        detail = "; ".join(f"{url}: {exc!r}" for url, exc in errors) or "none configured"
        super().__init__(f"cannot reach the master through any endpoint ({detail})")


@attrs.frozen
class Endpoint:
    """One way to reach the master: a transport client and the URL it connects to."""

    client: TransportClient
    url: str


@attrs.frozen
class AgentCredentials:
    """What enrollment gave the agent. `previous` is the key before the last rotation."""

    agent_id: str
    key_id: str
    key: bytes = attrs.field(repr=False)
    expires_at: float = 0.0
    previous: tuple[str, bytes] | None = attrs.field(default=None, repr=False)

    def keys(self) -> dict[str, bytes]:
        keys = {self.key_id: self.key}
        if self.previous is not None:
            keys.setdefault(*self.previous)
        return keys


class CredentialStore(Protocol):
    """Where the agent keeps its credentials between runs (the agent app encrypts them)."""

    async def load(self) -> AgentCredentials | None: ...
    async def save(self, credentials: AgentCredentials) -> None: ...


class MemoryCredentialStore:
    """Credentials in memory only: tests and simulations."""

    def __init__(self, credentials: AgentCredentials | None = None) -> None:
        self.credentials = credentials

    async def load(self) -> AgentCredentials | None:
        return self.credentials

    async def save(self, credentials: AgentCredentials) -> None:
        self.credentials = credentials


class FileCredentialStore:
    """Credentials in a JSON file created 0600 and replaced atomically and durably (the
    directory is fsynced after the rename: the bootstrap token that earned them is spent).

    A file other users can read is refused (`SecretError` naming the ``chmod`` to run).
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    async def load(self) -> AgentCredentials | None:
        def read() -> bytes | None:
            if not self.path.exists():
                return None
            return read_private_file(self.path, what="agent credentials")

        raw = await anyio.to_thread.run_sync(read)
        if raw is None:
            return None
        data = json.loads(raw)
        prev = data.get("previous")
        return AgentCredentials(
            agent_id=data["agent_id"],
            key_id=data["key_id"],
            key=base64.b64decode(data["key"]),
            expires_at=data.get("expires_at", 0.0),
            previous=(prev[0], base64.b64decode(prev[1])) if prev else None,
        )

    async def save(self, credentials: AgentCredentials) -> None:
        data: dict[str, object] = {
            "agent_id": credentials.agent_id,
            "key_id": credentials.key_id,
            "key": base64.b64encode(credentials.key).decode(),
            "expires_at": credentials.expires_at,
            "previous": None,
        }
        if credentials.previous is not None:
            data["previous"] = [
                credentials.previous[0],
                base64.b64encode(credentials.previous[1]).decode(),
            ]
        raw = json.dumps(data).encode()
        # Temp file, fsync, rename, directory fsync: a power cut right after enrollment
        # must not lose the session key once the single-use token is spent.
        await anyio.to_thread.run_sync(
            functools.partial(write_private_file, self.path, raw, replace=True)
        )


@attrs.define
class Backoff:
    """Exponential backoff with jitter: ``minimum`` doubling up to ``maximum``."""

    minimum: float = 1.0
    maximum: float = 60.0
    factor: float = 2.0
    rng: random.Random = attrs.field(factory=random.Random)
    attempt: int = 0

    def next(self) -> float:
        ceiling = min(self.maximum, self.minimum * self.factor**self.attempt)
        self.attempt += 1
        return self.rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0


class Mailbox(Generic[T]):
    """A bounded queue for one reader; when full, the oldest item makes room (and is logged).

    Used for updates and commands: a newer version supersedes an unread older one, and the
    link never blocks on a slow reader.
    """

    def __init__(self, size: int, what: str) -> None:
        self._items: deque[T] = deque()
        self._size = size
        self._what = what
        self._ready = anyio.Event()

    def put(self, item: T) -> None:
        if len(self._items) >= self._size:
            self._items.popleft()
            log.warning("mailbox full, oldest item dropped", mailbox=self._what)
        self._items.append(item)
        self._ready.set()

    async def receive(self) -> T:
        while not self._items:
            self._ready = anyio.Event()
            await self._ready.wait()
        return self._items.popleft()

    def __len__(self) -> int:
        return len(self._items)


class SessionEnded(ConnectionError):
    """The session with the master ended: the stream closed, or the master asked to drain."""


_REENROLL_CODES: Final = frozenset({"agent_revoked", "unknown_key"})
"""Refusals of stored credentials after which a bootstrap token given enrolls anew."""


class AgentLink:
    """Connects the agent to its master; implements `nxmesh.agent.link.MasterLink`."""

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        credentials: CredentialStore,
        *,
        bootstrap_token: str | None = None,
        name: str = "agent",
        labels: Mapping[str, str] | None = None,
        nginx_version: str | Callable[[], str | None] | None = None,
        deployment_mode: str | None = None,
        capabilities: Sequence[str] = (),
        agent_version: str = "",
        heartbeat_interval: float | None = None,
        register_timeout: float = 15.0,
        idle_intervals: float = 3.0,
        backoff: Backoff | None = None,
        max_skew: float = MAX_SKEW,
        max_body: int = MAX_BODY,
        counters: ProtocolCounters | None = None,
        clock: Callable[[], float] = time.time,
        protocol_range: tuple[int, int] = (PROTOCOL_MIN, PROTOCOL_MAX),
        update_buffer: int = 16,
        on_master_key: Callable[[VerifyKey, bool], None] | None = None,
    ) -> None:
        if not endpoints:
            raise ConfigurationError("the agent needs at least one master endpoint")
        self.endpoints = list(endpoints)
        self.credentials = credentials
        self.bootstrap_token = bootstrap_token
        # Why the stored credentials were refused, while enrolling again with the token.
        self._reenroll_because: str | None = None
        self.name = name
        self.labels = FrozenMap(labels or {})
        # A callable (``nginx -v``) is asked again at every registration, so the master
        # learns of an nginx upgraded under a running agent at its next reconnect.
        self.nginx_version_source = nginx_version if callable(nginx_version) else None
        self.nginx_version: str | None = None if callable(nginx_version) else nginx_version
        self.deployment_mode = deployment_mode
        # What this code reads is always announced (the master then compresses versions).
        self.capabilities = tuple(dict.fromkeys((COMPRESSION_CAPABILITY, *capabilities)))
        self.agent_version = agent_version
        self.heartbeat_interval = heartbeat_interval
        self.register_timeout = register_timeout
        self.idle_intervals = idle_intervals
        self.backoff = backoff or Backoff()
        self.max_body = max_body
        self.counters = counters if counters is not None else ProtocolCounters()
        self.clock = clock
        self.protocol_range = protocol_range
        self.running_version: int | None = None
        self.running_digest: str | None = None
        self.last_error: BaseException | None = None
        self.endpoint: Endpoint | None = None
        self.agent_id: str | None = None
        self.protocol_version: int | None = None
        self.registrations = 0
        self.on_master_key = on_master_key
        self.master_key: VerifyKey | None = None
        """The master's version-signing key, as its last `RegisterResponse` gave it."""
        self._session: AgentSession | None = None
        self._seq = SequenceSource(clock)
        self._guard = ReplayGuard(max_skew=max_skew, clock=clock)
        self._outbox: deque[Message | EncodedBody] = deque(maxlen=_OUTBOX)
        self._wake = anyio.Event()
        self._registered = anyio.Event()
        self._registration = anyio.Event()
        self._last_received = 0.0
        self._crypto: SessionCrypto | None = None
        self.updates: Mailbox[ConfigUpdate] = Mailbox(update_buffer, "updates")
        """Updates, when `run` was not given an `AgentSession` to submit them to."""
        self.commands: Mailbox[Command] = Mailbox(update_buffer, "commands")
        """``reload`` commands (rotation, resync and drain are handled here)."""

    # -- state ---------------------------------------------------------------------------

    @property
    def pending_frames(self) -> int:
        """Messages queued for the master and not yet on the stream (they wait out a
        reconnect in the outbox)."""
        return len(self._outbox)

    @property
    def connected(self) -> bool:
        return self._crypto is not None

    async def wait_registered(self, count: int | None = None) -> None:
        """Return once a session is registered (immediately if one is), or — given `count`
        — once `registrations` reached it."""
        if count is None:
            await self._registered.wait()
            return
        while self.registrations < count:
            self._registration = anyio.Event()
            await self._registration.wait()

    def set_running(self, version: int | None, digest: str | None) -> None:
        """What nginx runs now (without an `AgentSession`, which knows it itself)."""
        self.running_version, self.running_digest = version, digest

    def _running(self) -> tuple[int | None, str | None]:
        if self._session is not None:
            hello = self._session.hello()
            return hello.running_version, hello.running_digest
        return self.running_version, self.running_digest

    # -- outputs (MasterLink) ------------------------------------------------------------

    def send_status(self, status: ConfigStatus) -> None:
        """Queue a status for the master (kept while offline, sent after reconnecting)."""
        if status.phase in ("applied", "noop"):
            self.set_running(status.version, status.digest)
        self._queue(status)

    def send_health(self, report: HealthReport) -> None:
        self._queue(report)

    def send_metrics(self, batch: MetricsBatch) -> None:
        self._queue(batch)

    def send_logs(self, batch: LogBatch) -> None:
        self._queue(batch)

    async def report_apply(self, report: ApplyReport) -> None:
        self.send_status(status_from_report(report))

    async def report_applying(self, update: PendingApply) -> None:
        """An update from the master entered the apply pipeline."""
        self._queue(ConfigStatus(version=update.version, digest=update.digest, phase="applying"))

    async def report_health(self, report: HealthReport) -> None:
        if self.agent_id is not None and report.agent_id != self.agent_id:
            # The app names itself; the master knows the agent by its enrolled id.
            report = attrs.evolve(report, agent_id=self.agent_id)
        self.send_health(report)

    async def report_event(self, event: Event) -> None:
        payload = json.dumps(dict(event.payload), sort_keys=True, default=str)
        entry = LogEntry(
            ts=event.ts,
            level="info",
            message=_text(f"{event.kind} {payload}"),
            source="agent.events",
        )
        self.send_logs(LogBatch(entries=(entry,)))

    def _queue(self, message: Message | EncodedBody) -> None:
        self._outbox.append(message)
        self._wake.set()

    # -- running -------------------------------------------------------------------------

    async def run(
        self,
        session: AgentSession | None = None,
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """One session: connect, register, signal started, serve until it ends.

        Raises `NoEndpointError` (an `OSError`) before started when no endpoint connects,
        `SessionEnded` or another `OSError` when an established session breaks, and
        `RejectedError` when the master refuses this agent for good.
        """
        self._session = session
        try:
            await self._connect_once(task_status)
        except RejectedError as exc:
            self.last_error = exc
            if exc.final:
                log.critical("master rejected this agent", code=exc.code, error=str(exc))
                raise
            log.warning("master rejected the session", code=exc.code, error=str(exc))
            raise ConnectionError(str(exc)) from exc
        except (
            ProtocolError,
            TimeoutError,
            anyio.EndOfStream,
            anyio.BrokenResourceError,
            anyio.ClosedResourceError,
        ) as exc:
            self.last_error = exc
            raise ConnectionError(str(exc) or repr(exc)) from exc
        except OSError as exc:
            self.last_error = exc
            raise

    async def run_forever(
        self,
        session: AgentSession | None = None,
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Stay connected until cancelled, reconnecting with `backoff`.

        Signals started at once (an agent serves from its cache while the master is
        away); raises only a final `RejectedError`.
        """
        task_status.started()
        while True:
            try:
                await self.run(session)
            except OSError as exc:
                log.warning("master link down", error=str(exc) or repr(exc))
            delay = self.backoff.next()
            log.info("reconnecting", in_seconds=round(delay, 2))
            await anyio.sleep(delay)

    async def _connect_once(self, task_status: TaskStatus[None]) -> None:
        errors: list[tuple[str, BaseException]] = []
        async with AsyncExitStack() as stack:
            for endpoint in self.endpoints:
                try:
                    channel = await stack.enter_async_context(endpoint.client.connect(endpoint.url))
                except OSError as exc:
                    log.info(
                        "endpoint unreachable, trying the next",
                        url=endpoint.url,
                        error=str(exc) or repr(exc),
                    )
                    errors.append((endpoint.url, exc))
                    continue
                self.endpoint = endpoint
                await self._serve(channel, task_status)
                return
        raise NoEndpointError(errors)

    async def _serve(self, channel: Channel, task_status: TaskStatus[None]) -> None:
        creds = None if self._reenroll_because else await self.credentials.load()
        try:
            crypto, response = await self._register(channel, creds)
        except RejectedError as exc:
            if creds is not None and self.bootstrap_token and exc.code in _REENROLL_CODES:
                # The operator revoked this agent (or its key is gone) and gave it a new
                # token: enroll again with it on the next attempt, as the master's
                # message says. The stored credentials stay until that succeeds.
                self._reenroll_because = str(exc)
                log.warning(
                    "the master refuses this agent's credentials; enrolling again with "
                    "the bootstrap token given",
                    agent_id=creds.agent_id,
                    code=exc.code,
                )
                raise RejectedError("reenroll", f"{exc}; enrolling again") from exc
            if creds is None and self._reenroll_because:
                raise RejectedError(
                    exc.code, f"{exc} (enrolling again because: {self._reenroll_because})"
                ) from exc
            raise
        self._reenroll_because = None
        self._crypto = crypto
        self._last_received = self.clock()
        self.agent_id = crypto.agent_id
        self.protocol_version = response.protocol_version
        self.registrations += 1
        self.backoff.reset()
        self.last_error = None
        self._registered.set()
        self._registration.set()
        interval = self.heartbeat_interval or response.heartbeat_interval
        log.info(
            "registered with the master",
            agent_id=crypto.agent_id,
            url=self.endpoint.url if self.endpoint else None,
            protocol=response.protocol_version,
        )
        task_status.started()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._sender, channel, crypto)
                tg.start_soon(self._heartbeats, interval, interval * self.idle_intervals)
                await self._receiver(channel, crypto)
        except BaseExceptionGroup as group:
            raise unwrap_group(group) from None
        finally:
            self._crypto = None
            self._registered = anyio.Event()

    async def _register(
        self, channel: Channel, creds: AgentCredentials | None
    ) -> tuple[SessionCrypto, RegisterResponse]:
        secret: str | None = None
        if self.nginx_version_source is not None:  # blocking: it runs the binary
            self.nginx_version = await anyio.to_thread.run_sync(self.nginx_version_source)
        if creds is not None:
            register = self._register_message(agent_id=creds.agent_id)
            agent_id, key_id, key = creds.agent_id, creds.key_id, creds.key
        elif self.bootstrap_token is not None:
            token_id, secret = parse_token(self.bootstrap_token)
            # This enrollment's own key pair: the session key comes sealed under the token
            # *and* the X25519 secret, so seeing the token in transit does not open it.
            enroll_private, enroll_public = enrollment_keypair()
            register = self._register_message(
                bootstrap_token=self.bootstrap_token, enroll_key=enroll_public
            )
            agent_id, key_id, key = "", token_id, bootstrap_mac_key(secret)
        else:
            raise ConfigurationError(
                "this agent is not enrolled and has no bootstrap token; create one on the "
                "master and pass it to the agent"
            )
        await channel.send(
            seal(
                encode_body(register),
                agent_id=agent_id,
                key_id=key_id,
                key=key,
                seq=self._seq.next(),
                ts_ms=int(self.clock() * 1000),
            )
        )
        with anyio.fail_after(self.register_timeout):
            frame = await channel.receive()
        try:
            env = unseal(frame, max_body=self.max_body)
            if env.type is not MessageType.REGISTER_RESPONSE:
                raise MalformedFrameError(f"expected REGISTER_RESPONSE, got {env.type.name}")
            response = decode_body(env, max_body=self.max_body)
            assert isinstance(response, RegisterResponse)
            if not response.accepted:
                raise self._rejection(env, response, key)
            if secret is not None:  # enrollment: the key arrives sealed
                session_key = open_key(
                    enrollment_secret(secret, enroll_private, response.enroll_key),
                    response.sealed_key,
                    aad=f"{env.agent_id}|{env.key_id}".encode(),
                )
                env.verify(session_key)
                creds = AgentCredentials(
                    agent_id=env.agent_id,
                    key_id=env.key_id,
                    key=session_key,
                    expires_at=response.key_expires_at,
                )
                await self.credentials.save(creds)
                log.info("enrolled", agent_id=creds.agent_id, labels=dict(response.labels))
            assert creds is not None
            crypto = SessionCrypto(
                agent_id=creds.agent_id,
                key_id=creds.key_id,
                keys=creds.keys(),
                receives_from_agent=False,
                counters=self.counters,
                seq=self._seq,
                guard=self._guard,
                clock=self.clock,
                max_body=self.max_body,
            )
            crypto.check(env)
            self._master_key(response, enrolled=secret is not None)
            low, high = self.protocol_range
            if not low <= response.protocol_version <= high:
                raise IncompatibleProtocolError(
                    f"the master chose protocol {response.protocol_version}, "
                    f"this agent speaks {low}..{high}"
                )
        except RejectedError:
            raise
        except ProtocolError as exc:
            self.counters.count(exc)
            raise
        self.counters.accepted += 1
        return crypto, response

    def _master_key(self, response: RegisterResponse, *, enrolled: bool) -> None:
        if not response.signing_key:
            return
        try:
            key = VerifyKey.from_base64(response.signing_key)
        except SigningError as exc:
            log.error("the master sent an unusable signing key", error=str(exc))  # noqa: TRY400
            return
        self.master_key = key
        if self.on_master_key is not None:
            self.on_master_key(key, enrolled)

    def _register_message(
        self,
        *,
        agent_id: str | None = None,
        bootstrap_token: str | None = None,
        enroll_key: str = "",
    ) -> Register:
        name, labels, mode = self.name, self.labels, self.deployment_mode
        if self._session is not None:
            hello = self._session.hello()
            name, labels, mode = hello.agent_id, FrozenMap(hello.labels), hello.deployment_mode
        version, digest = self._running()
        return Register(
            protocol_min=self.protocol_range[0],
            protocol_max=self.protocol_range[1],
            agent_id=agent_id,
            bootstrap_token=bootstrap_token,
            name=name,
            labels=labels,
            nginx_version=self.nginx_version,
            deployment_mode=mode,
            capabilities=self.capabilities,
            agent_version=self.agent_version,
            running_version=version,
            running_digest=digest,
            enroll_key=enroll_key,
        )

    def _rejection(self, env: Envelope, response: RegisterResponse, key: bytes) -> RejectedError:
        signed = True
        try:
            env.verify(key)
        except ProtocolError:
            signed = False  # the master could not sign it (it does not know our key)
        message = response.error
        if response.code == "clock_skew":
            skew = self.clock() - response.server_time
            message = str(ClockSkewError(skew, MAX_SKEW, who="this agent")) + f" ({message})"
        elif response.code == "protocol_incompatible":
            message = (
                f"{message}; this agent speaks {self.protocol_range[0]}..{self.protocol_range[1]}"
            )
        if not signed:
            message += " [unsigned answer]"
        self.counters.rejected_enrollment += 1
        return RejectedError(response.code or "internal", message)

    async def _sender(self, channel: Channel, crypto: SessionCrypto) -> None:
        while True:
            while self._outbox:
                message = self._outbox[0]
                await channel.send(crypto.seal(message))
                self._outbox.popleft()
            await self._wake.wait()
            self._wake = anyio.Event()

    async def _heartbeats(self, interval: float, idle: float) -> None:
        """Send a heartbeat every `interval`; give up on a master silent for `idle`.

        Every heartbeat is acked, so a live master is never silent that long.
        """
        while True:
            await anyio.sleep(interval)
            silent = self.clock() - self._last_received
            if silent >= idle:
                raise TimeoutError(f"nothing from the master for {silent:.0f} s")
            version, digest = self._running()
            self._queue(Heartbeat(running_version=version, running_digest=digest))

    async def _receiver(self, channel: Channel, crypto: SessionCrypto) -> None:
        while True:
            try:
                frame = await channel.receive()
            except anyio.EndOfStream:
                raise SessionEnded("the master closed the stream") from None
            self._last_received = self.clock()
            try:
                env, message = crypto.open(frame)
            except UndecodableBodyError as exc:
                log.warning("frame from the master rejected", error=str(exc))
                if exc.env.type is MessageType.CONFIG_UPDATE:
                    self._unreadable_update(exc)
                continue
            except (MalformedFrameError, ClockSkewError) as exc:
                log.warning("frame from the master rejected", error=str(exc))
                continue
            await self._dispatch(crypto, env, message)

    def _unreadable_update(self, exc: UndecodableBodyError) -> None:
        """Report a version the master signed but this agent cannot read as failed, so
        the rollout stops and says why, instead of waiting for an answer that never
        comes. Its number and digest come from the body as plain JSON; without them
        there is nothing to answer about."""
        try:
            data = json.loads(body_bytes(exc.env, max_body=self.max_body))
        except (ProtocolError, ValueError, RecursionError):
            return
        version = data.get("version") if isinstance(data, dict) else None
        digest = data.get("digest") if isinstance(data, dict) else None
        if not isinstance(version, int) or not isinstance(digest, str):
            return
        upgrade = f"this agent ({self.agent_version or 'unknown version'}) is older than"
        try:
            status = ConfigStatus(
                version=version,
                digest=digest,
                phase="failed",
                error=_text(
                    f"this agent cannot read version {version}: {exc}. If {upgrade} the "
                    "master, upgrade it"
                ),
            )
        except ValueError:  # no valid version number and digest: nothing to answer
            return
        self._queue(status)

    async def _dispatch(self, crypto: SessionCrypto, env: Envelope, message: Message) -> None:
        if isinstance(message, ConfigUpdate):
            if message.certificates:
                try:
                    opened = open_certificates(
                        message.certificates, crypto.keys, agent_id=crypto.agent_id
                    )
                except ProtocolError as exc:
                    log.error("certificate keys from the master do not open", error=str(exc))  # noqa: TRY400
                    self._queue(
                        ConfigStatus(
                            version=message.version,
                            digest=message.digest,
                            phase="failed",
                            error=_text(str(exc)),
                        )
                    )
                    return
                message = attrs.evolve(message, certificates=opened)
            self._queue(encode_received(message.version, message.digest))
            if self._session is not None:
                self._session.submit(message.to_pending())
            else:
                self.updates.put(message)
        elif isinstance(message, Command):
            await self._command(crypto, message)
        elif isinstance(message, Ack):
            if not message.ok:
                log.warning("master refused a frame", seq=message.seq, error=message.error)
        else:
            log.warning("unexpected message from the master", type=env.type.name)

    async def _command(self, crypto: SessionCrypto, command: Command) -> None:
        if command.kind == "rotate_key":
            current = crypto.keys[crypto.key_id]
            new_key = open_key(
                current,
                command.sealed_key,
                aad=f"{crypto.agent_id}|{command.new_key_id}".encode(),
            )
            creds = AgentCredentials(
                agent_id=crypto.agent_id,
                key_id=command.new_key_id,
                key=new_key,
                expires_at=command.key_expires_at,
                previous=(crypto.key_id, current),
            )
            await self.credentials.save(creds)  # saved before use: a crash loses nothing
            crypto.keys = creds.keys()
            crypto.key_id = creds.key_id
            log.info("session key rotated", key_id=creds.key_id)
        elif command.kind == "resync":
            version, digest = self._running()
            self._queue(Heartbeat(running_version=version, running_digest=digest))
        elif command.kind == "drain":
            raise SessionEnded(command.reason or "the master asked to reconnect")
        else:
            self.commands.put(command)
