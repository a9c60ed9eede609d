"""Entry point module of ``nxmesh-auth-oauth2``: its settings section and the ``oauth2``
authenticator (imported when the master builds its chain, not at discovery)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from nxmesh import hookimpl
from nxmesh_auth_oauth2.settings import OAuth2Settings

if TYPE_CHECKING:
    from nxmesh.core.interfaces import Authenticator
    from nxmesh.core.settings import SettingsRegistry

SECTION = "auth_oauth2"


@hookimpl
def nxmesh_add_settings(registry: SettingsRegistry) -> None:
    registry.add_section(SECTION, OAuth2Settings)


@hookimpl
def nxmesh_register_authenticators() -> Sequence[type[Authenticator]]:
    from nxmesh_auth_oauth2.authenticator import OAuth2Authenticator

    return [OAuth2Authenticator]
