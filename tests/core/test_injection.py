"""The injection corpus: values modelled on ingress-nginx CVEs must never become a model.

CVE-2021-25742 (snippet annotations), CVE-2023-5043/5044 (annotation and
permanent-redirect injection) and the CVE-2025-1974 "IngressNightmare" family
(auth-url, auth-tls-match-cn, mirror-target, ``ssl_engine`` via the admission webhook) all
smuggled nginx syntax through a field that was meant to hold a plain value. Every case
below puts such a value into one field of an otherwise valid state and asserts that the
state is rejected with exactly one problem, at exactly that field.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from nxmesh.core.errors import Problem, ValidationError
from nxmesh.core.model import Agent, DesiredState, LabelSelector, check_state
from nxmesh.core.serialization import structure, structure_state, unstructure


def base_doc() -> dict[str, Any]:
    """A realistic state touching every string field that reaches nginx."""
    return {
        "workspace": "prod",
        "upstreams": [
            {"name": "app", "servers": [{"address": "app.internal:8080"}], "keepalive": 16}
        ],
        "certificates": [{"name": "main", "domains": ["example.com", "*.example.com"]}],
        "sites": [
            {
                "name": "web",
                "server_names": ["example.com", "www.example.com"],
                "listeners": [
                    {"port": 443, "tls": True, "http2": True, "address": "10.0.0.1"},
                    {"port": 80},
                ],
                "tls": {"certificate": "main", "protocols": ["TLSv1.2", "TLSv1.3"]},
                "client_max_body_size": "10m",
                "headers": [{"name": "X-Frame-Options", "value": "DENY"}],
                "locations": [
                    {
                        "path": "/",
                        "upstream": "app",
                        "proxy_headers": [{"name": "X-Forwarded-Proto", "value": "https"}],
                        "client_max_body_size": "1m",
                        "websocket": True,
                    },
                    {"path": "/healthz", "match": "exact", "return": {"code": 200, "body": "ok"}},
                    {
                        "path": "^/static/",
                        "match": "regex",
                        "root": "/srv/www",
                        "index": ["index.html"],
                        "headers": [{"name": "Cache-Control", "value": "max-age=3600"}],
                    },
                    {
                        "path": "^/old/",
                        "match": "regex_ci",
                        "redirect": {"code": 301, "url": "https://example.com/new"},
                    },
                ],
            }
        ],
    }


def _tokens(path: str) -> list[str | int]:
    return [int(t) if t.isdigit() else t for t in re.findall(r"[^.\[\]]+", path)]


def get_at(doc: Any, path: str) -> Any:
    for token in _tokens(path):
        doc = doc[token]
    return doc


def set_at(doc: dict[str, Any], path: str, value: object) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    *parents, last = _tokens(path)
    target: Any = doc
    for token in parents:
        target = target[token]
    target[last] = value
    return doc


def rejected_paths(doc: object) -> list[str]:
    with pytest.raises(ValidationError) as info:
        structure_state(doc)
    assert all(p.message for p in info.value.problems)
    return [p.path for p in info.value.problems]


# Every string field that reaches nginx, by its path in base_doc().
FIELDS = [
    "workspace",
    "sites[0].name",
    "sites[0].server_names[0]",
    "sites[0].listeners[0].address",
    "sites[0].client_max_body_size",
    "sites[0].headers[0].name",
    "sites[0].headers[0].value",
    "sites[0].tls.certificate",
    "sites[0].tls.protocols[0]",
    "sites[0].locations[0].path",  # prefix
    "sites[0].locations[1].path",  # exact
    "sites[0].locations[2].path",  # regex
    "sites[0].locations[3].path",  # regex_ci
    "sites[0].locations[0].upstream",
    "sites[0].locations[0].proxy_headers[0].name",
    "sites[0].locations[0].proxy_headers[0].value",
    "sites[0].locations[0].client_max_body_size",
    "sites[0].locations[1].return.body",
    "sites[0].locations[2].root",
    "sites[0].locations[2].index[0]",
    "sites[0].locations[2].headers[0].name",
    "sites[0].locations[2].headers[0].value",
    "sites[0].locations[3].redirect.url",
    "upstreams[0].name",
    "upstreams[0].servers[0].address",
    "certificates[0].name",
    "certificates[0].domains[0]",
]

REGEX_FIELDS = {"sites[0].locations[2].path", "sites[0].locations[3].path"}

# Appended to a field's valid value: each ends a directive, a block, a quoted string or a
# line, hides text in a comment, or expands a variable.
SUFFIXES = {
    "semicolon": ";",
    "directive": "; load_module /tmp/evil.so;",
    "close-block": "}",
    "open-block": "{",
    "new-server": "; } server { listen 80; root /; } #",
    "double-quote": '"',
    "quote-escape": '" ; add_header X-Pwned "1',
    "single-quote": "'; alias /etc/; '",
    "backslash": "\\",
    "backslash-quote": '\\"',
    "newline": "\n",
    "newline-directive": "\nload_module /tmp/evil.so;",
    "crlf-ssl-engine": "\r\nssl_engine ../../../proc/self/fd/13;",
    "carriage-return": "\r",
    "nul": "\0",
    "line-separator": "\u2028",
    "paragraph-separator": "\u2029",
    "next-line": "\x85",
    "vertical-tab": "\x0b",
    "escape-sequence": "\x1b[2J",
    "tab": "\t",
    "comment": "#",
    "comment-hiding": " # } ;",
    "lua": ";}content_by_lua_block{os.execute('id')}",
    "alias": "; alias /etc/;",
    "variable": "$http_x_evil",
    "braced-variable": "${host}",
    "capture-variable": "$1",
    "oversized": "a" * 10_000,
}

# Whole values lifted from published exploit write-ups.
CVE_VALUES = {
    # CVE-2021-25742: configuration-snippet reading the service account token.
    "cve-2021-25742": "x;\n}\nlocation /leak { alias /var/run/secrets/kubernetes.io/; }\n#",
    # CVE-2023-5044: permanent-redirect annotation closing the location.
    "cve-2023-5044": "https://example.com;\n}\nlocation ~* ^/pwn {\n  content_by_lua_block {\n"
    "    ngx.say(io.popen('id'):read('*a'))\n  }\n}\nlocation /x {\n  return 301 https://x",
    # CVE-2023-5043: annotation injection into a directive argument.
    "cve-2023-5043": "on;\n  ssl_engine /tmp/evil.so;\n  #",
    # CVE-2025-24514: auth-url, '#' hiding the rest after the injection.
    "cve-2025-24514": "http://example.com/#;\nload_module /tmp/evil.so;\n",
    # CVE-2025-1097: auth-tls-match-cn.
    "cve-2025-1097": "CN=abc#(\n){}\n }}\nssl_engine ../../../../../../proc/self/fd/13;\n#",
    # CVE-2025-1098: mirror-target / mirror-uri.
    "cve-2025-1098": "/x;}\nlocation /y {\nload_module /tmp/evil.so;\n#",
    # CVE-2025-1974: admission webhook loading a shared object from /proc.
    "cve-2025-1974": "x; ssl_engine /proc/1/fd/7; #",
}


class TestFieldInjection:
    @pytest.mark.parametrize("field", FIELDS)
    def test_base_document_is_valid(self, field: str) -> None:
        """The corpus base state is accepted with the value each case tampers with."""
        doc = base_doc()
        state = structure_state(doc)
        assert get_at(unstructure(state), field) == get_at(doc, field)

    @pytest.mark.parametrize("suffix", SUFFIXES.values(), ids=SUFFIXES.keys())
    @pytest.mark.parametrize("field", FIELDS)
    def test_suffix_is_rejected_at_the_field(self, field: str, suffix: str) -> None:
        """A valid value followed by nginx syntax is rejected with one problem at the field."""
        doc = base_doc()
        doc = set_at(doc, field, get_at(doc, field) + suffix)
        assert rejected_paths(doc) == [field]

    @pytest.mark.parametrize("value", CVE_VALUES.values(), ids=CVE_VALUES.keys())
    @pytest.mark.parametrize("field", FIELDS)
    def test_cve_value_is_rejected_at_the_field(self, field: str, value: str) -> None:
        """Published exploit values are rejected in every field, each at its exact path."""
        assert rejected_paths(set_at(base_doc(), field, value)) == [field]

    @given(
        field=st.sampled_from(FIELDS),
        char=st.sampled_from(list(';{}"\\#$\n\r\0\u2028\u2029\x85\x1b')),
        position=st.floats(min_value=0, max_value=1),
    )
    def test_any_dangerous_character_anywhere_is_rejected(
        self, field: str, char: str, position: float
    ) -> None:
        """A dangerous character inserted at any position of any field is rejected."""
        doc = base_doc()
        value = get_at(doc, field)
        at = round(position * len(value))
        if field in REGEX_FIELDS:
            # Regex locations legitimately use escapes like \s and a trailing '$' anchor.
            assume(char != "\\")
            assume(not (char == "$" and at == len(value)))
        assert rejected_paths(set_at(doc, field, value[:at] + char + value[at:])) == [field]


def _address_problem(value: str) -> Problem:
    """The one problem of a state whose first upstream server has address `value`."""
    field = "upstreams[0].servers[0].address"
    with pytest.raises(ValidationError) as exc:
        structure_state(set_at(base_doc(), field, value))
    (problem,) = exc.value.problems
    assert problem.path == field
    return problem


class TestSpecificFields:
    @pytest.mark.parametrize(
        "value",
        [
            "~^(?<user>.+)\\.example\\.com$",  # nginx regex server_name
            "*.com",
            "www.*",
            "exam ple.com",
            "example.com.",
            "-example.com",
            "a" * 64 + ".example.com",
            "xn--bcher-kva.example;",
            "ex\u212aample.com",  # KELVIN SIGN lowercases to an ASCII 'k'
            "例え.jp",
        ],
    )
    def test_bad_server_name(self, value: str) -> None:
        """Server names must be plain (wildcard) hostnames; regex and odd forms are rejected."""
        doc = set_at(base_doc(), "sites[0].server_names[1]", value)
        assert rejected_paths(doc) == ["sites[0].server_names[1]"]

    @pytest.mark.parametrize(
        "value",
        [
            "/",
            "/etc",
            "/etc/",
            "/etc/nginx",
            "/proc/self/environ",
            "/sys/kernel",
            "/dev/shm",
            "/root/.ssh",
            "/var/lib/nxmesh",
            "/var/lib/nxmesh/keys",
            # The agent's state dir (vault passphrase, encrypted keys) and its parents.
            "/var/lib/nxmesh-agent",
            "/var/lib/nxmesh-agent/vault",
            "/var/lib",
            "/var",
            "/var/",
            "/var/log/nginx",
            "/var/cache",
            "/var/run",
            "/var/lock",
            "/var/crash/core.1234",
            "/run",
            "/run/secrets",
            "/tmp",
            "/tmp/site",
            "/var/tmp/x",
            "/usr",
            "/usr/share/nginx/html",
            "/lib64",
            "/bin",
            "/home",
            "/home/",
            "/home/alice",
            "/home/alice/.ssh",
            "/srv/www/.git",
            "/srv/.hidden/www",
            "/srv/../etc",
            "/srv/www/../../etc",
            "/srv/./www",
            "//etc",
            "srv/www",
            "/srv/www;",
            "/srv/www alias",
        ],
    )
    def test_root_cannot_expose_system_files(self, value: str) -> None:
        """A static root cannot be '/', a protected system directory, a parent of one
        (root /var serves /var/lib/...), a home directory itself, a hidden directory, or
        escape with '..'."""
        doc = set_at(base_doc(), "sites[0].locations[2].root", value)
        assert rejected_paths(doc) == ["sites[0].locations[2].root"]

    @pytest.mark.parametrize(
        "value",
        [
            "/srv",
            "/srv/www/shop",
            "/var/www",
            "/var/www/shop/",
            "/home/alice/www",
            "/opt/site/public",
            "/data/www",
            "/variable",
            "/library/www",
            "/srv/www/a.b",
        ],
    )
    def test_content_roots_are_accepted(self, value: str) -> None:
        """Content directories, including ones inside a home, are fine; a name that only
        starts like a protected one (/variable, /library) is not inside it."""
        doc = set_at(base_doc(), "sites[0].locations[2].root", value)
        assert structure_state(doc).sites[0].locations[2].root == value

    @pytest.mark.parametrize(
        "value",
        [
            "(a+)+$",
            "^/(a*)*",
            "^/(.*a)+",
            "^/((ab)+)*",
            "^/(a)\\1",
            "^/(?P<x>a)(?P=x)",
            "^/(?i)admin",
            "^/(?<name>x)",
            "^/a{,100}",  # a count needs its lower bound (older PCRE reads it literally)
            "^/a{1;}",
            "^/a}",
            "^/[unclosed",
            "^/a\\Qb\\E",
            "^/a\\x41",
            "^/a\\\\",
            "$",
            "^/a$b",
            "^/a\\$",
            # A repeated group holding an alternation or a quantifier: catastrophic
            # backtracking that makes nginx's PCRE fail the request (-47).
            "^/(a|aa)+$",
            "^/(?:a|b)*x",
            "^/(a?)+",
            "^/(?:png|jpe?g)+",
            "^/((a|b)c)+",
            "^/((a|b)?)*",
            "^/x(\\d+/)*$",
            # Repetitions that can match the same characters with nothing required
            # between them, or too many ways through alternatives: polynomial or
            # exponential backtracking without a repeated group (both made nginx answer
            # 500 after ~0.6-0.9 s of worker CPU on a crafted URI).
            "\\d*\\d*\\d*\\d*\\d*\\d*\\d*\\d*[a-z]",
            "^/.*.*$",
            "^/(.*)(.*)$",
            "^/(\\w+)(\\d+)$",
            "^/a*b?a*",
            "^/x.*(?:y)?.+$",
            "^/(?:x|(.*))(.*)$",
            # A required atom the first repetition also matches does not separate them
            # (\d*\d\d* still splits a run of digits; a %0A in the URI makes $ fail
            # after (.*)/(.*) and every split of a run of slashes is tried).
            "^/e/\\d*\\d\\d*\\d\\d*\\d\\d*$",
            "^/d/\\d{0,255}\\d\\d{0,255}\\d\\d*$",
            "^/(.*)/(.*)$",
            # Counts that hid a repetition: leading zeros, after a lookaround.
            "^/c/\\d*\\d{00}\\d*\\d{00}\\d*$",
            "^/\\d*x{00,3}\\d*$",
            "^/l/\\d*(?=\\d){1}\\d*(?=\\d){1}\\d*$",
            "^/\\d*(?=x){0}\\d*$",
            "^/(a*a*)?x",
            "^/(?=a*a*b)",
            "^/(ab)*[ab]*",
            "^/" + "(?:a|a)" * 26 + "$",
            "^/" + "(?:a|b)" * 11 + "$",
            # POSIX bracket forms nginx's PCRE2 refuses, though Python's re accepts them.
            "^/[[:foo:]]",
            "^/[[:ALPHA:]]",
            "^/[[.a.]]",
            "^/[[=a=]]",
            "^/[:alpha:]",
            "^/[.a.]",
            "^/[[:alpha:]",
            "^/[a[:b]",
            "^/[[:digit:]-z]",
            "^/[a-[:digit:]]",
        ],
    )
    @pytest.mark.parametrize("index", [2, 3])
    def test_bad_regex_location(self, index: int, value: str) -> None:
        """Regex locations refuse backreferences, inline flags, braces, repeated groups that
        hold an alternation or a quantifier, and POSIX forms nginx does not know."""
        field = f"sites[0].locations[{index}].path"
        assert rejected_paths(set_at(base_doc(), field, value)) == [field]

    @pytest.mark.parametrize(
        "value",
        [
            "^/a/(b|c)/d$",
            "\\.php$",
            "^/[a-z0-9_-]+\\.(css|js)$",
            "^/(ab)+$",
            "^/(?:x|y)?/z",
            "^/[ab]+",
            "^/[[:alpha:]]+$",
            "^/[[:^digit:][:punct:]]",
            "^/[-[:xdigit:]]",
            "^/[.]",
            "^/[:/]+",
            # Repetitions kept apart by a required atom the first cannot match, or over
            # disjoint characters.
            "^/([^/]*)/(.*)$",
            "^/api/v[0-9]+/.*$",
            "\\d+\\.\\d+",
            "^/static/.+\\.(?:css|js)$",
            "^/[a-z]+[0-9]+$",
            "^/files/[a-z]+/[0-9]+$",
            "^/(?!admin).*$",
            "^/a?b*",
            "\\.(jpg|jpeg|gif|png|css|js|ico|svg|woff|woff2|ttf)$",
            "^/" + "(?:a|b)" * 10 + "$",
            "^/[a-z]+(?:-[a-z]+)?/[0-9]+$",
        ],
    )
    def test_good_regex_location(self, value: str) -> None:
        """Ordinary location regexes, with a trailing '$' anchor, are accepted."""
        state = structure_state(set_at(base_doc(), "sites[0].locations[2].path", value))
        assert state.sites[0].locations[2].path == value

    @pytest.mark.parametrize(
        "value",
        [
            "app",
            "10.0.0.1",
            "[::1]",
            "::1:8080",
            "app:0",
            "app:99999",
            "999.0.0.1:80",
            "[fe80::zz]:80",
            "unix:relative.sock",
            "unix:/run/../etc/passwd",
            "http://app:80",
            "app:80 backup",
            "app:80;server evil:80",
            # Instance metadata (cloud credentials) is never an upstream.
            "169.254.169.254:80",
            "[fe80::1]:80",
            "[::ffff:169.254.169.254]:80",
            "[fd00:ec2::254]:80",
        ],
    )
    def test_bad_upstream_address(self, value: str) -> None:
        """Upstream addresses are host:port, [v6]:port or unix:/path, nothing else."""
        field = "upstreams[0].servers[0].address"
        assert rejected_paths(set_at(base_doc(), field, value)) == [field]

    @pytest.mark.parametrize(
        "value",
        [
            "unix:/var/run/docker.sock",
            "unix:/run/docker.sock",
            "unix:/docker.sock",  # bind-mounted into a container
            "unix:/srv/app/containerd.sock",
            "unix:/run/containerd/containerd.sock.ttrpc",
            "unix:/run/podman/podman.sock",
            "unix:/run/user/1000/docker.sock",
            "unix:/run/user/1000/bus",
            "unix:/run/systemd/private",
            "unix:/var/run/dbus/system_bus_socket",
            "unix:/run/snapd.socket",
            "unix:/var/lib/kubelet/pod-resources/kubelet.sock",
            "unix:/var/snap/lxd/common/lxd/unix.socket",
            "unix:/var/lib/incus/unix.socket",
            "unix:/run/balena-engine.sock",
            "unix:/host/var/lib/lxd/unix.socket",  # the host's root bind-mounted
            "unix:/host/var/run/systemd/private",
        ],
    )
    def test_host_control_sockets_are_refused(self, value: str) -> None:
        """A proxy to a container runtime's or system service's socket would hand the host
        to whoever reaches the site: refused, saying why."""
        problem = _address_problem(value)
        assert "control socket of a container runtime or system service" in problem.message

    @pytest.mark.parametrize(
        ("value", "says"),
        [
            ("unix:/proc/self/root/var/lib/lxd/unix.socket", "is under /proc"),
            ("unix:/proc/self/cwd/run/app.sock", "is under /proc"),
            ("unix:/dev/fd/3", "is under /dev"),
            ("127.0.0.1:2375", "port 2375 is the Docker daemon's API"),
            ("[::1]:2376", "port 2376 is the Docker daemon's API"),
            ("docker:2375", "port 2375 is the Docker daemon's API"),
            ("unix:/srv/" + "a" * 98 + ".sock", "is at most 107 bytes, this one 108"),
        ],
    )
    def test_other_ways_to_a_control_socket_are_refused(self, value: str, says: str) -> None:
        """/proc/self/root and /dev/fd reach any path past the name checks; the Docker API
        also listens on TCP; nginx refuses a socket path sun_path cannot hold."""
        assert says in _address_problem(value).message

    def test_a_stored_state_with_a_newly_refused_address_still_loads(self) -> None:
        """The host-control rules came after versions were stored: they refuse new input
        (`check_state`), while a stored state holding such an address still reads back
        (history, diffs; a rollback to it is a submission and is refused)."""
        field = "upstreams[0].servers[0].address"
        doc = set_at(base_doc(), field, "unix:/var/run/docker.sock")
        state = structure(doc, DesiredState)  # what reading a stored version does
        assert state.upstreams[0].servers[0].address == "unix:/var/run/docker.sock"
        assert [p.path for p in check_state(state)] == [field]

    @pytest.mark.parametrize(
        ("value", "address"),
        [("https://api.example.com:443", "api.example.com:443"), ("http://app:8080/", "app:8080")],
    )
    def test_a_url_is_refused_saying_what_to_write(self, value: str, address: str) -> None:
        """A URL where an address belongs names the address and what is supported."""
        problem = _address_problem(value)
        assert f"is an address, not a URL: write {address!r}" in problem.message
        assert "plain HTTP unless the upstream has tls" in problem.message
        # An https:// URL says how to get HTTPS to the servers.
        assert ("give the upstream tls" in problem.message) is value.startswith("https")

    @pytest.mark.parametrize(
        "value",
        [
            "unix:/run/php/php8.2-fpm.sock",
            "unix:/var/run/php/php-fpm.sock",
            "unix:/srv/app/gunicorn.sock",
            "unix:/run/uwsgi/app.socket",
            "unix:/var/www/app/unix.socket",
            "unix:/srv/" + "a" * 97 + ".sock",  # 107 bytes: what sun_path holds
        ],
    )
    def test_application_sockets_are_accepted(self, value: str) -> None:
        """Sockets in application directories pass (the path says nothing of the
        protocol: locations speak HTTP to them)."""
        field = "upstreams[0].servers[0].address"
        state = structure_state(set_at(base_doc(), field, value))
        assert state.upstreams[0].servers[0].address == value

    @pytest.mark.parametrize(
        "value",
        [
            "javascript:alert(1)",
            "//evil.example",
            "ftp://example.com/",
            "https://example.com/$uri",
            "https://example.com/${request_uri}",
            "https://example.com/$request_uri/x",
            "https://example.com:99999/",
            "https://exa mple.com/",
            "new-page",
        ],
    )
    def test_bad_redirect_url(self, value: str) -> None:
        """Redirect URLs allow only http(s) or absolute paths and only a final $request_uri."""
        field = "sites[0].locations[3].redirect.url"
        assert rejected_paths(set_at(base_doc(), field, value)) == [field]

    @pytest.mark.parametrize(
        "value", ["https://example.com$request_uri", "/new?from=old&x=%2F", "https://[::1]:8443/"]
    )
    def test_good_redirect_url(self, value: str) -> None:
        """Absolute URLs, paths with queries and the $request_uri suffix are accepted."""
        doc = set_at(base_doc(), "sites[0].locations[3].redirect.url", value)
        assert structure_state(doc).sites[0].locations[3].redirect is not None

    @pytest.mark.parametrize("value", ["X Frame", "X-Frame:", "X_Frame", "-X", "X" * 65, ""])
    def test_bad_header_name(self, value: str) -> None:
        """Header names are HTTP tokens of letters, digits and '-' only."""
        field = "sites[0].headers[0].name"
        assert rejected_paths(set_at(base_doc(), field, value)) == [field]

    def test_oversized_return_body(self) -> None:
        """A return body longer than 1024 characters is rejected."""
        field = "sites[0].locations[1].return.body"
        assert rejected_paths(set_at(base_doc(), field, "x" * 1025)) == [field]

    def test_too_many_locations(self) -> None:
        """A site with more than 200 locations is rejected at its locations field."""
        doc = base_doc()
        doc["sites"][0]["locations"] = [
            {"path": f"/p{i}", "return": {"code": 204}} for i in range(201)
        ]
        assert rejected_paths(doc) == ["sites[0].locations"]


DIRECTIVE_KEYS = [
    "snippet",
    "server_snippet",
    "configuration_snippet",
    "extra_directives",
    "load_module",
    "ssl_engine",
    "alias",
    "content_by_lua_block",
    "include",
]

OBJECTS = [
    "",
    "sites[0]",
    "sites[0].tls",
    "sites[0].listeners[0]",
    "sites[0].headers[0]",
    "sites[0].locations[0]",
    "sites[0].locations[3].redirect",
    "upstreams[0]",
    "upstreams[0].servers[0]",
]


class TestNoFreeFormDirectives:
    @pytest.mark.parametrize("key", DIRECTIVE_KEYS)
    @pytest.mark.parametrize("where", OBJECTS)
    def test_directive_key_is_unknown(self, where: str, key: str) -> None:
        """Snippet and directive keys are unknown fields wherever they appear, named by path."""
        doc = base_doc()
        target = get_at(doc, where) if where else doc
        target[key] = "load_module /tmp/evil.so"
        with pytest.raises(ValidationError) as info:
            structure_state(doc)
        [problem] = info.value.problems
        assert problem.path == (f"{where}.{key}" if where else key)
        assert repr(key) in problem.message


class TestLabels:
    @pytest.mark.parametrize(
        "key", ["env;", "env\n", "env}", "$env", "#env", "-env", "a/b/c", "e" * 64, ""]
    )
    def test_bad_label_key(self, key: str) -> None:
        """Agent label keys follow the Kubernetes syntax; the problem names the key."""
        with pytest.raises(ValidationError) as info:
            structure({"id": "a1", "name": "edge-1", "labels": {key: "x"}}, Agent)
        assert [p.path for p in info.value.problems] == [f"labels[{key!r}]"]

    @pytest.mark.parametrize("value", ["prod;", "prod\n", "{prod}", "${x}", "p" * 64, "-prod"])
    def test_bad_label_value(self, value: str) -> None:
        """Agent label values follow the Kubernetes syntax; the problem names the key."""
        with pytest.raises(ValidationError) as info:
            structure({"id": "a1", "name": "edge-1", "labels": {"env": value}}, Agent)
        assert [p.path for p in info.value.problems] == ["labels['env']"]

    def test_bad_selector_label(self) -> None:
        """Selector labels are checked like agent labels."""
        with pytest.raises(ValidationError) as info:
            structure({"match_labels": {"env": "a b"}}, LabelSelector)
        assert [p.path for p in info.value.problems] == ["match_labels['env']"]

    def test_good_labels(self) -> None:
        """Prefixed keys and empty values are valid label syntax."""
        agent = structure(
            {"id": "a1", "name": "edge-1", "labels": {"app.kubernetes.io/name": "", "env": "p"}},
            Agent,
        )
        assert dict(agent.labels) == {"app.kubernetes.io/name": "", "env": "p"}
