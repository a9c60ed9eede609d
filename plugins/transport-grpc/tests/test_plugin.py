"""nxmesh-transport-grpc is installed, discovered and declares its settings."""

from __future__ import annotations

import pytest

from nxmesh.core.errors import ConfigurationError
from nxmesh.core.pluginmanager import get_plugin_manager
from nxmesh.core.settings import load_settings
from nxmesh_transport_grpc import GrpcSettings


class TestDiscovery:
    def test_is_discovered_as_its_own_distribution(self) -> None:
        """The entry point resolves to this distribution, not the core one."""
        info = get_plugin_manager(environ={}).plugin_info["transport_grpc"]
        assert info.distribution == "nxmesh-transport-grpc"

    def test_settings_defaults_have_tls_on(self) -> None:
        """TLS is on by default and the heartbeat is 30 s."""
        settings = load_settings(get_plugin_manager(environ={}), environ={})
        section = settings.plugin("transport_grpc")
        assert isinstance(section, GrpcSettings)
        assert section.tls is True
        assert section.heartbeat_interval == 30.0

    def test_bad_value_names_the_setting(self) -> None:
        """A too-small message size limit is rejected naming the setting."""
        with pytest.raises(ConfigurationError, match="max_message_bytes"):
            load_settings(
                get_plugin_manager(environ={}),
                environ={"NXMESH_PLUGINS__TRANSPORT_GRPC__MAX_MESSAGE_BYTES": "10"},
            )
