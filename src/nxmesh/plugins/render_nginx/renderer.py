"""`NginxRenderer`: a desired state in, a deterministic nginx file bundle out.

Templates are jinja2, run in a `SandboxedEnvironment` with `StrictUndefined`; instead of
HTML autoescaping, every ``{{ ... }}`` passes through `quoting.token`, so a value always
lands in the file as one safe nginx token (see `nxmesh.plugins.render_nginx.quoting`).

Templates are looked up in this order, first found wins:

1. the user's template directory (``renderer.template_dir`` setting, ``template_dir=``);
2. plugin template paths (``nxmesh_template_paths``), the *last* path first, so a plugin
   registered later overrides one registered earlier;
3. the built-in templates, which are also reachable as ``builtin/<name>`` so an override
   can include or extend the original.

Every template is compiled once, when the renderer is built; rendering then only runs
compiled code, which is what keeps 10,000 sites well under a second. A renderer with only
the built-in templates (nothing that could fail to compile) defers that, and importing
jinja2, to its first render: an agent restarting from its cache may never render (~2 MB
of idle memory).
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import re
import traceback
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal

import attrs

from nxmesh.core.bundle import Bundle, bundle_digest
from nxmesh.core.errors import NxMeshError
from nxmesh.core.model import (
    ERROR_PAGE_PREFIX,
    CertificateRef,
    DesiredState,
    FastCGI,
    FastCGIParam,
    Header,
    Listener,
    Location,
    ProxyCache,
    RateLimit,
    Redirect,
    Return,
    Site,
    StateParts,
    Stream,
    StreamTLS,
    TLSConfig,
    Upstream,
    UpstreamServer,
    UpstreamTLS,
    check_parts,
    redirect_binds,
    redirect_proxy_protocol,
    stream_http01_sites,
    stream_upstream_reason,
)
from nxmesh.core.registry import ProviderRegistries
from nxmesh.core.serialization import canonical_json, unstructure
from nxmesh.core.validation import Invalid, size_reason
from nxmesh.plugins.render_nginx import quoting
from nxmesh.plugins.render_nginx.quoting import Token

if TYPE_CHECKING:
    import jinja2
    import pluggy
    from jinja2.sandbox import SandboxedEnvironment

    from nxmesh.core.interfaces import Renderer
    from nxmesh.core.settings import RendererSettings, Settings

__all__ = [
    "ACME_CHALLENGE_DIR",
    "BUILTIN_TEMPLATES",
    "CERTS_DIR",
    "CLIENT_CA_DIR",
    "CLIENT_CLAIMS",
    "DEFAULT_PROXY_CACHE_SIZE",
    "DEFAULT_STATUS_PORT",
    "ERROR_PAGES_DIR",
    "PROXY_CACHE_FILE",
    "STATUS_FILE",
    "STREAMS_FILE",
    "SYSTEM_CA_FILE",
    "TEMPLATE_NAMES",
    "UPSTREAM_CA_DIR",
    "CertificatePaths",
    "ErrorPageView",
    "HeaderLine",
    "LocationView",
    "NginxRenderer",
    "RenderError",
    "RenderSettings",
    "SiteView",
    "TemplateRenderError",
    "certificate_paths",
    "client_ca_files",
    "client_certificate_sockets",
    "config_digest",
    "error_page_files",
    "fastcgi_params",
    "hash_bucket_size",
    "named_certificate_paths",
    "plugin_template_paths",
    "public_ports",
    "renderer_for",
    "site_view",
    "stream_client_ca_files",
    "upstream_ca_files",
]

BUILTIN_TEMPLATES = Path(__file__).parent / "templates"
"""Directory of the built-in templates."""

TEMPLATE_NAMES = (
    "nginx.conf.j2",
    "http_extra.conf.j2",
    "mime.types.j2",
    "upstreams.conf.j2",
    "site.conf.j2",
    "location.conf.j2",
    "server_extra.conf.j2",
    "acme_challenge.conf.j2",
    "error_pages.conf.j2",
    "hidden_files.conf.j2",
    "proxy_cache.conf.j2",
    "real_ip.conf.j2",
    "status.conf.j2",
    "unknown_hosts.conf.j2",
    "streams.conf.j2",
    "upstream_servers.conf.j2",
    "tls_defaults.conf.j2",
    "client_key_map.conf.j2",
)
"""Every template the renderer uses; each can be overridden by name."""

UNKNOWN_HOSTS_FILE = "conf.d/unknown-hosts.conf"
"""The bundle file holding the default servers of sockets no site is the default of."""

STATUS_FILE = "conf.d/status.conf"
"""The bundle file holding the status server; left out of the config digest."""

STREAMS_FILE: Final = "streams.conf"
"""The bundle file holding the ``stream {}`` block's contents (the state's streams and
their upstreams); only in bundles with a stream. Not under ``conf.d/``, which the
``http {}`` block includes."""

CERTS_DIR = "certs"
"""Bundle directory for certificate files; `extra_files` may write here."""

ACME_CHALLENGE_DIR = "acme-challenge"
"""Bundle directory for pending ACME HTTP-01 tokens, the other place `extra_files` may write.

Kept apart from ``certs/`` so the challenge location can never serve a key file."""

ERROR_PAGES_DIR = "error-pages"
"""Bundle directory of the sites' error pages: ``error-pages/<site>/<n>.html`` for the
site's ``error_pages[n]``, served under `ERROR_PAGE_PREFIX` by an ``internal`` location."""

EXTRA_FILE_DIRS = (CERTS_DIR, ACME_CHALLENGE_DIR)
_ENCRYPTED_KEY = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"

DEFAULT_STATUS_PORT = 9480
DEFAULT_PROXY_CACHE_SIZE: Final = "1g"
PROXY_CACHE_FILE: Final = "conf.d/proxy-cache.conf"
"""The bundle file declaring the proxy cache (``proxy_cache_path``); only in bundles
with a caching location."""
HSTS_VALUE = "max-age=63072000"
WEBSOCKET_READ_TIMEOUT = 3600
"""Seconds a WebSocket location waits for upstream data when none is configured."""

VERIFY_DEPTH: Final = 4
"""``proxy_ssl_verify_depth`` of TLS upstreams and ``ssl_verify_depth`` of client
certificates: nginx's default (1) accepts one intermediate CA, and public CAs' chains can
have two."""

SYSTEM_CA_FILE: Final = "/etc/ssl/certs/ca-certificates.crt"
"""The trust store of Debian, Ubuntu and Alpine (``ca-certificates``); RHEL's is
``/etc/pki/tls/certs/ca-bundle.crt``. TLS upstreams without their own CA are verified
against `RenderSettings.upstream_ca_file`, which defaults to it."""

_NO_FILES: Mapping[str, bytes] = MappingProxyType({})
_FILE_STEM = re.compile(r"[A-Za-z0-9_-]+", re.ASCII)
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}", re.ASCII)
_LOG_LEVELS = ("debug", "info", "notice", "warn", "error", "crit", "alert", "emerg")


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


class RenderError(NxMeshError):
    """A state or its extra files cannot be rendered into a bundle."""


class TemplateRenderError(RenderError):
    """A template failed to compile or render; names the template file and line."""

    def __init__(self, message: str, *, template: str | None, lineno: int | None) -> None:
        self.template = template
        self.lineno = lineno
        self.reason = message
        where = template or "<unknown template>"
        if lineno is not None:
            where = f"{where}, line {lineno}"
        super().__init__(f"template {where}: {message}")

    @classmethod
    def from_exception(cls, exc: BaseException, fallback: str | None) -> TemplateRenderError:
        """Locate `exc` in the template source that raised it (jinja maps frames to lines)."""
        import jinja2

        if isinstance(exc, jinja2.TemplateSyntaxError):
            where = exc.filename or exc.name
            return cls(exc.message or str(exc), template=where, lineno=exc.lineno)
        template, lineno = fallback, None
        # jinja rewrites tracebacks so template frames carry the template's file and line;
        # the innermost one is where the failing expression is.
        for frame in reversed(traceback.extract_tb(exc.__traceback__)):
            if frame.filename.endswith(".j2"):
                template, lineno = frame.filename, frame.lineno
                break
        if isinstance(exc, jinja2.TemplateNotFound):
            message = f"template {exc.name!r} not found"
        else:
            message = f"{type(exc).__name__}: {exc}"
        return cls(message, template=template, lineno=lineno)


# ---------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------


def _optional_str(value: object) -> str | None:
    return None if value is None else str(value)


def _prefix(_inst: object, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is None:
        return
    if not value.startswith("/") or not value.isprintable() or "$" in value:
        raise ValueError(f"{attribute.name} must be an absolute path, got {value!r}")


def _ip(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{attribute.name} must be an IP address, got {value!r}") from None


def _optional_port(_inst: object, attribute: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and not 1 <= value <= 65535:
        raise ValueError(f"{attribute.name} must be a port from 1 to 65535, got {value!r}")


def _workers(_inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    positive = isinstance(value, int) and not isinstance(value, bool) and value > 0
    if value != "auto" and not positive:
        raise ValueError(f"{attribute.name} must be 'auto' or a positive integer, got {value!r}")


def _size(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if (reason := size_reason(value)) is not None:
        raise ValueError(f"{attribute.name} {reason}")


def _user(_inst: object, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None and _USER.fullmatch(value) is None:
        raise ValueError(f"{attribute.name} must be a system user name, got {value!r}")


@attrs.frozen(kw_only=True)
class RenderSettings:
    """Knobs of the rendered nginx.conf that belong to the host, not to the desired state.

    `prefix`: where nginx keeps its runtime files (pid, logs, temp files). ``None`` (the
    default) writes them as paths relative to nginx's ``-p`` prefix — ``logs/``,
    ``tmp/`` — so one bundle runs unchanged under any prefix; an absolute path pins them.
    `status_port`: port of the agent's local status server (``None``: no status server).
    `ssl_password_file`: absolute path of the file with the passphrase of encrypted
    private keys (the agent's, outside the bundle); written as ``ssl_password_file`` for
    every site whose key file in the bundle is encrypted PKCS#8.
    `listen_address`: the address listeners that name none bind to on this host (``None``:
    every address); lets several agents share one host, or pins sites to one interface.
    `upstream_ca_file`: the host's trust store, which TLS upstreams without their own
    `ca` are verified against (``proxy_ssl_trusted_certificate``).
    `proxy_cache_size`: the most disk the answers of caching locations (`ProxyCache`) may
    take on this host, all sites together; the least recently used go first.
    `listen_ipv6`: listeners that name no address also listen on ``[::]`` (nginx's
    ``listen 80`` is IPv4 only); ignored with `listen_address`.
    `stream_module`: the ``load_module`` path of nginx's stream module where it is a
    dynamic module (``--with-stream=dynamic``: Debian's ``libnginx-mod-stream``), loaded
    by bundles with streams; None where it is built in (nginx.org's packages and image).
    The agent reads it from ``nginx -V``.
    """

    prefix: str | None = attrs.field(default=None, converter=_optional_str, validator=_prefix)
    status_address: str = attrs.field(default="127.0.0.1", validator=_ip)
    status_port: int | None = attrs.field(default=DEFAULT_STATUS_PORT, validator=_optional_port)
    worker_processes: int | Literal["auto"] = attrs.field(default="auto", validator=_workers)
    worker_connections: int = attrs.field(
        default=4096, validator=[attrs.validators.instance_of(int), attrs.validators.ge(16)]
    )
    worker_shutdown_timeout: int = attrs.field(
        default=30, validator=[attrs.validators.instance_of(int), attrs.validators.ge(1)]
    )
    error_log_level: str = attrs.field(default="warn", validator=attrs.validators.in_(_LOG_LEVELS))
    user: str | None = attrs.field(default=None, validator=_user)
    ssl_password_file: str | None = attrs.field(
        default=None, converter=_optional_str, validator=_prefix
    )
    listen_address: str | None = attrs.field(
        default=None, converter=_optional_str, validator=attrs.validators.optional(_ip)
    )
    upstream_ca_file: str = attrs.field(default=SYSTEM_CA_FILE, converter=str, validator=_prefix)
    proxy_cache_size: str = attrs.field(default=DEFAULT_PROXY_CACHE_SIZE, validator=_size)
    listen_ipv6: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    stream_module: str | None = attrs.field(
        default=None, converter=_optional_str, validator=_prefix
    )

    @property
    def proxy_cache_zone(self) -> str:
        """The proxy cache's zone: one per workers' user, like its directory (nginx
        refuses a reload that gives a zone another directory)."""
        return "nxmesh_cache" if self.user is None else f"nxmesh_cache_{self.user}"

    def runtime_paths(self) -> dict[str, str]:
        """Runtime file paths as written into nginx.conf (relative to ``-p`` or absolute)."""
        base = "" if self.prefix is None else self.prefix.rstrip("/") + "/"
        rel = {
            "pid": "logs/nginx.pid",
            "error_log": "logs/error.log",
            "access_log": "logs/access.log",
            "stream_access_log": "logs/stream.log",
            "client_body_temp": "tmp/client_body",
            "proxy_temp": "tmp/proxy",
            # nginx makes the cache's directories 0700 for the workers' user: another
            # user (a changed `user`) could not read nor prune them, so one per user.
            "proxy_cache": "tmp/cache" if self.user is None else f"tmp/cache-{self.user}",
            "fastcgi_temp": "tmp/fastcgi",
            "uwsgi_temp": "tmp/uwsgi",
            "scgi_temp": "tmp/scgi",
        }
        return {key: base + path for key, path in rel.items()}


# ---------------------------------------------------------------------------------------
# Helpers the templates call (globals of the environment)
# ---------------------------------------------------------------------------------------


@attrs.frozen
class CertificatePaths:
    """Bundle-relative certificate and key file of a TLS site."""

    certificate: str
    key: str


def certificate_paths(site: Site) -> CertificatePaths:
    """Where a TLS site's certificate and key live in the bundle.

    An uploaded certificate is ``certs/<certificate name>.crt``/``.key`` (shared by every
    site naming it); an ACME site has its own ``certs/acme/<site name>.crt``/``.key``,
    a separate directory so no certificate name can collide with it.
    """
    if site.tls is None:
        raise RenderError(f"site {site.name!r} has no TLS configuration")
    if site.tls.certificate is not None:
        return named_certificate_paths(site.tls.certificate)
    stem = f"{CERTS_DIR}/acme/{_stem(site.name)}"
    return CertificatePaths(certificate=f"{stem}.crt", key=f"{stem}.key")


@attrs.frozen(kw_only=True)
class StreamView:
    """What ``streams.conf.j2`` writes for one stream: its `listen` arguments, the bundle
    paths of its certificate (`Stream.tls`), and how nginx speaks to a TLS upstream
    (`upstream_tls`, verified against `upstream_ca` or the host's trust store)."""

    stream: Stream
    listens: list[Token]
    certificate: CertificatePaths | None
    upstream_tls: UpstreamTLS | None
    upstream_ca: str | None
    client_ca_file: str | None = None
    client_crl_file: str | None = None
    sni_variable: str | None = None
    """The ``map`` variable (``nxmesh_sni_<n>``, by the stream's position) naming the
    upstream for a connection's SNI name (`Stream.sni_routes`); None: no routes."""

    @property
    def proxy_pass(self) -> Token:
        """Where ``proxy_pass`` sends connections: the upstream, or the routes' variable."""
        if self.sni_variable is None:
            return quoting.plain(self.stream.upstream)
        return Token(f"${self.sni_variable}")

    @property
    def sni_map(self) -> list[tuple[Token, Token]]:
        """The routes' ``map`` lines: each server name with its route's upstream."""
        return [
            (_map_key(name), quoting.plain(route.upstream))
            for route in self.stream.sni_routes
            for name in route.server_names
        ]


# Words a ``map`` block reads as its own: a server name "include" would include a file,
# "default" would set the fallback ("hostnames" and "volatile" only alone, escaped all
# the same). A leading backslash makes nginx read the word as a key.
_MAP_KEYWORDS = frozenset({"default", "hostnames", "include", "volatile"})


def _map_key(name: str) -> Token:
    return Token(f"\\{name}") if name in _MAP_KEYWORDS else quoting.plain(name)


def named_certificate_paths(name: str) -> CertificatePaths:
    """Where the certificate the state declares as `name` lives in the bundle (a site's
    ``tls: {certificate: name}``, a stream's `StreamTLS`)."""
    stem = f"{CERTS_DIR}/{_stem(name)}"
    return CertificatePaths(certificate=f"{stem}.crt", key=f"{stem}.key")


def _stem(name: str) -> str:
    # File names are built from model names; refuse anything that could leave the tree.
    if _FILE_STEM.fullmatch(name) is None:
        raise RenderError(f"{name!r} cannot be used as a file name in the bundle")
    return name


def _listen_args(address: str | None, port: int, *options: str) -> Token:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise quoting.UnsafeValueError(f"listen port must be 1-65535, got {port!r}")
    if address is None:
        where = str(port)
    elif address == "*":
        where = f"*:{port}"
    else:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            raise quoting.UnsafeValueError(f"listen address {address!r} is not an IP") from None
        where = f"[{ip.compressed}]:{port}" if ip.version == 6 else f"{ip.compressed}:{port}"
    return Token(" ".join((where, *options)))


def listen(listener: Listener) -> Token:
    """The arguments of a ``listen`` directive: ``[::1]:443 ssl http2 default_server``."""
    options = [
        name
        for name, on in (
            ("ssl", listener.tls),
            ("http2", listener.http2),
            ("proxy_protocol", listener.proxy_protocol),
            ("default_server", listener.default_server),
        )
        if on
    ]
    return _listen_args(listener.address, listener.port, *options)


def main_listens(site: Site) -> list[Token]:
    """``listen`` arguments of the server serving a site's locations.

    With a TLS redirect the plain listeners belong to the redirect server instead.
    """
    redirect = site.tls is not None and site.tls.redirect_http
    return [listen(lst) for lst in site.listeners if lst.tls or not redirect]


def redirect_listens(site: Site) -> list[Token]:
    """``listen`` arguments of a site's HTTP→HTTPS redirect server.

    Its plain listeners, or — when it declares none — port 80 on each address its TLS
    listeners use: ``redirect_http`` asks for a redirect, and port 80 is where browsers
    come first.
    """
    plain = [listen(lst) for lst in site.listeners if not lst.tls]
    if plain:
        return plain
    # One per socket, not per spelling: `443` and `0.0.0.0:8443` both mean port 80 on
    # the IPv4 wildcard, and two such `listen` lines are nginx's "duplicate listen".
    options = ("proxy_protocol",) if redirect_proxy_protocol(site) else ()
    return [
        _listen_args(None if a == "*" else a, port, *options) for a, port in redirect_binds(site)
    ]


def _catch_all_sites_default(state: DesiredState) -> DesiredState:
    """`state` with the listeners of a site named ``_`` (the nginx idiom for "any name",
    which the model documents) made the ``default_server`` of their sockets where no
    other site is: otherwise `unknown-hosts.conf` would take the names it is meant for."""
    if not any("_" in site.server_names for site in state.sites):
        return state
    defaults = {lst.bind for site in state.sites for lst in site.listeners if lst.default_server}
    sites = tuple(
        attrs.evolve(
            site,
            listeners=tuple(
                lst if lst.bind in defaults else attrs.evolve(lst, default_server=True)
                for lst in site.listeners
            ),
        )
        if "_" in site.server_names
        else site
        for site in state.sites
    )
    return attrs.evolve(state, sites=sites)


@attrs.frozen
class UnknownHostServer:
    """The default server of one socket no site is the default of (see
    `unknown_host_listens`): its ``listen`` arguments and, on a TLS socket, the
    protocols the sites there agreed on (nginx negotiates them with the default server,
    so this server's are every site's on the socket)."""

    listen: Token
    tls_protocols: tuple[str, ...] | None
    session_cache_off: bool = False
    """A site of the socket checks client certificates: sessions live in the default
    server's settings, so this server must keep none (see `SiteView.session_cache_off`)."""


def unknown_host_listens(
    state: DesiredState, *, checked_sockets: frozenset[tuple[str, int]] | None = None
) -> list[UnknownHostServer]:
    """The servers that answer unknown names, one per socket the sites listen on (their
    redirect servers' included) where no site is the ``default_server``; by socket.

    `state` as rendered: a ``_`` site's own listeners are already default servers
    (`_catch_all_sites_default`); its redirect server's sockets are counted here.
    `checked_sockets`: `client_certificate_sockets` of `state`, when the caller has it."""
    # bind -> [protocols, http2, default, proxy_protocol]
    sockets: dict[tuple[str, int], list[Any]] = {}
    for site in state.sites:
        for lst in site.listeners:
            flags = sockets.setdefault(lst.bind, [None, False, False, False])
            if lst.tls and site.tls is not None:
                flags[0] = site.tls.protocols  # the model makes the sites agree
            flags[1] |= lst.http2
            flags[2] |= lst.default_server
            flags[3] |= lst.proxy_protocol  # so does it here
        for bind in redirect_binds(site):
            flags = sockets.setdefault(bind, [None, False, False, False])
            flags[2] |= "_" in site.server_names
            flags[3] |= redirect_proxy_protocol(site)
    found = []
    checked = client_certificate_sockets(state) if checked_sockets is None else checked_sockets
    for (address, port), (protocols, http2, has_default, proxied) in sorted(sockets.items()):
        if has_default:
            continue
        ssl = ["ssl"] if protocols is not None else []
        options = [
            *ssl,
            *(["http2"] if http2 else []),
            *(["proxy_protocol"] if proxied else []),
            "default_server",
        ]
        listen = _listen_args(None if address == "*" else address, port, *options)
        found.append(UnknownHostServer(listen, protocols, (address, port) in checked))
    return found


def https_redirect(site: Site) -> Token:
    """The target of a site's HTTPS redirect, with the port when it is not 443: the port
    clients reach (`Listener.public_port`), which is not nginx's behind a port mapping."""
    ports = [lst.reached_port for lst in site.listeners if lst.tls]
    port = ports[0] if ports else 443
    if port == 443 or 443 in ports:
        return Token("https://$host$request_uri")
    return Token(f"https://$host:{int(port)}$request_uri")


def location_args(location: Location) -> Token:
    """The arguments of a ``location`` directive: match modifier and path."""
    path = location.path
    if location.match == "prefix":
        # nginx reads a leading '=', '~', '^~' or '@' of a bare path as a modifier.
        if not path.startswith("/"):
            raise quoting.UnsafeValueError(f"a prefix location must start with '/', got {path!r}")
        return quoting.plain(path)
    if location.match == "prefix_priority":  # regexes are not tried when this one matches
        return Token(f"^~ {quoting.plain(path)}")
    if location.match == "exact":
        return Token(f"= {quoting.plain(path)}")
    if location.match == "regex":
        return Token(f"~ {quoting.regex(path)}")
    if location.match == "regex_ci":
        return Token(f"~* {quoting.regex(path)}")
    raise quoting.UnsafeValueError(f"unknown location match {location.match!r}")


@attrs.frozen
class HeaderLine:
    """A header the renderer adds (HSTS, proxy defaults); shaped like `Header`."""

    name: str
    value: str
    always: bool = False


def _merge(base: Iterable[Any], override: Iterable[Any]) -> list[Any]:
    """`base` without the names `override` sets, then `override` (names case-insensitive)."""
    override = list(override)
    names = {h.name.lower() for h in override}
    return [h for h in base if h.name.lower() not in names] + override


def server_headers(site: Site) -> list[Header | HeaderLine]:
    """Response headers of a site's main server block (its headers, plus HSTS when asked)."""
    headers: list[Header | HeaderLine] = []
    if site.tls is not None and site.tls.hsts:
        headers.append(HeaderLine("Strict-Transport-Security", HSTS_VALUE, always=True))
    return _merge(headers, site.headers)


def location_headers(site: Site, location: Location) -> list[Header | HeaderLine]:
    """Response headers a location must repeat.

    nginx drops every inherited ``add_header`` in a block that has its own, so a location
    with headers repeats the server's (minus those it overrides by name).
    """
    return _location_headers(server_headers(site), location)


def _location_headers(
    server: list[Header | HeaderLine], location: Location
) -> list[Header | HeaderLine]:
    return _merge(server, location.headers) if location.headers else []


_NOTHING = Token('""')  # proxy_set_header with an empty value: the header is not sent
# Every forwarding header is nginx's, none the client's: an application trusting a
# client's X-Forwarded-Host builds links (a password reset's) to the client's host.
_PROXY_DEFAULTS = (
    HeaderLine("Host", Token("$host")),
    HeaderLine("X-Real-IP", Token("$remote_addr")),
    HeaderLine("X-Forwarded-For", Token("$proxy_add_x_forwarded_for")),
    HeaderLine("X-Forwarded-Proto", Token("$scheme")),
    HeaderLine("X-Forwarded-Host", Token("$host")),
    HeaderLine("X-Forwarded-Port", Token("$nxmesh_public_port")),
    HeaderLine("Forwarded", _NOTHING),
    HeaderLine("X-Request-ID", Token("$request_id")),
)
# Headers applications and frameworks trust for the scheme, the client's address, the
# host or URL asked for, or the user an authenticating proxy let in, which nginx does not
# set: a client's own would reach the upstream as if nginx had. Cleared (a location's own
# `proxy_headers` may set them). FastCGI locations clear the same (`_FASTCGI_FORWARDING`).
CLIENT_CLAIMS: Final = (
    "X-Forwarded-Ssl",
    "X-Forwarded-Scheme",
    "X-Forwarded-Server",
    "Front-End-Https",
    "X-Url-Scheme",
    "Client-IP",
    "True-Client-IP",
    "X-Client-IP",
    "X-Cluster-Client-IP",
    "X-Original-Host",
    "X-Host",
    "X-Original-URL",
    "X-Rewrite-URL",
    "X-Forwarded-Uri",
    "Remote-User",
    "X-Remote-User",
    "X-Forwarded-User",
    "X-Forwarded-Email",
    "X-Auth-Request-User",
    "X-Auth-Request-Email",
)
_CLAIMS_CLEARED = tuple(HeaderLine(name, _NOTHING) for name in CLIENT_CLAIMS)
_KEEPALIVE = (HeaderLine("Connection", _NOTHING),)
# SUCCESS, NONE (optional, none sent) or FAILED:<reason>; the subject's RFC 2253 name.
_CLIENT_CERT = (
    HeaderLine("X-Client-Verify", Token("$ssl_client_verify")),
    HeaderLine("X-Client-DN", Token("$ssl_client_s_dn")),
)
# Sites that check no certificates send neither: a client's own would reach an upstream
# behind both kinds of site as if nginx had checked it.
_NO_CLIENT_CERT = tuple(HeaderLine(h.name, _NOTHING) for h in _CLIENT_CERT)
# What a cached answer must not depend on, as the cache key does not: a method other
# than the request's (one client's DELETE kept as everyone's GET); another URL is one of
# the `CLIENT_CLAIMS` every proxy location clears.
_CACHE_CLEARED = tuple(
    HeaderLine(name, _NOTHING)
    for name in ("X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override")
)
# After realip, $proxy_add_x_forwarded_for appends the client (now $remote_addr) again
# and loses the balancer: nginx.conf's map appends $realip_remote_addr instead.
_REAL_FORWARDED_FOR = HeaderLine("X-Forwarded-For", Token("$nxmesh_forwarded_for"))
_WEBSOCKET = (
    HeaderLine("Upgrade", Token("$http_upgrade")),
    HeaderLine("Connection", Token("$nxmesh_connection_upgrade")),
)


def proxy_headers(
    location: Location,
    *,
    real_ip: bool = False,
    tls_name: str | None = None,
    client_certs: bool = False,
) -> list[Header | HeaderLine]:
    """``proxy_set_header`` lines of a proxy location: defaults, then the location's own.

    Written in full in every location because nginx, like ``add_header``, drops inherited
    ``proxy_set_header`` lines in a block that sets any. `real_ip`: the site believes a
    load balancer's client address (``real_ip_from``), so X-Forwarded-For is the chain as
    received plus the balancer's own address (``$nxmesh_forwarded_for``), not the client
    a second time. `tls_name`: the upstream's TLS server name, which is then the Host too
    (a name-based HTTPS server picks its site by Host, and some answer 421 when it differs
    from the SNI); the client's is in X-Forwarded-Host as always. A client's claims of
    the scheme, its address or the URL (`CLIENT_CLAIMS`) are cleared; with
    `strip_prefix`, X-Forwarded-Prefix names the path nginx took off. A caching location
    also clears the method overrides that would make an answer depend on more than its
    key.
    `client_certs`: the site checks client certificates (`TLSConfig.client_ca`), and the
    upstream learns the outcome and the subject; other sites clear both headers, so the
    upstream never gets a client's own.
    """
    defaults = _PROXY_DEFAULTS + (_WEBSOCKET if location.websocket else _KEEPALIVE)
    defaults += _CLIENT_CERT if client_certs else _NO_CLIENT_CERT
    defaults += _CLAIMS_CLEARED
    # The path nginx took off (`strip_prefix`), for applications building their links.
    prefix = location.path.rstrip("/") if location.strip_prefix else ""
    defaults += (HeaderLine("X-Forwarded-Prefix", quoting.quote(prefix) if prefix else _NOTHING),)
    if location.cache is not None:
        defaults += _CACHE_CLEARED
    if real_ip:  # in place, so the lines keep their order
        defaults = tuple(
            _REAL_FORWARDED_FOR if h.name == "X-Forwarded-For" else h for h in defaults
        )
    if tls_name is not None:
        defaults = (HeaderLine("Host", quoting.quote(tls_name)), *defaults[1:])
    return _merge(defaults, location.proxy_headers)


def _lines(pairs: Iterable[tuple[str, str]]) -> tuple[HeaderLine, ...]:
    """Header or parameter lines whose values are already nginx syntax."""
    return tuple(HeaderLine(name, Token(value)) for name, value in pairs)


def _cgi_name(header: str) -> str:
    """A request header's CGI parameter name: ``X-Forwarded-Ssl`` → ``HTTP_X_FORWARDED_SSL``."""
    return "HTTP_" + header.upper().replace("-", "_")


# nginx's own fastcgi_params, with Debian's fix: HTTP_HOST is the host nginx chose, not a
# client's Host header (which an absolute-form request line makes differ), with the port
# the client wrote (nginx.conf's $nxmesh_host_port: frameworks build links from it).
# SCRIPT_FILENAME and PATH_INFO are the script and what follows it in the URI (`FastCGI`).
# REMOTE_USER is `fastcgi_params`'s: nginx fills $remote_user from any Authorization
# header, checked or not.
_FASTCGI_PARAMS = _lines(
    (
        ("QUERY_STRING", "$query_string"),
        ("REQUEST_METHOD", "$request_method"),
        ("CONTENT_TYPE", "$content_type"),
        ("CONTENT_LENGTH", "$content_length"),
        ("SCRIPT_NAME", "$fastcgi_script_name"),
        ("SCRIPT_FILENAME", "$document_root$fastcgi_script_name"),
        ("PATH_INFO", "$nxmesh_path_info"),
        ("REQUEST_URI", "$request_uri"),
        ("DOCUMENT_URI", "$document_uri"),
        ("DOCUMENT_ROOT", "$document_root"),
        ("SERVER_PROTOCOL", "$server_protocol"),
        ("REQUEST_SCHEME", "$scheme"),
        ("HTTPS", "$https if_not_empty"),
        ("GATEWAY_INTERFACE", "CGI/1.1"),
        ("SERVER_SOFTWARE", "nginx/$nginx_version"),
        ("REMOTE_ADDR", "$remote_addr"),
        ("REMOTE_PORT", "$remote_port"),
        ("SERVER_ADDR", "$server_addr"),
        ("SERVER_PORT", "$nxmesh_public_port"),
        ("SERVER_NAME", "$server_name"),
        ("REDIRECT_STATUS", "200"),
        ("HTTP_HOST", "$host$nxmesh_host_port"),
    )
)
# Request headers a client could forge. A parameter named HTTP_* replaces the client's
# header of that name: the forwarding headers say what nginx saw (the application is
# the next hop, so the client is $remote_addr); the others frameworks or proxies trust
# (the scheme, the client's address, the URL asked for, a client certificate's outcome)
# are cleared; a client's `Proxy:` header would become the HTTP_PROXY environment
# variable many HTTP libraries obey ("httpoxy").
_FASTCGI_FORWARDING = _lines(
    (
        ("HTTP_X_FORWARDED_FOR", "$remote_addr"),
        ("HTTP_X_REAL_IP", "$remote_addr"),
        ("HTTP_X_FORWARDED_PROTO", "$scheme"),
        ("HTTP_X_FORWARDED_HOST", "$host"),
        ("HTTP_X_FORWARDED_PORT", "$nxmesh_public_port"),
        ("HTTP_X_REQUEST_ID", "$request_id"),
        # What proxy locations clear too, the client certificate's headers and `Proxy`.
        *(
            (_cgi_name(header), '""')
            for header in (
                "Forwarded",
                "Proxy",
                "X-Forwarded-Prefix",
                *(h.name for h in _CLIENT_CERT),
                *CLIENT_CLAIMS,
            )
        ),
    )
)
# Sites checking client certificates tell the application the outcome and the subject, in
# the names Apache's mod_ssl gives them; clients cannot set non-HTTP_ parameters.
_FASTCGI_CLIENT_CERT = _lines(
    (("SSL_CLIENT_VERIFY", "$ssl_client_verify"), ("SSL_CLIENT_S_DN", "$ssl_client_s_dn"))
)


def fastcgi_params(
    fastcgi: FastCGI, *, client_certs: bool = False, checked_user: bool = False
) -> list[HeaderLine]:
    """``fastcgi_param`` lines of a FastCGI location: nginx's defaults, nginx's own
    forwarding headers, the client certificate's outcome when the site checks them
    (`client_certs`), then the location's own `FastCGI.params` (which the model keeps
    from replacing any of these). `checked_user`: every request reaching the location
    passed a password check (`basic_auth` with ``satisfy all``), so ``REMOTE_USER`` is a
    checked name; otherwise it is empty, as a client's Authorization header would set it."""
    user = Token("$remote_user") if checked_user else _NOTHING
    params = [*_FASTCGI_PARAMS, HeaderLine("REMOTE_USER", user), *_FASTCGI_FORWARDING]
    if client_certs:
        params += _FASTCGI_CLIENT_CERT
    params += [HeaderLine(p.name, p.value) for p in fastcgi.params]
    return params


@attrs.frozen
class ErrorPageView:
    """One ``error_page`` line: the status codes and the URI of their page."""

    codes: Token
    """The status codes, space-separated."""
    uri: Token
    """``/.nxmesh-errors/[<location>/]<n>.html``: page n, under `SiteView.error_pages_dir`."""


@attrs.frozen
class LocationView:
    """A location with everything its block needs computed (see `site_view`)."""

    location: Location
    args: Token
    """``location`` arguments: match modifier and quoted path."""
    headers: tuple[Header | HeaderLine, ...]
    """``add_header`` lines; empty when the location inherits the server's."""
    proxy_headers: tuple[Header | HeaderLine, ...]
    """``proxy_set_header`` lines (proxy locations only)."""
    read_timeout: int | None
    """Effective ``proxy_read_timeout`` (``fastcgi_read_timeout`` in FastCGI locations) in
    seconds, None for nginx's default."""
    auth_file: str | None = None
    """The bundle's htpasswd file of the location's own `basic_auth` (`htpasswd_files`)."""
    rate_zone: RateZone | None = None
    """The zone the location's ``limit_req`` counts in: its own `rate_limit`'s, else the
    site's (proxy and static locations only: the others answer before nginx counts
    requests). Per location, not per server: the server's would also count the requests
    nginx makes for the error pages and the ACME challenge location."""
    own_rate_zone: RateZone | None = None
    """The zone of the location's own `rate_limit`, which the site file declares."""
    upstream_tls: UpstreamTLS | None = None
    """How nginx speaks TLS to the location's upstream; None: plain HTTP (or no upstream)."""
    upstream_ca: str | None = None
    """The bundle's CA file of that upstream (`upstream_ca_files`); None with `upstream_tls`
    set: the host's trust store (`RenderSettings.upstream_ca_file`)."""
    error_pages: tuple[ErrorPageView, ...] = ()
    """The location's own ``error_page`` lines: set when the site has pages and the
    location has headers of its own. nginx adds the headers of the location that serves
    a page, so such a location's pages come from a page location of its own
    (`error_pages_prefix`) that repeats its headers (its CSP, CORS...)."""
    error_pages_prefix: Token | None = None
    """``/.nxmesh-errors/<index>/``: that page location's path."""
    cache_key: Token | None = None
    """``proxy_cache_key`` of a caching location (`_cache_key`)."""
    fastcgi_params: tuple[HeaderLine, ...] = ()
    """``fastcgi_param`` lines (FastCGI locations only, `fastcgi_params`)."""
    hide_scripts: bool = False
    """A static location of a site with FastCGI locations: ``.php`` paths answer 404
    rather than the scripts' source (a ``prefix_priority`` or exact location takes them
    before the FastCGI regex location could)."""

    @property
    def fallback_uri(self) -> Token | None:
        """A static location's ``try_files`` fallback with the request's query string
        (``/index.php$is_args$args``: try_files drops it otherwise), as one token; None
        without a `fallback`."""
        fallback = self.location.fallback
        if fallback is None:
            return None
        written = quoting.token(fallback)  # the fallback rule admits no '$', '"' or '\\'
        if written.startswith('"'):
            return Token(f'{written[:-1]}$is_args$args"')
        return Token(f"{written}$is_args$args")

    @property
    def proxy_url(self) -> Token:
        """``proxy_pass`` argument: scheme, upstream and, with `strip_prefix`, the URI ``/``."""
        location = self.location
        scheme = "http" if self.upstream_tls is None else "https"
        return Token(f"{scheme}://{location.upstream}{'/' if location.strip_prefix else ''}")


@attrs.frozen
class SiteView:
    """A site with its derived tokens computed once, in Python, for the templates.

    The built-in templates read this rather than calling the helper functions one by one:
    it is what renders 10,000 sites in well under a second. Overrides may use either.
    """

    site: Site
    main_listens: tuple[Token, ...]
    redirect_listens: tuple[Token, ...]
    """``listen`` arguments of the HTTP→HTTPS redirect server; empty: no redirect server."""
    https_redirect: Token | None
    certificate: CertificatePaths | None
    headers: tuple[Header | HeaderLine, ...]
    locations: tuple[LocationView, ...]
    auth_file: str | None = None
    """The bundle's htpasswd file of the site's `basic_auth` (`htpasswd_files`)."""
    rate_zone: RateZone | None = None
    """The ``limit_req`` zone of the site's `rate_limit`."""
    error_pages: tuple[ErrorPageView, ...] = ()
    error_pages_dir: str | None = None
    """The bundle directory of the site's error pages (`error_page_files`); None: none."""
    client_ca_file: str | None = None
    """The bundle's file of the CAs the site checks client certificates against
    (`TLSConfig.client_ca`, `client_ca_files`); None: it asks for none."""
    client_crl_file: str | None = None
    """The bundle's file of the revocation lists of those CAs (`TLSConfig.client_crl`)."""
    require_sni: bool = False
    """Refuse (421) requests whose TLS handshake did not name the requested host: the site
    checks client certificates and is not the default server of all its TLS sockets, so
    a handshake naming no server, or one no site serves, was the default server's, and
    checked against its CAs."""
    session_cache_off: bool = False
    """No TLS session cache: the site shares a TLS socket with a site checking client
    certificates. In nginx 1.22 a TLS 1.3 session made with one server of a socket
    resumes with another, and keeps the first one's certificate check
    (CVE-2025-23419). OpenSSL keeps sessions in the settings of the socket's default
    server, so that server must have none: a site, or the unknown-names server."""
    relative_redirects: bool = False
    """``absolute_redirect off``: a listener of the server is reached on another port
    (`Listener.public_port`), which nginx's absolute redirects would not name."""

    @property
    def error_page_locations(self) -> tuple[tuple[Token, tuple[Header | HeaderLine, ...]], ...]:
        """``(path, add_header lines)`` of each location serving the error pages: the
        site's (inheriting the server's headers), then one per location that has headers
        of its own (`LocationView.error_pages_prefix`), repeating them."""
        if self.error_pages_dir is None:
            return ()
        own = tuple(
            (lv.error_pages_prefix, lv.headers)
            for lv in self.locations
            if lv.error_pages_prefix is not None
        )
        return ((Token(ERROR_PAGE_PREFIX), ()), *own)

    @property
    def rate_zones(self) -> tuple[RateZone, ...]:
        """Every ``limit_req_zone`` the site file declares (http level, before its servers)."""
        zones = [self.rate_zone, *(lv.own_rate_zone for lv in self.locations)]
        return tuple(zone for zone in zones if zone is not None)


def site_view(
    site: Site,
    upstreams: Mapping[str, Upstream] | None = None,
    *,
    checked_sockets: frozenset[tuple[str, int]] = frozenset(),
) -> SiteView:
    """Compute what the site templates write, for `site` (proxying to `upstreams`, by
    name; an upstream missing there is spoken to over plain HTTP). `checked_sockets`:
    the TLS sockets (`Listener.bind`) where some site checks client certificates
    (`client_certificate_sockets`)."""
    upstreams = upstreams or {}
    tls = site.tls
    redirect = tls is not None and tls.redirect_http
    server = server_headers(site)
    site_zone = _rate_zone(site, site.rate_limit)
    client_ca_file = _client_ca_file(site) if tls is not None and tls.client_ca else None
    locations = []
    runs_scripts = any(loc.fastcgi is not None for loc in site.locations)
    for n, location in enumerate(site.locations):
        proxied = location.upstream is not None
        upstream = upstreams.get(location.upstream) if location.upstream is not None else None
        upstream_tls = upstream.tls if upstream is not None else None
        fastcgi = location.fastcgi
        # The Host a TLS upstream gets, when it is its server name rather than the client's.
        tls_host = (
            upstream_tls.server_name
            if upstream_tls is not None and upstream_tls.host == "server_name"
            else None
        )
        upstream_ca = (
            _upstream_ca_file(upstream)
            if upstream is not None and upstream_tls is not None and upstream_tls.ca
            else None
        )
        timeout = location.proxy_read_timeout if fastcgi is None else fastcgi.read_timeout
        if timeout is None and location.websocket:
            timeout = WEBSOCKET_READ_TIMEOUT
        own_zone = _rate_zone(site, location.rate_limit, n)
        headers = tuple(_location_headers(server, location))
        # Its own page location when it has headers of its own (see LocationView).
        pages_prefix = f"{ERROR_PAGE_PREFIX}{n}/" if site.error_pages and headers else None
        locations.append(
            LocationView(
                location=location,
                args=location_args(location),
                headers=headers,
                proxy_headers=(
                    tuple(
                        proxy_headers(
                            location,
                            # A proxy's header chain; not behind a TCP balancer (its PROXY
                            # line): there the client's own header is no one's word.
                            real_ip=bool(site.real_ip_from)
                            and site.real_ip_header != "proxy_protocol",
                            tls_name=tls_host,
                            client_certs=client_ca_file is not None,
                        )
                    )
                    if proxied
                    else ()
                ),
                read_timeout=timeout if proxied or fastcgi is not None else None,
                auth_file=_auth_file(site, n) if location.basic_auth is not None else None,
                rate_zone=own_zone or (site_zone if location.actions[0] in _COUNTED else None),
                own_rate_zone=own_zone,
                upstream_tls=upstream_tls,
                upstream_ca=upstream_ca,
                error_pages=_error_page_views(site, pages_prefix) if pages_prefix else (),
                error_pages_prefix=Token(pages_prefix) if pages_prefix else None,
                cache_key=(
                    _cache_key(site, location, upstream) if location.cache is not None else None
                ),
                fastcgi_params=(
                    tuple(
                        fastcgi_params(
                            fastcgi,
                            client_certs=client_ca_file is not None,
                            checked_user=_password_checked(site, location),
                        )
                    )
                    if fastcgi is not None
                    else ()
                ),
                hide_scripts=location.root is not None and runs_scripts,
            )
        )
    return SiteView(
        site=site,
        main_listens=tuple(main_listens(site)),
        redirect_listens=tuple(redirect_listens(site)) if redirect else (),
        https_redirect=https_redirect(site) if redirect else None,
        certificate=certificate_paths(site) if tls is not None else None,
        headers=tuple(server),
        locations=tuple(locations),
        auth_file=_auth_file(site) if site.basic_auth is not None else None,
        rate_zone=site_zone,
        error_pages=_error_page_views(site, ERROR_PAGE_PREFIX),
        error_pages_dir=_error_pages_dir(site) if site.error_pages else None,
        client_ca_file=client_ca_file,
        require_sni=client_ca_file is not None
        and not all(lst.default_server for lst in site.listeners if lst.tls),
        session_cache_off=any(lst.bind in checked_sockets for lst in site.listeners if lst.tls),
        client_crl_file=(
            _client_crl_file(site) if client_ca_file and tls and tls.client_crl else None
        ),
        relative_redirects=any(lst.mapped for lst in site.listeners if lst.tls or not redirect),
    )


def _password_checked(site: Site, location: Location) -> bool:
    """Whether nginx checks a password for every request `location` serves: its own or
    the site's `basic_auth` (a location inherits the server's), and no ``satisfy any``
    letting listed addresses in without one (the template writes ``satisfy all`` for a
    location with its own `allow`)."""
    if location.basic_auth is None and site.basic_auth is None:
        return False
    if location.satisfy != "all":
        return False
    return bool(location.allow) or site.satisfy == "all"


# The actions whose requests a site's rate limit counts: the others answer before nginx's
# access phase (see `LocationView.rate_zone`).
_COUNTED: Final = frozenset({"upstream", "root", "fastcgi"})

RATE_ZONE_SIZE: Final = "2m"
"""Shared memory of each ``limit_req_zone``: about 16,000 client addresses at once (nginx
keeps 8,000 per MB on 64-bit systems; the least recently seen are dropped when full)."""


@attrs.frozen
class RateZone:
    """A ``limit_req_zone`` and the ``limit_req`` that uses it, as whole tokens."""

    declare: Token
    """``zone=<name>:<size> rate=<n>r/s``: the arguments after the key."""
    use: Token
    """``zone=<name> [burst=<n> nodelay]``: the ``limit_req`` arguments."""


def _rate_zone(site: Site, limit: RateLimit | None, location: int | None = None) -> RateZone | None:
    if limit is None:
        return None
    # `nxmesh_rl_`: no other zone of nginx.conf (nxmesh_tls...) starts so. A dot, which
    # site names cannot hold: site "a" location 1 and a site "a_1" differ.
    name = f"nxmesh_rl_{_stem(site.name)}" + ("" if location is None else f".{location}")
    unit = "r/s" if limit.per == "second" else "r/m"
    # nodelay: a burst is served at once rather than paced, then the excess is refused.
    burst = f" burst={limit.burst} nodelay" if limit.burst else ""
    return RateZone(
        declare=Token(f"zone={name}:{RATE_ZONE_SIZE} rate={limit.rate}{unit}"),
        use=Token(f"zone={name}{burst}"),
    )


HTPASSWD_DIR: Final = "htpasswd"
"""Bundle directory of the basic-auth user files (``auth_basic_user_file``)."""


def _auth_file(site: Site, location: int | None = None) -> str:
    suffix = "" if location is None else f".{location}"
    return f"{HTPASSWD_DIR}/{_stem(site.name)}{suffix}"


UPSTREAM_CA_DIR: Final = "upstream-ca"
"""Bundle directory of the CA certificates upstreams' `tls.ca` trust."""


def _upstream_ca_file(upstream: Upstream) -> str:
    return f"{UPSTREAM_CA_DIR}/{_stem(upstream.name)}.pem"


_SETS_BUCKET = re.compile(rb"^\s*server_names_hash_bucket_size\s", re.MULTILINE)


def public_ports(state: DesiredState) -> list[tuple[int, int]]:
    """``(port, public port)`` of each port the sites' listeners reach clients on through
    a port mapping (`Listener.public_port`; the model makes a port's listeners agree),
    sorted: the ``$nxmesh_public_port`` map."""
    mapped = {
        lst.port: lst.reached_port for site in state.sites for lst in site.listeners if lst.mapped
    }
    return sorted(mapped.items())


NGINX_HASH_BUCKET_SIZE = 64
"""nginx's default ``*_hash_bucket_size`` on x86-64 and arm64: their cache line."""
_SMALLEST_DEFAULT_BUCKET = 32
"""The default where nginx's build knows no cache line (32-bit ARM, i386, others)."""


def hash_bucket_size(names: Iterable[str]) -> int | None:
    """The ``server_names_hash_bucket_size`` (or ``map_hash_bucket_size``) the longest of
    `names` needs; None when it fits the smallest default of any nginx build.

    nginx refuses to start ("could not build server_names_hash, you should increase
    server_names_hash_bucket_size: 64") when one name's entry, a pointer and the name
    padded to 8 bytes, plus the bucket's end pointer, exceeds the bucket: a name of 47
    characters or more with the 64 bytes of x86-64 and arm64, of 15 or more with the 32
    bytes nginx defaults to where it knows no cache line (Raspberry Pi's 32-bit builds
    among them). At least the 64-byte default, rounded up to a multiple of it (nginx
    rounds it up to its cache line anyway)."""
    longest = max((len(name) for name in names), default=0)
    need = 8 + 8 + (longest + 2 + 7) // 8 * 8
    if need <= _SMALLEST_DEFAULT_BUCKET:
        return None
    return -(-need // NGINX_HASH_BUCKET_SIZE) * NGINX_HASH_BUCKET_SIZE


def upstream_ca_files(upstreams: Iterable[Upstream]) -> dict[str, bytes]:
    """The CA files of the upstreams that trust their own CA (`UpstreamTLS.ca`), at the
    paths their locations' ``proxy_ssl_trusted_certificate`` names."""
    return {
        _upstream_ca_file(up): up.tls.ca.encode("ascii")
        for up in upstreams
        if up.tls is not None and up.tls.ca
    }


def _cache_key(site: Site, location: Location, upstream: Upstream | None) -> Token:
    """The site's name and a digest of what shapes the location's answers, the upstream's
    name, then scheme, host and URI; on a site checking client certificates, the
    client's certificate too (one partner's answer is not another's).

    The digest covers the site's settings with this location alone, and how its upstream
    is asked (its `tls`): an answer kept for one location is served by no other (another
    path upstream, other headers, other clients allowed), nor by the same one once the
    site, the location or the upstream's TLS name changed (an internal location opened to
    everyone, or removed so the next one takes its place). Not the listeners: a site
    answers alike on all of them, and the host's IPv6 twins or another site's default
    server must not drop what is kept."""
    alone = unstructure(attrs.evolve(site, locations=(location,)))
    alone.pop("listeners")
    # Who the upstream is asked as, not which servers answer: an outage's edits (a server
    # removed, a weight) must keep what serve_stale serves meanwhile.
    asked_as = None if upstream is None or upstream.tls is None else unstructure(upstream.tls)
    shaped = {"site": alone, "upstream": asked_as}
    digest = hashlib.sha256(canonical_json(shaped)).hexdigest()[:16]
    client = "$ssl_client_fingerprint|" if site.tls is not None and site.tls.client_ca else ""
    return Token(f"{_stem(site.name)}.{digest}|{client}$proxy_host|$scheme://$host$request_uri")


def _error_page_views(site: Site, prefix: str) -> tuple[ErrorPageView, ...]:
    return tuple(
        ErrorPageView(
            codes=Token(" ".join(str(code) for code in page.codes)),
            uri=Token(f"{prefix}{n}.html"),
        )
        for n, page in enumerate(site.error_pages)
    )


CLIENT_CA_DIR: Final = "client-ca"
"""Bundle directory of the CA certificates sites check client certificates against."""


def _client_ca_stem(site: Site) -> str:
    return f"{CLIENT_CA_DIR}/{_stem(site.name)}"


def _client_ca_file(site: Site) -> str:
    return f"{_client_ca_stem(site)}.pem"


def client_certificate_sockets(state: DesiredState) -> frozenset[tuple[str, int]]:
    """The TLS sockets (`Listener.bind`) where some site checks client certificates."""
    return frozenset(
        lst.bind
        for site in state.sites
        if site.tls is not None and site.tls.client_ca
        for lst in site.listeners
        if lst.tls
    )


def _client_crl_file(site: Site) -> str:
    return f"{_client_ca_stem(site)}.crl"


def _stream_client_ca_stem(stream: Stream) -> str:
    # A directory of their own: no site name can give a path here (stems have no '/').
    return f"{CLIENT_CA_DIR}/streams/{_stem(stream.name)}"


def stream_client_ca_files(streams: Iterable[Stream]) -> dict[str, bytes]:
    """The client CA files (and CRLs) of the TLS streams checking client certificates
    (`StreamTLS.client_ca`), at the paths their ``ssl_client_certificate`` and ``ssl_crl``
    name."""
    files: dict[str, bytes] = {}
    for stream in streams:
        if stream.tls is not None:
            files |= _ca_files(stream.tls, _stream_client_ca_stem(stream))
    return files


def client_ca_files(sites: Iterable[Site]) -> dict[str, bytes]:
    """The client CA files of the sites with `TLSConfig.client_ca`, and their CRLs
    (`client_crl`), at the paths their ``ssl_client_certificate`` and ``ssl_crl`` name."""
    files: dict[str, bytes] = {}
    for site in sites:
        if site.tls is not None:
            files |= _ca_files(site.tls, _client_ca_stem(site))
    return files


def _ca_files(tls: TLSConfig | StreamTLS, stem: str) -> dict[str, bytes]:
    """``<stem>.pem`` (the client CAs) and ``<stem>.crl`` (their CRLs), as `tls` has."""
    if not tls.client_ca:
        return {}
    files = {f"{stem}.pem": tls.client_ca.encode("ascii")}
    if tls.client_crl:
        files[f"{stem}.crl"] = tls.client_crl.encode("ascii")
    return files


def _error_pages_dir(site: Site) -> str:
    return f"{ERROR_PAGES_DIR}/{_stem(site.name)}"


def error_page_files(site: Site) -> dict[str, bytes]:
    """The site's error pages, ``<n>.html`` for ``error_pages[n]``, in the directory its
    view names (`SiteView.error_pages_dir`), as UTF-8."""
    if not site.error_pages:
        return {}
    directory = _error_pages_dir(site)
    return {f"{directory}/{n}.html": page.body.encode() for n, page in enumerate(site.error_pages)}


def htpasswd_files(view: SiteView) -> dict[str, bytes]:
    """The htpasswd files a site needs, at the paths its view names (`auth_file`): one
    for its own `basic_auth`, one per location with its own (which replaces the site's
    there), each ``user:hash`` lines. Paths are relative to nginx's configuration
    prefix, as ``auth_basic_user_file`` reads them."""
    auths = [
        (view.auth_file, view.site.basic_auth),
        *((lv.auth_file, lv.location.basic_auth) for lv in view.locations),
    ]
    return {
        path: b"".join(f"{u.name}:{u.password_hash}\n".encode() for u in auth.users)
        for path, auth in auths
        if path is not None and auth is not None
    }


def config_digest(files: Mapping[str, bytes]) -> str:
    """The *config digest*: `bundle_digest` of every file except the status server's.

    The status server reports it at ``/nxmesh/version``; it cannot cover its own file.
    """
    return bundle_digest({path: data for path, data in files.items() if path != STATUS_FILE})


# ---------------------------------------------------------------------------------------
# The renderer
# ---------------------------------------------------------------------------------------

_VALUE_TYPES: tuple[type[Any], ...] = (
    DesiredState,
    Site,
    Listener,
    TLSConfig,
    Location,
    ProxyCache,
    FastCGI,
    FastCGIParam,
    Header,
    Redirect,
    Return,
    Upstream,
    UpstreamServer,
    UpstreamTLS,
    CertificateRef,
    RenderSettings,
    CertificatePaths,
    HeaderLine,
    SiteView,
    LocationView,
    ErrorPageView,
)


def _data_attributes(cls: type[Any]) -> frozenset[str]:
    """Public fields and properties of an attrs class: plain data, never methods."""
    properties = {n for n, v in vars(cls).items() if isinstance(v, property)}
    fields = {f.name for f in attrs.fields(cls)}
    return frozenset(n for n in fields | properties if not n.startswith("_"))


@functools.cache
def _environment_class() -> type[SandboxedEnvironment]:
    """`SandboxedEnvironment`, with a fast path for reading data attributes of known types.

    `SandboxedEnvironment.getattr` inspects every looked-up value (is it internal? a
    ``str.format``?) — most of the render time for large states. The attributes of the
    frozen model classes are plain data, so they are returned directly; anything else
    takes the sandbox's full path. Built on first use: jinja2 is imported then.
    """
    from jinja2.sandbox import SandboxedEnvironment

    fast_attributes = {cls: _data_attributes(cls) for cls in _VALUE_TYPES}

    class Environment(SandboxedEnvironment):
        def getattr(self, obj: Any, attribute: str) -> Any:
            names = fast_attributes.get(type(obj))
            if names is not None and attribute in names:
                return getattr(obj, attribute)
            return super().getattr(obj, attribute)

    return Environment


def _environment(template_dir: Path | None, template_paths: Sequence[Path]) -> SandboxedEnvironment:
    import jinja2

    builtin = jinja2.FileSystemLoader(str(BUILTIN_TEMPLATES))
    loaders: list[jinja2.BaseLoader] = []
    if template_dir is not None:
        loaders.append(jinja2.FileSystemLoader(str(template_dir)))
    if template_paths:
        # FileSystemLoader searches its list first to last; later paths must win.
        loaders.append(jinja2.FileSystemLoader([str(p) for p in reversed(template_paths)]))
    loaders.append(builtin)
    loaders.append(jinja2.PrefixLoader({"builtin": builtin}))
    env = _environment_class()(
        loader=jinja2.ChoiceLoader(loaders),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        finalize=quoting.token,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        # Templates are compiled once per renderer; never stat the files again.
        auto_reload=False,
        cache_size=-1,
    )
    env.filters.update(plain=quoting.plain, regex=quoting.regex, redirect_url=quoting.redirect_url)
    env.globals.update(
        listen=listen,
        main_listens=main_listens,
        redirect_listens=redirect_listens,
        https_redirect=https_redirect,
        location_args=location_args,
        server_headers=server_headers,
        location_headers=location_headers,
        proxy_headers=proxy_headers,
        fastcgi_params=fastcgi_params,
        certificate_paths=certificate_paths,
        site_view=site_view,
        websocket_read_timeout=WEBSOCKET_READ_TIMEOUT,
        acme_challenge_dir=ACME_CHALLENGE_DIR,
    )
    return env


class NginxRenderer:
    """The built-in renderer: desired state → `Bundle` of nginx files.

    Bundle layout (paths relative to the directory holding ``nginx.conf``)::

        nginx.conf               main file; includes mime.types and conf.d/*.conf
        mime.types
        conf.d/upstreams.conf    every upstream, sorted by name
        conf.d/site-<name>.conf  one per site
        conf.d/status.conf       the agent's status server (unless status_port is None)
        certs/...                certificate files passed as ``extra_files``
        acme-challenge/<token>   pending ACME HTTP-01 tokens passed as ``extra_files``

    :param template_paths: plugin template directories; a later one overrides an earlier.
    :param template_dir: the user's template directory; overrides everything.
    :param settings: host-specific knobs (runtime prefix, status port, workers...).
    :raises TemplateRenderError: a template does not compile.
    """

    name: ClassVar[str] = "nginx"

    def __init__(
        self,
        template_paths: Sequence[Path] = (),
        *,
        template_dir: Path | None = None,
        settings: RenderSettings | None = None,
    ) -> None:
        self.settings = settings or RenderSettings()
        self.template_paths = tuple(Path(p) for p in template_paths)
        self.template_dir = Path(template_dir) if template_dir is not None else None
        self._paths = self.settings.runtime_paths()
        self._environment: SandboxedEnvironment | None = None
        if self.template_dir is not None or self.template_paths:
            self._compile()  # an override that does not compile fails here, early

    @property
    def environment(self) -> SandboxedEnvironment:
        """The jinja2 environment (built, with every template compiled, on first use)."""
        return self._compile()

    def _compile(self) -> SandboxedEnvironment:
        if self._environment is not None:
            return self._environment
        import jinja2

        environment = _environment(self.template_dir, self.template_paths)
        self._templates: dict[str, jinja2.Template] = {}
        for name in TEMPLATE_NAMES:
            try:
                self._templates[name] = environment.get_template(name)
            except jinja2.TemplateError as exc:
                raise TemplateRenderError.from_exception(exc, name) from exc
        # Hook templates whose built-in version is empty are only included when overridden.
        overridden = frozenset(
            name
            for name, template in self._templates.items()
            if template.filename is None or Path(template.filename).parent != BUILTIN_TEMPLATES
        )
        environment.globals["overridden"] = overridden
        self._globals: dict[str, Any] = dict(environment.globals)
        # Static content: rendered once, shared by every bundle.
        self._mime_types = self._render("mime.types.j2", {})
        self._environment = environment
        return environment

    def template_source(self, name: str) -> str | None:
        """The file a template name resolves to (which override won), if it is a file."""
        self._compile()
        return self._templates[name].filename

    def _render(self, name: str, context: dict[str, Any]) -> bytes:
        return self._run(self._templates[name], {**self._globals, **context})

    def _run(self, template: jinja2.Template, context: dict[str, Any]) -> bytes:
        """Render with `context` already holding the globals.

        `jinja2.Template.render` would merge the globals into a fresh dict for every call;
        with 10,000 sites that copying is measurable, so the site loop reuses one dict
        (``shared=True``: jinja writes template-level variables to its own layer, never
        into it).
        """
        try:
            return "".join(template.root_render_func(template.new_context(context, True))).encode()
        except Exception:
            try:
                # Re-raises with the traceback rewritten to template files and lines.
                template.environment.handle_exception()
            except Exception as exc:
                raise TemplateRenderError.from_exception(
                    exc, template.filename or template.name
                ) from exc
            raise  # pragma: no cover - handle_exception always raises

    def _encrypted_keys(self, extra_files: Mapping[str, bytes]) -> frozenset[str]:
        """Bundle paths of the encrypted private keys among `extra_files`."""
        encrypted = frozenset(
            path
            for path, data in extra_files.items()
            if path.endswith(".key") and bytes(data[:64]).lstrip().startswith(_ENCRYPTED_KEY)
        )
        if encrypted and self.settings.ssl_password_file is None:
            raise RenderError(
                f"private key {sorted(encrypted)[0]} is encrypted but no ssl_password_file is "
                "configured for the renderer; nginx could not load it"
            )
        return encrypted

    def render(
        self, state: DesiredState, *, extra_files: Mapping[str, bytes] = _NO_FILES
    ) -> Bundle:
        """Render `state`; `extra_files` (certificates under ``certs/``, HTTP-01 tokens
        under ``acme-challenge/``) are added as given.

        :raises TemplateRenderError: a template failed; names its file and line.
        :raises RenderError: duplicate site names, an extra file outside ``certs/`` and
            ``acme-challenge/`` or clashing with a rendered file, or an encrypted key
            without ``ssl_password_file``.
        """
        self._compile()
        state = _catch_all_sites_default(self._bind_listeners(state))
        self._check_status_port(state)
        base: dict[str, Any] = {
            "state": state,
            "settings": self.settings,
            "verify_depth": VERIFY_DEPTH,
            "paths": self._paths,
            # Sites whose key is encrypted get ssl_password_file; ACME-sourced certificates
            # get the HTTP-01 challenge location like `tls: acme` sites.
            "encrypted_keys": self._encrypted_keys(extra_files),
            "acme_certificates": frozenset(
                c.name for c in state.certificates if c.source == "acme"
            ),
            # Sites answering HTTP-01 for the ACME certificates of TLS streams.
            "stream_acme_sites": frozenset(state.sites[i].name for i in stream_http01_sites(state)),
            "public_ports": public_ports(state),
        }
        base["server_names_bucket"] = self._server_names_bucket(state, base)
        files: dict[str, bytes] = {
            "nginx.conf": self._render("nginx.conf.j2", base),
            "mime.types": self._mime_types,
            "conf.d/upstreams.conf": self._render(
                "upstreams.conf.j2",
                {**base, "upstreams": sorted(state.upstreams, key=lambda u: u.name)},
            ),
        }
        files.update(upstream_ca_files(state.upstreams))
        files.update(client_ca_files(state.sites))
        if any(loc.cache is not None for site in state.sites for loc in site.locations):
            files[PROXY_CACHE_FILE] = self._render("proxy_cache.conf.j2", base)
        by_name = {up.name: up for up in state.upstreams}
        site_template = self._templates["site.conf.j2"]
        site_context = {**self._globals, **base}
        checked_sockets = client_certificate_sockets(state)
        for site in state.sites:
            path = f"conf.d/site-{_stem(site.name)}.conf"
            if path in files:
                raise RenderError(f"two sites are named {site.name!r}; site names must be unique")
            view = site_view(site, by_name, checked_sockets=checked_sockets)
            site_context["site"] = site
            site_context["view"] = view
            files[path] = self._run(site_template, site_context)
            files.update(htpasswd_files(view))
            files.update(error_page_files(site))
        if state.streams:
            files[STREAMS_FILE] = self._render_streams(state, base)
            files.update(stream_client_ca_files(state.streams))
            if not _streams_included(files["nginx.conf"]):
                raise RenderError(
                    "nginx.conf does not include streams.conf in a top-level stream {} "
                    "block, so the state's streams would not be served: a nginx.conf.j2 "
                    "override made before streams existed? Copy the built-in template's "
                    "two stream parts: the load_module lines at its top and the "
                    "'{% if state.streams %}' block at its end"
                )
        unknown = unknown_host_listens(state, checked_sockets=checked_sockets)
        files[UNKNOWN_HOSTS_FILE] = self._render(
            "unknown_hosts.conf.j2", {**base, "unknown_host_listens": unknown}
        )
        for path, data in sorted(extra_files.items()):
            _check_extra(path)
            if path in files:
                raise RenderError(f"extra file {path!r} clashes with a rendered file")
            files[path] = bytes(data)
        if self.settings.status_port is not None:
            # default_server: whatever else shares the socket, the agent's probes of
            # /nxmesh/version reach this server (the confirm step depends on it).
            listen_args = _listen_args(
                self.settings.status_address, self.settings.status_port, "default_server"
            )
            files[STATUS_FILE] = self._render(
                "status.conf.j2",
                {**base, "config_digest": config_digest(files), "status_listen": listen_args},
            )
        return Bundle(files)

    def _server_names_bucket(self, state: DesiredState, base: dict[str, Any]) -> int | None:
        """`hash_bucket_size` of the sites' names, unless an ``http_extra.conf.j2``
        override sets ``server_names_hash_bucket_size`` itself (the old advice for long
        names): nginx refuses the directive twice, and the override's size stands."""
        size = hash_bucket_size(name for site in state.sites for name in site.server_names)
        if size is None:
            return None
        extra = self._render("http_extra.conf.j2", {**base, "server_names_bucket": None})
        return None if _SETS_BUCKET.search(extra) else size

    def _render_streams(self, state: DesiredState, base: dict[str, Any]) -> bytes:
        """``streams.conf``: each stream's server and the upstreams they name.

        :raises RenderError: a stream names an unknown upstream or one it cannot use, or
            listens on the agent's status port (the master checks the first two when a
            state is submitted, not in stored versions; the last is this host's).
        """
        by_name = {up.name: up for up in state.upstreams}
        views = []
        for n, stream in enumerate(state.streams):
            for name in stream.upstreams:
                used = by_name.get(name)
                if used is None:
                    raise RenderError(
                        f"stream {stream.name!r} names upstream {name!r}, which the state "
                        "does not define"
                    )
                if (reason := stream_upstream_reason(stream, used)) is not None:
                    raise RenderError(f"stream {stream.name!r}: {reason}")
            upstream = by_name[stream.upstream]
            tls, ca = stream.tls, _stream_client_ca_stem(stream)
            views.append(
                StreamView(
                    stream=stream,
                    listens=self._stream_listens(stream),
                    certificate=named_certificate_paths(tls.certificate) if tls else None,
                    upstream_tls=upstream.tls,
                    upstream_ca=(
                        _upstream_ca_file(upstream) if upstream.tls and upstream.tls.ca else None
                    ),
                    client_ca_file=f"{ca}.pem" if tls and tls.client_ca else None,
                    client_crl_file=f"{ca}.crl" if tls and tls.client_crl else None,
                    sni_variable=f"nxmesh_sni_{n}" if stream.sni_routes else None,
                )
            )
        names = sorted({name for stream in state.streams for name in stream.upstreams})
        context = {
            **base,
            "streams": views,
            "upstreams": [by_name[n] for n in names],
            "map_bucket": hash_bucket_size(
                name
                for stream in state.streams
                for route in stream.sni_routes
                for name in route.server_names
            ),
        }
        return self._render("streams.conf.j2", context)

    def _stream_listens(self, stream: Stream) -> list[Token]:
        """``listen`` arguments of a stream's server: on its address, else on the host's
        `listen_address`, else on every IPv4 address and, with `listen_ipv6`, on
        ``[::]`` too (its port is its own: the master refuses a site or another stream
        of its protocol there).

        UDP sockets get ``reuseport``: each worker then has a socket of its own and the
        kernel hands all of a client's datagrams to one worker. Without it every worker
        reads the shared socket, a client's datagrams land in several workers' sessions,
        and go to several servers of the upstream from several ports (nginx's
        documentation asks for it on Linux).

        :raises RenderError: a TCP stream on the agent's status server's socket, which
            ``nginx -t`` passes and the reload then fails to bind.
        """
        options: tuple[str, ...] = ("udp", "reuseport") if stream.protocol == "udp" else ()
        if stream.tls is not None:
            options = ("ssl",)
        if stream.proxy_protocol_from:
            options = (*options, "proxy_protocol")
        address = stream.address if stream.address is not None else self.settings.listen_address
        addresses = [address]
        if self.settings.listen_ipv6 and address in (None, "*", "0.0.0.0"):  # noqa: S104
            addresses.append("::")
        if stream.protocol == "tcp" and stream.port == self.settings.status_port:
            for each in addresses:
                if _same_socket(each, self.settings.status_address):
                    raise RenderError(
                        f"stream {stream.name!r} listens on port {stream.port}, the agent's "
                        f"status server ({self.settings.status_address}:{stream.port}, "
                        "render setting status_port): use another port, or move the status "
                        "server"
                    )
        return [_listen_args(each, stream.port, *options) for each in addresses]

    def _check_status_port(self, state: DesiredState) -> None:
        """Refuse a site listening on the agent's status port (on its address or all):
        it could answer the probes that confirm a reload, and every apply would roll
        back (or a wrong one be confirmed)."""
        port = self.settings.status_port
        if port is None:
            return
        shared = {None, "*", "0.0.0.0", "::", self.settings.status_address}  # noqa: S104
        for site in state.sites:
            for listener in site.listeners:
                address = listener.address
                if address is not None and address.startswith("["):
                    address = address.strip("[]")
                if listener.port == port and address in shared:
                    raise RenderError(
                        f"site {site.name!r} listens on port {port}, the agent's status "
                        f"server ({self.settings.status_address}:{port}, render setting "
                        "status_port): use another port, or move the status server"
                    )

    def _bind_listeners(self, state: DesiredState) -> DesiredState:
        """`state` with address-less listeners bound to `RenderSettings.listen_address`,
        or joined by IPv6 twins with `listen_ipv6` (`_with_ipv6`)."""
        if self.settings.listen_address is not None:
            if all(lst.address is not None for site in state.sites for lst in site.listeners):
                return state
            return _bind_to(state, self.settings.listen_address)
        if self.settings.listen_ipv6:
            return _with_ipv6(state)
        return state


def _bind_to(state: DesiredState, address: str) -> DesiredState:
    """`state` with its address-less listeners on `address`.

    :raises RenderError: binding joined sockets the master checked apart (a default
        server twice, TLS and plain on one port): nginx -t would say so less clearly, or
        a reload would fail to bind. Only the conflicts are checked, as the loader does:
        rules for new input (`submission_problems`) do not depend on this host.
    """
    setting = f"agent.listen_address = {address!r}"
    try:
        sites = tuple(
            attrs.evolve(
                site,
                listeners=tuple(
                    lst if lst.address is not None else attrs.evolve(lst, address=address)
                    for lst in site.listeners
                ),
            )
            for site in state.sites
        )
        bound = attrs.evolve(state, sites=sites)
    except Invalid as exc:  # e.g. one site's `18080` and `127.0.0.1:18080` became one
        raise RenderError(f"with {setting}: {exc}") from None
    problems = check_parts(StateParts.of(bound))
    if problems:
        raise RenderError(f"with {setting}: " + "; ".join(map(str, problems)))
    return bound


def _with_ipv6(state: DesiredState) -> DesiredState:
    """`state` with an IPv6 twin (``[::]``, same port and options) after each listener on
    the IPv4 wildcard (no address, ``*``, ``0.0.0.0``), on the ports where no site has an
    IPv6 socket of its own: a listener, or the HTTP->HTTPS redirect of one.

    Those ports keep their IPv6 sockets as the state writes them: a twin beside another
    site's ``[::]:80`` or ``[::1]:80`` would be a second default server, a wildcard beside
    an address, or a site the state kept to IPv4. A site whose twins would give its
    redirect server such a port gets none. Elsewhere the twins repeat on IPv6 what the
    IPv4 sockets are, which the master already checked: they cannot conflict.
    """
    redirects = [redirect_binds(site) for site in state.sites]
    written = {
        port
        for site, redirect in zip(state.sites, redirects, strict=True)
        for address, port in [*(lst.bind for lst in site.listeners), *redirect]
        if ":" in address
    }
    sites = []
    for site, redirect in zip(state.sites, redirects, strict=True):
        listeners: list[Listener] = []
        for lst in site.listeners:
            listeners.append(lst)
            if lst.bind[0] == "*" and lst.port not in written:
                listeners.append(attrs.evolve(lst, address="::"))
        twinned = attrs.evolve(site, listeners=tuple(listeners))
        new_redirects = set(redirect_binds(twinned)) - set(redirect)
        if any(port in written for _, port in new_redirects):
            twinned = site
        sites.append(twinned)
    return attrs.evolve(state, sites=tuple(sites))


# nginx's tokens: a comment (a `#` where a token starts), a quoted string, a brace or
# `;`, a word (which may hold a `#`).
_NGINX_TOKEN: Final = re.compile(
    rb"""#[^\n]*|"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|[{};]|[^\s{};"']+"""
)


def _streams_included(conf: bytes) -> bool:
    """Whether `conf` (nginx.conf) has a top-level ``stream`` block with its own
    ``include streams.conf;``: read as nginx reads it, so comments, quoted strings and
    other blocks neither hide nor fake one."""
    blocks: list[bytes] = []
    words: list[bytes] = []
    for match in _NGINX_TOKEN.finditer(conf):
        token = match.group()
        if token.startswith(b"#"):
            continue
        if token == b"{":
            blocks.append(words[0] if words else b"")
            words = []
        elif token == b"}":
            if blocks:
                blocks.pop()
            words = []
        elif token == b";":
            if blocks == [b"stream"] and words == [b"include", b"streams.conf"]:
                return True
            words = []
        else:
            words.append(token[1:-1] if token[:1] in (b'"', b"'") else token)
    return False


def _same_socket(listen_address: str | None, status_address: str) -> bool:
    """Whether a stream's TCP ``listen`` on `listen_address` (None or ``*``: every IPv4
    address) takes the status server's socket on the same port: equal addresses, or a
    wildcard on either side, in one family. The stream module binds its sockets apart
    from the http module's, which would otherwise share them."""
    ours = ipaddress.ip_address(
        "0.0.0.0" if listen_address in (None, "*") else listen_address  # noqa: S104
    )
    theirs = ipaddress.ip_address(status_address)
    if ours.version != theirs.version:
        return False
    return ours == theirs or ours.is_unspecified or theirs.is_unspecified


def _check_extra(path: str) -> None:
    pure = PurePosixPath(path)
    if (
        pure.is_absolute()
        or ".." in pure.parts
        or len(pure.parts) < 2
        or pure.parts[0] not in EXTRA_FILE_DIRS
    ):
        raise RenderError(
            f"extra file {path!r} must be a relative path under {CERTS_DIR}/ "
            f"(certificates and keys) or {ACME_CHALLENGE_DIR}/ (ACME HTTP-01 tokens)"
        )


# ---------------------------------------------------------------------------------------
# Building the configured renderer
# ---------------------------------------------------------------------------------------


def plugin_template_paths(pm: pluggy.PluginManager) -> list[Path]:
    """Every plugin's template directories, earliest-registered plugin first.

    pluggy returns results last-registered first; reversing makes "later wins" the same
    rule as in `NginxRenderer`.
    """
    results = pm.hook.nxmesh_template_paths()
    return [Path(p) for result in reversed(results) for p in result or ()]


def renderer_for(
    pm: pluggy.PluginManager,
    settings: Settings | RendererSettings | None = None,
    *,
    render_settings: RenderSettings | None = None,
) -> Renderer:
    """The renderer the settings name (default ``nginx``), with every plugin's templates.

    :param settings: the application settings (or just their ``renderer`` section):
        the renderer name and the user's template directory.
    :param render_settings: host knobs for `NginxRenderer` (ignored by other renderers).
    :raises ProviderNotFoundError: no plugin registers a renderer by that name.
    """
    section = getattr(settings, "renderer", settings)
    name = getattr(section, "name", "nginx")
    template_dir = getattr(section, "template_dir", None)
    cls = ProviderRegistries(pm)["renderer"].get(name)
    paths = plugin_template_paths(pm)
    if isinstance(cls, type) and issubclass(cls, NginxRenderer):
        return cls(paths, template_dir=template_dir, settings=render_settings)
    # Other renderers only know the protocol's constructor: the user directory goes last,
    # where "later wins" puts it above every plugin.
    renderer: Renderer = cls(template_paths=[*paths, *([template_dir] if template_dir else [])])
    return renderer
