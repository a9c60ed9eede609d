"""Transport-agnostic master↔agent messages, their encoding, signing and negotiation.

Transports carry opaque frames (`nxmesh.core.interfaces.Channel`); everything that makes
a frame trustworthy lives here and in `nxmesh.core.envelope`, so every transport gets
signing, sequencing and replay protection for free and one contract suite tests them all.

Messages (attrs, frozen):

==================  =========  =============================================================
message             direction  purpose
==================  =========  =============================================================
`Register`          agent→     first frame of a stream: enrol with a bootstrap token, or
                               resume as an enrolled agent; running version + digest
`ConfigStatus`      agent→     progress of one version: received, applied, failed...
`HealthReport`      agent→     the model's `nxmesh.core.model.HealthReport`
`MetricsBatch`      agent→     numeric samples
`LogBatch`          agent→     log lines worth shipping to the master
`Heartbeat`         agent→     liveness every ``heartbeat_interval`` (default 30 s)
`RegisterResponse`  →agent     accepted (negotiated protocol, credentials) or rejected
`ConfigUpdate`      →agent     a version to apply: number, digest, Ed25519 signature, state
`Command`           →agent     resync, reload, rotate_key (carries the new key), drain
`Ack`               →agent     receipt of one agent frame (by seq), ok or an error
==================  =========  =============================================================

Bodies are canonical JSON (`nxmesh.core.serialization.canonical_json`): sorted keys, no
whitespace, UTF-8, so they are deterministic and the state inside a ConfigUpdate hashes
to the version digest. See ``docs/protocol.md`` for the whole protocol.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import time
import zlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from nxmesh.core import validation as v
from nxmesh.core.envelope import (
    MAX_SKEW,
    BadSignatureError,
    EncodedBody,
    Envelope,
    MacKey,
    MalformedFrameError,
    MessageType,
    ProtocolCounters,
    ProtocolError,
    ReplayGuard,
    SequenceSource,
    seal_parts,
    unseal,
)
from nxmesh.core.errors import ValidationError
from nxmesh.core.model import (
    ConfigVersion,
    DesiredState,
    FrozenMap,
    HealthReport,
    PendingApply,
    TlsCertificate,
)
from nxmesh.core.serialization import canonical_json, structure

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )

__all__ = [
    "COMPRESSION_CAPABILITY",
    "MAX_BODY",
    "MAX_REGISTER_BODY",
    "MAX_SKEW",
    "PROTOCOL_MAX",
    "PROTOCOL_MIN",
    "Ack",
    "Command",
    "CommandKind",
    "ConfigPhase",
    "ConfigStatus",
    "ConfigUpdate",
    "EnrollmentError",
    "Heartbeat",
    "IncompatibleProtocolError",
    "LogBatch",
    "LogEntry",
    "Message",
    "MetricsBatch",
    "Register",
    "RegisterResponse",
    "RejectedError",
    "SessionCrypto",
    "UndecodableBodyError",
    "UnknownKeyError",
    "body_bytes",
    "bootstrap_mac_key",
    "compress_body",
    "decode_body",
    "encode_body",
    "encode_received",
    "enrollment_keypair",
    "enrollment_secret",
    "message_type",
    "negotiate",
    "open_certificates",
    "open_key",
    "seal_certificates",
    "seal_key",
]

PROTOCOL_MIN: Final = 1
"""Oldest message-schema version this code speaks."""
PROTOCOL_MAX: Final = 1
"""Newest message-schema version this code speaks."""

MAX_BODY: Final = 16 * 1024 * 1024
"""Default bound of a message body in bytes, as sent and once inflated."""

MAX_REGISTER_BODY: Final = 64 * 1024
"""Bound of a `Register` body in bytes. It is decoded before anything authenticates it
(its key may come from the token inside), so a master must not parse megabytes of JSON
for anyone who connects. The largest valid one (64 labels, 64 capabilities, every text
at its maximum) is about 40 KB."""

COMPRESSION_CAPABILITY: Final = "body:zlib"
"""In `Register.capabilities`: the agent reads zlib-compressed bodies (`compress_body`);
the master then sends it versions compressed. Agents of this code always announce it."""

# Compress only what gains: below this a body is sent as it is, and a body that shrinks
# by less than an eighth is not worth the receiver's inflating.
_COMPRESS_MIN: Final = 1024

_U63: Final = 2**63 - 1


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


class IncompatibleProtocolError(ProtocolError):
    """Master and agent share no protocol version; the message says which side to upgrade."""

    counter = "incompatible"


class UnknownKeyError(ProtocolError):
    """A frame names an agent or key id the receiver does not hold (or holds revoked)."""

    counter = "unknown_key"


class UndecodableBodyError(MalformedFrameError):
    """A frame that passed every check (signature, key, replay) whose body does not
    decode: the peer speaks a newer schema (a field this side does not know), or is
    broken. `env` is the verified frame, so the receiver can still answer about it (an
    agent reports the version it cannot read as failed instead of dropping it)."""

    def __init__(self, message: str, env: Envelope) -> None:
        super().__init__(message)
        self.env = env


class RejectedError(ProtocolError):
    """The master refused a Register; `code` is machine-readable, `final` means: stop retrying.

    Codes: ``token_invalid``, ``token_used``, ``token_expired``, ``token_revoked``,
    ``labels_conflict``, ``agent_revoked``, ``unknown_key``, ``protocol_incompatible``,
    ``clock_skew``, ``bad_signature``, ``malformed``, ``internal``.
    """

    counter = "rejected_enrollment"
    FINAL_CODES: Final = frozenset(
        {
            "token_invalid",
            "token_used",
            "token_expired",
            "token_revoked",
            "labels_conflict",
            "agent_revoked",
            "protocol_incompatible",
        }
    )

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)

    @property
    def final(self) -> bool:
        return self.code in self.FINAL_CODES


class EnrollmentError(RejectedError):
    """A bootstrap token was refused: unknown, wrong secret, used, expired or revoked."""


# ---------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------


def _freeze(data: Mapping[str, Any]) -> FrozenMap[str, Any]:
    return data if isinstance(data, FrozenMap) else FrozenMap(data)


def _opt_text(rule: v.TextRule) -> Any:
    return v.text(rule, optional=True)


_ACME_TEXT: Final = re.compile(r"[A-Za-z0-9_.-]{1,512}", re.ASCII)


def _challenges(_inst: object, _attribute: object, value: Mapping[str, str]) -> None:
    """HTTP-01 token → key authorization: base64url text only (a token names a file)."""
    if len(value) > 256:
        raise ValueError(f"challenges: {len(value)} entries; at most 256 are allowed")
    for token, auth in value.items():
        for text in (token, auth):
            if not isinstance(text, str) or _ACME_TEXT.fullmatch(text) is None:
                raise ValueError("challenges must map base64url tokens to key authorizations")


@attrs.frozen(kw_only=True)
class Register:
    """First frame of every stream, from the agent.

    Exactly one of `bootstrap_token` (``id.secret``, first contact) and `agent_id`
    (an enrolled agent resuming) is set; with a token, `enroll_key` is the agent's
    ephemeral X25519 public key for this enrollment (`enrollment_keypair`).
    `running_version`/`running_digest` are what the agent's nginx runs now: the master
    resends its desired version only when they differ.
    """

    protocol_min: int = attrs.field(default=PROTOCOL_MIN, validator=v.int_range(1, 65535))
    protocol_max: int = attrs.field(default=PROTOCOL_MAX, validator=v.int_range(1, 65535))
    bootstrap_token: str | None = attrs.field(
        default=None, repr=False, validator=_opt_text(v.TOKEN)
    )
    agent_id: str | None = attrs.field(default=None, validator=_opt_text(v.TOKEN))
    name: str = attrs.field(default="agent", validator=v.text(v.TOKEN))
    labels: Mapping[str, str] = attrs.field(
        factory=FrozenMap, converter=_freeze, validator=v.labels()
    )
    nginx_version: str | None = attrs.field(default=None, validator=_opt_text(v.TOKEN))
    deployment_mode: str | None = attrs.field(default=None, validator=_opt_text(v.TOKEN))
    capabilities: tuple[str, ...] = attrs.field(
        default=(), validator=v.each(v.TOKEN, hi=64, noun="capability")
    )
    agent_version: str = attrs.field(default="", validator=v.text(v.KEY_ID))
    running_version: int | None = attrs.field(
        default=None, validator=v.int_range(0, _U63, optional=True)
    )
    running_digest: str | None = attrs.field(default=None, validator=_opt_text(v.DIGEST))
    enroll_key: str = attrs.field(default="", validator=v.text(v.SIGNATURE))

    def __attrs_post_init__(self) -> None:
        if (self.bootstrap_token is None) == (self.agent_id is None):
            raise ValueError("Register carries exactly one of bootstrap_token and agent_id")
        if self.bootstrap_token is not None and _public_key(self.enroll_key) is None:
            raise ValueError(
                "Register with a bootstrap_token needs enroll_key: the agent's X25519 "
                "public key, base64 of 32 bytes"
            )


@attrs.frozen(kw_only=True)
class RegisterResponse:
    """The master's answer to `Register`.

    Accepted: the negotiated `protocol_version`, the agent's id and key id, and — on
    enrollment only — `sealed_key`: the new session key, AES-GCM-sealed (`seal_key`) under
    the bootstrap secret *and* the X25519 secret of the agent's `Register.enroll_key` and
    this response's `enroll_key` (`enrollment_secret`). The token travels in `Register`,
    so on a connection without TLS an eavesdropper learns it; the session key still
    needs one of the two ephemeral private keys, which never leave their processes.
    Rejected: `code` and `error`, plus the master's supported range and clock so the agent
    can say precisely what is wrong.
    """

    accepted: bool = attrs.field(validator=v.choice(True, False))
    protocol_version: int = attrs.field(default=0, validator=v.int_range(0, 65535))
    agent_id: str = attrs.field(default="", validator=v.text(v.KEY_ID))
    key_id: str = attrs.field(default="", validator=v.text(v.KEY_ID))
    sealed_key: str = attrs.field(default="", repr=False, validator=v.text(v.SIGNATURE))
    key_expires_at: float = attrs.field(default=0.0, validator=v.finite())
    labels: Mapping[str, str] = attrs.field(
        factory=FrozenMap, converter=_freeze, validator=v.labels()
    )
    heartbeat_interval: float = attrs.field(default=30.0, validator=v.finite(minimum=0.01))
    server_time: float = attrs.field(default=0.0, validator=v.finite())
    protocol_min: int = attrs.field(default=PROTOCOL_MIN, validator=v.int_range(1, 65535))
    protocol_max: int = attrs.field(default=PROTOCOL_MAX, validator=v.int_range(1, 65535))
    code: str = attrs.field(default="", validator=v.text(v.KEY_ID))
    error: str = attrs.field(default="", validator=v.text(v.LOG_TEXT))
    signing_key: str = attrs.field(default="", validator=v.text(v.SIGNATURE))
    """Accepted: the master's Ed25519 public key (base64 of the raw 32 bytes) that signs
    every `ConfigUpdate`; the agent pins it at enrollment."""
    signing_key_id: str = attrs.field(default="", validator=v.text(v.KEY_ID))
    enroll_key: str = attrs.field(default="", validator=v.text(v.SIGNATURE))
    """Enrollment only: the master's ephemeral X25519 public key (base64 of 32 bytes)."""


@attrs.frozen(kw_only=True)
class ConfigUpdate:
    """A config version for the agent: verify `signature` and `digest`, then apply `state`.

    It carries the `ConfigVersion` whole — its metadata (`parent_digest`, `author`,
    `message`, `created_at`) included — so the agent rebuilds
    `nxmesh.config.versions.signing_payload` and checks the master's signature over it,
    and checks `digest` over the received canonical `state`: one signature, made once
    when the version is stored, verified on every agent (``nxmesh.agent.verify``).
    `trace` carries W3C trace context (``traceparent``, ``tracestate``) so the agent's
    apply spans join the master's rollout trace. `certificates` are the ones this agent's
    sites use, each private key sealed under the agent's session key
    (`seal_certificates`), and `challenges` the pending ACME HTTP-01 tokens of its domains;
    both are per agent and outside the signature (they change without a new version when a
    certificate is renewed).
    """

    version: int = attrs.field(validator=v.int_range(1, _U63))
    digest: str = attrs.field(validator=v.text(v.DIGEST))
    signature: str = attrs.field(default="", validator=v.text(v.SIGNATURE))
    signing_key_id: str = attrs.field(default="", validator=v.text(v.KEY_ID))
    workspace: str = attrs.field(default="default", validator=v.text(v.NAME))
    parent_digest: str | None = attrs.field(default=None, validator=_opt_text(v.DIGEST))
    author: str = attrs.field(default="", validator=v.text(v.LOG_TEXT))
    message: str = attrs.field(default="", validator=v.text(v.LOG_TEXT))
    created_at: float = attrs.field(default=0.0, validator=v.finite())
    state: DesiredState
    trace: Mapping[str, str] = attrs.field(factory=FrozenMap, converter=_freeze)
    certificates: tuple[TlsCertificate, ...] = attrs.field(
        default=(), validator=v.count(TlsCertificate, hi=1024, noun="certificate"), repr=False
    )
    challenges: Mapping[str, str] = attrs.field(
        factory=FrozenMap, converter=_freeze, validator=_challenges, repr=False
    )

    @classmethod
    def of(
        cls,
        version: ConfigVersion,
        *,
        trace: Mapping[str, str] = FrozenMap(),
        certificates: tuple[TlsCertificate, ...] = (),
        challenges: Mapping[str, str] = FrozenMap(),
    ) -> ConfigUpdate:
        return cls(
            version=version.number,
            digest=version.digest,
            signature=version.signature,
            signing_key_id=version.key_id,
            workspace=version.workspace,
            parent_digest=version.parent_digest,
            author=version.author,
            message=version.message,
            created_at=version.created_at,
            state=version.state,
            trace=trace,
            certificates=certificates,
            challenges=challenges,
        )

    def to_pending(self) -> PendingApply:
        """What the agent's apply pipeline takes."""
        return PendingApply(
            version=self.version,
            digest=self.digest,
            state=self.state,
            signature=self.signature,
            key_id=self.signing_key_id,
            parent_digest=self.parent_digest,
            author=self.author,
            message=self.message,
            created_at=self.created_at,
            trace=self.trace,
            certificates=self.certificates,
            challenges=self.challenges,
        )


ConfigPhase: TypeAlias = Literal[
    "received", "applying", "applied", "failed", "rolled_back", "noop", "vetoed"
]
_PHASES: Final = ("received", "applying", "applied", "failed", "rolled_back", "noop", "vetoed")


@attrs.frozen(kw_only=True)
class ConfigStatus:
    """Where one version stands on the agent; ``received`` is the push acknowledgement."""

    version: int = attrs.field(validator=v.int_range(0, _U63))
    digest: str = attrs.field(validator=v.text(v.DIGEST))
    phase: ConfigPhase = attrs.field(validator=v.choice(*_PHASES))
    error: str = attrs.field(default="", validator=v.text(v.LOG_TEXT))
    nginx_output: str = attrs.field(default="", validator=v.text(v.LOG_TEXT))
    durations: Mapping[str, float] = attrs.field(
        factory=FrozenMap, converter=_freeze, validator=v.metrics(hi=64)
    )

    @property
    def final(self) -> bool:
        """True once the agent is done with this version (any outcome)."""
        return self.phase not in ("received", "applying")


@attrs.frozen(kw_only=True)
class MetricsBatch:
    """Numeric samples taken at `ts` (names like ``nginx.requests``)."""

    ts: float = attrs.field(validator=v.finite())
    samples: Mapping[str, float] = attrs.field(
        factory=FrozenMap, converter=_freeze, validator=v.metrics(hi=4096)
    )


@attrs.frozen(kw_only=True)
class LogEntry:
    ts: float = attrs.field(validator=v.finite())
    level: Literal["debug", "info", "warning", "error", "critical"] = attrs.field(
        validator=v.choice("debug", "info", "warning", "error", "critical")
    )
    message: str = attrs.field(validator=v.text(v.LOG_TEXT))
    source: str = attrs.field(default="agent", validator=v.text(v.CHECK_NAME))


@attrs.frozen(kw_only=True)
class LogBatch:
    entries: tuple[LogEntry, ...] = attrs.field(validator=v.count(LogEntry, hi=1024, noun="entry"))


@attrs.frozen(kw_only=True)
class Heartbeat:
    """Liveness from the agent; the master answers with an `Ack`."""

    running_version: int | None = attrs.field(
        default=None, validator=v.int_range(0, _U63, optional=True)
    )
    running_digest: str | None = attrs.field(default=None, validator=_opt_text(v.DIGEST))


CommandKind: TypeAlias = Literal["resync", "reload", "rotate_key", "drain"]


@attrs.frozen(kw_only=True)
class Command:
    """An instruction to the agent.

    ``resync``: send your running version again (the master then resends on mismatch);
    ``reload``: reload nginx; ``drain``: close the stream and reconnect later (the master
    is shutting down or rebalancing); ``rotate_key``: switch to `new_key_id`, whose key is
    in `sealed_key` (sealed under the *current* session key).
    """

    kind: CommandKind = attrs.field(validator=v.choice("resync", "reload", "rotate_key", "drain"))
    reason: str = attrs.field(default="", validator=v.text(v.LOG_TEXT))
    new_key_id: str = attrs.field(default="", validator=v.text(v.KEY_ID))
    sealed_key: str = attrs.field(default="", repr=False, validator=v.text(v.SIGNATURE))
    key_expires_at: float = attrs.field(default=0.0, validator=v.finite())


@attrs.frozen(kw_only=True)
class Ack:
    """Receipt of the agent frame with sequence number `seq`."""

    seq: int = attrs.field(validator=v.int_range(0, 2**64 - 1))
    ok: bool = attrs.field(default=True, validator=v.choice(True, False))
    error: str = attrs.field(default="", validator=v.text(v.LOG_TEXT))


Message: TypeAlias = (
    Register
    | ConfigStatus
    | HealthReport
    | MetricsBatch
    | LogBatch
    | Heartbeat
    | RegisterResponse
    | ConfigUpdate
    | Command
    | Ack
)

_CLASSES: Final[dict[MessageType, type[Any]]] = {
    MessageType.REGISTER: Register,
    MessageType.CONFIG_STATUS: ConfigStatus,
    MessageType.HEALTH_REPORT: HealthReport,
    MessageType.METRICS_BATCH: MetricsBatch,
    MessageType.LOG_BATCH: LogBatch,
    MessageType.HEARTBEAT: Heartbeat,
    MessageType.REGISTER_RESPONSE: RegisterResponse,
    MessageType.CONFIG_UPDATE: ConfigUpdate,
    MessageType.COMMAND: Command,
    MessageType.ACK: Ack,
}
_TYPES: Final[dict[type[Any], MessageType]] = {cls: t for t, cls in _CLASSES.items()}

# Messages made of scalars and flat mappings only, each field type-checked by its own
# validator: for them ``cls(**data)`` accepts exactly what the converter accepts, at half
# the cost — they are the ones a master receives from every agent on every push.
_FLAT: Final = frozenset({ConfigStatus, Heartbeat, Ack, MetricsBatch, Command, RegisterResponse})

# During a push thousands of agents send byte-identical bodies (the same version, digest
# and phase; the same heartbeat). Decoding is a pure function of the bytes and messages
# are immutable, so those are decoded once and shared.
_SHARED: Final = frozenset({MessageType.CONFIG_STATUS, MessageType.HEARTBEAT})
_SHARED_MAX_BODY: Final = 512
_SHARED_MAX_ENTRIES: Final = 1024
_decoded: dict[tuple[MessageType, bytes], Message] = {}


def message_type(message: Message) -> MessageType:
    return _TYPES[type(message)]


def _mapping_fields(cls: type[Any]) -> frozenset[str]:
    return frozenset(a.name for a in attrs.fields(cls) if a.converter is _freeze)


_MAPPING_FIELDS: Final = {cls: _mapping_fields(cls) for cls in _FLAT}


def _is_mapping_field(cls: type[Any], name: str) -> bool:
    return name in _MAPPING_FIELDS[cls]


def encode_body(message: Message) -> EncodedBody:
    """Canonical JSON of `message`, with its type and digest, ready to `seal` (many times)."""
    return EncodedBody.of(_TYPES[type(message)], canonical_json(message))


def _received_template() -> tuple[bytes, bytes, bytes]:
    """The canonical JSON of a ``received`` `ConfigStatus` cut around its two variable
    values, taken from `encode_body` itself so it follows the message's fields."""
    digest, version = "nxmesh-digest-placeholder", 8_642_097_531
    data = encode_body(ConfigStatus(version=version, digest=digest, phase="received")).data
    head, rest = data.split(digest.encode())
    middle, tail = rest.split(b"%d" % version)
    return head, middle, tail


_RECEIVED: Final = _received_template()


def encode_received(version: int, digest: str) -> EncodedBody:
    """``encode_body(ConfigStatus(version=version, digest=digest, phase="received"))``,
    byte for byte, without building the message: the acknowledgement every agent sends
    for every version pushed to it.

    The two values are validated as the message would validate them. A digest the rule
    accepts needs no JSON escaping (letters, digits and ``:._-``), so it is spliced into
    the canonical encoding as it is. Anything the rule refuses takes the message's own
    path, which raises naming the field.
    """
    if (
        type(version) is int
        and 0 <= version <= _U63
        and type(digest) is str
        and v.DIGEST.reason(digest) is None
    ):
        head, middle, tail = _RECEIVED
        data = b"".join((head, digest.encode("ascii"), middle, b"%d" % version, tail))
        return EncodedBody.of(MessageType.CONFIG_STATUS, data)
    return encode_body(ConfigStatus(version=version, digest=digest, phase="received"))


def compress_body(body: EncodedBody) -> EncodedBody:
    """`body` as a zlib stream (flagged `envelope.COMPRESSED`), or `body` itself when it
    is small or does not shrink by an eighth.

    For the master's versions: compressed once per version like the encoding, it is what
    most of a push costs per agent that shrinks — TLS, HTTP/2 framing, copies and the
    receiver's hashing of the body. Canonical JSON of a desired state (every field, sorted
    keys, many alike sites) typically shrinks 10x or more.
    """
    if body.compressed or len(body.data) < _COMPRESS_MIN:
        return body
    packed = zlib.compress(body.data, 6)
    if len(packed) > len(body.data) - len(body.data) // 8:
        return body
    return EncodedBody.of(body.type, packed, compressed=True)


def body_bytes(env: Envelope, *, max_body: int = MAX_BODY) -> bytes:
    """The body of `env` as encoded (canonical JSON): inflated when it came compressed,
    never beyond `max_body` bytes (`MalformedFrameError` otherwise).

    Only a `ConfigUpdate` may come compressed, and its envelope is verified before it is
    decoded. Other bodies are refused compressed: a `Register` (and its response) is
    decoded before its signature can be checked, and inflating it would let anyone make
    the receiver allocate `max_body` for a few kilobytes sent.
    """
    if not env.compressed:
        return env.body
    if env.type is not MessageType.CONFIG_UPDATE:
        raise MalformedFrameError(f"{env.type.name} bodies are never sent compressed")
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(env.body, max_body + 1)
    except zlib.error as exc:
        raise MalformedFrameError(f"{env.type.name} body does not inflate: {exc}") from None
    if len(data) > max_body or inflater.unconsumed_tail:
        raise MalformedFrameError(f"{env.type.name} body inflates beyond the {max_body} byte limit")
    if not inflater.eof or inflater.unused_data:
        raise MalformedFrameError(f"{env.type.name} body is not one whole zlib stream")
    return data


def decode_body(env: Envelope, *, max_body: int = MAX_BODY) -> Message:
    """The message inside `env`; `MalformedFrameError` naming every problem otherwise.

    `Register` is the one message sent before versions are negotiated, so unknown keys in
    it are ignored (a newer agent may send more); every other message is strict. It is
    also decoded before anything authenticates it: a body over `MAX_REGISTER_BODY` is
    refused unparsed. A compressed body is inflated up to `max_body` bytes (`body_bytes`).
    """
    if env.type is MessageType.REGISTER and len(env.body) > MAX_REGISTER_BODY:
        raise MalformedFrameError(
            f"REGISTER body of {len(env.body)} bytes exceeds the {MAX_REGISTER_BODY} byte "
            "limit of a registration (refused before it is parsed)"
        )
    if env.compressed:
        env = env._replace(body=body_bytes(env, max_body=max_body), compressed=False)
    shared = env.type in _SHARED and len(env.body) <= _SHARED_MAX_BODY
    if shared:
        known = _decoded.get((env.type, env.body))
        if known is not None:
            return known
    message = _decode(env)
    if shared:
        if len(_decoded) >= _SHARED_MAX_ENTRIES:
            _decoded.clear()
        _decoded[(env.type, env.body)] = message
    return message


_PROBLEMS_TEXT: Final = 4000
"""Characters of a decoding error kept: it is logged and sent back in an Ack, and a peer
can make one frame hold thousands of problems."""


def _clipped(text: str) -> str:
    if len(text) <= _PROBLEMS_TEXT:
        return text
    return f"{text[:_PROBLEMS_TEXT]}... [{len(text) - _PROBLEMS_TEXT} more characters]"


def _decode(env: Envelope) -> Message:
    try:
        data = json.loads(env.body)
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, nested too deeply
        raise MalformedFrameError(f"{env.type.name} body is not JSON: {exc}") from None
    cls = _CLASSES[env.type]
    if cls is Register and isinstance(data, dict):
        known = {a.name for a in attrs.fields(Register)}
        data = {k: val for k, val in data.items() if k in known}
    if (
        cls in _FLAT
        and isinstance(data, dict)
        and all(isinstance(val, dict) == _is_mapping_field(cls, k) for k, val in data.items())
    ):
        try:
            fast: Message = cls(**data)
        except Exception:  # noqa: S110 - the converter below explains what is wrong
            pass
        else:
            return fast
    try:
        message: Message = structure(data, cls)
    except (ValidationError, ValueError) as exc:  # ValueError: __attrs_post_init__ rules
        raise MalformedFrameError(_clipped(f"invalid {env.type.name}: {exc}")) from None
    return message


# ---------------------------------------------------------------------------------------
# Negotiation
# ---------------------------------------------------------------------------------------


def negotiate(
    peer_min: int, peer_max: int, *, ours: tuple[int, int] = (PROTOCOL_MIN, PROTOCOL_MAX)
) -> int:
    """The newest protocol version both sides speak, or `IncompatibleProtocolError`."""
    low, high = max(peer_min, ours[0]), min(peer_max, ours[1])
    if low > high:
        older = "agent" if peer_max < ours[0] else "master"
        raise IncompatibleProtocolError(
            f"no common protocol version: the agent speaks {peer_min}..{peer_max}, "
            f"the master speaks {ours[0]}..{ours[1]}; upgrade the {older}"
        )
    return high


# ---------------------------------------------------------------------------------------
# Key derivation and sealing
# ---------------------------------------------------------------------------------------


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def bootstrap_mac_key(secret: str) -> bytes:
    """The HMAC key that signs frames before enrollment: derived from the token secret."""
    return _hkdf(secret.encode("utf-8"), b"nxmesh/bootstrap-mac/v1")


# X25519 and its serialization are loaded on first use: an enrolled agent never needs
# them, and its footprint test keeps them out.
def _public_key(text: str) -> X25519PublicKey | None:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    try:
        raw = base64.b64decode(text, validate=True)
        return X25519PublicKey.from_public_bytes(raw) if len(raw) == 32 else None
    except (binascii.Error, ValueError):
        return None


def enrollment_keypair() -> tuple[X25519PrivateKey, str]:
    """A fresh X25519 key pair for one enrollment: the private key, and the public key as
    base64 of its 32 raw bytes (`Register.enroll_key` / `RegisterResponse.enroll_key`)."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    private = X25519PrivateKey.generate()
    raw = private.public_key().public_bytes_raw()
    return private, base64.b64encode(raw).decode("ascii")


def enrollment_secret(token_secret: str, private: X25519PrivateKey, peer_key: str) -> bytes:
    """What wraps the session key at enrollment (`seal_key`/`open_key`): the bootstrap
    token's secret followed by the X25519 secret of our `private` key and the peer's
    public `peer_key`. Either alone opens nothing.

    :raises BadSignatureError: `peer_key` is not an X25519 public key, or one whose
        shared secret is all zeros (a low-order point).
    """
    public = _public_key(peer_key)
    if public is None:
        raise BadSignatureError("the peer's enroll_key is not an X25519 public key")
    try:
        shared = private.exchange(public)
    except ValueError:  # cryptography refuses an all-zero result
        raise BadSignatureError("the peer's enroll_key is a low-order point") from None
    return token_secret.encode("utf-8") + shared


def seal_key(wrapping_secret: bytes, key: bytes, *, aad: bytes) -> str:
    """Encrypt session `key` for transport under a key derived from `wrapping_secret`."""
    nonce = os.urandom(12)
    box = AESGCM(_hkdf(wrapping_secret, b"nxmesh/key-wrap/v1"))
    return base64.b64encode(nonce + box.encrypt(nonce, key, aad)).decode("ascii")


def open_key(wrapping_secret: bytes, sealed: str, *, aad: bytes) -> bytes:
    """Inverse of `seal_key`; `BadSignatureError` when it was altered or sealed for others."""
    try:
        raw = base64.b64decode(sealed, validate=True)
        box = AESGCM(_hkdf(wrapping_secret, b"nxmesh/key-wrap/v1"))
        return box.decrypt(raw[:12], raw[12:], aad)
    except (binascii.Error, ValueError, InvalidTag):
        raise BadSignatureError("sealed session key does not open: altered or not ours") from None


def _cert_aad(agent_id: str, cert: TlsCertificate) -> bytes:
    return f"nxmesh/cert-key/v1|{agent_id}|{cert.name}|{cert.stem}|{cert.fingerprint}".encode()


def seal_certificates(
    certificates: tuple[TlsCertificate, ...], session_key: bytes, *, agent_id: str
) -> tuple[TlsCertificate, ...]:
    """`certificates` with each private key AES-GCM-sealed under the agent's session key,
    bound to the agent and the certificate: only that agent opens it, even without TLS."""
    return tuple(
        attrs.evolve(
            cert,
            key_pem=seal_key(
                session_key, cert.key_pem.encode("ascii"), aad=_cert_aad(agent_id, cert)
            ),
        )
        for cert in certificates
    )


def open_certificates(
    certificates: tuple[TlsCertificate, ...], keys: Mapping[str, bytes], *, agent_id: str
) -> tuple[TlsCertificate, ...]:
    """Inverse of `seal_certificates`, trying each of the agent's session keys (a rotation
    may happen between sealing and delivery); `BadSignatureError` when none opens one."""
    opened: list[TlsCertificate] = []
    for cert in certificates:
        for key in keys.values():
            try:
                raw = open_key(key, cert.key_pem, aad=_cert_aad(agent_id, cert))
            except BadSignatureError:
                continue
            opened.append(attrs.evolve(cert, key_pem=raw.decode("ascii")))
            break
        else:
            raise BadSignatureError(
                f"the private key of certificate {cert.name!r} does not open with this "
                "agent's session keys"
            )
    return tuple(opened)


# ---------------------------------------------------------------------------------------
# One side of a session
# ---------------------------------------------------------------------------------------


@attrs.define
class SessionCrypto:
    """Signs outgoing and verifies incoming frames for one agent session (either side).

    `keys` maps key id → session key: the master holds every unexpired key of the agent,
    the agent its primary and — during a rotation — its previous one, so frames signed
    with either verify and nothing is lost while both sides switch. Outgoing frames are
    signed with `key_id`. The `guard` outlives connections (see `ReplayGuard`).

    The signing key's `MacKey` is kept once made, and made again when `key_id` or its
    secret changes (rotation replaces the dict or its entries). A frame under another key
    (the previous one, during a rotation) gets a `MacKey` of its own, not kept: one per
    session is what the master holds for each of thousands of agents.
    """

    agent_id: str
    key_id: str
    keys: dict[str, bytes] = attrs.field(repr=False)
    receives_from_agent: bool
    counters: ProtocolCounters
    seq: SequenceSource = attrs.field(factory=SequenceSource)
    guard: ReplayGuard = attrs.field(factory=ReplayGuard)
    clock: Callable[[], float] = time.time
    max_body: int | None = None
    retiring: tuple[str, float] | None = None
    """The previous key's id and the time after which it verifies nothing: set by the
    master at a rotation, so a key past its expiry (and a grace for frames in flight)
    is refused although the session still holds it."""
    _mac: MacKey | None = attrs.field(default=None, init=False, repr=False)

    def seal(self, body: EncodedBody | Message) -> bytes:
        if not isinstance(body, EncodedBody):
            body = encode_body(body)
        return self.seal_parts(body) + body.data

    def seal_parts(self, body: EncodedBody) -> bytes:
        """Header and signature of the frame carrying `body` (see `envelope.seal_parts`)."""
        return seal_parts(
            body,
            agent_id=self.agent_id,
            key_id=self.key_id,
            key=self._mac_key(self.keys[self.key_id]),
            seq=self.seq.next(),
            ts_ms=int(self.clock() * 1000),
        )

    def open(self, frame: bytes, *, guard: ReplayGuard | None = None) -> tuple[Envelope, Message]:
        """Verify and decode `frame`; every rejection is counted and raised.

        `guard` replaces the session's replay guard for frames of another lane (unary
        reports, which may overtake stream frames).
        """
        try:
            env = unseal(frame, max_body=self.max_body)
            self.check(env, guard=guard)
            try:
                message = decode_body(env, max_body=self.max_body or MAX_BODY)
            except MalformedFrameError as exc:
                raise UndecodableBodyError(str(exc), env) from None
        except ProtocolError as exc:
            self.counters.count(exc)
            raise
        self.counters.accepted += 1
        return env, message

    def check(self, env: Envelope, *, guard: ReplayGuard | None = None) -> None:
        """Direction, agent id, key, signature, then seq and timestamp (not counted here)."""
        who = "agent " + self.agent_id if self.receives_from_agent else "the master"
        if env.type.from_agent != self.receives_from_agent:
            raise MalformedFrameError(
                f"{env.type.name} is not a message {who} sends; rejected (reflected frame?)"
            )
        if env.agent_id != self.agent_id:
            raise UnknownKeyError(
                f"frame for agent {env.agent_id!r} arrived on the session of {self.agent_id!r}"
            )
        key = self.keys.get(env.key_id)
        retiring = self.retiring
        if key is None or (
            retiring is not None and env.key_id == retiring[0] and self.clock() > retiring[1]
        ):
            raise UnknownKeyError(
                f"frame from {who} is signed with key {env.key_id!r}, which is unknown, "
                "expired or revoked"
            )
        env.verify(self._mac_key(key))
        (guard or self.guard).check(env, who=who)

    def _mac_key(self, secret: bytes) -> MacKey:
        mac = self._mac
        if mac is None or mac.secret is not secret:
            mac = MacKey(secret)
            if secret is self.keys.get(self.key_id):
                self._mac = mac
        return mac
