"""Entry point module of ``nxmesh-transport-grpc``.

Every NxMesh process imports this module at start-up; grpclib and protobuf are imported
only when the transport is actually registered.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from nxmesh import hookimpl
from nxmesh_transport_grpc.settings import GrpcSettings

if TYPE_CHECKING:
    from nxmesh.core.settings import SettingsRegistry
    from nxmesh_transport_grpc.transport import GrpcTransport

SECTION = "transport_grpc"


@hookimpl
def nxmesh_add_settings(registry: SettingsRegistry) -> None:
    registry.add_section(SECTION, GrpcSettings)


@hookimpl
def nxmesh_register_transports() -> Sequence[type[GrpcTransport]]:
    from nxmesh_transport_grpc.transport import GrpcTransport

    return [GrpcTransport]
