"""The domain model: immutability, per-object rules, cross-object checks and helpers."""

from __future__ import annotations

import re
from functools import partial
from typing import Any, ClassVar

import attrs
import pytest

from nxmesh.core import validation
from nxmesh.core.model import (
    Agent,
    ApplyReport,
    BasicAuth,
    BasicAuthUser,
    CertificateRef,
    ConfigVersion,
    DesiredState,
    ErrorPage,
    FastCGI,
    FastCGIParam,
    FrozenMap,
    Header,
    HealthReport,
    HealthResult,
    LabelSelector,
    Listener,
    Location,
    ProxyCache,
    RateLimit,
    Redirect,
    Return,
    Site,
    StateParts,
    TLSConfig,
    Upstream,
    UpstreamServer,
    UpstreamTLS,
    check_parts,
    check_state,
    submission_problems,
)
from nxmesh.core.serialization import unstructure
from nxmesh.core.validation import Invalid
from nxmesh.testing.pki import Pki


def loc(path: str = "/", **fields: object) -> Location:
    if not {"upstream", "root", "redirect", "return_", "fastcgi"} & set(fields):
        fields["return_"] = Return(204)
    return Location(path=path, **fields)  # type: ignore[arg-type]


def make_site(name: str = "web", **fields: object) -> Site:
    fields.setdefault("server_names", ("example.com",))
    fields.setdefault("locations", (loc(),))
    return Site(name=name, **fields)  # type: ignore[arg-type]


def paths_of(exc: pytest.ExceptionInfo[Invalid]) -> list[str]:
    return [path for path, _ in exc.value.problems]


class TestFrozenMap:
    def test_equal_to_dict_and_hashable(self) -> None:
        """A FrozenMap equals the dict it was built from and can be hashed."""
        m = FrozenMap({"a": "1"})
        assert m == {"a": "1"}
        assert hash(m) == hash(FrozenMap({"a": "1"}))

    def test_views_are_the_mappings(self) -> None:
        """keys, items, values and `in` answer as the dict it was built from."""
        data = {"b": 2.0, "a": 1.0}
        m = FrozenMap(data)
        assert list(m.keys()) == list(data.keys())
        assert list(m.items()) == list(data.items())
        assert list(m.values()) == list(data.values())
        assert "a" in m
        assert "z" not in m
        assert dict(m) == data

    def test_immutable(self) -> None:
        """A FrozenMap offers no way to change it."""
        m = FrozenMap({"a": "1"})
        with pytest.raises(TypeError):
            m["b"] = "2"  # type: ignore[index]

    def test_model_mapping_is_frozen_copy(self) -> None:
        """A model keeps its own frozen copy, unaffected by later changes to the input."""
        labels = {"env": "prod"}
        agent = Agent(id="a1", name="n", labels=labels)
        labels["env"] = "dev"
        assert agent.labels == {"env": "prod"}


class TestImmutability:
    def test_objects_are_frozen(self) -> None:
        """Model objects cannot be changed after creation."""
        site = make_site()
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            site.name = "other"  # type: ignore[misc]

    def test_states_are_hashable(self) -> None:
        """Equal states hash equally, so they can key caches."""
        assert hash(DesiredState(sites=(make_site(),))) == hash(DesiredState(sites=(make_site(),)))


class TestLabelSelector:
    def test_matches_subset(self) -> None:
        """A selector matches labels containing all its pairs."""
        sel = LabelSelector({"env": "prod"})
        assert sel.matches({"env": "prod", "zone": "a"})
        assert not sel.matches({"env": "dev"})
        assert not sel.matches({})

    def test_empty_matches_everything(self) -> None:
        """An empty selector matches every agent."""
        assert LabelSelector().matches({"any": "thing"})


class TestListener:
    @pytest.mark.parametrize("port", [0, 65536, -1])
    def test_port_range(self, port: int) -> None:
        """Ports must be within 1..65535."""
        with pytest.raises(Invalid) as exc:
            Listener(port)
        assert paths_of(exc) == ["port"]

    @pytest.mark.parametrize("address", ["*", "10.0.0.1", "::", "2001:db8::1"])
    def test_addresses(self, address: str) -> None:
        """IPv4, IPv6 and '*' are valid listen addresses."""
        assert Listener(443, address=address).bind == (address, 443)

    @pytest.mark.parametrize(
        ("address", "bind"),
        [
            (None, "*"),
            ("*", "*"),
            ("0.0.0.0", "*"),
            ("::", "::"),
            ("0:0::0", "::"),
            ("0:0:0:0:0:0:0:0", "::"),
            ("2001:DB8:0::1", "2001:db8::1"),
            ("::ffff:10.0.0.1", "::ffff:a00:1"),
        ],
    )
    def test_bind_is_one_spelling_per_socket(self, address: str | None, bind: str) -> None:
        """The conflict key spells each socket one way: the IPv4 wildcard as '*' however
        it is written, IPv6 compressed and lowercase."""
        assert Listener(80, address=address).bind == (bind, 80)

    def test_default_bind_is_wildcard(self) -> None:
        """A listener without address binds every address."""
        assert Listener().bind == ("*", 80)


class TestTLSConfig:
    def test_needs_exactly_one_source(self) -> None:
        """Neither or both of certificate and acme is an error."""
        with pytest.raises(Invalid, match="exactly one"):
            TLSConfig()
        with pytest.raises(Invalid, match="exactly one"):
            TLSConfig(certificate="main", acme=True)

    def test_protocols_are_modern_and_unique(self) -> None:
        """Only TLSv1.2 and TLSv1.3, each at most once."""
        with pytest.raises(Invalid) as exc:
            TLSConfig(acme=True, protocols=("TLSv1",))
        assert paths_of(exc) == ["protocols[0]"]
        with pytest.raises(Invalid, match="twice"):
            TLSConfig(acme=True, protocols=("TLSv1.3", "TLSv1.3"))

    def test_client_certificates_need_their_cas(self) -> None:
        """``client_ca`` holds certificate blocks only (a key pasted beside them is
        refused, never echoed); ``client_verify: optional`` needs the CAs to check."""
        from nxmesh.core.serialization import structure

        pki = Pki()
        tls = TLSConfig(acme=True, client_ca=pki.root.pem, client_verify="optional")
        assert structure(unstructure(tls), TLSConfig) == tls
        assert "client_ca" not in unstructure(TLSConfig(acme=True))  # earlier digests kept
        with pytest.raises(Invalid) as exc:
            TLSConfig(acme=True, client_verify="optional")
        assert paths_of(exc) == ["client_verify"]
        with pytest.raises(Invalid) as exc:
            TLSConfig(acme=True, client_ca=pki.root.pem + pki.root.key_pem)
        assert paths_of(exc) == ["client_ca"]
        assert "PRIVATE" not in str(exc.value)
        with pytest.raises(Invalid) as exc:
            TLSConfig(acme=True, client_ca=pki.root.pem, client_verify="on")  # type: ignore[arg-type]
        assert paths_of(exc) == ["client_verify"]

    def test_client_certificates_leave_plain_listeners_the_redirect_only(self) -> None:
        """A plain listener serving the site would skip the certificate check: with
        ``client_ca`` the plain listeners must be the HTTPS redirect's."""
        pki = Pki()
        listeners = (Listener(80), Listener(443, tls=True))
        checked = TLSConfig(certificate="c", client_ca=pki.root.pem, redirect_http=False)
        with pytest.raises(Invalid) as exc:
            make_site(listeners=listeners, tls=checked)
        assert paths_of(exc) == ["listeners[0].tls"]
        assert "without the client certificates" in str(exc.value)
        redirected = attrs.evolve(checked, redirect_http=True)
        assert make_site(listeners=listeners, tls=redirected).tls == redirected

    def test_client_crl_is_revocation_lists_only(self) -> None:
        """``client_crl`` holds X509 CRL blocks that parse, and only applies with CAs."""
        pki = Pki()
        crl = pki.crl(pki.root)
        assert TLSConfig(acme=True, client_ca=pki.root.pem, client_crl=crl).client_crl == crl
        with pytest.raises(Invalid) as exc:
            TLSConfig(acme=True, client_crl=crl)
        assert paths_of(exc) == ["client_crl"]
        broken = crl.replace(crl.splitlines()[1], "A" * 64)
        for bad in (pki.root.pem, crl + pki.root.key_pem, broken):
            with pytest.raises(Invalid) as exc:
                TLSConfig(acme=True, client_ca=pki.root.pem, client_crl=bad)
            assert paths_of(exc) == ["client_crl"]
            assert "PRIVATE" not in str(exc.value)


class TestHeaderRedirectReturn:
    def test_header_value_may_contain_spaces_and_single_quotes(self) -> None:
        """CSP-style values with spaces and single quotes are fine."""
        assert Header("Content-Security-Policy", "default-src 'self'").value

    @pytest.mark.parametrize("code", [200, 204, 404, 444, 503])
    def test_return_codes(self, code: int) -> None:
        """2xx, 4xx and 5xx codes are valid for return."""
        assert Return(code).code == code

    @pytest.mark.parametrize("code", [100, 301, 302, 600, True])
    def test_bad_return_codes(self, code: int) -> None:
        """1xx, 3xx, out-of-range and boolean codes are rejected for return."""
        with pytest.raises(Invalid):
            Return(code)

    @pytest.mark.parametrize("code", [200, 304, 399])
    def test_bad_redirect_codes(self, code: int) -> None:
        """Redirects only use 301, 302, 303, 307 or 308."""
        with pytest.raises(Invalid):
            Redirect(code, "/x")


class TestLocation:
    def test_needs_an_action(self) -> None:
        """A location without an action is rejected at the location."""
        with pytest.raises(Invalid, match="got none") as exc:
            Location(path="/")
        assert paths_of(exc) == [""]

    def test_one_action_only(self) -> None:
        """Two actions are rejected naming both."""
        with pytest.raises(Invalid, match="got upstream and root"):
            Location(path="/", upstream="app", root="/srv")

    def test_actions_property(self) -> None:
        """actions names the one action set."""
        assert loc(redirect=Redirect(301, "/x")).actions == ("redirect",)

    def test_path_rule_follows_match(self) -> None:
        """A regex is fine for regex locations but not for prefix ones."""
        assert loc("^/a/.*$", match="regex").path == "^/a/.*$"
        with pytest.raises(Invalid) as exc:
            loc("^/a/.*$")
        assert paths_of(exc) == ["path"]

    def test_proxy_options_need_upstream(self) -> None:
        """websocket, proxy_headers and proxy_read_timeout only apply to proxied locations."""
        with pytest.raises(Invalid) as exc:
            loc(
                root="/srv",
                websocket=True,
                proxy_headers=(Header("X-A", "1"),),
                proxy_read_timeout=5,
            )
        assert paths_of(exc) == ["websocket", "proxy_headers", "proxy_read_timeout"]

    def test_index_needs_root(self) -> None:
        """index only applies to static locations."""
        with pytest.raises(Invalid) as exc:
            loc(upstream="app", index=("index.html",))
        assert paths_of(exc) == ["index"]

    @pytest.mark.parametrize("action", [{"upstream": "app"}, {"return_": Return(204)}])
    def test_serve_dotfiles_needs_root(self, action: dict[str, object]) -> None:
        """serve_dotfiles only applies to static locations; false is fine anywhere."""
        with pytest.raises(Invalid) as exc:
            loc(serve_dotfiles=True, **action)
        assert paths_of(exc) == ["serve_dotfiles"]
        assert "serves files from a root" in str(exc.value)
        assert loc(serve_dotfiles=False, **action).serve_dotfiles is False

    @pytest.mark.parametrize("action", [{"upstream": "app"}, {"return_": Return(204)}])
    def test_fallback_needs_root(self, action: dict[str, object]) -> None:
        """fallback only applies to static locations."""
        with pytest.raises(Invalid) as exc:
            loc(fallback="/index.html", **action)
        assert paths_of(exc) == ["fallback"]
        assert "serves files from a root" in str(exc.value)
        assert loc(fallback="/index.html", root="/srv/app").fallback == "/index.html"

    @pytest.mark.parametrize(
        "fallback",
        [
            "index.html",
            "/a b",
            "/$uri",
            "=404",
            "/x;",
            "",
            # nginx redirects to it as written: a '..' would climb out of the root (or the
            # ACME alias, to the site's key), an escape would never match a file.
            "/../etc/passwd",
            "/.well-known/acme-challenge/../certs/site.key",
            "/app/./index.html",
            "/..",
            "//index.html",
            "/a%20b.html",
        ],
    )
    def test_fallback_is_a_plain_uri_path(self, fallback: str) -> None:
        """The fallback is a plain URI path: nothing that would read as an nginx variable,
        status code or second argument, and nothing nginx would have to normalise."""
        with pytest.raises(Invalid) as exc:
            loc(fallback=fallback, root="/srv/app")
        assert paths_of(exc) == ["fallback"]

    @pytest.mark.parametrize("fallback", ["/index.html", "/", "/app/", "/.well-known/x", "/a..b"])
    def test_fallback_accepted(self, fallback: str) -> None:
        assert loc(fallback=fallback, root="/srv/app").fallback == fallback

    @pytest.mark.parametrize("action", [{"root": "/srv/app"}, {"return_": Return(204)}])
    def test_request_buffering_switch_needs_upstream(self, action: dict[str, object]) -> None:
        """proxy_request_buffering only applies to proxy locations; on (the default) is
        fine anywhere."""
        with pytest.raises(Invalid) as exc:
            loc("/", proxy_request_buffering=False, **action)
        assert paths_of(exc) == ["proxy_request_buffering"]
        assert loc("/", **action).proxy_request_buffering is True

    @pytest.mark.parametrize("action", [{"root": "/srv/app"}, {"return_": Return(204)}])
    def test_cache_needs_upstream(self, action: dict[str, object]) -> None:
        """A cache keeps an upstream's answers: refused on other locations."""
        with pytest.raises(Invalid) as exc:
            loc("/", cache=ProxyCache(valid=60), **action)
        assert paths_of(exc) == ["cache"]
        assert "proxies to an upstream" in str(exc.value)

    @pytest.mark.parametrize(
        ("fields", "path", "says"),
        [
            ({"valid": 0}, "valid", "must be from 1 to 31536000, got 0"),
            ({"valid": 31_536_001}, "valid", "must be from 1 to 31536000"),
            ({"valid": "10m"}, "valid", "must be an integer"),
            ({"valid": 60, "with_cookies": "yes"}, "with_cookies", "must be one of True, False"),
        ],
    )
    def test_cache_fields_are_checked(
        self, fields: dict[str, object], path: str, says: str
    ) -> None:
        """`valid` is whole seconds, at most a year; the switches are booleans."""
        with pytest.raises(Invalid) as exc:
            ProxyCache(**fields)  # type: ignore[arg-type]
        assert paths_of(exc) == [path]
        assert says in str(exc.value)

    def test_cache_round_trips_and_keeps_earlier_digests(self) -> None:
        """Through the converter and back; a location without one keeps its JSON."""
        from nxmesh.core.serialization import structure

        cached = loc("/", upstream="app", cache=ProxyCache(valid=30, with_cookies=True))
        assert structure(unstructure(cached), Location) == cached
        assert unstructure(cached)["cache"] == {
            "valid": 30,
            "with_cookies": True,
            "serve_stale": True,
        }
        assert "cache" not in unstructure(loc("/", upstream="app"))

    @pytest.mark.parametrize("action", [{"root": "/srv/app"}, {"return_": Return(204)}])
    def test_strip_prefix_needs_upstream(self, action: dict[str, object]) -> None:
        """strip_prefix only applies to proxy locations; false is fine anywhere."""
        with pytest.raises(Invalid) as exc:
            loc("/api/", strip_prefix=True, **action)
        assert paths_of(exc) == ["strip_prefix"]
        assert "proxies to an upstream" in str(exc.value)
        assert loc("/api/", strip_prefix=False, **action).strip_prefix is False

    @pytest.mark.parametrize(
        ("path", "match", "says"),
        [
            ("/api", "prefix", "a path ending in '/'"),
            ("/api", "prefix_priority", "a path ending in '/'"),
            ("^/api/", "regex", "cannot replace what a regular expression matched"),
            ("^/api/", "regex_ci", "cannot replace what a regular expression matched"),
        ],
    )
    def test_strip_prefix_needs_a_prefix_nginx_can_replace(
        self, path: str, match: str, says: str
    ) -> None:
        """nginx replaces the matched prefix with '/': without a trailing slash '/api/x'
        would go upstream as '//x', and a regex location cannot have a URI in proxy_pass
        (nginx -t refuses it)."""
        with pytest.raises(Invalid, match=re.escape(says)) as exc:
            loc(path, match=match, upstream="app", strip_prefix=True)
        assert paths_of(exc) == ["strip_prefix"]

    @pytest.mark.parametrize(
        ("path", "match"), [("/api/", "prefix"), ("/api/", "prefix_priority"), ("/v1", "exact")]
    )
    def test_strip_prefix_accepted(self, path: str, match: str) -> None:
        """A prefix ending in '/' or an exact path."""
        assert loc(path, match=match, upstream="app", strip_prefix=True).strip_prefix

    @pytest.mark.parametrize(
        "action", [{"redirect": Redirect(301, "/x")}, {"return_": Return(204)}]
    )
    def test_allow_needs_an_access_checked_action(self, action: dict[str, object]) -> None:
        """nginx answers redirect and return before its access phase: an allow list there
        would restrict nothing, so it is refused, saying why."""
        with pytest.raises(Invalid) as exc:
            loc(allow=("10.0.0.0/8",), **action)
        assert paths_of(exc) == ["allow"]
        assert "before it checks access" in str(exc.value)
        assert loc(allow=("10.0.0.0/8",), upstream="app").allow == ("10.0.0.0/8",)

    @pytest.mark.parametrize(
        "regex", [r"^/img/\d{3}\.png$", r"^/[a-z]{2,8}/", r"^/v{2,}", r"^/(ab){2}$", r"\d{3}\d{3}"]
    )
    def test_repetition_counts_are_accepted(self, regex: str) -> None:
        """``{n}``, ``{n,m}`` and ``{n,}`` after an atom: the renderer quotes every regex,
        so the braces cannot open an nginx block."""
        assert loc(regex, match="regex", upstream="app").path == regex

    @pytest.mark.parametrize(
        ("regex", "says"),
        [
            (r"^/a{,5}", "'{' is only allowed in a repetition count after an atom, like {3}"),
            (r"^/a+{2}", "'{' is only allowed in a repetition count"),
            (r"^/a}", "'}' is only allowed to close a repetition count"),
            (r"^/[{]", "'{' and '}' are not allowed in a character class"),
            (r"^/a{5,2}", "repetition count {5,2} has its bounds the wrong way round"),
            (r"^/a{256}", "repetition count {256} exceeds 255"),
            (r"^/a{01}", "repetition count {01} has a leading zero"),
            (r"^/(?=a){2}b", "'{' is only allowed in a repetition count after an atom"),
            (r"^/(a|b){2}", "repeats the group '(a|b){2}'"),
            (r"\d{1,3}\d{1,3}", r"repeats '\d{1,3}' and then '\d{1,3}'"),
        ],
    )
    def test_repetition_count_errors_say_why(self, regex: str, says: str) -> None:
        with pytest.raises(Invalid) as exc:
            loc(regex, match="regex", upstream="app")
        assert paths_of(exc) == ["path"]
        assert says in str(exc.value)

    @pytest.mark.parametrize(
        ("regex", "says"),
        [
            ("^/(a|aa)+$", "repeats the group '(a|aa)+', which holds an alternative ('|')"),
            ("^/(a?)+", "repeats the group '(a?)+'"),
            ("^/[[:foo:]]", "uses the unknown POSIX class '[:foo:]'"),
            ("^/[[.a.]]", "the POSIX collating element '[.a.]'"),
            ("^/[:alpha:]", "only inside brackets, like [[:alpha:]]"),
        ],
    )
    def test_regex_error_names_the_construct(self, regex: str, says: str) -> None:
        """A refused regex is reported at 'path', quoting the construct nginx would choke on."""
        with pytest.raises(Invalid) as exc:
            loc(regex, match="regex")
        [(path, reason)] = exc.value.problems
        assert path == "path"
        assert says in reason

    @pytest.mark.parametrize(
        ("root", "says"),
        [
            ("/var", "would expose the protected system directory /var/lib"),
            ("/var/lib/nxmesh-agent", "is inside the protected system directory /var/lib"),
            ("/run", "is a protected system directory"),
            ("/home", "would expose every user's ~/.ssh keys"),
            ("/home/alice", "is a home directory and would expose its ~/.ssh keys"),
            ("/srv/www/.git", "goes through the hidden directory '.git'"),
        ],
    )
    def test_root_error_names_what_it_exposes_and_what_to_use(self, root: str, says: str) -> None:
        """A refused root is reported at 'root', saying what it exposes and where content
        belongs instead."""
        with pytest.raises(Invalid) as exc:
            loc(root=root)
        [(path, reason)] = exc.value.problems
        assert path == "root"
        assert says in reason
        assert "/srv/www/<site>" in reason

    def test_all_field_problems_of_a_field_are_reported(self) -> None:
        """Every bad item of a list field is reported, not only the first."""
        with pytest.raises(Invalid) as exc:
            loc(root="/srv", index=("ok.html", "../x", "a b"))
        assert paths_of(exc) == ["index[1]", "index[2]"]


class TestSite:
    @pytest.mark.parametrize(
        ("field", "value", "path", "says"),
        [
            ("allow", ("10.0.0.1/8",), "allow[0]", "host bits set; the network is 10.0.0.0/8"),
            ("allow", ("::/0",), "allow[0]", "every address: an empty list already lets"),
            ("allow", ("10.0.0.0/8", "intranet"), "allow[1]", "must be an IPv4 or IPv6 address"),
            ("allow", ("10.0.0.0/33",), "allow[0]", "is not an IPv4 or IPv6 address"),
            ("allow", ("10.0.0.0/8; allow all",), "allow[0]", "must be an IPv4 or IPv6"),
            ("real_ip_from", ("0.0.0.0/0",), "real_ip_from[0]", "any client choose"),
            ("real_ip_from", ("10.0.0.0/8", "128.0.0.0/1"), "real_ip_from[1]", "wider than a /8"),
            ("real_ip_from", ("fc00::/7",), "real_ip_from[0]", "wider than a /8"),
            ("real_ip_from", ("lb.internal",), "real_ip_from[0]", "IPv4 or IPv6"),
            ("real_ip_header", "True-Client-IP", "real_ip_header", "X-Forwarded-For"),
        ],
    )
    def test_client_address_fields_are_checked(
        self, field: str, value: object, path: str, says: str
    ) -> None:
        """Addresses reaching ``allow`` / ``set_real_ip_from`` are IP networks, named by
        index, with what is wrong (host bits, /0, not an address)."""
        extra = {"real_ip_from": ("10.0.0.1",)} if field == "real_ip_header" else {}
        with pytest.raises(Invalid) as exc:
            make_site(**{field: value, **extra})
        assert paths_of(exc) == [path]
        assert says in str(exc.value)

    def test_real_ip_header_needs_real_ip_from(self) -> None:
        with pytest.raises(Invalid, match="only applies with real_ip_from") as exc:
            make_site(real_ip_header="X-Real-IP")
        assert paths_of(exc) == ["real_ip_header"]
        site = make_site(real_ip_header="X-Real-IP", real_ip_from=("10.0.0.0/8", "fd00::/8"))
        assert site.real_ip_from == ("10.0.0.0/8", "fd00::/8")

    @pytest.mark.parametrize(
        ("value", "reason"),
        [
            (0, "must be from 1 to 65535, got 0"),
            (70000, "must be from 1 to 65535, got 70000"),
            ("443", "must be an integer"),
            (True, "must be an integer"),
        ],
    )
    def test_public_port_is_a_port(self, value: Any, reason: str) -> None:
        with pytest.raises(Invalid, match=reason) as exc:
            Listener(8443, tls=True, public_port=value)
        assert paths_of(exc) == ["public_port"]

    def test_public_port_maps_only_when_it_differs(self) -> None:
        """`mapped` says clients use another port; the field stays out of the canonical
        form while unset, so earlier states keep their digests."""
        assert "public_port" not in unstructure(Listener(8443, tls=True))
        assert unstructure(Listener(8443, public_port=443))["public_port"] == 443
        assert Listener(8443, public_port=443).mapped
        assert not Listener(443, public_port=443).mapped
        assert not Listener(8443).mapped

    def test_every_listener_on_a_port_agrees_on_its_public_port(self) -> None:
        """A port mapping forwards a port, whatever the site: another site's listener on
        8443 saying another public port, or none, is refused at the field; the same
        public port, and other ports, are fine."""
        mapped = make_site(listeners=(Listener(8443, public_port=443),))

        def other(*listeners: Listener) -> Site:
            return make_site("other", server_names=("other.test",), listeners=listeners)

        for listener in (Listener(8443), Listener(8443, public_port=9443)):
            problems = check_state(DesiredState(sites=(mapped, other(listener))))
            assert [p.path for p in problems] == ["sites[1].listeners[0].public_port"]
            assert problems[0].message == (
                "port 8443 is reached on port 443 in sites[0] ('web'): a port mapping "
                "forwards the whole port, so every listener on port 8443 must say "
                "public_port: 443"
            )
        fine = other(Listener(8443, public_port=443), Listener(8080))
        assert check_state(DesiredState(sites=(mapped, fine))) == []

    def test_a_mapped_site_redirecting_from_port_80_is_warned(self) -> None:
        """Behind a port mapping nginx often cannot bind port 80, where a TLS-only site's
        implicit redirect listens: a warning naming the listener to declare instead."""
        tls_only = make_site(
            listeners=(Listener(8443, tls=True, public_port=443),), tls=TLSConfig(certificate="c")
        )
        state = DesiredState(
            sites=(tls_only,), certificates=(CertificateRef("c", ("example.com",)),)
        )
        [warning] = [p for p in submission_problems(state) if p.severity == "warning"]
        assert warning.path == "sites[0].tls.redirect_http"
        assert "{port: 8080, public_port: 80}" in warning.message
        declared = attrs.evolve(
            tls_only, listeners=(*tls_only.listeners, Listener(8080, public_port=80))
        )
        state = attrs.evolve(state, sites=(declared,))
        assert [p for p in submission_problems(state) if p.severity == "warning"] == []

    def test_proxy_protocol_sockets(self) -> None:
        """``real_ip_header: proxy_protocol`` needs a listener expecting the line; every
        site of a socket agrees on it, the implicit redirect server's port 80 included
        (it follows the site's listeners); `proxy_protocol` stays out of the canonical
        form while off."""
        assert "proxy_protocol" not in unstructure(Listener(80))
        with pytest.raises(Invalid, match="none of the site's listeners expects") as exc:
            make_site(real_ip_header="proxy_protocol", real_ip_from=("10.0.0.0/8",))
        assert paths_of(exc) == ["real_ip_header"]
        behind = make_site(
            listeners=(Listener(80, proxy_protocol=True),),
            real_ip_header="proxy_protocol",
            real_ip_from=("10.0.0.0/8",),
        )
        other = make_site("other", server_names=("other.test",))
        problems = check_state(DesiredState(sites=(behind, other)))
        assert [p.path for p in problems] == ["sites[1].listeners[0].proxy_protocol"]
        assert "port 80 expects PROXY protocol lines in sites[0] ('web')" in problems[0].message
        tls_only = make_site(
            "tls",
            server_names=("tls.test",),
            listeners=(Listener(443, tls=True, proxy_protocol=True),),
            tls=TLSConfig(certificate="c"),
        )
        mixed = DesiredState(
            sites=(tls_only, other), certificates=(CertificateRef("c", ("tls.test",)),)
        )
        [problem] = check_state(mixed)
        assert problem.path == "sites[1].listeners[0].proxy_protocol"
        together = attrs.evolve(mixed, sites=(tls_only, behind))
        assert check_state(together) == []
        # The implicit redirect is named as what expects the line.
        [problem] = check_state(attrs.evolve(mixed, sites=(tls_only, other)))
        assert "in sites[0] ('tls')'s HTTP→HTTPS redirect;" in problem.message

    def test_proxy_protocol_sites_that_would_judge_the_wrong_address_are_warned(
        self,
    ) -> None:
        """Behind a TCP balancer: believing X-Forwarded-For (the client's own header,
        passed through) or no one (every client is the balancer) under `allow`."""
        proxied = (Listener(80, proxy_protocol=True),)
        header = make_site(listeners=proxied, real_ip_from=("10.0.0.0/8",))
        nobody = make_site(listeners=proxied, allow=("192.0.2.0/24",))
        right = make_site(
            listeners=proxied,
            allow=("192.0.2.0/24",),
            real_ip_from=("10.0.0.0/8",),
            real_ip_header="proxy_protocol",
        )
        found = {
            name: [(p.path, p.severity) for p in check_state(DesiredState(sites=(site,)))]
            for name, site in (("header", header), ("nobody", nobody), ("right", right))
        }
        assert found == {
            "header": [("sites[0].real_ip_header", "warning")],
            "nobody": [("sites[0].real_ip_from", "warning")],
            "right": [],
        }

    def test_server_names_are_lowercased(self) -> None:
        """ASCII server names are normalised to lowercase."""
        assert make_site(server_names=("WWW.Example.COM",)).server_names == ("www.example.com",)

    def test_tls_listener_needs_tls_config(self) -> None:
        """A TLS listener without tls settings is rejected at 'tls'."""
        with pytest.raises(Invalid, match="listeners\\[0\\] has tls") as exc:
            make_site(listeners=(Listener(443, tls=True),))
        assert paths_of(exc) == ["tls"]

    def test_tls_config_needs_tls_listener(self) -> None:
        """tls settings without a TLS listener are rejected at 'tls'."""
        with pytest.raises(Invalid, match="no listener") as exc:
            make_site(tls=TLSConfig(acme=True))
        assert paths_of(exc) == ["tls"]

    def test_duplicate_listener(self) -> None:
        """Two listeners on the same address and port are rejected."""
        with pytest.raises(Invalid) as exc:
            make_site(listeners=(Listener(80), Listener(80, http2=True)))
        assert paths_of(exc) == ["listeners[1].port"]

    @pytest.mark.parametrize(
        ("first", "second"),
        [
            (None, "*"),
            (None, "0.0.0.0"),
            ("*", "0.0.0.0"),
            ("::", "0:0::0"),
            ("::1", "0:0:0:0:0:0:0:1"),
            ("2001:db8::1", "2001:DB8::1"),
        ],
    )
    def test_duplicate_listener_spelled_differently(
        self, first: str | None, second: str | None
    ) -> None:
        """Two spellings of one socket are one socket: nginx says 'a duplicate listen'."""
        with pytest.raises(Invalid) as exc:
            make_site(listeners=(Listener(80, address=first), Listener(80, address=second)))
        assert paths_of(exc) == ["listeners[1].port"]
        assert "are the same address to nginx" in exc.value.problems[0][1]

    def test_same_port_different_address_is_fine(self) -> None:
        """Listeners on one port but different addresses are distinct."""
        site = make_site(listeners=(Listener(80, address="10.0.0.1"), Listener(80, address="::1")))
        assert len(site.listeners) == 2
        # The IPv4 and IPv6 wildcards are different sockets (nginx sets ipv6only).
        site = make_site(listeners=(Listener(80), Listener(80, address="::")))
        assert len(site.listeners) == 2

    def test_python_lists_and_wrong_types_are_rejected(self) -> None:
        """Python callers get a clear error for a list or a wrong element type."""
        with pytest.raises(Invalid, match="must be a tuple") as exc:
            make_site(locations=[loc()])
        assert paths_of(exc) == ["locations"]
        with pytest.raises(Invalid, match="must be a Location") as exc:
            make_site(locations=(loc(), {"path": "/x"}))
        assert paths_of(exc) == ["locations[1]"]
        with pytest.raises(Invalid, match="must be a TLSConfig") as exc:
            make_site(listeners=(Listener(443, tls=True),), tls="acme")
        assert paths_of(exc) == ["tls"]

    @pytest.mark.parametrize("field", ["server_names", "locations", "listeners"])
    def test_lists_must_not_be_empty(self, field: str) -> None:
        """A site needs at least one server name, location and listener."""
        with pytest.raises(Invalid) as exc:
            make_site(**{field: ()})  # type: ignore[arg-type]
        assert paths_of(exc) == [field]


class TestErrorPages:
    def test_a_page_per_set_of_codes_round_trips(self) -> None:
        """Pages keep their codes and HTML (CR LF and non-ASCII included) through the
        converter; the body stays out of repr (it can be 64 KB)."""
        from nxmesh.core.serialization import structure

        page = ErrorPage(codes=(502, 503), body="<p>Back soon</p>\r\n<p>Bientôt</p>")
        site = make_site(error_pages=(page,), intercept_upstream_errors=True)
        assert structure(unstructure(site), Site) == site
        assert "Back soon" not in repr(site)
        assert f"body=<{len(page.body)} characters>" in repr(page)

    def test_a_body_that_is_no_text_is_named_as_such(self) -> None:
        """The body is not secret: a wrong type is reported as it is."""
        from nxmesh.core.errors import ValidationError
        from nxmesh.core.serialization import structure_state

        site = {
            "name": "a",
            "server_names": ["a.test"],
            "locations": [{"path": "/", "return": {"code": 204}}],
        }
        site["error_pages"] = [{"codes": [404], "body": 5}]
        with pytest.raises(ValidationError) as exc:
            structure_state({"sites": [site]})
        [problem] = exc.value.problems
        assert problem.path == "sites[0].error_pages[0].body"
        assert "secret" not in problem.message

    @pytest.mark.parametrize(
        ("codes", "path", "says"),
        [
            ((), "codes", "needs at least one status code"),
            ((200,), "codes[0]", "must be a 4xx or 5xx status code, got 200"),
            ((302,), "codes[0]", "must be a 4xx or 5xx status code, got 302"),
            ((600,), "codes[0]", "must be a 4xx or 5xx status code, got 600"),
            ((444,), "codes[0]", "444 closes the connection without a response"),
            ((404, 499), "codes[1]", "499 is never sent"),
            ((404, 404), "codes[1]", "repeats [0] (404)"),
            ((True,), "codes[0]", "must be an integer, got a boolean"),
            (["404"], "codes", "must be a tuple"),
        ],
    )
    def test_codes_are_client_and_server_errors_nginx_answers(
        self, codes: Any, path: str, says: str
    ) -> None:
        """Only 4xx and 5xx codes nginx sends a response for, each once, named by index."""
        with pytest.raises(Invalid) as exc:
            ErrorPage(codes=codes, body="x")
        assert paths_of(exc) == [path]
        assert says in str(exc.value)

    @pytest.mark.parametrize(
        ("body", "says"),
        [
            ("", "must not be empty"),
            ("a\x00b", "NUL"),
            ("a\x1b[31m", "must be HTML text without control characters"),
            ("<p>\ud800</p>", "contains U+D800, half of a UTF-16 surrogate pair"),
            ("x" * 65_537, "at most 65536 are allowed"),
        ],
    )
    def test_body_is_bounded_text(self, body: str, says: str) -> None:
        """The page is text of at most 64 Ki characters, without control characters
        other than tab and line ends."""
        with pytest.raises(Invalid) as exc:
            ErrorPage(codes=(500,), body=body)
        assert paths_of(exc) == ["body"]
        assert says in str(exc.value)
        assert says in str(exc.value)

    def test_a_code_belongs_to_one_page(self) -> None:
        """A code on two pages would leave one page unused for it: refused, naming both."""
        pages = (ErrorPage(codes=(502, 503), body="a"), ErrorPage(codes=(404, 503), body="b"))
        with pytest.raises(Invalid) as exc:
            make_site(error_pages=pages)
        problem = ("error_pages[1].codes[1]", "503 is in error_pages[0] already")
        assert list(exc.value.problems) == [problem]

    def test_intercepting_needs_pages(self) -> None:
        """``intercept_upstream_errors`` without pages would change nothing: refused."""
        with pytest.raises(Invalid) as exc:
            make_site(intercept_upstream_errors=True)
        assert paths_of(exc) == ["intercept_upstream_errors"]

    @pytest.mark.parametrize(
        ("path", "match", "refused"),
        [
            ("/.nxmesh-errors/", "prefix", True),
            ("/.nxmesh-errors/0.html", "exact", True),
            ("/.nxmesh-errors/x/", "prefix_priority", True),
            ("^/\\.nxmesh-errors/", "regex", False),
            ("/.nxmesh-errors", "exact", False),
        ],
    )
    def test_the_pages_uri_prefix_is_the_renderers(
        self, path: str, match: str, refused: bool
    ) -> None:
        """With pages, a location under their URI prefix would take nginx's redirects to
        them (or be a duplicate location); a regex location never beats the renderer's
        ``^~`` location. Without pages the path is the site's own."""
        location = loc(path, match=match)
        page = ErrorPage(codes=(404,), body="x")
        make_site(locations=(loc(), location))
        if not refused:
            make_site(locations=(loc(), location), error_pages=(page,))
            return
        with pytest.raises(Invalid) as exc:
            make_site(locations=(loc(), location), error_pages=(page,))
        assert paths_of(exc) == ["locations[1].path"]
        assert "where the site's error pages are served from" in str(exc.value)

    def test_fields_at_defaults_stay_out_of_the_canonical_json(self) -> None:
        """Both fields are left out at their defaults, so earlier states keep their
        digests."""
        data = unstructure(make_site())
        assert "error_pages" not in data
        assert "intercept_upstream_errors" not in data


class TestUpstreamTLS:
    def test_verify_needs_the_name_certificates_carry(self) -> None:
        """With verify on (the default) the server name is required, saying why and how to
        go without; verify off needs none."""
        with pytest.raises(Invalid, match="verify: false") as exc:
            UpstreamTLS()
        assert paths_of(exc) == ["server_name"]
        assert UpstreamTLS(verify=False).server_name is None

    def test_ca_needs_verify(self) -> None:
        """A CA to trust means nothing when nothing is verified."""
        with pytest.raises(Invalid) as exc:
            UpstreamTLS(verify=False, ca=Pki().root.pem)
        assert paths_of(exc) == ["ca"]

    @pytest.mark.parametrize(
        ("ca", "says"),
        [
            ("not a certificate", "only -----BEGIN CERTIFICATE----- blocks"),
            ("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "not parse"),
            ("caf\u00e9", "only -----BEGIN CERTIFICATE----- blocks"),
        ],
    )
    def test_ca_must_be_certificates(self, ca: str, says: str) -> None:
        with pytest.raises(Invalid, match=says) as exc:
            UpstreamTLS(server_name="api.internal", ca=ca)
        assert paths_of(exc) == ["ca"]

    @pytest.mark.parametrize(
        "extra",
        [
            lambda key: key,
            lambda key: key.replace("PRIVATE KEY", "private key"),
            lambda key: "\n".join(key.splitlines()[1:-1]) + "\n",  # the body alone
            lambda _key: "password: hunter2\n",
        ],
        ids=["key", "lowercase-label", "bare-body", "note"],
    )
    def test_only_certificate_blocks_are_kept(self, extra: Any) -> None:
        """The value is stored in every version unencrypted, sent to every agent and shown
        in diffs: anything beside the certificates (a key, however labelled, a note) is
        refused, and no part of it appears in the error."""
        pki = Pki()
        added = extra(pki.root.key_pem)
        with pytest.raises(Invalid) as exc:
            UpstreamTLS(server_name="api.internal", ca=pki.root.pem + added)
        assert paths_of(exc) == ["ca"]
        assert added.splitlines()[-1][:16] not in str(exc.value)
        assert pki.root.pem[100:116] not in repr(UpstreamTLS(server_name="a", ca=pki.root.pem))

    @pytest.mark.parametrize("name", ["127.0.0.1", "10.0.5.10"])
    def test_server_name_is_not_an_address(self, name: str) -> None:
        """nginx 1.22 sends no SNI for an address and checks certificates by DNS name only:
        a certificate with the address in its SAN is still refused (a 502)."""
        with pytest.raises(Invalid, match="IP address") as exc:
            UpstreamTLS(server_name=name)
        assert paths_of(exc) == ["server_name"]

    def test_server_name_is_a_hostname(self) -> None:
        with pytest.raises(Invalid) as exc:
            UpstreamTLS(server_name="api internal;")
        assert paths_of(exc) == ["server_name"]
        with pytest.raises(Invalid, match="lowercase"):
            UpstreamTLS(server_name="API.internal")

    def test_an_upstream_without_tls_keeps_its_digest(self) -> None:
        """`tls` is an added field: absent from the canonical JSON when not set."""
        plain = Upstream("app", (UpstreamServer("127.0.0.1:8080"),))
        assert "tls" not in unstructure(plain)
        tls = attrs.evolve(plain, tls=UpstreamTLS(verify=False))
        assert unstructure(tls)["tls"] == {
            "server_name": None,
            "verify": False,
            "ca": None,
            "host": "server_name",
        }

    def test_client_host_needs_a_server_name(self) -> None:
        """Without a server name the servers get the client's Host anyway."""
        with pytest.raises(Invalid) as exc:
            UpstreamTLS(verify=False, host="client")
        assert paths_of(exc) == ["host"]
        assert UpstreamTLS(server_name="api.internal", host="client").host == "client"


class TestUpstream:
    def test_needs_a_server(self) -> None:
        """An upstream without servers is rejected."""
        with pytest.raises(Invalid) as exc:
            Upstream("app", ())
        assert paths_of(exc) == ["servers"]

    @pytest.mark.parametrize("method", ["ip_hash", "random"])
    def test_backup_conflicts_with_method(self, method: str) -> None:
        """backup servers are refused with ip_hash and random, as nginx does."""
        servers = (UpstreamServer("a:80"), UpstreamServer("b:80", backup=True))
        with pytest.raises(Invalid) as exc:
            Upstream("app", servers, method)  # type: ignore[arg-type]
        assert paths_of(exc) == ["servers[1].backup"]

    def test_backup_only_is_rejected(self) -> None:
        """An upstream whose every server is a backup has nothing to serve from."""
        with pytest.raises(Invalid, match="not a backup"):
            Upstream("app", (UpstreamServer("a:80", backup=True),))

    @pytest.mark.parametrize(
        "address", ["app:80", "10.0.0.1:8080", "[2001:db8::1]:443", "unix:/run/app.sock", "A_B:1"]
    )
    def test_server_addresses(self, address: str) -> None:
        """Hostnames, IPv4, bracketed IPv6 and unix sockets are accepted."""
        assert UpstreamServer(address).address == address

    @pytest.mark.parametrize("field", ["weight", "max_fails", "fail_timeout"])
    def test_server_numbers_are_bounded(self, field: str) -> None:
        """Server parameters are bounded integers."""
        with pytest.raises(Invalid) as exc:
            UpstreamServer("a:80", **{field: 10**9})  # type: ignore[arg-type]
        assert paths_of(exc) == [field]


class TestFleetObjects:
    def test_health_status_is_worst(self) -> None:
        """A report's status is its worst result; empty reports are ok."""
        results = (HealthResult("a", "ok"), HealthResult("b", "fail"), HealthResult("c", "warn"))
        assert HealthReport("agent", 0.0, results).status == "fail"
        assert HealthReport("agent", 0.0, results[::2]).status == "warn"
        assert HealthReport("agent", 0.0, ()).status == "ok"

    def test_long_nginx_output_is_truncated(self) -> None:
        """Huge nginx output is cut with a marker instead of failing the report."""
        report = ApplyReport(
            agent_id="a1", version=1, digest="d", outcome="failed", nginx_output="x" * 100_000
        )
        assert len(report.nginx_output) == 65536
        assert report.nginx_output.endswith("[truncated]")

    def test_agent_status_is_checked(self) -> None:
        """An unknown agent status is rejected."""
        with pytest.raises(Invalid) as exc:
            Agent(id="a1", name="n", status="lost")  # type: ignore[arg-type]
        assert paths_of(exc) == ["status"]

    def test_log_text_rejects_control_characters(self) -> None:
        """A version message keeps newlines but refuses terminal escape sequences."""
        fields = {
            "workspace": "default",
            "number": 1,
            "digest": "d",
            "parent_digest": None,
            "author": "alice",
            "created_at": 0.0,
            "state": DesiredState(),
        }
        assert ConfigVersion(message="fix\n\nbody", **fields).message == "fix\n\nbody"  # type: ignore[arg-type]
        with pytest.raises(Invalid) as exc:
            ConfigVersion(message="\x1b[2Jall good", **fields)  # type: ignore[arg-type]
        assert paths_of(exc) == ["message"]
        # JSON's "\ud800" decodes to a lone surrogate, which UTF-8 cannot hold: refused
        # here rather than failing when the version is hashed or stored.
        with pytest.raises(Invalid) as exc:
            ConfigVersion(message="fix \ud800", **fields)  # type: ignore[arg-type]
        assert "half of a UTF-16 surrogate pair" in str(exc.value)
        assert ConfigVersion(message="fix 😀", **fields).message == "fix 😀"  # type: ignore[arg-type]


def state(
    *sites: Site, upstreams: tuple[Upstream, ...] = (), certs: tuple[CertificateRef, ...] = ()
) -> DesiredState:
    return DesiredState(sites=sites, upstreams=upstreams, certificates=certs)


APP = Upstream("app", (UpstreamServer("app:80"),))


class TestCheckState:
    def test_valid_state_has_no_problems(self) -> None:
        """A consistent state produces no problems."""
        s = state(
            make_site(locations=(loc(upstream="app"),)),
            make_site(
                "api",
                server_names=("api.example.com",),
                listeners=(Listener(443, tls=True),),
                tls=TLSConfig(certificate="main"),
            ),
            upstreams=(APP,),
            certs=(CertificateRef("main", ("api.example.com",)),),
        )
        assert check_state(s) == []

    def test_a_port_on_every_address_and_on_one_address_is_refused(self) -> None:
        """``80`` beside ``127.0.0.1:80`` (or ``[::]:443`` beside ``[::1]:443``), in one
        site or two: nginx binds the port once and the wildcard's servers never answer
        on that address, and reloading onto the mix fails with "Address already in use".
        Reported at the address; the other family and other ports are independent."""
        everywhere = make_site("all", server_names=("all.example.com",))
        one = make_site(
            "one",
            server_names=("one.example.com",),
            listeners=(Listener(80, address="127.0.0.1"), Listener(8080, address="127.0.0.1")),
        )
        [problem] = check_state(state(everywhere, one))
        assert problem.path == "sites[1].listeners[0].address"
        assert problem.message.startswith(
            "127.0.0.1:80 is on a port sites[0] ('all') listens on for every address (port 80)"
        )
        assert "could not reload onto the mix" in problem.message
        v6 = make_site(
            "v6",
            server_names=("v6.example.com",),
            listeners=(Listener(8443, address="::1"), Listener(8443, address="::")),
        )
        [problem] = check_state(state(v6))
        assert problem.path == "sites[0].listeners[0].address"
        assert "on a port this site listens on for every IPv6 address ([::]:8443)" in (
            problem.message
        )
        both_families = make_site(
            "v4v6", server_names=("x.example.com",), listeners=(Listener(80, address="::1"),)
        )
        assert check_state(state(everywhere, both_families)) == []

    def test_duplicate_names(self) -> None:
        """Duplicate site, upstream and certificate names point at the later one."""
        cert = CertificateRef("main", ("example.com",))
        s = state(
            make_site(),
            make_site(server_names=("other.example.com",)),
            upstreams=(APP, APP),
            certs=(cert, cert),
        )
        assert {p.path: p.message for p in check_state(s)} == {
            "sites[1].name": "site name 'web' is already used by sites[0]",
            "upstreams[1].name": "upstream name 'app' is already used by upstreams[0]",
            "certificates[1].name": "certificate name 'main' is already used by certificates[0]",
        }

    def test_unknown_upstream_suggests(self) -> None:
        """A location naming a missing upstream gets a did-you-mean hint."""
        s = state(make_site(locations=(loc(), loc("/api", upstream="apps"))), upstreams=(APP,))
        [problem] = check_state(s)
        assert problem.path == "sites[0].locations[1].upstream"
        assert problem.message == "refers to unknown upstream 'apps' (did you mean 'app'?)"

    def test_unknown_certificate(self) -> None:
        """tls.certificate must name a declared certificate; the message says how to
        declare one (an upload alone does not), unless the name looks like a typo."""
        tls_site = partial(make_site, listeners=(Listener(443, tls=True),))
        s = state(tls_site(tls=TLSConfig(certificate="x")))
        [problem] = check_state(s)
        assert problem.path == "sites[0].tls.certificate"
        assert problem.message == (
            "refers to certificate 'x', but no certificates are defined; a certificate "
            "(uploaded or from ACME) is used by declaring it in the state: "
            "certificates: [{name: x, domains: [...]}]"
        )
        web = CertificateRef(name="web", domains=("example.com",))
        [typo] = check_state(state(tls_site(tls=TLSConfig(certificate="wbe")), certs=(web,)))
        assert typo.message == "refers to unknown certificate 'wbe' (did you mean 'web'?)"

    def test_server_name_conflict_across_sites(self) -> None:
        """The same server name on the same port in two sites is a conflict; the other
        site is named as well as indexed (a per-object API caller sees no index)."""
        s = state(make_site(), make_site("other", server_names=("a.example.com", "example.com")))
        [problem] = check_state(s)
        assert problem.path == "sites[1].server_names[1]"
        assert "already served by sites[0] ('web')" in problem.message

    def test_same_server_name_on_other_port_is_fine(self) -> None:
        """One name may be served by different sites on different ports."""
        s = state(make_site(), make_site("alt", listeners=(Listener(8080),)))
        assert check_state(s) == []

    def test_duplicate_location(self) -> None:
        """Two locations with the same path and match in one site conflict; a prefix and
        a prefix_priority location of one path are one location to nginx."""
        s = state(make_site(locations=(loc("/a"), loc("/a", match="exact"), loc("/a"))))
        assert [p.path for p in check_state(s)] == ["sites[0].locations[2].path"]
        both = state(make_site(locations=(loc("/a"), loc("/a", match="prefix_priority"))))
        [problem] = check_state(both)
        assert problem.path == "sites[0].locations[1].path"
        assert problem.message == "prefix location '/a' repeats locations[0]"

    def test_sites_sharing_a_tls_port_must_agree_on_protocols(self) -> None:
        """nginx negotiates TLS before SNI picks the server: one site's protocols would
        silently apply to the others on its socket. Same set in another order is fine."""
        cert = CertificateRef("main", ("a.example.com", "b.example.com"))

        def tls_site(name: str, protocols: tuple[str, ...], port: int = 443) -> Site:
            return make_site(
                name,
                server_names=(f"{name}.example.com",),
                listeners=(Listener(port, tls=True),),
                tls=TLSConfig(certificate="main", protocols=protocols),
            )

        both, newest = ("TLSv1.2", "TLSv1.3"), ("TLSv1.3",)
        s = state(tls_site("a", both), tls_site("b", newest), certs=(cert,))
        [problem] = check_state(s)
        assert problem.path == "sites[1].tls.protocols"
        assert (
            "the protocols of sites[0] ('a'), ['TLSv1.2', 'TLSv1.3'], would apply to this site"
            in problem.message
        )
        assert (
            check_state(state(tls_site("a", both), tls_site("b", both[::-1]), certs=(cert,))) == []
        )
        other_port = state(tls_site("a", both), tls_site("b", newest, 8443), certs=(cert,))
        assert check_state(other_port) == []

    def test_sites_sharing_a_plain_port_must_agree_on_h2c(self) -> None:
        """One site's http2 on a plain listener makes the whole port h2c-only: refused when
        another site (or a TLS site's implicit redirect) serves HTTP/1.x there."""
        h2c = make_site(
            "grpc", server_names=("grpc.example.com",), listeners=(Listener(80, http2=True),)
        )
        [problem] = check_state(state(make_site(), h2c))
        assert problem.path == "sites[1].listeners[0].http2"
        assert "does not speak cleartext HTTP/2 (h2c) in sites[0]" in problem.message
        alone = make_site(
            "grpc", server_names=("grpc.example.com",), listeners=(Listener(8080, http2=True),)
        )
        assert check_state(state(make_site(), alone)) == []
        redirecting = make_site(
            "tls",
            server_names=("tls.example.com",),
            listeners=(Listener(443, tls=True),),
            tls=TLSConfig(certificate="main"),
        )
        certs = (CertificateRef("main", ("tls.example.com",)),)
        [implicit] = check_state(state(h2c, redirecting, certs=certs))
        assert implicit.path == "sites[1].tls.redirect_http"
        assert "speaks cleartext HTTP/2 (h2c) in sites[0]" in implicit.message

    def test_h2c_listener_cannot_carry_the_https_redirect(self) -> None:
        """A plain http2 listener of a site that redirects to HTTPS: no browser would
        reach the redirect."""
        certs = (CertificateRef("main", ("example.com",)),)
        site = make_site(
            listeners=(Listener(80, http2=True), Listener(443, tls=True, http2=True)),
            tls=TLSConfig(certificate="main"),
        )  # the object is valid (stored versions load): the submission is refused
        [problem] = check_state(state(site, certs=certs))
        assert problem.path == "sites[0].listeners[0].http2"
        assert "no browser speaks h2c" in problem.message
        no_redirect = attrs.evolve(site, tls=TLSConfig(certificate="main", redirect_http=False))
        assert check_state(state(no_redirect, certs=certs)) == []

    def test_two_default_servers(self) -> None:
        """Only one site can be the default server of an address and port."""
        s = state(
            make_site(listeners=(Listener(80, default_server=True),)),
            make_site(
                "b", server_names=("b.example.com",), listeners=(Listener(80, default_server=True),)
            ),
        )
        assert [p.path for p in check_state(s)] == ["sites[1].listeners[0].default_server"]

    @pytest.mark.parametrize(
        ("first", "second"), [(None, "0.0.0.0"), ("*", "0.0.0.0"), ("::", "0:0::0")]
    )
    def test_two_default_servers_spelled_differently(
        self, first: str | None, second: str | None
    ) -> None:
        """Default servers are compared per socket, not per spelling of the address."""
        s = state(
            make_site(listeners=(Listener(80, address=first, default_server=True),)),
            make_site(
                "b",
                server_names=("b.example.com",),
                listeners=(Listener(80, address=second, default_server=True),),
            ),
        )
        [problem] = check_state(s)
        assert problem.path == "sites[1].listeners[0].default_server"
        assert "sites[0] ('web') is already the default server" in problem.message

    def test_server_name_conflict_spelled_differently(self) -> None:
        """One server name on '*:80' and '0.0.0.0:80' is served twice (nginx ignores one)."""
        s = state(
            make_site(listeners=(Listener(80, address="*"),)),
            make_site("b", listeners=(Listener(80, address="0.0.0.0"),)),
        )
        assert [p.path for p in check_state(s)] == ["sites[1].server_names[0]"]

    def test_all_problems_reported(self) -> None:
        """check_state collects every problem rather than stopping at the first."""
        s = state(
            make_site(locations=(loc(upstream="a"), loc("/b", upstream="b"))),
            make_site(),
        )
        assert len(check_state(s)) == 4  # two references, a duplicate name, a name conflict

    def test_site_limit(self) -> None:
        """More than 10,000 sites are rejected by the model itself."""
        site = make_site()
        with pytest.raises(Invalid, match="at most 10000"):
            DesiredState(sites=(site,) * 10_001)


class TestPortTlsConsistency:
    def test_tls_and_plain_sites_cannot_share_a_port(self) -> None:
        """A plain site on a port another site serves with TLS is refused, naming both."""
        from nxmesh.core.errors import ValidationError
        from nxmesh.core.serialization import structure_state

        data = {
            "upstreams": [{"name": "app", "servers": [{"address": "127.0.0.1:8080"}]}],
            "certificates": [{"name": "c", "domains": ["a.example.com"]}],
            "sites": [
                {
                    "name": "secure",
                    "server_names": ["a.example.com"],
                    "listeners": [{"port": 8443, "tls": True}],
                    "tls": {"certificate": "c"},
                    "locations": [{"path": "/", "upstream": "app"}],
                },
                {
                    "name": "plain",
                    "server_names": ["b.example.com"],
                    "listeners": [{"port": 8443}],
                    "locations": [{"path": "/", "upstream": "app"}],
                },
            ],
        }
        with pytest.raises(ValidationError) as info:
            structure_state(data)
        [problem] = info.value.problems
        assert problem.path == "sites[1].listeners[0].tls"
        assert "sites[0]" in problem.message

    @pytest.mark.parametrize(("tls_address", "plain_address"), [(None, "0.0.0.0"), ("::", "0::0")])
    def test_tls_and_plain_spelled_differently(
        self, tls_address: str | None, plain_address: str
    ) -> None:
        """One socket written two ways still cannot be TLS for one site and plain for
        another: nginx would offer the plain site TLS without its certificate."""
        s = state(
            make_site(
                listeners=(Listener(8443, tls=True, address=tls_address),),
                tls=TLSConfig(certificate="c"),
            ),
            make_site(
                "plain",
                server_names=("b.example.com",),
                listeners=(Listener(8443, address=plain_address),),
            ),
            certs=(CertificateRef("c", ("example.com",)),),
        )
        [problem] = check_state(s)
        assert problem.path == "sites[1].listeners[0].tls"
        assert "is TLS in sites[0]" in problem.message

    def test_a_tls_listener_on_port_80_with_the_implicit_redirect_is_refused(self) -> None:
        """With no plain listener the HTTP→HTTPS redirect listens on port 80: a TLS
        listener there would make nginx refuse the bundle (no certificate for the
        redirect's ``listen 80 ssl``)."""
        certs = (CertificateRef("c", ("example.com",)),)
        site = make_site(listeners=(Listener(80, tls=True),), tls=TLSConfig(certificate="c"))
        [problem] = check_state(state(site, certs=certs))
        assert problem.path == "sites[0].tls.redirect_http"
        assert "which is TLS in this site" in problem.message
        no_redirect = TLSConfig(certificate="c", redirect_http=False)
        assert check_state(state(attrs.evolve(site, tls=no_redirect), certs=certs)) == []

    def test_the_implicit_redirect_counts_as_plain_http_on_port_80_across_sites(self) -> None:
        """One site's redirect server and another site's TLS listener on port 80 are one
        socket, TLS and plain at once: refused whichever comes first."""
        certs = (CertificateRef("c", ("example.com",)),)
        redirecting = make_site(
            listeners=(Listener(8443, tls=True),), tls=TLSConfig(certificate="c")
        )
        tls_on_80 = make_site(
            "other",
            server_names=("b.example.com",),
            listeners=(Listener(80, tls=True),),
            tls=TLSConfig(certificate="c", redirect_http=False),
        )
        [problem] = check_state(state(redirecting, tls_on_80, certs=certs))
        assert problem.path == "sites[1].listeners[0].tls"
        assert "plain HTTP in sites[0]" in problem.message
        [problem] = check_state(state(tls_on_80, redirecting, certs=certs))
        assert problem.path == "sites[1].tls.redirect_http"
        assert "TLS in sites[0]" in problem.message

    def test_the_implicit_redirect_serves_its_names_on_port_80(self) -> None:
        """A plain site on port 80 with a name the redirect server already answers there:
        nginx would drop one of the two servers with only a warning."""
        certs = (CertificateRef("c", ("example.com",)),)
        redirecting = make_site(
            listeners=(Listener(443, tls=True),), tls=TLSConfig(certificate="c")
        )
        plain = make_site("plain", listeners=(Listener(80),))
        [problem] = check_state(state(redirecting, plain, certs=certs))
        assert problem.path == "sites[1].server_names[0]"
        assert "already served by sites[0]" in problem.message
        assert (
            check_state(
                state(
                    redirecting,
                    attrs.evolve(plain, name="p", server_names=("b.example.com",)),
                    certs=certs,
                )
            )
            == []
        )


ACME_PATH = "/.well-known/acme-challenge/"


def acme_site(tls: TLSConfig, *paths: tuple[str, str]) -> Site:
    return make_site(
        listeners=(Listener(80), Listener(443, tls=True)),
        tls=tls,
        locations=tuple(loc(path, match=match) for path, match in (("/", "prefix"), *paths)),
    )


class TestAcmeChallengePath:
    """An ACME site's plain-HTTP server serves /.well-known/acme-challenge/ itself."""

    @pytest.mark.parametrize("redirect_http", [False, True])
    @pytest.mark.parametrize(
        ("path", "match"),
        [(ACME_PATH, "prefix"), (ACME_PATH + "x", "prefix"), (ACME_PATH + "x", "exact")],
    )
    def test_reserved_on_a_tls_acme_site(self, path: str, match: str, redirect_http: bool) -> None:
        """The site's own location there would be nginx's 'duplicate location' (or take the
        CA's requests): refused, at the location's path, naming the reason."""
        s = state(acme_site(TLSConfig(acme=True, redirect_http=redirect_http), (path, match)))
        [problem] = check_state(s)
        assert problem.path == "sites[0].locations[1].path"
        assert problem.message == (
            f"{ACME_PATH} and the paths below it are reserved for the ACME HTTP-01 "
            "challenges nxmesh answers there, because the site has tls: acme; remove this "
            "location"
        )

    def test_reserved_with_an_acme_sourced_certificate(self) -> None:
        """A named certificate whose source is ACME gets the challenge location too."""
        site = acme_site(TLSConfig(certificate="c", redirect_http=False), (ACME_PATH, "prefix"))
        acme = state(site, certs=(CertificateRef("c", ("example.com",), source="acme"),))
        [problem] = check_state(acme)
        assert "certificate 'c' comes from ACME" in problem.message
        uploaded = state(site, certs=(CertificateRef("c", ("example.com",)),))
        assert check_state(uploaded) == []

    def test_other_sites_and_regex_locations_may_use_it(self) -> None:
        """Without ACME the path is the site's own; a regex location never beats the
        renderer's '^~' location, so it is no conflict."""
        plain = make_site("plain", server_names=("plain.example.com",), locations=(loc(ACME_PATH),))
        regex = acme_site(TLSConfig(acme=True, redirect_http=False), ("^/\\.well-known/", "regex"))
        assert check_state(state(plain, regex)) == []

    def test_reported_with_field_problems(self) -> None:
        """structure_state reports it next to field problems, from the salvaged parts."""
        from nxmesh.core.errors import ValidationError
        from nxmesh.core.serialization import structure_state

        data = {
            "certificates": [{"name": "c", "domains": ["example.com"], "source": "acme"}],
            "sites": [
                {
                    "name": "web",
                    "server_names": ["example.com"],
                    "listeners": [{"port": 80}, {"port": 443, "tls": True}],
                    "tls": {"certificate": "c", "redirect_http": False},
                    "locations": [
                        {"path": ACME_PATH, "return": {"code": 204}},
                        {"path": "/x", "return": {"code": 999}},
                    ],
                }
            ],
        }
        with pytest.raises(ValidationError) as info:
            structure_state(data)
        assert [p.path for p in info.value.problems] == [
            "sites[0].locations[1].return.code",
            "sites[0].locations[0].path",
        ]


class TestStructureReportsEverything:
    """`structure` of a whole state (the master's request bodies) reports all at once."""

    DATA: ClassVar[dict[str, object]] = {
        "upstreams": [{"name": "app", "servers": [{"address": "app"}]}],
        "sites": [
            {
                "name": "a",
                "server_names": ["a.example.com"],
                "locations": [{"path": "/", "upstream": "app"}, {"path": "/x", "upstream": "x"}],
            },
            {"name": "a", "server_names": ["a.example.com", "b..c"], "locations": []},
        ],
    }

    def test_field_and_cross_object_problems(self) -> None:
        """Field problems, then the cross-object ones among the parts that passed."""
        from nxmesh.core.errors import ValidationError
        from nxmesh.core.serialization import structure, structure_state

        for build in (partial(structure, cl=DesiredState), structure_state):
            with pytest.raises(ValidationError) as info:
                build(self.DATA)
            assert [p.path for p in info.value.problems] == [
                "sites[1].server_names[1]",
                "sites[1].locations",
                "upstreams[0].servers[0].address",
                "sites[1].name",
                "sites[0].locations[1].upstream",
                "sites[1].server_names[0]",
            ]

    def test_check_parts_of_a_valid_state_is_check_state(self) -> None:
        """For a valid state the parts are the whole state."""
        s = state(make_site(locations=(loc(upstream="a"),)), make_site())
        assert check_parts(StateParts.of(s)) == check_state(s)


class TestChoice:
    check = staticmethod(validation.choice("received", 1).problems)

    def test_members_pass(self) -> None:
        """Each listed value is accepted as it is."""
        assert not self.check("received")
        assert not self.check(1)

    @pytest.mark.parametrize("value", [True, 1.0, "RECEIVED", None, ["received"], {"a": 1}])
    def test_equal_or_unhashable_outsiders_fail(self, value: object) -> None:
        """A value equal to a member but of another type (True == 1, 1.0 == 1) is not
        that member, and an unhashable value is refused, not raised on."""
        [(path, reason)] = self.check(value)
        assert path == ""
        assert reason.startswith("must be one of 'received', 1, got ")


_SHA512 = "$6$salt$" + "b" * 86


class TestBasicAuth:
    def test_a_password_where_its_hash_belongs_is_refused_without_echoing_it(self) -> None:
        """The reason names the hash formats and how to make one, never the value."""
        with pytest.raises(Invalid) as exc:
            BasicAuthUser(name="alice", password_hash="Hunter2 Secret")
        assert paths_of(exc) == ["password_hash"]
        text = str(exc.value)
        assert "openssl passwd -6" in text
        assert "never the password itself" in text
        assert "Hunter2" not in text
        assert "hunter2" not in text
        assert "Hunter2" not in repr(BasicAuthUser(name="a", password_hash=_SHA512))

    @pytest.mark.parametrize(
        "value",
        [
            "$2y$10$" + "a" * 53,
            "$2b$04$" + "A" * 53,
            _SHA512,
            "$5$rounds=5000$salt$" + "c" * 43,
            "$apr1$abcdefgh$" + "d" * 22,
        ],
    )
    def test_hash_formats_nginx_verifies_are_accepted(self, value: str) -> None:
        assert BasicAuthUser(name="a", password_hash=value).password_hash == value

    @pytest.mark.parametrize(
        "value", ["$1$salt$" + "e" * 22, "{SHA}" + "f" * 28, "$2y$10$" + "a" * 52, "plain"]
    )
    def test_other_hashes_are_refused(self, value: str) -> None:
        """MD5 crypt and {SHA} are weak; a truncated bcrypt is a paste error."""
        with pytest.raises(Invalid):
            BasicAuthUser(name="a", password_hash=value)

    @pytest.mark.parametrize(
        ("value", "says"),
        [
            ("$2b$13$" + "a" * 53, "bcrypt cost of 13; at most 12"),
            ("$6$rounds=200000$salt$" + "b" * 86, "200000 rounds; at most 100,000"),
            ("$5$rounds=0999$salt$" + "c" * 43, "must be a password hash"),  # libxcrypt: *0
            ("$6$salt$" + "c" * 43, "must be a password hash"),  # a SHA-256 length
            ("s\u00e9cret-p\u00e4ss", "must be a password hash"),
            ("x" * 200, "is longer than 160 characters"),
        ],
    )
    def test_hashes_nginx_cannot_check_or_that_stall_it_are_refused(
        self, value: str, says: str
    ) -> None:
        """No hash a worker would spend seconds on, none libxcrypt answers '*0' to; and
        no character of a refused value (nor its length) in the reason."""
        reason = validation.PASSWORD_HASH.reason(value)
        assert reason is not None
        assert says in reason
        assert "\u00e9" not in reason
        assert "200 characters" not in reason

    def test_the_realm_off_is_refused(self) -> None:
        """``auth_basic off`` would switch authentication off."""
        user = BasicAuthUser(name="a", password_hash=_SHA512)
        for realm in ("off", "OFF"):
            with pytest.raises(Invalid, match="switch authentication off") as exc:
                BasicAuth(realm=realm, users=(user,))
            assert paths_of(exc) == ["realm"]

    def test_user_names_are_unique_and_cannot_break_the_file(self) -> None:
        user = BasicAuthUser(name="alice", password_hash=_SHA512)
        with pytest.raises(Invalid) as exc:
            BasicAuth(users=(user, user))
        assert paths_of(exc) == ["users[1].name"]
        for name in ("bob:x", "bob\nroot", ""):
            with pytest.raises(Invalid):
                BasicAuthUser(name=name, password_hash=_SHA512)
        with pytest.raises(Invalid) as exc:
            BasicAuth(realm='x"; deny all; #', users=(user,))
        assert paths_of(exc) == ["realm"]

    def test_satisfy_any_needs_both_rules_on_a_site(self) -> None:
        auth = BasicAuth(users=(BasicAuthUser(name="a", password_hash=_SHA512),))
        with pytest.raises(Invalid, match="only applies with both allow and basic_auth") as exc:
            make_site(satisfy="any", basic_auth=auth)
        assert paths_of(exc) == ["satisfy"]
        site = make_site(satisfy="any", basic_auth=auth, allow=("10.0.0.0/8",))
        assert site.satisfy == "any"
        with pytest.raises(Invalid) as exc:
            loc(satisfy="any", return_=Return(204))
        assert paths_of(exc) == ["satisfy"]
        # On a location: its own rules or the site's, as nginx inherits them.
        either = loc(satisfy="any", upstream="app")
        with pytest.raises(Invalid) as exc:
            make_site(basic_auth=auth, locations=(either,))
        assert paths_of(exc) == ["locations[0].satisfy"]
        assert "its own or the site's" in str(exc.value)
        inherited = make_site(basic_auth=auth, allow=("10.0.0.0/8",), locations=(either,))
        assert inherited.locations[0].satisfy == "any"
        own = loc(satisfy="any", upstream="app", allow=("10.0.0.0/8",))
        assert make_site(basic_auth=auth, locations=(own,)).locations[0].allow

    def test_rate_limit_bounds_and_placement(self) -> None:
        """Rates and bursts are bounded integers; like basic_auth, a rate limit is refused
        on a return location (answered before nginx counts requests)."""
        assert RateLimit(rate=10, burst=20).per == "second"
        for fields, path in (
            ({"rate": 0}, "rate"),
            ({"rate": 10, "burst": -1}, "burst"),
            ({"rate": 10, "per": "hour"}, "per"),
        ):
            with pytest.raises(Invalid) as exc:
                RateLimit(**fields)  # type: ignore[arg-type]
            assert paths_of(exc) == [path]
        with pytest.raises(Invalid) as exc:
            loc(rate_limit=RateLimit(rate=1), return_=Return(204))
        assert paths_of(exc) == ["rate_limit"]

    def test_basic_auth_needs_an_access_checked_location(self) -> None:
        auth = BasicAuth(users=(BasicAuthUser(name="a", password_hash=_SHA512),))
        with pytest.raises(Invalid) as exc:
            loc(basic_auth=auth, return_=Return(204))
        assert paths_of(exc) == ["basic_auth"]
        assert loc(basic_auth=auth, root="/srv/www").basic_auth == auth


class TestRuleMessages:
    @pytest.mark.parametrize(
        ("rule", "value", "says"),
        [
            (validation.LABEL_VALUE, "pr od", "contains whitespace; must be a label value"),
            (validation.LABEL_KEY, "a\nb", "contains a line break; must be a label key"),
            (validation.TOKEN, "a b", "contains whitespace; must be an identifier"),
            (validation.LABEL_VALUE, "a\tb", "contains whitespace; must be a label value"),
            (validation.ROLE_BINDING, "a\u00a0b", "contains whitespace; must be a role"),
            (
                validation.ROLE_BINDING,
                "operator@Staging",
                "has uppercase letters ('operator@staging' would do); must be a role",
            ),
            (validation.NAME, "Shop", "has uppercase letters ('shop' would do)"),
            (validation.NAME, "sh op", "contains whitespace, which would split the nginx"),
        ],
    )
    def test_the_reason_fits_where_the_value_goes(
        self, rule: validation.TextRule, value: str, says: str
    ) -> None:
        """Labels, identifiers and roles never reach nginx: their errors name the
        character without an nginx consequence; names that do keep it. A value the rule
        would take in lowercase says so."""
        reason = rule.reason(value)
        assert reason is not None
        assert reason.startswith(says)
        if not rule.nginx:
            assert "nginx" not in reason


class TestFastCGI:
    PHP = FastCGI(upstream="php", root="/srv/www/app")

    def state(self, fastcgi: FastCGI, **upstream: Any) -> DesiredState:
        site = make_site(locations=(loc(r"\.php(/.*)?$", match="regex", fastcgi=fastcgi),))
        servers = (UpstreamServer(address="unix:/run/php/php8.2-fpm.sock"),)
        return DesiredState(
            sites=(site,), upstreams=(Upstream(name="php", servers=servers, **upstream),)
        )

    def test_a_php_location_is_accepted_and_round_trips(self) -> None:
        """A FastCGI location with its defaults and its own parameters; the converter
        writes and reads it back, and a location without one keeps its JSON."""
        from nxmesh.core.serialization import structure

        fastcgi = attrs.evolve(
            self.PHP, read_timeout=60, params=(FastCGIParam(name="APP_ENV", value="prod"),)
        )
        assert check_state(self.state(fastcgi)) == []
        located = loc(r"\.php$", match="regex", fastcgi=fastcgi)
        assert structure(unstructure(located), Location) == located
        assert unstructure(located)["fastcgi"] == {
            "upstream": "php",
            "root": "/srv/www/app",
            "index": "index.php",
            "check_script": True,
            "read_timeout": 60,
            "params": [{"name": "APP_ENV", "value": "prod"}],
        }
        assert "fastcgi" not in unstructure(loc("/", upstream="app"))

    @pytest.mark.parametrize(
        ("name", "says"),
        [
            ("HTTP_X_USER", "HTTP_ parameters are the client's request headers"),
            ("SCRIPT_FILENAME", "is set by nxmesh on every request and cannot be replaced"),
            ("SSL_CLIENT_VERIFY", "is set by nxmesh on every request"),
            ("REMOTE_USER", "is set by nxmesh on every request"),
            ("PHP_ADMIN_VALUE", "stay for every later request it runs, other sites'"),
            ("PHP_VALUE", "set them in the pool's configuration"),
            ("app_env", "a FastCGI parameter name like APP_ENV"),
            ("APP ENV", "a FastCGI parameter name like APP_ENV"),
            ("A" * 65, "at most 64"),
        ],
    )
    def test_parameter_names_are_the_applications_own(self, name: str, says: str) -> None:
        with pytest.raises(Invalid) as exc:
            FastCGIParam(name=name, value="x")
        assert paths_of(exc) == ["name"]
        assert says in str(exc.value)

    @pytest.mark.parametrize("value", ["$document_root", 'a"b', "a;b", "{x}", "a\\b", "a\nb"])
    def test_parameter_values_are_literal_text(self, value: str) -> None:
        with pytest.raises(Invalid) as exc:
            FastCGIParam(name="APP_ENV", value=value)
        assert paths_of(exc) == ["value"]

    def test_a_parameter_named_twice_is_refused(self) -> None:
        twice = (FastCGIParam(name="APP_ENV", value="a"), FastCGIParam(name="APP_ENV", value="b"))
        with pytest.raises(Invalid) as exc:
            FastCGI(upstream="php", root="/srv/www/app", params=twice)
        assert paths_of(exc) == ["params[1].name"]
        assert "'APP_ENV' repeats [0]" in str(exc.value)

    @pytest.mark.parametrize(
        ("fields", "path"),
        [
            ({"root": "/etc"}, "root"),
            ({"root": "srv/app"}, "root"),
            ({"index": "../index.php"}, "index"),
            ({"index": "a b.php"}, "index"),
            ({"index": "index.html"}, "index"),
            ({"index": "app.phar"}, "index"),
            ({"read_timeout": 0}, "read_timeout"),
            ({"check_script": "yes"}, "check_script"),
            ({"upstream": "PHP"}, "upstream"),
        ],
    )
    def test_fields_are_checked(self, fields: dict[str, Any], path: str) -> None:
        with pytest.raises(Invalid) as exc:
            attrs.evolve(self.PHP, **fields)
        assert paths_of(exc) == [path]

    def test_one_action_only_and_no_options_of_other_kinds(self) -> None:
        """FastCGI is an action of its own; proxy and static options are refused on it,
        access rules are not (nginx checks them before it runs the script)."""
        with pytest.raises(Invalid) as exc:
            loc("/", fastcgi=self.PHP, root="/srv/www/app")
        assert "exactly one of upstream, root, redirect, return or fastcgi" in str(exc.value)
        for option in ({"websocket": True}, {"index": ("index.php",)}, {"fallback": "/x"}):
            with pytest.raises(Invalid) as exc:
                loc("/", fastcgi=self.PHP, **option)
            assert paths_of(exc) == list(option)
        guarded = loc("/", fastcgi=self.PHP, allow=("10.0.0.0/8",), rate_limit=RateLimit(rate=5))
        assert guarded.allow == ("10.0.0.0/8",)

    def test_the_upstream_must_exist_and_speak_plain_fastcgi(self) -> None:
        """An unknown upstream is named with a hint; an upstream spoken to over TLS is
        refused (nginx's FastCGI has no TLS)."""
        [typo] = check_state(self.state(attrs.evolve(self.PHP, upstream="phq")))
        assert typo.path == "sites[0].locations[0].fastcgi.upstream"
        assert "unknown upstream 'phq' (did you mean 'php'?)" in typo.message
        [tls] = check_state(self.state(self.PHP, tls=UpstreamTLS(verify=False)))
        assert tls.path == "sites[0].locations[0].fastcgi.upstream"
        assert "over TLS, which nginx's FastCGI cannot do" in tls.message

    def test_an_upstream_speaks_fastcgi_or_http(self) -> None:
        """One upstream behind a FastCGI location and a proxy location is refused: no
        server speaks both."""
        state = self.state(self.PHP)
        both = attrs.evolve(
            state.sites[0],
            locations=(*state.sites[0].locations, loc("/api/", upstream="php")),
        )
        [problem] = check_state(attrs.evolve(state, sites=(both,)))
        assert problem.path == "sites[0].locations[0].fastcgi.upstream"
        assert "also a proxy location's" in problem.message


def test_escaped_location_paths_are_refused_for_new_states() -> None:
    """nginx matches prefix and exact locations against the decoded path, so one written
    with a %XX escape never matches, and its access rules protect nothing: a new state
    may not hold one (a stored one still loads). A regex location is not concerned."""
    escaped = loc("/secret%20area/", root="/srv/www", allow=("10.0.0.0/8",))
    regex = loc("^/100%$", match="regex", return_=Return(204))
    state = DesiredState(sites=(make_site(locations=(escaped, regex)),))
    [problem] = check_state(state)
    assert problem.path == "sites[0].locations[0].path"
    assert "nginx matches locations against the decoded path" in problem.message
    assert check_parts(StateParts.of(state)) == []  # the stored-state rules let it load
