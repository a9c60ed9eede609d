"""Behaviour every deployment mode provides."""

from __future__ import annotations

import anyio
import psutil
import pytest

from nxmesh.core.errors import NxMeshError
from nxmesh.core.interfaces import DeploymentMode


def _current_workers(master: int) -> frozenset[int]:
    from nxmesh.agent.process import worker_pids

    return frozenset(pid for pid, current in worker_pids(master).items() if current)


class DeploymentModeContract:
    """Provide ``mode``, an instance whose nginx is *not* running (or not reachable),
    and ``live_mode``, an instance attached to a real nginx that is running."""

    pytestmark = pytest.mark.anyio

    @pytest.fixture
    def mode(self) -> DeploymentMode:
        raise NotImplementedError("subclasses provide mode")

    @pytest.fixture
    def live_mode(self) -> DeploymentMode:
        raise NotImplementedError("subclasses provide live_mode")

    def test_is_a_deployment_mode(self, mode: DeploymentMode) -> None:
        """The provider matches the protocol, has a name and an integer priority."""
        assert isinstance(mode, DeploymentMode)
        assert mode.name
        assert isinstance(mode.priority, int)

    def test_detect_is_a_plain_bool(self, mode: DeploymentMode) -> None:
        """detect() answers True or False without side effects."""
        assert type(mode).detect() in (True, False)

    async def test_no_pid_when_nginx_is_not_running(self, mode: DeploymentMode) -> None:
        """nginx_pid() is None rather than an error when nginx cannot be found."""
        assert await mode.nginx_pid() is None

    async def test_unknown_signal_is_a_clear_error(self, mode: DeploymentMode) -> None:
        """An unknown signal name is rejected with an error naming it."""
        with pytest.raises(NxMeshError, match="bogus"):
            await mode.signal_nginx("bogus")

    async def test_signalling_an_absent_nginx_is_a_clear_error(self, mode: DeploymentMode) -> None:
        """A reload with no nginx to receive it is an `NxMeshError`, not a crash."""
        with pytest.raises(NxMeshError):
            await mode.signal_nginx("reload")

    async def test_pid_of_a_running_nginx_is_its_master(self, live_mode: DeploymentMode) -> None:
        """nginx_pid() names the nginx *master* process (the one that takes signals)."""
        pid = await live_mode.nginx_pid()
        assert pid is not None
        assert "master process" in " ".join(psutil.Process(pid).cmdline())

    async def test_starting_a_running_nginx_is_a_noop(self, live_mode: DeploymentMode) -> None:
        """start_nginx() on a running nginx leaves the same master in place."""
        before = await live_mode.nginx_pid()
        await live_mode.start_nginx()
        assert await live_mode.nginx_pid() == before

    async def test_reload_starts_a_new_worker_generation(self, live_mode: DeploymentMode) -> None:
        """signal_nginx('reload') reaches the master: every current worker is replaced
        while the master stays."""
        master = await live_mode.nginx_pid()
        assert master is not None
        before = _current_workers(master)
        assert before
        await live_mode.signal_nginx("reload")
        with anyio.fail_after(20):  # a bound for slow machines, not a timing check
            # Polling: nginx offers nothing to wait on for a new worker generation.
            while _current_workers(master) & before or not _current_workers(master):  # noqa: ASYNC110
                await anyio.sleep(0.02)
        assert await live_mode.nginx_pid() == master
