"""The built-in nginx process health check, against a real nginx."""

from __future__ import annotations

import pytest

from nxmesh.plugins.health_basic import NginxProcessCheck
from nxmesh.testing.contracts import HealthCheckContract


class TestNginxProcessCheckContract(HealthCheckContract):
    @pytest.fixture
    def health_check(self) -> NginxProcessCheck:
        return NginxProcessCheck()


class TestNginxProcessCheck:
    @pytest.mark.anyio
    @pytest.mark.nginx
    async def test_running_nginx_is_ok_with_worker_count(self, running_nginx: object) -> None:
        """With a real nginx running the check is ok and counts its workers."""
        [result] = await NginxProcessCheck().run()
        assert result.status == "ok"
        assert result.metrics["workers"] >= 1
