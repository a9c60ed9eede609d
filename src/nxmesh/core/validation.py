"""Anchored allow-lists for every user value that can reach nginx syntax: the injection defence.

The renderer quotes what it writes, but quoting is the second wall, not the first: every
string in the model is matched in full (``re.fullmatch``; ``$`` would also match before a
trailing newline) against an allow-list and a length bound *before* it exists as a model
object. Nothing here escapes or repairs input; anything outside the allow-list is
rejected with a reason a user can act on.

A `TextRule` describes one kind of string; `text`, `each`, `count`, `labels`,
`int_range`... turn rules into attrs validators (`FieldCheck`). The one cattrs converter
(`nxmesh.core.serialization`) runs the same checks field by field while structuring, so
every problem of an input is reported at once with its exact path.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import re
import unicodedata
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

import attrs

__all__ = [
    "ALLOWED_CLIENT",
    "AUTH_REALM",
    "AUTH_USER",
    "BIDI_CONTROLS",
    "CERT_DOMAIN",
    "CHECK_NAME",
    "CONTROL_CHARACTERS",
    "DIGEST",
    "ERROR_PAGE_BODY",
    "FALLBACK_URI",
    "FASTCGI_PARAM",
    "FILE_NAME",
    "HEADER_NAME",
    "HEADER_VALUE",
    "KEY_ID",
    "LABEL_KEY",
    "LABEL_VALUE",
    "LISTEN_ADDRESS",
    "LOCATION_PATH",
    "LOG_TEXT",
    "NAME",
    "PASSWORD_HASH",
    "POSIX_CLASSES",
    "REDIRECT_URL",
    "REGEX_PATH",
    "RETURN_BODY",
    "ROOT_PATH",
    "SERVER_NAME",
    "SIGNATURE",
    "SIZE",
    "SNI_NAME",
    "TLS_PROTOCOL",
    "TLS_SERVER_NAME",
    "TOKEN",
    "TRUSTED_PROXY",
    "UPSTREAM_ADDRESS",
    "FieldCheck",
    "Invalid",
    "TextRule",
    "choice",
    "count",
    "describe",
    "each",
    "each_int",
    "explain",
    "finite",
    "instance",
    "int_range",
    "join_path",
    "labels",
    "metrics",
    "new_text_reason",
    "printable",
    "quote_hint",
    "raise_problems",
    "size_reason",
    "text",
    "upstream_address_hazard",
]

# ---------------------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------------------


class Invalid(ValueError):
    """A model rule was broken; carries ``(relative path, reason)`` pairs, all of them.

    Paths are relative to the object (or field) that raised, in the user-facing
    ``locations[0].path`` style; ``""`` means "this very value".
    """

    def __init__(self, problems: Iterable[tuple[str, str]]) -> None:
        self.problems: tuple[tuple[str, str], ...] = tuple(problems)
        super().__init__("; ".join(f"{p}: {r}" if p else r for p, r in self.problems))


def join_path(base: str, rel: str) -> str:
    """Append a relative path: ``join_path("sites[0]", "name") == "sites[0].name"``."""
    if not base:
        return rel
    if not rel:
        return base
    return base + rel if rel.startswith("[") else f"{base}.{rel}"


def raise_problems(problems: Sequence[tuple[str, str]]) -> None:
    """Raise `Invalid` when there is anything to report (used by ``__attrs_post_init__``)."""
    if problems:
        raise Invalid(problems)


_TYPE_NAMES: Final[dict[type, str]] = {
    type(None): "null",
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    tuple: "a list",
    dict: "a mapping",
}


def type_name(value: object) -> str:
    """Name a value's type the way a YAML author thinks of it, without showing the value
    (for secrets: a password sent as a number must not come back in the error)."""
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def describe(value: object) -> str:
    """Name a value's type the way a YAML author thinks of it, with a short preview."""
    name = type_name(value)
    if isinstance(value, str):
        return f"{name} {_short(value)}"
    if isinstance(value, int | float):
        return f"{name} ({value!r})"
    return name


def quote_hint(value: object) -> str:
    """What to do when YAML made `value` a boolean or a number where a string belongs
    (``value: no``, ``version: 1.10``): "" for other values."""
    if isinstance(value, bool):
        return (
            "; write it as a quoted string (YAML reads unquoted yes, no, on, off, true "
            "and false as booleans)"
        )
    if isinstance(value, int | float):
        return "; put the value in quotes to keep it as written"
    return ""


def _short(value: str, limit: int = 40) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")


# ---------------------------------------------------------------------------------------
# Explaining a rejected string
# ---------------------------------------------------------------------------------------

# Why each dangerous character is refused, in the words an operator understands.
_DANGER = {
    ";": "contains ';' which would end an nginx directive",
    "{": "contains '{' which would open an nginx block",
    "}": "contains '}' which would close an nginx block",
    '"': "contains a double quote which could break out of nginx quoting",
    "'": "contains a single quote which could break out of nginx quoting",
    "`": "contains a backtick",
    "\\": "contains a backslash which could escape nginx quoting",
    "#": "contains '#' which would start an nginx comment and hide the rest of the line",
    "$": "contains '$' which nginx would expand as a variable",
}


def _explain_char(ch: str, nginx: bool = True) -> str | None:
    if not nginx:  # a value that never reaches nginx: name the character, not a danger
        if ch in "\n\r\u2028\u2029\u0085":
            return "contains a line break"
        if ch.isspace():
            return "contains whitespace"
        if ch in _DANGER or (ch.isascii() and ch.isprintable()):
            return None  # the rule's "must be ..." says what is allowed
    if ch in "\n\r":
        return "contains a line break, which would start a new nginx directive"
    if ch == "\0":
        return "contains a NUL byte"
    if ch in "\u2028\u2029\u0085":
        return f"contains the Unicode line separator U+{ord(ch):04X}"
    if ch in _DANGER:
        return _DANGER[ch]
    if ch.isspace():
        return "contains whitespace, which would split the nginx directive"
    if unicodedata.category(ch) == "Cs":
        return (
            f"contains U+{ord(ch):04X}, half of a UTF-16 surrogate pair: not a character, "
            "and not storable as UTF-8"
        )
    if unicodedata.category(ch).startswith("C"):
        return f"contains the control character U+{ord(ch):04X}"
    if not ch.isascii():
        return f"contains the non-ASCII character {ch!r} (U+{ord(ch):04X})"
    return None


def explain(value: str, allowed: str = "", *, nginx: bool = True) -> str | None:
    """The reason for the first character of `value` that is dangerous in nginx syntax
    (with `nginx` False, for a value that never reaches nginx: the first character that
    is unprintable, whitespace or not ASCII, without an nginx consequence).

    Characters in `allowed` are legitimate for the rule at hand and skipped; line breaks
    and control characters are always explained first because they are the worst.
    """
    for ch in value:
        if ch not in allowed and (ch in "\n\r\0\u2028\u2029\u0085" or not ch.isprintable()):
            return _explain_char(ch, nginx)
    for ch in value:
        if ch not in allowed and (reason := _explain_char(ch, nginx)) is not None:
            return reason
    return None


# ---------------------------------------------------------------------------------------
# Rules for strings
# ---------------------------------------------------------------------------------------


@attrs.frozen
class TextRule:
    """One kind of string: an anchored allow-list, a length bound and an optional refining check.

    `what` completes "must be ..." in error messages. `allowed` lists the special
    characters the pattern itself allows (so they are not blamed). `refine` runs after the
    pattern matched and returns a reason or None. `nginx` False marks values that never
    reach nginx syntax (labels, identifiers, roles): their errors do not speak of it.
    """

    what: str
    pattern: re.Pattern[str]
    max_len: int
    min_len: int = 1
    allowed: str = ""
    refine: Callable[[str], str | None] | None = None
    nginx: bool = True
    echo: bool = True
    """False: reasons never quote the value (a password typed where its hash belongs)."""

    def reason(self, value: object) -> str | None:
        """Why `value` is not acceptable, or None when it is."""
        if not isinstance(value, str):
            return f"must be a string, got {describe(value)}{quote_hint(value)}"
        if len(value) < self.min_len:
            return (
                "must not be empty"
                if self.min_len == 1
                else (f"must be at least {self.min_len} characters long")
            )
        if len(value) > self.max_len:
            if not self.echo:  # not even its length
                return f"is longer than {self.max_len} characters"
            return f"is {len(value)} characters long; at most {self.max_len} are allowed"
        if self.pattern.fullmatch(value) is None:
            # A secret's reason names no character of it: only what the value must be.
            danger = explain(value, self.allowed, nginx=self.nginx) if self.echo else None
            if danger is None and self.echo and self.pattern.fullmatch(value.lower()):
                danger = f"has uppercase letters ({value.lower()!r} would do)"
            return f"{danger}; must be {self.what}" if danger else f"must be {self.what}"
        return self.refine(value) if self.refine is not None else None


def _rx(pattern: str) -> re.Pattern[str]:
    # ASCII: \w and friends never widen to Unicode; fullmatch anchors both ends.
    return re.compile(pattern, re.ASCII)


_DNS_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME = rf"{_DNS_LABEL}(?:\.{_DNS_LABEL})*"
# Upstream hosts are resolved, never matched: allow uppercase and '_' (docker service names).
_HOST_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOST = rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*"


def _hostname_refine(value: str) -> str | None:
    if value.startswith("*.") and "." not in value[2:]:
        return "a wildcard must cover a subdomain of a real domain, like *.example.com"
    return None


NAME = TextRule(
    "a lowercase name like 'web-1': a letter, then letters, digits, '_' or '-' (max 63)",
    _rx(r"[a-z][a-z0-9_-]{0,62}"),
    max_len=63,
)
SERVER_NAME = TextRule(
    "a hostname like example.com or *.example.com (or '_' for any name); "
    "use punycode (xn--) for international names",
    _rx(rf"(?:\*\.)?{_HOSTNAME}|_"),
    max_len=253,
    refine=_hostname_refine,
)


def _tls_name_refine(value: str) -> str | None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return None
    return (
        "is an IP address: nginx sends no SNI for one and checks certificates by DNS name "
        "only; use the name the servers' certificates carry"
    )


TLS_SERVER_NAME = TextRule(
    "a hostname like api.internal (lowercase letters, digits, '-' and dots)",
    _rx(_HOSTNAME),
    max_len=253,
    refine=_tls_name_refine,
)
CERT_DOMAIN = TextRule(
    "a domain like example.com or *.example.com",
    _rx(rf"(?:\*\.)?{_HOSTNAME}"),
    max_len=253,
    refine=_hostname_refine,
)


def _sni_refine(value: str) -> str | None:
    if value.replace(".", "").isdigit():
        return (
            "is an IP address, which a TLS handshake never names (SNI carries DNS names "
            "only): route by the name clients connect to"
        )
    return _hostname_refine(value)


SNI_NAME = TextRule(
    "a name like mail.example.com or *.example.com",
    _rx(rf"(?:\*\.)?{_HOSTNAME}"),
    max_len=253,
    refine=_sni_refine,
)

# Header values end up inside a quoted nginx string: printable ASCII minus " # $ ; \ { }.
_SAFE_TEXT = r"[ !%-:<-\[\]-z|~]"
HEADER_NAME = TextRule(
    "an HTTP header name like X-Frame-Options (letters, digits and '-')",
    _rx(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}"),
    max_len=64,
)
FASTCGI_PARAM = TextRule(
    "a FastCGI parameter name like APP_ENV: an uppercase letter, then uppercase letters, "
    "digits or '_' (max 64)",
    _rx(r"[A-Z][A-Z0-9_]{0,63}"),
    max_len=64,
)
HEADER_VALUE = TextRule(
    'printable ASCII text without " # $ ; \\ { }',
    _rx(rf"{_SAFE_TEXT}*"),
    max_len=1024,
    allowed=" '",
)
RETURN_BODY = TextRule(
    'short printable ASCII text without " # $ ; \\ { }',
    _rx(rf"{_SAFE_TEXT}*"),
    max_len=1024,
    min_len=0,
    allowed=" '",
)

_URI_CHARS = r"(?:[A-Za-z0-9._~!*()@:+,=/&-]|%[0-9A-Fa-f]{2})"
LOCATION_PATH = TextRule(
    "a URI path starting with '/' (letters, digits and ._~!*()@:+,=/-)",
    _rx(rf"/{_URI_CHARS}*"),
    max_len=512,
    allowed="%",
)

# nginx does not decode or normalise the URI try_files redirects to: '..' would climb
# out of the location (past its root, into the ACME alias), '%XX' would never match.
_FALLBACK_CHAR = r"[A-Za-z0-9_~!*()@:+,=&-]"  # '.' aside
_FALLBACK_SEGMENT = rf"\.*{_FALLBACK_CHAR}[A-Za-z0-9._~!*()@:+,=&-]*"  # not all dots
FALLBACK_URI = TextRule(
    "a file's URI path like /index.html: segments of letters, digits and ._~!*()@:+,=&- "
    "(no '.' or '..' segment, no '//', no %XX escapes: nginx uses it as written)",
    _rx(rf"/|(?:/{_FALLBACK_SEGMENT})+/?"),
    max_len=512,
)


def _redirect_refine(value: str) -> str | None:
    if value.startswith("//"):
        return "a protocol-relative URL is ambiguous; write https://host/... instead"
    m = re.match(r"https?://(\[([^\]]*)\]|[^/?:$]*)(?::([0-9]+))?", value)
    if m is not None:
        if m.group(2) is not None and (reason := _ip_reason(m.group(2), version=6)):
            return reason
        if m.group(3) is not None:
            return _port_reason(m.group(3))
    return None


REDIRECT_URL = TextRule(
    "an http(s):// URL or an absolute path like /new, optionally ending in $request_uri "
    "(the only variable allowed)",
    _rx(
        rf"(?:https?://(?:{_HOST}|\[[0-9A-Fa-f:.]+\])(?::[0-9]{{1,5}})?(?:/{_URI_CHARS}*)?"
        rf"|/{_URI_CHARS}*)"
        rf"(?:\?(?:{_URI_CHARS}|\?)*)?"
        r"(?:\$request_uri)?"
    ),
    max_len=2048,
    allowed="%?",
    refine=_redirect_refine,
)

# Directories nginx must never serve, nor serve a parent of: system configuration and
# state, other services' data and our own (the agent's vault lives under /var/lib, and
# nginx workers run as the agent's user). Content belongs under /srv or /var/www.
_PROTECTED_ROOTS = (
    "/etc",
    "/proc",
    "/sys",
    "/dev",
    "/boot",
    "/root",
    "/run",
    "/var/lib",
    "/var/log",
    "/var/cache",
    "/var/spool",
    "/var/mail",
    "/var/backups",
    "/var/tmp",  # noqa: S108 - refused as a root, never written to
    "/var/run",
    "/var/lock",  # a link to /run/lock
    "/var/crash",  # core dumps: process memory, keys included
    "/tmp",  # noqa: S108 - refused as a root, never written to
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
)
_CONTENT_DIRS = "/srv/www/<site> or /var/www/<site>"


def _root_refine(value: str) -> str | None:
    segments = [s for s in value.split("/") if s]
    use = f"use a content directory like {_CONTENT_DIRS}"
    if not segments:
        return f"root '/' would expose the whole filesystem; {use}"
    if any(s in (".", "..") for s in segments):
        return "must not contain '.' or '..' segments"
    normal = "/" + "/".join(segments)
    for protected in _PROTECTED_ROOTS:
        if normal == protected:
            return f"root {normal} is a protected system directory; {use}"
        if normal.startswith(protected + "/"):
            return f"root {normal} is inside the protected system directory {protected}; {use}"
        # A parent serves everything below it: root /var serves /var/lib/dpkg/status.
        if protected.startswith(normal + "/"):
            return f"root {normal} would expose the protected system directory {protected}; {use}"
    # A home directory holds ~/.ssh and shell history; a directory inside it is fine.
    if segments == ["home"]:
        return (
            f"root /home would expose every user's ~/.ssh keys; use a directory inside a "
            f"home like /home/<user>/www, or {_CONTENT_DIRS}"
        )
    if segments[0] == "home" and len(segments) == 2:
        return (
            f"root {normal} is a home directory and would expose its ~/.ssh keys; use a "
            f"directory inside it like {normal}/www, or {_CONTENT_DIRS}"
        )
    # Dot directories (.ssh, .git, .aws) hold keys, credentials and history.
    if hidden := next((s for s in segments if s.startswith(".")), None):
        return f"root {normal} goes through the hidden directory {hidden!r}; {use}"
    return None


ROOT_PATH = TextRule(
    "an absolute directory path like /srv/www (letters, digits and ._-)",
    _rx(r"/(?:[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*/?)?"),
    max_len=512,
    refine=_root_refine,
)
FILE_NAME = TextRule(
    "a file name like index.html (letters, digits and ._-)",
    _rx(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}"),
    max_len=128,
)
SIZE = TextRule(
    "a size like 10m: digits with an optional k, m or g suffix",
    _rx(r"[0-9]{1,9}[kKmMgG]?"),
    max_len=10,
)


def size_reason(value: object) -> str | None:
    """Why `value` is not a non-zero nginx size (``SIZE``: a bound, where 0 means none
    allowed), or None."""
    reason = SIZE.reason(value)
    if reason is None and isinstance(value, str) and int(value.rstrip("kKmMgG")) == 0:
        return f"must be more than 0, got {value!r}"
    return reason


TLS_PROTOCOL = TextRule(
    "TLSv1.2 or TLSv1.3",
    _rx(r"TLSv1\.[23]"),
    max_len=7,
)

# Kubernetes label syntax: optional DNS-subdomain prefix and '/', then a 63-char name.
_LABEL_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?"
LABEL_KEY = TextRule(
    "a label key like 'env' or 'example.com/tier' (letters, digits and ._-, max 63, "
    "optional DNS prefix and '/')",
    _rx(rf"(?:{_HOSTNAME}/)?{_LABEL_NAME}"),
    max_len=253 + 1 + 63,
    refine=lambda v: (
        "the prefix before '/' must be at most 253 characters"
        if "/" in v and len(v.split("/", 1)[0]) > 253
        else None
    ),
    nginx=False,
)
LABEL_VALUE = TextRule(
    "a label value (letters, digits and ._-, starting and ending alphanumeric, max 63)",
    _rx(rf"(?:{_LABEL_NAME})?"),
    max_len=63,
    min_len=0,
    nginx=False,
)
TOKEN = TextRule(
    "an identifier (letters, digits and ._:+/-)",
    _rx(r"[A-Za-z0-9][A-Za-z0-9._:+/-]{0,127}"),
    max_len=128,
    nginx=False,
)
ROLE_BINDING = TextRule(
    "a role like 'operator', or one bound to a workspace like 'viewer@staging'",
    _rx(r"[a-z][a-z0-9_-]{0,62}(?:@[a-z0-9][a-z0-9_-]{0,62})?"),
    max_len=127,
    nginx=False,
)
KEY_ID = TextRule(
    "a key id (letters, digits and ._:+-) or empty",
    _rx(r"[A-Za-z0-9._:+-]*"),
    max_len=128,
    min_len=0,
)
CHECK_NAME = TextRule(
    "a check or metric name (letters, digits and ._:-)",
    _rx(r"[A-Za-z0-9_][A-Za-z0-9._:-]{0,127}"),
    max_len=128,
)
DIGEST = TextRule(
    "a digest (letters, digits and :._-)",
    _rx(r"[A-Za-z0-9:._-]{1,128}"),
    max_len=128,
)
SIGNATURE = TextRule(
    "base64 text",
    _rx(r"[A-Za-z0-9+/=_-]*"),
    max_len=4096,
    min_len=0,
)
CONTROL_CHARACTERS: Final = frozenset(
    [*range(0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0), 0x2028, 0x2029]
)
"""Code points `LOG_TEXT` refuses: C0 and C1 controls but tab and newline, DEL, and the
Unicode line and paragraph separators (a log reader breaks lines there)."""
BIDI_CONTROLS: Final = frozenset([*range(0x202A, 0x202F), *range(0x2066, 0x206A)])
"""The bidirectional embeddings, overrides and isolates ("Trojan Source",
CVE-2021-42574): a terminal shows text holding them in another order than its own, so a
commit message could read as something it is not. New text is checked with
`new_text_reason`; `LOG_TEXT` itself still admits them, so text stored before this rule
(version messages, statuses) still loads."""


def _class_of(points: frozenset[int]) -> str:
    return "".join(f"\\u{p:04x}" for p in sorted(points))


# Lone surrogates (JSON's "\ud800" decodes to one) are no characters: UTF-8 cannot hold
# them, so a state or a message with one could be neither hashed nor stored.
_SURROGATES: Final = r"\ud800-\udfff"

# Free text that never reaches nginx (commit messages, authors): bounded, no control chars
# other than newline and tab, so it cannot forge log lines or terminal escapes.
LOG_TEXT = TextRule(
    "text without control characters",
    _rx(f"[^{_class_of(CONTROL_CHARACTERS)}{_SURROGATES}]*"),
    max_len=4096,
    min_len=0,
    allowed="\n\t",
)


# An error page's HTML: a file of the bundle nginx serves as is, never nginx syntax. No
# control characters but tab and line ends (an editor's CR LF included).
ERROR_PAGE_BODY = TextRule(
    "HTML text without control characters",
    _rx(f"[^{_class_of(CONTROL_CHARACTERS - {0x0D})}{_SURROGATES}]+"),
    max_len=65_536,
    allowed="\n\t\r",
    nginx=False,
)


_UNPRINTABLE: Final = dict.fromkeys(CONTROL_CHARACTERS | BIDI_CONTROLS)


def printable(text: str) -> str:
    """`text` without the characters `LOG_TEXT` refuses and the bidirectional controls:
    what a peer's free text (nginx's output, an agent's error) keeps before it is stored
    or shown, so a terminal shows it as written."""
    return text.translate(_UNPRINTABLE)


def new_text_reason(text: str) -> str | None:
    """`LOG_TEXT`'s reason to refuse `text`, or the bidirectional control it holds."""
    reason = LOG_TEXT.reason(text)
    if reason is not None:
        return reason
    found = next((c for c in text if ord(c) in BIDI_CONTROLS), None)
    if found is None:
        return None
    return (
        f"contains U+{ord(found):04X}, a bidirectional control character: terminals would "
        "show the text in another order than it is written; remove it"
    )


# ---------------------------------------------------------------------------------------
# Structured strings: addresses and regular expressions
# ---------------------------------------------------------------------------------------


def _port_reason(port: str) -> str | None:
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"port {port!r} must be a number from 1 to 65535"
    return None


def _ip_reason(host: str, *, version: int) -> str | None:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return f"{host!r} is not a valid IPv{version} address"
    return None if ip.version == version else f"{host!r} is not a valid IPv{version} address"


_ADDRESS_FORMS = "host:port, IPv4:port, [IPv6]:port or unix:/path/to.sock"
# Cloud instance-metadata services outside the link-local ranges (AWS's IPv6 one).
_METADATA_ADDRESSES: Final = frozenset({ipaddress.ip_address("fd00:ec2::254")})


def _upstream_ip_reason(host: str, *, version: int) -> str | None:
    """`_ip_reason`, and no link-local or metadata address: an upstream there would
    publish the host's instance metadata (cloud credentials) through nginx."""
    reason = _ip_reason(host, version=version)
    if reason is not None:
        return reason
    ip = ipaddress.ip_address(host)
    target = getattr(ip, "ipv4_mapped", None) or ip
    if target.is_link_local or target in _METADATA_ADDRESSES:
        return (
            f"{host!r} is a link-local or instance-metadata address (169.254.169.254 and "
            "the like): nginx would publish the host's own cloud credentials; not "
            "allowed as an upstream"
        )
    return None


# Sockets that control the host: whoever reaches a site proxying to one could start a
# privileged container (Docker, containerd, Podman, CRI-O, BuildKit), drive systemd or
# D-Bus, or manage snaps, VMs and LXD. By file name anywhere (a bind mount can put
# /var/run/docker.sock at /docker.sock) and by the directories those services own.
_CONTROL_SOCKETS: Final = frozenset(
    {
        "docker.sock",
        "containerd.sock",
        "podman.sock",
        "crio.sock",
        "dockershim.sock",
        "buildkitd.sock",
        "kubelet.sock",
        "snapd.socket",
        "snapd-snap.socket",
        "system_bus_socket",
        "libvirt-sock",
        "balena-engine.sock",  # the Docker API
    }
)
_CONTROL_SOCKET_DIRS: Final = (
    "/run/containerd",
    "/run/docker",
    "/run/podman",
    "/run/crio",
    "/run/dbus",
    "/run/systemd",
    "/run/user",  # rootless Docker and Podman, each user's systemd and D-Bus
    "/run/libvirt",
    "/run/k3s",
    "/run/lxd",
    "/run/incus",
    "/var/lib/docker",
    "/var/lib/containerd",
    "/var/lib/kubelet",
    "/var/lib/lxd",
    "/var/lib/incus",
    "/var/snap/lxd",
)
# A unix socket path is at most 107 bytes (sun_path holds 108 with the final NUL);
# nginx -t fails on a longer one.
_SUN_PATH_MAX: Final = 107


def _unix_socket_reason(path: str) -> str | None:
    if re.fullmatch(r"/[A-Za-z0-9._/-]{1,200}", path, re.ASCII) is None:
        return "a unix socket must be an absolute path like unix:/run/app.sock"
    if any(s in (".", "..") for s in path.split("/")):
        return "a unix socket path must not contain '.' or '..' segments"
    return None


def upstream_address_hazard(value: str) -> str | None:
    """Why an upstream address that `UPSTREAM_ADDRESS` accepts must still not be used in
    new input: a control socket or API of the host, or a socket path nginx cannot bind.

    Checked when a state is submitted (`model.check_state`), not when a stored one is
    read: versions stored before these rules still load (their history, a diff), and a
    rollback to one is a new submission, checked again.
    """
    if value.startswith("unix:"):
        return _control_socket_reason(value[5:])
    port = value.rpartition(":")[2]
    if port in ("2375", "2376"):
        return (
            f"port {port} is the Docker daemon's API: whoever reaches the site would "
            "control the host; not allowed as an upstream"
        )
    return None


def _control_socket_reason(path: str) -> str | None:
    if len(path) > _SUN_PATH_MAX:
        return f"a unix socket path is at most {_SUN_PATH_MAX} bytes, this one {len(path)}"
    segments = [s for s in path.split("/") if s]
    if segments and segments[0] in ("proc", "dev"):
        # /proc/self/root/… and /dev/fd/… reach any path the workers can, past the names
        # and directories below.
        return f"unix:{path} is under /{segments[0]}; use the socket's own path"
    # /var/run is a link to /run on every current distribution; the directories are
    # matched at any depth too (a host's root bind-mounted at /host).
    normal = ("/" + "/".join(segments)).replace("/var/run/", "/run/")
    name = segments[-1] if segments else ""
    if name in _CONTROL_SOCKETS or any(d + "/" in normal for d in _CONTROL_SOCKET_DIRS):
        return (
            f"unix:{path} is the control socket of a container runtime or system service "
            "(Docker, containerd, systemd, D-Bus and the like): whoever reaches the site "
            "would control the host; not allowed as an upstream"
        )
    return None


def _upstream_address_refine(value: str) -> str | None:
    if value.startswith("unix:"):
        return _unix_socket_reason(value[5:])
    scheme, sep, rest = value.partition("://")
    if sep and scheme.isalpha():
        bare = rest.rstrip("/") or "backend:8080"
        https = " and give the upstream tls (its server_name)" if scheme == "https" else ""
        return (
            f"is an address, not a URL: write {bare!r}{https}. Locations proxy over plain "
            "HTTP unless the upstream has tls; FastCGI backends are not supported"
        )
    if value.startswith("["):
        m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:([0-9]+)", value)
        if m is None:
            return f"must be {_ADDRESS_FORMS}; an IPv6 address needs a port, like [::1]:8080"
        return _upstream_ip_reason(m.group(1), version=6) or _port_reason(m.group(2))
    host, sep, port = value.rpartition(":")
    if not sep or not port:
        return f"needs a port, like {value or 'backend'}:8080 (or unix:/path.sock)"
    if ":" in host:
        return "an IPv6 address must be written in brackets, like [::1]:8080"
    if re.fullmatch(r"[0-9.]+", host):
        return _upstream_ip_reason(host, version=4) or _port_reason(port)
    if re.fullmatch(_HOST, host, re.ASCII) is None or len(host) > 253:
        return f"{host!r} is not a valid hostname; must be {_ADDRESS_FORMS}"
    return _port_reason(port)


UPSTREAM_ADDRESS = TextRule(
    _ADDRESS_FORMS,
    _rx(r"[A-Za-z0-9._:/\[\]-]+"),
    max_len=260,
    allowed=":/[]",
    refine=_upstream_address_refine,
)


def _listen_refine(value: str) -> str | None:
    if value == "*":
        return None
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return f"{value!r} is not a valid IPv4 or IPv6 address (or '*')"
    return None


LISTEN_ADDRESS = TextRule(
    "an IPv4 or IPv6 address, or '*'",
    _rx(r"\*|[0-9A-Fa-f:.]{2,45}"),
    max_len=45,
    refine=_listen_refine,
)


def _network_refine(value: str, *, every: str, widest: int = 1) -> str | None:
    try:
        network = ipaddress.ip_network(value)
    except ValueError:
        try:
            loose = ipaddress.ip_network(value, strict=False)
        except ValueError:
            return f"{value!r} is not an IPv4 or IPv6 address or network"
        # nginx takes 10.0.0.1/8 with a warning ("low address bits are meaningless"):
        # say what it means rather than let the operator believe one host was meant.
        return f"{value!r} has host bits set; the network is {loose}"
    if network.prefixlen == 0:
        return f"{value!r} is every address: {every}"
    if network.prefixlen < widest:
        return f"{value!r} is wider than a /{widest}: {every}"
    return None


_NETWORK_FORMS: Final = (
    "an IPv4 or IPv6 address or network in CIDR form (10.0.0.0/8, 2001:db8::/32)"
)
_NETWORK_PATTERN: Final = _rx(r"[0-9A-Fa-f:.]{2,45}(?:/[0-9]{1,3})?")

ALLOWED_CLIENT = TextRule(
    _NETWORK_FORMS,
    _NETWORK_PATTERN,
    max_len=49,
    allowed=":/",
    refine=functools.partial(_network_refine, every="an empty list already lets every client in"),
)
"""A client address or network nginx's ``allow`` admits."""

TRUSTED_PROXY = TextRule(
    _NETWORK_FORMS,
    _NETWORK_PATTERN,
    max_len=49,
    allowed=":/",
    refine=functools.partial(
        _network_refine,
        every="trusting it would let any client choose the address nginx sees by sending "
        "its own header; list the load balancers' addresses",
        widest=8,  # 0.0.0.0/1 + 128.0.0.0/1 is every address too
    ),
)
"""A proxy address or network whose client-address header nginx believes (``set_real_ip_from``)."""

AUTH_USER = TextRule(
    "a user name of letters, digits and ._@- (starting with a letter or digit, max 64)",
    _rx(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}"),
    max_len=64,
    allowed="@",
    nginx=False,
)
"""A basic-auth user name: a line of the htpasswd file, up to its ':'."""

AUTH_REALM = TextRule(
    "a realm of letters, digits, spaces and ._- (max 64)",
    _rx(r"[A-Za-z0-9._-](?:[A-Za-z0-9 ._-]{0,62}[A-Za-z0-9._-])?"),
    max_len=64,
    allowed=" ",
    # nginx reads the realm "off" as switching authentication off.
    refine=lambda value: (
        "'off' would switch authentication off in nginx; choose another realm"
        if value.lower() == "off"
        else None
    ),
)
"""What the browser's login prompt shows (``auth_basic``)."""

_CRYPT_CHARS = r"[./A-Za-z0-9]"
_HASH_FORMS: Final = (
    "a password hash: bcrypt ($2y$…, `htpasswd -nbB user PASSWORD`), SHA-512 or SHA-256 "
    "crypt ($6$… / $5$…, `openssl passwd -6`) or Apache MD5 ($apr1$…, `openssl passwd "
    "-apr1`); never the password itself"
)
_MAX_BCRYPT_COST: Final = 12
_MAX_SHA_ROUNDS: Final = 100_000


def _hash_refine(value: str) -> str | None:
    # nginx checks a password inside a worker, which serves nothing else meanwhile: a
    # costly hash lets anyone who knows a user name stall it (cost 31 is ~30 hours).
    slow = (
        "nginx checks the password inside a worker that serves nothing else meanwhile, "
        "so a slower hash lets anyone stall it with wrong passwords"
    )
    if value.startswith("$2") and int(value[4:6]) > _MAX_BCRYPT_COST:
        return f"has a bcrypt cost of {int(value[4:6])}; at most {_MAX_BCRYPT_COST}: {slow}"
    if (found := re.match(r"\$[56]\$rounds=([0-9]+)\$", value)) and int(found[1]) > _MAX_SHA_ROUNDS:
        return f"has {found[1]} rounds; at most {_MAX_SHA_ROUNDS:,}: {slow}"
    return None


PASSWORD_HASH = TextRule(
    _HASH_FORMS,
    _rx(
        rf"\$2[aby]\$(?:0[4-9]|[12][0-9]|3[01])\${_CRYPT_CHARS}{{53}}"
        # libxcrypt refuses rounds below 1000 or with a leading zero; each digest length
        # belongs to its algorithm (43 for SHA-256, 86 for SHA-512).
        rf"|\$5\$(?:rounds=[1-9][0-9]{{3,8}}\$)?{_CRYPT_CHARS}{{1,16}}\${_CRYPT_CHARS}{{43}}"
        rf"|\$6\$(?:rounds=[1-9][0-9]{{3,8}}\$)?{_CRYPT_CHARS}{{1,16}}\${_CRYPT_CHARS}{{86}}"
        rf"|\$apr1\${_CRYPT_CHARS}{{1,8}}\${_CRYPT_CHARS}{{22}}"
    ),
    max_len=160,
    allowed="$./=",
    refine=_hash_refine,
    nginx=False,
    echo=False,
)
"""A crypt(3)-style hash for an htpasswd file. The reason for a refusal never quotes the
value (it may be a password typed where its hash belongs)."""

# Escapes a location regex may use. No digits or \k / \g (backreferences), no \\ (which
# could neutralise the renderer's quoting), no \Q..\E, \x or \u.
_REGEX_ESCAPES = frozenset(".-/()[]+*?|^dDwWsSbB")
_REGEX_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._~!*()@:+,=/%^|?[]-\\{}"
)
# A repetition count: {3}, {2,5}, {2,}. Not {,5}: PCRE before 10.43 reads it literally.
_COUNT: Final = re.compile(r"\{(0|[1-9][0-9]{0,2})(,(0|[1-9][0-9]{0,2})?)?\}")
_LOOSE_COUNT: Final = re.compile(r"\{[0-9]+(?:,[0-9]*)?\}")
_MAX_COUNT: Final = 255
_COUNT_FORMS: Final = "a repetition count after an atom, like {3}, {2,5} or {2,}"


def _count_bounds(found: re.Match[str]) -> tuple[int, int | None]:
    """The lower and upper bound of a `_COUNT` match; None: no upper bound (``{2,}``)."""
    low = int(found[1])
    if found[2] is None:
        return low, low
    return low, int(found[3]) if found[3] else None


def _count_reason(body: str, i: int, after_atom: bool) -> tuple[str | None, int]:
    """Why the '{' at ``body[i]`` is not an acceptable repetition count (or None), and
    the index after it. The renderer always quotes a regex, so braces cannot open an
    nginx block; they must still be a count PCRE and Python agree on."""
    found = _COUNT.match(body, i)
    if found is None and (loose := _LOOSE_COUNT.match(body, i)) is not None:
        return f"repetition count {loose[0]} has a leading zero", loose.end()
    if found is None or not after_atom:
        return f"'{{' is only allowed in {_COUNT_FORMS}", i + 1
    low, high = _count_bounds(found)
    if max(low, high or 0) > _MAX_COUNT:
        return f"repetition count {found[0]} exceeds {_MAX_COUNT}", found.end()
    if high is not None and high < low:
        return f"repetition count {found[0]} has its bounds the wrong way round", found.end()
    return None, found.end()


def _regex_refine(value: str) -> str | None:
    body = value[:-1] if value.endswith("$") and not value.endswith("\\$") else value
    if not body:
        return "must match something besides the '$' anchor"
    for ch in body:
        if ch == "$":
            return (
                "contains '$' which nginx would expand as a variable "
                "(only a trailing '$' anchor is allowed)"
            )
        if ch not in _REGEX_CHARS:
            return explain(ch) or f"contains {ch!r}, which is not allowed in a location regex"
    i = 0
    after_atom = False  # whether a repetition count may follow here
    lookarounds: list[bool] = []  # per open group: whether it is (?= or (?!
    while i < len(body):
        ch = body[i]
        if ch == "\\":
            nxt = body[i + 1] if i + 1 < len(body) else ""
            if nxt.isdigit() or nxt in ("k", "g"):
                return "backreferences are not allowed in a location regex"
            if nxt not in _REGEX_ESCAPES:
                return f"the escape '\\{nxt}' is not allowed in a location regex"
            i, after_atom = i + 2, nxt not in "bB"
            continue
        if body.startswith("(?", i) and not body.startswith(("(?:", "(?=", "(?!"), i):
            return "only the (?: (?= and (?! group forms are allowed in a location regex"
        if ch == "[":
            end = _class_end(body, i)
            if "{" in body[i:end] or "}" in body[i:end]:
                return "'{' and '}' are not allowed in a character class"
            i, after_atom = end, True
            continue
        if ch == "{":
            reason, i = _count_reason(body, i, after_atom)
            if reason is not None:
                return reason
            after_atom = False
            continue
        if ch == "}":
            return f"'}}' is only allowed to close {_COUNT_FORMS}"
        if ch == "(":
            lookarounds.append(body.startswith(("(?=", "(?!"), i))
        # A lookaround matches no characters: nothing to count (PCRE would take it).
        after_atom = ch not in "(|^*+?" and not (ch == ")" and lookarounds and lookarounds.pop())
        i += 1
    reason, python_form = _check_classes(body)
    if reason is not None:
        return reason
    try:
        re.compile(python_form + value[len(body) :])
    except re.error as exc:
        return f"is not a valid regular expression: {exc}"
    if (group := _repeated_risky_group(body)) is not None:
        return (
            f"repeats the group {group!r}, which holds an alternative ('|') or a quantifier "
            "(?, +, *, {n,m}): it can take exponential time to match (catastrophic backtracking) "
            "and nginx's PCRE then fails the request; repeat a character class instead, "
            "like [ab]+ for (a|b)+"
        )
    return _backtracking_reason(body)


def _backtracking_reason(body: str) -> str | None:
    """Why `body` can make PCRE backtrack without a repeated group, or None.

    - Two repetitions (``*``, ``+``) that can match a common character with nothing
      between them that the first cannot match (``\\d*\\d*``, ``.*.*``, ``(\\w+)(\\d+)``,
      ``\\d*\\d\\d*``, ``.*/.*``): a run of such characters splits between them in
      quadratic ways, and each further one multiplies that; a crafted URI then costs a
      worker PCRE's whole match limit and the request fails. A required atom the first
      cannot match separates them (``[^/]*/.*``).
    - More than `_MAX_REGEX_PATHS` ways through its alternatives (``(a|a)`` 26 times is
      2^26): a failing match tries each.
    """
    try:
        items, _, paths = _regex_items(body, 0)
    except _Unanalysable:
        return None  # the syntax check refused what this reader cannot follow
    if paths > _MAX_REGEX_PATHS:
        return (
            f"has {paths} ways through its alternatives ('|'); at most {_MAX_REGEX_PATHS} "
            "are allowed: a failing match tries them all (catastrophic backtracking)"
        )
    if (pair := _overlapping_repeats(items)[0]) is not None:
        return (
            f"repeats '{pair[0]}' and then '{pair[1]}', which can match the same "
            "characters with nothing between them that the first cannot match: a long "
            "run of those characters splits between the two in so many ways that nginx's "
            "PCRE gives up and fails the request (catastrophic backtracking); use classes "
            "that do not overlap, like [a-z]+[0-9]+, or put a character the first cannot "
            "match between them, like [^/]*/.*"
        )
    return None


_MAX_REGEX_PATHS: Final = 1024
# Characters an atom is tried on: ASCII, and a few beyond it for '.', \\W and negations.
_SAMPLE_CHARS: Final = (*(chr(c) for c in range(1, 128)), "é", "\u00a0", "€")


class _Unanalysable(Exception):
    pass


@attrs.frozen
class _Item:
    """One atom of a concatenation: the text, what it matches, how often."""

    text: str
    chars: frozenset[str]
    repeat: str  # "" once, "?" optional, "*" or "+" unbounded
    branches: tuple[tuple[_Item, ...], ...] = ()  # a group's alternatives


@functools.cache
def _atom_chars(atom: str) -> frozenset[str]:
    if "[:" in atom or "[." in atom or "[=" in atom:
        return frozenset(_SAMPLE_CHARS)  # a POSIX item: taken as matching anything
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = re.compile(atom)
    except re.error:
        return frozenset(_SAMPLE_CHARS)
    return frozenset(ch for ch in _SAMPLE_CHARS if compiled.fullmatch(ch))


def _regex_items(regex: str, i: int) -> tuple[list[_Item], int, int]:
    """The items of the concatenation starting at ``regex[i]`` up to ``|``/``)``/the end
    (alternatives of the top level are joined as one group), the index it stopped at,
    and the number of paths through its alternatives."""
    branches: list[tuple[_Item, ...]] = []
    items: list[_Item] = []
    paths_of_branches: list[int] = []
    paths = 1
    while True:
        if i >= len(regex) or regex[i] == ")":
            break
        ch = regex[i]
        if ch == "|":
            branches.append(tuple(items))
            paths_of_branches.append(paths)
            items, paths = [], 1
            i += 1
            continue
        if ch == "^":
            i += 1
            continue
        start = i
        if ch == "(":
            lookaround = regex.startswith(("(?=", "(?!"), i)
            i += 3 if regex.startswith(("(?:", "(?=", "(?!"), i) else 1
            inner, i, inner_paths = _regex_items(regex, i)
            if i >= len(regex) or regex[i] != ")":
                raise _Unanalysable
            i += 1
            paths *= inner_paths
            group = inner[0] if len(inner) == 1 and inner[0].branches else None
            alternatives = group.branches if group else (tuple(inner),)
            if lookaround:
                # Zero width, so optional to its neighbours; tried at each position, so
                # what it holds counts beside the repetitions before it.
                items.append(_Item(regex[start:i], frozenset(), "?", alternatives))
                continue
            chars = frozenset().union(*(item.chars for item in inner))
            repeat, i = _repeat_at(regex, i)
            if group is None and not repeat:
                items.extend(inner)  # a plain group is its items, in place
            else:
                items.append(_Item(regex[start:i], chars, repeat, alternatives))
            continue
        if ch == "[":
            i = _class_end(regex, i)
        elif ch == "\\":
            i += 2
        else:
            i += 1
        atom = regex[start:i]
        repeat, i = _repeat_at(regex, i)
        items.append(_Item(regex[start:i], _atom_chars(atom), repeat))
    if branches:
        branches.append(tuple(items))
        paths_of_branches.append(paths)
        chars = frozenset().union(*(item.chars for b in branches for item in b))
        alternation = _Item("|".join("".join(x.text for x in b) for b in branches), chars, "")
        return [attrs.evolve(alternation, branches=tuple(branches))], i, sum(paths_of_branches)
    return items, i, paths


def _repeat_at(regex: str, i: int) -> tuple[str, int]:
    """The quantifier at ``regex[i]`` (a lazy '?' after it changes nothing here).

    A count reads as the quantifier it behaves like for backtracking: {n} is required
    once more, {0,1} optional, {0,m} and {0,} like '*', any other range like '+' (a
    bounded range splits a run fewer ways than '+', but still more than one)."""
    repeat = ""
    if i < len(regex) and regex[i] in "?*+":
        repeat = regex[i]
        i += 1
    elif (found := _COUNT.match(regex, i)) is not None:
        low, high = _count_bounds(found)
        if high == low:
            repeat = "?" if low == 0 else ""
        elif low == 0:
            repeat = "?" if high == 1 else "*"
        else:
            repeat = "+"
        i = found.end()
    else:
        return "", i
    if i < len(regex) and regex[i] == "?":
        i += 1
    return repeat, i


def _overlapping_repeats(
    items: Sequence[_Item], pending: Sequence[_Item] = ()
) -> tuple[tuple[str, str] | None, tuple[_Item, ...]]:
    """The first two unbounded repetitions that can match a common character with only
    optional items between them — in `items`, inside a group's alternatives, or across a
    group's edge — and the repetitions still open at the end of `items`. `pending`: the
    ones open before it."""
    current = list(pending)
    for item in items:
        if item.branches:
            ends: list[_Item] = []
            for branch in item.branches:
                found, open_after = _overlapping_repeats(branch, current)
                if found is not None:
                    return found, ()
                ends.extend(open_after)
            after = list(dict.fromkeys(ends))
            if item.repeat == "?":
                current = list(dict.fromkeys([*current, *after]))
                continue
            if not item.repeat:
                current = after
                continue
        if item.repeat in ("*", "+"):  # an atom, or a repeated group as a whole
            for earlier in current:
                if earlier.chars & item.chars:
                    return (earlier.text, item.text), ()
            current = [*current, item] if item.repeat == "*" else [item]
        elif item.repeat != "?":
            # A required atom separates two repetitions only if the earlier one cannot
            # match it: in \d*\d\d* a run of digits still splits three ways.
            current = [earlier for earlier in current if earlier.chars & item.chars]
    return None, tuple(current)


POSIX_CLASSES: Final = frozenset(
    {
        "alpha",
        "digit",
        "alnum",
        "upper",
        "lower",
        "space",
        "punct",
        "xdigit",
        "word",
        "blank",
        "cntrl",
        "graph",
        "print",
        "ascii",
    }
)
"""The POSIX classes nginx's PCRE2 accepts inside brackets, like ``[[:alpha:]]`` or
``[[:^digit:]]``; it refuses other names and the collating forms ``[.x.]``/``[=x=]``."""
# Class members Python may read as set operators or a nested set (a FutureWarning) but
# PCRE reads as literals: escaped in the form handed to Python's re.compile.
_PYTHON_SET_CHARS = frozenset("[|~&")


def _posix_end(regex: str, i: int) -> int | None:
    """Where PCRE2 reads ``regex[i:]`` (``[`` then ``:``, ``.`` or ``=``) as a POSIX item.

    The index after its closing ``:]`` (``.]``, ``=]``), or None when PCRE2 reads the
    ``[`` as a literal. Mirrors PCRE2's check_posix_syntax.
    """
    terminator = regex[i + 1]
    j = i + 2
    while j + 1 < len(regex):
        if regex[j] == "\\" and regex[j + 1] in "]\\":
            j += 2
            continue
        if (regex[j] == "[" and regex[j + 1] == terminator) or regex[j] == "]":
            return None
        if regex[j] == terminator and regex[j + 1] == "]":
            return j + 2
        j += 1
    return None


def _check_classes(regex: str) -> tuple[str | None, str]:
    """Check the character classes of `regex` the way nginx's PCRE2 parses them.

    Returns a reason, or None and the same regex spelled so that Python's ``re`` parses
    it alike (an allowed POSIX class becomes a plain member) for the syntax check.
    """
    out: list[str] = []
    i = 0
    while i < len(regex):
        ch = regex[i]
        if ch == "\\":
            out.append(regex[i : i + 2])
            i += 2
            continue
        if ch != "[":
            out.append(ch)
            i += 1
            continue
        if regex[i + 1 : i + 2] in (":", ".", "=") and (end := _posix_end(regex, i)) is not None:
            return (_posix_misplaced(regex[i:end]), "")
        out.append("[")
        i += 1
        start = i
        if regex.startswith("^", i):
            out.append("^")
            i += 1
            start = i
        # A ']' first in the class is a literal member.
        if regex.startswith("]", i):
            out.append("\\]")
            i += 1
        while i < len(regex) and regex[i] != "]":
            ch = regex[i]
            if ch == "\\":
                out.append(regex[i : i + 2])
                i += 2
                continue
            if ch == "[" and regex[i + 1 : i + 2] in (":", ".", "="):
                end = _posix_end(regex, i)
                if end is None:
                    return (
                        f"contains {regex[i : i + 2]!r} inside a character class, which nginx "
                        "would read as the start of a POSIX class; write a literal '[' as \\[",
                        "",
                    )
                item = regex[i:end]
                if (reason := _posix_reason(item)) is not None:
                    return reason, ""
                dash_before = i - 1 > start and regex[i - 1] == "-" and regex[i - 2] != "\\"
                if dash_before or (regex.startswith("-", end) and not regex.startswith("-]", end)):
                    return (
                        f"uses the POSIX class {item!r} as the end of a range, which nginx "
                        "refuses; put a literal '-' first or last in the class",
                        "",
                    )
                out.append("a")  # any single member: Python only checks the syntax
                i = end
                continue
            out.append("\\" + ch if ch in _PYTHON_SET_CHARS else ch)
            i += 1
        if i >= len(regex):
            # Python may still see a complete class: [[:alpha:] is '[[:alpha:]' to it.
            return "has a character class without its closing ']'", ""
        out.append("]")
        i += 1
    return None, "".join(out)


def _posix_misplaced(item: str) -> str:
    if item[1] == ":":
        return (
            f"uses the POSIX class {item!r} outside a character class; nginx accepts it "
            f"only inside brackets, like [{item}]"
        )
    return f"contains the POSIX collating element {item!r}, which nginx's PCRE2 refuses"


def _posix_reason(item: str) -> str | None:
    """Why nginx refuses the POSIX item `item` inside a class, or None when it accepts it."""
    if item[1] != ":":
        return _posix_misplaced(item)
    if item[2:-2].removeprefix("^") in POSIX_CLASSES:
        return None
    known = " ".join(f"[:{name}:]" for name in sorted(POSIX_CLASSES))
    return (
        f"uses the unknown POSIX class {item!r}, which nginx's PCRE2 refuses; the known "
        f"classes are {known} (negated as [:^name:])"
    )


def _repeated_risky_group(regex: str) -> str | None:
    """The first group repeated by ``+``, ``*`` or ``{`` whose body holds an alternation
    (``|``) or a quantifier (``?``, ``+``, ``*``, ``{``), at any depth; None if there is
    none.

    Such a group can match one input in exponentially many ways: ``(a+)+``, ``(a|aa)+``.
    PCRE backtracks through them until its match limit, and nginx answers the request
    with an error ("pcre2_match() failed: -47"). A group of plain atoms (``(ab)+``) or a
    repeated character class (``[ab]+``) is linear.
    """
    # Per open group (the whole regex first): where it starts, whether its body is risky.
    starts = [0]
    risky = [False]
    i = 0
    while i < len(regex):
        ch = regex[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "[":
            i = _class_end(regex, i)
            continue
        if ch == "(":
            starts.append(i)
            risky.append(False)
            # The '?' of (?: (?= (?! is group syntax, not a quantifier.
            i += 2 if regex.startswith("?", i + 1) else 1
            continue
        if ch == ")" and len(starts) > 1:
            start, inner = starts.pop(), risky.pop()
            if inner and regex.startswith(("+", "*", "{"), i + 1):
                return regex[start : _repeat_at(regex, i + 1)[1]]
            quantified = regex.startswith(("+", "*", "{", "?"), i + 1)
            risky[-1] = risky[-1] or inner or quantified
        elif ch in "|?+*{":
            risky[-1] = True
        i += 1
    return None


def _class_end(regex: str, i: int) -> int:
    """The index after the character class opening at ``regex[i]`` (PCRE2's reading:
    a leading ']' is a member, POSIX items like [:alpha:] are skipped whole)."""
    i += 1
    if regex.startswith("^", i):
        i += 1
    if regex.startswith("]", i):
        i += 1
    while i < len(regex) and regex[i] != "]":
        if regex[i] == "\\":
            i += 2
        elif (
            regex[i] == "["
            and regex[i + 1 : i + 2] in (":", ".", "=")
            and (end := _posix_end(regex, i)) is not None
        ):
            i = end
        else:
            i += 1
    return i + 1


REGEX_PATH = TextRule(
    "a regular expression of letters, digits, ._~!*()@:+,=/%^|?[]- and safe \\ escapes, "
    "with repetition counts like {3} or {2,5}, optionally ending in a '$' anchor",
    _rx(r"[A-Za-z0-9._~!*()@:+,=/%^|?\[\]\\${}-]+"),
    max_len=256,
    allowed="\\$%{}",
    refine=_regex_refine,
)


# ---------------------------------------------------------------------------------------
# Field checks: attrs validators the converter can also run field by field
# ---------------------------------------------------------------------------------------

Problems = Sequence[tuple[str, str]]
# "No problems" is the shared empty tuple: a check runs for every field of every message
# built or decoded, and a fresh empty list each time is an allocation the collector tracks.
NO_PROBLEMS: Final[Problems] = ()


@attrs.frozen
class FieldCheck:
    """An attrs validator that reports every problem of one field value.

    `problems` returns ``(path relative to the field, reason)`` pairs. As a validator it
    raises `Invalid` with paths prefixed by the attribute name; the converter calls
    `problems` directly so cattrs can attach the field name itself.
    """

    check: Callable[[Any], Problems]

    def problems(self, value: object) -> Problems:
        return self.check(value)

    def __call__(self, inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
        found = self.check(value)
        if found:
            raise Invalid((join_path(attribute.name, rel), reason) for rel, reason in found)


def _single(reason: str | None) -> Problems:
    return NO_PROBLEMS if reason is None else [("", reason)]


def text(rule: TextRule, *, optional: bool = False) -> FieldCheck:
    """Validate a string field against `rule` (None allowed when `optional`)."""

    def check(value: object) -> Problems:
        if value is None and optional:
            return NO_PROBLEMS
        return _single(rule.reason(value))

    return FieldCheck(check)


def _length(value: object, lo: int, hi: int, noun: str) -> str | None:
    if isinstance(value, list):
        # Only reachable from Python: the converter turns YAML lists into tuples.
        return "must be a tuple (model objects are immutable), got a Python list"
    if not isinstance(value, tuple):
        return f"must be a list, got {describe(value)}"
    if len(value) < lo:
        return f"needs at least {lo} {noun}" if lo > 1 else f"needs at least one {noun}"
    if len(value) > hi:
        return f"has {len(value)} {noun}s; at most {hi} are allowed"
    return None


def each(rule: TextRule, *, lo: int = 0, hi: int, noun: str) -> FieldCheck:
    """Validate a tuple of strings: its length, then every item against `rule`."""

    def check(value: object) -> Problems:
        if (reason := _length(value, lo, hi, noun)) is not None:
            return [("", reason)]
        assert isinstance(value, tuple)
        return [
            (f"[{i}]", reason)
            for i, item in enumerate(value)
            if (reason := rule.reason(item)) is not None
        ]

    return FieldCheck(check)


def each_int(
    allowed: Callable[[int], str | None], *, lo: int = 0, hi: int, noun: str
) -> FieldCheck:
    """Validate a tuple of distinct integers: its length, then every item with `allowed`
    (a reason, or None when the value is acceptable)."""

    def check(value: object) -> Problems:
        if (reason := _length(value, lo, hi, noun)) is not None:
            return [("", reason)]
        assert isinstance(value, tuple)
        found: list[tuple[str, str]] = []
        seen: dict[object, int] = {}
        for i, item in enumerate(value):
            if not isinstance(item, int) or isinstance(item, bool):
                found.append((f"[{i}]", f"must be an integer, got {describe(item)}"))
            elif (reason := allowed(item)) is not None:
                found.append((f"[{i}]", reason))
            elif seen.setdefault(item, i) != i:
                found.append((f"[{i}]", f"repeats [{seen[item]}] ({item})"))
        return found

    return FieldCheck(check)


def _type_reason(value: object, cls: type[Any]) -> str | None:
    if isinstance(value, cls):
        return None
    return f"must be a {cls.__name__}, got {describe(value)}"


def count(of: type[Any], *, lo: int = 0, hi: int, noun: str) -> FieldCheck:
    """Bound a tuple of `of` objects; the objects' own validators checked their fields."""

    def check(value: object) -> Problems:
        if (reason := _length(value, lo, hi, noun)) is not None:
            return [("", reason)]
        assert isinstance(value, tuple)
        return [
            (f"[{i}]", reason)
            for i, item in enumerate(value)
            if (reason := _type_reason(item, of)) is not None
        ]

    return FieldCheck(check)


def instance(cls: type[Any], *, optional: bool = False) -> FieldCheck:
    """Validate that a field holds a `cls` (for Python callers; YAML is typed by the converter)."""

    def check(value: object) -> Problems:
        if value is None and optional:
            return NO_PROBLEMS
        return _single(_type_reason(value, cls))

    return FieldCheck(check)


def int_range(lo: int, hi: int, *, optional: bool = False) -> FieldCheck:
    """Validate an integer in ``lo..hi`` (booleans are not integers here)."""

    def check(value: object) -> Problems:
        if value is None and optional:
            return NO_PROBLEMS
        if not isinstance(value, int) or isinstance(value, bool):
            return [("", f"must be an integer, got {describe(value)}")]
        if not lo <= value <= hi:
            return [("", f"must be from {lo} to {hi}, got {value}")]
        return NO_PROBLEMS

    return FieldCheck(check)


def choice(*values: object) -> FieldCheck:
    """Validate membership in a fixed set (mirrors a ``Literal`` type for direct use)."""
    shown = ", ".join(repr(v) for v in values)
    # Keyed by type too: True == 1 and 1.0 == 1, but neither is the choice 1.
    allowed = frozenset((type(v), v) for v in values)

    def check(value: object) -> Problems:
        try:
            if (type(value), value) in allowed:
                return NO_PROBLEMS
        except TypeError:  # unhashable: a list or a dict is never one of the choices
            pass
        return [("", f"must be one of {shown}, got {describe(value)}")]

    return FieldCheck(check)


def finite(*, optional: bool = False, minimum: float | None = None) -> FieldCheck:
    """Validate a finite number (NaN and infinities cannot be hashed canonically)."""

    def check(value: object) -> Problems:
        if value is None and optional:
            return NO_PROBLEMS
        if not isinstance(value, int | float) or isinstance(value, bool):
            return [("", f"must be a number, got {describe(value)}")]
        if not math.isfinite(value):
            return [("", "must be a finite number")]
        if minimum is not None and value < minimum:
            return [("", f"must be at least {minimum}")]
        return NO_PROBLEMS

    return FieldCheck(check)


def _mapping_problems(
    value: object,
    hi: int,
    key_reason: Callable[[object], str | None],
    value_reason: Callable[[object], str | None],
) -> Problems:
    if not isinstance(value, Mapping):
        return [("", f"must be a mapping, got {describe(value)}")]
    if len(value) > hi:
        return [("", f"has {len(value)} entries; at most {hi} are allowed")]
    found: list[tuple[str, str]] = []
    for key, item in value.items():
        where = f"[{key!r}]"
        if (reason := key_reason(key)) is not None:
            found.append((where, f"key {reason}"))
        if (reason := value_reason(item)) is not None:
            found.append((where, reason))
    return found


def labels(*, hi: int = 64) -> FieldCheck:
    """Validate a label mapping: Kubernetes-style keys and values, at most `hi` entries."""
    return FieldCheck(
        lambda value: _mapping_problems(value, hi, LABEL_KEY.reason, LABEL_VALUE.reason)
    )


def metrics(*, hi: int = 256) -> FieldCheck:
    """Validate a name → finite number mapping (durations, health metrics)."""
    number = finite()

    def value_reason(item: object) -> str | None:
        found = number.problems(item)
        return found[0][1] if found else None

    return FieldCheck(lambda value: _mapping_problems(value, hi, CHECK_NAME.reason, value_reason))
