"""The example plugin, installed as a real distribution, is discovered and works."""

from __future__ import annotations

from pathlib import Path

import pytest
from nxmesh_hello.plugin import TEMPLATES, HelloCheck

from nxmesh.core.pluginmanager import get_plugin_manager
from nxmesh.core.registry import ProviderRegistries
from nxmesh.core.settings import load_settings
from nxmesh.testing.contracts import HealthCheckContract


class TestDiscovery:
    def test_entry_point_is_discovered_with_its_distribution(self) -> None:
        """The installed example shows up as a third-party plugin named after its entry point."""
        pm = get_plugin_manager(environ={})
        info = pm.plugin_info["hello"]
        assert info.distribution == "nxmesh-hello"
        assert not info.builtin
        assert "nxmesh_register_health_checks" in pm.hooks_of("hello")

    def test_health_check_is_registered_under_the_plugin(self) -> None:
        """The registry attributes the hello check to the hello plugin."""
        registries = ProviderRegistries.collect(get_plugin_manager(environ={}))
        assert registries["health_check"].get("hello") is HelloCheck
        assert {e.name for e in registries.of_plugin("hello")} == {"hello"}

    def test_can_be_blocked_by_name(self) -> None:
        """NXMESH_DISABLE_PLUGINS=hello keeps it out."""
        pm = get_plugin_manager(environ={"NXMESH_DISABLE_PLUGINS": "hello"})
        assert pm.get_plugin("hello") is None

    def test_template_override_directory_ships_with_the_package(self) -> None:
        """The override template is installed beside the plugin module."""
        assert (TEMPLATES / "http_extra.conf.j2").is_file()


class TestSettings:
    @pytest.mark.anyio
    async def test_greeting_comes_from_settings(self) -> None:
        """The [plugins.hello] section, set through the environment, reaches the check."""
        pm = get_plugin_manager(environ={})
        load_settings(pm, environ={"NXMESH_PLUGINS__HELLO__GREETING": "hi there"})
        results = await HelloCheck().run()
        assert results[0].message == "hi there"


class TestHelloContract(HealthCheckContract):
    @pytest.fixture
    def health_check(self, tmp_path: Path) -> HelloCheck:
        (tmp_path / "marker").touch()
        return HelloCheck(tmp_path / "marker")

    @pytest.fixture
    def failing_health_check(self, tmp_path: Path) -> HelloCheck:
        return HelloCheck(tmp_path / "missing")
