"""gRPC transport (grpclib) between the NxMesh master and agents.

grpclib is asyncio-only; it stays inside this distribution.
"""

from nxmesh_transport_grpc.settings import GrpcSettings
from nxmesh_transport_grpc.transport import GrpcTransport, client_context, server_context

__all__ = ["GrpcSettings", "GrpcTransport", "client_context", "server_context"]
