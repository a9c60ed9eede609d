"""The agent's Prometheus endpoint: valid exposition text with the agent's numbers."""

from __future__ import annotations

import subprocess

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nxmesh.agent.http import http_get
from nxmesh.agent.metrics import AgentMetrics, serve_metrics
from nxmesh.core.events import Event
from nxmesh.core.model import ApplyReport, HealthReport, HealthResult
from nxmesh.core.settings import AgentSettings
from nxmesh.testing.services import require_binary

pytestmark = pytest.mark.anyio

DIGEST = "ab" * 32


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _fed() -> AgentMetrics:
    metrics = AgentMetrics()
    metrics.on_report(
        ApplyReport(
            agent_id="a",
            version=5,
            digest=DIGEST,
            outcome="applied",
            started_at=100.0,
            finished_at=100.4,
        )
    )
    metrics.on_report(ApplyReport(agent_id="a", version=6, digest=DIGEST, outcome="rolled_back"))
    for kind, payload in [
        ("reload.ok", {"seconds": 0.05}),
        ("reload.failed", {"seconds": 0.01}),
        ("apply.rolled_back", {}),
        ("drift.detected", {}),
        ("drift.reverted", {}),
        ("nginx.died", {}),
        ("nginx.restarted", {}),
        ("breaker.open", {}),
    ]:
        metrics.on_event(Event(kind=kind, payload=payload))
    metrics.on_health(
        HealthReport(
            agent_id="a",
            ts=1.0,
            results=(
                HealthResult(check="stub_status", status="ok", metrics={"active": 3.0}),
                HealthResult(check="cert_expiry.certs_a.crt", status="warn"),
            ),
        )
    )
    return metrics


class TestExposition:
    def test_every_metric_has_the_expected_value(self) -> None:
        """Counters, histograms and gauges carry what the agent reported."""
        s = _samples(_fed().render().decode())
        assert s[("nxmesh_agent_applies_total", (("outcome", "applied"),))] == 1
        assert s[("nxmesh_agent_applies_total", (("outcome", "rolled_back"),))] == 1
        assert s[("nxmesh_agent_applies_total", (("outcome", "failed"),))] == 0
        assert s[("nxmesh_agent_reloads_total", (("result", "ok"),))] == 1
        assert s[("nxmesh_agent_reloads_total", (("result", "failed"),))] == 1
        assert s[("nxmesh_agent_rollbacks_total", (("result", "ok"),))] == 1
        assert s[("nxmesh_agent_apply_duration_seconds_count", ())] == 2
        assert s[("nxmesh_agent_reload_duration_seconds_sum", ())] == pytest.approx(0.05)
        assert s[("nxmesh_agent_config_version", ())] == 5
        assert s[("nxmesh_agent_config_info", (("digest", DIGEST), ("version", "5")))] == 1
        assert s[("nxmesh_agent_drift_events_total", (("action", "detected"),))] == 1
        assert s[("nxmesh_agent_drift_events_total", (("action", "reverted"),))] == 1
        assert s[("nxmesh_agent_nginx_up", ())] == 1
        assert s[("nxmesh_agent_nginx_restarts_total", (("result", "ok"),))] == 1
        assert s[("nxmesh_agent_worker_generations_total", ())] == 1
        assert s[("nxmesh_agent_circuit_breaker_open", ())] == 1
        assert s[("nxmesh_agent_health_check_status", (("check", "cert_expiry.certs_a.crt"),))] == 1
        assert (
            s[("nxmesh_agent_health_check_value", (("check", "stub_status"), ("metric", "active")))]
            == 3
        )

    def test_checks_gone_from_the_report_stop_being_exported(self) -> None:
        """A certificate removed from the live tree (its ``cert_expiry.<file>`` result
        gone), a probe no longer configured: neither their status nor their numbers
        stay exported from an older report."""
        metrics = _fed()
        metrics.on_health(
            HealthReport(
                agent_id="a",
                ts=2.0,
                results=(
                    HealthResult(check="cert_expiry", status="ok", message="no certificates"),
                ),
            )
        )
        s = _samples(metrics.render().decode())
        status = {k[1] for k in s if k[0] == "nxmesh_agent_health_check_status"}
        assert status == {(("check", "cert_expiry"),)}
        assert s[("nxmesh_agent_health_check_status", (("check", "cert_expiry"),))] == 0
        assert not [k for k in s if k[0] == "nxmesh_agent_health_check_value"]

    def test_own_registry_per_agent(self) -> None:
        """Two agents in one process keep separate numbers (no global registry)."""
        first, second = _fed(), AgentMetrics()
        s = _samples(second.render().decode())
        assert s[("nxmesh_agent_applies_total", (("outcome", "applied"),))] == 0
        assert first.registry is not second.registry

    def test_promtool_accepts_the_exposition(self) -> None:
        """``promtool check metrics`` finds no problem (needs promtool: a failure in CI)."""
        promtool = require_binary("promtool")
        result = subprocess.run(
            [promtool, "check", "metrics"],
            input=_fed().render(),
            capture_output=True,
            check=False,
        )
        assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()

    def test_lint_rules_promtool_would_check(self) -> None:
        """Counters end in _total, every family has help, units are base units."""
        for family in text_string_to_metric_families(_fed().render().decode()):
            assert family.documentation, family.name
            assert family.name.startswith("nxmesh_agent_")
            if family.type == "counter":
                assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
            if family.type == "histogram":
                assert family.name.endswith("_seconds")


class TestEndpoint:
    async def test_endpoint_serves_metrics_on_loopback(self) -> None:
        """GET /metrics on the bound port answers the exposition text; others are 404."""
        metrics = _fed()
        async with anyio.create_task_group() as tg:
            port = await tg.start(serve_metrics, metrics, "127.0.0.1", 0)
            response = await http_get("127.0.0.1", port, "/metrics")
            missing = await http_get("127.0.0.1", port, "/nope")
            tg.cancel_scope.cancel()
        assert response.status == 200
        assert response.headers["content-type"].startswith("text/plain")
        assert _samples(response.text)[("nxmesh_agent_config_version", ())] == 5
        assert missing.status == 404

    def test_loopback_is_the_default_bind_address(self) -> None:
        """Unless configured otherwise the endpoint is reachable from this host only."""
        assert AgentSettings().metrics_host == "127.0.0.1"
