"""Behaviour every health check provides."""

from __future__ import annotations

import pytest

from nxmesh.core.interfaces import HealthCheck
from nxmesh.core.model import HealthResult


class HealthCheckContract:
    """Provide ``health_check``: an instance ready to run."""

    pytestmark = pytest.mark.anyio

    @pytest.fixture
    def health_check(self) -> HealthCheck:
        raise NotImplementedError("subclasses provide health_check")

    def test_is_a_health_check(self, health_check: HealthCheck) -> None:
        """The provider matches the HealthCheck protocol and has a name."""
        assert isinstance(health_check, HealthCheck)
        assert health_check.name

    async def test_run_returns_typed_results_named_after_the_check(
        self, health_check: HealthCheck
    ) -> None:
        """run() returns at least one HealthResult, each attributed to this check."""
        results = await health_check.run()
        assert results
        for result in results:
            assert isinstance(result, HealthResult)
            assert result.check.split(".", 1)[0] == health_check.name
            assert result.status in {"ok", "warn", "fail"}
