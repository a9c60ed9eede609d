"""PostgreSQL storage for the NxMesh master (``postgresql://`` URLs).

`PostgresStorage` (the storage backend), `PostgresEventBus` (LISTEN/NOTIFY between
masters) and `advisory_lock` (one master at a time for leader-only jobs).
"""

from nxmesh_storage_postgres.backend import PostgresStorage
from nxmesh_storage_postgres.eventbus import PostgresEventBus
from nxmesh_storage_postgres.locks import advisory_lock
from nxmesh_storage_postgres.settings import PostgresSettings

__all__ = ["PostgresEventBus", "PostgresSettings", "PostgresStorage", "advisory_lock"]
