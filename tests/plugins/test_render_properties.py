"""Properties of the renderer: no value the model accepts can change the config's structure.

Strategies draw states from the model's own allow-lists (`nxmesh.core.validation`), so they
include the nasty-but-valid characters each field admits: parentheses and ``%XX`` in
paths, quotes, ``<>``, ``|`` and spaces in header values, backslash escapes and the ``$``
anchor in regexes, ``$request_uri`` in redirects, IPv6 listeners... Each rendered bundle is
parsed with crossplane and compared with the structure the state implies: exactly these
blocks, these directives in this order, these argument values. A value that added a
directive, a block or an argument, or lost a character, fails the comparison.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import tempfile
import unicodedata
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import crossplane
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nxmesh.core import validation as v
from nxmesh.core.model import (
    ERROR_PAGE_PREFIX,
    FASTCGI_BUILTIN_PARAMS,
    BasicAuth,
    BasicAuthUser,
    DesiredState,
    ErrorPage,
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
    SniRoute,
    Stream,
    StreamTLS,
    TLSConfig,
    Upstream,
    UpstreamServer,
    UpstreamTLS,
    redirect_binds,
    stream_upstream_reason,
)
from nxmesh.nginx_check import write_bundle
from nxmesh.plugins.render_nginx import NginxRenderer, RenderSettings, site_view
from nxmesh.plugins.render_nginx.quoting import DOLLAR_VARIABLE, Token, UnsafeValueError, quote
from nxmesh.testing.pki import Pki

Directive = dict[str, Any]

PROPERTY_SETTINGS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

# Every directive a rendered bundle may contain. A value that smuggled in any other
# directive name would fail the allow-set check even before the exact comparison.
ALLOWED_DIRECTIVES = frozenset(
    {
        "if",  # hidden files (`HIDDEN_FILES`), a FastCGI site's .php paths (`PHP_ONLY`)
        "set",  # only a FastCGI location's PATH_INFO
        "fastcgi_split_path_info",
        "fastcgi_pass",
        "fastcgi_index",
        "fastcgi_connect_timeout",
        "fastcgi_send_timeout",
        "fastcgi_buffer_size",
        "fastcgi_buffers",
        "fastcgi_param",
        "fastcgi_read_timeout",
        "fastcgi_intercept_errors",
        "ssl_reject_handshake",  # only the unknown-hosts server of a TLS socket
        "user",
        "worker_processes",
        "worker_shutdown_timeout",
        "pid",
        "error_log",
        "events",
        "worker_connections",
        "http",
        "include",
        "default_type",
        "server_tokens",
        "sendfile",
        "tcp_nopush",
        "tcp_nodelay",
        "keepalive_timeout",
        "types_hash_max_size",
        "log_format",
        "access_log",
        "client_body_temp_path",
        "proxy_temp_path",
        "fastcgi_temp_path",
        "uwsgi_temp_path",
        "scgi_temp_path",
        "proxy_http_version",
        "proxy_connect_timeout",
        "proxy_send_timeout",
        "proxy_read_timeout",
        "proxy_buffer_size",
        "proxy_buffers",
        "ssl_protocols",
        "ssl_ciphers",
        "ssl_prefer_server_ciphers",
        "ssl_session_cache",
        "ssl_session_timeout",
        "ssl_session_tickets",
        "map",
        "geo",
        "types",
        "upstream",
        "server",
        "least_conn",
        "ip_hash",
        "random",
        "keepalive",
        "listen",
        "server_name",
        "ssl_certificate",
        "ssl_certificate_key",
        "client_max_body_size",
        "absolute_redirect",
        "add_header",
        "location",
        "return",
        "proxy_pass",
        "proxy_set_header",
        "root",
        "alias",
        "autoindex",
        "index",
        "try_files",
        "proxy_ssl_protocols",
        "proxy_request_buffering",
        "proxy_ssl_server_name",
        "proxy_ssl_name",
        "proxy_ssl_verify",
        "proxy_ssl_verify_depth",
        "proxy_ssl_trusted_certificate",
        "stub_status",
        "allow",
        "deny",
        "set_real_ip_from",
        "real_ip_header",
        "real_ip_recursive",
        "auth_basic",
        "auth_basic_user_file",
        "limit_req_zone",
        "satisfy",
        "gzip",
        "gzip_vary",
        "gzip_proxied",
        "gzip_min_length",
        "gzip_types",
        "limit_req",
        "limit_req_status",
        "error_page",
        "proxy_intercept_errors",
        "ssl_client_certificate",
        "ssl_verify_client",
        "ssl_verify_depth",
        "ssl_crl",
        "proxy_cache_path",
        "proxy_cache",
        "proxy_cache_key",
        "proxy_cache_valid",
        "proxy_cache_lock",
        "proxy_cache_bypass",
        "proxy_no_cache",
        "proxy_cache_use_stale",
        "proxy_cache_background_update",
        "internal",
        "charset",
        "stream",  # the streams: only in states with one
        "proxy_timeout",
        "proxy_protocol",
        "proxy_responses",
        "proxy_ssl",  # a stream before a TLS upstream (locations say https:// instead)
        "limit_conn_zone",  # streams' max_connections_per_client
        "limit_conn",
        "limit_conn_log_level",
        "ssl_preread",  # a stream routing TLS by SNI
        "server_names_hash_bucket_size",  # only for server names of 15 characters and more
        "map_hash_bucket_size",  # only for SNI route names of 15 characters and more
    }
)


# ---------------------------------------------------------------------------------------
# Strategies from the model's allow-lists
# ---------------------------------------------------------------------------------------


# Cached: a strategy built afresh at each draw is validated afresh too, which took most
# of the time these tests spent.
@functools.cache
def matching(rule: v.TextRule) -> st.SearchStrategy[str]:
    """Strings of the rule's pattern that the whole rule (length, extra checks) accepts."""
    return st.from_regex(rule.pattern, fullmatch=True).filter(lambda s: rule.reason(s) is None)


@functools.cache
def text_of(rule: v.TextRule, max_size: int = 40) -> st.SearchStrategy[str]:
    """Free text over every printable ASCII character a ``[...]*`` rule allows: drawn
    directly rather than filtered, so it stays fast and reaches every character."""
    alphabet = [c for c in map(chr, range(32, 127)) if rule.pattern.fullmatch(c)]
    return st.text(alphabet, min_size=rule.min_len, max_size=max_size).filter(
        lambda s: rule.reason(s) is None
    )


names = st.from_regex(r"[a-z][a-z0-9_-]{0,12}", fullmatch=True)
ports = st.integers(1, 65535)
header = st.builds(
    Header, name=matching(v.HEADER_NAME), value=text_of(v.HEADER_VALUE), always=st.booleans()
)
headers = st.lists(header, max_size=3).map(tuple)

_REGEX_ATOMS = st.sampled_from(
    [
        "a",
        "Z",
        "9",
        "/",
        "-",
        "_",
        ".",
        "~",
        "!",
        "@",
        ":",
        ",",
        "=",
        "%",
        r"\.",
        r"\d",
        r"\w",
        r"\s",
        r"\/",
        "[a-z]",
        "[0-9]+",
        "(?:png|jpe?g)",
        "(x|y)",
        ".*",
        "+",
        "?",
        "|",
        "{2}",
        "{1,3}",
        "{2,}",
    ]
)
regexes = st.builds(
    lambda head, atoms, tail: head + "".join(atoms) + tail,
    st.sampled_from(["", "^", "^/"]),
    st.lists(_REGEX_ATOMS, min_size=1, max_size=6),
    st.sampled_from(["", "$"]),
).filter(lambda s: v.REGEX_PATH.reason(s) is None)

upstream_addresses = st.one_of(
    st.builds(lambda ip, port: f"{ip}:{port}", st.ip_addresses(v=4), ports),
    st.builds(lambda ip, port: f"[{ip}]:{port}", st.ip_addresses(v=6), ports),
    st.builds(
        lambda labels, port: f"{'.'.join(labels)}:{port}",
        st.lists(
            # A leading letter: an all-digit host would read as a (broken) IPv4 address.
            st.from_regex(r"[A-Za-z_](?:[A-Za-z0-9_-]{0,8}[A-Za-z0-9_])?", fullmatch=True),
            min_size=1,
            max_size=3,
        ),
        ports,
    ),
    st.from_regex(r"unix:/[A-Za-z0-9._-]{1,20}(/[A-Za-z0-9._-]{1,10})?", fullmatch=True),
).filter(lambda s: v.UPSTREAM_ADDRESS.reason(s) is None)

# Segments never start with '.', so '.' and '..' (refused by the model) are not drawn.
roots = st.builds(
    lambda segments, slash: "/" + "/".join(segments) + slash,
    st.lists(
        st.from_regex(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,10}", fullmatch=True), min_size=1, max_size=4
    ),
    st.sampled_from(["", "/"]),
).filter(lambda s: v.ROOT_PATH.reason(s) is None)

tls_protocols = st.sampled_from(
    [("TLSv1.2",), ("TLSv1.3",), ("TLSv1.2", "TLSv1.3"), ("TLSv1.3", "TLSv1.2")]
)

listen_addresses = st.one_of(
    st.none(),
    st.just("*"),
    st.ip_addresses().map(str),
).filter(lambda s: s is None or v.LISTEN_ADDRESS.reason(s) is None)


fastcgi_param_names = matching(v.FASTCGI_PARAM).filter(
    lambda n: not n.startswith("HTTP_") and n not in FASTCGI_BUILTIN_PARAMS
)


@st.composite
def locations(draw: st.DrawFn, upstream_names: list[str]) -> Location:
    match = draw(st.sampled_from(["prefix", "prefix_priority", "exact", "regex", "regex_ci"]))
    path = draw(matching(v.LOCATION_PATH) if not match.startswith("regex") else regexes)
    common: dict[str, Any] = {
        "path": path,
        "match": match,
        "headers": draw(headers),
        "client_max_body_size": draw(st.none() | matching(v.SIZE)),
    }
    action = draw(st.sampled_from(["upstream", "root", "redirect", "return", "fastcgi"]))
    if action in ("upstream", "root", "fastcgi"):  # nginx answers the others earlier
        common["allow"] = draw(client_networks(v.ALLOWED_CLIENT))
        common["basic_auth"] = draw(st.none() | basic_auths)
        common["rate_limit"] = draw(st.none() | rate_limits)
        common["satisfy"] = draw(st.sampled_from(["all", "any"]))
    if action == "upstream":
        # nginx can swap only a prefix ending in '/' or an exact path for the URI.
        strippable = match == "exact" or (match.startswith("prefix") and path.endswith("/"))
        return Location(
            upstream=draw(st.sampled_from(upstream_names)),
            websocket=draw(st.booleans()),
            proxy_headers=draw(headers),
            proxy_read_timeout=draw(st.none() | st.integers(1, 86400)),
            strip_prefix=strippable and draw(st.booleans()),
            proxy_request_buffering=draw(st.booleans()),
            cache=draw(st.none() | proxy_caches),
            **common,
        )
    if action == "root":
        return Location(
            root=draw(roots),
            index=tuple(draw(st.lists(matching(v.FILE_NAME), max_size=3))),
            serve_dotfiles=draw(st.booleans()),
            fallback=draw(st.none() | matching(v.FALLBACK_URI)),
            **common,
        )
    if action == "fastcgi":
        params = draw(
            st.lists(
                st.builds(FastCGIParam, name=fastcgi_param_names, value=text_of(v.HEADER_VALUE)),
                max_size=3,
                unique_by=lambda p: p.name,
            )
        )
        fastcgi = FastCGI(
            upstream=draw(st.sampled_from(upstream_names)),
            root=draw(roots),
            index=draw(matching(v.FILE_NAME)).removesuffix(".php")[:124] + ".php",
            check_script=draw(st.booleans()),
            read_timeout=draw(st.none() | st.integers(1, 86400)),
            params=tuple(params),
        )
        return Location(fastcgi=fastcgi, **common)
    if action == "redirect":
        code = draw(st.sampled_from([301, 302, 303, 307, 308]))
        return Location(redirect=Redirect(code=code, url=draw(matching(v.REDIRECT_URL))), **common)
    code = draw(st.sampled_from([200, 204, 403, 404, 410, 503]))
    return Location(return_=Return(code=code, body=draw(text_of(v.RETURN_BODY))), **common)


# Hashes of the accepted formats (their letters do not matter to the renderer).
_HASHES = st.sampled_from(
    [
        "$2y$10$" + "a" * 53,
        "$6$salt$" + "b" * 86,
        "$5$rounds=5000$salt$" + "c" * 43,
        "$apr1$abcdefgh$" + "d" * 22,
    ]
)
rate_limits = st.builds(
    RateLimit,
    rate=st.integers(1, 100_000),
    per=st.sampled_from(["second", "minute"]),
    burst=st.integers(0, 100_000),
)
proxy_caches = st.builds(
    ProxyCache,
    valid=st.integers(1, 31_536_000),
    with_cookies=st.booleans(),
    serve_stale=st.booleans(),
)


# Filled per example by `check_site`: the key each caching location's block has, once
# its shape is checked (the site's name, a 16-hex digest, upstream, scheme, host, URI).
CACHE_KEYS: dict[tuple[str, int], str] = {}
CACHE_KEY_SHAPE = re.compile(
    r"([a-z0-9_-]+)\.[0-9a-f]{16}\|(\$ssl_client_fingerprint\|)?"
    r"\$proxy_host\|\$scheme://\$host\$request_uri"
)

CACHE_CLEARED = ["X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override"]
# A client's claims of the scheme, its address or the URL: never sent on (`CLIENT_CLAIMS`).
CLIENT_CLAIMS = [
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
]


def cache_lines(cache: ProxyCache, site: Site, index: int) -> list[tuple[str, list[str]]]:
    """A caching location's lines: the zone, a key naming the site's location, upstream,
    scheme, host and URI, the validity, the lock, who is not served from it (personal
    requests, WebSocket upgrades), and the stale answers."""
    personal = ["$http_authorization", "$http_upgrade"]
    personal += [] if cache.with_cookies else ["$http_cookie"]
    lines = [
        ("proxy_cache", ["nxmesh_cache"]),
        ("proxy_cache_key", [CACHE_KEYS[(site.name, index)]]),
        ("proxy_cache_valid", ["200", "301", "302", f"{cache.valid}s"]),
        ("proxy_cache_lock", ["on"]),
        ("proxy_cache_bypass", personal),
        ("proxy_no_cache", personal),
    ]
    if cache.serve_stale:
        stale = ["error", "timeout", "updating", "http_500", "http_502", "http_503", "http_504"]
        lines += [("proxy_cache_use_stale", stale), ("proxy_cache_background_update", ["on"])]
    return lines


# Codes drawn once for all of a site's pages, then split among them: a code is on one page.
error_codes = st.sampled_from([c for c in range(400, 600) if c not in (444, 499)])
error_bodies = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")) | st.sampled_from("\r\n\t"),
    min_size=1,
    max_size=40,
).filter(lambda body: v.ERROR_PAGE_BODY.reason(body) is None)  # U+2028, U+2029


@st.composite
def error_page_lists(draw: st.DrawFn) -> tuple[ErrorPage, ...]:
    codes = draw(st.lists(error_codes, max_size=6, unique=True))
    pages = []
    while codes:
        take = draw(st.integers(1, len(codes)))
        pages.append(ErrorPage(codes=tuple(codes[:take]), body=draw(error_bodies)))
        codes = codes[take:]
    return tuple(pages)


basic_auths = st.builds(
    lambda realm, users: BasicAuth(
        realm=realm,
        users=tuple(BasicAuthUser(name=n, password_hash=h) for n, h in users.items()),
    ),
    matching(v.AUTH_REALM),
    st.dictionaries(matching(v.AUTH_USER), _HASHES, min_size=1, max_size=3),
)


@functools.cache
def client_networks(rule: v.TextRule) -> st.SearchStrategy[tuple[str, ...]]:
    """Addresses and networks of both families, as nginx's allow and realip take them."""
    ipv4 = st.ip_addresses(v=4).map(str)
    ipv6 = st.ip_addresses(v=6).map(str)
    networks = st.builds(
        lambda address, bits: str(ipaddress.ip_network(f"{address}/{bits}", strict=False)),
        st.ip_addresses(v=4),
        st.integers(1, 32),
    ) | st.builds(
        lambda address, bits: str(ipaddress.ip_network(f"{address}/{bits}", strict=False)),
        st.ip_addresses(v=6),
        st.integers(1, 128),
    )
    item = (ipv4 | ipv6 | networks).filter(lambda n: rule.reason(n) is None)
    return st.lists(item, max_size=3).map(tuple)


@st.composite
def sites(draw: st.DrawFn, name: str, upstream_names: list[str]) -> Site:
    listeners = draw(
        st.lists(
            st.builds(
                Listener,
                port=ports,
                tls=st.booleans(),
                http2=st.booleans(),
                address=listen_addresses,
                default_server=st.booleans(),
                proxy_protocol=st.booleans(),
                public_port=st.none() | ports,
            ),
            min_size=1,
            max_size=3,
            unique_by=lambda lst: lst.bind,
        )
    )
    tls = None
    if any(lst.tls for lst in listeners):
        acme = draw(st.booleans())
        redirect_http = draw(st.booleans())
        # Client certificates need every plain listener to be the redirect's (see Site).
        checkable = redirect_http or all(lst.tls for lst in listeners)
        client_ca = draw(st.none() | st.just(_CA_PEM)) if checkable else None
        tls = TLSConfig(
            certificate=None if acme else draw(names),
            acme=acme,
            redirect_http=redirect_http,
            hsts=draw(st.booleans()),
            protocols=draw(tls_protocols),
            client_ca=client_ca,
            client_verify=draw(st.sampled_from(["required", "optional"]))
            if client_ca
            else "required",
            client_crl=draw(st.none() | st.just(_CRL_PEM)) if client_ca else None,
        )
        if tls.redirect_http:  # the redirect cannot live on an h2c-only port (see Site)
            listeners = [lst if lst.tls else attrs.evolve(lst, http2=False) for lst in listeners]
    real_ip_from = draw(client_networks(v.TRUSTED_PROXY))
    allow = draw(client_networks(v.ALLOWED_CLIENT))
    basic_auth = draw(st.none() | basic_auths)
    pages = draw(error_page_lists())
    return Site(
        name=name,
        error_pages=pages,
        intercept_upstream_errors=bool(pages) and draw(st.booleans()),
        allow=allow,
        basic_auth=basic_auth,
        satisfy=draw(st.sampled_from(["all", "any"])) if allow and basic_auth else "all",
        rate_limit=draw(st.none() | rate_limits),
        gzip=draw(st.booleans()),
        real_ip_from=real_ip_from,
        real_ip_header=draw(
            st.sampled_from(
                ["X-Forwarded-For", "X-Real-IP"]
                + (["proxy_protocol"] if any(lst.proxy_protocol for lst in listeners) else [])
            )
        )
        if real_ip_from
        else "X-Forwarded-For",
        server_names=tuple(draw(st.lists(matching(v.SERVER_NAME), min_size=1, max_size=3))),
        listeners=tuple(listeners),
        tls=tls,
        locations=tuple(
            # `satisfy: any` needs both rules, the location's own or the site's.
            loc
            if loc.satisfy == "all" or ((loc.allow or allow) and (loc.basic_auth or basic_auth))
            else attrs.evolve(loc, satisfy="all")
            for loc in draw(
                st.lists(
                    locations(upstream_names),
                    min_size=1,
                    max_size=5,
                    # `/a/` and `^~ /a/` are one location to nginx
                    unique_by=lambda loc: (loc.match.replace("_priority", ""), loc.path),
                ).filter(
                    # the error pages' URI prefix is the renderer's (see ErrorPage)
                    lambda locs: (
                        not pages or not any(loc.path.startswith(ERROR_PAGE_PREFIX) for loc in locs)
                    )
                )
            )
        ),
        headers=draw(headers),
        access_log=draw(st.booleans()),
        client_max_body_size=draw(matching(v.SIZE)),
    )


# Certificates do not matter to the renderer, which copies them: a fixed CA suffices.
_PKI = Pki()
_CA_PEM = _PKI.root.pem


_CRL_PEM = _PKI.crl(_PKI.root)
upstream_tls = st.one_of(
    st.builds(
        UpstreamTLS,
        server_name=matching(v.TLS_SERVER_NAME),
        ca=st.none() | st.just(_CA_PEM),
        host=st.sampled_from(["server_name", "client"]),
    ),
    st.builds(
        UpstreamTLS, server_name=st.none() | matching(v.TLS_SERVER_NAME), verify=st.just(False)
    ),
)


@st.composite
def upstreams(draw: st.DrawFn, name: str) -> Upstream:
    lb: Any = draw(st.sampled_from(["round_robin", "least_conn", "ip_hash", "random"]))
    backups = lb in ("round_robin", "least_conn")
    servers = [
        UpstreamServer(
            address=draw(upstream_addresses),
            weight=draw(st.integers(1, 1000)),
            max_fails=draw(st.integers(0, 1000)),
            fail_timeout=draw(st.integers(0, 86400)),
            # The first server is never a backup: one must take traffic.
            backup=i > 0 and backups and draw(st.booleans()),
        )
        for i in range(draw(st.integers(1, 3)))
    ]
    return Upstream(
        name=name,
        servers=tuple(servers),
        lb_method=lb,
        keepalive=draw(st.integers(0, 10000)),
        tls=draw(st.none() | upstream_tls),
    )


@st.composite
def stream_tls(draw: st.DrawFn) -> StreamTLS:
    client_ca = draw(st.none() | st.just(_CA_PEM))
    return StreamTLS(
        certificate=draw(names),
        protocols=draw(tls_protocols),
        client_ca=client_ca,
        client_crl=draw(st.none() | st.just(_CRL_PEM)) if client_ca else None,
    )


# Names a ``map`` would read as its own keywords, which the renderer must escape.
MAP_KEYWORDS = ("default", "hostnames", "include", "volatile")


@st.composite
def sni_routes(draw: st.DrawFn, usable: list[str]) -> tuple[SniRoute, ...]:
    """One to three routes to `usable` upstreams; no name twice, whatever its case."""
    name = matching(v.SNI_NAME) | st.sampled_from(MAP_KEYWORDS)
    every = draw(
        st.lists(name, min_size=1, max_size=6, unique=True).filter(
            lambda names: all(v.SNI_NAME.reason(n) is None for n in names)
        )
    )
    cuts = (
        sorted(draw(st.sets(st.integers(1, len(every) - 1), max_size=2))) if len(every) > 1 else []
    )
    groups = [every[a:b] for a, b in zip([0, *cuts], [*cuts, len(every)], strict=True)]
    return tuple(
        SniRoute(server_names=tuple(group), upstream=draw(st.sampled_from(usable)))
        for group in groups
    )


@st.composite
def streams(draw: st.DrawFn, name: str, upstreams: tuple[Upstream, ...]) -> Stream | None:
    """A stream naming one of `upstreams` it can use (`stream_upstream_reason`); None
    when none of them serves its protocol."""
    udp = draw(st.booleans())
    tls = None if udp else draw(st.none() | stream_tls())
    routed = not udp and tls is None and draw(st.booleans())
    # Routes pass TLS through: the probe with one finds the upstreams that allow it.
    route = (SniRoute(server_names=("x.test",), upstream="x"),) if routed else ()
    probe = Stream(
        name=name, port=1, upstream="x", protocol="udp" if udp else "tcp", sni_routes=route
    )
    usable = [u.name for u in upstreams if stream_upstream_reason(probe, u) is None]
    if not usable:
        return None
    return Stream(
        name=name,
        port=draw(ports),
        upstream=draw(st.sampled_from(usable)),
        sni_routes=draw(sni_routes(usable)) if routed else (),
        protocol="udp" if udp else "tcp",
        address=draw(listen_addresses),
        allow=draw(client_networks(v.ALLOWED_CLIENT)),
        connect_timeout=draw(st.integers(1, 600)),
        timeout=draw(st.integers(1, 86400)),
        proxy_protocol=not udp and draw(st.booleans()),
        udp_responses=draw(st.none() | st.integers(1, 1000)) if udp else None,
        tls=tls,
        max_connections_per_client=draw(st.none() | st.integers(1, 100_000)),
        proxy_protocol_from=() if udp else draw(client_networks(v.TRUSTED_PROXY)),
    )  # fmt: skip


@st.composite
def states(draw: st.DrawFn) -> DesiredState:
    upstream_names = draw(st.lists(names, min_size=1, max_size=3, unique=True))
    site_names = draw(st.lists(names, min_size=1, max_size=3, unique=True))
    stream_names = draw(st.lists(names, max_size=2, unique=True))
    drawn = tuple(draw(upstreams(n)) for n in upstream_names)
    return DesiredState(
        upstreams=drawn,
        sites=tuple(draw(sites(n, upstream_names)) for n in site_names),
        streams=tuple(x for n in stream_names if (x := draw(streams(n, drawn))) is not None),
        workspace=draw(names),
    )


# ---------------------------------------------------------------------------------------
# What the structure must be
# ---------------------------------------------------------------------------------------


def nginx_value(arg: str) -> str:
    """What nginx makes of a parsed argument: crossplane already turned ``\\"`` into ``"``
    but leaves ``\\\\``; nginx also unescapes that, and the dollar variable expands to '$'."""
    return arg.replace("\\\\", "\\").replace("${" + DOLLAR_VARIABLE + "}", "$")


@functools.cache
def _renderer() -> NginxRenderer:
    """One renderer for every example: it compiles its templates once."""
    return NginxRenderer(settings=RenderSettings(status_port=None))


def parsed_bundle(state: DesiredState, *, main_only: bool = False) -> dict[str, list[Directive]]:
    """Bundle path → its directives; `main_only`: nginx.conf alone, includes not followed."""
    bundle = _renderer().render(state)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_bundle(bundle, root)
        result = crossplane.parse(str(root / "nginx.conf"), comments=False, single=main_only)
        assert result["status"] == "ok", result["errors"]
        return {str(Path(c["file"]).relative_to(root)): c["parsed"] for c in result["config"]}


# Blocks whose entries are data (map/geo values, MIME types), not directives.
_DATA_BLOCKS = frozenset({"map", "geo", "types"})


def walk(block: list[Directive]) -> list[Directive]:
    """Every directive in `block` and its sub-blocks, except the entries of data blocks."""
    found = []
    for d in block:
        found.append(d)
        if d["directive"] not in _DATA_BLOCKS:
            found.extend(walk(d.get("block", [])))
    return found


def values(directive: Directive) -> list[str]:
    return [nginx_value(a) for a in directive["args"]]


def parsed_value(value: str) -> str:
    """A value as crossplane returns it: renderer tokens like ``""`` lose their quotes."""
    if isinstance(value, Token) and value.startswith('"'):
        return value[1:-1]
    return value


def header_args(h: Any) -> list[str]:
    return [h.name, parsed_value(h.value), *(["always"] if h.always else [])]


def upstream_tls_lines(tls: UpstreamTLS, ca_file: str | None) -> list[tuple[str, list[str]]]:
    """What a location proxying to a TLS upstream adds after ``proxy_pass``."""
    lines = [("proxy_ssl_protocols", ["TLSv1.2", "TLSv1.3"])]
    if tls.server_name is not None:
        lines += [("proxy_ssl_server_name", ["on"]), ("proxy_ssl_name", [tls.server_name])]
    if tls.verify:
        trusted = ca_file or RenderSettings().upstream_ca_file
        lines += [
            ("proxy_ssl_verify", ["on"]),
            ("proxy_ssl_verify_depth", ["4"]),
            ("proxy_ssl_trusted_certificate", [trusted]),
        ]
    return lines


def expected_location(
    site: Site, view: Any, upstreams: Mapping[str, Upstream]
) -> tuple[list[str], list[str], list[list[str]]]:
    """(location args, directive names in order, argument lists in order) of one block."""
    loc = view.location
    modifier = {
        "prefix": [],
        "prefix_priority": ["^~"],
        "exact": ["="],
        "regex": ["~"],
        "regex_ci": ["~*"],
    }[loc.match]
    lines: list[tuple[str, list[str]]] = []
    if loc.client_max_body_size is not None:
        lines.append(("client_max_body_size", [loc.client_max_body_size]))
    lines += access_lines(loc.allow)
    if loc.satisfy != "all":
        lines.append(("satisfy", [loc.satisfy]))
    elif site.satisfy != "all" and loc.allow:
        lines.append(("satisfy", ["all"]))
    if loc.basic_auth is not None:
        lines += auth_lines(loc.basic_auth, view.auth_file)
    if loc.rate_limit is not None:
        lines += rate_lines(loc.rate_limit, zone_name(site, view_index(site, loc)))
    elif site.rate_limit is not None and loc.actions[0] in ("upstream", "root", "fastcgi"):
        # The site's limit, per location: a server-level one would also count nginx's
        # internal requests for error pages.
        lines += rate_lines(site.rate_limit, zone_name(site))
    lines += [("add_header", header_args(h)) for h in view.headers]
    lines += location_page_lines(site, loc)
    if loc.upstream is not None:
        uri = "/" if loc.strip_prefix else ""
        # From the state, not the view: the view is what is under test.
        tls = upstreams[loc.upstream].tls
        scheme = "http" if tls is None else "https"
        lines.append(("proxy_pass", [f"{scheme}://{loc.upstream}{uri}"]))
        own = {h.name.lower() for h in loc.proxy_headers}
        sent = {h.name: h.value for h in view.proxy_headers}
        # Every forwarding header is nginx's; a caching location also clears what would
        # make an answer depend on more than its key.
        forwarded = {"X-Forwarded-Host": "$host", "X-Forwarded-Port": "$nxmesh_public_port"}
        if site.tls is not None and site.tls.client_ca is not None:
            forwarded |= {
                "X-Client-Verify": "$ssl_client_verify",
                "X-Client-DN": "$ssl_client_s_dn",
            }
        else:  # a client's own claims are dropped
            forwarded |= {"X-Client-Verify": '""', "X-Client-DN": '""'}
        cleared = [
            "Forwarded",
            *CLIENT_CLAIMS,
            *(CACHE_CLEARED if loc.cache is not None else []),
        ]
        taken = loc.path.rstrip("/") if loc.strip_prefix else ""
        if "x-forwarded-prefix" in own:
            pass  # the location's own
        elif taken:  # the path nginx took off
            assert parsed_value(view_header(view, "X-Forwarded-Prefix")) == taken
        else:
            cleared.append("X-Forwarded-Prefix")
        for name, value in [*forwarded.items(), *((n, '""') for n in cleared)]:
            if name.lower() not in own:
                assert sent[name] == value, name
        if tls is not None:
            ca_file = f"upstream-ca/{loc.upstream}.pem" if tls.ca is not None else None
            lines += upstream_tls_lines(tls, ca_file)
            if "host" not in own:
                if tls.server_name is not None and tls.host == "server_name":
                    assert sent["Host"] == tls.server_name  # the name the SNI carries
                else:
                    assert sent["Host"] == "$host"
        lines += [("proxy_set_header", [h.name, parsed_value(h.value)]) for h in view.proxy_headers]
        if view.read_timeout is not None:
            lines.append(("proxy_read_timeout", [f"{view.read_timeout}s"]))
        if not loc.proxy_request_buffering:
            lines.append(("proxy_request_buffering", ["off"]))
        if loc.cache is not None:
            lines += cache_lines(loc.cache, site, view_index(site, loc))
    elif loc.root is not None:
        lines.append(("root", [loc.root]))
        if not loc.serve_dotfiles:
            lines.append(HIDDEN_FILES)
        if any(other.fastcgi is not None for other in site.locations):
            lines.append(HIDE_SCRIPTS)
        if loc.index:
            lines.append(("index", list(loc.index)))
        if loc.fallback is not None:  # the query string goes along
            lines.append(("try_files", ["$uri", "$uri/", f"{loc.fallback}$is_args$args"]))
        else:
            lines.append(("try_files", ["$uri", "$uri/", "=404"]))
    elif loc.fastcgi is not None:
        lines += fastcgi_lines(site, loc, view)
    elif loc.redirect is not None:
        lines.append(("return", [str(loc.redirect.code), loc.redirect.url]))
    else:
        assert loc.return_ is not None
        body = [loc.return_.body] if loc.return_.body else []
        if body:
            lines.append(("default_type", ["text/plain"]))
        lines.append(("return", [str(loc.return_.code), *body]))
    return [*modifier, loc.path], [n for n, _ in lines], [a for _, a in lines]


def view_header(view: Any, name: str) -> str:
    """The value of `view`'s proxy header `name` (a `Token` as the renderer wrote it)."""
    [value] = [h.value for h in view.proxy_headers if h.name == name]
    assert isinstance(value, str)
    return value


def fastcgi_lines(site: Site, loc: Location, view: Any) -> list[tuple[str, list[str]]]:
    """A FastCGI location after its common lines; checks the parameters the application
    must get from nginx, never from the client."""
    fc = loc.fastcgi
    assert fc is not None
    lines = [
        ("root", [fc.root]),
        HIDDEN_FILES,
        ("fastcgi_split_path_info", [r"^(.+?\.php)(/.*)$"]),
        ("set", ["$nxmesh_path_info", "$fastcgi_path_info"]),
        PHP_ONLY,
        NO_ARCHIVES,
    ]
    if fc.check_script:
        lines.append(("try_files", ["$fastcgi_script_name", "=404"]))
    lines += [("fastcgi_pass", [fc.upstream]), ("fastcgi_index", [fc.index])]
    sent = {p.name: p.value for p in view.fastcgi_params}
    nginx_own = {
        "SCRIPT_FILENAME": "$document_root$fastcgi_script_name",
        "PATH_INFO": "$nxmesh_path_info",
        "REMOTE_ADDR": "$remote_addr",
        "HTTP_HOST": "$host$nxmesh_host_port",
        "HTTP_X_FORWARDED_HOST": "$host",
        "HTTP_X_FORWARDED_FOR": "$remote_addr",
        "HTTP_FORWARDED": '""',
        "HTTP_PROXY": '""',
        "HTTP_X_FORWARDED_PREFIX": '""',
        "HTTP_X_CLIENT_VERIFY": '""',
        **{"HTTP_" + h.upper().replace("-", "_"): '""' for h in CLIENT_CLAIMS},
    }
    # A user name only where every request passed a password check.
    checked = (loc.basic_auth is not None or site.basic_auth is not None) and (
        loc.satisfy == "all" and (bool(loc.allow) or site.satisfy == "all")
    )
    nginx_own["REMOTE_USER"] = "$remote_user" if checked else '""'
    if site.tls is not None and site.tls.client_ca is not None:
        nginx_own["SSL_CLIENT_VERIFY"] = "$ssl_client_verify"
    else:
        assert "SSL_CLIENT_VERIFY" not in sent
    for name, value in nginx_own.items():
        assert sent[name] == value, name
    own = [(p.name, p.value) for p in fc.params]
    assert [(p.name, p.value) for p in view.fastcgi_params][len(sent) - len(own) :] == own
    assert len(sent) == len(view.fastcgi_params)  # no name twice
    lines += [
        ("fastcgi_param", [p.name, *parsed_value(p.value).split(" ")])
        if p.name == "HTTPS"
        else ("fastcgi_param", [p.name, parsed_value(p.value)])
        for p in view.fastcgi_params
    ]
    if fc.read_timeout is not None:
        lines.append(("fastcgi_read_timeout", [f"{fc.read_timeout}s"]))
    return lines


ACME_LOCATION = ["^~", "/.well-known/acme-challenge/"]

# Every static location not serving dotfiles answers 404 for a hidden path segment.
HIDDEN_FILES = ("if", ["$uri", "~", r"/\.(?!well-known(?:/|$))|^/.+/\.well-known(?:/|$)"])
HIDDEN_FILES_BLOCK = [("return", ["404"])]
# Static locations of a site with FastCGI locations never hand out a script's source;
# FastCGI locations run .php scripts only. Both answer with the same block.
HIDE_SCRIPTS = ("if", ["$uri", "~", r"\.php(?:/|$)"])
PHP_ONLY = ("if", ["$fastcgi_script_name", "!~", r"\.php$"])
NO_ARCHIVES = ("if", ["$fastcgi_script_name", "~*", r"\.ph(?:ar|tml?|p[0-9]?)/"])


def access_lines(allow: tuple[str, ...]) -> list[tuple[str, list[str]]]:
    """`allow` for each address, then `deny all` (nothing when the list is empty)."""
    return [("allow", [a]) for a in allow] + ([("deny", ["all"])] if allow else [])


GZIP_DIRECTIVES = ["gzip", "gzip_vary", "gzip_proxied", "gzip_min_length", "gzip_types"]

REAL_IP = frozenset({"set_real_ip_from", "real_ip_header", "real_ip_recursive"})
PAGE_DIRECTIVES = frozenset({"error_page", "proxy_intercept_errors", "fastcgi_intercept_errors"})


def auth_lines(auth: Any, path: str | None) -> list[tuple[str, list[str]]]:
    """`auth_basic` with the realm, `auth_basic_user_file` with the htpasswd file."""
    assert path is not None
    return [("auth_basic", [auth.realm]), ("auth_basic_user_file", [path])]


def zone_name(site: Site, location: int | None = None) -> str:
    return f"nxmesh_rl_{site.name}" + ("" if location is None else f".{location}")


def view_index(site: Site, loc: Location) -> int:
    return next(i for i, other in enumerate(site.locations) if other is loc)


def rate_lines(limit: Any, zone: str) -> list[tuple[str, list[str]]]:
    """`limit_req` with the zone (and burst, nodelay), then `limit_req_status 429`."""
    burst = [f"burst={limit.burst}", "nodelay"] if limit.burst else []
    return [("limit_req", [f"zone={zone}", *burst]), ("limit_req_status", ["429"])]


def zone_lines(site: Site) -> list[tuple[str, list[str]]]:
    """The `limit_req_zone` lines a site file starts with: the site's, then per location."""
    limits = [
        (site.rate_limit, None),
        *((loc.rate_limit, i) for i, loc in enumerate(site.locations)),
    ]
    return [
        (
            "limit_req_zone",
            [
                "$nxmesh_rate_key",
                f"zone={zone_name(site, i)}:2m",
                f"rate={limit.rate}{'r/s' if limit.per == 'second' else 'r/m'}",
            ],
        )
        for limit, i in limits
        if limit is not None
    ]


def htpasswd_expected(site: Site) -> dict[str, str]:
    """The htpasswd files of `site`, as nginx reads them: ``user:hash`` lines."""
    view = site_view(site)
    pairs = [(site.basic_auth, view.auth_file)] + [
        (lv.location.basic_auth, lv.auth_file) for lv in view.locations
    ]
    return {
        path: "".join(f"{u.name}:{u.password_hash}\n" for u in auth.users)
        for auth, path in pairs
        if auth is not None and path is not None
    }


def real_ip_lines(site: Site) -> list[tuple[str, list[str]]]:
    if not site.real_ip_from:
        return []
    trusted = [("set_real_ip_from", [n]) for n in site.real_ip_from]
    return [*trusted, ("real_ip_header", [site.real_ip_header]), ("real_ip_recursive", ["on"])]


def check_acme_location(block: Directive) -> None:
    """The HTTP-01 location of an ACME site: token files only, never redirected, open to
    the CA whatever the site's `allow` says."""
    assert values(block) == ACME_LOCATION
    names = [d["directive"] for d in block["block"]]
    assert names == ["default_type", "alias", "autoindex", "allow", "auth_basic", "access_log"]
    assert values(block["block"][3]) == ["all"]
    assert values(block["block"][4]) == ["off"]


def error_page_lines(site: Site) -> list[tuple[str, list[str]]]:
    """One ``error_page`` per page: its codes, then its URI; and the intercept switch."""
    lines = [
        ("error_page", [*map(str, page.codes), f"{ERROR_PAGE_PREFIX}{n}.html"])
        for n, page in enumerate(site.error_pages)
    ]
    if site.intercept_upstream_errors:
        lines += [("proxy_intercept_errors", ["on"]), ("fastcgi_intercept_errors", ["on"])]
    return lines


def own_error_pages(site: Site, loc: Location) -> bool:
    """Whether `loc` gets page locations of its own: it has headers nginx would not add
    to a page served from the site's."""
    return bool(site.error_pages and loc.headers)


def check_error_page_location(
    site: Site, block: Directive, prefix: str = ERROR_PAGE_PREFIX, headers: Any = ()
) -> None:
    """A pages' location: internal, the site's page directory, open to every client
    (the page of a refusal goes to the refused), with `headers` (parsed ``add_header``
    directives of its location)."""
    assert values(block) == ["^~", prefix]
    assert [(d["directive"], values(d)) for d in block["block"]] == [
        ("internal", []),
        ("alias", [f"current/error-pages/{site.name}/"]),
        ("charset", ["utf-8"]),
        ("allow", ["all"]),
        ("auth_basic", ["off"]),
        *(("add_header", values(h)) for h in headers),
    ]


def location_page_lines(site: Site, loc: Location) -> list[tuple[str, list[str]]]:
    """A location with its own page locations names them in its own ``error_page`` lines."""
    if not own_error_pages(site, loc):
        return []
    prefix = f"{ERROR_PAGE_PREFIX}{view_index(site, loc)}/"
    return [
        ("error_page", [*map(str, page.codes), f"{prefix}{n}.html"])
        for n, page in enumerate(site.error_pages)
    ]


def checked_sockets(state: DesiredState) -> set[tuple[str, int]]:
    """The TLS sockets where some site of `state` checks client certificates."""
    return {
        lst.bind
        for site in state.sites
        if site.tls is not None and site.tls.client_ca
        for lst in site.listeners
        if lst.tls
    }


def check_site(site: Site, parsed: list[Directive], state: DesiredState) -> None:
    upstreams = {up.name: up for up in state.upstreams}
    view = site_view(site, upstreams)
    acme = site.tls is not None and site.tls.acme
    zones = zone_lines(site)
    assert [(d["directive"], values(d)) for d in parsed[: len(zones)]] == zones
    parsed = parsed[len(zones) :]
    assert [d["directive"] for d in parsed] == ["server"] * (2 if view.redirect_listens else 1)
    if view.redirect_listens:
        redirect = parsed[0]["block"]
        names = [d["directive"] for d in redirect]
        assert Counter(names) == Counter(
            ["listen"] * len(view.redirect_listens)
            + [name for name, _ in real_ip_lines(site)]
            + ["server_name", "location"]
            + ([] if site.access_log else ["access_log"])
            + (["location"] if acme else [])
        )
        real_ip = [(d["directive"], values(d)) for d in redirect if d["directive"] in REAL_IP]
        assert real_ip == real_ip_lines(site)  # the redirect's log names the client too
        redirect_locations = [d for d in redirect if d["directive"] == "location"]
        if acme:
            check_acme_location(redirect_locations.pop(0))
        (location,) = redirect_locations
        assert location["args"] == ["/"]
        # Clients are sent to the port they reach HTTPS on: its public port if it has one.
        reached = [
            lst.port if lst.public_port is None else lst.public_port
            for lst in site.listeners
            if lst.tls
        ]
        port = "" if 443 in reached else f":{reached[0]}"
        target = f"https://$host{port}$request_uri"
        assert [values(d) for d in location["block"]] == [["308", target]]
    main = parsed[-1]["block"]
    names = [d["directive"] for d in main]
    site_auth = [("satisfy", [site.satisfy])] if site.satisfy != "all" else []
    if site.basic_auth:
        site_auth += auth_lines(site.basic_auth, view.auth_file)
    tls = ["ssl_certificate", "ssl_certificate_key", "ssl_protocols"] if site.tls else []
    client_certs = site.tls is not None and site.tls.client_ca is not None
    if client_certs:
        tls += ["ssl_client_certificate", "ssl_verify_client", "ssl_verify_depth"]
        tls += ["ssl_crl"] if site.tls is not None and site.tls.client_crl else []
        # Not the default server of all its TLS sockets: a handshake without SNI was
        # another server's, and so was its certificate check.
        require_sni = not all(lst.default_server for lst in site.listeners if lst.tls)
        tls += ["if"] if require_sni else []
    # A listener of this server reached on another port: nginx's redirects go relative.
    serves_plain = site.tls is None or not site.tls.redirect_http
    mapped = any(
        lst.public_port not in (None, lst.port) for lst in site.listeners if lst.tls or serves_plain
    )
    # On a socket where any site checks client certificates, no TLS session is resumed.
    checked = checked_sockets(state)
    if site.tls and any(lst.bind in checked for lst in site.listeners if lst.tls):
        tls += ["ssl_session_cache"]
    assert names == (
        ["listen"] * len(view.main_listens)
        + ["server_name"]
        + tls
        + ["client_max_body_size"]
        + (["absolute_redirect"] if mapped else [])
        + [name for name, _ in real_ip_lines(site) + access_lines(site.allow) + site_auth]
        + (GZIP_DIRECTIVES if site.gzip else [])
        + ([] if site.access_log else ["access_log"])
        + ["add_header"] * len(view.headers)
        + [name for name, _ in error_page_lines(site)]
        + (["location"] if acme and not view.redirect_listens else [])
        + (["location"] if site.error_pages else [])
        + ["location"] * sum(own_error_pages(site, loc) for loc in site.locations)
        + ["location"] * len(site.locations)
    )
    by_name = {n: [values(d) for d in main if d["directive"] == n] for n in set(names)}
    assert by_name["listen"] == [a.split(" ") for a in view.main_listens]
    assert by_name["server_name"] == [list(site.server_names)]
    assert by_name["client_max_body_size"] == [[site.client_max_body_size]]
    assert by_name.get("absolute_redirect", []) == ([["off"]] if mapped else [])
    if site.tls:
        assert by_name["ssl_protocols"] == [list(site.tls.protocols)]
    if client_certs:
        assert site.tls is not None
        assert by_name["ssl_client_certificate"] == [[f"client-ca/{site.name}.pem"]]
        verify = "on" if site.tls.client_verify == "required" else "optional"
        assert by_name["ssl_verify_client"] == [[verify]]
        assert by_name["ssl_verify_depth"] == [["4"]]
        crl = [[f"client-ca/{site.name}.crl"]] if site.tls.client_crl else []
        assert by_name.get("ssl_crl", []) == crl
        if require_sni:
            [rule] = [d for d in main if d["directive"] == "if"]
            assert rule["args"] == ["$nxmesh_sni_mismatch"]
            assert [(d["directive"], d["args"]) for d in rule["block"]] == [("return", ["421"])]
    assert by_name.get("add_header", []) == [header_args(h) for h in view.headers]
    access = {
        *REAL_IP,
        "allow",
        "deny",
        "auth_basic",
        "auth_basic_user_file",
        "limit_req",
        "limit_req_status",
        "satisfy",
    }
    assert [(d["directive"], values(d)) for d in main if d["directive"] in access] == (
        real_ip_lines(site) + access_lines(site.allow) + site_auth
    )
    pages = [(d["directive"], values(d)) for d in main if d["directive"] in PAGE_DIRECTIVES]
    assert pages == error_page_lines(site)
    blocks = [d for d in main if d["directive"] == "location"]
    if acme and not view.redirect_listens:
        check_acme_location(blocks.pop(0))
    if site.error_pages:
        check_error_page_location(site, blocks.pop(0))
    # A location with headers of its own has a page location repeating its headers, as
    # its own block writes them.
    own_pages = [i for i, loc in enumerate(site.locations) if own_error_pages(site, loc)]
    page_blocks = [blocks.pop(0) for _ in own_pages]
    for i, page_block in zip(own_pages, page_blocks, strict=True):
        headers = [d for d in blocks[i]["block"] if d["directive"] == "add_header"]
        check_error_page_location(site, page_block, f"{ERROR_PAGE_PREFIX}{i}/", headers)
    for index, block in enumerate(blocks):
        for d in block["block"]:
            if d["directive"] == "proxy_cache_key":
                shape = CACHE_KEY_SHAPE.fullmatch(d["args"][0])
                assert shape is not None, d["args"]
                assert shape.group(1) == site.name
                # A site checking client certificates keeps each client's answers apart.
                assert (shape.group(2) is not None) is client_certs
                CACHE_KEYS[(site.name, index)] = d["args"][0]
    for block, location_view in zip(blocks, view.locations, strict=True):
        loc_args, loc_names, loc_values = expected_location(site, location_view, upstreams)
        assert values(block) == loc_args
        assert [d["directive"] for d in block["block"]] == loc_names
        assert [values(d) for d in block["block"]] == loc_values
        for rule in (d for d in block["block"] if d["directive"] == "if"):
            assert [(d["directive"], values(d)) for d in rule["block"]] == HIDDEN_FILES_BLOCK


def check_upstreams(state: DesiredState, parsed: list[Directive]) -> None:
    ordered = sorted(state.upstreams, key=lambda u: u.name)
    assert [(d["directive"], d["args"]) for d in parsed] == [
        ("upstream", [u.name]) for u in ordered
    ]
    for block, upstream in zip(parsed, ordered, strict=True):
        expected = upstream_lines(upstream)
        if upstream.keepalive:
            expected.append(("keepalive", [str(upstream.keepalive)]))
        assert [(d["directive"], values(d)) for d in block["block"]] == expected


def upstream_lines(upstream: Upstream) -> list[tuple[str, list[str]]]:
    """The balancing method and server lines of an upstream, in http {} and stream {}."""
    lines: list[tuple[str, list[str]]] = []
    if upstream.lb_method != "round_robin":
        lines.append((upstream.lb_method, []))
    lines += [
        (
            "server",
            [
                s.address,
                f"weight={s.weight}",
                f"max_fails={s.max_fails}",
                f"fail_timeout={s.fail_timeout}s",
                *(["backup"] if s.backup else []),
            ],
        )
        for s in upstream.servers
    ]
    return lines


MOZILLA_INTERMEDIATE = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384"
)


def stream_listens(stream: Stream) -> list[list[str]]:
    """``listen`` arguments as the test renderer writes them (no `listen_ipv6` nor
    `listen_address`): the stream's own socket, ``udp reuseport`` for UDP."""
    address = stream.address
    if address is None:
        where = str(stream.port)
    elif address == "*":
        where = f"*:{stream.port}"
    else:
        ip = ipaddress.ip_address(address)
        where = f"[{ip.compressed}]:{stream.port}" if ip.version == 6 else f"{ip}:{stream.port}"
    options = ["udp", "reuseport"] if stream.protocol == "udp" else []
    if stream.tls is not None:
        options = ["ssl"]
    return [[where, *options, *(["proxy_protocol"] if stream.proxy_protocol_from else [])]]


def check_streams(state: DesiredState, parsed: list[Directive]) -> None:
    """streams.conf: the log, the upstreams the streams name (sorted, without keepalive),
    then one server per stream in the state's order, with exactly its directives."""
    log_format, access_log, *rest = parsed
    assert (log_format["directive"], log_format["args"][0]) == ("log_format", "nxmesh_stream")
    assert (access_log["directive"], access_log["args"]) == (
        "access_log",
        ["logs/stream.log", "nxmesh_stream"],
    )
    route_names = [n for s in state.streams for r in s.sni_routes for n in r.server_names]
    if (size := bucket_size(route_names)) is not None:  # before any map of the block
        bucket, *rest = rest
        assert (bucket["directive"], bucket["args"]) == ("map_hash_bucket_size", [size])
    if any(stream.max_connections_per_client for stream in state.streams):
        client_map, zone, level, *rest = rest
        assert (client_map["directive"], client_map["args"]) == (
            "map",
            ["$binary_remote_addr", "$nxmesh_stream_client"],
        )
        assert [(d["directive"], d["args"]) for d in (zone, level)] == [
            (
                "limit_conn_zone",
                ["$nxmesh_stream_client$protocol$server_port", "zone=nxmesh_stream_conn:10m"],
            ),
            ("limit_conn_log_level", ["warn"]),
        ]
    if any(stream.tls is not None for stream in state.streams):
        defaults, rest = rest[:6], rest[6:]
        assert [(d["directive"], d["args"][:1]) for d in defaults] == [
            ("ssl_protocols", ["TLSv1.2"]),
            ("ssl_ciphers", [MOZILLA_INTERMEDIATE]),
            ("ssl_prefer_server_ciphers", ["off"]),
            ("ssl_session_cache", ["shared:nxmesh_stream_tls:10m"]),
            ("ssl_session_timeout", ["1d"]),
            ("ssl_session_tickets", ["off"]),
        ]
    by_name = {u.name: u for u in state.upstreams}
    # The routes' upstreams too, each once.
    named = sorted(
        {stream.upstream for stream in state.streams}
        | {route.upstream for stream in state.streams for route in stream.sni_routes}
    )
    blocks, rest = rest[: len(named)], rest[len(named) :]
    assert [(d["directive"], d["args"]) for d in blocks] == [("upstream", [n]) for n in named]
    for block, name in zip(blocks, named, strict=True):
        assert [(d["directive"], values(d)) for d in block["block"]] == upstream_lines(
            by_name[name]
        )
    # A stream routing by SNI: its map first, from the name the handshake asks for.
    assert [d["directive"] for d in rest] == [
        kind for stream in state.streams for kind in ["map"] * bool(stream.sni_routes) + ["server"]
    ]
    servers = [d for d in rest if d["directive"] == "server"]
    maps = iter(d for d in rest if d["directive"] == "map")
    for n, (server, stream) in enumerate(zip(servers, state.streams, strict=True)):
        variable = f"$nxmesh_sni_{n}"
        if stream.sni_routes:
            sni_map = next(maps)
            assert sni_map["args"] == ["$ssl_preread_server_name", variable]
            assert [(d["directive"], values(d)) for d in sni_map["block"]] == [
                ("hostnames", []),
                *(
                    ("\\" + name if name in MAP_KEYWORDS else name, [route.upstream])
                    for route in stream.sni_routes
                    for name in route.server_names
                ),
                ("default", [stream.upstream]),
            ]
        expected = [("listen", args) for args in stream_listens(stream)]
        if stream.tls is not None:
            stem = f"certs/{stream.tls.certificate}"
            expected += [
                ("ssl_certificate", [f"{stem}.crt"]),
                ("ssl_certificate_key", [f"{stem}.key"]),
                ("ssl_protocols", list(stream.tls.protocols)),
            ]
            if stream.tls.client_ca is not None:
                ca = f"client-ca/streams/{stream.name}"
                expected += [
                    ("ssl_client_certificate", [f"{ca}.pem"]),
                    ("ssl_verify_client", ["on"]),
                    ("ssl_verify_depth", ["4"]),
                    *([("ssl_crl", [f"{ca}.crl"])] if stream.tls.client_crl else []),
                    ("ssl_session_cache", ["off"]),
                ]
        expected += [("set_real_ip_from", [n]) for n in stream.proxy_protocol_from]
        expected += access_lines(stream.allow)
        if stream.max_connections_per_client is not None:
            expected.append(
                ("limit_conn", ["nxmesh_stream_conn", str(stream.max_connections_per_client)])
            )
        if stream.sni_routes:
            expected.append(("ssl_preread", ["on"]))
        expected.append(("proxy_pass", [variable if stream.sni_routes else stream.upstream]))
        if stream.protocol == "tcp":
            expected.append(("proxy_connect_timeout", [f"{stream.connect_timeout}s"]))
        expected.append(("proxy_timeout", [f"{stream.timeout}s"]))
        if stream.proxy_protocol:
            expected.append(("proxy_protocol", ["on"]))
        if (tls := by_name[stream.upstream].tls) is not None:
            ca_file = f"upstream-ca/{stream.upstream}.pem" if tls.ca is not None else None
            expected += [("proxy_ssl", ["on"]), *upstream_tls_lines(tls, ca_file)]
        if stream.udp_responses is not None:
            expected.append(("proxy_responses", [str(stream.udp_responses)]))
        assert [(d["directive"], values(d)) for d in server["block"]] == expected


def check_unknown_hosts(state: DesiredState, parsed: list[Directive]) -> None:
    """One refusing default server per socket the sites use (their redirect servers'
    included) where none of them is the default server; TLS sockets refuse handshakes."""
    protocols: dict[tuple[str, int], list[str] | None] = {}
    defaulted: set[tuple[str, int]] = set()
    proxied: set[tuple[str, int]] = set()  # sockets reading PROXY protocol lines
    for site in state.sites:
        catch_all = "_" in site.server_names  # nginx's "any name": that site's sockets
        for lst in site.listeners:
            protocols.setdefault(lst.bind, None)
            if lst.tls and site.tls is not None:
                protocols[lst.bind] = list(site.tls.protocols)
            if lst.default_server or catch_all:
                defaulted.add(lst.bind)
            if lst.proxy_protocol:
                proxied.add(lst.bind)
        for bind in redirect_binds(site):
            protocols.setdefault(bind, None)
            if catch_all:
                defaulted.add(bind)
            if all(lst.proxy_protocol for lst in site.listeners):
                proxied.add(bind)
    expected = sorted((bind, p) for bind, p in protocols.items() if bind not in defaulted)
    # Where a site checks client certificates, the default server keeps no TLS sessions.
    checked = checked_sockets(state)
    assert [d["directive"] for d in parsed] == ["server"] * len(expected)
    for block, (bind, tls) in zip(parsed, expected, strict=True):
        listen, *rest = block["block"]
        assert listen["directive"] == "listen"
        assert listen["args"][0].endswith(f":{bind[1]}") or listen["args"][0] == str(bind[1])
        assert listen["args"][-1] == "default_server"
        assert ("ssl" in listen["args"]) is (tls is not None)
        assert ("proxy_protocol" in listen["args"]) is (bind in proxied)
        handshake = [("ssl_reject_handshake", ["on"]), ("ssl_protocols", tls)] if tls else []
        if tls and bind in checked:
            handshake.append(("ssl_session_cache", ["off"]))
        assert [(d["directive"], d["args"]) for d in rest] == [*handshake, ("return", ["444"])]


def shape(block: list[Directive]) -> list[Any]:
    return [(d["directive"], d["args"], shape(d.get("block", []))) for d in block]


class TestStructure:
    """For any state the model accepts, the bundle has exactly the implied structure."""

    @PROPERTY_SETTINGS
    @given(state=states())
    def test_bundle_structure_is_exactly_what_the_state_implies(self, state: DesiredState) -> None:
        """Sites, locations, headers and upstreams map one to one onto blocks, directives and
        arguments; every value arrives whole; nothing else appears."""
        parsed = parsed_bundle(state)
        caching = any(loc.cache is not None for s in state.sites for loc in s.locations)
        assert set(parsed) == {
            "nginx.conf",
            "mime.types",
            "conf.d/upstreams.conf",
            "conf.d/unknown-hosts.conf",
            *(f"conf.d/site-{s.name}.conf" for s in state.sites),
            *(["conf.d/proxy-cache.conf"] if caching else []),
            *(["streams.conf"] if state.streams else []),
        }
        if caching:
            [zone] = parsed["conf.d/proxy-cache.conf"]
            assert (zone["directive"], zone["args"][:3]) == (
                "proxy_cache_path",
                ["tmp/cache", "levels=1:2", "keys_zone=nxmesh_cache:10m"],
            )
        everything = [d for block in parsed.values() for d in walk(block)]
        assert {d["directive"] for d in everything} <= ALLOWED_DIRECTIVES
        defaults = {lst.bind for s in state.sites for lst in s.listeners if lst.default_server}
        CACHE_KEYS.clear()
        for site in state.sites:
            if "_" in site.server_names:  # nginx's "any name": default where none is set
                listeners = tuple(
                    attrs.evolve(lst, default_server=lst.default_server or lst.bind not in defaults)
                    for lst in site.listeners
                )
                site = attrs.evolve(site, listeners=listeners)
            check_site(site, parsed[f"conf.d/site-{site.name}.conf"], state)
        # No two caching locations share keys (the state's sites have distinct names).
        assert len(set(CACHE_KEYS.values())) == len(CACHE_KEYS)
        check_upstreams(state, parsed["conf.d/upstreams.conf"])
        check_unknown_hosts(state, parsed["conf.d/unknown-hosts.conf"])
        if state.streams:
            check_streams(state, parsed["streams.conf"])
        bundle = _renderer().render(state)
        htpasswd = {p: bundle.text(p) for p in bundle.files if p.startswith("htpasswd/")}
        assert htpasswd == {p: t for s in state.sites for p, t in htpasswd_expected(s).items()}
        pages = {p: bundle.text(p) for p in bundle.files if p.startswith("error-pages/")}
        assert pages == {
            f"error-pages/{s.name}/{n}.html": page.body
            for s in state.sites
            for n, page in enumerate(s.error_pages)
        }
        client_cas = {p: bundle.text(p) for p in bundle.files if p.startswith("client-ca/")}
        users = [(s.name, s.tls) for s in state.sites] + [
            (f"streams/{s.name}", s.tls) for s in state.streams
        ]
        assert client_cas == {
            path: text
            for name, tls in users
            if tls is not None and tls.client_ca is not None
            for path, text in [
                (f"client-ca/{name}.pem", tls.client_ca),
                *([(f"client-ca/{name}.crl", tls.client_crl)] if tls.client_crl else []),
            ]
        }
        cas = {p: bundle.text(p) for p in bundle.files if p.startswith("upstream-ca/")}
        assert cas == {
            f"upstream-ca/{up.name}.pem": up.tls.ca
            for up in state.upstreams
            if up.tls is not None and up.tls.ca is not None
        }

    @settings(PROPERTY_SETTINGS, max_examples=25)
    @given(first=states(), second=states())
    def test_main_file_shape_does_not_depend_on_the_state(
        self, first: DesiredState, second: DesiredState
    ) -> None:
        """nginx.conf has the same directives and arguments whatever the state holds, but
        for the stream block a state with streams ends with, the bucket size of a long
        server name and the public ports of the listeners behind a port mapping."""
        stream_block = ("stream", [], [("include", ["streams.conf"], [])])
        shapes = []
        for state in (first, second):
            main = _set_state_parts_aside(
                shape(parsed_bundle(state, main_only=True)["nginx.conf"]), state
            )
            if state.streams:
                assert main[-1] == stream_block
                main = main[:-1]
            assert stream_block not in main
            shapes.append(main)
        assert shapes[0] == shapes[1]


def bucket_size(names: list[str]) -> str | None:
    """The hash bucket size nginx needs for `names` where some build's default (32
    bytes) is too small: 16 bytes and the name plus 2, padded to 8; at least 64, in steps
    of 64. None: no directive."""
    longest = max((len(n) for n in names), default=0)
    need = 16 + (longest + 2 + 7) // 8 * 8
    return None if need <= 32 else str(-(-need // 64) * 64)


def _set_state_parts_aside(main: list[Any], state: DesiredState) -> list[Any]:
    """`main` (nginx.conf's shape) with the parts that depend on the state checked and
    taken out: ``server_names_hash_bucket_size`` for a name of 15 characters and more
    (a bucket holds 16 bytes and the name plus 2, padded to 8: past the 32 bytes some
    builds default to; at least 64, in steps of 64), and the
    entries of the ``$nxmesh_public_port`` map, a port's public port each (the last
    listener's, where states disagree: the model refuses those)."""
    size = bucket_size([n for site in state.sites for n in site.server_names])
    bucket = [] if size is None else [("server_names_hash_bucket_size", [size], [])]
    public = {
        lst.port: lst.public_port
        for site in state.sites
        for lst in site.listeners
        if lst.public_port not in (None, lst.port)
    }
    default = ("default", ["$server_port"], [])
    entries = [default, *((str(p), [str(q)], []) for p, q in sorted(public.items()))]
    result = []
    for name, args, block in main:
        if name == "http":
            assert [d for d in block if d[0] == "server_names_hash_bucket_size"] == bucket
            [ports] = [d for d in block if d[1] == ["$server_port", "$nxmesh_public_port"]]
            assert ports[2] == entries
            block = [
                (n, a, [default] if a == ports[1] else b)
                for n, a, b in block
                if n != "server_names_hash_bucket_size"
            ]
        result.append((name, args, block))
    return result


def _unsafe(text: str) -> bool:
    return any(ch in "\u2028\u2029" or unicodedata.category(ch).startswith("C") for ch in text)


class TestQuotingProperty:
    """The quoting filter on arbitrary text: one exact token, or a refusal."""

    @settings(max_examples=300, deadline=None)
    @given(text=st.text(max_size=40))
    def test_any_text_is_one_token_or_refused(self, text: str) -> None:
        """Text without control characters becomes exactly one argument that nginx reads back
        as the same text; text with them is refused."""
        if _unsafe(text):
            try:
                quote(text)
            except UnsafeValueError:
                return
            raise AssertionError(f"{text!r} was not refused")
        with tempfile.TemporaryDirectory() as tmp:
            conf = Path(tmp) / "t.conf"
            conf.write_text(f"add_header X {quote(text)};\nserver_tokens off;\n")
            result = crossplane.parse(
                str(conf), single=True, check_ctx=False, check_args=False, comments=False
            )
        parsed = result["config"][0]["parsed"]
        assert [d["directive"] for d in parsed] == ["add_header", "server_tokens"]
        assert [nginx_value(a) for a in parsed[0]["args"]] == ["X", text]
