"""Building transport servers (master) and clients (agent) from settings.

Transports are plugins (``nxmesh_register_transports``) constructed as
``cls(url, *, ssl_context=..., **options)``. This module is the one place that knows how
the reference apps fill that in, for every transport alike:

* **TLS.** A transport's schemes come in pairs (``grpc``/``grpcs``, ``ws``/``wss``); the
  one ending in ``s`` is TLS. The master serves TLS with a certificate from its own CA
  (`nxmesh.tls.ensure_tls_material` under ``<state_dir>/tls``; agents pin ``ca.pem``);
  agents pin ``agent.ca_file`` (or their transport section's ``ca_file``), else trust the
  system store (a ``wss://`` endpoint behind a public TLS proxy).
* **Options.** A transport whose constructor takes ``settings`` gets its plugin's section
  ``[plugins.transport_<name>]`` when one is declared (the gRPC plugin's keepalive,
  message size, ``tls``...). A section may also carry ``tls`` (false: serve and connect
  without TLS), ``ca_file``, ``cert_file`` + ``key_file`` (the master's own certificate
  instead of the generated one) and ``hostnames`` (SANs of the generated certificate).
* **Agent endpoints** (`agent_endpoints`): ``agent.endpoints`` when given, else one URL per
  name in ``agent.transports`` derived from ``agent.master_url`` — see ``docs/agent.md``.
"""

from __future__ import annotations

import inspect
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import SplitResult, urlsplit, urlunsplit

import attrs
import structlog

from nxmesh.core.errors import ConfigurationError, ProviderNotFoundError
from nxmesh.core.registry import ProviderRegistries
from nxmesh.core.settings import Settings

if TYPE_CHECKING:
    from nxmesh.tls import TLSFiles

__all__ = [
    "DEFAULT_HOSTNAMES",
    "AgentEndpoint",
    "agent_endpoints",
    "build_client",
    "build_server",
    "ca_file",
    "server_url",
    "tls_scheme",
    "transport_section",
    "uses_tls",
]

log = structlog.get_logger("nxmesh.transports")

DEFAULT_HOSTNAMES: Final = ("localhost", "127.0.0.1", "::1")
"""SANs of the master's generated server certificate (plus ``master.api_host``)."""


def transport_section(settings: Settings, name: str) -> Any:
    """The ``[plugins.transport_<name>]`` section, or None when no plugin declares one."""
    return settings.plugins.get(f"transport_{name}")


def tls_scheme(cls: type[Any]) -> str | None:
    """The TLS scheme among `cls.schemes` (``grpcs``, ``wss``), if any."""
    schemes: tuple[str, ...] = tuple(getattr(cls, "schemes", ()))
    return next((s for s in schemes if s.endswith("s") and s[:-1] in schemes), None)


def _plain_scheme(cls: type[Any]) -> str:
    secure = tls_scheme(cls)
    schemes: tuple[str, ...] = tuple(getattr(cls, "schemes", ()))
    return next((s for s in schemes if s != secure), schemes[0])


def uses_tls(cls: type[Any], settings: Settings) -> bool:
    """Whether the transport runs TLS: it has a TLS scheme and its section does not say
    ``tls = false``."""
    section = transport_section(settings, str(cls.name))
    return tls_scheme(cls) is not None and getattr(section, "tls", True) is not False


def _options(cls: type[Any], settings: Settings) -> dict[str, Any]:
    section = transport_section(settings, str(cls.name))
    if section is None:
        return {}
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins only
        return {}
    return {"settings": section} if "settings" in params else {}


def _hostnames(settings: Settings, section: Any) -> tuple[str, ...]:
    names = tuple(getattr(section, "hostnames", None) or DEFAULT_HOSTNAMES)
    host = settings.master.api_host
    if host not in ("", "0.0.0.0", "::") and host not in names:  # noqa: S104 - a comparison
        names = (*names, host)
    return names


def _own_ca_certificate(settings: Settings, section: Any) -> TLSFiles:
    """The certificate the master's own CA issues for its listeners (``<state_dir>/tls``),
    for the host names `section` (a transport's settings) asks for."""
    from nxmesh.tls import ensure_tls_material

    return ensure_tls_material(settings.state_dir / "tls", hostnames=_hostnames(settings, section))


def master_ssl_context(settings: Settings, cls: type[Any]) -> ssl.SSLContext:
    """The master's server TLS context for transport `cls` (its own CA unless the section
    names a certificate and key)."""
    from nxmesh.tls import server_ssl_context, serving_context

    section = transport_section(settings, str(cls.name))
    cert, key = getattr(section, "cert_file", None), getattr(section, "key_file", None)
    if cert is not None and key is not None:
        return serving_context(cert, key)
    return server_ssl_context(_own_ca_certificate(settings, section))


def api_tls_files(settings: Settings) -> tuple[Path, Path] | None:
    """Certificate and key (PEM paths) the master's API serves HTTPS with, or None when
    ``master.api_tls`` is off: ``master.api_cert_file`` + ``api_key_file``, else the
    certificate the gRPC listener serves from the master's own CA (one set of host names
    for both listeners, so neither re-issues the other's; ``[plugins.transport_grpc]
    hostnames``).

    :raises ConfigurationError: a named file is missing.
    """
    master = settings.master
    if not master.api_tls:
        return None
    if master.api_cert_file is not None and master.api_key_file is not None:
        for name, path in (
            ("api_cert_file", master.api_cert_file),
            ("api_key_file", master.api_key_file),
        ):
            if not path.is_file():
                raise ConfigurationError(f"master.{name}: {path}: no such file")
        return master.api_cert_file, master.api_key_file
    files = _own_ca_certificate(settings, transport_section(settings, "grpc"))
    return files.cert, files.key


def server_url(cls: type[Any], settings: Settings, port: int) -> str:
    """Where the master serves transport `cls`: ``<scheme>://<api_host>:<port>``."""
    scheme = tls_scheme(cls) if uses_tls(cls, settings) else None
    scheme = scheme or _plain_scheme(cls)
    host = settings.master.api_host
    where = f"[{host}]" if ":" in host else host
    return f"{scheme}://{where}:{port}"


def build_server(cls: type[Any], settings: Settings, url: str) -> Any:
    """Transport `cls` ready to `serve` on `url` (TLS as its scheme says)."""
    scheme = urlsplit(url).scheme
    ctx = master_ssl_context(settings, cls) if scheme == tls_scheme(cls) else None
    return cls(url, ssl_context=ctx, **_options(cls, settings))


def ca_file(settings: Settings, cls: type[Any] | None = None) -> Path | None:
    """The CA the agent pins: ``agent.ca_file``, else the transport section's ``ca_file``."""
    if settings.agent.ca_file is not None:
        return settings.agent.ca_file
    if cls is None:
        return None
    found = getattr(transport_section(settings, str(cls.name)), "ca_file", None)
    return Path(found) if found else None


def build_client(cls: type[Any], settings: Settings, url: str) -> Any:
    """Transport `cls` ready to `connect` to `url`, pinning the master's CA for TLS."""
    scheme = urlsplit(url).scheme
    ctx: ssl.SSLContext | None = None
    if scheme == tls_scheme(cls):
        pinned = ca_file(settings, cls)
        if pinned is not None:
            from nxmesh.tls import client_ssl_context

            ctx = client_ssl_context(pinned)
        else:
            log.info("no CA pinned: trusting the system store", url=url)
            ctx = ssl.create_default_context()
    return cls(ssl_context=ctx, **_options(cls, settings))


@attrs.frozen
class AgentEndpoint:
    """One way the agent reaches its master: transport name + class + URL."""

    name: str
    cls: type[Any]
    url: str


def _with(
    parts: SplitResult, scheme: str, *, port: int | None = None, path: str | None = None
) -> str:
    host = parts.hostname or "127.0.0.1"
    netloc = f"[{host}]" if ":" in host else host
    port = port if port is not None else parts.port
    if port is not None:
        netloc += f":{port}"
    return urlunsplit((scheme, netloc, parts.path if path is None else path, "", ""))


def _derive(name: str, cls: type[Any], settings: Settings) -> str | None:
    master_url = settings.agent.master_url
    parts = urlsplit(master_url)
    scheme = parts.scheme
    ws_path = settings.master.websocket_path
    if scheme in tuple(cls.schemes):
        if scheme in ("ws", "wss") and parts.path in ("", "/"):
            return _with(parts, scheme, path=ws_path)  # the master's mount, not its root
        return str(master_url)
    secure = tls_scheme(cls)
    plain = _plain_scheme(cls)
    if set(cls.schemes) >= {"ws", "wss"}:
        if scheme in ("http", "https"):
            path = parts.path.rstrip("/") + ws_path
            return _with(parts, "wss" if scheme == "https" else "ws", path=path)
        return _with(parts, "ws", port=settings.master.api_port, path=ws_path)
    if name == "grpc":
        target = secure if uses_tls(cls, settings) and secure else plain
        return _with(parts, target, port=settings.master.grpc_port, path="")
    return None


def agent_endpoints(registry: ProviderRegistries, settings: Settings) -> list[AgentEndpoint]:
    """The endpoints the agent tries, in order.

    ``agent.endpoints`` (URLs whose scheme picks the transport) when set; otherwise, for
    each name in ``agent.transports`` whose plugin is installed, a URL derived from
    ``agent.master_url``:

    * the master URL itself when its scheme belongs to that transport (a ``ws(s)://``
      URL without a path gets the master's mount, ``/agent``);
    * ``websocket`` from ``http(s)://host:port``: ``ws(s)://host:port/agent`` (the
      WebSocket transport is mounted on the master's API); from any other scheme:
      ``ws://host:<master.api_port>/agent``;
    * ``grpc``: ``grpcs://host:<master.grpc_port>`` (``grpc://`` with ``tls = false``).

    :raises ConfigurationError: no endpoint at all, or an explicit URL no transport serves.
    """
    transports = registry["transport"]
    found: list[AgentEndpoint] = []
    if settings.agent.endpoints:
        for url in settings.agent.endpoints:
            try:
                cls = transports.by_scheme(url)
            except ProviderNotFoundError as exc:
                raise ConfigurationError(f"agent.endpoints: {exc}") from None
            found.append(AgentEndpoint(str(cls.name), cls, url))
        return found
    for name in settings.agent.transports:
        try:
            cls = transports.get(name)
        except ProviderNotFoundError:
            log.warning("transport not installed, skipped", transport=name)
            continue
        derived = _derive(name, cls, settings)
        if derived is None:
            log.warning(
                "cannot derive an endpoint; list it in agent.endpoints",
                transport=name,
                master_url=settings.agent.master_url,
            )
            continue
        found.append(AgentEndpoint(name, cls, derived))
    if not found:
        raise ConfigurationError(
            f"no usable transport for agent.master_url {settings.agent.master_url!r} "
            f"(agent.transports: {', '.join(settings.agent.transports)}); install one or "
            "set agent.endpoints"
        )
    return found


def names(endpoints: Sequence[AgentEndpoint]) -> str:
    """``grpc grpcs://...; websocket ws://...`` for logs."""
    return "; ".join(f"{e.name} {e.url}" for e in endpoints)
