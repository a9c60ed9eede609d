"""Everything NxMesh calls in this plugin. Implement only the hooks you need, taking
only the arguments you use."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import attrs

from nxmesh import HealthResult, hookimpl

if TYPE_CHECKING:
    from nxmesh.core.interfaces import HealthCheck
    from nxmesh.core.settings import Settings, SettingsRegistry

TEMPLATES = Path(__file__).parent / "templates"


@attrs.frozen
class HelloSettings:
    """``[plugins.hello]`` in nxmesh.toml, or NXMESH_PLUGINS__HELLO__GREETING."""

    greeting: str = "hello from nxmesh-hello"


_configured: dict[str, HelloSettings] = {}


class HelloCheck:
    """Always healthy; shows how a check reports a message and a metric."""

    name: ClassVar[str] = "hello"

    async def run(self) -> Sequence[HealthResult]:
        greeting = _configured.get("settings", HelloSettings()).greeting
        return [HealthResult(check=self.name, status="ok", message=greeting, metrics={"up": 1.0})]


@hookimpl
def nxmesh_add_settings(registry: SettingsRegistry) -> None:
    registry.add_section("hello", HelloSettings)


@hookimpl
def nxmesh_configure(settings: Settings) -> None:
    section = settings.plugin("hello")
    assert isinstance(section, HelloSettings)
    _configured["settings"] = section


@hookimpl
def nxmesh_register_health_checks() -> Sequence[type[HealthCheck]]:
    return [HelloCheck]


@hookimpl
def nxmesh_template_paths() -> Sequence[Path]:
    return [TEMPLATES]
