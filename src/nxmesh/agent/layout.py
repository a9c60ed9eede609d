"""Where the agent's nginx keeps everything: one prefix, one place to look.

The agent runs nginx as ``nginx -p <conf_dir> -c <conf_dir>/current/nginx.conf``. The
rendered ``nginx.conf`` names its runtime files relative to that prefix (``logs/``,
``tmp/``) unless the renderer's ``prefix`` pins them elsewhere, so the deployment modes,
the driver and the health checks all derive the same paths from the same settings here
instead of each guessing.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import attrs

from nxmesh.agent.process import nginx_stream_module
from nxmesh.core.settings import Settings
from nxmesh.plugins.render_nginx import RenderSettings

__all__ = ["RENDER_SECTION", "NginxLayout", "ipv6_available", "render_settings_of"]

RENDER_SECTION = "render_nginx"
"""Settings section the renderer's host knobs are read from, when a plugin declares it."""


def ipv6_available() -> bool:
    """Whether this host's kernel lets a program listen on IPv6 (``[::]``): a kernel
    built without IPv6, or booted with ``ipv6.disable=1``, refuses ``AF_INET6`` sockets,
    and nginx would fail to start on ``[::]:80``. (With the ``disable_ipv6`` sysctl the
    socket still binds, and nginx starts.)"""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::", 0))  # a free port: nothing is taken or exposed
    except OSError:
        return False
    return True


def render_settings_of(settings: Settings) -> RenderSettings:
    """The renderer's host knobs as the agent uses them.

    A ``[plugins.render_nginx]`` section wins when a plugin declares one; otherwise the
    renderer's defaults, with the status server where the driver's settings put it
    (``[plugins.nginx_driver] status_address/status_port``): the driver confirms every
    reload through that server, so it owns its address. ``agent.listen_address`` binds
    the sites' address-less listeners; ``agent.upstream_ca_file`` names the trust store
    of TLS upstreams; ``agent.proxy_cache_size`` bounds the proxy cache;
    ``agent.listen_ipv6`` (``auto``: when the kernel has IPv6) adds ``[::]`` twins to
    the address-less listeners, unless ``listen_address`` binds them to one address.
    ``stream_module`` comes from ``agent.nginx_binary``'s ``nginx -V`` (a dynamic stream
    module to load), unless the section names one.
    """
    listen = settings.agent.listen_address or None
    ca_file = settings.agent.upstream_ca_file
    host: dict[str, Any] = {"listen_address": listen} if listen else {}
    if ca_file is not None:
        host["upstream_ca_file"] = str(ca_file)
    if settings.agent.proxy_cache_size:
        host["proxy_cache_size"] = settings.agent.proxy_cache_size
    # Always set, so the agent's setting wins over a [plugins.render_nginx] section's.
    ipv6 = settings.agent.listen_ipv6
    host["listen_ipv6"] = ipv6 == "on" or (ipv6 == "auto" and ipv6_available())
    section = settings.plugins.get(RENDER_SECTION)
    if not isinstance(section, RenderSettings) or section.stream_module is None:
        module = nginx_stream_module(settings.agent.nginx_binary)
        if module is not None:
            host["stream_module"] = module
    if isinstance(section, RenderSettings):
        return attrs.evolve(section, **host) if host else section
    driver = settings.plugins.get("nginx_driver")
    port = getattr(driver, "status_port", None)
    address = getattr(driver, "status_address", None)
    defaults = RenderSettings()
    return attrs.evolve(
        defaults,
        status_port=port if isinstance(port, int) else defaults.status_port,
        status_address=address if isinstance(address, str) else defaults.status_address,
        **host,
    )


def _absolute(path: Path) -> Path:
    return Path(path).absolute()


@attrs.frozen
class NginxLayout:
    """The paths of one nginx instance run by the agent."""

    # Absolute from here on: nginx resolves a relative ``-p`` against its own working
    # directory, and ``nginx -t`` runs from a scratch one (every apply failed).
    conf_dir: Path = attrs.field(converter=_absolute)
    """Root of the live configuration: ``current``, ``releases/``, the apply journal."""
    prefix: Path = attrs.field(converter=_absolute)
    """nginx's ``-p``: relative paths in nginx.conf resolve against it."""
    pid_file: Path
    error_log: Path
    temp_dir: Path | None = None
    """Parent of nginx's temp and cache directories (``tmp/``, or under a pinned
    ``RenderSettings.prefix``); None: ``<prefix>/tmp``."""

    @property
    def conf_file(self) -> Path:
        """What nginx is started with (``-c``): always read through the ``current`` link."""
        return self.conf_dir / "current" / "nginx.conf"

    @property
    def temp_root(self) -> Path:
        """Where nginx's temp and cache directories are: `temp_dir`, else ``<prefix>/tmp``."""
        return self.temp_dir if self.temp_dir is not None else self.prefix / "tmp"

    def runtime_dirs(self) -> list[Path]:
        """Directories nginx expects to exist before it starts (logs, temp files)."""
        return sorted({self.pid_file.parent, self.error_log.parent, self.temp_root})

    def ensure_runtime_dirs(self) -> None:
        for directory in self.runtime_dirs():
            directory.mkdir(parents=True, exist_ok=True)

    @classmethod
    def for_prefix(
        cls, conf_dir: Path, render: RenderSettings | None = None, *, prefix: Path | None = None
    ) -> NginxLayout:
        """The layout for a config root; `prefix` defaults to `conf_dir`."""
        base = prefix or conf_dir
        paths = (render or RenderSettings()).runtime_paths()

        def resolve(value: str) -> Path:
            path = Path(value)
            return path if path.is_absolute() else base / path

        return cls(
            conf_dir=conf_dir,
            prefix=base,
            pid_file=resolve(paths["pid"]),
            error_log=resolve(paths["error_log"]),
            temp_dir=resolve(paths["proxy_temp"]).parent,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> NginxLayout:
        return cls.for_prefix(settings.agent.conf_dir, render_settings_of(settings))
