"""The standalone and docker-sidecar deployment modes, against a real nginx."""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nxmesh import NxMeshError
from nxmesh.agent.harness import NginxStack
from nxmesh.agent.layout import NginxLayout
from nxmesh.agent.process import NginxControlError, pid_alive, worker_pids
from nxmesh.core.pluginmanager import NxMeshPluginManager
from nxmesh.core.registry import ProviderRegistries
from nxmesh.plugins.deploy_docker import DockerSettings, DockerSidecarMode, in_container
from nxmesh.plugins.deploy_standalone import StandaloneMode, StandaloneSettings
from nxmesh.testing.contracts import DeploymentModeContract
from nxmesh.testing.nginx import refuse_signal


@pytest.fixture
async def served_stack(
    nginx_binary: str, tmp_path: Path, anyio_backend: str, request: pytest.FixtureRequest
) -> AsyncIterator[NginxStack]:
    """A stack whose nginx runs (supervised unless the test class says otherwise)."""
    supervise = getattr(request.cls, "supervise", True)
    async with NginxStack(
        root=tmp_path / "live", nginx_binary=nginx_binary, supervise=supervise
    ) as stack:
        state = stack.state("live")
        report = await stack.driver.apply(stack.update(state), stack.render(state))
        assert report.outcome == "applied", report.message
        yield stack


class TestStandaloneSupervisedContract(DeploymentModeContract):
    @pytest.fixture
    def mode(self, tmp_path: Path) -> StandaloneMode:
        return StandaloneMode(NginxLayout.for_prefix(tmp_path))

    @pytest.fixture
    def live_mode(self, served_stack: NginxStack) -> StandaloneMode:
        return served_stack.mode


class TestStandaloneAttachedContract(DeploymentModeContract):
    supervise = False

    @pytest.fixture
    def mode(self, tmp_path: Path) -> StandaloneMode:
        return StandaloneMode(
            NginxLayout.for_prefix(tmp_path), settings=StandaloneSettings(supervise=False)
        )

    @pytest.fixture
    def live_mode(self, served_stack: NginxStack) -> StandaloneMode:
        return served_stack.mode


class TestDockerSidecarContract(DeploymentModeContract):
    supervise = False

    @pytest.fixture
    def mode(self, tmp_path: Path) -> DockerSidecarMode:
        return DockerSidecarMode(NginxLayout.for_prefix(tmp_path))

    @pytest.fixture
    def live_mode(self, served_stack: NginxStack) -> DockerSidecarMode:
        # The sidecar sees the nginx another container started: here, the stack's.
        return DockerSidecarMode(served_stack.layout)


class TestRegistration:
    def test_both_modes_are_registered(self, plugin_manager: NxMeshPluginManager) -> None:
        """standalone and docker-sidecar are deployment modes of the built-in plugins."""
        modes = ProviderRegistries.collect(plugin_manager)["deployment_mode"]
        assert modes.get("standalone") is StandaloneMode
        assert modes.get("docker-sidecar") is DockerSidecarMode

    def test_sidecars_outrank_standalone(self) -> None:
        """With auto-detection a detected sidecar mode wins over standalone."""
        assert DockerSidecarMode.priority > StandaloneMode.priority


class TestDetect:
    def test_dockerenv_file_means_container(self, tmp_path: Path) -> None:
        """/.dockerenv marks a docker container."""
        (tmp_path / ".dockerenv").touch()
        none = tmp_path / "missing"
        assert in_container(tmp_path / ".dockerenv", none, none) is True

    def test_container_cgroup_means_container(self, tmp_path: Path) -> None:
        """A docker cgroup path marks a container even without /.dockerenv."""
        cgroup = tmp_path / "cgroup"
        cgroup.write_text("0::/docker/3f2a9c\n")
        none = tmp_path / "missing"
        assert in_container(none, cgroup, none) is True

    def test_plain_host_is_not_a_container(self, tmp_path: Path) -> None:
        """No marker file and a root cgroup: not a container."""
        cgroup = tmp_path / "cgroup"
        cgroup.write_text("0::/\n")
        mountinfo = tmp_path / "mountinfo"
        mountinfo.write_text("22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n")
        assert in_container(tmp_path / "missing", cgroup, mountinfo) is False

    def test_standalone_detects_an_installed_nginx(self, nginx_binary: str) -> None:
        """Standalone claims a host that has an nginx binary."""
        assert StandaloneMode.detect() is True


@pytest.fixture
async def applied(
    nginx_binary: str, tmp_path: Path, anyio_backend: str
) -> AsyncIterator[NginxStack]:
    """A supervised nginx serving "one" from a stack rooted in `tmp_path`."""
    async with NginxStack(root=tmp_path, nginx_binary=nginx_binary) as stack:
        state = stack.state("one")
        report = await stack.driver.apply(stack.update(state), stack.render(state))
        assert report.outcome == "applied", report.message
        yield stack


@pytest.mark.anyio
@pytest.mark.nginx
class TestStandaloneSupervised:
    async def test_nginx_runs_as_a_child_in_the_foreground(self, applied: NginxStack) -> None:
        """The supervised nginx master is this process's child and wrote its pid file."""
        pid = await applied.mode.nginx_pid()
        assert pid is not None
        assert applied.mode.supervising
        assert int(applied.layout.pid_file.read_text()) == pid
        import psutil

        assert psutil.Process(pid).ppid() == os.getpid()

    async def test_aclose_stops_the_child(self, applied: NginxStack) -> None:
        """Closing the mode stops a supervised nginx (stop_on_exit)."""
        pid = await applied.mode.nginx_pid()
        assert pid is not None
        await applied.mode.aclose()
        assert not pid_alive(pid)
        assert await applied.mode.nginx_pid() is None

    async def test_a_new_agent_adopts_the_running_nginx(self, applied: NginxStack) -> None:
        """start_nginx with nginx already running (pid file) adopts it: no second master."""
        pid = await applied.mode.nginx_pid()
        other = StandaloneMode(applied.layout, nginx_binary=applied.nginx_binary)
        await other.start_nginx()
        assert await other.nginx_pid() == pid
        assert not other.supervising

    async def test_start_failure_carries_nginx_output(
        self, nginx_binary: str, tmp_path: Path
    ) -> None:
        """A tree nginx cannot start from is an error quoting nginx's complaint."""
        layout = NginxLayout.for_prefix(tmp_path)
        release = tmp_path / "releases" / ("0" * 64)
        release.mkdir(parents=True)
        (release / "nginx.conf").write_text("events {}\nhttp { bogus on; }\n")
        (tmp_path / "current").symlink_to(Path("releases") / ("0" * 64))
        mode = StandaloneMode(layout, nginx_binary=nginx_binary)
        with pytest.raises(NxMeshError, match='unknown directive "bogus"'):
            await mode.start_nginx()
        assert await mode.nginx_pid() is None

    @pytest.mark.parametrize("stop_on_exit", [True, False])
    async def test_an_adopted_nginx_is_stopped_on_exit_like_a_child(
        self, nginx_binary: str, tmp_path: Path, stop_on_exit: bool
    ) -> None:
        """The nginx of an agent that died (not this process's child, found through the
        pid file) is stopped gracefully by a clean exit of the agent that adopted it when
        `stop_on_exit` — with systemd's KillMode=process nothing else stops it — and
        left running otherwise."""
        async with NginxStack(tmp_path, nginx_binary, supervise=False) as stack:
            state = stack.state("adopted")
            await stack.driver.apply(stack.update(state), stack.render(state))
            pid = await stack.mode.nginx_pid()
            assert pid is not None
            adopter = StandaloneMode(
                stack.layout,
                nginx_binary=nginx_binary,
                settings=StandaloneSettings(stop_on_exit=stop_on_exit),
            )
            await adopter.start_nginx()  # adopts: no second master
            assert await adopter.nginx_pid() == pid
            assert not adopter.supervising
            await adopter.aclose()
            assert pid_alive(pid) is not stop_on_exit
            assert await adopter.nginx_pid() == (None if stop_on_exit else pid)

    async def test_starting_without_a_tree_is_refused(self, tmp_path: Path) -> None:
        """No applied configuration yet: start_nginx explains instead of failing obscurely."""
        mode = StandaloneMode(NginxLayout.for_prefix(tmp_path))
        with pytest.raises(NxMeshError, match="nothing applied yet"):
            await mode.start_nginx()


@pytest.mark.anyio
@pytest.mark.nginx
class TestMasterKilled:
    """The nginx master dies outright (SIGKILL, the OOM killer): its workers live on,
    holding the listening sockets and serving the old configuration."""

    supervise = True

    async def test_start_stops_the_orphaned_workers_and_serves_again(
        self, served_stack: NginxStack
    ) -> None:
        import anyio
        import anyio.lowlevel

        from nxmesh.agent.process import orphaned_workers

        mode = served_stack.mode
        master = await mode.nginx_pid()
        assert master is not None
        workers = list(worker_pids(master))
        assert workers
        os.kill(master, signal.SIGKILL)
        with anyio.fail_after(10):  # a bound, not a timing check
            while pid_alive(master):  # a zombie counts as gone
                await anyio.lowlevel.checkpoint()
        assert {p.pid for p in orphaned_workers(master)} == set(workers)
        assert await served_stack.body() == "live"  # the orphans still answer
        await mode.start_nginx()
        restarted = await mode.nginx_pid()
        assert restarted is not None
        assert restarted != master
        assert not any(pid_alive(p) for p in workers)
        assert await served_stack.body() == "live"  # the new master serves the live tree


class TestMasterKilledAttached(TestMasterKilled):
    supervise = False


@pytest.mark.anyio
@pytest.mark.nginx
class TestStandaloneAttached:
    async def test_attached_nginx_is_daemonized_and_left_running(
        self, nginx_binary: str, tmp_path: Path
    ) -> None:
        """supervise=false starts nginx as a daemon that outlives the mode."""
        async with NginxStack(tmp_path, nginx_binary, supervise=False) as stack:
            state = stack.state("daemon")
            await stack.driver.apply(stack.update(state), stack.render(state))
            pid = await stack.mode.nginx_pid()
            assert pid is not None
            import psutil

            assert psutil.Process(pid).ppid() != os.getpid()
            await stack.mode.aclose()
            assert pid_alive(pid)
            assert await stack.body() == "daemon"


@pytest.mark.anyio
@pytest.mark.nginx
class TestNginxEnvironment:
    @pytest.mark.parametrize("supervise", [True, False], ids=["supervised", "attached"])
    async def test_nginx_gets_none_of_the_agents_nxmesh_variables(
        self, nginx_binary: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, supervise: bool
    ) -> None:
        """The bootstrap token (and every other NXMESH_* setting) stays out of nginx's
        environment — the served nginx, child or daemon, and ``nginx -t`` — while the
        rest of the environment is kept. (nginx overwrites ``/proc/<pid>/environ`` with
        its process title, so the environment it was started with is recorded by a
        wrapper that then execs the real nginx.)"""
        record = tmp_path / "nginx.env"
        wrapper = tmp_path / "bin" / "nginx"
        wrapper.parent.mkdir()
        wrapper.write_text(f'#!/bin/sh\nenv >> "{record}"\nexec {nginx_binary} "$@"\n')
        wrapper.chmod(0o755)
        monkeypatch.setenv("NXMESH_AGENT__BOOTSTRAP_TOKEN", "bootstrap-secret")
        monkeypatch.setenv("NXMESH_STORAGE_URL", "postgresql://u:pw@db/nxmesh")
        monkeypatch.setenv("OTHER_SETTING", "kept")
        async with NginxStack(tmp_path / "conf", str(wrapper), supervise=supervise) as stack:
            state = stack.state("env")
            report = await stack.driver.apply(stack.update(state), stack.render(state))
            assert report.outcome == "applied", report.message
            assert await stack.body() == "env"
        seen = record.read_text()
        # nginx -V (the stream module), nginx -t, then the served nginx
        assert seen.count("OTHER_SETTING=kept") == 3
        assert "NXMESH_" not in seen
        assert "bootstrap-secret" not in seen


@pytest.mark.anyio
@pytest.mark.nginx
class TestDockerSidecar:
    async def test_signals_nginx_found_through_the_shared_pid_file(
        self, applied: NginxStack
    ) -> None:
        """The sidecar finds nginx by the pid file on the shared volume and reloads it."""
        import anyio

        mode = DockerSidecarMode(applied.layout)
        pid = await mode.nginx_pid()
        assert pid == await applied.mode.nginx_pid()
        assert pid is not None
        before = set(worker_pids(pid))
        await mode.signal_nginx("reload")
        with anyio.fail_after(10):
            while not (set(worker_pids(pid)) - before):
                await anyio.sleep(0.02)

    async def test_start_is_left_to_the_nginx_container(self, tmp_path: Path) -> None:
        """The sidecar never starts nginx; the error says where it should come from."""
        mode = DockerSidecarMode(NginxLayout.for_prefix(tmp_path), settings=DockerSettings())
        with pytest.raises(NxMeshError, match="--pid=container"):
            await mode.start_nginx()


@pytest.mark.anyio
class TestPidFiles:
    async def test_a_stale_pid_naming_another_process_is_ignored(self, tmp_path: Path) -> None:
        """After a reboot the pid may belong to something else: never treat it as nginx."""
        layout = NginxLayout.for_prefix(tmp_path)
        layout.pid_file.parent.mkdir(parents=True)
        layout.pid_file.write_text(f"{os.getpid()}\n")  # alive, but this is python
        mode = StandaloneMode(layout, settings=StandaloneSettings(supervise=False))
        assert await mode.nginx_pid() is None
        with pytest.raises(NxMeshError, match="no running nginx"):
            await mode.signal_nginx("reload")


@pytest.mark.anyio
@pytest.mark.nginx
class TestOsErrors:
    @pytest.mark.parametrize("kind", ["standalone", "docker-sidecar"])
    @pytest.mark.parametrize("error", [PermissionError, ProcessLookupError])
    async def test_a_refused_signal_is_an_error_naming_pid_and_cause(
        self,
        applied: NginxStack,
        monkeypatch: pytest.MonkeyPatch,
        kind: str,
        error: type[OSError],
    ) -> None:
        """os.kill refused (EPERM, ESRCH) is an NxMeshError saying what was sent to whom."""
        mode = applied.mode if kind == "standalone" else DockerSidecarMode(applied.layout)
        pid = await mode.nginx_pid()
        assert pid is not None
        refuse_signal(monkeypatch, pid, signal.SIGHUP, error)
        with pytest.raises(NginxControlError) as caught:
            await mode.signal_nginx("reload")
        message = str(caught.value)
        assert f"cannot send 'reload' (SIGHUP) to nginx pid {pid}" in message
        assert os.strerror(errno.EPERM if error is PermissionError else errno.ESRCH) in message
        assert isinstance(caught.value, NxMeshError)
        assert isinstance(caught.value.__cause__, error)

    @pytest.mark.parametrize("supervise", [True, False])
    async def test_a_missing_binary_is_a_start_error_naming_it(
        self, tmp_path: Path, supervise: bool
    ) -> None:
        """A moved or mistyped nginx binary is an NxMeshError naming it, not an OSError."""
        release = tmp_path / "releases" / ("0" * 64)
        release.mkdir(parents=True)
        (release / "nginx.conf").write_text("events {}\n")
        (tmp_path / "current").symlink_to(Path("releases") / ("0" * 64))
        missing = tmp_path / "bin" / "nginx"
        mode = StandaloneMode(
            NginxLayout.for_prefix(tmp_path),
            nginx_binary=str(missing),
            settings=StandaloneSettings(supervise=supervise),
        )
        with pytest.raises(NginxControlError, match="cannot start nginx") as caught:
            await mode.start_nginx()
        assert str(missing) in str(caught.value)
        assert "No such file or directory" in str(caught.value)
        assert "agent.nginx_binary" in str(caught.value)
        assert await mode.nginx_pid() is None
