"""The master↔agent protocol: envelope signing, replay windows, negotiation, counters."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nxmesh.core.protocol as protocol_module
from nxmesh.core.envelope import (
    BadSignatureError,
    ClockSkewError,
    EncodedBody,
    MacKey,
    MalformedFrameError,
    MessageType,
    ProtocolCounters,
    ReplayError,
    ReplayGuard,
    SequenceSource,
    peek_type,
    seal,
    seal_parts,
    unseal,
)
from nxmesh.core.errors import ValidationError
from nxmesh.core.model import HealthReport, HealthResult
from nxmesh.core.protocol import (
    MAX_REGISTER_BODY,
    Ack,
    Command,
    ConfigStatus,
    ConfigUpdate,
    Heartbeat,
    IncompatibleProtocolError,
    LogBatch,
    LogEntry,
    MetricsBatch,
    Register,
    RegisterResponse,
    SessionCrypto,
    UnknownKeyError,
    decode_body,
    encode_body,
    encode_received,
    enrollment_keypair,
    enrollment_secret,
    negotiate,
    open_key,
    seal_key,
)
from nxmesh.core.serialization import state_digest
from nxmesh.core.validation import Invalid
from nxmesh.testing import make_version

NOW = 1_800_000_000.0
KEY = b"k" * 32
_SEAL: dict[str, Any] = {"agent_id": "agent-1", "key_id": "k1", "key": KEY, "seq": 1, "ts_ms": 1}


def clock() -> float:
    return NOW


def frame_of(
    message: object,
    *,
    seq: int = 1,
    ts: float = NOW,
    key: bytes = KEY,
    agent_id: str = "agent-1",
    key_id: str = "k1",
) -> bytes:
    return seal(
        encode_body(message),  # type: ignore[arg-type]
        agent_id=agent_id,
        key_id=key_id,
        key=key,
        seq=seq,
        ts_ms=int(ts * 1000),
    )


def master_side(counters: ProtocolCounters | None = None, **keys: bytes) -> SessionCrypto:
    return SessionCrypto(
        agent_id="agent-1",
        key_id="k1",
        keys=keys or {"k1": KEY},
        receives_from_agent=True,
        counters=counters or ProtocolCounters(),
        guard=ReplayGuard(clock=clock),
        seq=SequenceSource(clock),
        clock=clock,
    )


STATUS = ConfigStatus(version=3, digest="abc", phase="applied")


class TestEnvelope:
    def test_round_trip_keeps_every_field(self) -> None:
        """A sealed frame unseals to the same type, ids, seq, timestamp and body."""
        env = unseal(frame_of(STATUS, seq=42, ts=NOW + 0.25))
        assert (env.type, env.agent_id, env.key_id, env.seq) == (
            MessageType.CONFIG_STATUS,
            "agent-1",
            "k1",
            42,
        )
        assert env.ts == NOW + 0.25
        env.verify(KEY)
        assert decode_body(env) == STATUS

    def test_parts_are_the_frame_without_its_body(self) -> None:
        """`seal_parts` + the shared body is exactly the frame `seal` builds (fan-out sends
        the two parts without building the frame)."""
        body = encode_body(STATUS)
        fields = {"agent_id": "agent-1", "key_id": "k1", "key": KEY, "seq": 7, "ts_ms": 1}
        assert seal_parts(body, **fields) + body.data == seal(body, **fields)

    @pytest.mark.parametrize(
        ("change", "error"),
        [
            ({"seq": -1}, "seq and ts must be integers that fit in 64 unsigned bits"),
            ({"seq": 2**64}, "seq and ts must be integers that fit in 64 unsigned bits"),
            ({"ts_ms": -5}, "seq and ts must be integers that fit in 64 unsigned bits"),
            ({"agent_id": "a" * 129}, "agent_id is longer than 128 bytes"),
            ({"key_id": "é" * 65}, "key_id is longer than 128 bytes"),  # 130 UTF-8 bytes
        ],
    )
    def test_unsealable_fields_are_refused(self, change: dict[str, Any], error: str) -> None:
        """A header field the frame layout cannot hold is a clear error, not a bad frame."""
        with pytest.raises(ValueError, match=error):
            seal(encode_body(STATUS), **{**_SEAL, **change})
        assert unseal(seal(encode_body(STATUS), **{**_SEAL, "seq": 2**64 - 1})).seq == 2**64 - 1

    def test_encoding_is_deterministic(self) -> None:
        """The same message and fields always give byte-identical frames."""
        assert frame_of(STATUS) == frame_of(ConfigStatus(version=3, digest="abc", phase="applied"))

    def test_body_is_canonical_json(self) -> None:
        """Bodies are sorted, whitespace-free JSON."""
        body = encode_body(STATUS).data
        assert body == json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")).encode()

    @pytest.mark.parametrize("where", ["type", "agent_id", "seq", "ts", "body", "sig"])
    def test_any_altered_byte_breaks_the_signature(self, where: str) -> None:
        """Flipping one byte anywhere the signature covers (or of the signature) is detected."""
        frame = bytearray(frame_of(STATUS))
        offsets = {
            "type": 4,
            "agent_id": 27,
            "seq": 14,
            "ts": 22,
            "sig": 27 + 7 + 2 + 3,
            "body": len(frame) - 3,
        }
        frame[offsets[where]] ^= 0x01
        with pytest.raises((BadSignatureError, MalformedFrameError)):
            unseal(bytes(frame)).verify(KEY)

    def test_wrong_key_is_a_bad_signature(self) -> None:
        """A frame signed with another key does not verify."""
        with pytest.raises(BadSignatureError, match="bad signature on CONFIG_STATUS"):
            unseal(frame_of(STATUS, key=b"x" * 32)).verify(KEY)

    def test_signature_covers_the_body_digest_not_a_copy(self) -> None:
        """The HMAC input is header + sha256(body), so one EncodedBody serves every agent."""
        body = encode_body(STATUS)
        assert body.digest == hashlib.sha256(body.data).digest()
        a = seal(body, agent_id="a", key_id="k", key=b"1" * 32, seq=1, ts_ms=1)
        b = seal(body, agent_id="b", key_id="k", key=b"2" * 32, seq=1, ts_ms=1)
        assert a.endswith(body.data)
        assert b.endswith(body.data)
        assert a != b

    @pytest.mark.parametrize(
        ("frame", "message"),
        [
            (b"NXM", "shorter than a header"),
            (b"XXX" + bytes(40), "bad magic"),
            (b"NXM\x09" + bytes(40), "format 9 is not supported"),
        ],
    )
    def test_malformed_frames_are_named(self, frame: bytes, message: str) -> None:
        """Short frames, foreign data and future formats are rejected with a reason."""
        with pytest.raises(MalformedFrameError, match=message):
            unseal(frame)

    def test_truncated_frame_is_malformed(self) -> None:
        """A frame whose length disagrees with its header is rejected."""
        with pytest.raises(MalformedFrameError, match="does not match its header"):
            unseal(frame_of(STATUS)[:-1])

    def test_body_limit(self) -> None:
        """Bodies above the receiver's limit are rejected before decoding."""
        with pytest.raises(MalformedFrameError, match="exceeds the 10 byte limit"):
            unseal(frame_of(STATUS), max_body=10)

    def test_peek_type(self) -> None:
        """Transports can read the type without parsing; foreign bytes give None."""
        assert peek_type(frame_of(STATUS)) is MessageType.CONFIG_STATUS
        assert peek_type(b"hello world, not a frame at all!") is None


class TestMacKey:
    @settings(max_examples=300)
    @given(secret=st.binary(max_size=200), data=st.binary(max_size=300))
    def test_equals_the_standard_hmac(self, secret: bytes, data: bytes) -> None:
        """`MacKey.mac` is HMAC-SHA256: keys shorter, as long as and longer than a block."""
        assert MacKey(secret).mac(data) == hmac.digest(secret, data, "sha256")

    def test_seals_and_verifies_as_the_secret_does(self) -> None:
        """A frame sealed with a `MacKey` is byte-equal to one sealed with its secret, and
        each verifies the other's."""
        body = encode_body(STATUS)
        with_secret = seal(body, **_SEAL)
        with_mac = seal(body, **{**_SEAL, "key": MacKey(KEY)})
        assert with_mac == with_secret
        unseal(with_secret).verify(MacKey(KEY))
        with pytest.raises(BadSignatureError):
            unseal(with_secret).verify(MacKey(b"z" * 32))

    def test_repr_hides_the_secret(self) -> None:
        """Neither the key nor its pads show in a repr (logs, tracebacks)."""
        secret = b"secret-key-material-0123456789ab"
        key = MacKey(secret)
        shown = repr(key)
        assert secret.decode() not in shown
        assert secret.hex() not in shown
        assert "MacKey" in shown


class TestEncodeReceived:
    """`encode_received` is the agent's ack of every push, encoded without the message."""

    @settings(max_examples=300)
    @given(
        version=st.integers(min_value=0, max_value=2**63 - 1),
        digest=st.from_regex(r"\A[A-Za-z0-9:._-]{1,128}\Z"),
    )
    def test_same_body_as_encoding_the_message(self, version: int, digest: str) -> None:
        """Byte for byte what `encode_body` gives for the ``received`` ConfigStatus, and
        it decodes back to that message."""
        expected = encode_body(ConfigStatus(version=version, digest=digest, phase="received"))
        body = encode_received(version, digest)
        assert body == expected
        assert body.type is MessageType.CONFIG_STATUS
        assert decode_body(unseal(seal(body, **_SEAL))) == ConfigStatus(
            version=version, digest=digest, phase="received"
        )

    @pytest.mark.parametrize(
        ("version", "digest", "field"),
        [
            (-1, "abc", "version"),
            (2**63, "abc", "version"),
            (True, "abc", "version"),
            (1.0, "abc", "version"),
            (1, "", "digest"),
            (1, "has space", "digest"),
            (1, 'quote"', "digest"),
            (1, "é", "digest"),
            (1, "x" * 129, "digest"),
            (1, None, "digest"),
        ],
    )
    def test_refuses_what_the_message_refuses(
        self, version: object, digest: object, field: str
    ) -> None:
        """Values the message would refuse raise as building it does, naming the field."""
        with pytest.raises((Invalid, ValidationError)) as built:
            ConfigStatus(version=version, digest=digest, phase="received")  # type: ignore[arg-type]
        with pytest.raises(type(built.value), match=field) as encoded:
            encode_received(version, digest)  # type: ignore[arg-type]
        assert str(encoded.value) == str(built.value)


class TestReplayGuard:
    def test_increasing_seq_is_accepted(self) -> None:
        """Each seq above the last one passes."""
        guard = ReplayGuard(clock=clock)
        for seq in (5, 6, 100):
            guard.check(unseal(frame_of(STATUS, seq=seq)))
        assert guard.last_seq == 100

    @pytest.mark.parametrize("seq", [10, 9])
    def test_repeated_or_lower_seq_is_a_replay(self, seq: int) -> None:
        """A seq not above the last accepted one is rejected and does not move the mark."""
        guard = ReplayGuard(clock=clock)
        guard.check(unseal(frame_of(STATUS, seq=10)))
        with pytest.raises(ReplayError, match="replayed or reordered"):
            guard.check(unseal(frame_of(STATUS, seq=seq)))
        assert guard.last_seq == 10

    @pytest.mark.parametrize(("offset", "word"), [(301, "ahead of"), (-301, "behind")])
    def test_timestamp_outside_window_is_clock_skew(self, offset: float, word: str) -> None:
        """More than 300 s off is a specific clock-skew error saying which way and how far."""
        guard = ReplayGuard(clock=clock)
        with pytest.raises(ClockSkewError, match=rf"301 s {word} this clock.*±300 s.*NTP"):
            guard.check(unseal(frame_of(STATUS, ts=NOW + offset)))
        assert guard.last_seq == 0

    @pytest.mark.parametrize("offset", [299.0, -299.0])
    def test_timestamp_inside_window_passes(self, offset: float) -> None:
        """Clocks up to 300 s apart still talk."""
        ReplayGuard(clock=clock).check(unseal(frame_of(STATUS, ts=NOW + offset)))

    def test_sequence_source_continues_across_restarts(self) -> None:
        """A new source (a restarted process) starts above what an older one handed out."""
        old = SequenceSource(clock)
        last = [old.next() for _ in range(1000)][-1]
        assert SequenceSource(lambda: NOW + 1).next() > last


class TestSessionCrypto:
    def test_accepted_frames_are_counted(self) -> None:
        """A valid frame decodes and counts as accepted."""
        counters = ProtocolCounters()
        _, message = master_side(counters).open(frame_of(STATUS))
        assert message == STATUS
        assert counters.accepted == 1
        assert counters.rejected == 0

    @pytest.mark.parametrize(
        ("frame", "error", "counter"),
        [
            (frame_of(STATUS, key=b"z" * 32), BadSignatureError, "bad_signature"),
            (frame_of(STATUS, ts=NOW - 1000), ClockSkewError, "clock_skew"),
            (frame_of(STATUS, key_id="gone"), UnknownKeyError, "unknown_key"),
            (frame_of(STATUS, agent_id="agent-2"), UnknownKeyError, "unknown_key"),
            (frame_of(Ack(seq=1)), MalformedFrameError, "malformed"),
            (b"garbage", MalformedFrameError, "malformed"),
        ],
        ids=["bad-sig", "skew", "unknown-key", "other-agent", "reflected", "garbage"],
    )
    def test_rejections_are_raised_and_counted(
        self, frame: bytes, error: type[Exception], counter: str
    ) -> None:
        """Every kind of rejection raises its specific error and bumps its own counter."""
        counters = ProtocolCounters()
        with pytest.raises(error):
            master_side(counters).open(frame)
        assert counters.as_dict()[counter] == 1
        assert counters.accepted == 0
        assert counters.rejected == 1

    def test_replay_is_counted(self) -> None:
        """The same frame twice: the second is rejected as a replay and counted."""
        counters = ProtocolCounters()
        side = master_side(counters)
        frame = frame_of(STATUS, seq=7)
        side.open(frame)
        with pytest.raises(ReplayError):
            side.open(frame)
        assert (counters.accepted, counters.replayed) == (1, 1)

    def test_previous_key_still_verifies_during_rotation(self) -> None:
        """Frames signed with the secondary key are accepted while both are held."""
        side = master_side(k1=KEY, k2=b"n" * 32)
        side.open(frame_of(STATUS, seq=1))
        side.open(frame_of(STATUS, seq=2, key=b"n" * 32, key_id="k2"))

    def test_outgoing_frames_use_the_current_key_and_rising_seq(self) -> None:
        """`seal` signs with `key_id` and every frame gets a higher seq."""
        side = master_side(k1=KEY, k2=b"n" * 32)
        side.key_id = "k2"
        first, second = unseal(side.seal(Ack(seq=1))), unseal(side.seal(Ack(seq=2)))
        second.verify(b"n" * 32)
        assert second.key_id == "k2"
        assert second.seq > first.seq

    def test_a_key_id_given_a_new_secret_signs_and_verifies_with_it(self) -> None:
        """`keys` edited in place or replaced (what a rotation does): the next frame is
        signed with the new secret, frames under the old one are refused, and only the
        signing key's pads are kept."""
        side = master_side(k1=KEY)
        side.open(frame_of(STATUS, seq=1))
        unseal(side.seal(Ack(seq=1))).verify(KEY)
        side.keys["k1"] = b"n" * 32
        unseal(side.seal(Ack(seq=2))).verify(b"n" * 32)
        with pytest.raises(BadSignatureError):
            side.open(frame_of(STATUS, seq=2))
        side.open(frame_of(STATUS, seq=3, key=b"n" * 32))
        side.keys = {"k2": b"m" * 32}
        side.key_id = "k2"
        unseal(side.seal(Ack(seq=3))).verify(b"m" * 32)
        assert side._mac is not None
        assert side._mac.secret == b"m" * 32


class TestMessages:
    @pytest.mark.parametrize(
        "message",
        [
            Register(
                bootstrap_token="abc.def",
                labels={"env": "prod"},
                capabilities=("drain",),
                enroll_key=enrollment_keypair()[1],
            ),
            Register(agent_id="a1", running_version=4, running_digest="d4"),
            ConfigStatus(
                version=1,
                digest="d",
                phase="failed",
                error="nginx: [emerg] x",
                durations={"test": 0.1},
            ),
            HealthReport(agent_id="a1", ts=NOW, results=(HealthResult("nginx", "ok"),)),
            MetricsBatch(ts=NOW, samples={"nginx.requests": 12.0}),
            LogBatch(entries=(LogEntry(ts=NOW, level="error", message="boom"),)),
            Heartbeat(running_version=1, running_digest="d"),
            RegisterResponse(accepted=True, protocol_version=1, agent_id="a1", key_id="k1"),
            Command(kind="rotate_key", new_key_id="k2", sealed_key="c2VhbGVk"),
            Ack(seq=9, ok=False, error="replayed"),
        ],
        ids=lambda m: type(m).__name__,
    )
    def test_every_message_round_trips(self, message: object) -> None:
        """Each message type decodes back to an equal object."""
        assert decode_body(unseal(frame_of(message))) == message

    def test_config_update_state_hashes_to_the_version_digest(self) -> None:
        """The state inside a ConfigUpdate is the version's state, digest intact."""
        version = make_version(2)
        version = attrs.evolve(version, digest=state_digest(version.state))
        update = decode_body(unseal(frame_of(ConfigUpdate.of(version), key_id="k1")))
        assert isinstance(update, ConfigUpdate)
        assert state_digest(update.state) == version.digest
        assert update.to_pending().digest == version.digest

    def test_register_needs_exactly_one_identity(self) -> None:
        """Register carries a bootstrap token or an agent id, not both, not neither."""
        with pytest.raises(ValueError, match="exactly one"):
            Register()
        with pytest.raises(ValueError, match="exactly one"):
            Register(agent_id="a", bootstrap_token="x.y")

    def test_register_from_a_newer_agent_ignores_unknown_fields(self) -> None:
        """Unknown keys in Register (sent before negotiation) are ignored."""
        data = json.loads(encode_body(Register(agent_id="a1")).data)
        data["future_field"] = {"x": 1}
        body = EncodedBody.of(MessageType.REGISTER, json.dumps(data).encode())
        env = unseal(seal(body, agent_id="a1", key_id="k", key=KEY, seq=1, ts_ms=1))
        assert decode_body(env) == Register(agent_id="a1")

    def test_invalid_fields_are_named(self) -> None:
        """A bad body is malformed, naming every wrong field."""
        body = EncodedBody.of(
            MessageType.CONFIG_STATUS, b'{"version":"3","digest":"a;b","phase":"done"}'
        )
        env = unseal(seal(body, agent_id="a", key_id="k", key=KEY, seq=1, ts_ms=1))
        with pytest.raises(MalformedFrameError) as info:
            decode_body(env)
        assert {"version", "digest", "phase"} <= {
            line.split(":")[0].strip(" -") for line in str(info.value).splitlines()[1:]
        }

    def test_unknown_fields_are_rejected_after_negotiation(self) -> None:
        """Messages other than Register are strict about their keys."""
        body = EncodedBody.of(MessageType.ACK, b'{"seq":1,"ok":true,"error":"","extra":1}')
        with pytest.raises(MalformedFrameError, match="extra"):
            decode_body(unseal(seal(body, agent_id="a", key_id="k", key=KEY, seq=1, ts_ms=1)))

    def test_non_json_body(self) -> None:
        """A body that is not JSON is malformed."""
        body = EncodedBody.of(MessageType.ACK, b"\xff\xfe")
        with pytest.raises(MalformedFrameError, match="not JSON"):
            decode_body(unseal(seal(body, agent_id="a", key_id="k", key=KEY, seq=1, ts_ms=1)))

    @pytest.mark.parametrize(
        "kind",
        [MessageType.REGISTER, MessageType.CONFIG_STATUS, MessageType.LOG_BATCH],
        ids=lambda kind: kind.name,
    )
    @pytest.mark.parametrize("where", ["body", "field"])
    def test_deeply_nested_json_is_malformed(self, kind: MessageType, where: str) -> None:
        """JSON nested beyond the parser's recursion limit (the whole body or a field) is a
        malformed frame, not a RecursionError escaping the receiver."""
        nested = b"[" * 20_000 + b"]" * 20_000
        data = (
            nested if where == "body" else b'{"labels":' + nested + b',"entries":' + nested + b"}"
        )
        env = unseal(
            seal(EncodedBody.of(kind, data), agent_id="a", key_id="k", key=KEY, seq=1, ts_ms=1)
        )
        with pytest.raises(MalformedFrameError, match=kind.name):
            decode_body(env)

    def test_the_largest_valid_register_fits_its_limit(self) -> None:
        """Every field at its maximum (64 labels, 64 capabilities) stays under
        MAX_REGISTER_BODY, and decodes."""
        prefix = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])  # 253 characters
        register = Register(
            agent_id="a" * 128,
            name="n" * 128,
            labels={f"{prefix}/{i:02d}{'x' * 61}": "v" * 63 for i in range(64)},
            nginx_version="1" * 128,
            deployment_mode="m" * 128,
            capabilities=tuple(f"{i:02d}{'c' * 126}" for i in range(64)),
            agent_version="9" * 128,
            running_version=2**63 - 1,
            running_digest="d" * 128,
            enroll_key="A" * 4096,
        )
        body = encode_body(register)
        assert len(body.data) < MAX_REGISTER_BODY
        env = unseal(seal(body, agent_id="a", key_id="k", key=KEY, seq=1, ts_ms=1))
        assert decode_body(env) == register

    def test_an_oversized_register_is_refused_unparsed(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A Register body over MAX_REGISTER_BODY (it is decoded before anything
        authenticates it) is malformed, naming the limit, and never parsed."""
        parsed: list[bytes] = []
        decode = protocol_module._decode

        def spy(env: Any) -> Any:
            parsed.append(env.body)
            return decode(env)

        monkeypatch.setattr(protocol_module, "_decode", spy)
        wide = b"[" + b"[]," * (MAX_REGISTER_BODY // 3) + b"[]]"  # a 64 KiB list of lists
        body = EncodedBody.of(MessageType.REGISTER, wide)
        assert len(body.data) > MAX_REGISTER_BODY
        env = unseal(seal(body, agent_id="a", key_id="k", key=KEY, seq=1, ts_ms=1))
        with pytest.raises(MalformedFrameError, match=f"exceeds the {MAX_REGISTER_BODY} byte"):
            decode_body(env)
        assert parsed == []
        small = encode_body(Register(agent_id="a1"))  # the spy itself lets bodies through
        decode_body(unseal(seal(small, agent_id="a1", key_id="k", key=KEY, seq=1, ts_ms=1)))
        assert parsed == [small.data]


class TestDecodingErrors:
    def test_a_frame_of_many_unknown_fields_gets_a_short_answer(self) -> None:
        """Thousands of unknown fields (an enrolled peer's doing) make one problem per
        object, no did-you-mean each, and the error is clipped: it is logged and sent
        back. (A 2 MB batch used to make an 18 MB message, in seconds of the master's
        loop.)"""
        entry = {"ts": 1.0, "level": "info", "message": "x"}
        entries = [{**entry, **{f"k{i}": 1 for i in range(200)}} for _ in range(1024)]
        body = EncodedBody.of(MessageType.LOG_BATCH, json.dumps({"entries": entries}).encode())
        with pytest.raises(MalformedFrameError) as caught:
            decode_body(unseal(seal(body, **_SEAL)))
        text = str(caught.value)
        assert len(text) < 4100
        assert text.startswith("invalid LOG_BATCH: 1024 problems:")
        assert "entries[0]: has 200 unknown fields ('k0', 'k1', 'k10', 'k100', 'k101', ...)" in text
        assert text.endswith("more characters]")

    def test_a_few_unknown_fields_are_named_one_by_one(self) -> None:
        """Up to five, each its own problem with a did-you-mean (a typo is one or two)."""
        body = EncodedBody.of(
            MessageType.LOG_BATCH,
            json.dumps({"entries": [{"ts": 1.0, "level": "info", "mesage": "x"}]}).encode(),
        )
        with pytest.raises(
            MalformedFrameError,
            match=r"entries\[0\]\.mesage: unknown field 'mesage'; did you mean 'message'\?",
        ):
            decode_body(unseal(seal(body, **_SEAL)))


class TestNegotiation:
    def test_picks_the_newest_common_version(self) -> None:
        """Overlapping ranges negotiate their highest shared version."""
        assert negotiate(1, 5, ours=(2, 3)) == 3
        assert negotiate(1, 1) == 1

    def test_an_older_agent_is_told_to_upgrade(self) -> None:
        """No overlap because the agent is older: the error says to upgrade the agent."""
        with pytest.raises(IncompatibleProtocolError, match=r"agent speaks 1\.\.1.*the agent$"):
            negotiate(1, 1, ours=(2, 3))

    def test_an_older_master_is_told_to_upgrade(self) -> None:
        """No overlap because the master is older: the error says to upgrade the master."""
        with pytest.raises(IncompatibleProtocolError, match="upgrade the master"):
            negotiate(4, 6, ours=(1, 3))


class TestKeySealing:
    def test_round_trip(self) -> None:
        """A sealed session key opens with the same secret and associated data."""
        sealed = seal_key(b"secret", b"session-key", aad=b"a|k")
        assert open_key(b"secret", sealed, aad=b"a|k") == b"session-key"

    @pytest.mark.parametrize(("secret", "aad"), [(b"other", b"a|k"), (b"secret", b"b|k")])
    def test_wrong_secret_or_binding_fails(self, secret: bytes, aad: bytes) -> None:
        """A key sealed for one agent cannot be opened with another secret or binding."""
        sealed = seal_key(b"secret", b"session-key", aad=b"a|k")
        with pytest.raises(BadSignatureError, match="does not open"):
            open_key(secret, sealed, aad=aad)


class TestEnrollmentExchange:
    """The session key of an enrollment is wrapped under the token secret *and* an
    ephemeral X25519 secret: the token, seen in transit, does not open it."""

    def test_both_sides_derive_the_same_wrapping_secret(self) -> None:
        """Agent and master each combine the token secret with their private key and the
        other's public key; the sealed key opens on the other side."""
        agent_private, agent_public = enrollment_keypair()
        master_private, master_public = enrollment_keypair()
        sealed = seal_key(
            enrollment_secret("tok-secret", master_private, agent_public), b"k" * 32, aad=b"a|k"
        )
        wrapping = enrollment_secret("tok-secret", agent_private, master_public)
        assert open_key(wrapping, sealed, aad=b"a|k") == b"k" * 32

    def test_the_token_alone_does_not_open_the_key(self) -> None:
        """An eavesdropper knows the token and both public keys, not a private key."""
        _, agent_public = enrollment_keypair()
        master_private, master_public = enrollment_keypair()
        sealed = seal_key(
            enrollment_secret("tok-secret", master_private, agent_public), b"k" * 32, aad=b"a|k"
        )
        eve_private, _ = enrollment_keypair()
        for guess in (
            b"tok-secret",  # how keys were wrapped before
            enrollment_secret("tok-secret", eve_private, master_public),
            enrollment_secret("tok-secret", eve_private, agent_public),
        ):
            with pytest.raises(BadSignatureError, match="does not open"):
                open_key(guess, sealed, aad=b"a|k")

    @pytest.mark.parametrize(
        "peer_key",
        [
            "",
            "not base64!",
            base64.b64encode(b"\x01" * 31).decode(),
            base64.b64encode(bytes(32)).decode(),  # a low-order point: shared secret all 0
        ],
    )
    def test_a_bad_peer_key_is_refused(self, peer_key: str) -> None:
        """Anything but a usable X25519 public key is a `BadSignatureError` naming it."""
        private, _ = enrollment_keypair()
        with pytest.raises(BadSignatureError, match="enroll_key"):
            enrollment_secret("tok-secret", private, peer_key)

    def test_register_with_a_token_needs_an_enroll_key(self) -> None:
        """A bootstrap token without a valid ``enroll_key`` is refused, naming it."""
        with pytest.raises(ValueError, match="enroll_key"):
            Register(bootstrap_token="abc.def")
        with pytest.raises(ValueError, match="enroll_key"):
            Register(bootstrap_token="abc.def", enroll_key=base64.b64encode(b"x" * 16).decode())
        assert Register(agent_id="a1").enroll_key == ""
