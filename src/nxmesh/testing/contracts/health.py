"""Behaviour every health check provides."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from nxmesh.core.interfaces import HealthCheck
from nxmesh.core.model import HealthResult


class HealthCheckContract:
    """Provide ``health_check``, an instance whose target is healthy (a running nginx,
    a valid certificate...), and ``failing_health_check``, one whose target is down or
    bad (nothing listening, an expiring certificate, limits already exceeded)."""

    pytestmark = pytest.mark.anyio

    @pytest.fixture
    def health_check(self) -> HealthCheck:
        raise NotImplementedError("subclasses provide health_check")

    @pytest.fixture
    def failing_health_check(self) -> HealthCheck:
        raise NotImplementedError("subclasses provide failing_health_check")

    def test_is_a_health_check(self, health_check: HealthCheck) -> None:
        """The provider matches the HealthCheck protocol and has a name."""
        assert isinstance(health_check, HealthCheck)
        assert health_check.name

    async def test_run_returns_typed_results_named_after_the_check(
        self, health_check: HealthCheck, failing_health_check: HealthCheck
    ) -> None:
        """run() returns at least one HealthResult, each attributed to this check."""
        for check in (health_check, failing_health_check):
            _well_formed(check, await check.run())

    async def test_a_healthy_target_is_ok(self, health_check: HealthCheck) -> None:
        """Every result of a check on a healthy target is ``ok``."""
        results = await health_check.run()
        assert [r.status for r in results] == ["ok"] * len(results), results

    async def test_a_failing_target_is_reported_with_a_reason(
        self, failing_health_check: HealthCheck
    ) -> None:
        """A check on a target that is down or bad reports it (``warn`` or ``fail``),
        with a message saying what is wrong — never a silent ``ok``."""
        results = await failing_health_check.run()
        problems = [r for r in results if r.status != "ok"]
        assert problems, results
        assert all(r.message.strip() for r in problems), problems


def _well_formed(check: HealthCheck, results: Sequence[HealthResult]) -> None:
    assert results, f"{check.name}: run() returned no result"
    for result in results:
        assert isinstance(result, HealthResult)
        assert result.check.split(".", 1)[0] == check.name
        assert result.status in {"ok", "warn", "fail"}
