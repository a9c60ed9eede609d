"""The ``[plugins.transport_grpc]`` settings section."""

from __future__ import annotations

from pathlib import Path

import attrs


@attrs.frozen
class GrpcSettings:
    """Stream tuning shared by the gRPC server (master) and client (agent).

    Keepalive: the client pings every `keepalive_time` seconds *while a stream is open*
    and never more than twice without data in between; a ping unanswered for
    `keepalive_timeout` seconds drops the connection. gRPC-core servers (``grpcio``,
    grpc-go) close clients that ping more often than every 5 min *without data*
    (``too_many_pings``); the session's heartbeat sends data every `heartbeat_interval`
    seconds, so our pings always follow data and are never counted against that limit.
    The server pings an idle client every `server_keepalive_time` seconds.
    """

    heartbeat_interval: float = attrs.field(default=30.0, validator=attrs.validators.gt(0))
    max_message_bytes: int = attrs.field(
        default=16 * 1024 * 1024, validator=attrs.validators.ge(64 * 1024)
    )
    reconnect_min: float = attrs.field(default=1.0, validator=attrs.validators.gt(0))
    reconnect_max: float = attrs.field(default=60.0, validator=attrs.validators.gt(0))
    tls: bool = True
    keepalive_time: float = attrs.field(default=60.0, validator=attrs.validators.ge(10))
    keepalive_timeout: float = attrs.field(default=20.0, validator=attrs.validators.gt(0))
    server_keepalive_time: float = attrs.field(default=300.0, validator=attrs.validators.ge(10))
    connect_timeout: float = attrs.field(default=10.0, validator=attrs.validators.gt(0))
    # asyncio reserves a 256 KiB read buffer per TLS connection (SSLProtocol.max_size):
    # 1.25 GB at 5,000 agents. The master lowers it, process-wide, when it starts serving
    # TLS; 0 keeps asyncio's default. 4 KiB: the master mostly reads acks and heartbeats
    # (a few hundred bytes); bigger messages take more reads. Agents never serve, so they
    # keep asyncio's default for the versions they receive. See `limit_tls_read_buffer`.
    tls_read_buffer_bytes: int = attrs.field(default=4 * 1024, validator=attrs.validators.ge(0))
    # Master: swap the ~25 near-empty deques h2, grpclib and asyncio keep per connection for
    # small lists (~19 KB less per agent). It touches those libraries' internals (versions
    # bounded in pyproject.toml); false keeps their containers untouched.
    compact_connections: bool = True
    # Master and agent: h2 builds repr() of every frame it receives for a trace log it then
    # drops, and hyperframe's DATA frame repr copies and hexes the whole body (an agent
    # reading a 64 KB version: ~200 KB of garbage). True swaps that repr for one giving
    # the same text from the bytes it shows (`lean_data_frame_repr`; hyperframe internals,
    # version bounded in pyproject.toml); false leaves hyperframe untouched.
    lean_frame_repr: bool = True
    # Master and agent: hyperframe builds each frame's set of valid flag names anew for
    # every frame. True shares one frozen set per frame class (`lean_frame_flags`;
    # hyperframe internals, version bounded in pyproject.toml); false leaves it untouched.
    lean_frame_flags: bool = True
    # Agent: read each received frame straight out of grpclib's HTTP/2 stream (gRPC
    # prefix, protobuf field header, frame) instead of slicing it out of the whole message
    # (one copy of every version body less). It uses grpclib 0.4's stream internals
    # (bounded in pyproject.toml) and falls back by itself when they are not there; false
    # always takes grpclib's `recv_message`.
    direct_frame_reads: bool = True
    # TLS material. Master: certificate + key to serve (default: created under the state
    # directory, signed by a CA the master creates on first start). Agent: the CA to pin.
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    hostnames: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
