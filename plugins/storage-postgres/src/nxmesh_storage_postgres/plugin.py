"""Entry point module of ``nxmesh-storage-postgres``.

Every NxMesh process imports this module at start-up, agents included, so the heavy
modules (SQLAlchemy, psycopg, Alembic) are imported inside the hooks that return them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from nxmesh import hookimpl
from nxmesh_storage_postgres.settings import SECTION, PostgresSettings

if TYPE_CHECKING:
    from nxmesh.core.interfaces import EventBus, StorageBackend
    from nxmesh.core.settings import SettingsRegistry


@hookimpl
def nxmesh_add_settings(registry: SettingsRegistry) -> None:
    registry.add_section(SECTION, PostgresSettings)


@hookimpl
def nxmesh_register_storage_backends() -> Sequence[type[StorageBackend]]:
    from nxmesh_storage_postgres.backend import PostgresStorage

    return [PostgresStorage]


@hookimpl
def nxmesh_register_event_buses() -> Sequence[type[EventBus]]:
    from nxmesh_storage_postgres.eventbus import PostgresEventBus

    return [PostgresEventBus]
