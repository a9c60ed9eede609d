"""Prometheus metrics of the master, on a registry of its own.

A registry per `MasterMetrics` (not the process-global default) keeps two masters in one
process — tests, an embedding application — from colliding, and keeps ``/metrics`` free
of whatever else registered globally.

The API records latency and auth failures itself; transports set `connected_agents`,
orchestration counts `pushes` and observes `convergence_seconds`, the retention job
(`nxmesh.master.retention`) counts `retention_deleted` rows and `retention_runs`.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE", "MasterMetrics"]

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
"""The ``Content-Type`` of the text exposition format."""

_LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_CONVERGENCE_BUCKETS: Final = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class MasterMetrics:
    """Every metric the master exports; `render` produces the ``/metrics`` body."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connected_agents = Gauge(
            "nxmesh_master_connected_agents",
            "Agents with an open stream to this master process, by transport.",
            ["transport"],
            registry=r,
        )
        self.pushes = Counter(
            "nxmesh_master_pushes_total",
            "Config versions sent to agents, by outcome.",
            ["outcome"],
            registry=r,
        )
        self.convergence_seconds = Histogram(
            "nxmesh_master_convergence_seconds",
            "Time from a version's creation until every targeted agent reported it applied.",
            buckets=_CONVERGENCE_BUCKETS,
            registry=r,
        )
        self.api_request_seconds = Histogram(
            "nxmesh_master_api_request_duration_seconds",
            "API request latency by route template, method and status code.",
            ["route", "method", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.auth_failures = Counter(
            "nxmesh_master_auth_failures_total",
            "Rejected authentication attempts, by reason.",
            ["reason"],
            registry=r,
        )
        self.versions_created = Counter(
            "nxmesh_master_versions_created_total",
            "Config versions stored by this master process.",
            registry=r,
        )
        self.websocket_clients = Gauge(
            "nxmesh_master_event_stream_clients",
            "Open events WebSocket connections.",
            registry=r,
        )
        self.retention_deleted = Counter(
            "nxmesh_master_retention_deleted_rows_total",
            "Rows the retention job deleted, by table.",
            ["table"],
            registry=r,
        )
        self.retention_runs = Counter(
            "nxmesh_master_retention_runs_total",
            "Retention passes, by outcome (ok, failed, skipped: another master ran it).",
            ["outcome"],
            registry=r,
        )
        for outcome in ("ok", "failed", "skipped"):
            self.retention_runs.labels(outcome=outcome)

    def auth_failed(self, reason: str) -> None:
        """Count one rejected authentication."""
        self.auth_failures.labels(reason=reason).inc()

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format."""
        return generate_latest(self.registry)
