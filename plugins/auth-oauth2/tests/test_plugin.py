"""nxmesh-auth-oauth2 is installed, discovered and keeps its secret out of output."""

from __future__ import annotations

from nxmesh.core.pluginmanager import get_plugin_manager
from nxmesh.core.settings import load_settings, settings_as_dict


class TestDiscovery:
    def test_is_discovered_as_its_own_distribution(self) -> None:
        """The entry point resolves to this distribution, not the core one."""
        info = get_plugin_manager(environ={}).plugin_info["auth_oauth2"]
        assert info.distribution == "nxmesh-auth-oauth2"

    def test_client_secret_is_redacted(self) -> None:
        """The client secret never appears in the settings dump."""
        settings = load_settings(
            get_plugin_manager(environ={}),
            environ={"NXMESH_PLUGINS__AUTH_OAUTH2__CLIENT_SECRET": "very-secret-value"},
        )
        assert "very-secret-value" not in repr(settings)
        assert "very-secret-value" not in str(settings_as_dict(settings, redact=True))

    def test_registers_the_oauth2_authenticator(self) -> None:
        """``oauth2`` is an authenticator provider, for ``auth.chain``."""
        from nxmesh.core.registry import ProviderRegistries
        from nxmesh_auth_oauth2 import OAuth2Authenticator

        registries = ProviderRegistries.collect(get_plugin_manager(environ={}))
        assert registries["authenticator"].get("oauth2") is OAuth2Authenticator
