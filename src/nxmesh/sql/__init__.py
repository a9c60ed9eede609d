"""The SQL layer both storage backends share: tables, Alembic migrations, `SqlStorage`.

`nxmesh.plugins.storage_sqlite` and ``nxmesh-storage-postgres`` only create the engine;
everything else — the schema (`nxmesh.sql.tables`), its migrations
(`nxmesh.sql.migrations`) and every storage operation — lives here once.
"""

from nxmesh.sql.backend import SqlStorage
from nxmesh.sql.migrations import upgrade_to_head
from nxmesh.sql.tables import metadata

__all__ = ["SqlStorage", "metadata", "upgrade_to_head"]
