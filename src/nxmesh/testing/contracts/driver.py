"""Behaviour every nginx driver provides."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from nxmesh.core.bundle import Bundle
from nxmesh.core.interfaces import NginxDriver
from nxmesh.core.model import DesiredState, PendingApply
from nxmesh.testing.factories import make_state, multi_site_state

BundleFor = Callable[[DesiredState], Bundle]
FetchBody = Callable[[str], Awaitable[str]]

_PLACEHOLDER_PORT = 8080  # bundle_for moves every site to the port the test nginx binds


def _update(bundle: BundleFor, state: DesiredState, version: int) -> tuple[PendingApply, Bundle]:
    rendered = bundle(state)
    return PendingApply(version=version, digest=rendered.digest, state=state), rendered


class NginxDriverContract:
    """Provide ``driver``, on a real nginx with nothing applied yet; ``bundle_for``,
    which renders a state with every site moved to the port the test nginx may bind;
    and ``fetch_body``, which GETs ``/`` on that port with the given ``Host`` header and
    returns the body, stripped.

    The states served here are `multi_site_state` ones: site 0 answers ``localhost``
    with the body, site *i* answers ``site<i>.test`` with ``<body> <i>``.
    """

    pytestmark = pytest.mark.anyio

    @pytest.fixture
    def driver(self) -> NginxDriver:
        raise NotImplementedError("subclasses provide driver")

    @pytest.fixture
    def bundle_for(self) -> BundleFor:
        raise NotImplementedError("subclasses provide bundle_for")

    @pytest.fixture
    def fetch_body(self) -> FetchBody:
        raise NotImplementedError("subclasses provide fetch_body")

    async def test_nothing_is_live_before_the_first_apply(self, driver: NginxDriver) -> None:
        """A fresh driver has no live digest and no live files."""
        assert await driver.live_digest() is None
        assert await driver.live_files() is None

    async def test_applied_bundle_becomes_live(
        self, driver: NginxDriver, bundle_for: BundleFor
    ) -> None:
        """After a successful apply the live digest is the bundle's digest and the live
        files are the bundle's files (drift detection compares against them)."""
        update, bundle = _update(bundle_for, make_state(2), 1)
        report = await driver.apply(update, bundle)
        assert report.outcome == "applied", report.message
        assert await driver.live_digest() == bundle.digest
        assert await driver.live_files() == bundle.files

    async def test_nginx_serves_each_applied_bundle(
        self, driver: NginxDriver, bundle_for: BundleFor, fetch_body: FetchBody
    ) -> None:
        """Right after each ``applied`` report nginx answers with the new configuration,
        on every site."""
        for version, body in enumerate(("contract-first", "contract-second"), start=1):
            update, bundle = _update(
                bundle_for, multi_site_state(_PLACEHOLDER_PORT, body, sites=2), version
            )
            report = await driver.apply(update, bundle)
            assert report.outcome == "applied", report.message
            assert await fetch_body("localhost") == body
            assert await fetch_body("site1.test") == f"{body} 1"

    async def test_a_bundle_nginx_rejects_leaves_the_old_one_serving(
        self, driver: NginxDriver, bundle_for: BundleFor, fetch_body: FetchBody
    ) -> None:
        """A bundle ``nginx -t`` refuses is reported ``failed`` with nginx's reason (in
        ``message`` or ``nginx_output``); the previous bundle stays live and serving."""
        update, good = _update(bundle_for, multi_site_state(_PLACEHOLDER_PORT, "contract-good"), 1)
        assert (await driver.apply(update, good)).outcome == "applied"
        update, bad = _update(bundle_for, multi_site_state(_PLACEHOLDER_PORT, "contract-bad"), 2)
        files = dict(bad.files)
        files["nginx.conf"] += b"\ncontract_unknown_directive on;\n"
        broken = Bundle(files)
        report = await driver.apply(
            PendingApply(version=2, digest=broken.digest, state=update.state), broken
        )
        assert report.outcome == "failed", report.message
        # nginx's words may be in the message or in `nginx_output` (shown beside it).
        said = f"{report.message}\n{report.nginx_output}"
        assert "contract_unknown_directive" in said, said
        assert await driver.live_digest() == good.digest
        assert await fetch_body("localhost") == "contract-good"

    async def test_reapplying_the_live_digest_is_a_noop(
        self, driver: NginxDriver, bundle_for: BundleFor
    ) -> None:
        """Applying the bundle already live reports noop."""
        update, bundle = _update(bundle_for, make_state(1), 1)
        assert (await driver.apply(update, bundle)).outcome == "applied"
        report = await driver.apply(update, bundle)
        assert report.outcome == "noop"

    async def test_recover_after_a_clean_apply_changes_nothing(
        self, driver: NginxDriver, bundle_for: BundleFor, fetch_body: FetchBody
    ) -> None:
        """With no interrupted apply, ``recover()`` (run at every agent start) leaves the
        live bundle live and serving."""
        update, bundle = _update(
            bundle_for, multi_site_state(_PLACEHOLDER_PORT, "contract-kept"), 1
        )
        assert (await driver.apply(update, bundle)).outcome == "applied"
        said = await driver.recover()
        assert said is None or isinstance(said, str)
        assert await driver.live_digest() == bundle.digest
        assert await fetch_body("localhost") == "contract-kept"
