"""Entry point module of ``nxmesh-storage-postgres``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nxmesh import hookimpl
from nxmesh_storage_postgres.settings import PostgresSettings

if TYPE_CHECKING:
    from nxmesh.core.settings import SettingsRegistry

SECTION = "storage_postgres"


@hookimpl
def nxmesh_add_settings(registry: SettingsRegistry) -> None:
    registry.add_section(SECTION, PostgresSettings)
