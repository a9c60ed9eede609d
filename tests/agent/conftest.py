"""Fixtures of the agent tests: a real nginx stack and agents built from real settings."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest

from nxmesh.agent.app import AgentApp, AgentTuning
from nxmesh.agent.applier import Applier
from nxmesh.agent.harness import NginxStack, multi_site_state
from nxmesh.agent.process import read_pid_file
from nxmesh.agent.watchdog import BackoffPolicy
from nxmesh.core.model import DesiredState
from nxmesh.core.pluginmanager import NxMeshPluginManager
from nxmesh.core.serialization import unstructure
from nxmesh.core.settings import Settings, load_settings
from nxmesh.plugins.render_nginx import RenderSettings
from nxmesh.testing.nginx import free_port

FAST = AgentTuning(
    nginx_check_interval=0.05,
    state_poll_interval=0.05,
    health_change_interval=0.1,
    link_backoff_max=0.2,
    backoff=BackoffPolicy(backoff_initial=0.2, backoff_max=1.0, reset_after=5.0),
)


@pytest.fixture
async def stack(nginx_binary: str, tmp_path: Path, anyio_backend: str) -> AsyncIterator[NginxStack]:
    """Renderer + supervised nginx + driver on free ports; nginx stopped afterwards."""
    async with NginxStack(root=tmp_path / "nginx", nginx_binary=nginx_binary) as stack:
        yield stack


@attrs.define
class AgentEnv:
    """Everything one agent under test runs with: dirs, ports, settings, builders."""

    pm: NxMeshPluginManager
    tmp: Path
    nginx_binary: str
    web_port: int = attrs.field(factory=free_port)
    status_port: int = attrs.field(factory=free_port)
    overrides: dict[str, Any] = attrs.field(factory=dict)

    @property
    def conf_dir(self) -> Path:
        return self.tmp / "nginx"

    @property
    def state_dir(self) -> Path:
        return self.tmp / "state"

    @property
    def state_file(self) -> Path:
        return self.tmp / "site.yaml"

    def settings(self, **extra: Any) -> Settings:
        overrides = {
            "state_dir": str(self.state_dir),
            "agent.conf_dir": str(self.conf_dir),
            "agent.nginx_binary": self.nginx_binary,
            "agent.deployment_mode": "standalone",
            "agent.metrics_port": 0,
            "agent.drift_interval": 60.0,
            "agent.health_interval": 60.0,
            "plugins.nginx_driver.error_log_window": 0.05,
            "plugins.nginx_driver.debounce": 0.02,
            "plugins.nginx_driver.min_reload_interval": 0.0,
            **self.overrides,
            **extra,
        }
        return load_settings(self.pm, environ={}, overrides=overrides)

    @property
    def render_settings(self) -> RenderSettings:
        return RenderSettings(status_port=self.status_port, worker_processes=1)

    def state(self, body: str, *, sites: int = 1) -> DesiredState:
        return multi_site_state(self.web_port, body, sites=sites)

    def write_state(self, body: str) -> None:
        """Write the state file atomically, as an editor or a git checkout would."""
        import json

        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(unstructure(self.state(body))))
        tmp.replace(self.state_file)

    def build(self, *, settings: Settings | None = None, **kwargs: Any) -> AgentApp:
        kwargs.setdefault("tuning", FAST)
        return AgentApp.build(
            self.pm,
            settings or self.settings(),
            agent_id="test-agent",
            render_settings=self.render_settings,
            **kwargs,
        )

    async def body(self) -> str:
        from nxmesh.agent.http import http_get

        return (
            await http_get("127.0.0.1", self.web_port, "/", host_header="localhost")
        ).text.strip()

    async def wait_body(self, expected: str, within: float = 10.0) -> None:
        """Poll the site until it answers `expected` (fails the test on timeout)."""
        last = None
        with anyio.move_on_after(within):
            while True:
                try:
                    last = await self.body()
                # A connection reset while nginx (re)starts surfaces on trio as a broken
                # stream, not as an OSError.
                except (OSError, anyio.BrokenResourceError, anyio.EndOfStream) as exc:
                    last = repr(exc)
                if last == expected:
                    return
                await anyio.sleep(0.02)
        pytest.fail(f"site never answered {expected!r}; last answer {last!r}")

    async def nginx_pid(self) -> int | None:
        return await read_pid_file(self.conf_dir / "logs" / "nginx.pid")


@pytest.fixture
def agent_env(
    make_plugin_manager: Callable[..., NxMeshPluginManager], tmp_path: Path, nginx_binary: str
) -> Iterator[AgentEnv]:
    """Settings and builders for agents on this test's own dirs and ports."""
    env = AgentEnv(pm=make_plugin_manager(), tmp=tmp_path, nginx_binary=nginx_binary)
    yield env
    _stop_leftover_nginx(env.conf_dir / "logs" / "nginx.pid")


def _stop_leftover_nginx(pid_file: Path) -> None:
    """Tests stop their agents; a daemonized nginx (--once, attach mode) is stopped here."""
    import os
    import signal

    from nxmesh.agent.process import pid_alive

    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return
    if pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        import time

        deadline = time.monotonic() + 10
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)


@pytest.fixture
async def applier(stack: NginxStack, plugin_manager: NxMeshPluginManager) -> Applier:
    """An applier on the real stack, with "original" applied."""
    applier = Applier(plugin_manager, stack.driver, stack.renderer, events=stack.events)
    report = await applier.apply(stack.update(stack.state("original")))
    assert report.outcome == "applied", report.message
    return applier
