"""How the agent's settings become the renderer's host knobs (`render_settings_of`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nxmesh.agent.layout import render_settings_of
from nxmesh.core.errors import ConfigurationError
from nxmesh.core.pluginmanager import NxMeshPluginManager, get_plugin_manager
from nxmesh.core.settings import load_settings
from nxmesh.plugins.render_nginx import SYSTEM_CA_FILE


def _pm() -> NxMeshPluginManager:
    return get_plugin_manager(autoload=False, environ={})


def test_upstream_ca_file_defaults_to_the_system_trust_store(tmp_path: Path) -> None:
    """Without `agent.upstream_ca_file`, TLS upstreams are verified against Debian's store."""
    settings = load_settings(_pm(), environ={})
    assert render_settings_of(settings).upstream_ca_file == SYSTEM_CA_FILE


def test_upstream_ca_file_reaches_the_renderer(tmp_path: Path) -> None:
    """`[agent] upstream_ca_file` (RHEL's store here) is what the renderer writes."""
    path = tmp_path / "nxmesh.toml"
    path.write_text('[agent]\nupstream_ca_file = "/etc/pki/tls/certs/ca-bundle.crt"\n')
    settings = load_settings(_pm(), path=path, environ={})
    assert render_settings_of(settings).upstream_ca_file == "/etc/pki/tls/certs/ca-bundle.crt"


@pytest.mark.parametrize("value", ["certs/ca.pem", "/etc/$ca.pem"])
def test_upstream_ca_file_must_be_an_absolute_path(value: str) -> None:
    """nginx reads a relative path against its prefix, not the agent's directory: refused,
    naming the setting."""
    env = {"NXMESH_AGENT__UPSTREAM_CA_FILE": value}
    with pytest.raises(ConfigurationError, match="upstream_ca_file must be an absolute file path"):
        load_settings(_pm(), environ=env)
