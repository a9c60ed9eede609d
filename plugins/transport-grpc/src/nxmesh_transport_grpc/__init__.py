"""gRPC transport (grpclib) between the NxMesh master and agents."""

from nxmesh_transport_grpc.settings import GrpcSettings

__all__ = ["GrpcSettings"]
