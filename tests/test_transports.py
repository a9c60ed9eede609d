"""Transports from settings: the agent's endpoints, TLS contexts, the master's listen URLs."""

from __future__ import annotations

import ssl
import subprocess
import time
from collections.abc import AsyncIterator, MutableMapping
from pathlib import Path
from typing import Any, cast

import anyio
import pytest
from structlog.testing import capture_logs

from nxmesh.agent.master_link import link_from_settings, read_bootstrap_token
from nxmesh.agent.process import nginx_version
from nxmesh.core.envelope import EncodedBody, MessageType, seal, unseal
from nxmesh.core.errors import ConfigurationError
from nxmesh.core.interfaces import Channel
from nxmesh.core.pluginmanager import get_plugin_manager
from nxmesh.core.protocol import RegisterResponse, decode_body
from nxmesh.core.registry import ProviderRegistries
from nxmesh.core.settings import Settings, load_settings
from nxmesh.crypto.secrets import MasterKeyring, generate_key
from nxmesh.enrollment import Enrollment
from nxmesh.master.agent_plane import AgentPlane
from nxmesh.plugins.storage_sqlite import SqliteStorage
from nxmesh.session_hub import MasterSessionHub
from nxmesh.testing.services import require_module
from nxmesh.tls import ensure_tls_material
from nxmesh.transports import agent_endpoints, build_client, build_server, server_url

require_module("nxmesh_transport_grpc")  # the gRPC plugin: skip locally, fail in CI


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

    def test_the_defaults_reach_a_default_master(
        self, pm: Any, registry: ProviderRegistries
    ) -> None:
        """With nothing set, both endpoints point at what `nxmesh master` serves by
        default: gRPC with TLS on 8471, the WebSocket mount of the plain-HTTP API."""
        assert urls(registry, settings(pm)) == [
            ("grpc", "grpcs://127.0.0.1:8471"),
            ("websocket", "ws://127.0.0.1:8470/agent"),
        ]

    def test_a_websocket_url_without_a_path_gets_the_mount(
        self, pm: Any, registry: ProviderRegistries
    ) -> None:
        s = settings(pm, **{"agent.master_url": "wss://m.test:8470"})
        assert urls(registry, s) == [
            ("grpc", "grpcs://m.test:8471"),
            ("websocket", "wss://m.test:8470/agent"),
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
        # Enrolled: the stored credentials are used; a token is kept for enrolling again
        # should the master refuse them (see TestReenrollment).
        (tmp_path / "agent" / "credentials.json").write_text("{}")
        again = link_from_settings(registry, s, token="other.secret", name="a")
        assert again is not None
        assert again.bootstrap_token == "other.secret"

    def test_the_link_reports_the_nginx_version_it_runs(
        self, pm: Any, registry: ProviderRegistries, tmp_path: Path
    ) -> None:
        """Register carries what ``agent.nginx_binary -v`` says (``agents show``'s nginx
        column); nothing when that binary cannot run (a sidecar's nginx lives in another
        container) or is not nginx."""
        from nxmesh.testing.services import require_binary

        nginx = require_binary("nginx")
        real = subprocess.run([nginx, "-v"], capture_output=True, text=True, check=True)
        s = settings(pm, state_dir=str(tmp_path), **{"agent.nginx_binary": nginx})
        link = link_from_settings(registry, s, token="id.secret", name="a")
        assert link is not None
        assert link.nginx_version is None  # read at each registration, not at start
        source = link.nginx_version_source
        assert source is not None
        announced = source()
        assert announced is not None
        assert f"nginx/{announced}" in real.stderr
        fake = tmp_path / "fake-nginx"
        fake.write_text("#!/bin/sh\necho 'nginx version: openresty/1.21.4.1' >&2\n")
        fake.chmod(0o755)
        assert nginx_version(str(fake)) == "1.21.4.1"
        assert nginx_version(str(tmp_path / "missing")) is None
        assert nginx_version("/bin/true") is None


@pytest.fixture
async def hub() -> AsyncIterator[MasterSessionHub]:
    storage = SqliteStorage("sqlite://", keyring=MasterKeyring(generate_key()))
    await storage.open()
    try:
        yield MasterSessionHub(Enrollment(storage))
    finally:
        await storage.aclose()


async def _over_the_mount(plane: AgentPlane, *frames: bytes) -> list[MutableMapping[str, Any]]:
    """Run one agent WebSocket through the master's ASGI mount (`serve_websocket`):
    connect, send `frames`, then wait; what the mount sent back."""
    incoming: list[MutableMapping[str, Any]] = [{"type": "websocket.connect"}]
    incoming += [{"type": "websocket.receive", "bytes": frame} for frame in frames]
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> MutableMapping[str, Any]:
        if incoming:
            return incoming.pop(0)
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "websocket", "path": "/agent", "client": ("127.0.0.1", 1)}
    with anyio.fail_after(10):
        await plane.serve_websocket(scope, receive, send)
    return sent


@pytest.mark.anyio
class TestAgentWebSocketMount:
    """The master's WebSocket mount on its API listener (`AgentPlane.serve_websocket`)."""

    async def test_a_register_nested_too_deeply_is_answered_as_malformed(
        self, hub: MasterSessionHub
    ) -> None:
        """Deeply nested JSON in a Register is a malformed frame: answered, counted and
        closed normally (it used to escape as a RecursionError hypercorn dropped)."""
        plane = AgentPlane(
            hub=hub, orchestrator=cast(Any, None), websocket=hub.handler("websocket")
        )
        body = b"[" * 20_000 + b"]" * 20_000
        frame = seal(
            EncodedBody.of(MessageType.REGISTER, body),
            agent_id="",
            key_id="",
            key=None,
            seq=1,
            ts_ms=int(time.time() * 1000),
        )
        sent = await _over_the_mount(plane, frame)
        assert [m["type"] for m in sent] == [
            "websocket.accept",
            "websocket.send",
            "websocket.close",
        ]
        answer = decode_body(unseal(sent[1]["bytes"]))
        assert isinstance(answer, RegisterResponse)
        assert (answer.accepted, answer.code) == (False, "malformed")
        assert "not JSON" in answer.error
        assert hub.counters.malformed == 1
        assert sent[2]["code"] == 1000

    async def test_a_failing_session_is_logged_once_and_closed(self, hub: MasterSessionHub) -> None:
        """An unexpected error in a session is one log entry (with its traceback) and the
        connection closed, like the transports' own listeners; it does not escape to the
        ASGI server (hypercorn dropped it without a word)."""

        async def failing(channel: Channel, peer: str) -> None:
            await channel.receive()
            raise RuntimeError("bug")

        plane = AgentPlane(hub=hub, orchestrator=cast(Any, None), websocket=cast(Any, failing))
        with capture_logs() as logs:
            sent = await _over_the_mount(plane, b"frame")
        failures = [e for e in logs if e["log_level"] == "error"]
        assert [e["event"] for e in failures] == ["agent websocket session failed"]
        assert failures[0]["exc_info"] is True
        assert sent[-1] == {"type": "websocket.close", "code": 1000}
