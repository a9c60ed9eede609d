"""The built-in nginx process health check, against real nginx instances."""

from __future__ import annotations

from pathlib import Path

import pytest

from nxmesh.agent.metrics import AgentMetrics
from nxmesh.core.model import HealthReport
from nxmesh.core.pluginmanager import get_plugin_manager
from nxmesh.core.settings import Settings, load_settings
from nxmesh.plugins.health_basic import NginxProcessCheck, managed_pid_file
from nxmesh.testing.contracts import HealthCheckContract
from nxmesh.testing.nginx import NginxInstance


class TestNginxProcessCheckContract(HealthCheckContract):
    @pytest.fixture
    def health_check(self, running_nginx: NginxInstance) -> NginxProcessCheck:
        return NginxProcessCheck(running_nginx.pid_file)

    @pytest.fixture
    def failing_health_check(self, tmp_path: Path) -> NginxProcessCheck:
        return NginxProcessCheck(tmp_path / "no-such.pid")


def _settings(tmp_path: Path, **env: str) -> Settings:
    environ = {"NXMESH_AGENT__CONF_DIR": str(tmp_path / "conf"), **env}
    return load_settings(get_plugin_manager(environ={}), environ=environ, path=None)


class TestManagedPidFile:
    """The check watches the pid file the agent's deployment mode reads."""

    def test_defaults_to_the_rendered_pid_file(self, tmp_path: Path) -> None:
        """``<conf_dir>/logs/nginx.pid``, what the rendered ``pid`` directive writes."""
        settings = _settings(tmp_path)
        assert managed_pid_file(settings) == tmp_path / "conf" / "logs" / "nginx.pid"
        check = NginxProcessCheck.from_settings(settings)
        assert check.pid_file == tmp_path / "conf" / "logs" / "nginx.pid"

    @pytest.mark.parametrize(
        ("mode", "section"),
        [("standalone", "DEPLOY_STANDALONE"), ("docker-sidecar", "DEPLOY_DOCKER")],
    )
    def test_the_modes_pid_file_setting_wins(self, tmp_path: Path, mode: str, section: str) -> None:
        """A mode's ``pid_file`` override is the one watched; another mode's is not."""
        other = "DEPLOY_DOCKER" if section == "DEPLOY_STANDALONE" else "DEPLOY_STANDALONE"
        settings = _settings(
            tmp_path,
            NXMESH_AGENT__DEPLOYMENT_MODE=mode,
            **{
                f"NXMESH_PLUGINS__{section}__PID_FILE": "/run/mine.pid",
                f"NXMESH_PLUGINS__{other}__PID_FILE": "/run/other.pid",
            },
        )
        assert managed_pid_file(settings) == Path("/run/mine.pid")


@pytest.mark.nginx
class TestNginxProcessCheck:
    @pytest.mark.anyio
    async def test_running_nginx_is_ok_with_worker_count(
        self, running_nginx: NginxInstance
    ) -> None:
        """With the watched nginx running the check is ok and counts its workers."""
        [result] = await NginxProcessCheck(running_nginx.pid_file).run()
        assert result.status == "ok"
        assert result.metrics == {"masters": 1.0, "workers": 1.0}

    @pytest.mark.anyio
    async def test_another_nginx_on_the_host_does_not_hide_a_dead_managed_one(
        self, running_nginx: NginxInstance, nginx_binary: str, tmp_path: Path
    ) -> None:
        """Two real nginx on one host (another agent's, a distribution's): stopping the
        managed one fails the check — and ``nxmesh_agent_nginx_up`` drops to 0 — while
        the other keeps running."""
        prefix = tmp_path / "managed"
        prefix.mkdir()
        managed = NginxInstance(binary=nginx_binary, prefix=prefix)
        managed.start()
        try:
            check = NginxProcessCheck(managed.pid_file)
            [result] = await check.run()
            assert result.status == "ok", result.message
            assert f"master {managed.pid()}" in result.message
        finally:
            managed.stop()
        assert running_nginx.pid() is not None  # the other nginx still runs
        [result] = await check.run()
        assert result.status == "fail"
        assert str(managed.pid_file) in result.message
        metrics = AgentMetrics()
        metrics.on_health(HealthReport(agent_id="a", ts=0.0, results=(result,)))
        assert b"nxmesh_agent_nginx_up 0.0" in metrics.render()
