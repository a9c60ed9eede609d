"""The master over a real socket: hypercorn on asyncio and on trio, the full composition
through the core runtime, the events WebSocket on the wire, and a clean shutdown."""

from __future__ import annotations

import asyncio.sslproto
import functools
import gc
import json
import ssl
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.abc
import httpx
import pytest
import wsproto
import wsproto.events as ws_events

from nxmesh.core.pluginmanager import NxMeshPluginManager
from nxmesh.core.runtime import Runtime, StashKey, run
from nxmesh.core.serialization import unstructure
from nxmesh.core.settings import MasterSettings, Settings
from nxmesh.master import agent_plane
from nxmesh.master.agent_plane import AGENT_PLANE, run_agent_plane
from nxmesh.master.app import MasterServices, build_app
from nxmesh.master.server import (
    API_ADDRESS,
    MASTER_SERVICES,
    MasterComponent,
    run_master,
    serve_api,
)
from nxmesh.small_queues import SmallQueue, compact_asyncio_queue
from nxmesh.testing import make_state

from .conftest import make_settings

pytestmark = pytest.mark.anyio

T = TypeVar("T")


@pytest.fixture(autouse=True)
def _restore_gc_threshold() -> Iterator[None]:
    """`run_master` tunes the collector process-wide; the rest of the suite keeps its own."""
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)


async def services_with(runtime: Runtime, key: StashKey[Any]) -> MasterServices:
    """The running master's services once `key` is in their stash (it starts in the
    background)."""
    with anyio.fail_after(10):
        while True:
            services = runtime.stash.get(MASTER_SERVICES, None)
            if services is not None and key in services.stash:
                return services
            await anyio.sleep(0.02)


async def read_running_master(
    plugin_manager: NxMeshPluginManager,
    settings: Settings,
    read: Callable[[MasterServices], T],
    *,
    once: StashKey[Any] = API_ADDRESS,
    components: Sequence[MasterComponent] = (),
) -> T:
    """Run ``nxmesh master``'s main with `components` until `once` is in its services'
    stash, and return `read` of them (taken while it runs)."""
    seen: list[T] = []

    async def main(runtime: Runtime) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_master, runtime, components)
            seen.append(read(await services_with(runtime, once)))
            tg.cancel_scope.cancel()

    await run(plugin_manager, settings, main, handle_signals=False)
    return seen[0]


async def login(client: httpx.AsyncClient, state_dir: Path) -> dict[str, str]:
    password = (state_dir / "initial-admin-password").read_text().strip()
    response = await client.post(
        "/api/v1/auth/login", json={"username": "admin", "password": password}
    )
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


class WebSocketClient:
    """Just enough of a WebSocket client (wsproto over an anyio TCP stream) for one test."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        self.pending: list[Any] = []

    @classmethod
    async def connect(cls, address: str, path: str, headers: dict[str, str]) -> WebSocketClient:
        host, port = address.rsplit(":", 1)
        client = cls(await anyio.connect_tcp(host, int(port)))
        extra = [(k.encode(), v.encode()) for k, v in headers.items()]
        await client._send(ws_events.Request(host=address, target=path, extra_headers=extra))
        event = await client._next()
        assert isinstance(event, ws_events.AcceptConnection), event
        return client

    async def _send(self, event: Any) -> None:
        await self.stream.send(self.ws.send(event))

    async def _next(self) -> Any:
        while not self.pending:
            self.ws.receive_data(await self.stream.receive())
            self.pending.extend(self.ws.events())
        return self.pending.pop(0)

    async def receive_json(self) -> Any:
        text = ""
        while True:
            event = await self._next()
            if isinstance(event, ws_events.CloseConnection):
                return {"closed": event.code}
            if isinstance(event, ws_events.TextMessage):
                text += event.data
                if event.message_finished:
                    return json.loads(text)

    async def aclose(self) -> None:
        await self.stream.aclose()


async def close_codes_on_the_mount(
    plugin_manager: NxMeshPluginManager, tmp_path: Path, messages: Sequence[Any]
) -> list[Any]:
    """Run a master serving agents only on its API listener's WebSocket mount, send each
    message on a connection of its own, and return how the master closed each one."""
    settings = make_settings(
        plugin_manager,
        tmp_path / "state",
        **{"master.api_port": 0, "master.transports": ["websocket"]},
    )
    closed: list[Any] = []

    async def main(runtime: Runtime) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_master, runtime, [run_agent_plane])
            services = await services_with(runtime, AGENT_PLANE)
            for message in messages:
                ws = await WebSocketClient.connect(services.stash[API_ADDRESS], "/agent", {})
                try:
                    await ws._send(message)
                    with anyio.fail_after(10):
                        closed.append(await ws.receive_json())
                finally:
                    await ws.aclose()
            tg.cancel_scope.cancel()

    await run(plugin_manager, settings, main, handle_signals=False)
    return closed


class TestHypercorn:
    """`serve_api` on whichever event loop runs it."""

    async def test_serves_http_and_websocket_then_shuts_down(
        self, anyio_backend: str, plugin_manager: NxMeshPluginManager, tmp_path: Path
    ) -> None:
        """Login, a version, its event on the WebSocket — then cancellation closes the port."""
        settings = make_settings(plugin_manager, tmp_path / "state")
        app = build_app(pm=plugin_manager, settings=settings)
        async with anyio.create_task_group() as tg:
            address = await tg.start(serve_api, app)
            async with httpx.AsyncClient(base_url=f"http://{address}", timeout=10) as client:
                assert (await client.get("/healthz")).json() == {"status": "ok", "detail": ""}
                headers = await login(client, settings.state_dir)
                ws = await WebSocketClient.connect(address, "/api/v1/events", headers)
                try:
                    assert (await ws.receive_json())["type"] == "ready"
                    response = await client.put(
                        "/api/v1/workspaces/default/state",
                        json=unstructure(make_state()),
                        headers=headers,
                    )
                    assert response.status_code == 200, response.text
                    with anyio.fail_after(10):
                        while (event := await ws.receive_json())["kind"] != "version.created":
                            pass
                    assert event["payload"]["number"] == 1
                finally:
                    await ws.aclose()
            tg.cancel_scope.cancel()
        host, port = address.rsplit(":", 1)
        with pytest.raises(OSError):
            await anyio.connect_tcp(host, int(port))

    async def test_serves_https_with_the_given_certificate(
        self, anyio_backend: str, plugin_manager: NxMeshPluginManager, tmp_path: Path
    ) -> None:
        """``tls=(cert, key)``: HTTPS on asyncio and trio, verified against the CA."""
        from nxmesh.tls import ensure_tls_material

        files = ensure_tls_material(tmp_path / "tls")
        settings = make_settings(plugin_manager, tmp_path / "state")
        app = build_app(pm=plugin_manager, settings=settings)
        async with anyio.create_task_group() as tg:
            address = await tg.start(functools.partial(serve_api, app, tls=(files.cert, files.key)))
            port = address.rsplit(":", 1)[1]
            verify = ssl.create_default_context(cafile=files.ca_cert)
            async with httpx.AsyncClient(verify=verify, timeout=10) as client:
                response = await client.get(f"https://localhost:{port}/healthz")
            assert response.json()["status"] == "ok"
            tg.cancel_scope.cancel()

    async def test_https_caps_asyncio_tls_read_buffer(
        self,
        anyio_backend: str,
        plugin_manager: NxMeshPluginManager,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """``tls_read_buffer``: on asyncio, HTTPS connections get that TLS read buffer
        instead of asyncio's 256 KiB (trio's TLS has none to cap), and requests many
        times its size still arrive whole."""
        from nxmesh.tls import ensure_tls_material

        monkeypatch.setattr(asyncio.sslproto.SSLProtocol, "max_size", 256 * 1024)
        files = ensure_tls_material(tmp_path / "tls")
        settings = make_settings(plugin_manager, tmp_path / "state")
        app = build_app(pm=plugin_manager, settings=settings)
        serve = functools.partial(serve_api, app, tls=(files.cert, files.key), tls_read_buffer=4096)
        state = unstructure(make_state(200))
        async with anyio.create_task_group() as tg:
            address = await tg.start(serve)
            expected = 4096 if anyio_backend == "asyncio" else 256 * 1024
            assert asyncio.sslproto.SSLProtocol.max_size == expected
            port = address.rsplit(":", 1)[1]
            verify = ssl.create_default_context(cafile=files.ca_cert)
            base = f"https://localhost:{port}"
            async with httpx.AsyncClient(base_url=base, verify=verify, timeout=10) as client:
                assert (await client.get("/healthz")).status_code == 200  # started up
                headers = await login(client, settings.state_dir)
                body = json.dumps(state).encode()
                assert len(body) > 16 * 4096
                response = await client.put(
                    "/api/v1/workspaces/default/state",
                    content=body,
                    headers={**headers, "Content-Type": "application/json"},
                )
                assert response.status_code == 200, response.text
                assert response.json()["version"]["number"] == 1
            tg.cancel_scope.cancel()


class TestRunMaster:
    """``nxmesh master``'s main inside the core runtime."""

    async def test_runtime_composition(
        self, anyio_backend: str, plugin_manager: NxMeshPluginManager, tmp_path: Path
    ) -> None:
        """Services, event dispatch and the API start in the runtime and stop with it."""
        settings = make_settings(plugin_manager, tmp_path / "state", **{"master.api_port": 0})
        seen: dict[str, Any] = {}

        async def component(services: Any, *, task_status: anyio.abc.TaskStatus[None]) -> None:
            seen["component"] = API_ADDRESS in services.stash
            task_status.started()

        async def main(runtime: Runtime) -> None:
            async with anyio.create_task_group() as tg:
                tg.start_soon(run_master, runtime, [component])
                address = (await services_with(runtime, API_ADDRESS)).stash[API_ADDRESS]
                async with httpx.AsyncClient(base_url=f"http://{address}") as client:
                    seen["ready"] = (await client.get("/readyz")).status_code
                tg.cancel_scope.cancel()

        await run(plugin_manager, settings, main, handle_signals=False)
        assert seen == {"ready": 200, "component": True}

    @pytest.mark.parametrize("size", [4096, 0])
    async def test_api_tls_takes_tls_read_buffer_bytes(
        self,
        anyio_backend: str,
        plugin_manager: NxMeshPluginManager,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        size: int,
    ) -> None:
        """``[master] tls_read_buffer_bytes`` caps asyncio's TLS read buffer when the API
        serves HTTPS, whichever agent transports run (here only the WebSocket mount);
        0 leaves asyncio's."""
        monkeypatch.setattr(asyncio.sslproto.SSLProtocol, "max_size", 256 * 1024)
        settings = make_settings(
            plugin_manager,
            tmp_path / "state",
            **{
                "master.api_port": 0,
                "master.api_tls": True,
                "master.transports": ["websocket"],
                "master.tls_read_buffer_bytes": size,
            },
        )
        assert MasterSettings().tls_read_buffer_bytes == 4096
        max_size = await read_running_master(
            plugin_manager, settings, lambda _: asyncio.sslproto.SSLProtocol.max_size
        )
        assert max_size == (size if size and anyio_backend == "asyncio" else 256 * 1024)

    async def test_tunes_the_garbage_collector(
        self, anyio_backend: str, plugin_manager: NxMeshPluginManager, tmp_path: Path
    ) -> None:
        """``[master] gc_threshold`` (50,000 by default) is the master process's young
        generation threshold once it runs; 0 leaves Python's."""
        assert MasterSettings().gc_threshold == 50_000
        seen = []
        for threshold in (12_345, 0):
            settings = make_settings(
                plugin_manager,
                tmp_path / f"state{threshold}",
                **{"master.api_port": 0, "master.gc_threshold": threshold},
            )
            seen.append(
                await read_running_master(plugin_manager, settings, lambda _: gc.get_threshold())
            )
        assert [young for young, _, _ in seen] == [12_345, 12_345]  # 0 left what was set

    @pytest.mark.parametrize("name", ["tls_read_buffer_bytes", "gc_threshold"])
    def test_buffer_and_gc_settings_must_not_be_negative(
        self, plugin_manager: NxMeshPluginManager, tmp_path: Path, name: str
    ) -> None:
        with pytest.raises(Exception, match=f"{name} must be 0 or more, got -1"):
            make_settings(plugin_manager, tmp_path, **{f"master.{name}": -1})

    async def test_agent_websocket_closes_on_text_with_1003(
        self, anyio_backend: str, plugin_manager: NxMeshPluginManager, tmp_path: Path
    ) -> None:
        """A text message on the agent WebSocket mount (agents send binary frames only)
        ends the session with close code 1003; a binary frame that is no `Register` ends
        it normally (the protocol's refusal)."""
        closed = await close_codes_on_the_mount(
            plugin_manager,
            tmp_path,
            [ws_events.TextMessage("hello"), ws_events.BytesMessage(b"x")],
        )
        assert closed[0] == {"closed": 1003}
        assert closed[1] == {"closed": 1000}  # a malformed binary frame: refused, not 1003

    async def test_agent_websocket_compacts_the_receive_queue(
        self,
        anyio_backend: str,
        plugin_manager: NxMeshPluginManager,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """On asyncio, hypercorn's per-connection receive queue gets small lists for its
        deques before the session runs (~2.7 KB per idle agent); on trio there is no such
        queue and nothing changes. The session still reads frames through it."""
        calls: list[tuple[object, bool]] = []

        def recording(queue: object) -> bool:
            done = compact_asyncio_queue(queue)
            calls.append((queue, done))
            return done

        monkeypatch.setattr(agent_plane, "compact_asyncio_queue", recording)
        closed = await close_codes_on_the_mount(
            plugin_manager, tmp_path, [ws_events.TextMessage("read through the queue")]
        )
        assert closed == [{"closed": 1003}]
        [(queue, done)] = calls
        if anyio_backend == "asyncio":
            assert done
            assert isinstance(queue, asyncio.Queue)
            assert isinstance(queue._queue, SmallQueue)  # type: ignore[attr-defined]
        else:
            assert not done

    @pytest.mark.parametrize("compress", [True, False])
    async def test_agent_plane_takes_compress_versions(
        self,
        anyio_backend: str,
        plugin_manager: NxMeshPluginManager,
        tmp_path: Path,
        compress: bool,
    ) -> None:
        """``[master] compress_versions`` reaches the session hub the agent plane runs."""
        settings = make_settings(
            plugin_manager,
            tmp_path / "state",
            **{
                "master.api_port": 0,
                "master.transports": ["websocket"],
                "master.compress_versions": compress,
            },
        )
        hub_compresses = await read_running_master(
            plugin_manager,
            settings,
            lambda services: services.stash[AGENT_PLANE].hub.compress,
            once=AGENT_PLANE,
            components=[run_agent_plane],
        )
        assert hub_compresses is compress
