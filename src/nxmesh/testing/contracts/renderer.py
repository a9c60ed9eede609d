"""Behaviour every renderer provides."""

from __future__ import annotations

import pytest

from nxmesh.core.bundle import Bundle, bundle_digest
from nxmesh.core.interfaces import Renderer
from nxmesh.testing.factories import make_state


class RendererContract:
    """Provide ``renderer``: an instance ready to render."""

    @pytest.fixture
    def renderer(self) -> Renderer:
        raise NotImplementedError("subclasses provide renderer")

    def test_renders_a_bundle_with_nginx_conf(self, renderer: Renderer) -> None:
        """A state renders to a bundle holding nginx.conf, digest matching its files."""
        bundle = renderer.render(make_state(3))
        assert isinstance(bundle, Bundle)
        assert "nginx.conf" in bundle.files
        assert bundle.digest == bundle_digest(bundle.files)

    def test_identical_input_gives_identical_bytes(self, renderer: Renderer) -> None:
        """Rendering the same state twice yields byte-identical bundles."""
        state = make_state(5)
        assert renderer.render(state).files == renderer.render(state).files

    def test_different_input_gives_a_different_digest(self, renderer: Renderer) -> None:
        """A changed state changes the digest."""
        assert renderer.render(make_state(2)).digest != renderer.render(make_state(3)).digest
