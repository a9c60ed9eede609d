"""nxmesh-deploy-k8s: discovery and the sidecar deployment mode against a real nginx."""

from __future__ import annotations

from pathlib import Path

import pytest

from nxmesh import ConfigurationError, NxMeshError
from nxmesh.agent.app import choose_mode
from nxmesh.agent.harness import NginxStack
from nxmesh.agent.layout import NginxLayout
from nxmesh.core.pluginmanager import get_plugin_manager
from nxmesh.core.registry import ProviderRegistries
from nxmesh.core.settings import Settings, load_settings
from nxmesh.plugins.nginx_driver import ReloadDriver
from nxmesh.testing.contracts import DeploymentModeContract
from nxmesh.testing.nginx import NginxInstance, refuse_signal
from nxmesh_deploy_k8s import K8sSettings, K8sSidecarMode


class TestDiscovery:
    def test_registers_the_k8s_sidecar_mode(self) -> None:
        """The deployment mode is registered under the plugin's name."""
        registries = ProviderRegistries.collect(get_plugin_manager(environ={}))
        assert registries["deployment_mode"].get("k8s-sidecar") is K8sSidecarMode
        assert get_plugin_manager(environ={}).plugin_info["deploy_k8s"].distribution == (
            "nxmesh-deploy-k8s"
        )

    def test_not_detected_outside_kubernetes(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without KUBERNETES_SERVICE_HOST the mode does not claim the host."""
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        assert K8sSidecarMode.detect() is False


class TestK8sSidecarContract(DeploymentModeContract):
    @pytest.fixture
    def mode(self, tmp_path: Path) -> K8sSidecarMode:
        return K8sSidecarMode(K8sSettings(pid_file=tmp_path / "none.pid"))

    @pytest.fixture
    def live_mode(self, running_nginx: NginxInstance) -> K8sSidecarMode:
        return K8sSidecarMode(K8sSettings(pid_file=running_nginx.pid_file))


class TestSignals:
    @pytest.mark.anyio
    async def test_start_is_refused_with_an_explanation(self, tmp_path: Path) -> None:
        """The sidecar never starts nginx; the error says why."""
        with pytest.raises(NxMeshError, match="shareProcessNamespace"):
            await K8sSidecarMode(K8sSettings(pid_file=tmp_path / "x.pid")).start_nginx()

    @pytest.mark.anyio
    async def test_a_refused_signal_is_an_error_naming_pid_and_cause(
        self, running_nginx: NginxInstance, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without CAP_KILL the container may not signal nginx: `NginxControlError` names
        the signal, the pid and the cause (tests run as root, so `os.kill` is refused here
        for SIGHUP only)."""
        from nxmesh.agent.process import NginxControlError

        mode = K8sSidecarMode(K8sSettings(pid_file=running_nginx.pid_file))
        pid = await mode.nginx_pid()
        assert pid is not None
        refuse_signal(monkeypatch, pid)
        with pytest.raises(NginxControlError, match=rf"'reload'.*pid {pid}.*not permitted"):
            await mode.signal_nginx("reload")

    @pytest.mark.anyio
    async def test_an_unknown_signal_is_refused_by_name(self, tmp_path: Path) -> None:
        """A signal name nginx does not know is refused before any pid is looked up."""
        with pytest.raises(NxMeshError, match="unknown nginx signal 'kill'"):
            await K8sSidecarMode(K8sSettings(pid_file=tmp_path / "x.pid")).signal_nginx("kill")


def _settings(tmp_path: Path, **env: str) -> Settings:
    environ = {
        "NXMESH_AGENT__DEPLOYMENT_MODE": "k8s-sidecar",
        "NXMESH_AGENT__CONF_DIR": str(tmp_path / "conf"),
        "NXMESH_STATE_DIR": str(tmp_path / "state"),
        **env,
    }
    return load_settings(get_plugin_manager(environ={}), environ=environ, path=None)


class TestFromSettings:
    """The agent builds the mode with ``from_settings``: ``[plugins.deploy_k8s]`` counts,
    and the pid file defaults to the one the rendered ``nginx.conf`` writes."""

    def test_the_agent_builds_the_mode_from_its_section(self, tmp_path: Path) -> None:
        """``NXMESH_PLUGINS__DEPLOY_K8S__PID_FILE`` is the pid file the mode reads."""
        settings = _settings(tmp_path, NXMESH_PLUGINS__DEPLOY_K8S__PID_FILE="/shared/nginx.pid")
        pm = get_plugin_manager(environ={})
        mode = choose_mode(ProviderRegistries(pm), settings)
        assert isinstance(mode, K8sSidecarMode)
        assert mode.pid_file == Path("/shared/nginx.pid")

    def test_the_default_pid_file_is_the_rendered_one(self, tmp_path: Path) -> None:
        """Without a pid_file the mode reads ``<conf_dir>/logs/nginx.pid``: where the
        rendered ``pid logs/nginx.pid`` puts it under nginx's ``-p <conf_dir>/``."""
        settings = _settings(tmp_path)
        mode = K8sSidecarMode.from_settings(settings)
        assert mode.pid_file == NginxLayout.from_settings(settings).pid_file
        assert mode.pid_file == tmp_path / "conf" / "logs" / "nginx.pid"
        assert K8sSidecarMode().pid_file == Path("/etc/nginx/logs/nginx.pid")

    def test_a_conf_dir_other_than_the_agents_is_refused(self, tmp_path: Path) -> None:
        """The section's conf_dir states where the volume is mounted: it must be the
        agent's conf_dir (where releases are written), not silently ignored."""
        same = _settings(tmp_path, NXMESH_PLUGINS__DEPLOY_K8S__CONF_DIR=str(tmp_path / "conf"))
        assert K8sSidecarMode.from_settings(same).layout.conf_dir == tmp_path / "conf"
        other = _settings(tmp_path, NXMESH_PLUGINS__DEPLOY_K8S__CONF_DIR="/etc/nginx")
        with pytest.raises(ConfigurationError, match=r"but agent\.conf_dir is"):
            K8sSidecarMode.from_settings(other)

    @pytest.mark.anyio
    @pytest.mark.nginx
    async def test_applies_reach_an_nginx_running_the_rendered_tree(
        self, nginx_binary: str, tmp_path: Path
    ) -> None:
        """An nginx running an agent-rendered tree (as nginx's container would) is found
        by the default pid file, and an apply through the mode is confirmed."""
        async with NginxStack(root=tmp_path / "conf", nginx_binary=nginx_binary) as stack:
            first = stack.state("first")
            report = await stack.driver.apply(stack.update(first), stack.render(first))
            assert report.outcome == "applied", report.message
            mode = K8sSidecarMode.from_settings(_settings(tmp_path))
            assert await mode.nginx_pid() == await stack.master_pid()
            driver = ReloadDriver(
                mode, stack.layout, nginx_binary=nginx_binary, settings=stack.driver_settings
            )
            second = stack.state("second")
            report = await driver.apply(stack.update(second), stack.render(second))
            assert report.outcome == "applied", report.message
            assert await stack.body() == "second"
