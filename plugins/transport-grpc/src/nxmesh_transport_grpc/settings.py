"""The ``[plugins.transport_grpc]`` settings section."""

from __future__ import annotations

import attrs


@attrs.frozen
class GrpcSettings:
    """Stream tuning shared by the gRPC server (master) and client (agent)."""

    heartbeat_interval: float = attrs.field(default=30.0, validator=attrs.validators.gt(0))
    max_message_bytes: int = attrs.field(
        default=16 * 1024 * 1024, validator=attrs.validators.ge(64 * 1024)
    )
    reconnect_min: float = attrs.field(default=1.0, validator=attrs.validators.gt(0))
    reconnect_max: float = attrs.field(default=60.0, validator=attrs.validators.gt(0))
    tls: bool = True
