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
    #: A file that must exist (a deploy marker, a mounted secret...); None: not watched.
    watch_file: Path | None = None


_configured: dict[str, HelloSettings] = {}


class HelloCheck:
    """Greets, and fails when the watched file is missing: how a check reports a
    message, a metric and a problem."""

    name: ClassVar[str] = "hello"

    def __init__(self, watch_file: Path | None = None) -> None:
        configured = _configured.get("settings", HelloSettings())
        self.greeting = configured.greeting
        self.watch_file = watch_file or configured.watch_file

    async def run(self) -> Sequence[HealthResult]:
        if self.watch_file is not None and not self.watch_file.exists():
            return [
                HealthResult(
                    check=self.name,
                    status="fail",
                    message=f"{self.watch_file} is missing",
                    metrics={"up": 0.0},
                )
            ]
        return [
            HealthResult(check=self.name, status="ok", message=self.greeting, metrics={"up": 1.0})
        ]


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
