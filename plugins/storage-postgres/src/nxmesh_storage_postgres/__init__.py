"""PostgreSQL storage for the NxMesh master (``postgresql://`` URLs)."""

from nxmesh_storage_postgres.settings import PostgresSettings

__all__ = ["PostgresSettings"]
