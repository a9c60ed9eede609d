"""Composition of the master app: first start, settings errors, plugin routes and event
hooks, readiness, the generated OpenAPI document and OpenTelemetry tracing."""

from __future__ import annotations

import contextlib
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from litestar import get
from litestar.testing import TestClient
from structlog.testing import capture_logs

from nxmesh import hookimpl
from nxmesh.core.errors import ConfigurationError
from nxmesh.core.events import Event
from nxmesh.core.pluginmanager import NxMeshPluginManager
from nxmesh.core.records import StorageError
from nxmesh.core.serialization import unstructure
from nxmesh.master.app import build_app, open_services, shown_url
from nxmesh.testing import make_state

from .conftest import Master, make_settings


@get("/api/v1/plugins/hello", opt={"permission": "config:read"})
async def hello() -> dict[str, str]:
    return {"hello": "world"}


@get("/api/v1/plugins/forgot")
async def forgot() -> dict[str, str]:
    return {"secret": "everyone"}


class ExamplePlugin:
    """A third-party plugin adding routes and observing events."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    @hookimpl
    def nxmesh_api_routes(self) -> list[Any]:
        return [hello, forgot]

    @hookimpl
    def nxmesh_on_event(self, event: Event) -> None:
        self.events.append(event)


class TestFirstStart:
    """The initial admin and the files of the state directory."""

    def test_initial_admin_password_file(self, master: Master) -> None:
        """An admin exists with a random password in a 0600 file; keys are private too."""
        state_dir = master.services.state_dir
        password_file = state_dir / "initial-admin-password"
        assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
        assert len(master.admin_password()) >= 24
        for name in ("master.key", "signing.key", "api-jwt.key"):
            assert stat.S_IMODE((state_dir / name).stat().st_mode) == 0o600
        users = master.call(master.services.storage.list_users)
        assert [(u.username, u.roles) for u in users] == [("admin", ("admin",))]

    def test_restart_keeps_users_and_keys(
        self, plugin_manager: NxMeshPluginManager, tmp_path: Path
    ) -> None:
        """A second start with the same state directory creates nothing new."""
        settings = make_settings(plugin_manager, tmp_path / "state")
        with TestClient(build_app(pm=plugin_manager, settings=settings)) as client:
            token = client.app.state.services.auth.tokens.issue(
                "admin", ["admin"], authenticator="password"
            )
        password = (settings.state_dir / "initial-admin-password").read_text()
        with TestClient(build_app(pm=plugin_manager, settings=settings)) as client:
            assert (settings.state_dir / "initial-admin-password").read_text() == password
            me = client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {token.token}"})
            assert me.status_code == 200, "the token signing key changed across restarts"
            users = client.blocking_portal.call(client.app.state.services.storage.list_users)
            assert len(users) == 1


class TestStartupLog:
    pytestmark = pytest.mark.anyio

    @pytest.mark.parametrize("password", ["ab/cd", "pa ss"])
    async def test_event_bus_url_is_logged_without_its_password(
        self,
        anyio_backend: str,
        plugin_manager: NxMeshPluginManager,
        tmp_path: Path,
        template_state: Path,
        password: str,
    ) -> None:
        """``master services ready`` names the event bus with its password hidden, also a
        password holding ``/`` or a space (which the log's text redaction alone misses)."""
        shutil.copytree(template_state, tmp_path / "state")
        settings = make_settings(
            plugin_manager, tmp_path / "state", event_bus_url=f"memory://nx:{password}@bus/x"
        )
        with capture_logs() as logs:
            async with open_services(plugin_manager, settings):
                pass
        [ready] = [e for e in logs if e["event"] == "master services ready"]
        assert ready["event_bus"] == "memory://nx:***@bus/x"
        assert password not in repr(logs)

    def test_shown_url(self) -> None:
        assert shown_url("postgresql://nx:ab/cd@db/x") == "postgresql://nx:***@db/x"
        assert shown_url("postgresql://nx:pa ss@db/x") == "postgresql://nx:***@db/x"
        assert shown_url("postgresql://db/x?password=pw") == "postgresql://db/x?password=***"
        assert shown_url("memory://") == "memory://"


class TestSettingsErrors:
    """Misconfiguration stops the master at startup with a message naming the setting."""

    def test_auth_section_from_toml_and_environment(
        self, plugin_manager: NxMeshPluginManager, tmp_path: Path
    ) -> None:
        """``[auth]`` and ``[auth.roles]`` load from the file; the environment overrides."""
        from nxmesh.core.settings import load_settings

        config = tmp_path / "nxmesh.toml"
        config.write_text(
            '[auth]\naccess_token_ttl = 300\n[auth.roles]\nops = ["config:*", "agent:read@prod"]\n'
        )
        settings = load_settings(
            plugin_manager, path=config, environ={"NXMESH_AUTH__CHAIN": "jwt,password"}
        )
        assert settings.auth.access_token_ttl == 300
        assert settings.auth.roles == {"ops": ("config:*", "agent:read@prod")}
        assert settings.auth.chain == ("jwt", "password")
        with pytest.raises(ConfigurationError, match="lockout_threshold"):
            load_settings(plugin_manager, environ={"NXMESH_AUTH__LOCKOUT_THRESHOLD": "0"})

    pytestmark = pytest.mark.anyio

    async def test_unknown_authenticator(
        self, anyio_backend: str, plugin_manager: NxMeshPluginManager, tmp_path: Path
    ) -> None:
        """An ``auth.chain`` entry no plugin registers is refused, with a suggestion."""
        settings = make_settings(plugin_manager, tmp_path, **{"auth.chain": "jwt,pasword"})
        with pytest.raises(ConfigurationError, match=r"auth\.chain.*did you mean 'password'"):
            async with open_services(plugin_manager, settings):
                pass

    async def test_bad_custom_role(
        self, anyio_backend: str, plugin_manager: NxMeshPluginManager, tmp_path: Path
    ) -> None:
        """A custom role with a malformed permission is refused."""
        settings = make_settings(plugin_manager, tmp_path, **{"auth.roles": {"ops": ["x"]}})
        with pytest.raises(ConfigurationError, match=r"auth\.roles\.ops"):
            async with open_services(plugin_manager, settings):
                pass

    async def test_unknown_storage_scheme(
        self, anyio_backend: str, plugin_manager: NxMeshPluginManager, tmp_path: Path
    ) -> None:
        """A storage URL no backend handles names the scheme."""
        settings = make_settings(plugin_manager, tmp_path, storage_url="mongodb://x")
        with pytest.raises(ConfigurationError, match="mongodb"):
            async with open_services(plugin_manager, settings):
                pass

    def test_build_app_needs_something_to_serve(self) -> None:
        """Neither services nor pm and settings is a programming error."""
        with pytest.raises(TypeError):
            build_app()


class TestPlugins:
    """Routes from ``nxmesh_api_routes`` get the same auth; events reach ``nxmesh_on_event``."""

    @pytest.fixture
    def plugin(self) -> ExamplePlugin:
        return ExamplePlugin()

    @pytest.fixture
    def plugged(
        self, make_plugin_manager: Any, plugin: ExamplePlugin, tmp_path: Path
    ) -> Iterator[Master]:
        pm = make_plugin_manager(plugin)
        with TestClient(build_app(pm=pm, settings=make_settings(pm, tmp_path))) as client:
            yield Master(client)

    def test_plugin_routes_are_authorized_like_builtins(self, plugged: Master) -> None:
        """A declared permission is enforced; an undeclared one denies everybody."""
        c = plugged.client
        assert c.get("/api/v1/plugins/hello").status_code == 401
        assert c.get("/api/v1/plugins/hello", headers=plugged.headers("viewer")).json() == {
            "hello": "world"
        }
        assert c.get("/api/v1/plugins/hello", headers=plugged.headers("nobody")).status_code == 403
        denied = c.get("/api/v1/plugins/forgot", headers=plugged.headers("admin"))
        assert denied.status_code == 403
        assert "<undeclared>" in denied.json()["detail"]

    def test_events_reach_plugins(self, plugged: Master, plugin: ExamplePlugin) -> None:
        """A new version is delivered to ``nxmesh_on_event`` through the event bus."""
        response = plugged.client.put(
            "/api/v1/workspaces/default/state",
            json=unstructure(make_state()),
            headers=plugged.headers("admin", subject="admin"),
        )
        assert response.status_code == 200
        deadline = time.monotonic() + 5
        while "version.created" not in {e.kind for e in plugin.events}:
            assert time.monotonic() < deadline, [e.kind for e in plugin.events]
            time.sleep(0.01)
        created = next(e for e in plugin.events if e.kind == "version.created")
        assert (created.workspace, created.payload["number"]) == ("default", 1)


class TestHealth:
    """Liveness is the process; readiness is storage answering."""

    def test_readyz_reports_storage_failure(
        self, master: Master, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """503 with a reason when storage fails, 200 otherwise."""
        assert master.client.get("/readyz").json()["status"] == "ok"

        async def broken() -> None:
            raise OSError("database is gone")

        monkeypatch.setattr(master.services.storage, "ping", broken)
        response = master.client.get("/readyz")
        assert response.status_code == 503
        assert response.json() == {"status": "unavailable", "detail": "storage: OSError"}
        assert master.client.get("/healthz").status_code == 200


class TestOpenApi:
    """The generated OpenAPI 3.1 document."""

    def test_document(self, master: Master) -> None:
        """3.1, attrs models with their YAML spellings, strict objects, bearer security."""
        doc = master.client.get("/openapi.json").json()
        assert doc["openapi"].startswith("3.1")
        location = doc["components"]["schemas"]["Location"]
        assert "return" in location["properties"]
        assert "return_" not in location["properties"]
        assert location["additionalProperties"] is False
        assert location["required"] == ["path"]
        assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        put_state = doc["paths"]["/api/v1/workspaces/{workspace}/state"]["put"]
        assert put_state["security"] == [{"bearer": []}]
        body = put_state["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": "#/components/schemas/DesiredState"}
        login = doc["paths"]["/api/v1/auth/login"]["post"]
        assert "security" not in login
        assert "/docs" not in doc["paths"]
        assert "swagger" in master.client.get("/docs").text.lower()


@pytest.fixture(scope="module")
def exporter() -> Any:
    """Spans recorded in memory (the global tracer provider can only be set once)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


class TestTracing:
    """OpenTelemetry spans around the API call and version creation, context in the event."""

    def test_one_trace_from_request_to_event(self, master: Master, exporter: Any) -> None:
        """The version span is a child of the request span, and the event carries the trace."""
        exporter.clear()
        with master.client.websocket_connect(
            "/api/v1/events", headers=master.headers("admin", subject="admin")
        ) as ws:
            ws.receive_json(timeout=5)
            master.client.put(
                "/api/v1/workspaces/default/state",
                json=unstructure(make_state()),
                headers=master.headers("admin", subject="admin"),
            )
            while (event := ws.receive_json(timeout=5))["kind"] != "version.created":
                pass
        spans = {s.name: s for s in exporter.get_finished_spans()}
        request = spans["PUT /api/v1/workspaces/{workspace}/state"]
        version = spans["nxmesh.version.create"]
        assert version.parent is not None
        assert version.parent.span_id == request.context.span_id
        traceparent = event["payload"]["trace"]["traceparent"]
        assert traceparent.split("-")[1] == format(request.context.trace_id, "032x")


class _FlakyBus:
    """An event bus whose first subscription ends after one event (a slow subscriber)."""

    def __init__(self) -> None:
        self.subscriptions = 0

    @contextlib.asynccontextmanager
    async def subscribe(self) -> Any:
        self.subscriptions += 1
        number = self.subscriptions

        async def events() -> Any:
            yield Event("version.created", {"number": number})
            if number > 1:
                await anyio.sleep_forever()

        yield events()


class _DownBus:
    """An event bus whose database is down for the first `down` subscriptions after the
    first one, which the bus ends at once (its listener dropped)."""

    def __init__(self, down: int) -> None:
        self.down = down
        self.subscriptions = 0

    @contextlib.asynccontextmanager
    async def subscribe(self) -> Any:
        self.subscriptions += 1
        number = self.subscriptions
        if 1 < number <= 1 + self.down:
            raise StorageError("PostgresEventBus('postgresql://db/x') is not listening")

        async def events() -> Any:
            yield Event("version.created", {"number": number})
            if number > 1:
                yield Event("bad", {})
                yield Event("version.created", {"number": number, "after": "bad"})
                await anyio.sleep_forever()

        yield events()


class TestEventDispatch:
    """The dispatcher feeding ``nxmesh_on_event`` survives a dropped subscription."""

    pytestmark = pytest.mark.anyio

    async def test_resubscribes(self, anyio_backend: str, make_plugin_manager: Any) -> None:
        """Events after the bus dropped the first subscription still reach the hooks."""
        from nxmesh.master.app import MasterServices

        plugin = ExamplePlugin()
        services = object.__new__(MasterServices)  # only pm and bus are used here
        services.pm = make_plugin_manager(plugin)
        services.bus = _FlakyBus()  # type: ignore[assignment]
        async with anyio.create_task_group() as tg:
            await tg.start(services.run_event_dispatch)
            with anyio.fail_after(5):
                while len(plugin.events) < 2:
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
        assert [e.payload["number"] for e in plugin.events] == [1, 2]

    async def test_survives_a_bus_outage_logging_it_once(
        self, anyio_backend: str, make_plugin_manager: Any
    ) -> None:
        """Subscribing fails while the bus's database is down (StorageError): the
        dispatcher retries until it works, logs the outage once (not once per attempt) and
        its end; an observer raising for one event does not cost the others."""
        from nxmesh.master.app import MasterServices

        class Picky(ExamplePlugin):
            @hookimpl
            def nxmesh_on_event(self, event: Event) -> None:
                if event.kind == "bad":
                    raise ValueError("cannot handle that")
                self.events.append(event)

        plugin = Picky()
        services = object.__new__(MasterServices)  # only pm and bus are used here
        services.pm = make_plugin_manager(plugin)
        services.bus = bus = _DownBus(down=3)  # type: ignore[assignment]
        with capture_logs() as logs:
            async with anyio.create_task_group() as tg:
                await tg.start(services.run_event_dispatch)
                with anyio.fail_after(10):
                    while len(plugin.events) < 3:
                        await anyio.sleep(0.01)
                tg.cancel_scope.cancel()
        assert [e.payload["number"] for e in plugin.events] == [1, 5, 5]
        assert bus.subscriptions == 5
        lost = [e for e in logs if e["event"].startswith("event subscription lost")]
        assert len(lost) == 1
        assert [e["event"] for e in logs if e["event"] == "event subscription restored"] == [
            "event subscription restored"
        ]
