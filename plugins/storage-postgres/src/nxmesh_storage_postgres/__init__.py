"""PostgreSQL storage for the NxMesh master (``postgresql://`` URLs).

`PostgresStorage` (the storage backend), `PostgresEventBus` (LISTEN/NOTIFY between
masters) and `advisory_lock` (one master at a time for leader-only jobs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nxmesh.core.lazy import lazy_exports

# Imported on first use: every process loads this plugin's entry point at start-up.
_EXPORTS = {
    "PostgresEventBus": "nxmesh_storage_postgres.eventbus",
    "PostgresSettings": "nxmesh_storage_postgres.settings",
    "PostgresStorage": "nxmesh_storage_postgres.backend",
    "advisory_lock": "nxmesh_storage_postgres.locks",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from nxmesh_storage_postgres.backend import PostgresStorage
    from nxmesh_storage_postgres.eventbus import PostgresEventBus
    from nxmesh_storage_postgres.locks import advisory_lock
    from nxmesh_storage_postgres.settings import PostgresSettings

__all__ = [
    "PostgresEventBus",
    "PostgresSettings",
    "PostgresStorage",
    "advisory_lock",
]
