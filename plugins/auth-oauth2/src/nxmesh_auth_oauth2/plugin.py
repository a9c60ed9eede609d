"""Entry point module of ``nxmesh-auth-oauth2``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nxmesh import hookimpl
from nxmesh_auth_oauth2.settings import OAuth2Settings

if TYPE_CHECKING:
    from nxmesh.core.settings import SettingsRegistry

SECTION = "auth_oauth2"


@hookimpl
def nxmesh_add_settings(registry: SettingsRegistry) -> None:
    registry.add_section(SECTION, OAuth2Settings)
