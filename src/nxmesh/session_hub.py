"""The master's side of every agent stream, over any transport.

`MasterSessionHub` is a `nxmesh.core.interfaces.SessionHandler`: give it to each
`TransportServer.serve` and it runs one session per accepted stream —

1. the first frame must be a `Register`: a bootstrap token is exchanged for credentials
   (`nxmesh.enrollment.Enrollment.enroll`), an enrolled agent is authenticated by its
   session key; the protocol version is negotiated; anything wrong is answered with a
   rejecting `RegisterResponse` naming the reason, counted, and the stream is closed;
2. the agent's running version + digest is compared with what it should run, and the
   version is sent again only when they differ;
3. then frames flow both ways: `ConfigUpdate`/`Command`/`Ack` out, statuses, heartbeats,
   health, metrics and logs in. A session without any frame for three heartbeat
   intervals is closed; the key is rotated at half its lifetime.

`push` fans a version out to the connected agents a `LabelSelector` matches. The body is
encoded, compressed and hashed **once per version**; each agent only costs an HMAC over
its small header (`nxmesh.core.envelope`). Agents announcing
`~nxmesh.core.protocol.COMPRESSION_CAPABILITY` get the zlib-compressed body, others
(and all with ``compress=False``) the plain one. Each session has one sender task with a
one-slot update mailbox, so a slow agent delays nobody else and an older unsent version
is replaced by a newer one.

Inbound messages go to `on_message(agent_id, message)`; the master app persists what it
needs (statuses, health) there — the hub does not write to storage per message.
`on_session(info, connected)` is told when a session opens and closes, and
`on_sent(agent_id, version)` when a version went out on an agent's stream; `offer`
queues one version for one agent (the master's orchestrator decides per agent).
Accepted registrations carry the master's version-signing public key (`signing_key`),
which the agent pins at enrollment.

Certificate material (`UpdateMaterial`: the certificates an agent's sites use and pending
HTTP-01 tokens) travels inside the `ConfigUpdate`; each private key is sealed under the
receiving agent's session key, so a version carrying certificates is encoded per agent.
`material_for(version)` supplies it for versions the hub sends by itself (resyncs).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from typing import Any, Final, Protocol, runtime_checkable

import anyio
import attrs
import structlog

from nxmesh._concurrency import unwrap_group
from nxmesh.core.envelope import (
    MAX_SKEW,
    BadSignatureError,
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
from nxmesh.core.interfaces import Channel
from nxmesh.core.model import (
    Agent,
    ConfigVersion,
    FrozenMap,
    HealthReport,
    LabelSelector,
    TlsCertificate,
)
from nxmesh.core.protocol import (
    COMPRESSION_CAPABILITY,
    MAX_BODY,
    PROTOCOL_MAX,
    PROTOCOL_MIN,
    Ack,
    Command,
    ConfigStatus,
    ConfigUpdate,
    EnrollmentError,
    Heartbeat,
    IncompatibleProtocolError,
    LogBatch,
    Message,
    MetricsBatch,
    Register,
    RegisterResponse,
    SessionCrypto,
    UnknownKeyError,
    bootstrap_mac_key,
    compress_body,
    decode_body,
    encode_body,
    enrollment_keypair,
    enrollment_secret,
    negotiate,
    seal_certificates,
    seal_key,
)
from nxmesh.core.records import AgentKey
from nxmesh.crypto.signing import VerifyKey
from nxmesh.enrollment import Enrollment, parse_token

__all__ = [
    "AssignmentSource",
    "MasterSessionHub",
    "SendsParts",
    "SessionInfo",
    "TransportHandler",
    "UpdateMaterial",
]

log = structlog.get_logger("nxmesh.session")

_REPORT_TYPES: Final = frozenset(
    {MessageType.HEALTH_REPORT, MessageType.METRICS_BATCH, MessageType.LOG_BATCH}
)
_ACKED: Final = (Heartbeat, HealthReport, MetricsBatch, LogBatch)
_MAX_BAD_FRAMES: Final = 16
# Seconds the previous key still verifies after a rotation when it has expired already
# (an agent that connected late in its key's life is rotated at once): the frames it
# signed before the command reached it are still on their way.
_ROTATION_GRACE: Final = 60.0
_BODY_CACHE: Final = 32
# Acks and commands queued for one agent: an agent this far behind stopped reading its
# stream (its own frames keep the session alive; each one queues another ack).
_MAX_CONTROL: Final = 256


@runtime_checkable
class SendsParts(Protocol):
    """A `Channel` that can send one frame given in two parts, copying them once.

    Optional for transports: the hub sends a version as its sealed header
    (`SessionCrypto.seal_parts`) and the version's shared body, so a 64 KB body is not
    copied into a per-agent frame first. Other channels get ``head + body``.
    """

    async def send_parts(self, head: bytes, body: bytes) -> None: ...


class AssignmentSource(Protocol):
    """Which version an agent should run (the master app backs it with storage)."""

    async def desired_for(self, agent: Agent) -> ConfigVersion | None: ...


@attrs.frozen
class UpdateMaterial:
    """Certificate material sent with a version: plaintext keys here, sealed on the wire."""

    certificates: tuple[TlsCertificate, ...] = ()
    challenges: Mapping[str, str] = attrs.field(factory=FrozenMap)

    def __bool__(self) -> bool:
        return bool(self.certificates or self.challenges)


@attrs.frozen
class SessionInfo:
    """A snapshot of one connected agent, for APIs and tests."""

    agent_id: str
    peer: str
    labels: Mapping[str, str]
    workspace: str
    transport: str
    protocol_version: int
    key_id: str
    running_version: int | None
    running_digest: str | None
    connected_at: float
    last_seen: float


@attrs.define(eq=False)
class _PushedVersion:
    version: ConfigVersion
    body: EncodedBody
    selector: LabelSelector
    packed: EncodedBody | None = None  # `body` compressed, once, for the first who reads it

    def wire(self, compressed: bool) -> EncodedBody:
        """The body to send: compressed for agents that read it so."""
        if not compressed:
            return self.body
        if self.packed is None:
            self.packed = compress_body(self.body)
        return self.packed


@attrs.define(eq=False)
class _AgentState:
    """What outlives one connection of an agent in this process: replay state."""

    guard: ReplayGuard
    unary_guard: ReplayGuard
    seq: SequenceSource


@attrs.define(eq=False)
class _Watch:
    version: int
    remaining: set[str]
    final: bool
    done: anyio.Event = attrs.field(factory=anyio.Event)
    results: dict[str, ConfigStatus] = attrs.field(factory=dict)


class _Wake:
    """Wakes a session's sender: `set` any number of times, `wait` returns after the next.

    One semaphore for the session's life: a new `anyio.Event` per wake-up cost about 5 µs
    per agent and push (the backend lookup behind `anyio.Event()`), at thousands of agents
    a measurable share of a push. A `set` while nobody waits makes the next `wait` return
    at once; the sender then finds its queues as they are, possibly empty.
    """

    __slots__ = ("_semaphore",)

    def __init__(self) -> None:
        self._semaphore = anyio.Semaphore(0, max_value=1, fast_acquire=True)

    def set(self) -> None:
        if self._semaphore.value == 0:
            self._semaphore.release()

    async def wait(self) -> None:
        await self._semaphore.acquire()


@attrs.define(eq=False)
class _Session:
    agent: Agent
    channel: Channel
    crypto: SessionCrypto
    peer: str
    protocol_version: int
    connected_at: float
    rotate_at: float
    key_expires_at: float
    running_version: int | None
    running_digest: str | None
    last_seen: float
    transport: str = ""
    # One scope for the whole session: cancelled to close it, and its deadline is the
    # silence timeout (each scope costs ~0.8 KB; thousands of sessions are idle).
    scope: anyio.CancelScope = attrs.field(factory=anyio.CancelScope)
    wake: _Wake = attrs.field(factory=_Wake)
    # A list, not a deque: it rarely holds more than an ack or two, and an empty deque
    # costs 760 bytes per session.
    control: list[Message | EncodedBody] = attrs.field(factory=list)
    update: _PushedVersion | None = None
    parts: SendsParts | None = None  # the channel, when it takes frames in two parts
    compressed: bool = False  # the agent reads compressed bodies (its capabilities)
    # True while a frame is being sent: the receiver then leaves the session's deadline
    # where it is, so a send that never completes ends the session (see `_sender`).
    sending: bool = False

    def offer(self, item: Message | EncodedBody) -> None:
        if len(self.control) >= _MAX_CONTROL:
            if not self.scope.cancel_called:
                log.warning(
                    "agent not reading its stream, closing it",
                    agent_id=self.agent.id,
                    queued=len(self.control),
                )
                self.scope.cancel()
            return
        self.control.append(item)
        self.wake.set()

    def offer_update(self, pushed: _PushedVersion) -> None:
        self.update = pushed  # replaces an older version not sent yet
        self.wake.set()


class MasterSessionHub:
    """Runs the master side of every agent session; see the module docstring."""

    def __init__(
        self,
        enrollment: Enrollment,
        *,
        assignments: AssignmentSource | None = None,
        on_message: Callable[[str, Message], Awaitable[None]] | None = None,
        heartbeat_interval: float = 30.0,
        register_timeout: float = 10.0,
        idle_intervals: float = 3.0,
        max_skew: float = MAX_SKEW,
        max_body: int = MAX_BODY,
        counters: ProtocolCounters | None = None,
        clock: Callable[[], float] = time.time,
        protocol_range: tuple[int, int] = (PROTOCOL_MIN, PROTOCOL_MAX),
        signing_key: VerifyKey | None = None,
        on_session: Callable[[SessionInfo, bool], None] | None = None,
        on_sent: Callable[[str, ConfigVersion], None] | None = None,
        material_for: Callable[[ConfigVersion], Awaitable[UpdateMaterial | None]] | None = None,
        compress: bool = True,
    ) -> None:
        self.enrollment = enrollment
        self.store = enrollment.store
        self.assignments = assignments
        self.on_message = on_message
        self.heartbeat_interval = heartbeat_interval
        self.register_timeout = register_timeout
        self.idle_timeout = heartbeat_interval * idle_intervals
        self.max_skew = max_skew
        self.max_body = max_body
        self.counters = counters if counters is not None else ProtocolCounters()
        self.clock = clock
        self.protocol_range = protocol_range
        self._sessions: dict[str, _Session] = {}
        self._states: dict[str, _AgentState] = {}
        self._pushed: dict[str, list[_PushedVersion]] = {}
        self._watches: list[_Watch] = []
        self._last_status: dict[str, ConfigStatus] = {}
        self._seq = SequenceSource(clock)
        self._changed = anyio.Event()
        self.signing_key = signing_key
        self.on_session = on_session
        self.on_sent = on_sent
        self.material_for = material_for
        self.compress = compress
        self._shared: dict[tuple[Any, ...], _PushedVersion] = {}

    # -- public API ----------------------------------------------------------------------

    @property
    def connected(self) -> list[str]:
        """Ids of the agents with an open session, sorted."""
        return sorted(self._sessions)

    @property
    def sending(self) -> bool:
        """Whether anything is queued for, or being sent to, any connected agent."""
        return any(s.update is not None or s.control or s.sending for s in self._sessions.values())

    def running(self, agent_id: str) -> tuple[int | None, str | None] | None:
        """The (version, digest) the agent last reported running, None without a session:
        `session` without building a snapshot (a reconcile asks for every agent)."""
        s = self._sessions.get(agent_id)
        return None if s is None else (s.running_version, s.running_digest)

    def session(self, agent_id: str) -> SessionInfo | None:
        s = self._sessions.get(agent_id)
        if s is None:
            return None
        return _info(s)

    def sessions(self, workspace: str | None = None) -> list[SessionInfo]:
        """Snapshots of the open sessions (of one workspace), by agent id."""
        return [
            _info(s)
            for _, s in sorted(self._sessions.items())
            if workspace is None or s.agent.workspace == workspace
        ]

    def handler(self, transport: str) -> TransportHandler:
        """The `SessionHandler` to give transport `transport` (sessions remember it)."""
        return TransportHandler(self, transport)

    def update_agent(self, agent: Agent) -> None:
        """Use `agent`'s new labels for its open session (selectors match on them)."""
        s = self._sessions.get(agent.id)
        if s is not None:
            s.agent = attrs.evolve(s.agent, labels=agent.labels)

    def offer(
        self,
        agent_id: str,
        version: ConfigVersion,
        *,
        trace: Mapping[str, str] | None = None,
        material: UpdateMaterial | None = None,
    ) -> bool:
        """Queue `version` for one connected agent (replacing an older unsent one).

        Without `material` the body is encoded (and compressed) once per version and
        trace (cached), whatever the number of agents; with it, once for this agent (its
        keys sealed for it). False when the agent is not connected here.
        """
        s = self._sessions.get(agent_id)
        if s is None:
            return False
        s.offer_update(
            _PushedVersion(version, self._agent_body(s, version, trace, material), LabelSelector())
            if material
            else self._shared_version(version, trace)
        )
        return True

    def _agent_body(
        self,
        s: _Session,
        version: ConfigVersion,
        trace: Mapping[str, str] | None,
        material: UpdateMaterial,
    ) -> EncodedBody:
        key = s.crypto.keys[s.crypto.key_id]
        update = ConfigUpdate.of(
            version,
            trace=FrozenMap(trace or {}),
            certificates=seal_certificates(material.certificates, key, agent_id=s.agent.id),
            challenges=FrozenMap(material.challenges),
        )
        return encode_body(update)

    def _shared_version(
        self, version: ConfigVersion, trace: Mapping[str, str] | None = None
    ) -> _PushedVersion:
        """The version as every agent of a rollout gets it (one rollout shares a trace)."""
        key = (version.workspace, version.number, version.digest, *sorted((trace or {}).items()))
        pushed = self._shared.get(key)
        if pushed is None:
            if len(self._shared) >= _BODY_CACHE:
                self._shared.pop(next(iter(self._shared)))
            pushed = self._shared[key] = _PushedVersion(
                version, _update_body(version, trace), LabelSelector()
            )
        return pushed

    async def wait_connected(self, count: int) -> None:
        """Return once at least `count` agents are connected (tests, benchmarks)."""
        while len(self._sessions) < count:
            self._changed = anyio.Event()
            await self._changed.wait()

    def push(
        self,
        version: ConfigVersion,
        selector: LabelSelector | None = None,
        *,
        trace: Mapping[str, str] | None = None,
        force: bool = False,
    ) -> list[str]:
        """Send `version` to every connected agent of its workspace that `selector` matches.

        Agents already running its digest are skipped unless `force`. The version is also
        remembered as what matching agents should run, so agents connecting later get it
        (unless an `AssignmentSource` was given, which then decides). Returns the ids of
        the agents it was queued for; `wait_for_status` waits for their answers.
        """
        selector = selector or LabelSelector()
        body = _update_body(version, trace)
        pushed = _PushedVersion(version, body, selector)
        history = self._pushed.setdefault(version.workspace, [])
        history[:] = [p for p in history if p.selector != selector] + [pushed]
        targets: list[str] = []
        every = not selector.match_labels  # the usual push: skip matching per agent
        for s in self._sessions.values():
            if s.agent.workspace != version.workspace or not (
                every or selector.matches(s.agent.labels)
            ):
                continue
            if not force and s.running_digest == version.digest:
                continue
            s.offer_update(pushed)
            targets.append(s.agent.id)
        log.info(
            "version pushed",
            workspace=version.workspace,
            version=version.number,
            agents=len(targets),
            bytes=len(body.data),
        )
        return targets

    async def wait_for_status(
        self, version: int, agent_ids: Iterable[str], *, final: bool = False
    ) -> dict[str, ConfigStatus]:
        """Wait until each agent reported a status for `version` (a final one if `final`).

        ``received`` is the acknowledgement of a push; ``applied``/``failed``... are final.
        Cancel with a timeout scope; returns the last status per agent.
        """
        watch = _Watch(version, set(agent_ids), final)
        for agent_id in list(watch.remaining):  # answers that came before we asked
            status = self._last_status.get(agent_id)
            if status is not None and status.version == version:
                watch.results[agent_id] = status
                if status.final or not final:
                    watch.remaining.discard(agent_id)
        if not watch.remaining:
            return watch.results
        self._watches.append(watch)
        try:
            await watch.done.wait()
        finally:
            self._watches.remove(watch)
        return watch.results

    def expect_status(
        self, version: int, agent_ids: Iterable[str], *, final: bool = True
    ) -> Callable[[], Awaitable[dict[str, ConfigStatus]]]:
        """Start watching for *new* statuses of `version` now (answers given before do not
        count: a version pushed again must be answered again); await the returned
        function to wait for them (cancel with a timeout scope)."""
        watch = _Watch(version, set(agent_ids), final)
        if not watch.remaining:
            watch.done.set()
        self._watches.append(watch)

        async def wait() -> dict[str, ConfigStatus]:
            try:
                await watch.done.wait()
            finally:
                self._watches.remove(watch)
            return watch.results

        return wait

    def send_command(self, agent_id: str, command: Command) -> bool:
        """Queue `command` for a connected agent; False when it is not connected."""
        s = self._sessions.get(agent_id)
        if s is None:
            return False
        s.offer(command)
        return True

    def disconnect(self, agent_id: str) -> bool:
        """Close the agent's stream now (it will reconnect); False when not connected."""
        s = self._sessions.pop(agent_id, None)
        if s is None:
            return False
        s.scope.cancel()  # its task says goodbye (on_session) as it ends
        self._changed.set()
        return True

    async def revoke_agent(self, agent_id: str) -> bool:
        """Revoke the agent's keys, mark it revoked and close its stream immediately."""
        revoked = await self.enrollment.revoke_agent(agent_id)
        self.disconnect(agent_id)
        log.warning("agent revoked", agent_id=agent_id)
        return revoked

    async def drain(self) -> None:
        """Ask every agent to reconnect elsewhere (before a planned shutdown)."""
        for s in list(self._sessions.values()):
            s.offer(Command(kind="drain", reason="master shutting down"))

    # -- session lifecycle ---------------------------------------------------------------

    async def __call__(self, channel: Channel, peer: str, *, transport: str = "") -> None:
        """Run one agent stream until it ends (`SessionHandler`)."""
        try:
            with anyio.fail_after(self.register_timeout):
                frame = await channel.receive()
            session = await self._register(channel, frame, peer)
            del frame  # not kept for the whole session
        except (TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError, OSError) as exc:
            log.debug("stream ended before registration", peer=peer, error=repr(exc))
            return
        if session is None:
            return
        session.transport = transport
        old = self._sessions.get(session.agent.id)
        if old is not None:
            old.scope.cancel()  # the newest stream of an agent wins
        self._sessions[session.agent.id] = session
        self._changed.set()
        self._notify(session, connected=True)
        log.debug(
            "agent connected",
            agent_id=session.agent.id,
            peer=peer,
            protocol=session.protocol_version,
        )
        session.scope.deadline = anyio.current_time() + self.idle_timeout
        try:
            with session.scope:
                try:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(self._sender, session)
                        await self._receiver(session)
                        tg.cancel_scope.cancel()
                except BaseExceptionGroup as group:
                    raise unwrap_group(group) from None
            if session.scope.cancelled_caught and (anyio.current_time() >= session.scope.deadline):
                log.warning(
                    "agent not reading its stream, closing it"
                    if session.sending
                    else "agent silent, closing its stream",
                    agent_id=session.agent.id,
                    idle_timeout=self.idle_timeout,
                )
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            log.info("agent stream broke", agent_id=session.agent.id, error=repr(exc))
        finally:
            if self._sessions.get(session.agent.id) is session:
                del self._sessions[session.agent.id]
                self._changed.set()
            self._notify(session, connected=False)
            log.debug("agent disconnected", agent_id=session.agent.id)

    def _notify(self, session: _Session, *, connected: bool) -> None:
        if self.on_session is None:
            return
        try:
            self.on_session(_info(session), connected)
        except Exception:  # an observer must not break a session
            log.exception("on_session observer failed", agent_id=session.agent.id)

    def _state(self, agent_id: str) -> _AgentState:
        state = self._states.get(agent_id)
        if state is None:
            state = _AgentState(
                guard=ReplayGuard(max_skew=self.max_skew, clock=self.clock),
                unary_guard=ReplayGuard(max_skew=self.max_skew, clock=self.clock),
                seq=SequenceSource(self.clock),
            )
            self._states[agent_id] = state
        return state

    async def _reject(
        self,
        channel: Channel,
        code: str,
        error: str,
        *,
        key: bytes | None = None,
        agent_id: str = "",
        key_id: str = "",
    ) -> None:
        response = RegisterResponse(
            accepted=False,
            code=code,
            error=error,
            server_time=self.clock(),
            protocol_min=self.protocol_range[0],
            protocol_max=self.protocol_range[1],
        )
        frame = seal(
            encode_body(response),
            agent_id=agent_id,
            key_id=key_id,
            key=key,
            seq=self._seq.next(),
            ts_ms=int(self.clock() * 1000),
        )
        log.warning("registration rejected", code=code, error=error, agent_id=agent_id or None)
        # Bounded like the registration: a peer that does not read does not hold the stream.
        with (
            anyio.move_on_after(self.register_timeout),
            contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError),
        ):
            await channel.send(frame)

    async def _register(self, channel: Channel, frame: bytes, peer: str) -> _Session | None:
        try:
            env = unseal(frame, max_body=self.max_body)
            if env.type is not MessageType.REGISTER:
                raise MalformedFrameError(
                    f"the first frame of a stream must be REGISTER, got {env.type.name}"
                )
            register = decode_body(env, max_body=self.max_body)
            assert isinstance(register, Register)
        except ProtocolError as exc:
            self.counters.count(exc)
            await self._reject(channel, "malformed", str(exc))
            return None
        try:
            version = negotiate(
                register.protocol_min, register.protocol_max, ours=self.protocol_range
            )
        except IncompatibleProtocolError as exc:
            self.counters.count(exc)
            await self._reject(channel, "protocol_incompatible", str(exc))
            return None
        if register.bootstrap_token is not None:
            return await self._enroll(channel, env, register, peer, version)
        return await self._resume(channel, env, register, peer, version)

    async def _enroll(
        self, channel: Channel, env: Envelope, register: Register, peer: str, version: int
    ) -> _Session | None:
        assert register.bootstrap_token is not None
        try:
            token_id, secret = parse_token(register.bootstrap_token)
        except EnrollmentError as exc:
            self.counters.count(exc)
            await self._reject(channel, exc.code, str(exc))
            return None
        mac_key = bootstrap_mac_key(secret)
        try:
            env.verify(mac_key)
            ReplayGuard(max_skew=self.max_skew, clock=self.clock).check_time(env, who=peer)
            enrolled = await self.enrollment.enroll(register.bootstrap_token, register)
        except (BadSignatureError, ClockSkewError) as exc:
            self.counters.count(exc)
            code = "clock_skew" if isinstance(exc, ClockSkewError) else "bad_signature"
            await self._reject(channel, code, str(exc), key=mac_key, key_id=token_id)
            return None
        except EnrollmentError as exc:
            self.counters.count(exc)
            await self._reject(channel, exc.code, str(exc), key=mac_key, key_id=token_id)
            return None
        agent, key = enrolled.agent, enrolled.key
        log.info("agent enrolled", agent_id=agent.id, token_id=token_id, labels=dict(agent.labels))
        # Register validated enroll_key as an X25519 public key; a low-order one is refused
        # here, after the token was spent (an agent sending one is not ours).
        private, public = enrollment_keypair()
        try:
            wrapping = enrollment_secret(secret, private, register.enroll_key)
        except BadSignatureError as exc:
            self.counters.count(exc)
            await self._reject(channel, "bad_signature", str(exc), key=mac_key, key_id=token_id)
            return None
        sealed = seal_key(wrapping, key.secret, aad=f"{agent.id}|{key.key_id}".encode())
        return await self._accept(
            channel,
            env,
            register,
            peer,
            version,
            agent,
            [key],
            key,
            sealed_key=sealed,
            enroll_key=public,
        )

    async def _resume(
        self, channel: Channel, env: Envelope, register: Register, peer: str, version: int
    ) -> _Session | None:
        agent_id = env.agent_id
        if register.agent_id != agent_id:
            exc: ProtocolError = MalformedFrameError("Register agent_id differs from its envelope")
            self.counters.count(exc)
            await self._reject(channel, "malformed", str(exc))
            return None
        agent = await self.store.get_agent(agent_id)
        if agent is not None and agent.status == "revoked":
            exc = UnknownKeyError(f"agent {agent_id} is revoked")
            self.counters.count(exc)
            await self._reject(
                channel,
                "agent_revoked",
                f"agent {agent_id} was revoked; enroll it again with a new bootstrap token",
                agent_id=agent_id,
            )
            return None
        keys = await self.enrollment.valid_keys(agent_id) if agent is not None else []
        used = next((k for k in keys if k.key_id == env.key_id), None)
        if agent is None or used is None:
            exc = UnknownKeyError(
                f"unknown agent {agent_id!r} or key {env.key_id!r} (expired or revoked?)"
            )
            self.counters.count(exc)
            await self._reject(channel, "unknown_key", str(exc), agent_id=agent_id)
            return None
        state = self._state(agent_id)
        try:
            env.verify(used.secret)
            state.guard.check(env, who=f"agent {agent_id}")
        except ProtocolError as exc:
            self.counters.count(exc)
            code = {"bad_signature": "bad_signature", "clock_skew": "clock_skew"}.get(
                exc.counter, "replayed"
            )
            await self._reject(
                channel, code, str(exc), key=used.secret, agent_id=agent_id, key_id=used.key_id
            )
            return None
        return await self._accept(channel, env, register, peer, version, agent, keys, used)

    async def _accept(
        self,
        channel: Channel,
        env: Envelope,
        register: Register,
        peer: str,
        version: int,
        agent: Agent,
        keys: list[AgentKey],
        used: AgentKey,
        *,
        sealed_key: str = "",
        enroll_key: str = "",
    ) -> _Session | None:
        self.counters.accepted += 1
        now = self.clock()
        state = self._state(agent.id)
        if sealed_key:  # an enrollment: its frame was signed with the bootstrap key
            state.guard.last_seq = max(state.guard.last_seq, env.seq)
        # The key the agent registered with is the one it signs with until a rotation:
        # its other valid keys verify nothing on this session (one of them would keep
        # verifying past its expiry, until the first rotation).
        crypto = SessionCrypto(
            agent_id=agent.id,
            key_id=used.key_id,
            keys={used.key_id: used.secret},
            receives_from_agent=True,
            counters=self.counters,
            seq=state.seq,
            guard=state.guard,
            clock=self.clock,
            max_body=self.max_body,
        )
        primary = keys[0]
        rotate_at = self.enrollment.rotation_due(primary)
        if used.key_id != primary.key_id:
            rotate_at = now  # the agent missed a rotation: hand it the primary again
        agent = attrs.evolve(
            agent,
            status="online",
            nginx_version=register.nginx_version,
            deployment_mode=register.deployment_mode,
            running_version=register.running_version,
            running_digest=register.running_digest,
            last_seen=now,
        )
        await self.store.upsert_agent(agent)
        session = _Session(
            agent=agent,
            channel=channel,
            crypto=crypto,
            peer=peer,
            protocol_version=version,
            connected_at=now,
            rotate_at=rotate_at,
            key_expires_at=used.expires_at,
            running_version=register.running_version,
            running_digest=register.running_digest,
            last_seen=now,
            parts=channel if isinstance(channel, SendsParts) else None,
            compressed=self.compress and COMPRESSION_CAPABILITY in register.capabilities,
        )
        response = RegisterResponse(
            accepted=True,
            protocol_version=version,
            agent_id=agent.id,
            key_id=used.key_id,
            sealed_key=sealed_key,
            key_expires_at=used.expires_at,
            labels=agent.labels,
            heartbeat_interval=self.heartbeat_interval,
            server_time=now,
            protocol_min=self.protocol_range[0],
            protocol_max=self.protocol_range[1],
            signing_key=self.signing_key.to_base64() if self.signing_key else "",
            signing_key_id=self.signing_key.key_id if self.signing_key else "",
            enroll_key=enroll_key,
        )
        with anyio.fail_after(self.register_timeout):  # no session deadline yet
            await channel.send(crypto.seal(response))
        await self._resync(session)
        return session

    async def _resync(self, session: _Session) -> None:
        """Send the agent its desired version when it runs something else.

        "Something else" is another digest, or the same content under another version
        number (a rollback): the agent applies the latter as a no-op and reports the
        version it now runs.
        """
        desired = await self._desired_for(session.agent)
        if desired is None or (
            desired.version.digest == session.running_digest
            and desired.version.number == session.running_version
        ):
            return
        if self.material_for is not None:
            material = await self.material_for(desired.version)
            if material:
                body = self._agent_body(session, desired.version, None, material)
                desired = _PushedVersion(desired.version, body, desired.selector)
        session.offer_update(desired)

    async def _desired_for(self, agent: Agent) -> _PushedVersion | None:
        if self.assignments is not None:
            version = await self.assignments.desired_for(agent)
            if version is None:
                return None
            for pushed in self._pushed.get(version.workspace, ()):
                if pushed.version.digest == version.digest:
                    return pushed
            return self._shared_version(version)
        best: _PushedVersion | None = None
        for pushed in self._pushed.get(agent.workspace, ()):
            if pushed.selector.matches(agent.labels) and (
                best is None or pushed.version.number > best.version.number
            ):
                best = pushed
        return best

    # -- the two loops -------------------------------------------------------------------

    async def _sender(self, s: _Session) -> None:
        """Send what is queued — commands and acks first, then the newest version — and
        rotate the key when the receiver says it is due.

        A send has until the session's deadline to complete, which the receiver does not
        move while `sending` (at least half the idle timeout, at most all of it): an
        agent that stops reading is closed even while its own frames keep coming. The
        deadline, not a scope per send: a scope costs ~7 µs per frame, per agent, in
        every push; a flag costs nothing.
        """
        while True:
            await s.wake.wait()
            if self.clock() >= s.rotate_at:
                await self._rotate(s)
            while s.control:
                item = s.control.pop(0)
                frame = s.crypto.seal(item)
                s.sending = True
                await s.channel.send(frame)
                s.sending = False
                if isinstance(item, Command) and item.kind == "drain":
                    await anyio.sleep(0.5)  # let it arrive before the agent is gone
                    s.scope.cancel()
            if s.update is not None:
                pushed, s.update = s.update, None
                body = pushed.wire(s.compressed)
                head = s.crypto.seal_parts(body)
                s.sending = True
                if s.parts is not None:
                    await s.parts.send_parts(head, body.data)
                else:
                    await s.channel.send(head + body.data)
                s.sending = False
                if self.on_sent is not None:
                    try:
                        self.on_sent(s.agent.id, pushed.version)
                    except Exception:  # an observer must not break a session
                        log.exception("on_sent observer failed", agent_id=s.agent.id)

    async def _rotate(self, s: _Session) -> None:
        key = await self.enrollment.new_key(s.agent.id)
        current = s.crypto.keys[s.crypto.key_id]
        command = Command(
            kind="rotate_key",
            reason="scheduled rotation at half the key lifetime",
            new_key_id=key.key_id,
            sealed_key=seal_key(current, key.secret, aad=f"{s.agent.id}|{key.key_id}".encode()),
            key_expires_at=key.expires_at,
        )
        # Sent under the current key; everything after it under the new one. The agent
        # keeps accepting both, and so do we until the old key expires (or, expired
        # already, for a grace): the agent signs with the new key from this command on,
        # so a key older than the current one must verify nothing more.
        frame = s.crypto.seal(command)
        s.sending = True
        await s.channel.send(frame)
        s.sending = False
        s.crypto.keys = {s.crypto.key_id: current, key.key_id: key.secret}
        s.crypto.retiring = (
            s.crypto.key_id,
            max(s.key_expires_at, self.clock() + _ROTATION_GRACE),
        )
        s.crypto.key_id = key.key_id
        s.key_expires_at = key.expires_at
        s.rotate_at = self.enrollment.rotation_due(key)
        log.info("agent key rotated", agent_id=s.agent.id, key_id=key.key_id)

    async def _receiver(self, s: _Session) -> None:
        """Verify and dispatch every frame; end the session on distrust.

        Silence is the deadline of the session's scope, moved forward lazily (when less
        than half the idle timeout is left), not a timeout per frame: at thousands of
        agents a scope per frame is measurable. It is not moved while a send is in
        progress (`_Session.sending`): that is the sender's timeout. Frames also drive key
        rotation: the agent's heartbeats guarantee one at least every interval.
        """
        bad = 0
        scope = s.scope
        while True:
            try:
                frame = await s.channel.receive()
            except anyio.EndOfStream:
                return
            now = anyio.current_time()
            if not s.sending and scope.deadline - now < self.idle_timeout / 2:
                scope.deadline = now + self.idle_timeout
            try:
                env, message = s.crypto.open(frame)
            except (BadSignatureError, UnknownKeyError) as exc:
                log.warning("untrusted frame, closing stream", agent_id=s.agent.id, error=str(exc))
                return
            except ProtocolError as exc:
                bad += 1
                log.warning("frame rejected", agent_id=s.agent.id, error=str(exc))
                seq = _seq_of(frame)
                if seq is not None:
                    s.offer(Ack(seq=seq, ok=False, error=str(exc)[:4000]))
                if bad >= _MAX_BAD_FRAMES:
                    return
                continue
            s.last_seen = self.clock()
            if s.last_seen >= s.rotate_at:
                s.wake.set()
            await self._dispatch(s, env, message)

    async def _dispatch(self, s: _Session, env: Envelope, message: Message) -> None:
        if isinstance(message, ConfigStatus):
            self._on_status(s, message)
            if message.final:
                s.offer(Ack(seq=env.seq))
        elif isinstance(message, Heartbeat):
            if message.running_digest is not None and message.running_digest != s.running_digest:
                s.running_version, s.running_digest = (
                    message.running_version,
                    message.running_digest,
                )
                await self._resync(s)
            s.offer(Ack(seq=env.seq))
        elif isinstance(message, _ACKED):
            s.offer(Ack(seq=env.seq))
        else:  # a second Register on an open stream
            s.offer(Ack(seq=env.seq, ok=False, error=f"unexpected {env.type.name}"))
            return
        if self.on_message is not None:
            await self.on_message(s.agent.id, message)

    def _on_status(self, s: _Session, status: ConfigStatus) -> None:
        self._last_status[s.agent.id] = status
        if status.phase in ("applied", "noop"):
            s.running_version, s.running_digest = status.version, status.digest
        for watch in self._watches:
            if watch.version != status.version or s.agent.id not in watch.remaining:
                continue
            watch.results[s.agent.id] = status
            if status.final or not watch.final:
                watch.remaining.discard(s.agent.id)
                if not watch.remaining:
                    watch.done.set()

    # -- unary reports (transports with a side channel, e.g. gRPC ReportHealth) ----------

    async def handle_unary(self, frame: bytes, peer: str) -> bytes:
        """Verify one health/metrics/log frame sent outside the stream; return a sealed Ack.

        Unary reports travel on their own HTTP/2 streams and may overtake stream frames,
        so they have their own replay guard (seq still increases within each lane).
        """
        try:
            env = unseal(frame, max_body=self.max_body)
        except ProtocolError as exc:
            self.counters.count(exc)
            return self._unsigned_ack(0, str(exc))
        s = self._sessions.get(env.agent_id)
        if env.type not in _REPORT_TYPES or s is None:
            refused = MalformedFrameError(
                f"{env.type.name} is not a report" if s else "no open session for this agent"
            )
            self.counters.count(refused)
            return self._unsigned_ack(env.seq, str(refused))
        try:
            env, message = s.crypto.open(frame, guard=self._state(s.agent.id).unary_guard)
        except ProtocolError as exc:  # counted by open()
            return self._unsigned_ack(env.seq, str(exc))
        s.last_seen = self.clock()
        if self.on_message is not None:
            await self.on_message(s.agent.id, message)
        return s.crypto.seal(Ack(seq=env.seq))

    def _unsigned_ack(self, seq: int, error: str) -> bytes:
        return seal(
            encode_body(Ack(seq=seq, ok=False, error=error[:4000])),
            agent_id="",
            key_id="",
            key=None,
            seq=self._seq.next(),
            ts_ms=int(self.clock() * 1000),
        )


class TransportHandler:
    """The hub as one transport's `SessionHandler` (and `UnaryHandler`): sessions it runs
    remember the transport's name (metrics, APIs)."""

    def __init__(self, hub: MasterSessionHub, transport: str) -> None:
        self.hub = hub
        self.transport = transport

    def __call__(self, channel: Channel, peer: str) -> Coroutine[Any, Any, None]:
        # The hub's coroutine itself, not one awaiting it: a frame less per session.
        return self.hub(channel, peer, transport=self.transport)

    async def handle_unary(self, frame: bytes, peer: str) -> bytes:
        return await self.hub.handle_unary(frame, peer)


def _update_body(version: ConfigVersion, trace: Mapping[str, str] | None) -> EncodedBody:
    """The `ConfigUpdate` every agent gets for `version` (no per-agent material)."""
    return encode_body(ConfigUpdate.of(version, trace=FrozenMap(trace or {})))


def _info(s: _Session) -> SessionInfo:
    return SessionInfo(
        agent_id=s.agent.id,
        peer=s.peer,
        labels=s.agent.labels,
        workspace=s.agent.workspace,
        transport=s.transport,
        protocol_version=s.protocol_version,
        key_id=s.crypto.key_id,
        running_version=s.running_version,
        running_digest=s.running_digest,
        connected_at=s.connected_at,
        last_seen=s.last_seen,
    )


def _seq_of(frame: bytes) -> int | None:
    try:
        return unseal(frame).seq
    except ProtocolError:
        return None
