"""The domain model: frozen attrs classes for desired state, agents, versions and reports.

Every field that can reach nginx syntax is checked by an anchored allow-list from
`nxmesh.core.validation`; rules that span fields of one object (a location has exactly
one action) run in ``__attrs_post_init__``, so an invalid object cannot exist. Rules that
span objects (a location names an upstream that must exist) live in `check_state`,
because states are assembled piecewise (several files, API patches) before they are
complete. `check_parts` runs the same rules over the parts of input that passed field
validation, so one pass reports field and cross-object problems together.

Sequences are tuples and mappings are `FrozenMap`, so every object is immutable and
hashable. The YAML/JSON field names are the attribute names, except ``Location.return_``
which is spelled ``return`` (see the ``key`` metadata, honoured by the converter).

A field added once versions exist carries `ADDED_FIELD`: the converter leaves it out of
the canonical JSON while it holds its default, so states written before it existed keep
their digests (and signed versions still verify).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import (
    Callable,
    ItemsView,
    Iterable,
    Iterator,
    KeysView,
    Mapping,
    Sequence,
    ValuesView,
)
from typing import Any, Final, Literal, TypeVar

import attrs

from nxmesh.core import validation as v
from nxmesh.core.errors import Problem
from nxmesh.core.hints import closest

__all__ = [
    "ADDED_FIELD",
    "ERROR_PAGE_PREFIX",
    "FASTCGI_BUILTIN_PARAMS",
    "Agent",
    "ApplyReport",
    "BasicAuth",
    "BasicAuthUser",
    "CertificateRef",
    "ConfigVersion",
    "DesiredState",
    "ErrorPage",
    "FastCGI",
    "FastCGIParam",
    "FrozenMap",
    "Header",
    "HealthReport",
    "HealthResult",
    "LabelSelector",
    "Listener",
    "Location",
    "PendingApply",
    "ProxyCache",
    "RateLimit",
    "Redirect",
    "Return",
    "Site",
    "SiteParts",
    "SniRoute",
    "StateParts",
    "Stream",
    "StreamTLS",
    "TLSConfig",
    "TlsCertificate",
    "Upstream",
    "UpstreamServer",
    "UpstreamTLS",
    "check_parts",
    "check_state",
    "redirect_binds",
    "redirect_proxy_protocol",
    "stream_http01_sites",
    "stream_problems",
    "stream_upstream_reason",
    "submission_problems",
]

K = TypeVar("K")
V = TypeVar("V")

ADDED_FIELD: Final[Mapping[str, bool]] = {"omit_default": True}
"""Field metadata: omitted from unstructured (and canonical) output at its default."""


class FrozenMap(Mapping[K, V]):
    """An immutable, hashable mapping; equal to any mapping with the same items."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[K, V] | Iterable[tuple[K, V]] = ()) -> None:
        self._data: dict[K, V] = dict(data)

    def __getitem__(self, key: K) -> V:
        return self._data[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    # The mixins' versions go through `__getitem__` item by item; the dict's own views are
    # several times faster, and every message with a mapping field walks one to validate
    # and encode it.
    def __contains__(self, key: object) -> bool:
        return key in self._data

    def keys(self) -> KeysView[K]:
        return self._data.keys()

    def items(self) -> ItemsView[K, V]:
        return self._data.items()

    def values(self) -> ValuesView[V]:
        return self._data.values()

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __repr__(self) -> str:
        return f"FrozenMap({self._data!r})"


def _freeze_str(data: Mapping[str, str]) -> FrozenMap[str, str]:
    # Idempotent, so the converter may apply it before attrs does. One converter per
    # value type: mypy's attrs plugin cannot infer a generic converter's parameters.
    return data if isinstance(data, FrozenMap) else FrozenMap(data)


def _freeze_float(data: Mapping[str, float]) -> FrozenMap[str, float]:
    return data if isinstance(data, FrozenMap) else FrozenMap(data)


def _lower_hostnames(names: Iterable[str]) -> tuple[str, ...]:
    # Only ASCII is folded: str.lower() maps e.g. the Kelvin sign to 'k', which would let a
    # non-ASCII name slip past the allow-list as a different, valid-looking name.
    return tuple(n.lower() if isinstance(n, str) and n.isascii() else n for n in names)


# ---------------------------------------------------------------------------------------
# Selectors
# ---------------------------------------------------------------------------------------


@attrs.frozen
class LabelSelector:
    """Selects agents whose labels contain every ``match_labels`` pair (empty: all)."""

    match_labels: Mapping[str, str] = attrs.field(
        factory=FrozenMap, converter=_freeze_str, validator=v.labels()
    )

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == val for k, val in self.match_labels.items())


# ---------------------------------------------------------------------------------------
# Sites
# ---------------------------------------------------------------------------------------


def _bind_address(address: str | None) -> str:
    if address is None or address == "*":
        return "*"
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:  # not an IP (the model refuses it): compare it case-insensitively
        return address.lower()
    if ip.version == 4 and ip.is_unspecified:
        return "*"
    return ip.compressed


def _socket(bind: tuple[str, int]) -> str:
    """A `Listener.bind` for messages: ``port 80`` (the IPv4 wildcard), ``10.0.0.1:80``,
    ``[::1]:80``."""
    address, port = bind
    if address == "*":
        return f"port {port}"
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _spelling(address: str | None) -> str:
    return "no address" if address is None else repr(address)


@attrs.frozen
class Listener:
    """One ``listen`` socket of a site.

    `proxy_protocol`: the socket's connections come from load balancers (AWS NLB,
    HAProxy, a cloud TCP load balancer) that open each with a PROXY protocol line; nginx
    expects one on every connection (``listen ... proxy_protocol``), so every site on
    the socket says so too. The site's ``real_ip_header: proxy_protocol`` then takes the
    client's address from the line.

    `public_port`: the port clients reach this socket on when a port mapping or load
    balancer in front forwards it to `port` (Docker's ``-p 443:8443``, a Kubernetes
    Service's ``port`` → ``targetPort``). The site's HTTPS redirect names it instead of
    `port`, and the site's server sends nginx's own redirects (``/docs`` → ``/docs/``, a
    relative `Redirect`) as relative URLs (``absolute_redirect off``), which would
    otherwise name `port`.
    """

    port: int = attrs.field(default=80, validator=v.int_range(1, 65535))
    tls: bool = attrs.field(default=False, validator=v.choice(True, False))
    http2: bool = attrs.field(default=False, validator=v.choice(True, False))
    address: str | None = attrs.field(
        default=None, validator=v.text(v.LISTEN_ADDRESS, optional=True)
    )
    default_server: bool = attrs.field(default=False, validator=v.choice(True, False))
    proxy_protocol: bool = attrs.field(
        default=False, validator=v.choice(True, False), metadata=ADDED_FIELD
    )
    public_port: int | None = attrs.field(
        default=None, validator=v.int_range(1, 65535, optional=True), metadata=ADDED_FIELD
    )

    @property
    def reached_port(self) -> int:
        """The port clients reach the socket on: `public_port`, else nginx's `port`."""
        return self.port if self.public_port is None else self.public_port

    @property
    def mapped(self) -> bool:
        """Clients reach the socket on another port than nginx listens on."""
        return self.reached_port != self.port

    @property
    def bind(self) -> tuple[str, int]:
        """``(address, port)`` as nginx binds it, one spelling per socket: the key every
        listener conflict check compares.

        No address, ``*`` and ``0.0.0.0`` are all the IPv4 wildcard (``*``); IPv6 is
        compressed (``0:0::0`` → ``::``). nginx compares sockets, so different spellings
        of one are still ``a duplicate listen``.
        """
        return (_bind_address(self.address), self.port)


def _pem_rule(
    label: str, what: str, noun: str, load: Callable[[bytes], object], *, max_len: int
) -> v.TextRule:
    """Text of nothing but PEM `label` blocks, each of which `load` parses.

    Nothing else: these values are stored in every version unencrypted, sent to every
    agent and shown in diffs, so a key or a note pasted beside them is refused (and
    never echoed)."""
    block = rf"-----BEGIN {label}-----\r?\n[A-Za-z0-9+/=\r\n]+-----END {label}-----"

    def refine(value: str) -> str | None:
        try:
            for found in re.findall(block, value):
                load(found.encode("ascii"))
        except ValueError:
            return f"must hold valid {noun}: one of its {label} blocks does not parse"
        return None

    return v.TextRule(
        what,
        re.compile(rf"\s*(?:{block}\s*)+", re.ASCII),
        max_len=max_len,
        refine=refine,
        nginx=False,
        echo=False,
    )


# cryptography is imported when a state holds PEM text, not by every process that
# imports the model (the agent's memory).
def _load_certificate(pem: bytes) -> object:
    from cryptography import x509

    return x509.load_pem_x509_certificate(pem)


def _load_crl(pem: bytes) -> object:
    from cryptography import x509

    return x509.load_pem_x509_crl(pem)


_CA_PEM = _pem_rule(
    "CERTIFICATE",
    "PEM certificates: only -----BEGIN CERTIFICATE----- blocks (no key, no other text)",
    "certificates",
    _load_certificate,
    max_len=64 * 1024,
)
_CRL_PEM = _pem_rule(
    "X509 CRL",
    "PEM certificate revocation lists: only -----BEGIN X509 CRL----- blocks",
    "CRLs",
    _load_crl,
    max_len=1024 * 1024,
)


@attrs.frozen(kw_only=True)
class TLSConfig:
    """TLS for a site: a named uploaded certificate, or ACME for its server names; and
    optionally the CAs whose client certificates it requires (`client_ca`).

    In YAML ``tls: acme`` is shorthand for ``tls: {acme: true}``.
    """

    certificate: str | None = attrs.field(default=None, validator=v.text(v.NAME, optional=True))
    acme: bool = attrs.field(default=False, validator=v.choice(True, False))
    redirect_http: bool = attrs.field(default=True, validator=v.choice(True, False))
    hsts: bool = attrs.field(default=False, validator=v.choice(True, False))
    protocols: tuple[str, ...] = attrs.field(
        default=("TLSv1.2", "TLSv1.3"),
        validator=v.each(v.TLS_PROTOCOL, lo=1, hi=2, noun="protocol"),
    )
    # Client certificates (mutual TLS): the PEM certificates of the CAs whose clients
    # are let in; `client_verify` "optional" lets clients without one in too, and tells
    # the upstream which kind each request was.
    client_ca: str | None = attrs.field(
        default=None, validator=v.text(_CA_PEM, optional=True), repr=False, metadata=ADDED_FIELD
    )
    client_verify: Literal["required", "optional"] = attrs.field(
        default="required", validator=v.choice("required", "optional"), metadata=ADDED_FIELD
    )
    # The revoked client certificates: one CRL per CA of the chains (nginx checks every
    # level once it has any).
    client_crl: str | None = attrs.field(
        default=None, validator=v.text(_CRL_PEM, optional=True), repr=False, metadata=ADDED_FIELD
    )

    def __attrs_post_init__(self) -> None:
        found: list[tuple[str, str]] = []
        if (self.certificate is None) == (not self.acme):
            found.append(("", "needs exactly one of 'certificate' (a name) or 'acme: true'"))
        if len(set(self.protocols)) != len(self.protocols):
            found.append(("protocols", "lists a protocol twice"))
        if self.client_ca is None:
            if self.client_verify != "required":
                found.append(("client_verify", "only applies with client_ca (the CAs to check)"))
            if self.client_crl is not None:
                found.append(("client_crl", "only applies with client_ca (the CAs to check)"))
        v.raise_problems(found)


@attrs.frozen
class Header:
    """A response (``add_header``) or upstream request (``proxy_set_header``) header."""

    name: str = attrs.field(validator=v.text(v.HEADER_NAME))
    value: str = attrs.field(validator=v.text(v.HEADER_VALUE))
    always: bool = attrs.field(default=False, validator=v.choice(True, False))


@attrs.frozen(kw_only=True)
class BasicAuthUser:
    """One line of an htpasswd file: a user and the hash of their password."""

    name: str = attrs.field(validator=v.text(v.AUTH_USER))
    # Never the password: a crypt(3) hash (see `validation.PASSWORD_HASH`). Kept out of
    # reprs and of validation messages all the same.
    password_hash: str = attrs.field(validator=v.text(v.PASSWORD_HASH), repr=False)


@attrs.frozen(kw_only=True)
class BasicAuth:
    """HTTP basic authentication (``auth_basic``): a login prompt titled `realm` that
    admits `users`."""

    realm: str = attrs.field(default="Restricted", validator=v.text(v.AUTH_REALM))
    users: tuple[BasicAuthUser, ...] = attrs.field(
        validator=v.count(BasicAuthUser, lo=1, hi=1000, noun="user")
    )

    def __attrs_post_init__(self) -> None:
        seen: dict[str, int] = {}
        found = [
            (f"users[{i}].name", f"repeats users[{seen[user.name]}]")
            for i, user in enumerate(self.users)
            if seen.setdefault(user.name, i) != i
        ]
        v.raise_problems(found)


@attrs.frozen(kw_only=True)
class RateLimit:
    """Requests per client address (``limit_req``): `rate` per second or minute, and up
    to `burst` more at once before the client gets 429 Too Many Requests."""

    rate: int = attrs.field(validator=v.int_range(1, 100_000))
    per: Literal["second", "minute"] = attrs.field(
        default="second", validator=v.choice("second", "minute")
    )
    burst: int = attrs.field(default=0, validator=v.int_range(0, 100_000))


@attrs.frozen(kw_only=True)
class ProxyCache:
    """Keep the upstream's answers and serve them again (``proxy_cache``): 200, 301 and
    302 answers for `valid` seconds, unless the upstream says otherwise (``Cache-Control``,
    ``Expires``; ``private``, ``no-store`` and answers setting cookies are not kept).

    Requests with ``Authorization`` always go to the upstream and their answers are not
    kept (a shared cache must not hand one user's answer to another); requests with
    cookies too, unless `with_cookies`. `serve_stale`: when the upstream fails (error,
    timeout, 500, 502, 503, 504), the last answer kept is served instead, and an expired
    one is served while a single request refreshes it in the background.
    """

    valid: int = attrs.field(validator=v.int_range(1, 31_536_000))
    with_cookies: bool = attrs.field(default=False, validator=v.choice(True, False))
    serve_stale: bool = attrs.field(default=True, validator=v.choice(True, False))


@attrs.frozen
class Redirect:
    """Answer with a redirect to `url`."""

    code: int = attrs.field(validator=v.choice(301, 302, 303, 307, 308))
    url: str = attrs.field(validator=v.text(v.REDIRECT_URL))


# What nginx and the application need on every request (`FastCGI`); a location's own
# `params` may not replace them. HTTP_* names are the client's request headers.
FASTCGI_BUILTIN_PARAMS: Final = frozenset(
    {
        "QUERY_STRING",
        "REQUEST_METHOD",
        "CONTENT_TYPE",
        "CONTENT_LENGTH",
        "SCRIPT_NAME",
        "SCRIPT_FILENAME",
        "PATH_INFO",
        "REQUEST_URI",
        "DOCUMENT_URI",
        "DOCUMENT_ROOT",
        "SERVER_PROTOCOL",
        "REQUEST_SCHEME",
        "HTTPS",
        "GATEWAY_INTERFACE",
        "SERVER_SOFTWARE",
        "REMOTE_ADDR",
        "REMOTE_PORT",
        "REMOTE_USER",
        "SERVER_ADDR",
        "SERVER_PORT",
        "SERVER_NAME",
        "REDIRECT_STATUS",
        "SSL_CLIENT_VERIFY",
        "SSL_CLIENT_S_DN",
    }
)


def _own_param_refine(value: str) -> str | None:
    if value.startswith("HTTP_"):
        return (
            f"{value!r}: HTTP_ parameters are the client's request headers, which the "
            "application gets as sent; name a parameter of your own"
        )
    if value in FASTCGI_BUILTIN_PARAMS:
        return f"{value!r} is set by nxmesh on every request and cannot be replaced"
    if value in ("PHP_VALUE", "PHP_ADMIN_VALUE"):
        return (
            f"{value!r} changes the php.ini settings of the PHP-FPM worker that runs the "
            "request, and they stay for every later request it runs, other sites' "
            "included; set them in the pool's configuration (php_value[...])"
        )
    return None


# A parameter name of the application's own: none nxmesh sets, nor a client's header.
_OWN_PARAM = attrs.evolve(v.FASTCGI_PARAM, refine=_own_param_refine)


@attrs.frozen(kw_only=True)
class FastCGIParam:
    """A ``fastcgi_param`` the application gets on every request (its environment)."""

    name: str = attrs.field(validator=v.text(_OWN_PARAM))
    value: str = attrs.field(validator=v.text(v.HEADER_VALUE))


def _unique_params(value: object) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for i, param in enumerate(value if isinstance(value, tuple) else ()):
        if isinstance(param, FastCGIParam):
            first = seen.setdefault(param.name, i)
            if first != i:
                found.append((f"[{i}].name", f"{param.name!r} repeats [{first}]"))
    return found


def _php_refine(value: str) -> str | None:
    return (
        None if value.endswith(".php") else f"must be a .php script like index.php, got {value!r}"
    )


_PHP_SCRIPT = attrs.evolve(v.FILE_NAME, refine=_php_refine)


@attrs.frozen(kw_only=True)
class FastCGI:
    """Run PHP scripts with a FastCGI application server (PHP-FPM) in `upstream`.

    The script is `root` followed by the URI's path up to and including ``.php``
    (``SCRIPT_FILENAME``); what follows is ``PATH_INFO``; a URI ending in ``/`` runs
    `index` there. Only ``.php`` scripts are handed over (an uploaded ``.phar`` is not,
    which PHP-FPM would run). `check_script`: answer 404 unless the script is a file
    under `root` on nginx's host, so nothing but an existing script runs (an uploaded
    ``avatar.jpg/x.php`` is not): turn it off only when nginx cannot see the scripts (the
    application server on another host), and then set PHP-FPM's
    ``security.limit_extensions = .php`` and ``cgi.fix_pathinfo = 0``. The application
    gets the client's address as nginx has it (``REMOTE_ADDR``) and nginx's name for the
    host (``HTTP_HOST``); forwarding headers a client sends are replaced or cleared.
    """

    upstream: str = attrs.field(validator=v.text(v.NAME))
    root: str = attrs.field(validator=v.text(v.ROOT_PATH))
    index: str = attrs.field(default="index.php", validator=v.text(_PHP_SCRIPT))
    check_script: bool = attrs.field(default=True, validator=v.choice(True, False))
    read_timeout: int | None = attrs.field(
        default=None, validator=v.int_range(1, 86400, optional=True)
    )
    params: tuple[FastCGIParam, ...] = attrs.field(
        default=(),
        validator=[
            v.count(FastCGIParam, hi=64, noun="parameter"),
            v.FieldCheck(_unique_params),
        ],
    )


def _return_code(value: object) -> list[tuple[str, str]]:
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if is_int and (200 <= value <= 299 or 400 <= value <= 599):  # type: ignore[operator]
        return []
    reason = "must be a 2xx, 4xx or 5xx status code (use redirect for 3xx)"
    return [("", f"{reason}, got {v.describe(value)}")]


@attrs.frozen
class Return:
    """Answer directly with a status code and a short text body (use Redirect for 3xx)."""

    code: int = attrs.field(validator=v.FieldCheck(_return_code))
    body: str = attrs.field(default="", validator=v.text(v.RETURN_BODY))


def _path_bound(value: object) -> list[tuple[str, str]]:
    if not isinstance(value, str):
        return [("", f"must be a string, got {v.describe(value)}")]
    if not value:
        return [("", "must not be empty")]
    if len(value) > v.LOCATION_PATH.max_len:
        limit = v.LOCATION_PATH.max_len
        return [("", f"is {len(value)} characters long; at most {limit} are allowed")]
    return []


Satisfy = Literal["all", "any"]
"""nginx's ``satisfy``: with both `allow` and `basic_auth`, whether a client must pass
both (``all``) or either (``any``: listed addresses skip the password)."""
_SATISFY_NEEDS = (
    "'any' only applies with both allow and basic_auth (listed addresses then skip the "
    "password); without both it would change nothing"
)


# The access rules sites and locations share; added after versions were first signed, so
# left out of the canonical JSON at their defaults (`ADDED_FIELD`).
def _allow_field() -> Any:
    return attrs.field(
        default=(),
        validator=v.each(v.ALLOWED_CLIENT, hi=256, noun="address"),
        metadata=ADDED_FIELD,
    )


def _optional_field(cls: type[Any]) -> Any:
    return attrs.field(default=None, validator=v.instance(cls, optional=True), metadata=ADDED_FIELD)


def _satisfy_field() -> Any:
    return attrs.field(default="all", validator=v.choice("all", "any"), metadata=ADDED_FIELD)


MatchKind = Literal["prefix", "prefix_priority", "exact", "regex", "regex_ci"]
_PATH_MATCHES = ("prefix", "prefix_priority", "exact")  # the path is a path, not a regex
_ACTIONS = ("upstream", "root", "redirect", "return", "fastcgi")


@attrs.frozen(kw_only=True)
class Location:
    """A ``location`` block: which requests (`path` + `match`) and exactly one action.

    Actions: proxy to `upstream`, serve files from `root`, `redirect`, `return_`
    (spelled ``return`` in YAML), or run scripts through `fastcgi`.
    """

    # Checked by the match-specific rule in __attrs_post_init__; only bounded here.
    path: str = attrs.field(validator=v.FieldCheck(_path_bound))
    match: MatchKind = attrs.field(
        default="prefix",
        validator=v.choice("prefix", "prefix_priority", "exact", "regex", "regex_ci"),
    )
    upstream: str | None = attrs.field(default=None, validator=v.text(v.NAME, optional=True))
    root: str | None = attrs.field(default=None, validator=v.text(v.ROOT_PATH, optional=True))
    index: tuple[str, ...] = attrs.field(
        default=(), validator=v.each(v.FILE_NAME, hi=16, noun="index file")
    )
    redirect: Redirect | None = attrs.field(
        default=None, validator=v.instance(Redirect, optional=True)
    )
    return_: Return | None = attrs.field(
        default=None, validator=v.instance(Return, optional=True), metadata={"key": "return"}
    )
    headers: tuple[Header, ...] = attrs.field(
        default=(), validator=v.count(Header, hi=64, noun="header")
    )
    proxy_headers: tuple[Header, ...] = attrs.field(
        default=(), validator=v.count(Header, hi=64, noun="header")
    )
    websocket: bool = attrs.field(default=False, validator=v.choice(True, False))
    proxy_read_timeout: int | None = attrs.field(
        default=None, validator=v.int_range(1, 86400, optional=True)
    )
    client_max_body_size: str | None = attrs.field(
        default=None, validator=v.text(v.SIZE, optional=True)
    )
    # Added after versions were first signed: left out of the canonical JSON at its
    # default, so every earlier state keeps its digest (see `ADDED_FIELD`).
    serve_dotfiles: bool = attrs.field(
        default=False, validator=v.choice(True, False), metadata=ADDED_FIELD
    )
    # A location's own access rules replace the site's there (nginx does not merge them).
    allow: tuple[str, ...] = _allow_field()
    basic_auth: BasicAuth | None = _optional_field(BasicAuth)
    rate_limit: RateLimit | None = _optional_field(RateLimit)
    satisfy: Satisfy = _satisfy_field()
    # Static locations: the URI answered when no file matches (a single-page app's
    # /index.html); None answers 404.
    fallback: str | None = attrs.field(
        default=None, validator=v.text(v.FALLBACK_URI, optional=True), metadata=ADDED_FIELD
    )
    # Proxy locations: the matched prefix is replaced by '/' (proxy_pass with a URI).
    strip_prefix: bool = attrs.field(
        default=False, validator=v.choice(True, False), metadata=ADDED_FIELD
    )
    # Proxy locations: off streams a request body to the upstream as it arrives (large
    # uploads), instead of reading it whole first (into a temp file past 16 KB).
    proxy_request_buffering: bool = attrs.field(
        default=True, validator=v.choice(True, False), metadata=ADDED_FIELD
    )
    # Proxy locations: keep the upstream's answers (see ProxyCache).
    cache: ProxyCache | None = _optional_field(ProxyCache)
    fastcgi: FastCGI | None = _optional_field(FastCGI)

    @property
    def actions(self) -> tuple[str, ...]:
        """The action names set on this location (valid locations have exactly one)."""
        values = (self.upstream, self.root, self.redirect, self.return_, self.fastcgi)
        return tuple(name for name, val in zip(_ACTIONS, values, strict=True) if val is not None)

    def __attrs_post_init__(self) -> None:
        found: list[tuple[str, str]] = []
        rule = v.LOCATION_PATH if self.match in _PATH_MATCHES else v.REGEX_PATH
        if (reason := rule.reason(self.path)) is not None:
            found.append(("path", reason))
        actions = self.actions
        if len(actions) != 1:
            got = " and ".join(actions) if actions else "none"
            found.append(
                (
                    "",
                    f"needs exactly one of upstream, root, redirect, return or fastcgi; got {got}",
                )
            )
        if self.upstream is None:
            for name in self._set_away_from_default(_PROXY_OPTIONS):
                found.append((name, "only applies when the location proxies to an upstream"))
        elif self.strip_prefix and (reason := self._strip_prefix_reason()) is not None:
            found.append(("strip_prefix", reason))
        if self.root is None:
            for name in self._set_away_from_default(_STATIC_OPTIONS):
                found.append((name, "only applies when the location serves files from a root"))
        if self.upstream is None and self.root is None and self.fastcgi is None:
            # Both answer in nginx's rewrite phase, which runs before its access phase.
            for name in self._set_away_from_default(_ACCESS_OPTIONS):
                found.append(
                    (
                        name,
                        "only applies when the location proxies to an upstream, "
                        "serves files from a root or runs fastcgi: nginx answers a "
                        "redirect or return before it checks access",
                    )
                )
        v.raise_problems(found)

    def _set_away_from_default(self, names: tuple[str, ...]) -> list[str]:
        return [name for name in names if getattr(self, name) != _LOCATION_DEFAULTS[name]]

    def _strip_prefix_reason(self) -> str | None:
        if self.match not in _PATH_MATCHES:
            return (
                "needs a prefix or exact match: nginx cannot replace what a regular "
                "expression matched"
            )
        if self.match != "exact" and not self.path.endswith("/"):
            return (
                "needs a path ending in '/': nginx replaces the matched prefix with '/', "
                "so a path '/api' would send '/api/users' upstream as '//users'"
            )
        return None


# Options that mean something for one kind of location only: set away from its default
# on another kind, each is refused (false, empty or "all" is fine anywhere).
_PROXY_OPTIONS = (
    "websocket",
    "proxy_headers",
    "proxy_read_timeout",
    "strip_prefix",
    "proxy_request_buffering",
    "cache",
)
_STATIC_OPTIONS = ("index", "serve_dotfiles", "fallback")
_ACCESS_OPTIONS = ("allow", "basic_auth", "rate_limit", "satisfy")
_LOCATION_DEFAULTS: Final = {a.name: a.default for a in attrs.fields(Location)}

RealIpHeader = Literal["X-Forwarded-For", "X-Real-IP", "proxy_protocol"]

# 444 closes the connection without a response and 499 is only logged (the client left):
# nginx never sends a page for either.
_NO_PAGE_CODES: Final = {444: "closes the connection without a response", 499: "is never sent"}


def _error_page_code(code: int) -> str | None:
    if not 400 <= code <= 599:
        return f"must be a 4xx or 5xx status code, got {code}"
    if code in _NO_PAGE_CODES:
        return f"{code} {_NO_PAGE_CODES[code]}: nginx has no page to replace"
    return None


ERROR_PAGE_PREFIX: Final = "/.nxmesh-errors/"
"""URI prefix of a site's error pages: an ``internal`` location, so clients cannot ask for
them directly; a site with `error_pages` cannot have a location of its own there."""


@attrs.frozen(kw_only=True)
class ErrorPage:
    """A page nginx serves instead of its own for the responses with these status codes
    (``error_page``). The status code stays what it was; `body` is the page's HTML."""

    codes: tuple[int, ...] = attrs.field(
        validator=v.each_int(_error_page_code, lo=1, hi=64, noun="status code")
    )
    # Not secret, only long: its length stands for it in reprs (repr=False would mark it
    # secret, and errors about it would not show what was sent).
    body: str = attrs.field(
        validator=v.text(v.ERROR_PAGE_BODY), repr=lambda body: f"<{len(body)} characters>"
    )


@attrs.frozen(kw_only=True)
class Site:
    """A virtual server: names, listeners, locations and optional TLS; optionally who may
    use it (`allow`, `basic_auth`, `satisfy`), how often (`rate_limit`), and the proxies
    whose client address it believes (`real_ip_from`). docs/rendering.md says what each
    renders."""

    name: str = attrs.field(validator=v.text(v.NAME))
    server_names: tuple[str, ...] = attrs.field(
        converter=_lower_hostnames,
        validator=v.each(v.SERVER_NAME, lo=1, hi=64, noun="server name"),
    )
    listeners: tuple[Listener, ...] = attrs.field(
        default=(Listener(),), validator=v.count(Listener, lo=1, hi=16, noun="listener")
    )
    locations: tuple[Location, ...] = attrs.field(
        validator=v.count(Location, lo=1, hi=200, noun="location")
    )
    tls: TLSConfig | None = attrs.field(
        default=None, validator=v.instance(TLSConfig, optional=True)
    )
    headers: tuple[Header, ...] = attrs.field(
        default=(), validator=v.count(Header, hi=64, noun="header")
    )
    access_log: bool = attrs.field(default=True, validator=v.choice(True, False))
    client_max_body_size: str = attrs.field(default="1m", validator=v.text(v.SIZE))
    allow: tuple[str, ...] = _allow_field()
    real_ip_from: tuple[str, ...] = attrs.field(
        default=(),
        validator=v.each(v.TRUSTED_PROXY, hi=64, noun="proxy address"),
        metadata=ADDED_FIELD,
    )
    real_ip_header: RealIpHeader = attrs.field(
        default="X-Forwarded-For",
        validator=v.choice("X-Forwarded-For", "X-Real-IP", "proxy_protocol"),
        metadata=ADDED_FIELD,
    )
    basic_auth: BasicAuth | None = _optional_field(BasicAuth)
    rate_limit: RateLimit | None = _optional_field(RateLimit)
    satisfy: Satisfy = _satisfy_field()
    gzip: bool = attrs.field(default=False, validator=v.choice(True, False), metadata=ADDED_FIELD)
    error_pages: tuple[ErrorPage, ...] = attrs.field(
        default=(), validator=v.count(ErrorPage, hi=16, noun="error page"), metadata=ADDED_FIELD
    )
    intercept_upstream_errors: bool = attrs.field(
        default=False, validator=v.choice(True, False), metadata=ADDED_FIELD
    )

    def __attrs_post_init__(self) -> None:
        found = self._error_page_problems()
        if self.satisfy == "any" and not (self.allow and self.basic_auth):
            found.append(("satisfy", _SATISFY_NEEDS))
        for i, loc in enumerate(self.locations):
            # A location's rules, or the site's where it has none of its own.
            if loc.satisfy == "any" and not (
                (loc.allow or self.allow) and (loc.basic_auth or self.basic_auth)
            ):
                found.append(
                    (f"locations[{i}].satisfy", _SATISFY_NEEDS + " (its own or the site's)")
                )
        if self.real_ip_header != "X-Forwarded-For" and not self.real_ip_from:
            found.append(
                ("real_ip_header", "only applies with real_ip_from (the proxies to believe)")
            )
        if self.real_ip_header == "proxy_protocol" and not any(
            lst.proxy_protocol for lst in self.listeners
        ):
            found.append(
                (
                    "real_ip_header",
                    "proxy_protocol reads the client from a PROXY protocol line, which none "
                    "of the site's listeners expects (listeners[].proxy_protocol: true)",
                )
            )
        tls_listeners = [i for i, lst in enumerate(self.listeners) if lst.tls]
        if tls_listeners and self.tls is None:
            found.append(
                ("tls", f"is required because listeners[{tls_listeners[0]}] has tls: true")
            )
        if self.tls is not None and not tls_listeners:
            found.append(("tls", "is set but no listener has tls: true (add one, e.g. port 443)"))
        if self.tls is not None and self.tls.client_ca and not self.tls.redirect_http:
            found.extend(
                (
                    f"listeners[{i}].tls",
                    "serves the site without TLS, so without the client certificates "
                    "tls.client_ca requires; drop the listener, or let it redirect to "
                    "HTTPS (tls.redirect_http: true)",
                )
                for i, lst in enumerate(self.listeners)
                if not lst.tls
            )
        seen: dict[tuple[str, int], int] = {}
        for i, lst in enumerate(self.listeners):
            bind = lst.bind
            if bind in seen:
                first = self.listeners[seen[bind]]
                again = f"repeats listeners[{seen[bind]}]: both listen on {_socket(bind)}"
                if first.address != lst.address:
                    again += (
                        f" ({_spelling(first.address)} and {_spelling(lst.address)} are the "
                        "same address to nginx)"
                    )
                found.append((f"listeners[{i}].port", again))
            seen.setdefault(bind, i)
        v.raise_problems(found)

    def _error_page_problems(self) -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = []
        if self.intercept_upstream_errors and not self.error_pages:
            found.append(
                (
                    "intercept_upstream_errors",
                    "only applies with error_pages (the pages that replace the upstreams' "
                    "error responses)",
                )
            )
        first: dict[int, str] = {}
        for i, page in enumerate(self.error_pages):
            for j, code in enumerate(page.codes):
                where = first.setdefault(code, f"error_pages[{i}]")
                if where != f"error_pages[{i}]":
                    found.append((f"error_pages[{i}].codes[{j}]", f"{code} is in {where} already"))
        if self.error_pages:
            for i, loc in enumerate(self.locations):
                if loc.match in _PATH_MATCHES and loc.path.startswith(ERROR_PAGE_PREFIX):
                    found.append(
                        (
                            f"locations[{i}].path",
                            f"{ERROR_PAGE_PREFIX} is where the site's error pages are served "
                            "from (error_pages); choose another path",
                        )
                    )
        return found


# ---------------------------------------------------------------------------------------
# Upstreams and certificates
# ---------------------------------------------------------------------------------------


@attrs.frozen
class UpstreamServer:
    """One backend of an upstream: ``host:port``, ``[v6]:port`` or ``unix:/path``."""

    address: str = attrs.field(validator=v.text(v.UPSTREAM_ADDRESS))
    weight: int = attrs.field(default=1, validator=v.int_range(1, 1000))
    max_fails: int = attrs.field(default=1, validator=v.int_range(0, 1000))
    fail_timeout: int = attrs.field(default=10, validator=v.int_range(0, 86400))
    backup: bool = attrs.field(default=False, validator=v.choice(True, False))


@attrs.frozen(kw_only=True)
class UpstreamTLS:
    """How nginx speaks TLS to an upstream's servers (``proxy_pass https://``).

    `server_name` is sent as SNI and is the name the servers' certificates must carry.
    `verify` (on by default) checks them against `ca`, the PEM certificates of a private
    CA, or without it against the agent host's trust store (render setting
    ``upstream_ca_file``). `host`: the Host the servers get, ``server_name`` (the
    default: a name-based HTTPS server picks its site by it) or ``client`` (the name the
    client asked for, for servers that serve the public names or compare Origin with
    Host).
    """

    server_name: str | None = attrs.field(
        default=None, validator=v.text(v.TLS_SERVER_NAME, optional=True)
    )
    verify: bool = attrs.field(default=True, validator=v.choice(True, False))
    ca: str | None = attrs.field(default=None, validator=v.text(_CA_PEM, optional=True), repr=False)
    host: Literal["server_name", "client"] = attrs.field(
        default="server_name", validator=v.choice("server_name", "client")
    )

    def __attrs_post_init__(self) -> None:
        found: list[tuple[str, str]] = []
        if self.verify and self.server_name is None:
            found.append(
                (
                    "server_name",
                    "is required while verify is on: the name the servers' certificates "
                    "must carry (or verify: false to accept any certificate)",
                )
            )
        if not self.verify and self.ca is not None:
            found.append(("ca", "only applies while verify is on"))
        if self.host == "client" and self.server_name is None:
            found.append(
                ("host", "only matters with a server_name: without one the servers get the "
                 "client's Host anyway")
            )  # fmt: skip
        v.raise_problems(found)


LbMethod = Literal["round_robin", "least_conn", "ip_hash", "random"]


@attrs.frozen
class Upstream:
    """A named group of backends that locations proxy to."""

    name: str = attrs.field(validator=v.text(v.NAME))
    servers: tuple[UpstreamServer, ...] = attrs.field(
        validator=v.count(UpstreamServer, lo=1, hi=1024, noun="server")
    )
    lb_method: LbMethod = attrs.field(
        default="round_robin",
        validator=v.choice("round_robin", "least_conn", "ip_hash", "random"),
    )
    keepalive: int = attrs.field(default=32, validator=v.int_range(0, 10000))
    tls: UpstreamTLS | None = _optional_field(UpstreamTLS)

    def __attrs_post_init__(self) -> None:
        found: list[tuple[str, str]] = []
        backups = [i for i, s in enumerate(self.servers) if s.backup]
        if self.lb_method in ("ip_hash", "random"):
            # nginx refuses to start: "balancing method does not support parameter backup".
            reason = f"backup servers cannot be used with lb_method {self.lb_method}"
            found.extend((f"servers[{i}].backup", reason) for i in backups)
        elif backups and len(backups) == len(self.servers):
            found.append(("servers", "needs at least one server that is not a backup"))
        v.raise_problems(found)


@attrs.frozen
class CertificateRef:
    """A certificate the master holds (uploaded or obtained by ACME), by name."""

    name: str = attrs.field(validator=v.text(v.NAME))
    domains: tuple[str, ...] = attrs.field(
        converter=_lower_hostnames, validator=v.each(v.CERT_DOMAIN, lo=1, hi=100, noun="domain")
    )
    source: Literal["upload", "acme"] = attrs.field(
        default="upload", validator=v.choice("upload", "acme")
    )


# ---------------------------------------------------------------------------------------
# Streams
# ---------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class StreamTLS:
    """TLS that nginx ends for a TCP stream's clients (``listen ... ssl``): the clients
    speak TLS to nginx, the upstream's servers get the bytes inside, as they are (or a
    TLS connection of nginx's own, when the upstream has `tls`). For a database, broker
    or any TCP service that has no TLS of its own, or whose certificates the fleet's
    should replace.

    `certificate` names a certificate the state declares (``certificates``, uploaded or
    from ACME), as a site's `TLSConfig.certificate` does; it is the one every client gets
    (streams have no server names to pick one by). `client_ca`: the PEM certificates of
    the CAs whose client certificates the stream requires (mutual TLS: a client without
    one is refused its handshake); `client_crl`: their revocation lists.
    """

    certificate: str = attrs.field(validator=v.text(v.NAME))
    protocols: tuple[str, ...] = attrs.field(
        default=("TLSv1.2", "TLSv1.3"),
        validator=v.each(v.TLS_PROTOCOL, lo=1, hi=2, noun="protocol"),
    )
    client_ca: str | None = attrs.field(
        default=None, validator=v.text(_CA_PEM, optional=True), repr=False, metadata=ADDED_FIELD
    )
    client_crl: str | None = attrs.field(
        default=None, validator=v.text(_CRL_PEM, optional=True), repr=False, metadata=ADDED_FIELD
    )

    def __attrs_post_init__(self) -> None:
        found: list[tuple[str, str]] = []
        if len(set(self.protocols)) != len(self.protocols):
            found.append(("protocols", "lists a protocol twice"))
        if self.client_crl is not None and self.client_ca is None:
            found.append(("client_crl", "only applies with client_ca (the CAs to check)"))
        v.raise_problems(found)


@attrs.frozen(kw_only=True)
class SniRoute:
    """One route of a stream that routes TLS by name without ending it
    (`Stream.sni_routes`): connections whose TLS handshake asks for one of
    `server_names` (SNI) go to `upstream`, whose servers end the TLS themselves with
    their own certificates. Names are hostnames or ``*.`` wildcards of one level and
    more (``*.example.com`` covers ``a.example.com`` and ``a.b.example.com``, not
    ``example.com``), written in lowercase and matched whatever case a client sends; an
    exact name wins over a wildcard.
    """

    server_names: tuple[str, ...] = attrs.field(
        validator=v.each(v.SNI_NAME, lo=1, hi=100, noun="server name")
    )
    upstream: str = attrs.field(validator=v.text(v.NAME))

    def __attrs_post_init__(self) -> None:
        v.raise_problems(_repeated(self.server_names, "server_names"))


def _repeated(
    items: Sequence[str], field: str, seen: dict[str, str] | None = None
) -> list[tuple[str, str]]:
    """``(path, reason)`` for each item of `items` already in `seen` (or earlier in
    `items`); `seen` maps an item to where it was first, and learns `items`."""
    seen = {} if seen is None else seen
    found = []
    for k, item in enumerate(items):
        where = seen.setdefault(item, f"{field}[{k}]")
        if where != f"{field}[{k}]":
            found.append((f"{field}[{k}]", f"repeats {where} ({item!r})"))
    return found


@attrs.frozen(kw_only=True)
class Stream:
    """A TCP or UDP port nginx forwards to an upstream as it is (``stream {}``): a
    database, a message broker, SSH, DNS. No HTTP: nginx passes the bytes (or datagrams)
    through, choosing a server of `upstream` per TCP connection, or per UDP session (a
    client's datagrams until `udp_responses` answers came or `timeout` passed).

    `address`, like a listener's: none listens on every IPv4 address (and IPv6, with the
    agent's ``listen_ipv6``). `allow`: the clients admitted (addresses and networks);
    empty admits everyone. `connect_timeout`: seconds to connect to a TCP server;
    `timeout`: seconds a connection (or a UDP client's session) may stay silent both ways
    before nginx closes it. `proxy_protocol`: open each TCP connection to the server with
    a PROXY protocol v1 line naming the client, for servers that read it (HAProxy's
    protocol; the server must expect it, or it sees garbage). `udp_responses`: the
    datagrams a server answers each one with (1 for DNS), so nginx ends the session as
    soon as they came instead of after `timeout`; None waits for `timeout`. `tls` (TCP):
    nginx ends the clients' TLS with a certificate of the state (`StreamTLS`).
    `max_connections_per_client`: the TCP connections (UDP: sessions) one client may have
    open to the stream at once, counting an IPv6 client by its /64 as rate limits do;
    more are closed at once. None: no limit. `proxy_protocol_from` (TCP): the load
    balancers in front of nginx that open each connection with a PROXY protocol line;
    nginx then expects one on every connection to the port and, from those addresses,
    takes the client's address from it (for `allow`, the limit and the log).
    `sni_routes` (TCP): route TLS connections by the name their handshake asks for
    (SNI) without ending the TLS (``ssl_preread``): each `SniRoute`'s names go to its
    upstream, every other connection (another name, no name, not TLS) to `upstream`.
    One port then serves several TLS services that keep their own certificates; the
    stream's other settings (`allow`, timeouts, limits, PROXY protocol) hold for all
    its routes.
    """

    name: str = attrs.field(validator=v.text(v.NAME))
    port: int = attrs.field(validator=v.int_range(1, 65535))
    upstream: str = attrs.field(validator=v.text(v.NAME))
    protocol: Literal["tcp", "udp"] = attrs.field(default="tcp", validator=v.choice("tcp", "udp"))
    address: str | None = attrs.field(
        default=None, validator=v.text(v.LISTEN_ADDRESS, optional=True)
    )
    allow: tuple[str, ...] = attrs.field(
        default=(), validator=v.each(v.ALLOWED_CLIENT, hi=256, noun="address")
    )
    connect_timeout: int = attrs.field(default=5, validator=v.int_range(1, 600))
    timeout: int = attrs.field(default=600, validator=v.int_range(1, 86400))
    proxy_protocol: bool = attrs.field(default=False, validator=v.choice(True, False))
    udp_responses: int | None = attrs.field(
        default=None, validator=v.int_range(1, 1000, optional=True)
    )
    tls: StreamTLS | None = _optional_field(StreamTLS)
    max_connections_per_client: int | None = attrs.field(
        default=None, validator=v.int_range(1, 100_000, optional=True), metadata=ADDED_FIELD
    )
    proxy_protocol_from: tuple[str, ...] = attrs.field(
        default=(),
        validator=v.each(v.TRUSTED_PROXY, hi=64, noun="proxy address"),
        metadata=ADDED_FIELD,
    )
    sni_routes: tuple[SniRoute, ...] = attrs.field(
        default=(), validator=v.count(SniRoute, hi=1000, noun="route"), metadata=ADDED_FIELD
    )

    @property
    def upstreams(self) -> tuple[str, ...]:
        """Every upstream the stream forwards to: `upstream`, then its routes' (once each)."""
        return tuple(dict.fromkeys((self.upstream, *(r.upstream for r in self.sni_routes))))

    def __attrs_post_init__(self) -> None:
        found: list[tuple[str, str]] = []
        seen: dict[str, str] = {}
        for n, route in enumerate(self.sni_routes):
            found += _repeated(route.server_names, f"sni_routes[{n}].server_names", seen)
        if self.sni_routes and self.protocol == "udp":
            found.append(
                ("sni_routes", "is for TCP streams: a UDP datagram carries no TLS handshake "
                 "to read a name from")
            )  # fmt: skip
        if self.sni_routes and self.tls is not None:
            found.append(
                ("sni_routes", "routes TLS that nginx passes through, and tls makes nginx end "
                 "it; drop one (the routes' servers keep their own certificates)")
            )  # fmt: skip
        if self.protocol == "udp" and self.proxy_protocol_from:
            found.append(
                ("proxy_protocol_from", "is for TCP streams: nginx reads no PROXY protocol "
                 "line on UDP")
            )  # fmt: skip
        if self.protocol == "udp" and self.tls is not None:
            found.append(("tls", "is for TCP streams: nginx ends no TLS over UDP (it has no DTLS)"))
        if self.protocol == "udp" and self.proxy_protocol:
            found.append(
                ("proxy_protocol", "is for TCP streams: a PROXY protocol line opens a TCP "
                 "connection, and UDP has none")
            )  # fmt: skip
        if self.protocol == "tcp" and self.udp_responses is not None:
            found.append(("udp_responses", "is for UDP streams: TCP has no datagrams to count"))
        v.raise_problems(found)


# ---------------------------------------------------------------------------------------
# Desired state
# ---------------------------------------------------------------------------------------

MAX_SITES = 10_000
MAX_STREAMS = 1_000


@attrs.frozen(kw_only=True)
class DesiredState:
    """Everything one workspace should serve. Cross-references are checked by `check_state`."""

    sites: tuple[Site, ...] = attrs.field(
        default=(), validator=v.count(Site, hi=MAX_SITES, noun="site")
    )
    upstreams: tuple[Upstream, ...] = attrs.field(
        default=(), validator=v.count(Upstream, hi=MAX_SITES, noun="upstream")
    )
    certificates: tuple[CertificateRef, ...] = attrs.field(
        default=(), validator=v.count(CertificateRef, hi=MAX_SITES, noun="certificate")
    )
    workspace: str = attrs.field(default="default", validator=v.text(v.NAME))
    streams: tuple[Stream, ...] = attrs.field(
        default=(), validator=v.count(Stream, hi=MAX_STREAMS, noun="stream"), metadata=ADDED_FIELD
    )


@attrs.frozen
class SiteParts:
    """The parts of a site that failed field validation which pass on their own.

    Items keep their input positions, ``None`` where one failed, so problems point at
    the user's file: a location with a bad header is left out, its neighbours are still
    checked. Reads like a `Site` for `check_parts`.
    """

    name: str | None
    server_names: tuple[str | None, ...]
    listeners: tuple[Listener | None, ...]
    locations: tuple[Location | None, ...]
    tls: TLSConfig | None = None


Build = Callable[[object, type[Any]], Any]
# What `Build` raises for input that fails field validation (cattrs groups included).
_BUILD_ERRORS = (TypeError, ValueError, KeyError, ExceptionGroup)
_KINDS = ("sites", "upstreams", "certificates")


@attrs.frozen
class StateParts:
    """The input of `check_parts`: sites, upstream names and certificate names.

    Items keep their input positions, ``None`` where one failed field validation (for
    upstreams and certificates: where the name itself is not valid), so the parts of
    several files concatenate (`concat`) into the indices of the merged state. `unknown`
    names the kinds whose items could not be read at all (a file that does not parse).
    References to upstreams or certificates are not judged when one of them has no
    readable name: they may mean it (no "unknown upstream" caused by a typo elsewhere).
    `acme_certificates` names the certificates whose source is ACME: their sites serve
    the HTTP-01 challenge path like ``tls: acme`` sites.
    """

    sites: tuple[Site | SiteParts | None, ...] = ()
    upstreams: tuple[str | None, ...] = ()
    certificates: tuple[str | None, ...] = ()
    unknown: frozenset[str] = frozenset()
    acme_certificates: frozenset[str] = frozenset()

    @classmethod
    def of(cls, state: DesiredState) -> StateParts:
        return cls(
            sites=state.sites,
            upstreams=tuple(u.name for u in state.upstreams),
            certificates=tuple(c.name for c in state.certificates),
            acme_certificates=frozenset(c.name for c in state.certificates if c.source == "acme"),
        )

    @classmethod
    def salvage(cls, data: object, build: Build) -> StateParts:
        """The parts of raw state `data` that pass field validation on their own.

        `build(value, cls)` structures one model object (the converter), raising for
        invalid input. Used when `data` as a whole failed, so its cross-object problems
        are reported in the same pass as its field problems.
        """
        items: dict[str, tuple[object, ...]] = {}
        unknown: set[str] = set()
        for kind in _KINDS:
            raw = data.get(kind, ()) if isinstance(data, Mapping) else None
            if isinstance(raw, list | tuple):
                items[kind] = tuple(raw)
            else:
                items[kind] = ()
                unknown.add(kind)
        return cls(
            sites=tuple(
                _salvage_site(item, build) if isinstance(item, Mapping) else None
                for item in items["sites"]
            ),
            upstreams=tuple(map(_name, items["upstreams"])),
            certificates=tuple(map(_name, items["certificates"])),
            unknown=frozenset(unknown),
            acme_certificates=frozenset(
                name
                for item in items["certificates"]
                if isinstance(item, Mapping)
                and item.get("source") == "acme"
                and (name := _name(item)) is not None
            ),
        )

    @classmethod
    def concat(cls, parts: Iterable[StateParts]) -> StateParts:
        """The parts of several inputs merged in order."""
        parts = list(parts)
        return cls(
            sites=tuple(site for part in parts for site in part.sites),
            upstreams=tuple(name for part in parts for name in part.upstreams),
            certificates=tuple(name for part in parts for name in part.certificates),
            unknown=frozenset().union(*(part.unknown for part in parts)),
            acme_certificates=frozenset().union(*(part.acme_certificates for part in parts)),
        )


def _name(item: object) -> str | None:
    """The name of a raw item when it is a valid name (invalid items may still have one)."""
    name = item.get("name") if isinstance(item, Mapping) else None
    return name if isinstance(name, str) and v.NAME.reason(name) is None else None


def _salvage_site(raw: Mapping[Any, Any], build: Build) -> SiteParts:
    def valid(value: object, cls: type[Any]) -> Any:
        try:
            return build(value, cls)
        except _BUILD_ERRORS:  # reported by the field pass
            return None

    def each(key: str, cls: type[Any]) -> tuple[Any, ...]:
        value = raw.get(key)
        return tuple(valid(item, cls) for item in value) if isinstance(value, list | tuple) else ()

    # Mirrors Site's default of one plain listener on port 80. A listener repeating an
    # earlier one's bind already has its field problem; it would only add a TLS clash.
    listeners: list[Listener | None] = []
    binds: set[tuple[str, int]] = set()
    for lst in each("listeners", Listener) if "listeners" in raw else (Listener(),):
        listeners.append(None if lst is None or lst.bind in binds else lst)
        if lst is not None:
            binds.add(lst.bind)
    names = raw.get("server_names")
    lowered = _lower_hostnames(names) if isinstance(names, list | tuple) else ()
    return SiteParts(
        name=_name(raw),
        server_names=tuple(n if v.SERVER_NAME.reason(n) is None else None for n in lowered),
        listeners=tuple(listeners),
        locations=each("locations", Location),
        tls=valid(raw["tls"], TLSConfig) if raw.get("tls") is not None else None,
    )


def _unknown(kind: str, name: str, known: Iterable[str]) -> str:
    known = list(known)
    if not known:
        return f"refers to {kind} {name!r}, but no {kind}s are defined"
    close = closest(name, known)
    hint = f" (did you mean {close!r}?)" if close else ""
    return f"refers to unknown {kind} {name!r}{hint}"


def _unknown_certificate(name: str, known: Iterable[str]) -> str:
    known = list(known)
    reason = _unknown("certificate", name, known)
    if known and closest(name, known):
        return reason  # most likely a typo
    # Uploading a certificate does not add it to the state: a frequent first mistake.
    return (
        f"{reason}; a certificate (uploaded or from ACME) is used by declaring it in the "
        f"state: certificates: [{{name: {name}, domains: [...]}}]"
    )


def _first_seen(
    found: list[Problem], kind: str, names: Iterable[str | None], prefix: str
) -> dict[str, int]:
    """Map each name to its first index, reporting later duplicates at ``prefix[i].name``."""
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        if name is None:
            continue
        if name in first:
            found.append(
                Problem(
                    f"{prefix}[{i}].name",
                    f"{kind} name {name!r} is already used by {prefix}[{first[name]}]",
                )
            )
        else:
            first[name] = i
    return first


# The renderer serves ACME HTTP-01 tokens here (acme_challenge.conf.j2) in the plain-HTTP
# server of an ACME site; a location of the site at the same path is "duplicate location"
# to nginx once that server also carries the locations (redirect_http: false), and one
# below it would take the CA's requests for some tokens.
_ACME_CHALLENGE_PATH = "/.well-known/acme-challenge/"


def _acme_source(tls: TLSConfig | None, acme_certificates: frozenset[str]) -> str | None:
    """Why a site gets its certificate by ACME (for messages), or None when it does not."""
    if tls is None:
        return None
    if tls.acme:
        return "the site has tls: acme"
    if tls.certificate in acme_certificates:
        return f"the site's certificate {tls.certificate!r} comes from ACME"
    return None


def _challenge_path_taken(here: str, n: int, loc: Location, because: str) -> Problem | None:
    """`loc` (locations[`n`] of the site at `here`) at or below the ACME challenge path of
    a site that answers HTTP-01 there (`because`): nginx would refuse the duplicate, or
    the site would stop answering the CA."""
    if loc.match not in _PATH_MATCHES or not loc.path.startswith(_ACME_CHALLENGE_PATH):
        return None
    return Problem(
        f"{here}.locations[{n}].path",
        f"{_ACME_CHALLENGE_PATH} and the paths below it are reserved for the ACME HTTP-01 "
        f"challenges nxmesh answers there, because {because}; remove this location",
    )


def stream_http01_sites(state: DesiredState) -> dict[int, str]:
    """The sites that answer ACME HTTP-01 for the certificates TCP streams end TLS with,
    by index, with the certificate's name: a stream does not speak HTTP, so the CA's
    request for a domain is answered by a site serving it over plain HTTP (a plain
    listener, or the redirect server). The renderer gives them the challenge location;
    a domain none of them serves can only be validated by DNS-01."""
    refs = {ref.name: ref for ref in state.certificates if ref.source == "acme"}
    domains: dict[str, str] = {}
    for stream in state.streams:
        ref = refs.get(stream.tls.certificate) if stream.tls is not None else None
        if ref is not None:
            domains.update(dict.fromkeys(ref.domains, ref.name))
    found: dict[int, str] = {}
    for i, site in enumerate(state.sites):
        plain = any(not lst.tls for lst in site.listeners) or bool(redirect_binds(site))
        served = [domains[name] for name in site.server_names if name in domains]
        if plain and served:
            found[i] = served[0]
    return found


def redirect_proxy_protocol(site: Site | SiteParts) -> bool:
    """Whether the redirect server `redirect_binds` adds expects PROXY protocol lines: when
    every listener of the site does (load balancers sending them to its HTTPS ports send
    them to port 80 too). A site wanting otherwise declares its plain listener."""
    listeners = [lst for lst in site.listeners if lst is not None]
    return bool(listeners) and all(lst.proxy_protocol for lst in listeners)


def redirect_binds(site: Site | SiteParts) -> list[tuple[str, int]]:
    """Sockets (`Listener.bind` keys) of the HTTP→HTTPS redirect server the renderer adds
    on its own: port 80 on each address the TLS listeners use, when ``tls.redirect_http``
    asks for a redirect and the site declares no plain listener (the redirect takes
    those instead). Empty otherwise, or while a listener of `site` is unknown."""
    if site.tls is None or not site.tls.redirect_http or None in site.listeners:
        return []
    listeners = [lst for lst in site.listeners if lst is not None]
    if any(not lst.tls for lst in listeners):
        return []
    return [(address, 80) for address in dict.fromkeys(lst.bind[0] for lst in listeners)]


SiteRef = Callable[[int], str]
"""How a problem names another site: ``sites[1] ('api')``, index and name, so a caller
editing one site through the per-object API can tell which one."""


def _site_refs(sites: Sequence[Site | SiteParts | None]) -> SiteRef:
    names = {i: site.name for i, site in enumerate(sites) if site is not None and site.name}

    def ref(i: int) -> str:
        name = names.get(i)
        return f"sites[{i}] ({name!r})" if name else f"sites[{i}]"

    return ref


def _check_h2c(
    ref: SiteRef,
    found: list[Problem],
    seen: dict[tuple[str, int], tuple[bool, int]],
    bind: tuple[str, int],
    h2c: bool,
    site: int,
    path: str,
) -> None:
    """Sites sharing a plain socket must agree on `http2`: one server's flag makes the
    whole socket cleartext HTTP/2 only, and every HTTP/1.x client of the others fails."""
    first, owner = seen.setdefault(bind, (h2c, site))
    if first != h2c and owner != site:
        said = "speaks" if first else "does not speak"
        found.append(
            Problem(
                path,
                f"{_socket(bind)} {said} cleartext HTTP/2 (h2c) in {ref(owner)}; nginx "
                "makes the whole port h2c-only if any site sets http2 on it, so sites "
                "sharing a plain port must agree (give the h2c site a port of its own)",
            )
        )


def check_state(state: DesiredState) -> list[Problem]:
    """Every cross-object problem of `state`: duplicates, dangling references, conflicts;
    and what new input may not hold (`submission_problems`).

    Paths index into the state (``sites[0].locations[1].upstream``); a problem about a
    duplicate points at the later occurrence and names the earlier one in its message.
    """
    return [*check_parts(StateParts.of(state)), *submission_problems(state)]


def submission_problems(state: DesiredState) -> list[Problem]:
    """Rules added after versions were stored, checked when a state is submitted (every
    commit runs `check_state`) rather than by the objects themselves: a stored version
    that breaks one still loads, and a rollback to it is checked again."""
    found: list[Problem] = []
    for i, upstream in enumerate(state.upstreams):
        for j, server in enumerate(upstream.servers):
            if (reason := v.upstream_address_hazard(server.address)) is not None:
                found.append(Problem(f"upstreams[{i}].servers[{j}].address", reason))
    found += _fastcgi_upstream_problems(state)
    found += stream_problems(state)
    found += _proxy_protocol_warnings(state)
    found += [
        Problem(
            f"sites[{i}].locations[{n}].path",
            "has a %XX escape, but nginx matches locations against the decoded path: "
            "this location would never match a request, and its access rules would "
            "protect nothing; match it with a regex location ('.' or '\\s' for a space, "
            "'%' for itself), which nginx checks after the prefix locations",
        )
        for i, site in enumerate(state.sites)
        for n, loc in enumerate(site.locations)
        if loc.match in _PATH_MATCHES and "%" in loc.path
    ]
    for i, site in enumerate(state.sites):
        if site.tls is None or not site.tls.redirect_http:
            continue
        found.extend(
            Problem(
                f"sites[{i}].listeners[{n}].http2",
                "makes this plain port cleartext HTTP/2 only (h2c), where the site "
                "redirects browsers to HTTPS: no browser speaks h2c, so none would reach "
                "the redirect; set http2 on the TLS listeners only (or set "
                "tls.redirect_http: false)",
            )
            for n, lst in enumerate(site.listeners)
            if lst.http2 and not lst.tls
        )
        if redirect_binds(site) and any(lst.mapped for lst in site.listeners):
            found.append(
                Problem(
                    f"sites[{i}].tls.redirect_http",
                    "adds an HTTP→HTTPS redirect on port 80 (the site has no plain "
                    "listener), but the site's listeners are behind a port mapping "
                    "(public_port), where nginx often runs unprivileged and cannot bind "
                    "port 80; declare the plain listener the mapping forwards to, like "
                    "{port: 8080, public_port: 80}",
                    "warning",
                )
            )
    return found


def _proxy_protocol_warnings(state: DesiredState) -> list[Problem]:
    """Sites behind a TCP load balancer (a `proxy_protocol` listener) that would judge the
    wrong address: the client's own X-Forwarded-For (a TCP balancer passes it through,
    so any client names itself), or the balancer's, shared by every client. Warnings: an
    HTTP proxy that sends a PROXY line and writes the header itself is the exception."""
    found: list[Problem] = []
    for i, site in enumerate(state.sites):
        if not any(lst.proxy_protocol for lst in site.listeners):
            continue
        if site.real_ip_from and site.real_ip_header != "proxy_protocol":
            found.append(
                Problem(
                    f"sites[{i}].real_ip_header",
                    f"is {site.real_ip_header}, but the site's listeners read PROXY protocol "
                    "lines: a TCP load balancer passes the client's own header through, so "
                    "any client could name its address; set real_ip_header: proxy_protocol "
                    "(unless the balancer is an HTTP proxy writing the header itself)",
                    "warning",
                )
            )
        limited = (
            site.allow
            or site.rate_limit
            or any(loc.allow or loc.rate_limit for loc in site.locations)
        )
        if not site.real_ip_from and limited:
            found.append(
                Problem(
                    f"sites[{i}].real_ip_from",
                    "is empty, but the site's listeners read PROXY protocol lines: nginx "
                    "sees every client as the load balancer, so allow and rate limits judge "
                    "its address; list the balancers and set real_ip_header: proxy_protocol",
                    "warning",
                )
            )
    return found


def stream_problems(state: DesiredState) -> list[Problem]:
    """What nginx's ``stream {}`` needs of `state.streams`: unique names, known upstreams
    nginx can forward bytes to (the stream's and its `sni_routes`'), a port of their own,
    and a declared certificate for TLS.

    Checked with the rules of new input (`submission_problems`): no version stored before
    streams existed holds one.
    """
    found: list[Problem] = []
    _first_seen(found, "stream", (s.name for s in state.streams), "streams")
    upstreams = {up.name: up for up in state.upstreams}
    certificates = [ref.name for ref in state.certificates]
    site_ports: dict[int, int] = {}
    for i, site in enumerate(state.sites):
        binds = [lst.bind for lst in site.listeners] + redirect_binds(site)
        for _, port in binds:
            site_ports.setdefault(port, i)
    ref = _site_refs(state.sites)
    ports: dict[tuple[str, int], int] = {}
    for i, stream in enumerate(state.streams):
        here = f"streams[{i}]"
        upstream = upstreams.get(stream.upstream)
        if upstream is None:
            found.append(
                Problem(f"{here}.upstream", _unknown("upstream", stream.upstream, upstreams))
            )
        elif (reason := stream_upstream_reason(stream, upstream)) is not None:
            found.append(Problem(f"{here}.upstream", reason))
        for n, route in enumerate(stream.sni_routes):
            path = f"{here}.sni_routes[{n}].upstream"
            routed = upstreams.get(route.upstream)
            if routed is None:
                found.append(Problem(path, _unknown("upstream", route.upstream, upstreams)))
            elif (reason := stream_upstream_reason(stream, routed)) is not None:
                found.append(Problem(path, reason))
        cert = stream.tls.certificate if stream.tls is not None else None
        if cert is not None and cert not in certificates:
            found.append(
                Problem(f"{here}.tls.certificate", _unknown_certificate(cert, certificates))
            )
        if stream.protocol == "tcp" and stream.port in site_ports:
            found.append(
                Problem(
                    f"{here}.port",
                    f"port {stream.port} is {ref(site_ports[stream.port])}'s, over HTTP; a "
                    "TCP port belongs to the sites or to one stream (nginx's http and "
                    "stream modules cannot share a socket)",
                )
            )
        other = ports.setdefault((stream.protocol, stream.port), i)
        if other != i:
            found.append(
                Problem(
                    f"{here}.port",
                    f"{stream.protocol.upper()} port {stream.port} is already "
                    f"streams[{other}]'s; each stream needs a port of its own",
                )
            )
    acme = frozenset(ref.name for ref in state.certificates if ref.source == "acme")
    for i, cert in stream_http01_sites(state).items():
        site = state.sites[i]
        if _acme_source(site.tls, acme) is not None:
            continue  # reserved for its own certificate already (check_parts says so)
        because = f"the site serves a domain of certificate {cert!r}, which a stream ends TLS with"
        for n, loc in enumerate(site.locations):
            if taken := _challenge_path_taken(f"sites[{i}]", n, loc, because):
                found.append(taken)
    return found


def stream_upstream_reason(stream: Stream, upstream: Upstream) -> str | None:
    """Why `upstream` cannot serve `stream`; None when it can."""
    name = upstream.name
    if upstream.lb_method == "ip_hash":
        return (
            f"upstream {name!r} balances with ip_hash, which nginx's stream module does not "
            "have; give the stream an upstream with round_robin, least_conn or random"
        )
    if upstream.tls is not None and stream.sni_routes:
        return (
            f"upstream {name!r} is spoken to over TLS, and a stream with sni_routes passes "
            "its clients' TLS through as it is, for the servers to end; name an upstream "
            "without tls"
        )
    if upstream.tls is not None and stream.protocol == "udp":
        return (
            f"upstream {name!r} is spoken to over TLS, which a UDP stream cannot do (nginx "
            "has no DTLS); name an upstream without tls"
        )
    if stream.protocol == "udp" and any(s.address.startswith("unix:") for s in upstream.servers):
        return (
            f"upstream {name!r} has a unix socket server, which a UDP stream cannot send "
            "datagrams to; give the stream an upstream of host:port servers"
        )
    return None


def _check_wildcard_mixes(
    ref: SiteRef, found: list[Problem], declared: dict[tuple[str, int], tuple[int, str]]
) -> None:
    """A port listened on by every address (``80``, ``[::]:80``) and by one address of
    the same family (``127.0.0.1:80``) in any site: nginx then binds the port once and
    gives connections to that address only to the servers naming it, so the wildcard's
    sites never answer there; and a running nginx cannot reload from the address to the
    mix (the address is still bound: "Address already in use"). Refused, at the
    address."""
    for (address, port), (site, path) in declared.items():
        wildcard = "::" if ":" in address else "*"
        if address == wildcard or (wildcard, port) not in declared:
            continue
        other, _ = declared[(wildcard, port)]
        owner = "this site" if other == site else ref(other)
        every = "every IPv6 address" if wildcard == "::" else "every address"
        found.append(
            Problem(
                path,
                f"{_socket((address, port))} is on a port {owner} listens on for {every} "
                f"({_socket((wildcard, port))}): nginx would give connections to {address} "
                "only to the servers naming that address, and could not reload onto the "
                "mix; give the listeners of this port the same address",
            )
        )


def _fastcgi_upstream_problems(state: DesiredState) -> list[Problem]:
    """A FastCGI location's upstream speaks FastCGI: never TLS (nginx's FastCGI has none),
    and never HTTP to a proxy location too (no server speaks both)."""
    found: list[Problem] = []
    tls_upstreams = {up.name for up in state.upstreams if up.tls is not None}
    proxied = {loc.upstream for site in state.sites for loc in site.locations if loc.upstream}
    for i, site in enumerate(state.sites):
        for n, loc in enumerate(site.locations):
            if loc.fastcgi is None:
                continue
            name = loc.fastcgi.upstream
            if name in tls_upstreams:
                reason = (
                    f"upstream {name!r} is spoken to over TLS, which nginx's FastCGI cannot "
                    "do; name an upstream without tls"
                )
            elif name in proxied:
                reason = (
                    f"upstream {name!r} is also a proxy location's, which speaks HTTP to it; "
                    "a server speaks FastCGI or HTTP, not both: give each its own upstream"
                )
            else:
                continue
            found.append(Problem(f"sites[{i}].locations[{n}].fastcgi.upstream", reason))
    return found


def check_parts(parts: StateParts) -> list[Problem]:
    """`check_state` over the parts of a state, which may lack some (see `StateParts`)."""
    found: list[Problem] = []
    _first_seen(found, "site", (s.name if s else None for s in parts.sites), "sites")
    upstreams = _first_seen(found, "upstream", parts.upstreams, "upstreams")
    certs = _first_seen(found, "certificate", parts.certificates, "certificates")
    check_upstreams = "upstreams" not in parts.unknown and None not in parts.upstreams
    check_certs = "certificates" not in parts.unknown and None not in parts.certificates

    served: dict[tuple[str, int, str], int] = {}
    defaults: dict[tuple[str, int], int] = {}
    # nginx decides TLS per listening socket, not per server: a plain site sharing a port
    # with a TLS site would get TLS handshakes it has no certificate for.
    tls_on_bind: dict[tuple[str, int], tuple[bool, int]] = {}
    # Also per socket: the TLS protocols (negotiated before the name picks a site) and
    # whether a plain socket speaks cleartext HTTP/2 only (any server's `http2` makes it so).
    protocols_on_bind: dict[tuple[str, int], tuple[tuple[str, ...], int]] = {}
    h2c_on_bind: dict[tuple[str, int], tuple[bool, int]] = {}
    # And whether connections open with a PROXY protocol line (`listen ... proxy_protocol`).
    proxy_on_bind: dict[tuple[str, int], tuple[bool, int, str]] = {}  # flag, site, whose
    # The port clients reach each of nginx's ports on (`Listener.public_port`), by port:
    # a port mapping forwards a port, and nginx tells upstreams the public one by port.
    public_on_port: dict[int, tuple[int, int]] = {}  # public port, site
    ref = _site_refs(parts.sites)
    # Where each socket is first declared: a wildcard and an address on one port clash.
    declared: dict[tuple[str, int], tuple[int, str]] = {}
    for i, site in enumerate(parts.sites):
        if site is None:
            continue
        here = f"sites[{i}]"
        cert = site.tls.certificate if site.tls is not None else None
        if check_certs and cert is not None and cert not in certs:
            found.append(Problem(f"{here}.tls.certificate", _unknown_certificate(cert, certs)))
        implicit = redirect_binds(site)
        for n, lst in enumerate(site.listeners):
            if lst is not None:
                declared.setdefault(lst.bind, (i, f"{here}.listeners[{n}].address"))
        for bind in implicit:
            declared.setdefault(bind, (i, f"{here}.tls.redirect_http"))
        binds = {lst.bind for lst in site.listeners if lst is not None} | set(implicit)
        for n, server_name in enumerate(site.server_names):
            if server_name is None:
                continue
            for addr, port in sorted(binds):
                other = served.setdefault((addr, port, server_name), i)
                if other != i:
                    found.append(
                        Problem(
                            f"{here}.server_names[{n}]",
                            f"server name {server_name!r} on {_socket((addr, port))} is "
                            f"already served by {ref(other)}",
                        )
                    )
                    break
        for n, lst in enumerate(site.listeners):
            if lst is None:
                continue
            bind = lst.bind
            reached, owner = public_on_port.setdefault(lst.port, (lst.reached_port, i))
            if reached != lst.reached_port:
                found.append(
                    Problem(
                        f"{here}.listeners[{n}].public_port",
                        f"port {lst.port} is reached on port {reached} in {ref(owner)}: a "
                        "port mapping forwards the whole port, so every listener on port "
                        f"{lst.port} must say public_port: {reached}",
                    )
                )
            proxied, owner, whose = proxy_on_bind.setdefault(
                bind, (lst.proxy_protocol, i, "listener")
            )
            if proxied != lst.proxy_protocol:
                by = ref(owner) + ("'s HTTP→HTTPS redirect" if whose == "redirect" else "")
                found.append(
                    Problem(
                        f"{here}.listeners[{n}].proxy_protocol",
                        f"{_socket(bind)} {'expects' if proxied else 'has no'} PROXY protocol "
                        f"lines in {by}; nginx reads them per socket, so every site on it "
                        "must agree",
                    )
                )
            tls, owner = tls_on_bind.setdefault(bind, (lst.tls, i))
            if tls != lst.tls:
                found.append(
                    Problem(
                        f"{here}.listeners[{n}].tls",
                        f"{_socket(bind)} is {'TLS' if tls else 'plain HTTP'} in "
                        f"{ref(owner)}; one port cannot mix TLS and plain HTTP",
                    )
                )
            if lst.tls and site.tls is not None:
                protocols, owner = protocols_on_bind.setdefault(bind, (site.tls.protocols, i))
                if set(protocols) != set(site.tls.protocols) and owner != i:
                    found.append(
                        Problem(
                            f"{here}.tls.protocols",
                            f"sites sharing {_socket(bind)} must agree on tls.protocols: "
                            f"nginx negotiates the protocol before it picks a site by name, "
                            f"so the protocols of {ref(owner)}, {list(protocols)}, would "
                            "apply to this site too (or this site's to it)",
                        )
                    )
            if not lst.tls:
                _check_h2c(
                    ref, found, h2c_on_bind, bind, lst.http2, i, f"{here}.listeners[{n}].http2"
                )
            if lst.default_server:
                other = defaults.setdefault(bind, i)
                if other != i:
                    found.append(
                        Problem(
                            f"{here}.listeners[{n}].default_server",
                            f"{ref(other)} is already the default server for {_socket(bind)}",
                        )
                    )
        redirect_proxied = redirect_proxy_protocol(site)
        for bind in implicit:  # plain HTTP, as nginx sees the redirect server
            _check_h2c(ref, found, h2c_on_bind, bind, False, i, f"{here}.tls.redirect_http")
            proxied, owner, _ = proxy_on_bind.setdefault(bind, (redirect_proxied, i, "redirect"))
            if proxied != redirect_proxied:
                ours, theirs = (
                    ("would expect PROXY protocol lines", "does not")
                    if redirect_proxied
                    else ("would read no PROXY protocol lines", "expects them")
                )
                found.append(
                    Problem(
                        f"{here}.tls.redirect_http",
                        f"the HTTP→HTTPS redirect on {_socket(bind)} (port 80: the site has "
                        f"no plain listener) {ours}, like the site's listeners, but "
                        f"{ref(owner)} {theirs} there; give this site a plain listener that "
                        "says which",
                    )
                )
            tls, owner = tls_on_bind.setdefault(bind, (False, i))
            if tls:
                where = "this site" if owner == i else ref(owner)
                found.append(
                    Problem(
                        f"{here}.tls.redirect_http",
                        f"the HTTP→HTTPS redirect listens on {_socket(bind)} (port 80: the "
                        f"site has no plain listener), which is TLS in {where}; one port "
                        "cannot mix TLS and plain HTTP (set redirect_http: false, or give "
                        "the site a plain listener for the redirect)",
                    )
                )
        acme = _acme_source(site.tls, parts.acme_certificates)
        paths: dict[tuple[str, str], int] = {}
        for n, loc in enumerate(site.locations):
            if loc is None:
                continue
            # `/a/` and `^~ /a/` are one location to nginx ("duplicate location").
            kind = "prefix" if loc.match == "prefix_priority" else loc.match
            other = paths.setdefault((kind, loc.path), n)
            if other != n:
                found.append(
                    Problem(
                        f"{here}.locations[{n}].path",
                        f"{kind} location {loc.path!r} repeats locations[{other}]",
                    )
                )
            elif acme is not None and (taken := _challenge_path_taken(here, n, loc, acme)):
                found.append(taken)
            for field, name in (
                ("upstream", loc.upstream),
                ("fastcgi.upstream", loc.fastcgi.upstream if loc.fastcgi else None),
            ):
                if check_upstreams and name is not None and name not in upstreams:
                    found.append(
                        Problem(
                            f"{here}.locations[{n}].{field}", _unknown("upstream", name, upstreams)
                        )
                    )
    _check_wildcard_mixes(ref, found, declared)
    return found


# ---------------------------------------------------------------------------------------
# Fleet: agents, versions, reports
# ---------------------------------------------------------------------------------------


def _clip(limit: int) -> v.FieldCheck:
    return v.FieldCheck(
        lambda value: (
            []
            if isinstance(value, str) and len(value) <= limit
            else [("", f"must be a string of at most {limit} characters")]
        )
    )


_TRUNCATED = "\n...[truncated]"


def _truncate(value: str, limit: int) -> str:
    # Agents report whatever nginx printed; cut it rather than lose the whole report.
    if isinstance(value, str) and len(value) > limit:
        return value[: limit - len(_TRUNCATED)] + _TRUNCATED
    return value


def _truncate_message(value: str) -> str:
    return _truncate(value, 4096)


def _truncate_output(value: str) -> str:
    return _truncate(value, 65536)


@attrs.frozen(kw_only=True)
class Agent:
    """An enrolled agent as the master sees it."""

    id: str = attrs.field(validator=v.text(v.TOKEN))
    name: str = attrs.field(validator=v.text(v.TOKEN))
    labels: Mapping[str, str] = attrs.field(
        factory=FrozenMap, converter=_freeze_str, validator=v.labels()
    )
    workspace: str = attrs.field(default="default", validator=v.text(v.NAME))
    status: Literal["online", "offline", "revoked", "pending"] = attrs.field(
        default="pending", validator=v.choice("online", "offline", "revoked", "pending")
    )
    nginx_version: str | None = attrs.field(default=None, validator=v.text(v.TOKEN, optional=True))
    deployment_mode: str | None = attrs.field(
        default=None, validator=v.text(v.TOKEN, optional=True)
    )
    running_version: int | None = attrs.field(
        default=None, validator=v.int_range(0, 2**63 - 1, optional=True)
    )
    running_digest: str | None = attrs.field(
        default=None, validator=v.text(v.DIGEST, optional=True)
    )
    last_seen: float | None = attrs.field(default=None, validator=v.finite(optional=True))


@attrs.frozen(kw_only=True)
class ConfigVersion:
    """An immutable, content-addressed, signed desired state of one workspace."""

    workspace: str = attrs.field(validator=v.text(v.NAME))
    number: int = attrs.field(validator=v.int_range(1, 2**63 - 1))
    digest: str = attrs.field(validator=v.text(v.DIGEST))
    parent_digest: str | None = attrs.field(validator=v.text(v.DIGEST, optional=True))
    author: str = attrs.field(validator=v.text(v.LOG_TEXT))
    message: str = attrs.field(validator=v.text(v.LOG_TEXT))
    created_at: float = attrs.field(validator=v.finite())
    state: DesiredState = attrs.field(validator=v.instance(DesiredState))
    signature: str = attrs.field(default="", validator=v.text(v.SIGNATURE))
    key_id: str = attrs.field(default="", validator=v.text(v.KEY_ID))


_PEM_TEXT = v.TextRule(
    "PEM or base64 text (printable ASCII and line breaks)",
    re.compile(r"[\x20-\x7e\r\n]*", re.ASCII),
    max_len=256 * 1024,
    min_len=0,
)
_CERT_STEM = v.TextRule(
    "a bundle path under certs/ without extension",
    re.compile(r"certs/[A-Za-z0-9][A-Za-z0-9._-]*(?:/[A-Za-z0-9][A-Za-z0-9._-]*)*", re.ASCII),
    max_len=256,
)


@attrs.frozen(kw_only=True)
class TlsCertificate:
    """One certificate an agent's sites use, as the master sends it with a version.

    `stem` is the bundle path without extension (``certs/web`` → ``certs/web.crt`` and
    ``certs/web.key``). `key_pem` is the private key: sealed under the agent's session key
    on the wire (``nxmesh.core.protocol``), PEM inside the agent, which encrypts it before
    it touches disk (``nxmesh.certs.AgentKeyVault``). Never cached, logged or repr'd.
    """

    name: str = attrs.field(validator=v.text(v.NAME))
    stem: str = attrs.field(validator=v.text(_CERT_STEM))
    fullchain_pem: str = attrs.field(validator=v.text(_PEM_TEXT), repr=False)
    key_pem: str = attrs.field(validator=v.text(_PEM_TEXT), repr=False)
    not_after: float = attrs.field(default=0.0, validator=v.finite())
    fingerprint: str = attrs.field(default="", validator=v.text(v.KEY_ID))
    placeholder: bool = attrs.field(default=False, validator=v.choice(True, False))


@attrs.frozen(kw_only=True)
class PendingApply:
    """What the agent receives: a version to render and apply.

    From a master it carries the `ConfigVersion`'s metadata (`parent_digest`, `author`,
    `message`, `created_at`) so the agent can rebuild the version's signing payload and
    check the master's Ed25519 `signature` over it (``nxmesh.agent.verify``); `trace` is
    the W3C trace context of the rollout. `certificates` and `challenges` (HTTP-01 token →
    key authorization) are the agent's certificate material for this state: rendered as
    bundle files, never part of the signature, of equality, or of the agent's cache.
    """

    version: int = attrs.field(validator=v.int_range(1, 2**63 - 1))
    digest: str = attrs.field(validator=v.text(v.DIGEST))
    state: DesiredState = attrs.field(validator=v.instance(DesiredState))
    signature: str = attrs.field(default="", validator=v.text(v.SIGNATURE))
    key_id: str = attrs.field(default="", validator=v.text(v.KEY_ID))
    parent_digest: str | None = attrs.field(default=None, validator=v.text(v.DIGEST, optional=True))
    author: str = attrs.field(default="", validator=v.text(v.LOG_TEXT))
    message: str = attrs.field(default="", validator=v.text(v.LOG_TEXT))
    created_at: float = attrs.field(default=0.0, validator=v.finite())
    trace: Mapping[str, str] = attrs.field(factory=FrozenMap, converter=_freeze_str, eq=False)
    certificates: tuple[TlsCertificate, ...] = attrs.field(
        default=(),
        validator=v.count(TlsCertificate, hi=1024, noun="certificate"),
        eq=False,
        repr=False,
    )
    challenges: Mapping[str, str] = attrs.field(
        factory=FrozenMap, converter=_freeze_str, eq=False, repr=False
    )


@attrs.frozen(kw_only=True)
class ApplyReport:
    """The outcome of one apply on one agent."""

    agent_id: str = attrs.field(validator=v.text(v.TOKEN))
    version: int = attrs.field(validator=v.int_range(0, 2**63 - 1))
    digest: str = attrs.field(validator=v.text(v.DIGEST))
    outcome: Literal["applied", "failed", "rolled_back", "noop", "vetoed"] = attrs.field(
        validator=v.choice("applied", "failed", "rolled_back", "noop", "vetoed")
    )
    message: str = attrs.field(default="", converter=_truncate_message, validator=_clip(4096))
    nginx_output: str = attrs.field(default="", converter=_truncate_output, validator=_clip(65536))
    durations: Mapping[str, float] = attrs.field(
        factory=FrozenMap, converter=_freeze_float, validator=v.metrics(hi=64)
    )
    started_at: float = attrs.field(default=0.0, validator=v.finite())
    finished_at: float = attrs.field(default=0.0, validator=v.finite())


HealthStatus = Literal["ok", "warn", "fail"]
_SEVERITY: dict[str, int] = {"ok": 0, "warn": 1, "fail": 2}


@attrs.frozen
class HealthResult:
    """One health check's verdict."""

    check: str = attrs.field(validator=v.text(v.CHECK_NAME))
    status: HealthStatus = attrs.field(validator=v.choice("ok", "warn", "fail"))
    message: str = attrs.field(default="", converter=_truncate_message, validator=_clip(4096))
    metrics: Mapping[str, float] = attrs.field(
        factory=FrozenMap, converter=_freeze_float, validator=v.metrics()
    )


@attrs.frozen
class HealthReport:
    """All health results of one agent at one moment."""

    agent_id: str = attrs.field(validator=v.text(v.TOKEN))
    ts: float = attrs.field(validator=v.finite())
    results: tuple[HealthResult, ...] = attrs.field(
        validator=v.count(HealthResult, hi=256, noun="result")
    )

    @property
    def status(self) -> HealthStatus:
        """The worst status among the results; ``ok`` when there are none."""
        worst: HealthStatus = "ok"
        for result in self.results:
            if _SEVERITY[result.status] > _SEVERITY[worst]:
                worst = result.status
        return worst
