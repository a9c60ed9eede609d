"""nxmesh-deploy-k8s: discovery and the sidecar deployment mode against a real nginx."""

from __future__ import annotations

from pathlib import Path

import pytest

from nxmesh import NxMeshError
from nxmesh.core.pluginmanager import get_plugin_manager
from nxmesh.core.registry import ProviderRegistries
from nxmesh.testing.contracts import DeploymentModeContract
from nxmesh.testing.nginx import NginxInstance
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


class TestSignals:
    @pytest.mark.anyio
    async def test_reload_reaches_nginx_through_the_pid_file(
        self, running_nginx: NginxInstance
    ) -> None:
        """signal_nginx('reload') makes the real nginx start a new worker generation."""
        import anyio
        import psutil

        mode = K8sSidecarMode(K8sSettings(pid_file=running_nginx.pid_file))
        pid = await mode.nginx_pid()
        assert pid is not None
        before = {c.pid for c in psutil.Process(pid).children()}
        await mode.signal_nginx("reload")
        with anyio.fail_after(10):
            while not ({c.pid for c in psutil.Process(pid).children()} - before):
                await anyio.sleep(0.05)

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
        import os
        import signal

        from nxmesh.agent.process import NginxControlError

        real_kill = os.kill

        def refuse_hup(pid: int, signum: int) -> None:
            if signum == signal.SIGHUP:
                raise PermissionError(1, "Operation not permitted")
            real_kill(pid, signum)

        monkeypatch.setattr(os, "kill", refuse_hup)
        mode = K8sSidecarMode(K8sSettings(pid_file=running_nginx.pid_file))
        pid = await mode.nginx_pid()
        with pytest.raises(NginxControlError, match=rf"'reload'.*pid {pid}.*not permitted"):
            await mode.signal_nginx("reload")

    @pytest.mark.anyio
    async def test_an_unknown_signal_is_refused_by_name(self, tmp_path: Path) -> None:
        """A signal name nginx does not know is refused before any pid is looked up."""
        with pytest.raises(NxMeshError, match="unknown nginx signal 'kill'"):
            await K8sSidecarMode(K8sSettings(pid_file=tmp_path / "x.pid")).signal_nginx("kill")
