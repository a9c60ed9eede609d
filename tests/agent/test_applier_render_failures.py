"""A render that fails — refused input or a renderer's own bug — is a `failed` report,
and the live configuration keeps serving."""

from __future__ import annotations

from typing import Any

import pytest

from nxmesh.agent.applier import Applier
from nxmesh.agent.harness import NginxStack
from nxmesh.core.pluginmanager import NxMeshPluginManager


class _BrokenRenderer:
    """A renderer whose bug raises something other than a RenderError."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def render(self, state: Any, **kwargs: Any) -> Any:
        raise ValueError("a bug in a third-party renderer")


@pytest.mark.anyio
@pytest.mark.nginx
class TestRenderFailures:
    async def test_a_crashing_renderer_is_a_failed_report_not_a_lost_apply(
        self, applier: Applier, stack: NginxStack, plugin_manager: NxMeshPluginManager
    ) -> None:
        broken = Applier(
            plugin_manager, stack.driver, _BrokenRenderer(stack.renderer), events=stack.events
        )
        report = await broken.apply(stack.update(stack.state("changed"), version=2))
        assert report.outcome == "failed"
        assert report.message == "render failed: ValueError: a bug in a third-party renderer"
        assert await stack.body() == "original"
