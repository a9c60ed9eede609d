"""Transports from settings: the agent's endpoints, TLS contexts, the master's listen URLs."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest

from nxmesh.agent.master_link import link_from_settings, read_bootstrap_token
from nxmesh.core.errors import ConfigurationError
from nxmesh.core.pluginmanager import get_plugin_manager
from nxmesh.core.registry import ProviderRegistries
from nxmesh.core.settings import Settings, load_settings
from nxmesh.tls import ensure_tls_material
from nxmesh.transports import agent_endpoints, build_client, build_server, server_url

pytest.importorskip("nxmesh_transport_grpc")


@pytest.fixture(scope="module")
def pm() -> Any:
    return get_plugin_manager(environ={})


@pytest.fixture(scope="module")
def registry(pm: Any) -> ProviderRegistries:
    return ProviderRegistries.collect(pm)


def settings(pm: Any, **overrides: object) -> Settings:
    return load_settings(pm, environ={}, overrides=overrides)


def urls(registry: ProviderRegistries, s: Settings) -> list[tuple[str, str]]:
    return [(e.name, e.url) for e in agent_endpoints(registry, s)]


class TestAgentEndpoints:
    def test_from_the_api_url(self, pm: Any, registry: ProviderRegistries) -> None:
        """http(s):// names the API: WebSocket is mounted there, gRPC on master.grpc_port."""
        s = settings(pm, **{"agent.master_url": "http://master.test:9000"})
        assert urls(registry, s) == [
            ("grpc", "grpcs://master.test:8471"),
            ("websocket", "ws://master.test:9000/agent"),
        ]
        s = settings(pm, **{"agent.master_url": "https://m.test", "master.grpc_port": 7000})
        assert urls(registry, s) == [
            ("grpc", "grpcs://m.test:7000"),
            ("websocket", "wss://m.test/agent"),
        ]

    def test_from_a_grpc_url_with_websocket_fallback(
        self, pm: Any, registry: ProviderRegistries
    ) -> None:
        s = settings(pm, **{"agent.master_url": "grpcs://m.test:8471", "master.api_port": 80})
        assert urls(registry, s) == [
            ("grpc", "grpcs://m.test:8471"),
            ("websocket", "ws://m.test:80/agent"),
        ]

    def test_order_and_plain_grpc(self, pm: Any, registry: ProviderRegistries) -> None:
        s = settings(
            pm,
            **{
                "agent.master_url": "ws://m.test:1/agent",
                "agent.transports": ["websocket", "grpc"],
                "plugins.transport_grpc.tls": False,
            },
        )
        assert urls(registry, s) == [
            ("websocket", "ws://m.test:1/agent"),
            ("grpc", "grpc://m.test:8471"),
        ]

    def test_explicit_endpoints_win(self, pm: Any, registry: ProviderRegistries) -> None:
        s = settings(pm, **{"agent.endpoints": ["wss://a.test/x", "grpcs://b.test:1"]})
        assert urls(registry, s) == [("websocket", "wss://a.test/x"), ("grpc", "grpcs://b.test:1")]
        bad = settings(pm, **{"agent.endpoints": ["carrier-pigeon://coop"]})
        with pytest.raises(ConfigurationError, match=r"agent\.endpoints"):
            agent_endpoints(registry, bad)

    def test_uninstalled_transports_are_skipped(
        self, pm: Any, registry: ProviderRegistries
    ) -> None:
        s = settings(pm, **{"agent.transports": ["nope", "websocket"]})
        assert [name for name, _ in urls(registry, s)] == ["websocket"]
        none = settings(pm, **{"agent.transports": ["nope"]})
        with pytest.raises(ConfigurationError, match="no usable transport"):
            agent_endpoints(registry, none)


class TestTls:
    def test_master_serves_with_its_own_ca_and_agents_pin_it(
        self, pm: Any, registry: ProviderRegistries, tmp_path: Path
    ) -> None:
        s = settings(pm, state_dir=str(tmp_path), **{"master.grpc_port": 0})
        grpc = registry["transport"].get("grpc")
        url = server_url(grpc, s, 0)
        assert url == "grpcs://127.0.0.1:0"
        server = build_server(grpc, s, url)
        assert isinstance(server.ssl_context, ssl.SSLContext)
        assert (tmp_path / "tls" / "ca.pem").exists()  # the CA agents pin
        agent = settings(pm, **{"agent.ca_file": str(tmp_path / "tls" / "ca.pem")})
        client = build_client(grpc, agent, "grpcs://127.0.0.1:1")
        assert client.ssl_context.verify_mode == ssl.CERT_REQUIRED
        ws = registry["transport"].get("websocket")
        assert build_client(ws, agent, "ws://127.0.0.1:1/agent").ssl_context is None
        assert build_client(ws, agent, "wss://127.0.0.1:1/agent").ssl_context is not None

    def test_own_certificate_from_the_transport_section(
        self, pm: Any, registry: ProviderRegistries, tmp_path: Path
    ) -> None:
        files = ensure_tls_material(tmp_path / "own", hostnames=["m.test"])
        s = settings(
            pm,
            state_dir=str(tmp_path / "state"),
            **{
                "plugins.transport_grpc.cert_file": str(files.cert),
                "plugins.transport_grpc.key_file": str(files.key),
            },
        )
        grpc = registry["transport"].get("grpc")
        build_server(grpc, s, server_url(grpc, s, 0))
        assert not (tmp_path / "state" / "tls").exists()  # no generated CA needed


class TestEnrollmentSettings:
    def test_token_sources_in_order(self, pm: Any, tmp_path: Path) -> None:
        token_file = tmp_path / "token"
        token_file.write_text("file.secret\n")
        s = settings(pm, **{"agent.bootstrap_token": "env.secret"})
        assert read_bootstrap_token(s, token="flag.secret") == "flag.secret"
        assert read_bootstrap_token(s, token_file=token_file) == "file.secret"
        assert read_bootstrap_token(s) == "env.secret"
        by_setting = settings(pm, **{"agent.bootstrap_token_file": str(token_file)})
        assert read_bootstrap_token(by_setting) == "file.secret"
        assert read_bootstrap_token(settings(pm)) is None
        token_file.write_text("")
        with pytest.raises(ConfigurationError, match="empty"):
            read_bootstrap_token(s, token_file=token_file)

    def test_no_link_without_credentials_or_token(
        self, pm: Any, registry: ProviderRegistries, tmp_path: Path
    ) -> None:
        s = settings(pm, state_dir=str(tmp_path))
        assert link_from_settings(registry, s, token=None, name="a") is None
        link = link_from_settings(registry, s, token="id.secret", name="a")
        assert link is not None
        assert link.bootstrap_token == "id.secret"
        assert (tmp_path / "agent").stat().st_mode & 0o777 == 0o700
        # Enrolled: the stored credentials are used, a token is ignored.
        (tmp_path / "agent" / "credentials.json").write_text("{}")
        again = link_from_settings(registry, s, token="other.secret", name="a")
        assert again is not None
        assert again.bootstrap_token is None
