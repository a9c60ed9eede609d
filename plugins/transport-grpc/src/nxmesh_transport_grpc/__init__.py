"""gRPC transport (grpclib) between the NxMesh master and agents.

grpclib is asyncio-only; it stays inside this distribution.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nxmesh.core.lazy import lazy_exports

# Imported on first use: every process loads this plugin's entry point at start-up.
_EXPORTS = {
    "GrpcSettings": "nxmesh_transport_grpc.settings",
    "GrpcTransport": "nxmesh_transport_grpc.transport",
    "client_context": "nxmesh_transport_grpc.transport",
    "server_context": "nxmesh_transport_grpc.transport",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from nxmesh_transport_grpc.settings import GrpcSettings
    from nxmesh_transport_grpc.transport import GrpcTransport, client_context, server_context

__all__ = [
    "GrpcSettings",
    "GrpcTransport",
    "client_context",
    "server_context",
]
