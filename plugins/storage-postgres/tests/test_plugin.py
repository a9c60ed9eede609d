"""nxmesh-storage-postgres is installed, discovered and declares its settings."""

from __future__ import annotations

from nxmesh.core.pluginmanager import get_plugin_manager
from nxmesh.core.settings import load_settings
from nxmesh_storage_postgres import PostgresSettings


class TestDiscovery:
    def test_is_discovered_as_its_own_distribution(self) -> None:
        """The entry point resolves to this distribution, not the core one."""
        info = get_plugin_manager(environ={}).plugin_info["storage_postgres"]
        assert info.distribution == "nxmesh-storage-postgres"
        assert not info.builtin

    def test_settings_section_reads_environment(self) -> None:
        """[plugins.storage_postgres] values come from NXMESH_PLUGINS__STORAGE_POSTGRES__*."""
        pm = get_plugin_manager(environ={})
        settings = load_settings(
            pm, environ={"NXMESH_PLUGINS__STORAGE_POSTGRES__POOL_MAX_SIZE": "25"}
        )
        section = settings.plugin("storage_postgres")
        assert isinstance(section, PostgresSettings)
        assert section.pool_max_size == 25
