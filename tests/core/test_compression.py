"""Compressed bodies: the master's versions travel zlib-compressed to agents that read them."""

from __future__ import annotations

import os
import zlib

import pytest

from nxmesh.core.envelope import (
    COMPRESSED,
    BadSignatureError,
    EncodedBody,
    MalformedFrameError,
    MessageType,
    ProtocolCounters,
    ReplayGuard,
    SequenceSource,
    peek_type,
    seal,
    unseal,
)
from nxmesh.core.protocol import (
    ConfigUpdate,
    SessionCrypto,
    body_bytes,
    compress_body,
    decode_body,
    encode_body,
)
from nxmesh.testing import make_state, make_version

NOW = 1_800_000_000.0
KEY = b"k" * 32
UPDATE = ConfigUpdate.of(make_version(4, state=make_state(40)))


def clock() -> float:
    return NOW


def sealed(body: EncodedBody, *, seq: int = 1) -> bytes:
    return seal(body, agent_id="agent-1", key_id="k1", key=KEY, seq=seq, ts_ms=int(NOW * 1000))


def agent_side(counters: ProtocolCounters, *, max_body: int | None = None) -> SessionCrypto:
    return SessionCrypto(
        agent_id="agent-1",
        key_id="k1",
        keys={"k1": KEY},
        receives_from_agent=False,
        counters=counters,
        guard=ReplayGuard(clock=clock),
        seq=SequenceSource(clock),
        clock=clock,
        max_body=max_body,
    )


def forged(data: bytes) -> bytes:
    """A correctly signed frame whose compressed body is `data` (what only a key holder
    could send: the checks below run after the signature verified)."""
    return sealed(EncodedBody.of(MessageType.CONFIG_UPDATE, data, compressed=True))


class TestCompressBody:
    def test_a_version_shrinks_and_opens_to_the_same_message(self) -> None:
        """A 40-site version compresses severalfold; the agent decodes the same update."""
        plain = encode_body(UPDATE)
        packed = compress_body(plain)
        assert packed.compressed
        assert len(packed.data) * 5 < len(plain.data)
        counters = ProtocolCounters()
        env, message = agent_side(counters).open(sealed(packed))
        assert env.compressed
        assert message == UPDATE
        assert body_bytes(env) == plain.data
        assert counters.accepted == 1

    def test_small_or_incompressible_bodies_stay_as_they_are(self) -> None:
        """Below 1 KiB, or shrinking by less than an eighth, the body is sent plain."""
        small = EncodedBody.of(MessageType.CONFIG_UPDATE, b"{}" * 200)
        noise = EncodedBody.of(MessageType.CONFIG_UPDATE, os.urandom(8192))
        assert compress_body(small) is small
        assert compress_body(noise) is noise
        packed = compress_body(encode_body(UPDATE))
        assert compress_body(packed) is packed  # never twice

    def test_the_flag_is_in_the_type_byte_and_signed(self) -> None:
        """Routing still reads the type; clearing the flag breaks the signature."""
        frame = bytearray(sealed(compress_body(encode_body(UPDATE))))
        assert frame[4] == MessageType.CONFIG_UPDATE | COMPRESSED
        assert peek_type(bytes(frame)) is MessageType.CONFIG_UPDATE
        frame[4] &= ~COMPRESSED
        with pytest.raises(BadSignatureError):
            unseal(bytes(frame)).verify(KEY)

    def test_a_plain_frame_is_unchanged(self) -> None:
        """Without compression the frame is byte-for-byte the format-1 frame of before."""
        frame = sealed(encode_body(UPDATE))
        assert frame[4] == MessageType.CONFIG_UPDATE
        assert not unseal(frame).compressed


class TestInflateLimits:
    @pytest.mark.parametrize(
        ("data", "error"),
        [
            (b"not zlib at all", "does not inflate"),
            (zlib.compress(b"{}" * 4000)[:-6], "not one whole zlib stream"),
            (zlib.compress(b"{}") + b"trailing", "not one whole zlib stream"),
        ],
        ids=["garbage", "truncated", "trailing"],
    )
    def test_bad_streams_are_malformed_and_counted(self, data: bytes, error: str) -> None:
        """A compressed body that is not exactly one zlib stream is refused, not guessed."""
        counters = ProtocolCounters()
        with pytest.raises(MalformedFrameError, match=error):
            agent_side(counters).open(forged(data))
        assert counters.malformed == 1
        assert counters.accepted == 0

    def test_a_body_inflating_past_the_limit_is_refused_without_inflating_it_all(
        self,
    ) -> None:
        """A 64 MiB zlib bomb (about 64 KB sent) is cut off at the receiver's body limit."""
        bomb = zlib.compress(bytes(64 * 1024 * 1024), 9)
        assert len(bomb) < 100_000
        counters = ProtocolCounters()
        with pytest.raises(MalformedFrameError, match="beyond the 1048576 byte limit"):
            agent_side(counters, max_body=1024 * 1024).open(forged(bomb))
        assert counters.malformed == 1

    def test_decode_body_takes_the_limit_too(self) -> None:
        """`decode_body` (used on the first frame of a stream) applies the same bound."""
        env = unseal(sealed(compress_body(encode_body(UPDATE))))
        with pytest.raises(MalformedFrameError, match="beyond the 100 byte limit"):
            decode_body(env, max_body=100)
        assert decode_body(env) == UPDATE

    @pytest.mark.parametrize(
        "kind", [MessageType.REGISTER, MessageType.REGISTER_RESPONSE, MessageType.CONFIG_STATUS]
    )
    def test_only_a_config_update_may_come_compressed(self, kind: MessageType) -> None:
        """A Register is decoded before its signature can be checked: flagged compressed,
        it (and every other type but ConfigUpdate) is refused without being inflated."""
        bomb = zlib.compress(bytes(64 * 1024 * 1024), 9)
        frame = sealed(EncodedBody.of(kind, bomb, compressed=True))
        with pytest.raises(MalformedFrameError, match=f"{kind.name} bodies are never sent"):
            decode_body(unseal(frame))
