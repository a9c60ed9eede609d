"""How the agent's settings become the renderer's host knobs (`render_settings_of`)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from nxmesh.agent import layout
from nxmesh.agent.layout import ipv6_available, render_settings_of
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


def test_proxy_cache_size_reaches_the_renderer(tmp_path: Path) -> None:
    """`[agent] proxy_cache_size` bounds the proxy cache the renderer declares; unset,
    the renderer's 1g."""
    assert render_settings_of(load_settings(_pm(), environ={})).proxy_cache_size == "1g"
    path = tmp_path / "nxmesh.toml"
    path.write_text('[agent]\nproxy_cache_size = "512m"\n')
    settings = load_settings(_pm(), path=path, environ={})
    assert render_settings_of(settings).proxy_cache_size == "512m"


@pytest.mark.parametrize("value", ["1 g", "1g;", "1t", "-1"])
def test_proxy_cache_size_is_an_nginx_size(value: str) -> None:
    """Anything but digits and a k, m or g suffix is refused, naming the setting (it is
    written into nginx.conf)."""
    env = {"NXMESH_AGENT__PROXY_CACHE_SIZE": value}
    with pytest.raises(ConfigurationError, match=r"proxy_cache_size .*must be a size like 10m"):
        load_settings(_pm(), environ=env)


@pytest.mark.parametrize(
    ("value", "available", "expected"),
    [
        ("on", False, True),
        ("off", True, False),
        ("auto", True, True),
        ("auto", False, False),
    ],
)
def test_listen_ipv6_reaches_the_renderer(
    monkeypatch: pytest.MonkeyPatch, value: str, available: bool, expected: bool
) -> None:
    """`[agent] listen_ipv6`: on, off, or auto (when this host's kernel has IPv6)."""
    monkeypatch.setattr(layout, "ipv6_available", lambda: available)
    settings = load_settings(_pm(), environ={"NXMESH_AGENT__LISTEN_IPV6": value})
    assert render_settings_of(settings).listen_ipv6 is expected


class _Socket:
    """A stand-in for `socket.socket` that binds, or refuses as a kernel without IPv6."""

    refuse = False

    def __init__(self, family: int, kind: int) -> None:
        assert family == socket.AF_INET6

    def __enter__(self) -> _Socket:
        return self

    def __exit__(self, *_exc: object) -> None:
        return None

    def bind(self, address: tuple[str, int]) -> None:
        if self.refuse:
            raise OSError(97, "Address family not supported by protocol")


@pytest.mark.parametrize("refuse", [False, True])
def test_ipv6_available_probes_an_ipv6_socket(
    monkeypatch: pytest.MonkeyPatch, refuse: bool
) -> None:
    """IPv6 is available when an AF_INET6 socket binds `::`, and a kernel that refuses
    AF_INET6 is told apart (nginx would fail to start on [::]:80 there)."""
    monkeypatch.setattr(_Socket, "refuse", refuse)
    monkeypatch.setattr(socket, "socket", _Socket)
    assert ipv6_available() is not refuse


def test_listen_ipv6_is_checked() -> None:
    with pytest.raises(ConfigurationError, match="listen_ipv6"):
        load_settings(_pm(), environ={"NXMESH_AGENT__LISTEN_IPV6": "sometimes"})


def test_runtime_dirs_follow_a_pinned_prefix(tmp_path: Path) -> None:
    """With the renderer's `prefix` pinned, the temp files' parent nginx needs is there,
    not under the configuration root (nginx creates only the last directory)."""
    from nxmesh.agent.layout import NginxLayout
    from nxmesh.plugins.render_nginx import RenderSettings

    pinned = tmp_path / "var"
    layout = NginxLayout.for_prefix(tmp_path / "conf", RenderSettings(prefix=str(pinned)))
    assert layout.runtime_dirs() == [pinned / "logs", pinned / "tmp"]
    assert NginxLayout.for_prefix(tmp_path / "conf").runtime_dirs() == [
        tmp_path / "conf" / "logs",
        tmp_path / "conf" / "tmp",
    ]


@pytest.mark.parametrize("value", ["0", "0g", "000m"])
def test_proxy_cache_size_is_more_than_nothing(value: str) -> None:
    env = {"NXMESH_AGENT__PROXY_CACHE_SIZE": value}
    with pytest.raises(ConfigurationError, match="proxy_cache_size must be more than 0"):
        load_settings(_pm(), environ=env)
