"""Behaviour every deployment mode provides."""

from __future__ import annotations

import pytest

from nxmesh.core.interfaces import DeploymentMode


class DeploymentModeContract:
    """Provide ``mode``: an instance whose nginx is *not* running (or not reachable)."""

    pytestmark = pytest.mark.anyio

    @pytest.fixture
    def mode(self) -> DeploymentMode:
        raise NotImplementedError("subclasses provide mode")

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
        from nxmesh.core.errors import NxMeshError

        with pytest.raises(NxMeshError, match="bogus"):
            await mode.signal_nginx("bogus")
