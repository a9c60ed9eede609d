"""Behaviour every nginx driver provides."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from nxmesh.core.bundle import Bundle
from nxmesh.core.interfaces import NginxDriver
from nxmesh.core.model import DesiredState, PendingApply


class NginxDriverContract:
    """Provide ``driver`` (on a running nginx) and ``bundle_for`` (renders a state)."""

    pytestmark = pytest.mark.anyio

    @pytest.fixture
    def driver(self) -> NginxDriver:
        raise NotImplementedError("subclasses provide driver")

    @pytest.fixture
    def bundle_for(self) -> Callable[[DesiredState], Bundle]:
        raise NotImplementedError("subclasses provide bundle_for")

    async def test_applied_bundle_becomes_live(
        self, driver: NginxDriver, bundle_for: Callable[[DesiredState], Bundle]
    ) -> None:
        """After a successful apply the live digest is the bundle's digest."""
        from nxmesh.testing.factories import make_state

        state = make_state(2)
        bundle = bundle_for(state)
        report = await driver.apply(
            PendingApply(version=1, digest=bundle.digest, state=state), bundle
        )
        assert report.outcome == "applied", report.message
        assert await driver.live_digest() == bundle.digest

    async def test_reapplying_the_live_digest_is_a_noop(
        self, driver: NginxDriver, bundle_for: Callable[[DesiredState], Bundle]
    ) -> None:
        """Applying the bundle already live reports noop."""
        from nxmesh.testing.factories import make_state

        state = make_state(1)
        bundle = bundle_for(state)
        update = PendingApply(version=1, digest=bundle.digest, state=state)
        await driver.apply(update, bundle)
        report = await driver.apply(update, bundle)
        assert report.outcome == "noop"
