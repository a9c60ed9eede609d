"""The agent's Prometheus metrics and the loopback HTTP endpoint that serves them.

Everything lives on the agent's *own* `AgentMetrics` (never a process-global registry),
so two agents in one process — tests, embedding applications — never share or clash.
The endpoint is a few lines on anyio sockets rather than prometheus-client's threaded
server: it then belongs to the agent's task group like every other service, and binds
``127.0.0.1`` unless ``agent.metrics_host`` says otherwise.

The counters, gauges and histograms are small classes here writing the text format
exactly as prometheus-client 0.2x's ``generate_latest`` does (``_created`` series
included, unless ``PROMETHEUS_DISABLE_CREATED_SERIES`` is set): importing
prometheus-client cost every idle agent ~2 MB for 14 metrics.

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
``nginx_up``                               gauge      1 when the nginx master runs
``nginx_restarts_total``                   counter    ``result``: ok, failed
``worker_generations_total``               counter    new worker generations confirmed
``circuit_breaker_open``                   gauge      1 while restarts are suspended
``health_check_status``                    gauge      ``check``: 0 ok, 1 warn, 2 fail
``health_check_value``                     gauge      ``check``, ``metric``: the numbers
=========================================  =========  ======================================
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence

import anyio
import anyio.abc
import structlog

from nxmesh.core.events import Event
from nxmesh.core.model import ApplyReport, HealthReport

__all__ = ["CONTENT_TYPE_LATEST", "AgentMetrics", "serve_metrics"]

log = structlog.get_logger("nxmesh.agent.metrics")

CONTENT_TYPE_LATEST = "text/plain; version=1.0.0; charset=utf-8"
"""The exposition's content type (prometheus-client's for this format)."""

_DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_SEVERITY = {"ok": 0.0, "warn": 1.0, "fail": 2.0}


def _number(value: float) -> str:
    """A sample value or bucket bound as prometheus-client writes it (Go's float format)."""
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    if math.isnan(value):
        return "NaN"
    text = repr(value)
    dot = text.find(".")
    if value > 0 and dot > 6:  # Go switches to exponents sooner than Python
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


def _escape(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _sample(name: str, labels: dict[str, str], value: float) -> str:
    if not labels:
        return f"{name} {_number(value)}\n"
    pairs = ",".join(
        f'{key}="{_escape(val).replace(chr(34), chr(92) + chr(34))}"'
        for key, val in sorted(labels.items())
    )
    return f"{name}{{{pairs}}} {_number(value)}\n"


class _Child:
    """One labelled series: a value, or a histogram's buckets and sum."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.value = 0.0
        self.created = time.time()
        self.buckets = [0.0] * len(buckets)
        self.bounds = buckets

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def set(self, value: float) -> None:
        self.value = float(value)

    def observe(self, amount: float) -> None:
        self.value += amount  # the sum
        for i, bound in enumerate(self.bounds):
            if amount <= bound:
                self.buckets[i] += 1.0
                break


class _Metric:
    """A counter, gauge or histogram with its labelled children, in creation order."""

    def __init__(
        self,
        kind: str,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float] = (),
    ) -> None:
        self.kind = kind
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.bounds = (*buckets, math.inf) if kind == "histogram" else ()
        self.children: dict[tuple[str, ...], _Child] = {}
        if not self.labelnames:
            self.labels()

    def labels(self, *values: str) -> _Child:
        key = tuple(str(v) for v in values)
        if len(key) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {key}")
        child = self.children.get(key)
        if child is None:
            child = self.children[key] = _Child(self.bounds)
        return child

    def clear(self) -> None:
        self.children.clear()

    def inc(self, amount: float = 1.0) -> None:
        self.children[()].inc(amount)

    def set(self, value: float) -> None:
        self.children[()].set(value)

    def observe(self, amount: float) -> None:
        self.children[()].observe(amount)

    def expose(self, out: list[str], *, created: bool) -> None:
        help_text = _escape(self.documentation)
        exposed = f"{self.name}_total" if self.kind == "counter" else self.name
        out.append(f"# HELP {exposed} {help_text}\n# TYPE {exposed} {self.kind}\n")
        for key, child in self.children.items():
            labels = dict(zip(self.labelnames, key, strict=True))
            if self.kind == "histogram":
                total = 0.0
                for bound, count in zip(self.bounds, child.buckets, strict=True):
                    total += count
                    out.append(
                        _sample(f"{self.name}_bucket", {**labels, "le": _number(bound)}, total)
                    )
                out.append(_sample(f"{self.name}_count", labels, total))
                out.append(_sample(f"{self.name}_sum", labels, child.value))
            else:
                out.append(_sample(exposed, labels, child.value))
        if created and self.kind != "gauge":
            out.append(f"# HELP {self.name}_created {help_text}\n")
            out.append(f"# TYPE {self.name}_created gauge\n")
            for key, child in self.children.items():
                labels = dict(zip(self.labelnames, key, strict=True))
                out.append(_sample(f"{self.name}_created", labels, child.created))


class AgentMetrics:
    """Every agent metric, this agent's own; fed by reports, events and health."""

    def __init__(self) -> None:
        self._metrics: list[_Metric] = []
        metric = self._metric
        self.applies = metric("counter", "nxmesh_agent_applies", "Applies by outcome.", ["outcome"])
        self.reloads = metric(
            "counter", "nxmesh_agent_reloads", "nginx reloads by result.", ["result"]
        )
        self.rollbacks = metric(
            "counter",
            "nxmesh_agent_rollbacks",
            "Rollbacks after a failed apply, by whether the old tree was restored.",
            ["result"],
        )
        self.apply_duration = metric(
            "histogram",
            "nxmesh_agent_apply_duration_seconds",
            "Time from receiving an update to its report.",
            buckets=_DURATION_BUCKETS,
        )
        self.reload_duration = metric(
            "histogram",
            "nxmesh_agent_reload_duration_seconds",
            "Time from the reload signal to the new worker generation confirmed.",
            buckets=_DURATION_BUCKETS,
        )
        self.config_version = metric(
            "gauge",
            "nxmesh_agent_config_version",
            "Version number of the configuration serving.",
        )
        self.config_info = metric(
            "gauge",
            "nxmesh_agent_config_info",
            "Always 1; labels name the configuration serving.",
            ["version", "digest"],
        )
        self.drift = metric(
            "counter",
            "nxmesh_agent_drift_events",
            "Drift of the live tree, by action.",
            ["action"],
        )
        self.nginx_up = metric("gauge", "nxmesh_agent_nginx_up", "1 when nginx runs.")
        self.restarts = metric(
            "counter",
            "nxmesh_agent_nginx_restarts",
            "Restarts of a dead nginx, by result.",
            ["result"],
        )
        self.generations = metric(
            "counter",
            "nxmesh_agent_worker_generations",
            "New nginx worker generations confirmed serving.",
        )
        self.breaker = metric(
            "gauge",
            "nxmesh_agent_circuit_breaker_open",
            "1 while nginx restarts are suspended by the circuit breaker.",
        )
        self.health_status = metric(
            "gauge",
            "nxmesh_agent_health_check_status",
            "Health check status: 0 ok, 1 warn, 2 fail.",
            ["check"],
        )
        self.health_value = metric(
            "gauge",
            "nxmesh_agent_health_check_value",
            "Numbers reported by health checks.",
            ["check", "metric"],
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
        """Export each check's status and numbers."""
        self.health_value.clear()
        for result in report.results:
            self.health_status.labels(result.check).set(_SEVERITY[result.status])
            for name, value in result.metrics.items():
                self.health_value.labels(result.check, name).set(value)
            if result.check == "nginx_process":
                self.nginx_up.set(0 if result.status == "fail" else 1)

    def _metric(
        self,
        kind: str,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float] = (),
    ) -> _Metric:
        made = _Metric(kind, name, documentation, labelnames, buckets=buckets)
        self._metrics.append(made)
        return made

    def render(self) -> bytes:
        """The exposition text (what ``/metrics`` answers)."""
        created = os.environ.get("PROMETHEUS_DISABLE_CREATED_SERIES", "False").lower() not in (
            "true",
            "1",
            "t",
        )
        out: list[str] = []
        for metric in self._metrics:
            metric.expose(out, created=created)
        return "".join(out).encode()


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
