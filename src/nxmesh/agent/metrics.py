"""The agent's Prometheus metrics and the loopback HTTP endpoint that serves them.

Everything lives on the agent's *own* `CollectorRegistry` (never the process-global
one), so two agents in one process — tests, embedding applications — never share or
clash. The endpoint is a few lines on anyio sockets rather than prometheus-client's
threaded server: it then belongs to the agent's task group like every other service,
and binds ``127.0.0.1`` unless ``agent.metrics_host`` says otherwise.

Metrics (all prefixed ``nxmesh_agent_``):

=========================================  =========  ======================================
name                                       type       labels / meaning
=========================================  =========  ======================================
``applies_total``                          counter    ``outcome``: applied, noop, failed,
                                                      rolled_back, vetoed
``reloads_total``                          counter    ``result``: ok, failed
``rollbacks_total``                        counter    ``result``: ok (restored), failed
``apply_duration_seconds``                 histogram  receive → report, per apply
``reload_duration_seconds``                histogram  signal → new generation confirmed
``config_version``                         gauge      version number now serving
``config_info``                            gauge      1, labels ``version``, ``digest``
``drift_events_total``                     counter    ``action``: detected, reverted,
                                                      revert_failed
``nginx_up``                               gauge      1 when the agent's nginx master runs
                                                      (its pid file, not any nginx)
``nginx_restarts_total``                   counter    ``result``: ok, failed
``worker_generations_total``               counter    new worker generations confirmed
``circuit_breaker_open``                   gauge      1 while restarts are suspended
``health_check_status``                    gauge      ``check``: 0 ok, 1 warn, 2 fail
``health_check_value``                     gauge      ``check``, ``metric``: the numbers
=========================================  =========  ======================================
"""

from __future__ import annotations

import anyio
import anyio.abc
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from nxmesh.core.events import Event
from nxmesh.core.model import ApplyReport, HealthReport

__all__ = ["AgentMetrics", "serve_metrics"]

log = structlog.get_logger("nxmesh.agent.metrics")

_DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_SEVERITY = {"ok": 0.0, "warn": 1.0, "fail": 2.0}


class AgentMetrics:
    """Every agent metric, on a private registry; fed by reports, events and health."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.applies = Counter(
            "nxmesh_agent_applies", "Applies by outcome.", ["outcome"], registry=r
        )
        self.reloads = Counter(
            "nxmesh_agent_reloads", "nginx reloads by result.", ["result"], registry=r
        )
        self.rollbacks = Counter(
            "nxmesh_agent_rollbacks",
            "Rollbacks after a failed apply, by whether the old tree was restored.",
            ["result"],
            registry=r,
        )
        self.apply_duration = Histogram(
            "nxmesh_agent_apply_duration_seconds",
            "Time from receiving an update to its report.",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.reload_duration = Histogram(
            "nxmesh_agent_reload_duration_seconds",
            "Time from the reload signal to the new worker generation confirmed.",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.config_version = Gauge(
            "nxmesh_agent_config_version",
            "Version number of the configuration serving.",
            registry=r,
        )
        self.config_info = Gauge(
            "nxmesh_agent_config_info",
            "Always 1; labels name the configuration serving.",
            ["version", "digest"],
            registry=r,
        )
        self.drift = Counter(
            "nxmesh_agent_drift_events",
            "Drift of the live tree, by action.",
            ["action"],
            registry=r,
        )
        self.nginx_up = Gauge(
            "nxmesh_agent_nginx_up", "1 when the agent's own nginx master runs.", registry=r
        )
        self.restarts = Counter(
            "nxmesh_agent_nginx_restarts",
            "Restarts of a dead nginx, by result.",
            ["result"],
            registry=r,
        )
        self.generations = Counter(
            "nxmesh_agent_worker_generations",
            "New nginx worker generations confirmed serving.",
            registry=r,
        )
        self.breaker = Gauge(
            "nxmesh_agent_circuit_breaker_open",
            "1 while nginx restarts are suspended by the circuit breaker.",
            registry=r,
        )
        self.health_status = Gauge(
            "nxmesh_agent_health_check_status",
            "Health check status: 0 ok, 1 warn, 2 fail.",
            ["check"],
            registry=r,
        )
        self.health_value = Gauge(
            "nxmesh_agent_health_check_value",
            "Numbers reported by health checks.",
            ["check", "metric"],
            registry=r,
        )
        for outcome in ("applied", "noop", "failed", "rolled_back", "vetoed"):
            self.applies.labels(outcome)
        for result in ("ok", "failed"):
            self.reloads.labels(result)
            self.rollbacks.labels(result)
            self.restarts.labels(result)
        for action in ("detected", "reverted", "revert_failed"):
            self.drift.labels(action)

    # -- feeding ------------------------------------------------------------------------

    def on_report(self, report: ApplyReport) -> None:
        """Count an apply; a serving outcome also sets the current version."""
        self.applies.labels(report.outcome).inc()
        self.apply_duration.observe(max(report.finished_at - report.started_at, 0.0))
        if report.outcome in ("applied", "noop"):
            self.config_version.set(report.version)
            self.config_info.clear()
            self.config_info.labels(str(report.version), report.digest).set(1)

    def on_event(self, event: Event) -> None:
        """Count what the driver and the watchdog record."""
        kind = event.kind
        if kind in ("reload.ok", "reload.failed"):
            result = kind.split(".", 1)[1]
            self.reloads.labels(result).inc()
            if result == "ok":
                self.generations.inc()
                self.reload_duration.observe(float(event.payload.get("seconds", 0.0)))
        elif kind == "apply.rolled_back":
            self.rollbacks.labels("ok").inc()
        elif kind == "apply.failed" and "rolling back failed" in str(event.payload.get("message")):
            self.rollbacks.labels("failed").inc()
        elif kind.startswith("drift."):
            self.drift.labels(kind.split(".", 1)[1]).inc()
        elif kind in ("nginx.restarted", "nginx.up"):
            self.nginx_up.set(1)
            if kind == "nginx.restarted":
                self.restarts.labels("ok").inc()
        elif kind == "nginx.died":
            self.nginx_up.set(0)
        elif kind == "nginx.restart_failed":
            self.restarts.labels("failed").inc()
        elif kind == "breaker.open":
            self.breaker.set(1)
        elif kind == "breaker.closed":
            self.breaker.set(0)

    def on_health(self, report: HealthReport) -> None:
        """Export each check's status and numbers.

        Both families are cleared first: a check gone from the report (the result of a
        certificate file removed from the live tree, a probe no longer configured) stops
        being exported instead of repeating its last status forever.
        """
        self.health_status.clear()
        self.health_value.clear()
        for result in report.results:
            self.health_status.labels(result.check).set(_SEVERITY[result.status])
            for name, value in result.metrics.items():
                self.health_value.labels(result.check, name).set(value)
            if result.check == "nginx_process":
                self.nginx_up.set(0 if result.status == "fail" else 1)

    def render(self) -> bytes:
        """The exposition text (what ``/metrics`` answers)."""
        return generate_latest(self.registry)


async def serve_metrics(
    metrics: AgentMetrics,
    host: str = "127.0.0.1",
    port: int = 9470,
    *,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` on `host`:`port` until cancelled; reports the bound port."""
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    async with listener:
        bound = listener.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610
        log.info("metrics endpoint listening", host=host, port=bound)
        task_status.started(bound)
        await listener.serve(lambda stream: _handle(metrics, stream))


async def _handle(metrics: AgentMetrics, stream: anyio.abc.SocketStream) -> None:
    async with stream:
        try:
            with anyio.fail_after(5):
                request = b""
                while b"\r\n\r\n" not in request and len(request) < 8192:
                    request += await stream.receive()
        except (TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            return
        line = request.split(b"\r\n", 1)[0].split()
        if len(line) >= 2 and line[0] == b"GET" and line[1].split(b"?")[0] in (b"/metrics", b"/"):
            status, content_type, body = "200 OK", CONTENT_TYPE_LATEST, metrics.render()
        else:
            status, content_type, body = "404 Not Found", "text/plain", b"not found\n"
        head = (
            f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        try:
            await stream.send(head + body)
        except (anyio.BrokenResourceError, OSError):
            return
