"""The built-in nginx driver plugin (``reload``): the agent's safe apply pipeline.

Registered through the ``nxmesh`` entry point ``nginx_driver``. Settings live in
``[plugins.nginx_driver]`` (`DriverSettings`). See `ReloadDriver` for the stages and
``docs/agent.md`` for the on-disk layout and the failure handling.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from nxmesh import hookimpl
from nxmesh.plugins.nginx_driver.driver import (
    ENV_PAUSE_AT,
    ENV_PAUSE_FILE,
    STAGES,
    DriverSettings,
    ReloadDriver,
)
from nxmesh.plugins.nginx_driver.inspect import StatusEndpoint, error_logs, status_endpoint
from nxmesh.plugins.nginx_driver.releases import ReleaseStore

if TYPE_CHECKING:
    from nxmesh.core.interfaces import NginxDriver
    from nxmesh.core.settings import SettingsRegistry

__all__ = [
    "ENV_PAUSE_AT",
    "ENV_PAUSE_FILE",
    "SECTION",
    "STAGES",
    "DriverSettings",
    "ReleaseStore",
    "ReloadDriver",
    "StatusEndpoint",
    "error_logs",
    "status_endpoint",
]

SECTION = "nginx_driver"


@hookimpl
def nxmesh_add_settings(registry: SettingsRegistry) -> None:
    registry.add_section(SECTION, DriverSettings)


@hookimpl(trylast=True)
def nxmesh_register_nginx_drivers() -> Sequence[type[NginxDriver]]:
    return [ReloadDriver]
