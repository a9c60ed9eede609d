"""The signed envelope every master↔agent message travels in: frame layout, HMAC, replay rules.

Frame layout (all integers big-endian; one frame is one transport message)::

    offset size  field
    0      3     magic  b"NXM"
    3      1     format (1)
    4      1     message type (`MessageType`, bits 0-6) | flags (bit 7: body compressed)
    5      1     len(agent_id)   (0..128, UTF-8 bytes)
    6      1     len(key_id)     (0..128, UTF-8 bytes)
    7      8     seq             (u64)
    15     8     ts              (u64, milliseconds since the Unix epoch)
    23     4     len(body)       (u32)
    27     a     agent_id
    27+a   k     key_id
    27+a+k 32    sig             HMAC-SHA256
    59+a+k n     body            canonical JSON of the message

``sig = HMAC-SHA256(session_key, header || sha256(body))`` where *header* is every byte of
the frame before ``sig`` (so type, agent id, key id, seq, ts and the body length are all
covered). MACing the body's digest instead of the body itself is what lets the master
fan a version out cheaply: a version's `EncodedBody` (canonical JSON + sha256) is built
once, and each agent only costs one HMAC over ~100 bytes plus a copy into its frame.

The layout is fixed, so the encoding is deterministic: the same fields always give the
same bytes, and a verifier never has to re-serialise anything to check a signature.

A body may travel zlib-compressed (`COMPRESSED`, flag bit 7 of the type byte; the master
compresses a version once and sends it so to agents that announced
``protocol.COMPRESSION_CAPABILITY``). The flag is part of the signed header and the
signature covers the compressed bytes as sent, so nothing is inflated before it verified.

Replay rules (`ReplayGuard`): ``seq`` must be strictly greater than the last accepted
``seq`` from the same peer in the same direction, and ``ts`` must lie within ±300 s of
the receiver's clock. Both failures raise a specific error (`ReplayError`,
`ClockSkewError`) and are counted in `ProtocolCounters` — never dropped silently.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
import time
from collections.abc import Callable
from typing import Final, NamedTuple

import attrs

from nxmesh.core.errors import NxMeshError

__all__ = [
    "COMPRESSED",
    "FRAME_FORMAT",
    "MAX_SKEW",
    "BadSignatureError",
    "ClockSkewError",
    "EncodedBody",
    "Envelope",
    "MacKey",
    "MalformedFrameError",
    "MessageType",
    "ProtocolCounters",
    "ProtocolError",
    "ReplayError",
    "ReplayGuard",
    "SequenceSource",
    "peek_type",
    "seal",
    "seal_parts",
    "unseal",
]

FRAME_MAGIC: Final = b"NXM"
FRAME_FORMAT: Final = 1
"""Version of the frame layout above (not of the message schemas: see `protocol`)."""

MAX_SKEW: Final = 300.0
"""Seconds a message timestamp may differ from the receiver's clock."""

SIG_SIZE: Final = 32
MAX_ID_BYTES: Final = 128

COMPRESSED: Final = 0x80
"""Flag bit of the type byte: the body is a zlib stream (`protocol.decode_body` inflates)."""
_TYPE_BITS: Final = 0x7F

_HEADER = struct.Struct(">3sBBBBQQI")
_HEADER_SIZE: Final = _HEADER.size  # 27

_BLOCK: Final = 64  # SHA-256's block size: HMAC pads its key to it (RFC 2104)
_IPAD: Final = bytes(x ^ 0x36 for x in range(256))
_OPAD: Final = bytes(x ^ 0x5C for x in range(256))
_sha256 = hashlib.sha256


class MessageType(enum.IntEnum):
    """The message a frame carries; part of the signed header, so it cannot be swapped.

    Agent→master types are below 16, master→agent types 16 and above: a receiver rejects
    a type meant for the other direction, so a frame cannot be reflected back at its sender
    even though both directions share the session key.
    """

    REGISTER = 1
    CONFIG_STATUS = 2
    HEALTH_REPORT = 3
    METRICS_BATCH = 4
    LOG_BATCH = 5
    HEARTBEAT = 6
    REGISTER_RESPONSE = 16
    CONFIG_UPDATE = 17
    COMMAND = 18
    ACK = 19

    @property
    def from_agent(self) -> bool:
        """True for the messages an agent sends to its master."""
        return self < 16


_TYPES: Final = {t.value: t for t in MessageType}  # a dict lookup is ~10x `MessageType(n)`


# ---------------------------------------------------------------------------------------
# Errors and counters
# ---------------------------------------------------------------------------------------


class ProtocolError(NxMeshError):
    """A frame or message broke the protocol; `counter` names the `ProtocolCounters` field."""

    counter: str = "malformed"


class MalformedFrameError(ProtocolError):
    """A frame could not be parsed, or its body is not a valid message of its type."""

    counter = "malformed"


class BadSignatureError(ProtocolError):
    """The HMAC does not match: wrong key, or the frame was altered in transit."""

    counter = "bad_signature"


class ReplayError(ProtocolError):
    """``seq`` did not increase: the frame is a replay (or a reordering) and is rejected."""

    counter = "replayed"


class ClockSkewError(ReplayError):
    """The timestamp is outside the allowed window: a replay, or clocks that disagree.

    `skew` is the sender's clock minus the receiver's, in seconds (positive: sender ahead).
    """

    counter = "clock_skew"

    def __init__(self, skew: float, max_skew: float, *, who: str = "peer") -> None:
        self.skew = skew
        self.max_skew = max_skew
        direction = "ahead of" if skew > 0 else "behind"
        super().__init__(
            f"message timestamp from {who} is {abs(skew):.0f} s {direction} this clock; "
            f"at most ±{max_skew:.0f} s is accepted — synchronise the clocks (NTP) of the "
            "master and the agent"
        )


@attrs.define
class ProtocolCounters:
    """How many frames were accepted and why the others were rejected.

    One object per master (or agent) process; the app exports it as metrics.
    """

    accepted: int = 0
    malformed: int = 0
    bad_signature: int = 0
    replayed: int = 0
    clock_skew: int = 0
    unknown_key: int = 0
    incompatible: int = 0
    rejected_enrollment: int = 0

    def count(self, error: ProtocolError) -> None:
        """Add one to the counter `error` belongs to."""
        setattr(self, error.counter, getattr(self, error.counter) + 1)

    def as_dict(self) -> dict[str, int]:
        return attrs.asdict(self)

    @property
    def rejected(self) -> int:
        """Every frame that was not accepted."""
        return sum(v for k, v in self.as_dict().items() if k != "accepted")


# ---------------------------------------------------------------------------------------
# Frames
# ---------------------------------------------------------------------------------------


class MacKey:
    """A session key ready to sign: HMAC-SHA256 with its two padded keys derived once.

    ``mac(data)`` equals ``hmac.digest(secret, data, "sha256")`` (a property test holds
    them equal). Every frame costs two HMACs on each side: ``hmac.digest`` goes through
    OpenSSL's one-shot HMAC, which fetches the digest and builds a context on every call
    (about 3 µs for a frame header); two SHA-256 calls over the pads computed here take
    about 1 µs. It is the construction the standard library's `hmac` module falls back
    to, written for one digest; the pads are 128 bytes, as secret as the key itself, and
    never logged (``repr`` shows neither).
    """

    __slots__ = ("_inner", "_outer", "secret")

    def __init__(self, secret: bytes) -> None:
        block = _sha256(secret).digest() if len(secret) > _BLOCK else secret
        block = block.ljust(_BLOCK, b"\0")
        self.secret = secret
        self._inner = block.translate(_IPAD)
        self._outer = block.translate(_OPAD)

    def __repr__(self) -> str:
        return "MacKey(<secret>)"

    def mac(self, data: bytes) -> bytes:
        """HMAC-SHA256 of `data` under this key."""
        return _sha256(self._outer + _sha256(self._inner + data).digest()).digest()


def _mac(key: bytes | MacKey, data: bytes) -> bytes:
    if isinstance(key, MacKey):
        return key.mac(data)
    return hmac.digest(key, data, "sha256")


class EncodedBody(NamedTuple):
    """A message body encoded once: its bytes as sent (canonical JSON, or its zlib stream
    when `compressed`) and their sha256.

    Build one per ConfigUpdate *version* and seal it for every agent: sealing never
    re-encodes or re-hashes the body. A named tuple like `Envelope`, for the same reason:
    one is built for every message sent.
    """

    type: MessageType
    data: bytes
    digest: bytes
    compressed: bool = False

    def __repr__(self) -> str:
        return (
            f"EncodedBody(type={self.type.name}, data=<{len(self.data)} bytes>, "
            f"compressed={self.compressed})"
        )

    @classmethod
    def of(cls, type: MessageType, data: bytes, *, compressed: bool = False) -> EncodedBody:
        return cls(type, data, hashlib.sha256(data).digest(), compressed)


class Envelope(NamedTuple):
    """A parsed frame. `body` is still encoded; `protocol.decode_body` turns it into a message.

    A named tuple rather than a frozen attrs class: both sides parse one for every frame,
    and a frozen attrs class sets its nine fields one `object.__setattr__` at a time
    (~2 µs, as much as the rest of parsing); a tuple is built in one step, and is just
    as immutable.
    """

    type: MessageType
    agent_id: str
    key_id: str
    seq: int
    ts_ms: int
    body: bytes
    sig: bytes
    header: bytes
    compressed: bool = False  # `body` is a zlib stream (see `COMPRESSED`)

    def __repr__(self) -> str:  # the signature and header stay out of logs
        return (
            f"Envelope(type={self.type.name}, agent_id={self.agent_id!r}, "
            f"key_id={self.key_id!r}, seq={self.seq}, ts_ms={self.ts_ms}, "
            f"body=<{len(self.body)} bytes>, compressed={self.compressed})"
        )

    @property
    def ts(self) -> float:
        return self.ts_ms / 1000.0

    def verify(self, key: bytes | MacKey) -> None:
        """Raise `BadSignatureError` unless `sig` is the HMAC of this frame under `key`."""
        expected = _mac(key, self.header + _sha256(self.body).digest())
        if not hmac.compare_digest(expected, self.sig):
            raise BadSignatureError(
                f"bad signature on {self.type.name} frame from agent "
                f"{self.agent_id or '<enrolling>'} (key {self.key_id or '<none>'})"
            )


def seal(
    body: EncodedBody,
    *,
    agent_id: str,
    key_id: str,
    key: bytes | MacKey | None,
    seq: int,
    ts_ms: int,
) -> bytes:
    """Build a signed frame carrying `body`.

    `key` None writes an all-zero signature: only for rejections the master cannot sign
    (it does not know the key the peer claimed); receivers treat those as unauthenticated.
    """
    head = seal_parts(body, agent_id=agent_id, key_id=key_id, key=key, seq=seq, ts_ms=ts_ms)
    return head + body.data


def seal_parts(
    body: EncodedBody,
    *,
    agent_id: str,
    key_id: str,
    key: bytes | MacKey | None,
    seq: int,
    ts_ms: int,
) -> bytes:
    """The frame `seal` builds, minus the body: header and signature (about 100 bytes).

    The frame is this followed by ``body.data``; a transport that can send the two parts
    with one copy (gRPC) saves copying a large version body once per agent.
    """
    aid = agent_id.encode()
    kid = key_id.encode()
    if len(aid) > MAX_ID_BYTES or len(kid) > MAX_ID_BYTES:
        what = "agent_id" if len(aid) > MAX_ID_BYTES else "key_id"
        raise ValueError(f"{what} is longer than {MAX_ID_BYTES} bytes")
    kind = body.type | COMPRESSED if body.compressed else body.type
    try:  # struct checks the ranges (every frame is sealed here: no second check)
        header = (
            _HEADER.pack(
                FRAME_MAGIC, FRAME_FORMAT, kind, len(aid), len(kid), seq, ts_ms, len(body.data)
            )
            + aid
            + kid
        )
    except struct.error:
        raise ValueError("seq and ts must be integers that fit in 64 unsigned bits") from None
    sig = _mac(key, header + body.digest) if key else bytes(SIG_SIZE)
    return header + sig


def peek_type(frame: bytes) -> MessageType | None:
    """The message type of `frame` without parsing the rest; None when it is not a frame.

    Transports use it to route (gRPC sends health and metrics over unary calls).
    """
    if len(frame) < _HEADER_SIZE or frame[:3] != FRAME_MAGIC or frame[3] != FRAME_FORMAT:
        return None
    return _TYPES.get(frame[4] & _TYPE_BITS)


def unseal(frame: bytes, *, max_body: int | None = None) -> Envelope:
    """Parse `frame` (no signature check yet: the key depends on its agent and key id)."""
    if len(frame) < _HEADER_SIZE:
        raise MalformedFrameError(f"frame of {len(frame)} bytes is shorter than a header")
    magic, fmt, mtype, alen, klen, seq, ts_ms, blen = _HEADER.unpack_from(frame)
    if magic != FRAME_MAGIC:
        raise MalformedFrameError("not an NxMesh frame (bad magic)")
    if fmt != FRAME_FORMAT:
        raise MalformedFrameError(
            f"frame format {fmt} is not supported (this side speaks format {FRAME_FORMAT}); "
            "upgrade the older of master and agent"
        )
    kind = _TYPES.get(mtype & _TYPE_BITS)
    if kind is None:
        raise MalformedFrameError(f"unknown message type {mtype & _TYPE_BITS}")
    ids_end = _HEADER_SIZE + alen + klen
    if len(frame) != ids_end + SIG_SIZE + blen:
        raise MalformedFrameError(
            f"frame length {len(frame)} does not match its header "
            f"(expected {ids_end + SIG_SIZE + blen})"
        )
    if max_body is not None and blen > max_body:
        raise MalformedFrameError(f"body of {blen} bytes exceeds the {max_body} byte limit")
    try:
        agent_id = frame[_HEADER_SIZE : _HEADER_SIZE + alen].decode("utf-8")
        key_id = frame[_HEADER_SIZE + alen : ids_end].decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedFrameError("agent or key id is not UTF-8") from None
    return Envelope(
        kind,
        agent_id,
        key_id,
        seq,
        ts_ms,
        frame[ids_end + SIG_SIZE :],  # body
        frame[ids_end : ids_end + SIG_SIZE],  # sig
        frame[:ids_end],  # header
        bool(mtype & COMPRESSED),
    )


# ---------------------------------------------------------------------------------------
# Sequencing and replay
# ---------------------------------------------------------------------------------------


class SequenceSource:
    """Sequence numbers for one sender: strictly increasing, also across reconnects.

    Seeded from the wall clock in microseconds, so a restarted process continues above
    every number it sent before (unless it sent more than a million frames a second).
    """

    __slots__ = ("_last",)

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._last = int(clock() * 1_000_000)

    def next(self) -> int:
        self._last += 1
        return self._last

    def reseed(self, clock: Callable[[], float] = time.time) -> None:
        """Jump forward to the clock if it is ahead (never backwards)."""
        self._last = max(self._last, int(clock() * 1_000_000))


class ReplayGuard:
    """Accepts a frame only if its seq increases and its timestamp is within the window.

    Keep one guard per peer and direction for as long as the process lives (not per
    connection): a frame captured on an earlier connection is then still a replay.
    """

    __slots__ = ("_clock", "last_seq", "max_skew")

    def __init__(
        self, *, max_skew: float = MAX_SKEW, clock: Callable[[], float] = time.time
    ) -> None:
        self.last_seq = 0
        self.max_skew = max_skew
        self._clock = clock

    def check(self, env: Envelope, *, who: str = "peer") -> None:
        """Raise `ClockSkewError` or `ReplayError`; on success remember ``env.seq``.

        Call it only after the signature verified, so forged frames cannot advance it.
        """
        self.check_time(env, who=who)
        if env.seq <= self.last_seq:
            raise ReplayError(
                f"{env.type.name} frame from {who} has seq {env.seq}, not above the last "
                f"accepted {self.last_seq}: replayed or reordered, rejected"
            )
        self.last_seq = env.seq

    def check_time(self, env: Envelope, *, who: str = "peer") -> None:
        skew = env.ts - self._clock()
        if abs(skew) > self.max_skew:
            raise ClockSkewError(skew, self.max_skew, who=who)
