"""Serve the master with hypercorn, on asyncio or trio (whichever runs the caller).

`serve_api` binds the listening socket itself — so the bound address (port 0 picks a
free one) is known before it reports ready through ``task_status.started`` — and runs
hypercorn's worker for the current event loop on it. Cancellation triggers hypercorn's
graceful shutdown: the listener closes, requests in flight get `graceful_timeout`
seconds, then the app's lifespan ends.

`run_master` is ``nxmesh master``: it opens the services, starts the event dispatcher
and the API inside the core runtime's task group, then the `components` (``main``
passes `DEFAULT_COMPONENTS`: the agent plane — session hub, rollout orchestrator and the
agent transports, `nxmesh.master.agent_plane` — and the retention job,
`nxmesh.master.retention`), and runs until SIGINT/SIGTERM. The API
listener also carries the agents' WebSocket transport (``master.websocket_path``).
"""

from __future__ import annotations

import contextlib
import gc
import socket
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.abc
import anyio.to_thread
import pluggy
import sniffio
import structlog
from hypercorn.config import Config

from nxmesh.core.runtime import Runtime, StashKey, run
from nxmesh.core.settings import Settings, load_settings
from nxmesh.master.app import MasterServices, build_app, open_services
from nxmesh.master.retention import run_retention
from nxmesh.netaddr import host_port
from nxmesh.tls import limit_tls_read_buffer
from nxmesh.transports import api_tls_files

__all__ = [
    "API_ADDRESS",
    "DEFAULT_COMPONENTS",
    "MASTER_SERVICES",
    "MasterComponent",
    "main",
    "run_master",
    "serve_api",
    "tune_gc",
]

MASTER_SERVICES: Final = StashKey[MasterServices]("nxmesh.master.services")
"""Where `run_master` puts the services in ``runtime.stash`` for plugins' lifespans."""

API_ADDRESS: Final = StashKey[str]("nxmesh.master.api_address")
"""``host:port`` the API listens on, in ``services.stash`` once it serves."""

MasterComponent = Callable[..., Coroutine[Any, Any, None]]
"""``async def component(services, *, task_status)``: a long-running part of the master
(an agent transport, the orchestrator) started with ``task_group.start``."""


async def _agent_plane(services: MasterServices, *, task_status: anyio.abc.TaskStatus[Any]) -> None:
    from nxmesh.master.agent_plane import run_agent_plane

    await run_agent_plane(services, task_status=task_status)


DEFAULT_COMPONENTS: tuple[MasterComponent, ...] = (_agent_plane, run_retention)
"""What ``nxmesh master`` starts after the API, in order: the agent plane (session hub,
rollout orchestrator, agent transports) and the retention job. An application composing
its own master keeps them by passing ``(*DEFAULT_COMPONENTS, mine)``."""

GRACEFUL_TIMEOUT: Final = 10.0

log = structlog.get_logger("nxmesh.master")


def tune_gc(threshold: int) -> tuple[int, int, int]:
    """Set the garbage collector's young-generation threshold for this process (0 leaves
    it); return the thresholds that were in effect.

    A master holds thousands of long-lived sessions. With Python's threshold (700
    allocations) a push to them runs young collections while its frames, coroutines and
    buffers are in flight; they survive into the old generation, and every few pushes
    a full collection walks every session's objects: 1 to 2 s with the event loop stalled at
    10,000 agents (`bench/fanout_bench.py`, ``master_gc_s``). At 50,000 a push runs none.
    Reference cycles are still collected, after more allocations: at most the threshold's
    count of objects waits for it.
    """
    previous = gc.get_threshold()
    if threshold:
        gc.set_threshold(threshold, *previous[1:])
        log.info("garbage collector tuned", young_threshold=threshold, was=previous[0])
    return previous


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return host_port(host, port)


async def serve_api(
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    graceful_timeout: float = GRACEFUL_TIMEOUT,
    tls: tuple[Path, Path] | None = None,
    tls_read_buffer: int = 0,
    task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the ASGI `app` on ``host:port`` until cancelled; report ``host:port`` when ready.

    Runs on asyncio and trio (hypercorn's matching worker). Readiness means the socket is
    listening: connections made from then on are accepted once hypercorn started.

    :param tls: certificate and key files (PEM): serve HTTPS (TLS ≥ 1.2) instead of HTTP.
    :param tls_read_buffer: with `tls` on asyncio, cap asyncio's per-connection TLS read
        buffer (256 KiB) at this many bytes, process-wide (`limit_tls_read_buffer`):
        thousands of agents on the WebSocket mount would hold it each. 0 leaves it.
    """
    config = Config()
    if tls is not None:
        config.certfile, config.keyfile = (str(path) for path in tls)
        config.create_ssl_context()  # before binding: a certificate that does not load fails
        if tls_read_buffer and sniffio.current_async_library() == "asyncio":
            limit_tls_read_buffer(tls_read_buffer)
    sock = _listen(host, port)
    address = _address(sock)
    # hypercorn adopts the descriptor (and closes it); the Python object lets go of it.
    # With a certificate it serves `bind` over TLS.
    config.bind = [f"fd://{sock.detach()}"]
    config.graceful_timeout = graceful_timeout
    config.accesslog = None  # the request_context middleware logs requests (structlog)
    config.errorlog = None
    stop = anyio.Event()
    finished = anyio.Event()
    # Shielded: cancellation must become a graceful shutdown (`stop`), not an abort.
    shield = anyio.CancelScope(shield=True)

    async def hypercorn_worker() -> None:
        try:
            with shield:
                if sniffio.current_async_library() == "trio":
                    from hypercorn.trio import serve as trio_serve

                    await trio_serve(app, config, shutdown_trigger=stop.wait)
                else:
                    from hypercorn.asyncio import serve as asyncio_serve

                    await asyncio_serve(app, config, shutdown_trigger=stop.wait)
        finally:
            finished.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(hypercorn_worker)
        log.info("API listening", address=f"{'https' if tls else 'http'}://{address}")
        task_status.started(address)
        try:
            await finished.wait()  # hypercorn only returns by itself when it failed
        finally:
            stop.set()
            with anyio.move_on_after(graceful_timeout + 5.0, shield=True):
                await finished.wait()
            if not finished.is_set():
                shield.cancel()  # it ignored the graceful shutdown: abort


async def run_master(
    runtime: Runtime, components: Sequence[MasterComponent] = DEFAULT_COMPONENTS
) -> None:
    """The master's main: services, event dispatch, API and `components`, until shutdown
    (the garbage collector tuned for many sessions first, `tune_gc`).

    Each component is started with ``await task_group.start(component, services)`` once
    the API serves, so it may rely on everything in `MasterServices`.
    """
    settings = runtime.settings
    tune_gc(settings.master.gc_threshold)
    async with open_services(runtime.pm, settings) as services:
        runtime.stash[MASTER_SERVICES] = services
        tg = runtime.task_group
        await tg.start(services.run_event_dispatch)
        from nxmesh.master.agent_plane import AgentWebSocketMount

        api: Any = build_app(services)
        app = AgentWebSocketMount(api, services, path=settings.master.websocket_path)
        tls = await anyio.to_thread.run_sync(api_tls_files, settings)
        address = await tg.start(_serve_named, app, settings, tls)
        services.stash[API_ADDRESS] = address
        for component in components:
            await tg.start(component, services)
        url = f"{'https' if tls else 'http'}://{address}"
        log.info("master running", api=url, docs=f"{url}/docs")
        await anyio.sleep_forever()


async def _serve_named(
    app: Any,
    settings: Settings,
    tls: tuple[Path, Path] | None,
    *,
    task_status: anyio.abc.TaskStatus[str],
) -> None:
    master = settings.master
    await serve_api(
        app,
        host=master.api_host,
        port=master.api_port,
        tls=tls,
        tls_read_buffer=master.tls_read_buffer_bytes,
        task_status=task_status,
    )


def main(
    pm: pluggy.PluginManager,
    *,
    config_path: Path | None = None,
    overrides: Mapping[str, object] | None = None,
    backend: str = "asyncio",
) -> None:
    """Load settings, configure logging and run the master until a signal stops it."""
    from nxmesh.core.logging import configure_logging

    settings: Settings = load_settings(pm, path=config_path, overrides=overrides)
    configure_logging(settings.log_level, settings.log_format)
    with contextlib.suppress(KeyboardInterrupt):
        anyio.run(run, pm, settings, run_master, backend=backend)
