"""A throwaway nginx + agent stack on loopback, for tests and the apply benchmark.

`NginxStack` lays out a config root in a directory of your choice, picks free ports
(one for the sites, one for the status server), and builds the real renderer, the
standalone deployment mode (supervised nginx) and the reload driver on it. Nothing is
mocked: applies write real trees, run real ``nginx -t`` and reload a real nginx.

Always ``await stack.aclose()`` (or use ``async with``): it stops nginx.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from types import TracebackType

import anyio.to_thread
import attrs

from nxmesh.agent.events import EventRecorder
from nxmesh.agent.http import HttpResponse, http_get
from nxmesh.agent.layout import NginxLayout
from nxmesh.agent.process import nginx_stream_module, pid_alive, read_pid_file
from nxmesh.config.versions import state_digest
from nxmesh.core.bundle import Bundle
from nxmesh.core.model import (
    DesiredState,
    PendingApply,
)
from nxmesh.plugins.deploy_standalone import StandaloneMode, StandaloneSettings
from nxmesh.plugins.nginx_driver import DriverSettings, ReloadDriver
from nxmesh.plugins.render_nginx import NginxRenderer, RenderSettings
from nxmesh.testing.factories import multi_site_state
from nxmesh.testing.nginx import free_port

__all__ = ["NginxStack", "multi_site_state"]


@attrs.define(eq=False)
class NginxStack:
    """Renderer, supervised nginx and reload driver under `root` on free loopback ports."""

    root: Path
    nginx_binary: str
    web_port: int = attrs.field(factory=free_port)
    status_port: int = attrs.field(factory=free_port)
    driver_settings: DriverSettings = attrs.field(
        factory=lambda: DriverSettings(error_log_window=0.05, confirm_timeout=10.0)
    )
    supervise: bool = True
    events: EventRecorder = attrs.field(factory=EventRecorder)
    layout: NginxLayout = attrs.field(init=False)
    renderer: NginxRenderer = attrs.field(init=False)
    mode: StandaloneMode = attrs.field(init=False)
    driver: ReloadDriver = attrs.field(init=False)
    _versions: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        self.layout = NginxLayout.for_prefix(self.root)
        self.renderer = NginxRenderer(settings=self.render_settings)
        self.mode = StandaloneMode(
            self.layout,
            nginx_binary=self.nginx_binary,
            settings=StandaloneSettings(supervise=self.supervise),
        )
        self.driver = ReloadDriver(
            self.mode,
            self.layout,
            nginx_binary=self.nginx_binary,
            settings=self.driver_settings,
            events=self.events,
            extra_logs=(self.mode.stderr_log,),
        )

    @property
    def render_settings(self) -> RenderSettings:
        # One worker keeps reloads quick and the process table small on 2-core CI boxes.
        return RenderSettings(
            status_port=self.status_port,
            worker_processes=1,
            worker_connections=256,
            stream_module=nginx_stream_module(self.nginx_binary),
        )

    def state(self, body: str, *, sites: int = 1) -> DesiredState:
        return multi_site_state(self.web_port, body, sites=sites)

    def update(self, state: DesiredState, version: int | None = None) -> PendingApply:
        """An unsigned update for `state` (version numbers count up by default)."""
        if version is None:
            self._versions += 1
            version = self._versions
        return PendingApply(version=version, digest=state_digest(state), state=state)

    def render(self, state: DesiredState) -> Bundle:
        return self.renderer.render(state)

    async def fetch(self, path: str = "/", *, host: str = "localhost") -> HttpResponse:
        return await http_get("127.0.0.1", self.web_port, path, host_header=host)

    async def body(self) -> str:
        return (await self.fetch()).text.strip()

    async def master_pid(self) -> int | None:
        return await self.mode.nginx_pid()

    async def aclose(self) -> None:
        """Stop nginx however it runs (supervised child or daemon from the pid file).

        A fast stop (SIGTERM): a throwaway stack has no requests worth draining, and a
        graceful one costs about a second per nginx.
        """
        pid = await read_pid_file(self.layout.pid_file)
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
        await self.mode.aclose()
        if pid is not None:
            await anyio.to_thread.run_sync(_wait_gone, pid)

    async def __aenter__(self) -> NginxStack:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    """Wait for `pid` to exit; SIGKILL its process group when it lingers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):  # a zombie counts as gone: init reaps it when it likes
            return
        time.sleep(0.01)
    try:
        os.killpg(os.getpgid(pid), signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)
