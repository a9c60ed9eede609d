"""Built-in SQLite storage plugin (``sqlite:///path/to/master.db``): the embedded default.

The backend itself lives in `nxmesh.sql.sqlite`; this entry-point module stays free of
SQLAlchemy so processes that never open storage (agents) do not pay for importing it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from nxmesh import hookimpl
from nxmesh.core.lazy import lazy_exports

if TYPE_CHECKING:
    from nxmesh.core.interfaces import StorageBackend
    from nxmesh.sql.sqlite import SqliteStorage

__getattr__, __dir__ = lazy_exports(__name__, {"SqliteStorage": "nxmesh.sql.sqlite"})
__all__ = ["SqliteStorage", "nxmesh_register_storage_backends"]


@hookimpl(trylast=True)
def nxmesh_register_storage_backends() -> Sequence[type[StorageBackend]]:
    from nxmesh.sql.sqlite import SqliteStorage

    return [SqliteStorage]
