"""Health checks of the nginx an agent runs and of the host it runs on.

- ``stub_status``: nginx's own counters from the agent's local status server
  (``/nginx_status``): active, accepts, handled, requests, reading, writing, waiting.
  ``warn`` when accepts and handled differ (nginx dropped connections: a worker or
  file-descriptor limit was hit).
- ``http_probe``: a GET of each configured endpoint (``probes``: an ``http://`` or
  ``https://`` URL, optionally followed by a space and the Host to ask for, since nginx
  refuses names no site serves, and by ``proxy_protocol`` for a listener that expects a
  PROXY protocol line); ``fail`` on a connection error, a TLS handshake or
  certificate that fails (HTTPS: the name asked for is the SNI and the name checked,
  against ``probe_ca_file`` or the host's trust store, unless ``probe_verify_tls`` is
  off), or a status of 400 and up. One result per probe.
- ``system``: CPU, memory, disk (of the config root), load average and the RSS of
  nginx's worker processes, via psutil; ``warn`` past the configured thresholds.
- ``cert_expiry``: days left on every certificate file of the live tree (``*.crt``,
  ``*.pem``); ``warn`` below ``cert_warn_days``, ``fail`` below ``cert_fail_days``.

The agent builds each check with ``from_settings(settings)``; settings live in
``[plugins.health_nginx]``. (The nginx-process check is in `health_basic`.)
"""

from __future__ import annotations

import datetime as dt
import os
import re
import ssl
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
import attrs
import psutil

from nxmesh import HealthResult, hookimpl
from nxmesh.agent.http import http_get
from nxmesh.agent.layout import NginxLayout, render_settings_of
from nxmesh.agent.process import read_pid_file, worker_pids
from nxmesh.core.model import HealthStatus
from nxmesh.core.validation import SERVER_NAME

if TYPE_CHECKING:
    from nxmesh.core.interfaces import HealthCheck
    from nxmesh.core.settings import Settings, SettingsRegistry

__all__ = [
    "SECTION",
    "CertExpiryCheck",
    "HealthSettings",
    "HttpProbeCheck",
    "StubStatusCheck",
    "SystemCheck",
    "parse_stub_status",
]

SECTION = "health_nginx"
STUB_STATUS_PATH = "/nginx_status"
_PROBE_SCHEMES = ("http", "https")


PROXY_PROTOCOL_FLAG = "proxy_protocol"


def _probe_parts(probe: str) -> tuple[str, str | None, bool]:
    """A probe's URL, the Host it asks for and whether it opens with a PROXY protocol
    line: ``"http://127.0.0.1/healthz"``, with the name of the site to reach after a space,
    ``"http://127.0.0.1/healthz shop.example.com"`` (nginx refuses names no site serves,
    and an IP is not a site's name), and ``proxy_protocol`` last for a listener behind a
    load balancer that sends one (``listen ... proxy_protocol`` closes connections
    without it)."""
    url, *rest = probe.split()
    proxied = bool(rest) and rest[-1] == PROXY_PROTOCOL_FLAG
    if proxied:
        rest = rest[:-1]
    return url, " ".join(rest) or None, proxied


def _readable_file(_inst: object, attribute: attrs.Attribute[str | None], value: object) -> None:
    if value is not None and not (isinstance(value, str) and os.access(value, os.R_OK)):
        raise ValueError(f"{attribute.name}: {value!r} is not a file this agent can read")


def _probes(_inst: object, attribute: attrs.Attribute[tuple[str, ...]], value: object) -> None:
    for probe in value:  # type: ignore[attr-defined]
        if not isinstance(probe, str) or not probe.strip():
            raise ValueError(f"{attribute.name} must hold URLs, got {probe!r}")
        url, host, _ = _probe_parts(probe)
        parts = urlsplit(url)
        if parts.scheme not in _PROBE_SCHEMES or not parts.hostname:
            raise ValueError(
                f"{attribute.name} must hold http:// or https:// URLs, each optionally followed "
                f"by a space and the Host to ask for, and by {PROXY_PROTOCOL_FLAG}, "
                f"got {probe!r}"
            )
        if host is not None and SERVER_NAME.reason(host) is not None:
            raise ValueError(f"{attribute.name}: the Host of {url!r} is not a name: {host!r}")


@attrs.frozen
class HealthSettings:
    """``[plugins.health_nginx]``: what to probe and when to warn."""

    probes: tuple[str, ...] = attrs.field(default=(), validator=_probes)
    probe_timeout: float = 2.0
    # HTTPS probes check the site's certificate, as browsers do: an expired or wrong one
    # fails the probe. `probe_ca_file`: the CAs to trust instead of the host's store (an
    # internal CA); `probe_verify_tls = false` checks nothing (self-signed certificates).
    probe_ca_file: str | None = attrs.field(default=None, validator=_readable_file)
    probe_verify_tls: bool = True
    cert_warn_days: float = 14.0
    cert_fail_days: float = 3.0
    memory_warn_percent: float = 90.0
    disk_warn_percent: float = 90.0
    load_warn_per_cpu: float = 2.0


def _section(settings: Settings) -> HealthSettings:
    section = settings.plugins.get(SECTION)
    return section if isinstance(section, HealthSettings) else HealthSettings()


# ---------------------------------------------------------------------------------------
# stub_status
# ---------------------------------------------------------------------------------------

_STUB = re.compile(
    r"Active connections:\s*(?P<active>\d+)\s*"
    r"server accepts handled requests\s*(?P<accepts>\d+)\s+(?P<handled>\d+)\s+(?P<requests>\d+)\s*"
    r"Reading:\s*(?P<reading>\d+)\s+Writing:\s*(?P<writing>\d+)\s+Waiting:\s*(?P<waiting>\d+)"
)


def parse_stub_status(text: str) -> dict[str, float]:
    """nginx's stub_status page → its seven numbers; ValueError when it is not one."""
    match = _STUB.search(text)
    if match is None:
        raise ValueError(f"not a stub_status page: {text[:80]!r}")
    return {key: float(value) for key, value in match.groupdict().items()}


class StubStatusCheck:
    """nginx's connection and request counters from the local status server."""

    name: ClassVar[str] = "stub_status"

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, *, timeout: float = 2.0):
        self.host = host
        self.port = port
        self.timeout = timeout

    @classmethod
    def from_settings(cls, settings: Settings) -> StubStatusCheck:
        render = render_settings_of(settings)
        return cls(
            render.status_address, render.status_port, timeout=_section(settings).probe_timeout
        )

    async def run(self) -> Sequence[HealthResult]:
        if self.port is None:
            return [
                HealthResult(check=self.name, status="warn", message="no status server configured")
            ]
        try:
            response = await http_get(self.host, self.port, STUB_STATUS_PATH, timeout=self.timeout)
            numbers = parse_stub_status(response.text)
        except (OSError, TimeoutError, ValueError) as exc:
            return [
                HealthResult(
                    check=self.name,
                    status="fail",
                    message=f"status server {self.host}:{self.port} unusable: {exc}",
                )
            ]
        dropped = numbers["accepts"] - numbers["handled"]
        return [
            HealthResult(
                check=self.name,
                status="warn" if dropped > 0 else "ok",
                message=(
                    f"{dropped:.0f} connection(s) dropped (worker_connections or fd limit)"
                    if dropped > 0
                    else f"{numbers['active']:.0f} active connection(s)"
                ),
                metrics=numbers,
            )
        ]


# ---------------------------------------------------------------------------------------
# HTTP probes
# ---------------------------------------------------------------------------------------


class HttpProbeCheck:
    """GET each configured endpoint; any 2xx/3xx is healthy."""

    name: ClassVar[str] = "http_probe"

    def __init__(
        self,
        probes: Sequence[str] = (),
        *,
        timeout: float = 2.0,
        ca_file: str | None = None,
        verify_tls: bool = True,
    ) -> None:
        self.probes = tuple(probes)
        self.timeout = timeout
        self.tls: ssl.SSLContext | None = None
        if any(urlsplit(_probe_parts(p)[0]).scheme == "https" for p in self.probes):
            self.tls = ssl.create_default_context(cafile=ca_file)
            if not verify_tls:
                self.tls.check_hostname = False
                self.tls.verify_mode = ssl.CERT_NONE

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpProbeCheck:
        section = _section(settings)
        return cls(
            section.probes,
            timeout=section.probe_timeout,
            ca_file=section.probe_ca_file,
            verify_tls=section.probe_verify_tls,
        )

    async def run(self) -> Sequence[HealthResult]:
        if not self.probes:
            return [HealthResult(check=self.name, status="ok", message="no probes configured")]
        return [await self._probe(i, probe) for i, probe in enumerate(self.probes)]

    async def _probe(self, index: int, probe: str) -> HealthResult:
        url, host, proxied = _probe_parts(probe)
        parts = urlsplit(url)
        check = f"{self.name}.{index}"
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        started = time.perf_counter()
        https = parts.scheme == "https"
        try:
            response = await http_get(
                parts.hostname or "127.0.0.1",
                parts.port or (443 if https else 80),
                path,
                timeout=self.timeout,
                host_header=host,
                tls=self.tls if https else None,
                proxy_protocol=proxied,
            )
        except (OSError, TimeoutError, anyio.BrokenResourceError) as exc:
            return HealthResult(check=check, status="fail", message=f"{url}: {_reason(exc)}")
        latency = (time.perf_counter() - started) * 1000
        return HealthResult(
            check=check,
            status="ok" if response.status < 400 else "fail",
            message=f"{url}: HTTP {response.status}",
            metrics={"status_code": float(response.status), "latency_ms": round(latency, 3)},
        )


def _reason(exc: BaseException) -> str:
    """What failed, in words: a timeout says so; anyio's broken stream names its cause
    (the TLS error: "certificate verify failed: certificate has expired")."""
    if isinstance(exc, TimeoutError):
        return "no answer within the probe timeout"
    while not str(exc) and exc.__cause__ is not None:
        exc = exc.__cause__
    return str(exc) or type(exc).__name__


# ---------------------------------------------------------------------------------------
# System
# ---------------------------------------------------------------------------------------


class SystemCheck:
    """CPU, memory, disk, load and nginx worker memory of this host."""

    name: ClassVar[str] = "system"

    def __init__(
        self,
        *,
        disk_path: Path = Path("/"),
        pid_file: Path | None = None,
        settings: HealthSettings | None = None,
    ) -> None:
        self.disk_path = disk_path
        self.pid_file = pid_file
        self.settings = settings or HealthSettings()

    @classmethod
    def from_settings(cls, settings: Settings) -> SystemCheck:
        layout = NginxLayout.from_settings(settings)
        return cls(
            disk_path=layout.conf_dir if layout.conf_dir.exists() else Path("/"),
            pid_file=layout.pid_file,
            settings=_section(settings),
        )

    async def run(self) -> Sequence[HealthResult]:
        master = await read_pid_file(self.pid_file) if self.pid_file is not None else None
        metrics = await anyio.to_thread.run_sync(self._measure, master)
        problems = []
        if metrics["memory_percent"] >= self.settings.memory_warn_percent:
            problems.append(f"memory {metrics['memory_percent']:.0f}% used")
        if metrics["disk_percent"] >= self.settings.disk_warn_percent:
            problems.append(f"disk {metrics['disk_percent']:.0f}% used ({self.disk_path})")
        if metrics["load1"] / metrics["cpus"] >= self.settings.load_warn_per_cpu:
            problems.append(f"load {metrics['load1']:.1f} on {metrics['cpus']:.0f} CPU(s)")
        return [
            HealthResult(
                check=self.name,
                status="warn" if problems else "ok",
                message="; ".join(problems) or "within limits",
                metrics=metrics,
            )
        ]

    def _measure(self, master: int | None) -> dict[str, float]:
        memory = psutil.virtual_memory()
        disk = psutil.disk_usage(str(self.disk_path))
        load1, load5, load15 = os.getloadavg()
        rss = 0
        workers = worker_pids(master) if master is not None else {}
        for pid in workers:
            try:
                rss += psutil.Process(pid).memory_info().rss
            except psutil.Error:
                continue
        return {
            "cpu_percent": psutil.cpu_percent(interval=None),
            "cpus": float(psutil.cpu_count() or 1),
            "memory_percent": memory.percent,
            "memory_available_bytes": float(memory.available),
            "disk_percent": disk.percent,
            "disk_free_bytes": float(disk.free),
            "load1": load1,
            "load5": load5,
            "load15": load15,
            "nginx_workers": float(len(workers)),
            "nginx_worker_rss_bytes": float(rss),
        }


# ---------------------------------------------------------------------------------------
# Certificates
# ---------------------------------------------------------------------------------------

_CERT_SUFFIXES = (".crt", ".pem")


class CertExpiryCheck:
    """Days until each certificate in the live tree expires."""

    name: ClassVar[str] = "cert_expiry"

    def __init__(self, tree: Path, *, settings: HealthSettings | None = None) -> None:
        self.tree = tree
        self.settings = settings or HealthSettings()

    @classmethod
    def from_settings(cls, settings: Settings) -> CertExpiryCheck:
        layout = NginxLayout.from_settings(settings)
        return cls(layout.conf_dir / "current", settings=_section(settings))

    async def run(self) -> Sequence[HealthResult]:
        return await anyio.to_thread.run_sync(self._scan)

    def _scan(self) -> list[HealthResult]:
        files = (
            sorted(p for p in self.tree.rglob("*") if p.suffix in _CERT_SUFFIXES and p.is_file())
            if self.tree.is_dir()
            else []
        )
        results = []
        now = dt.datetime.now(dt.UTC)
        if files:
            # Only a tree with certificates loads cryptography (~1 MB in every agent).
            from cryptography import x509
        for path in files:
            rel = path.relative_to(self.tree).as_posix()
            check = f"{self.name}.{_check_suffix(rel)}"
            try:
                data = path.read_bytes()
                if b"PRIVATE KEY" in data and b"CERTIFICATE" not in data:
                    continue
                cert = x509.load_pem_x509_certificates(data)[0]
            except (OSError, ValueError) as exc:
                results.append(HealthResult(check=check, status="fail", message=f"{rel}: {exc}"))
                continue
            days = (cert.not_valid_after_utc - now).total_seconds() / 86400
            status: HealthStatus = (
                "fail"
                if days < self.settings.cert_fail_days
                else "warn"
                if days < self.settings.cert_warn_days
                else "ok"
            )
            expires = cert.not_valid_after_utc.strftime("%Y-%m-%d")
            results.append(
                HealthResult(
                    check=check,
                    status=status,
                    message=f"{rel} expires {expires} ({days:.1f} days)",
                    metrics={"days_left": round(days, 3)},
                )
            )
        if not results:
            return [
                HealthResult(
                    check=self.name, status="ok", message="no certificates in the live tree"
                )
            ]
        return results


def _check_suffix(rel: str) -> str:
    return re.sub(r"[^A-Za-z0-9._:-]", "_", rel)[:100]


# ---------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------


@hookimpl
def nxmesh_add_settings(registry: SettingsRegistry) -> None:
    registry.add_section(SECTION, HealthSettings)


@hookimpl
def nxmesh_register_health_checks() -> Sequence[type[HealthCheck]]:
    return [StubStatusCheck, HttpProbeCheck, SystemCheck, CertExpiryCheck]
