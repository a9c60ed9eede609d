"""The built-in nginx renderer: bundle layout, directive structure, overrides, real nginx."""

from __future__ import annotations

import http.client
import http.server
import json
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import attrs
import crossplane
import pytest

from nxmesh import hookimpl
from nxmesh.core.bundle import Bundle, bundle_digest
from nxmesh.core.errors import NxMeshError, ProviderNotFoundError
from nxmesh.core.model import (
    CertificateRef,
    DesiredState,
    Header,
    Listener,
    Location,
    ProxyCache,
    Redirect,
    Return,
    Site,
    TLSConfig,
    Upstream,
    UpstreamServer,
)
from nxmesh.core.pluginmanager import NxMeshPluginManager, get_plugin_manager
from nxmesh.core.registry import ProviderRegistries
from nxmesh.core.settings import RendererSettings
from nxmesh.nginx_check import check_bundle, check_bundle_async, prepare_prefix, write_bundle
from nxmesh.plugins.render_nginx import (
    PROXY_CACHE_FILE,
    STATUS_FILE,
    NginxRenderer,
    RenderError,
    RenderSettings,
    TemplateRenderError,
    config_digest,
    renderer_for,
)
from nxmesh.plugins.render_nginx.quoting import DOLLAR_VARIABLE
from nxmesh.plugins.render_nginx.renderer import CLIENT_CLAIMS, hash_bucket_size
from nxmesh.testing import make_state
from nxmesh.testing.contracts import RendererContract
from nxmesh.testing.nginx import free_port
from nxmesh.testing.services import require_binary

Directive = dict[str, Any]


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------


def parse(bundle: Bundle, root: Path) -> dict[str, list[Directive]]:
    """Write `bundle` under `root` and parse it with crossplane: bundle path → directives."""
    write_bundle(bundle, root)
    result = crossplane.parse(str(root / "nginx.conf"), comments=False)
    assert result["status"] == "ok", result["errors"]
    return {os.path.relpath(c["file"], root): c["parsed"] for c in result["config"]}


def find(block: list[Directive], name: str) -> list[Directive]:
    return [d for d in block if d["directive"] == name]


def one(block: list[Directive], name: str) -> Directive:
    found = find(block, name)
    assert len(found) == 1, f"expected one {name!r}, got {len(found)}"
    return found[0]


def args(block: list[Directive], name: str) -> list[list[str]]:
    return [d["args"] for d in find(block, name)]


def servers(parsed: dict[str, list[Directive]], site: str) -> list[list[Directive]]:
    return [d["block"] for d in find(parsed[f"conf.d/site-{site}.conf"], "server")]


def locations(server: list[Directive]) -> dict[str, list[Directive]]:
    """Location blocks keyed by their joined arguments (``= /healthz``)."""
    return {" ".join(d["args"]): d["block"] for d in find(server, "location")}


def site(name: str = "web", **kwargs: Any) -> Site:
    kwargs.setdefault("server_names", (f"{name}.example.com",))
    kwargs.setdefault("locations", (Location(path="/", upstream="app"),))
    return Site(name=name, **kwargs)


def state(*sites: Site, upstreams: tuple[Upstream, ...] | None = None) -> DesiredState:
    if upstreams is None:
        upstreams = (Upstream(name="app", servers=(UpstreamServer(address="127.0.0.1:8000"),)),)
    return DesiredState(sites=sites, upstreams=upstreams)


def write_template(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------
# Contract and layout
# ---------------------------------------------------------------------------------------


class TestNginxRendererContract(RendererContract):
    """The built-in renderer passes the renderer contract suite."""

    @pytest.fixture
    def renderer(self) -> NginxRenderer:
        return NginxRenderer()


class TestBundleLayout:
    """Which files a bundle holds and how they refer to each other."""

    def test_one_file_per_site_plus_main_upstreams_status_and_mime(self) -> None:
        """Sites get conf.d/site-<name>.conf; the rest is nginx.conf, mime.types,
        upstreams, the status server and the servers of unknown names."""
        bundle = NginxRenderer().render(make_state(3))
        assert sorted(bundle.files) == [
            "conf.d/site-site0.conf",
            "conf.d/site-site1.conf",
            "conf.d/site-site2.conf",
            "conf.d/status.conf",
            "conf.d/unknown-hosts.conf",
            "conf.d/upstreams.conf",
            "mime.types",
            "nginx.conf",
        ]

    def test_main_file_includes_the_tree_by_relative_paths(self, tmp_path: Path) -> None:
        """nginx.conf includes mime.types and conf.d/*.conf relatively, so the tree can move."""
        parsed = parse(NginxRenderer().render(make_state(1)), tmp_path)
        http = one(parsed["nginx.conf"], "http")["block"]
        assert args(http, "include") == [["mime.types"], ["conf.d/*.conf"]]
        # crossplane followed the includes: every conf.d file was reached.
        assert {"conf.d/site-site0.conf", "conf.d/upstreams.conf", STATUS_FILE} <= set(parsed)

    def test_site_and_upstream_order_does_not_change_the_bytes(self) -> None:
        """Shuffling sites and upstreams yields the identical bundle (sorted output)."""
        original = make_state(20)
        rng = random.Random(7)
        sites, upstreams = list(original.sites), list(original.upstreams)
        rng.shuffle(sites)
        rng.shuffle(upstreams)
        shuffled = attrs.evolve(original, sites=tuple(sites), upstreams=tuple(upstreams))
        renderer = NginxRenderer()
        assert renderer.render(shuffled).files == renderer.render(original).files

    def test_two_renderers_give_identical_bytes(self) -> None:
        """Output depends on the input only, not on the renderer instance."""
        assert (
            NginxRenderer().render(make_state(4)).digest
            == NginxRenderer().render(make_state(4)).digest
        )

    def test_duplicate_site_names_are_refused(self) -> None:
        """Two sites with one name would overwrite each other's file: an error instead."""
        with pytest.raises(RenderError, match="two sites are named 'web'"):
            NginxRenderer().render(state(site("web"), site("web", server_names=("b.test",))))

    def test_status_server_can_be_turned_off(self) -> None:
        """status_port=None leaves the status file out."""
        bundle = NginxRenderer(settings=RenderSettings(status_port=None)).render(make_state(1))
        assert STATUS_FILE not in bundle.files


class TestExtraFiles:
    """Certificates passed as extra files join the bundle under certs/ only."""

    def test_certificates_join_the_bundle_and_its_digest(self) -> None:
        """Extra files are part of the files and of the digest."""
        renderer = NginxRenderer()
        plain = renderer.render(make_state(1))
        with_cert = renderer.render(make_state(1), extra_files={"certs/a.crt": b"PEM"})
        assert with_cert.files["certs/a.crt"] == b"PEM"
        assert with_cert.digest != plain.digest

    @pytest.mark.parametrize(
        "path", ["conf.d/evil.conf", "nginx.conf", "../certs/a.crt", "/etc/x", "other/a.crt"]
    )
    def test_files_outside_certs_are_refused(self, path: str) -> None:
        """An extra file cannot add configuration or replace a rendered file."""
        with pytest.raises(RenderError, match="certs/"):
            NginxRenderer().render(make_state(1), extra_files={path: b"x"})


class TestConfigDigest:
    """The status server reports the digest of every other file of the bundle."""

    def test_status_file_carries_the_digest_of_the_rest(self, tmp_path: Path) -> None:
        """/nxmesh/version returns and headers config_digest, which excludes status.conf."""
        bundle = NginxRenderer().render(make_state(2), extra_files={"certs/x.crt": b"c"})
        expected = bundle_digest({p: d for p, d in bundle.files.items() if p != STATUS_FILE})
        assert config_digest(bundle.files) == expected
        parsed = parse(bundle, tmp_path)
        server = one(parsed[STATUS_FILE], "server")["block"]
        version = locations(server)["= /nxmesh/version"]
        assert ["X-NxMesh-Digest", expected, "always"] in args(version, "add_header")
        assert args(version, "return") == [["200", expected]]
        assert "stub_status" in {d["directive"] for d in locations(server)["= /nginx_status"]}
        assert args(server, "listen") == [["127.0.0.1:9480", "default_server"]]

    @pytest.mark.parametrize("address", [None, "*", "0.0.0.0", "127.0.0.1", "::"])
    def test_a_site_on_the_status_port_is_refused(self, address: str | None) -> None:
        """A site sharing the status server's socket could answer the probes that confirm
        a reload: refused, naming the site, the port and the setting."""
        state = make_state(1)
        site = state.sites[0]
        listeners = tuple(attrs.evolve(lst, address=address, port=9480) for lst in site.listeners)
        state = attrs.evolve(state, sites=(attrs.evolve(site, listeners=listeners),))
        with pytest.raises(RenderError, match=r"listens on port 9480, the agent's status"):
            NginxRenderer().render(state)
        elsewhere = RenderSettings(status_port=9481)
        assert STATUS_FILE in NginxRenderer(settings=elsewhere).render(state).files

    def test_another_address_on_the_status_port_is_fine(self) -> None:
        """A site bound to another address on that port does not share the socket."""
        state = make_state(1)
        site = state.sites[0]
        listeners = tuple(
            attrs.evolve(lst, address="127.0.0.2", port=9480) for lst in site.listeners
        )
        state = attrs.evolve(state, sites=(attrs.evolve(site, listeners=listeners),))
        assert STATUS_FILE in NginxRenderer().render(state).files

    def test_config_digest_changes_with_any_other_file(self) -> None:
        """A change in a site changes the config digest served by the status server."""
        renderer = NginxRenderer()
        a, b = renderer.render(make_state(2)), renderer.render(make_state(2, port=9000))
        assert config_digest(a.files) != config_digest(b.files)
        assert a.files[STATUS_FILE] != b.files[STATUS_FILE]


# ---------------------------------------------------------------------------------------
# Structure of what is rendered
# ---------------------------------------------------------------------------------------


class TestProductionDefaults:
    """The base template's defaults for running in production."""

    @pytest.fixture
    def main(self, tmp_path: Path) -> list[Directive]:
        return parse(NginxRenderer().render(make_state(1)), tmp_path)["nginx.conf"]

    def test_worker_settings(self, main: list[Directive]) -> None:
        """Workers: auto count, a shutdown timeout for graceful reloads."""
        assert args(main, "worker_processes") == [["auto"]]
        assert args(main, "worker_shutdown_timeout") == [["30s"]]
        assert args(one(main, "events")["block"], "worker_connections") == [["4096"]]

    def test_runtime_paths_are_relative_to_the_prefix(self, main: list[Directive]) -> None:
        """pid, logs and temp paths are relative, so `nginx -p <prefix>` places them."""
        http = one(main, "http")["block"]
        assert args(main, "pid") == [["logs/nginx.pid"]]
        assert args(main, "error_log") == [["logs/error.log", "warn"]]
        assert args(http, "access_log") == [["logs/access.log", "nxmesh"]]
        assert args(http, "proxy_temp_path") == [["tmp/proxy"]]

    def test_prefix_setting_makes_runtime_paths_absolute(self, tmp_path: Path) -> None:
        """RenderSettings(prefix=...) pins runtime files under that directory."""
        bundle = NginxRenderer(settings=RenderSettings(prefix="/var/lib/nx")).render(make_state(1))
        main = parse(bundle, tmp_path)["nginx.conf"]
        assert args(main, "pid") == [["/var/lib/nx/logs/nginx.pid"]]
        assert args(one(main, "http")["block"], "client_body_temp_path") == [
            ["/var/lib/nx/tmp/client_body"]
        ]

    def test_the_proxy_cache_is_declared_only_for_caching_locations(self, tmp_path: Path) -> None:
        """conf.d/proxy-cache.conf comes with the first location with a cache: under the
        runtime prefix (outliving releases), bounded by `proxy_cache_size`."""
        plain = state(site(locations=(Location(path="/", upstream="app"),)))
        plain = attrs.evolve(plain, upstreams=(Upstream("app", (UpstreamServer("10.0.0.1:80"),)),))
        assert PROXY_CACHE_FILE not in NginxRenderer().render(plain).files
        cached = Location(path="/", upstream="app", cache=ProxyCache(valid=60))
        caching = attrs.evolve(plain, sites=(site(locations=(cached,)),))
        renderer = NginxRenderer(
            settings=RenderSettings(prefix="/var/lib/nx", proxy_cache_size="5g")
        )
        [zone] = parse(renderer.render(caching), tmp_path)[PROXY_CACHE_FILE]
        assert zone["args"] == [
            "/var/lib/nx/tmp/cache",
            "levels=1:2",
            "keys_zone=nxmesh_cache:10m",
            "max_size=5g",
            "inactive=24h",
            "use_temp_path=off",
        ]

    @pytest.mark.parametrize(
        ("sites", "reason"),
        [
            # One site's `18080` and `127.0.0.1:18080` become one socket.
            (
                (site(listeners=(Listener(18080), Listener(18080, address="127.0.0.1"))),),
                "both listen on 127.0.0.1:18080",
            ),
            # Two default servers the master saw on different sockets.
            (
                (
                    site("a", listeners=(Listener(18080, default_server=True),)),
                    site(
                        "b",
                        listeners=(Listener(18080, address="127.0.0.1", default_server=True),),
                    ),
                ),
                "already the default server for 127.0.0.1:18080",
            ),
        ],
    )
    def test_listen_address_joining_sockets_is_a_render_error(
        self, sites: tuple[Site, ...], reason: str
    ) -> None:
        """Binding address-less listeners to `listen_address` can join sockets the master
        checked apart: a RenderError naming the setting and the conflict (the agent
        reports it), not a ValueError that crashed the apply or a bundle nginx refuses."""
        renderer = NginxRenderer(settings=RenderSettings(listen_address="127.0.0.1"))
        with pytest.raises(RenderError, match=r"agent\.listen_address") as caught:
            renderer.render(state(*sites))
        assert reason in str(caught.value)
        assert NginxRenderer().render(state(*sites))  # fine without the setting

    def test_listen_ipv6_gives_address_less_listeners_an_ipv6_twin(self, tmp_path: Path) -> None:
        """``listen_ipv6``: each listener naming no address also listens on ``[::]`` with
        the same options, the redirect and unknown-names servers included; a socket the
        site names itself is not repeated; `listen_address` wins over it."""
        web = site(
            listeners=(
                Listener(80),
                Listener(443, tls=True, http2=True),
                Listener(8080, address="::"),
            ),
            tls=TLSConfig(certificate="c"),
        )
        tls_state = attrs.evolve(state(web), certificates=(CertificateRef("c", ("example.com",)),))
        files = {"certs/c.crt": b"x", "certs/c.key": b"y"}
        renderer = NginxRenderer(settings=RenderSettings(listen_ipv6=True))
        parsed = parse(renderer.render(tls_state, extra_files=files), tmp_path)
        redirect, main = [d["block"] for d in parsed["conf.d/site-web.conf"]]
        assert args(redirect, "listen") == [["80"], ["[::]:80"], ["[::]:8080"]]
        assert args(main, "listen") == [["443", "ssl", "http2"], ["[::]:443", "ssl", "http2"]]
        unknown = [args(d["block"], "listen")[0] for d in parsed["conf.d/unknown-hosts.conf"]]
        assert ["[::]:443", "ssl", "http2", "default_server"] in unknown
        assert ["[::]:80", "default_server"] in unknown
        pinned = NginxRenderer(settings=RenderSettings(listen_ipv6=True, listen_address="10.0.0.1"))
        main = parse(pinned.render(tls_state, extra_files=files), tmp_path / "pinned")
        listens = args(main["conf.d/site-web.conf"][1]["block"], "listen")
        assert listens == [["10.0.0.1:443", "ssl", "http2"]]

    @pytest.mark.parametrize(
        "sites",
        [
            pytest.param(  # IPv4 and IPv6 default servers of their own
                (
                    site("a", listeners=(Listener(18080, default_server=True),)),
                    site("b", listeners=(Listener(18080, address="::", default_server=True),)),
                ),
                id="default-per-family",
            ),
            pytest.param(  # one name, served by one site per family
                (
                    site("a", server_names=("www.test",), listeners=(Listener(18080),)),
                    site(
                        "b", server_names=("www.test",), listeners=(Listener(18080, address="::"),)
                    ),
                ),
                id="name-per-family",
            ),
            pytest.param(  # h2c on IPv6 only
                (
                    site("a", listeners=(Listener(18080),)),
                    site("b", listeners=(Listener(18080, http2=True, address="::"),)),
                ),
                id="h2c-on-ipv6",
            ),
            pytest.param(  # another site's own address
                (
                    site("a", listeners=(Listener(18080),)),
                    site("b", listeners=(Listener(18080, address="::1"),)),
                ),
                id="one-address",
            ),
            pytest.param(  # a catch-all on IPv6 only: the default of [::]:18080
                (
                    site("a", listeners=(Listener(18080, default_server=True),)),
                    site("b", server_names=("_",), listeners=(Listener(18080, address="::"),)),
                ),
                id="catch-all-on-ipv6",
            ),
        ],
    )
    def test_ports_the_state_gives_ipv6_addresses_keep_them(
        self, sites: tuple[Site, ...], tmp_path: Path
    ) -> None:
        """Where any site writes an IPv6 address on a port, the port's IPv6 listeners
        stay as written: a twin there would be a second default server, a wildcard
        beside an address, a name served twice or h2c on a socket the state keeps to
        HTTP/1. The bundle is the one rendered without the setting."""
        both = state(*sites)
        plain = NginxRenderer().render(both)
        assert NginxRenderer(settings=RenderSettings(listen_ipv6=True)).render(both) == plain

    def test_listen_ipv6_twins_repeat_the_ipv4_sockets(self, tmp_path: Path) -> None:
        """On other ports every address-less listener gets its twin, in every site, so
        IPv6 is served as IPv4 is: the same default server, the same names."""
        both = state(
            site("a", listeners=(Listener(18080, default_server=True), Listener(18081))),
            site("b", listeners=(Listener(18080),)),
        )
        renderer = NginxRenderer(settings=RenderSettings(listen_ipv6=True))
        parsed = parse(renderer.render(both), tmp_path)
        [a] = parsed["conf.d/site-a.conf"]
        [b] = parsed["conf.d/site-b.conf"]
        assert args(a["block"], "listen") == [
            ["18080", "default_server"],
            ["[::]:18080", "default_server"],
            ["18081"],
            ["[::]:18081"],
        ]
        assert args(b["block"], "listen") == [["18080"], ["[::]:18080"]]
        unknown = [args(d["block"], "listen")[0] for d in parsed["conf.d/unknown-hosts.conf"]]
        assert unknown == [["18081", "default_server"], ["[::]:18081", "default_server"]]

    def test_wildcard_spellings_get_twins_too(self, tmp_path: Path) -> None:
        """``*:P`` and ``0.0.0.0:P`` are the socket ``P`` is: twinned alike, so a default
        server written ``*:P`` stays the default over IPv6."""
        both = state(
            site("a", listeners=(Listener(18080),)),
            site("b", listeners=(Listener(18080, address="*", default_server=True),)),
        )
        parsed = parse(
            NginxRenderer(settings=RenderSettings(listen_ipv6=True)).render(both), tmp_path
        )
        [b] = parsed["conf.d/site-b.conf"]
        assert args(b["block"], "listen") == [
            ["*:18080", "default_server"],
            ["[::]:18080", "default_server"],
        ]

    def test_no_twins_where_they_would_put_a_redirect_on_a_written_ipv6_port(self) -> None:
        """A TLS-only site's twin would give its HTTP->HTTPS redirect ``[::]:80``; where
        another site writes an IPv6 socket on port 80, the site keeps to IPv4."""
        tls_only = site("a", listeners=(Listener(443, tls=True),), tls=TLSConfig(certificate="c"))
        other = site("b", listeners=(Listener(80, address="::1"),))
        both = attrs.evolve(
            state(tls_only, other), certificates=(CertificateRef("c", ("a.example.com",)),)
        )
        files = {"certs/c.crt": b"x", "certs/c.key": b"y"}
        plain = NginxRenderer().render(both, extra_files=files)
        twinned = NginxRenderer(settings=RenderSettings(listen_ipv6=True))
        assert twinned.render(both, extra_files=files) == plain

    def test_host_settings_check_conflicts_not_rules_for_new_input(self) -> None:
        """A stored state may predate a rule for new input (an upstream on the Docker
        daemon's port): binding it to `listen_address` renders it as it did; only
        conflicts the binding creates are refused."""
        docker = Upstream(name="app", servers=(UpstreamServer(address="127.0.0.1:2375"),))
        stored = state(site("a", listeners=(Listener(18080),)), upstreams=(docker,))
        pinned = NginxRenderer(settings=RenderSettings(listen_address="127.0.0.1"))
        assert pinned.render(stored)

    @pytest.mark.parametrize(
        "bad",
        [
            {"prefix": "relative/dir"},
            {"status_address": "localhost"},
            {"status_port": 70000},
            {"worker_processes": 0},
            {"user": "www-data; pid /x"},
            {"error_log_level": "loud"},
            {"proxy_cache_size": "1g; pid /x"},
        ],
    )
    def test_render_settings_are_checked(self, bad: dict[str, Any]) -> None:
        """Host settings reach nginx.conf too, so they are validated like model values."""
        with pytest.raises((ValueError, TypeError)):
            RenderSettings(**bad)

    def test_http_defaults(self, main: list[Directive]) -> None:
        """server_tokens off, HTTP/1.1 to upstreams, modern TLS with a session cache."""
        http = one(main, "http")["block"]
        assert args(http, "server_tokens") == [["off"]]
        assert args(http, "proxy_http_version") == [["1.1"]]
        assert args(http, "proxy_buffer_size") == [["16k"]]  # large SSO/JWT cookies
        assert args(http, "proxy_buffers") == [["8", "16k"]]
        assert args(http, "ssl_protocols") == [["TLSv1.2", "TLSv1.3"]]
        assert args(http, "ssl_session_cache") == [["shared:nxmesh_tls:10m"]]
        assert "RC4" not in one(http, "ssl_ciphers")["args"][0]

    def test_access_log_format_carries_the_request_id(self, main: list[Directive]) -> None:
        """The nxmesh log format records $request_id (also sent upstream), the name asked
        for, which upstream answered with what, whether the cache did, and the peer that
        connected (a balancer or proxy, when the client's address came from it)."""
        fmt = one(one(main, "http")["block"], "log_format")
        assert fmt["args"][0] == "nxmesh"
        line = "".join(fmt["args"][1:])
        for field in ("request_id=$request_id", "host=$host", "upstream=$upstream_addr"):
            assert field in line
        assert "upstream_status=$upstream_status" in line
        assert line.endswith(" cache=$upstream_cache_status peer=$realip_remote_addr")

    def test_dollar_variable_is_defined_for_the_quoting(self, main: list[Directive]) -> None:
        """The geo block defines the variable quoting uses for a literal '$'."""
        geo = one(one(main, "http")["block"], "geo")
        assert geo["args"] == [f"${DOLLAR_VARIABLE}"]
        assert geo["block"] == [
            {"directive": "default", "line": geo["block"][0]["line"], "args": ["$"]}
        ]

    def test_http_extra_is_empty_by_default(self) -> None:
        """Without overrides nothing follows the comment announcing http_extra."""
        text = NginxRenderer().render(make_state(1)).text("nginx.conf")
        after = text.split("(http_extra.conf.j2) follow.\n", 1)[1]
        assert after.strip() == "include conf.d/*.conf;\n}".strip()


class TestSites:
    """How sites, listeners and TLS become server blocks."""

    def test_plain_site(self, tmp_path: Path) -> None:
        """One server block: listen, server_name, body size, one location per model location."""
        parsed = parse(NginxRenderer().render(state(site("web"))), tmp_path)
        (server,) = servers(parsed, "web")
        assert args(server, "listen") == [["80"]]
        assert args(server, "server_name") == [["web.example.com"]]
        assert args(server, "client_max_body_size") == [["1m"]]
        assert list(locations(server)) == ["/"]

    def test_listener_addresses_and_options(self, tmp_path: Path) -> None:
        """IPv6 is bracketed, '*' is explicit, options follow in a fixed order."""
        listeners = (
            Listener(port=8080, address="::1", default_server=True),
            Listener(port=8080, address="*"),
            Listener(port=8081, address="10.0.0.1", http2=True),
        )
        parsed = parse(NginxRenderer().render(state(site("web", listeners=listeners))), tmp_path)
        (server,) = servers(parsed, "web")
        assert args(server, "listen") == [
            ["[::1]:8080", "default_server"],
            ["*:8080"],
            ["10.0.0.1:8081", "http2"],
        ]

    def test_tls_site_with_redirect_and_hsts(self, tmp_path: Path) -> None:
        """A redirect server on the plain listener; the TLS server with cert, HTTP/2, HSTS."""
        tls_site = site(
            "api",
            listeners=(Listener(port=443, tls=True, http2=True), Listener(port=80)),
            tls=TLSConfig(certificate="api-cert", hsts=True, protocols=("TLSv1.3",)),
        )
        parsed = parse(NginxRenderer().render(state(tls_site)), tmp_path)
        redirect, main = servers(parsed, "api")
        assert args(redirect, "listen") == [["80"]]
        assert args(locations(redirect)["/"], "return") == [["308", "https://$host$request_uri"]]
        assert "ssl_certificate" not in {d["directive"] for d in redirect}
        assert args(main, "listen") == [["443", "ssl", "http2"]]
        assert args(main, "ssl_certificate") == [["certs/api-cert.crt"]]
        assert args(main, "ssl_certificate_key") == [["certs/api-cert.key"]]
        assert args(main, "ssl_protocols") == [["TLSv1.3"]]
        assert ["Strict-Transport-Security", "max-age=63072000", "always"] in args(
            main, "add_header"
        )

    def test_redirect_without_plain_listener_adds_port_80(self, tmp_path: Path) -> None:
        """redirect_http with only TLS listeners redirects from port 80 on their addresses."""
        tls_site = site(
            "api",
            listeners=(Listener(port=443, tls=True, address="10.0.0.1"),),
            tls=TLSConfig(certificate="c"),
        )
        redirect, _ = servers(parse(NginxRenderer().render(state(tls_site)), tmp_path), "api")
        assert args(redirect, "listen") == [["10.0.0.1:80"]]

    def test_redirect_listens_once_per_socket(self, tmp_path: Path) -> None:
        """``443`` and ``0.0.0.0:8443`` are one IPv4 wildcard: one ``listen 80``, not two
        (nginx's "duplicate listen"); IPv6 gets its own."""
        tls_site = site(
            "api",
            listeners=(
                Listener(port=443, tls=True),
                Listener(port=8443, tls=True, address="0.0.0.0"),
                Listener(port=8443, tls=True, address="::"),
            ),
            tls=TLSConfig(certificate="c"),
        )
        bundle = NginxRenderer().render(state(tls_site))
        redirect, _ = servers(parse(bundle, tmp_path), "api")
        assert args(redirect, "listen") == [["80"], ["[::]:80"]]

    def test_redirect_names_a_non_default_https_port(self, tmp_path: Path) -> None:
        """HTTPS on 8443 redirects to https://$host:8443..."""
        tls_site = site(
            "api",
            listeners=(Listener(port=8443, tls=True), Listener(port=8080)),
            tls=TLSConfig(certificate="c"),
        )
        redirect, _ = servers(parse(NginxRenderer().render(state(tls_site)), tmp_path), "api")
        assert args(locations(redirect)["/"], "return") == [
            ["308", "https://$host:8443$request_uri"]
        ]

    def test_redirect_names_the_public_port_behind_a_port_mapping(self, tmp_path: Path) -> None:
        """nginx on 8443/8080 behind a mapping from 443/80: the redirect names what
        clients reach (no port for 443, the public one otherwise), and the servers with
        a mapped listener send nginx's own redirects relative."""

        def rendered(public: int) -> list[list[Directive]]:
            tls_site = site(
                "api",
                listeners=(
                    Listener(port=8443, tls=True, public_port=public),
                    Listener(port=8080, public_port=80),
                ),
                tls=TLSConfig(certificate="c"),
            )
            return servers(parse(NginxRenderer().render(state(tls_site)), tmp_path), "api")

        redirect, main = rendered(443)
        assert args(locations(redirect)["/"], "return") == [["308", "https://$host$request_uri"]]
        # Upstreams are told the public port of the port their request came in on.
        tls_site = site(
            "api",
            listeners=(
                Listener(port=8443, tls=True, public_port=443),
                Listener(port=8080, public_port=80),
            ),
            tls=TLSConfig(certificate="c"),
        )
        http = one(parse(NginxRenderer().render(state(tls_site)), tmp_path)["nginx.conf"], "http")
        [public] = [d for d in http["block"] if d["args"][-1:] == ["$nxmesh_public_port"]]
        assert public["args"] == ["$server_port", "$nxmesh_public_port"]
        assert [[d["directive"], *d["args"]] for d in public["block"]] == [
            ["default", "$server_port"],
            ["8080", "80"],
            ["8443", "443"],
        ]
        assert args(main, "absolute_redirect") == [["off"]]
        assert args(redirect, "absolute_redirect") == []
        redirect, _ = rendered(9443)
        assert args(locations(redirect)["/"], "return") == [
            ["308", "https://$host:9443$request_uri"]
        ]
        # Unmapped (the public port is nginx's): absolute redirects as nginx writes them.
        plain = site("web", listeners=(Listener(port=80, public_port=80),))
        (server,) = servers(parse(NginxRenderer().render(state(plain)), tmp_path), "web")
        assert args(server, "absolute_redirect") == []

    @pytest.mark.parametrize(
        ("longest", "size"),
        [(0, None), (14, None), (15, 64), (46, 64), (47, 128), (110, 128), (111, 192), (253, 320)],
    )
    def test_hash_buckets_fit_the_longest_name(self, longest: int, size: int | None) -> None:
        """nginx needs 8 + 8 + the name and 2 bytes padded to 8 per bucket: up to 14
        characters fit the 32 bytes of builds that know no cache line; longer ones get
        the 64-byte default, or a multiple of it past 46."""
        assert hash_bucket_size(["a.test", "b" * longest]) == size

    def test_a_long_server_name_sets_the_bucket_size(self, tmp_path: Path) -> None:
        """Only a state with such a name sets server_names_hash_bucket_size."""
        short = state(site("web", server_names=("a.test",)))
        http = one(parse(NginxRenderer().render(short), tmp_path)["nginx.conf"], "http")
        assert args(http["block"], "server_names_hash_bucket_size") == []
        long_site = site("web", server_names=("a" * 60 + ".example.com",))
        http = one(parse(NginxRenderer().render(state(long_site)), tmp_path)["nginx.conf"], "http")
        assert args(http["block"], "server_names_hash_bucket_size") == [["128"]]

    def test_without_redirect_one_server_serves_both(self, tmp_path: Path) -> None:
        """redirect_http false: one server block with the plain and the TLS listener."""
        tls_site = site(
            "api",
            listeners=(Listener(port=443, tls=True), Listener(port=80)),
            tls=TLSConfig(certificate="c", redirect_http=False),
        )
        (server,) = servers(parse(NginxRenderer().render(state(tls_site)), tmp_path), "api")
        assert args(server, "listen") == [["443", "ssl"], ["80"]]

    def test_acme_site_uses_its_own_certificate_path(self, tmp_path: Path) -> None:
        """tls: acme reads certs/acme/<site>.crt, which no certificate name can collide with."""
        acme_site = site(
            "shop", listeners=(Listener(port=443, tls=True),), tls=TLSConfig(acme=True)
        )
        _, main = servers(parse(NginxRenderer().render(state(acme_site)), tmp_path), "shop")
        assert args(main, "ssl_certificate") == [["certs/acme/shop.crt"]]
        assert args(main, "ssl_certificate_key") == [["certs/acme/shop.key"]]

    def test_access_log_off(self, tmp_path: Path) -> None:
        """access_log: false turns the site's access log off."""
        parsed = parse(NginxRenderer().render(state(site("web", access_log=False))), tmp_path)
        (server,) = servers(parsed, "web")
        assert args(server, "access_log") == [["off"]]


class TestLocations:
    """How each location kind becomes a location block."""

    def render_locations(self, tmp_path: Path, *locs: Location, **kwargs: Any) -> Any:
        parsed = parse(
            NginxRenderer().render(state(site("web", locations=locs, **kwargs))), tmp_path
        )
        (server,) = servers(parsed, "web")
        return locations(server)

    def test_match_kinds(self, tmp_path: Path) -> None:
        """prefix, exact (=), regex (~) and case-insensitive regex (~*)."""
        found = self.render_locations(
            tmp_path,
            Location(path="/a", return_=Return(code=204)),
            Location(path="/b", match="exact", return_=Return(code=204)),
            Location(path=r"^/c/[0-9]+\.png$", match="regex", return_=Return(code=204)),
            Location(path=r"\.JPG$", match="regex_ci", return_=Return(code=204)),
        )
        # crossplane keeps the backslash escape nginx removes: \\. is the regex \.
        assert list(found) == ["/a", "= /b", "~ ^/c/[0-9]+\\\\.png$", "~* \\\\.JPG$"]

    def test_fallbacks_and_fastcgi_pass_nginx_t(self) -> None:
        """A fallback nginx must read quoted (``/a(b)``) stays one token with the query
        string; FastCGI locations pass ``nginx -t`` on a site checking client certificates
        (mod_ssl's parameters), and the site's static locations hide .php paths."""
        from nxmesh.core.model import FastCGI, FastCGIParam, TLSConfig
        from nxmesh.plugins.render_nginx import site_view
        from nxmesh.testing.pki import Pki

        require_binary("nginx")
        fallbacks = [
            Location(path=f"/{n}/", root="/srv/www", fallback=f"/{n}(x)/i.php") for n in "ab"
        ]
        php = FastCGI(
            upstream="php",
            root="/srv/www",
            read_timeout=5,
            params=(FastCGIParam(name="APP_ENV", value="a b'c"),),
        )
        scripts = [
            Location(path=r"\.php$", match="regex", fastcgi=php),
            Location(path="/tool/", fastcgi=attrs.evolve(php, upstream="tcp", check_script=False)),
        ]
        web = site(
            locations=(*fallbacks, *scripts),
            listeners=(Listener(port=443, tls=True),),
            tls=TLSConfig(certificate="web", client_ca=Pki().root.pem),
        )
        upstreams = (
            Upstream(name="php", servers=(UpstreamServer(address="unix:/run/php/fpm.sock"),)),
            Upstream(name="tcp", servers=(UpstreamServer(address="127.0.0.1:9000"),), keepalive=0),
        )
        result = check_bundle(
            NginxRenderer().render(state(web, upstreams=upstreams)), placeholder_certificates=True
        )
        assert result.ok, result.message
        views = site_view(web, {u.name: u for u in upstreams}).locations
        assert views[0].fallback_uri == '"/a(x)/i.php$is_args$args"'
        assert [v.hide_scripts for v in views] == [True, True, False, False]
        params = {p.name: p.value for p in views[2].fastcgi_params}
        assert params["SSL_CLIENT_VERIFY"] == "$ssl_client_verify"
        assert params["APP_ENV"] == "a b'c"

    def test_the_models_builtin_parameters_are_the_rendered_ones(self) -> None:
        """`FASTCGI_BUILTIN_PARAMS` (which a location's own `params` may not name) lists
        every non-HTTP_ parameter the renderer writes: none can be written twice."""
        from nxmesh.core.model import FASTCGI_BUILTIN_PARAMS, FastCGI
        from nxmesh.plugins.render_nginx.renderer import fastcgi_params

        php = FastCGI(upstream="php", root="/srv/www")
        written = {
            p.name
            for p in fastcgi_params(php, client_certs=True, checked_user=True)
            if not p.name.startswith("HTTP_")
        }
        assert written == FASTCGI_BUILTIN_PARAMS

    def test_cache_keys_follow_what_shapes_the_answers(self) -> None:
        """A caching location's key changes with the site, the location and how its
        upstream is asked (another server name), not with the listeners (the host's IPv6
        twins, another site's default server) nor the upstream's servers, and is the
        same for the same state."""
        from nxmesh.core.model import ProxyCache, UpstreamTLS
        from nxmesh.plugins.render_nginx import site_view

        cached = Location(path="/", upstream="app", cache=ProxyCache(valid=60))
        web = site(locations=(cached,))
        app = Upstream(name="app", servers=(UpstreamServer(address="10.0.0.1:443"),))

        def key(s: Site, up: Upstream = app) -> str:
            [view] = site_view(s, {"app": up}).locations
            assert view.cache_key is not None
            return str(view.cache_key)

        first = key(web)
        assert key(web) == first
        assert key(attrs.evolve(web, listeners=(Listener(80), Listener(80, address="::")))) == first
        assert key(attrs.evolve(web, allow=("10.0.0.0/8",))) != first
        other = attrs.evolve(cached, proxy_headers=(Header(name="X-Role", value="admin"),))
        assert key(attrs.evolve(web, locations=(other,))) != first
        v1 = attrs.evolve(app, tls=UpstreamTLS(server_name="v1.internal"))
        v2 = attrs.evolve(app, tls=UpstreamTLS(server_name="v2.internal"))
        assert key(web, v1) != key(web, v2)
        # An outage's edit of the servers keeps what serve_stale serves meanwhile.
        fewer = attrs.evolve(v1, servers=(UpstreamServer(address="10.0.0.2:443", weight=5),))
        assert key(web, fewer) == key(web, v1)

    def test_proxy_location_keeps_upstream_connections_alive(self, tmp_path: Path) -> None:
        """proxy_pass to the upstream, request id and forwarding headers, Connection "".
        Every forwarding header is nginx's own: the client's X-Forwarded-Host, -Port and
        Forwarded, its claims of a client certificate, of the scheme, its address or the
        URL, never reach the upstream."""
        (block,) = self.render_locations(tmp_path, Location(path="/", upstream="app")).values()
        assert args(block, "proxy_pass") == [["http://app"]]
        headers = dict(args(block, "proxy_set_header"))
        assert headers == {
            "Host": "$host",
            "X-Real-IP": "$remote_addr",
            "X-Forwarded-For": "$proxy_add_x_forwarded_for",
            "X-Forwarded-Proto": "$scheme",
            "X-Forwarded-Host": "$host",
            "X-Forwarded-Port": "$nxmesh_public_port",
            "Forwarded": "",
            "X-Request-ID": "$request_id",
            "Connection": "",
            # The site checks no client certificates: a client's own claims are dropped.
            "X-Client-Verify": "",
            "X-Client-DN": "",
            # And its claims of the scheme, its address or the URL.
            **dict.fromkeys(CLIENT_CLAIMS, ""),
            "X-Forwarded-Prefix": "",
        }
        assert find(block, "proxy_read_timeout") == []

    def test_websocket_location_uses_the_upgrade_map(self, tmp_path: Path) -> None:
        """WebSocket: Upgrade + Connection from the map, and a long read timeout."""
        (block,) = self.render_locations(
            tmp_path, Location(path="/ws", upstream="app", websocket=True)
        ).values()
        headers = dict(args(block, "proxy_set_header"))
        assert headers["Upgrade"] == "$http_upgrade"
        assert headers["Connection"] == "$nxmesh_connection_upgrade"
        assert args(block, "proxy_read_timeout") == [["3600s"]]

    def test_own_proxy_headers_replace_defaults_of_the_same_name(self, tmp_path: Path) -> None:
        """A proxy header named like a default replaces it instead of being sent twice."""
        (block,) = self.render_locations(
            tmp_path,
            Location(
                path="/",
                upstream="app",
                proxy_read_timeout=5,
                proxy_headers=(Header(name="x-forwarded-proto", value="https"),),
            ),
        ).values()
        sent = args(block, "proxy_set_header")
        assert [h for h in sent if h[0].lower() == "x-forwarded-proto"] == [
            ["x-forwarded-proto", "https"]
        ]
        assert args(block, "proxy_read_timeout") == [["5s"]]

    def test_location_headers_repeat_the_server_headers(self, tmp_path: Path) -> None:
        """nginx drops inherited add_header in a block with its own: the server's are repeated,
        and one of the same name is replaced."""
        found = self.render_locations(
            tmp_path,
            Location(path="/", upstream="app"),
            Location(
                path="/static/",
                root="/srv/www",
                headers=(
                    Header(name="X-Frame-Options", value="SAMEORIGIN"),
                    Header(name="Cache-Control", value="public, max-age=60"),
                ),
            ),
            headers=(
                Header(name="X-Frame-Options", value="DENY"),
                Header(name="X-Content-Type-Options", value="nosniff", always=True),
            ),
        )
        assert find(found["/"], "add_header") == []
        assert args(found["/static/"], "add_header") == [
            ["X-Content-Type-Options", "nosniff", "always"],
            ["X-Frame-Options", "SAMEORIGIN"],
            ["Cache-Control", "public, max-age=60"],
        ]

    def test_static_location(self, tmp_path: Path) -> None:
        """root, index files and try_files."""
        (block,) = self.render_locations(
            tmp_path, Location(path="/s/", root="/srv/www", index=("index.html", "a.htm"))
        ).values()
        assert args(block, "root") == [["/srv/www"]]
        assert args(block, "index") == [["index.html", "a.htm"]]
        assert args(block, "try_files") == [["$uri", "$uri/", "=404"]]

    def test_redirect_keeps_request_uri_a_variable(self, tmp_path: Path) -> None:
        """A redirect URL ending in $request_uri keeps the variable."""
        (block,) = self.render_locations(
            tmp_path,
            Location(path="/", redirect=Redirect(code=308, url="https://a.example$request_uri")),
        ).values()
        assert args(block, "return") == [["308", "https://a.example$request_uri"]]

    def test_return_with_and_without_body(self, tmp_path: Path) -> None:
        """A body is one quoted argument, sent as text/plain unless the URI's extension
        says otherwise; no body leaves nginx's own error page."""
        found = self.render_locations(
            tmp_path,
            Location(path="/a", return_=Return(code=200, body="it's (1) <b>=%|~ ok")),
            Location(path="/b", return_=Return(code=404)),
            Location(path="/c", client_max_body_size="5m", return_=Return(code=200, body="k")),
        )
        assert args(found["/a"], "return") == [["200", "it's (1) <b>=%|~ ok"]]
        assert args(found["/b"], "return") == [["404"]]
        assert args(found["/c"], "client_max_body_size") == [["5m"]]
        assert args(found["/a"], "default_type") == [["text/plain"]]
        assert args(found["/b"], "default_type") == []


class TestUpstreams:
    """Upstream blocks: balancing method first, server parameters, keepalive."""

    def test_upstream_block(self, tmp_path: Path) -> None:
        """Every server with its parameters; keepalive when asked; method before keepalive."""
        upstreams = (
            Upstream(
                name="b",
                lb_method="least_conn",
                keepalive=8,
                servers=(
                    UpstreamServer(address="10.0.0.1:80", weight=5, max_fails=2, fail_timeout=3),
                    UpstreamServer(address="[::1]:81", backup=True),
                    UpstreamServer(address="unix:/run/app.sock"),
                ),
            ),
            Upstream(name="a", keepalive=0, servers=(UpstreamServer(address="x.internal:1"),)),
        )
        parsed = parse(NginxRenderer().render(state(upstreams=upstreams)), tmp_path)
        blocks = find(parsed["conf.d/upstreams.conf"], "upstream")
        assert [b["args"] for b in blocks] == [["a"], ["b"]]
        assert [d["directive"] for d in blocks[0]["block"]] == ["server"]
        assert [d["directive"] for d in blocks[1]["block"]] == [
            "least_conn",
            "server",
            "server",
            "server",
            "keepalive",
        ]
        assert args(blocks[1]["block"], "server") == [
            ["10.0.0.1:80", "weight=5", "max_fails=2", "fail_timeout=3s"],
            ["[::1]:81", "weight=1", "max_fails=1", "fail_timeout=10s", "backup"],
            ["unix:/run/app.sock", "weight=1", "max_fails=1", "fail_timeout=10s"],
        ]
        assert args(blocks[1]["block"], "keepalive") == [["8"]]


# ---------------------------------------------------------------------------------------
# Template overrides
# ---------------------------------------------------------------------------------------


class TestTemplateOverrides:
    """Template lookup: user directory > plugin paths (later wins) > built-ins."""

    def http_extra(self, renderer: NginxRenderer) -> str:
        text = renderer.render(make_state(1)).text("nginx.conf")
        return text.split("(http_extra.conf.j2) follow.\n", 1)[1].split("include conf.d")[0]

    def test_precedence(self, tmp_path: Path) -> None:
        """The user dir beats every plugin path; among plugin paths the last one wins."""
        first = write_template(tmp_path / "p1", "http_extra.conf.j2", "    # from p1\n").parent
        second = write_template(tmp_path / "p2", "http_extra.conf.j2", "    # from p2\n").parent
        user = write_template(tmp_path / "u", "http_extra.conf.j2", "    # from user\n").parent
        assert "# from user" in self.http_extra(NginxRenderer([first, second], template_dir=user))
        assert "# from p2" in self.http_extra(NginxRenderer([first, second]))
        assert "# from p1" in self.http_extra(NginxRenderer([second, first]))

    def test_missing_override_falls_back_to_the_builtin(self, tmp_path: Path) -> None:
        """A template a directory lacks comes from the next source down."""
        user = write_template(tmp_path / "u", "status.conf.j2", "# status overridden\n").parent
        renderer = NginxRenderer(template_dir=user)
        assert renderer.render(make_state(1)).text(STATUS_FILE) == "# status overridden\n"
        assert renderer.template_source("status.conf.j2") == str(user / "status.conf.j2")
        assert str(renderer.template_source("site.conf.j2")).endswith(
            "render_nginx/templates/site.conf.j2"
        )

    def test_override_can_wrap_the_builtin(self, tmp_path: Path) -> None:
        """An override reaches the original as builtin/<name>."""
        user = write_template(
            tmp_path / "u",
            "server_extra.conf.j2",
            '{% include "builtin/server_extra.conf.j2" %}    # {{ site.name }} extra\n',
        ).parent
        text = NginxRenderer(template_dir=user).render(make_state(1)).text("conf.d/site-site0.conf")
        assert "    # site0 extra\n}" in text

    def test_runtime_error_names_the_template_and_line(self, tmp_path: Path) -> None:
        """An override using an undefined variable fails naming its file and line."""
        path = write_template(
            tmp_path / "u", "http_extra.conf.j2", "    # ok\n    # ok\n    foo {{ nope }};\n"
        )
        renderer = NginxRenderer(template_dir=path.parent)
        with pytest.raises(TemplateRenderError) as info:
            renderer.render(make_state(1))
        assert info.value.template == str(path)
        assert info.value.lineno == 3
        assert f"{path}, line 3" in str(info.value)
        assert "'nope' is undefined" in str(info.value)

    def test_syntax_error_is_reported_when_the_renderer_is_built(self, tmp_path: Path) -> None:
        """A template that does not compile fails early, naming its file and line."""
        path = write_template(tmp_path / "u", "location.conf.j2", "line\n{% if %}\n")
        with pytest.raises(TemplateRenderError) as info:
            NginxRenderer(template_dir=path.parent)
        assert (info.value.template, info.value.lineno) == (str(path), 2)
        assert isinstance(info.value, NxMeshError)

    def test_unsafe_value_in_an_override_is_refused(self, tmp_path: Path) -> None:
        """An override cannot interpolate a line break: the quoting refuses it, with the line."""
        path = write_template(
            tmp_path / "u", "http_extra.conf.j2", '    add_header X {{ "a\\nreturn 200" }};\n'
        )
        with pytest.raises(TemplateRenderError, match="control character U\\+000A") as info:
            NginxRenderer(template_dir=path.parent).render(make_state(1))
        assert info.value.lineno == 1

    def test_sandbox_blocks_python_internals(self, tmp_path: Path) -> None:
        """Templates run sandboxed: reaching for dunder attributes fails."""
        path = write_template(
            tmp_path / "u", "http_extra.conf.j2", "    # {{ state.__class__.__mro__ }}\n"
        )
        with pytest.raises(TemplateRenderError, match=r"line 1: SecurityError: .*'__class__'"):
            NginxRenderer(template_dir=path.parent).render(make_state(1))


class TestRendererFor:
    """Building the configured renderer from a plugin manager."""

    def test_builtin_is_registered_through_its_entry_point(
        self, plugin_manager: NxMeshPluginManager
    ) -> None:
        """The render_nginx built-in registers the 'nginx' renderer."""
        registry = ProviderRegistries.collect(plugin_manager)["renderer"]
        assert registry.get("nginx") is NginxRenderer
        assert plugin_manager.plugin_info["render_nginx"].builtin

    def test_plugin_template_paths_later_plugin_wins(
        self, tmp_path: Path, make_plugin_manager: Callable[..., NxMeshPluginManager]
    ) -> None:
        """Of two plugins overriding one template, the one registered later wins, and the
        user's template_dir setting beats both."""
        dirs = {}
        for name in ("early", "late", "user"):
            dirs[name] = write_template(
                tmp_path / name, "http_extra.conf.j2", f"    # by {name}\n"
            ).parent

        def plugin(path: Path) -> object:
            class TemplatePlugin:
                @hookimpl
                def nxmesh_template_paths(self) -> list[Path]:
                    return [path]

            return TemplatePlugin()

        pm = make_plugin_manager(plugin(dirs["early"]), plugin(dirs["late"]))
        text = renderer_for(pm).render(make_state(1)).text("nginx.conf")
        assert "# by late" in text
        assert "# by early" not in text
        user = renderer_for(pm, RendererSettings(template_dir=dirs["user"]))
        assert "# by user" in user.render(make_state(1)).text("nginx.conf")

    def test_unknown_renderer_name(self, plugin_manager: NxMeshPluginManager) -> None:
        """A renderer name no plugin registers is a ProviderNotFoundError with a hint."""
        with pytest.raises(ProviderNotFoundError, match="did you mean 'nginx'"):
            renderer_for(plugin_manager, RendererSettings(name="ngin"))

    def test_hello_plugin_override_shows_up(self, tmp_path: Path) -> None:
        """With the real plugin manager, nxmesh-hello's http_extra.conf.j2 lands in the
        http block."""
        pm = get_plugin_manager(environ={})
        assert pm.get_plugin("hello") is not None, "examples/nxmesh-hello must be installed"
        parsed = parse(renderer_for(pm).render(make_state(1)), tmp_path)
        http = one(parsed["nginx.conf"], "http")["block"]
        assert args(http, "server_names_hash_max_size") == [["1024"]]


# ---------------------------------------------------------------------------------------
# nginx -t in a scratch prefix (nxmesh.nginx_check, reused by the agent)
# ---------------------------------------------------------------------------------------


def sleeping_nginx(tmp_path: Path) -> Path:
    """A stand-in nginx binary that hangs, to exercise the timeout."""
    fake = tmp_path / "bin" / "nginx"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexec sleep 30\n")
    fake.chmod(0o755)
    return fake


class TestNginxCheck:
    """Running nginx -t on a bundle: a fresh scratch prefix, nginx's words, a hard timeout."""

    def test_rejected_bundle_reports_nginx_message_with_bundle_paths(self) -> None:
        """A bundle nginx rejects fails with nginx's message, paths relative to the bundle."""
        require_binary("nginx")
        bundle = NginxRenderer().render(make_state(1))
        files = dict(bundle.files)
        files["conf.d/site-site0.conf"] += b"bogus;\n"
        result = check_bundle(Bundle(files))
        assert not result.ok
        assert result.returncode == 1
        assert 'unknown directive "bogus" in conf.d/site-site0.conf:' in result.message
        assert "nxmesh-check-" not in result.output

    def test_scratch_directory_is_removed(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Nothing is left behind in the temp directory after a check."""
        require_binary("nginx")
        monkeypatch.setenv("TMPDIR", str(tmp_path))
        import tempfile

        monkeypatch.setattr(tempfile, "tempdir", None)
        assert check_bundle(NginxRenderer().render(make_state(1))).ok
        assert list(tmp_path.iterdir()) == []

    def test_given_scratch_must_be_empty_and_is_kept(self, tmp_path: Path) -> None:
        """A caller's scratch dir is used as is and kept; a non-empty one is refused."""
        require_binary("nginx")
        bundle = NginxRenderer().render(make_state(1))
        assert check_bundle(bundle, scratch=tmp_path / "s").ok
        assert (tmp_path / "s" / "nginx.conf").read_bytes() == bundle.files["nginx.conf"]
        with pytest.raises(NxMeshError, match="not empty"):
            check_bundle(bundle, scratch=tmp_path / "s")

    def test_placeholders_only_for_absent_pairs_inside_the_bundle(self) -> None:
        """Provided certificates are used as given; only absent pairs get stand-ins."""
        require_binary("nginx")
        sites = (
            site("a", listeners=(Listener(port=443, tls=True),), tls=TLSConfig(certificate="ca")),
            site("b", listeners=(Listener(port=443, tls=True),), tls=TLSConfig(certificate="cb")),
        )
        bundle = NginxRenderer().render(
            state(*sites), extra_files={"certs/ca.crt": b"not a certificate", "certs/ca.key": b"x"}
        )
        result = check_bundle(bundle, placeholder_certificates=True)
        assert result.placeholders == ("certs/cb.crt", "certs/cb.key")
        # The provided (bogus) pair is what nginx loads, and it says so.
        assert not result.ok
        assert "certs/ca.crt" in result.message

    def test_timeout_kills_nginx(self, tmp_path: Path) -> None:
        """An nginx that hangs is killed at the timeout and the check fails."""
        result = check_bundle(
            NginxRenderer().render(make_state(1)),
            binary=str(sleeping_nginx(tmp_path)),
            timeout=0.5,
        )
        assert result.timed_out
        assert not result.ok

    @pytest.mark.anyio
    async def test_async_check(self) -> None:
        """The anyio wrapper gives the same verdicts on asyncio and trio."""
        require_binary("nginx")
        renderer = NginxRenderer()
        good = await check_bundle_async(renderer.render(make_state(2)))
        assert good.ok, good.output
        files = dict(renderer.render(make_state(1)).files)
        files["nginx.conf"] = files["nginx.conf"].replace(b"events {", b"events {{")
        bad = await check_bundle_async(Bundle(files))
        assert not bad.ok
        assert "nginx.conf" in bad.message

    @pytest.mark.anyio
    async def test_async_timeout_kills_nginx(self, tmp_path: Path) -> None:
        """The anyio wrapper kills a hanging nginx at the timeout."""
        with anyio.fail_after(10):  # the check's own timeout must end it first
            result = await check_bundle_async(
                NginxRenderer().render(make_state(1)),
                binary=str(sleeping_nginx(tmp_path)),
                timeout=0.5,
            )
        assert result.timed_out


# ---------------------------------------------------------------------------------------
# Real nginx
# ---------------------------------------------------------------------------------------


class _EchoHandler(http.server.BaseHTTPRequestHandler):
    """Answers every request with the request line and headers as JSON."""

    def do_GET(self) -> None:
        body = json.dumps({"path": self.path, "headers": dict(self.headers.items())}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@attrs.define
class Served:
    port: int
    status_port: int
    bundle: Bundle

    def get(self, path: str, host: str = "shop.example.test", port: int | None = None) -> Any:
        conn = http.client.HTTPConnection("127.0.0.1", port or self.port, timeout=10)
        try:
            conn.request("GET", path, headers={"Host": host})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()


@pytest.fixture
def backend() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def serve(tmp_path: Path, backend: int) -> Iterator[Callable[..., Served]]:
    """Render a state and run a real nginx on it (127.0.0.1, free ports)."""
    binary = require_binary("nginx")
    started: list[Path] = []

    def start(template_dir: Path | None = None) -> Served:
        port, status_port = free_port(), free_port()
        prefix = tmp_path / f"nginx{len(started)}"
        shop = Site(
            name="shop",
            server_names=("shop.example.test",),
            listeners=(Listener(port=port, address="127.0.0.1"),),
            headers=(Header(name="X-Site", value="shop", always=True),),
            locations=(
                Location(path="/", upstream="app"),
                Location(path="/healthz", match="exact", return_=Return(code=200, body="ok")),
                Location(path="/old", redirect=Redirect(code=301, url="/new$request_uri")),
            ),
        )
        upstream = Upstream(name="app", servers=(UpstreamServer(address=f"127.0.0.1:{backend}"),))
        renderer = NginxRenderer(
            template_dir=template_dir,
            settings=RenderSettings(status_port=status_port, worker_processes=1),
        )
        bundle = renderer.render(DesiredState(sites=(shop,), upstreams=(upstream,)))
        write_bundle(bundle, prefix)
        prepare_prefix(prefix)
        subprocess.run(
            [binary, "-p", f"{prefix}/", "-c", str(prefix / "nginx.conf"), "-e", "stderr"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        started.append(prefix)
        deadline = time.monotonic() + 10
        while not (prefix / "logs/nginx.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        return Served(port=port, status_port=status_port, bundle=bundle)

    yield start
    for prefix in started:
        pid = int((prefix / "logs/nginx.pid").read_text())
        os.kill(pid, signal.SIGQUIT)
        deadline = time.monotonic() + 10
        while (prefix / "logs/nginx.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.02)


class TestRealNginx:
    """A rendered bundle runs under a real nginx and behaves as rendered."""

    def test_examples_state_passes_nginx_t(self) -> None:
        """A state touching every feature passes real `nginx -t` (certificates stood in)."""
        require_binary("nginx")
        tls_site = site(
            "api",
            listeners=(Listener(port=443, tls=True, http2=True),),
            tls=TLSConfig(certificate="api", hsts=True),
            locations=(
                Location(path="/", upstream="app", websocket=True),
                Location(path=r"^/x/(?:a|b)\d+$", match="regex", root="/srv/x"),
            ),
        )
        result = check_bundle(
            NginxRenderer().render(state(tls_site, site("web"))), placeholder_certificates=True
        )
        assert result.ok, result.output
        assert result.placeholders == ("certs/api.crt", "certs/api.key")

    def test_proxies_with_request_id_and_serves_status(self, serve: Callable[..., Served]) -> None:
        """Proxying adds X-Request-ID; return and redirect work; the status server reports
        the config digest; the server header has no version."""
        served = serve()
        status, headers, body = served.get("/some/path?q=1")
        assert status == 200
        seen = json.loads(body)
        assert seen["path"] == "/some/path?q=1"
        assert len(seen["headers"]["X-Request-ID"]) == 32
        assert seen["headers"]["Host"] == "shop.example.test"
        assert headers["Server"] == "nginx"
        assert headers["X-Site"] == "shop"

        assert served.get("/healthz")[::2] == (200, b"ok")
        status, headers, _ = served.get("/old/page")
        assert status == 301
        assert headers["Location"] == f"http://shop.example.test:{served.port}/new/old/page"

        digest = config_digest(served.bundle.files)
        status, headers, body = served.get("/nxmesh/version", port=served.status_port)
        assert (status, body.decode(), headers["X-NxMesh-Digest"]) == (200, digest, digest)
        status, _, body = served.get("/nginx_status", port=served.status_port)
        assert status == 200
        assert body.startswith(b"Active connections:")

    def test_quoted_values_reach_clients_verbatim(
        self, serve: Callable[..., Served], tmp_path: Path
    ) -> None:
        """Characters that mean something to nginx, interpolated by a template, arrive as text:
        the quoting escapes them rather than letting them act."""
        user = write_template(
            tmp_path / "tpl",
            "server_extra.conf.j2",
            # The jinja string literal below is: a$host b"c\d;e{f}g#h'i
            r"""    add_header X-Nasty {{ "a$host b\"c\\d;e{f}g#h'i" }} always;""" + "\n",
        ).parent
        served = serve(template_dir=user)
        _, headers, _ = served.get("/healthz")
        assert headers["X-Nasty"] == "a$host b\"c\\d;e{f}g#h'i"


def test_every_built_in_template_is_named_and_overridable() -> None:
    """`TEMPLATE_NAMES` lists every template shipped: an override of one it misses would
    not be compiled (nor checked) up front, nor reported as overridden."""
    from importlib.resources import files

    from nxmesh.plugins.render_nginx.renderer import TEMPLATE_NAMES

    shipped = files("nxmesh.plugins.render_nginx") / "templates"
    assert sorted(p.name for p in shipped.iterdir() if p.name.endswith(".j2")) == sorted(
        TEMPLATE_NAMES
    )


def test_proxy_protocol_listeners_and_their_redirect() -> None:
    """``listen ... proxy_protocol`` where a listener says so; the implicit redirect
    server's port 80 too when every listener of the site does, not otherwise."""
    from nxmesh.core.model import CertificateRef, Listener, Location, Return, Site, TLSConfig
    from nxmesh.plugins.render_nginx.renderer import main_listens, redirect_listens

    def site(*listeners: Listener) -> Site:
        return Site(
            name="a",
            server_names=("a.test",),
            listeners=listeners,
            tls=TLSConfig(certificate="c"),
            locations=(Location(path="/", return_=Return(code=200)),),
        )

    behind = site(Listener(443, tls=True, proxy_protocol=True, default_server=True))
    assert main_listens(behind) == ["443 ssl proxy_protocol default_server"]
    assert redirect_listens(behind) == ["80 proxy_protocol"]
    split = site(Listener(443, tls=True, proxy_protocol=True), Listener(8443, tls=True))
    assert redirect_listens(split) == ["80"]
    state = DesiredState(sites=(behind,), certificates=(CertificateRef("c", ("a.test",)),))
    unknown = NginxRenderer().render(state).files["conf.d/unknown-hosts.conf"].decode()
    assert "listen 80 proxy_protocol default_server;" in unknown
