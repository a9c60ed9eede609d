"""Entry point module of ``nxmesh-transport-grpc``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from nxmesh import hookimpl
from nxmesh_transport_grpc.settings import GrpcSettings
from nxmesh_transport_grpc.transport import GrpcTransport

if TYPE_CHECKING:
    from nxmesh.core.settings import SettingsRegistry

SECTION = "transport_grpc"


@hookimpl
def nxmesh_add_settings(registry: SettingsRegistry) -> None:
    registry.add_section(SECTION, GrpcSettings)


@hookimpl
def nxmesh_register_transports() -> Sequence[type[GrpcTransport]]:
    return [GrpcTransport]
