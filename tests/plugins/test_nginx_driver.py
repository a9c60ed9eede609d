"""The reload driver against a real nginx on loopback: apply, reject, roll back, prune."""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import attrs
import httpx
import pytest
from anyio.streams.tls import TLSListener

from nxmesh.agent.fsutil import read_tree
from nxmesh.agent.harness import NginxStack
from nxmesh.agent.http import http_get
from nxmesh.agent.process import worker_pids
from nxmesh.core.bundle import Bundle, bundle_digest
from nxmesh.core.model import (
    ApplyReport,
    BasicAuth,
    BasicAuthUser,
    CertificateRef,
    DesiredState,
    ErrorPage,
    Header,
    Listener,
    Location,
    PendingApply,
    ProxyCache,
    RateLimit,
    Return,
    Site,
    TLSConfig,
    Upstream,
    UpstreamServer,
    UpstreamTLS,
)
from nxmesh.core.pluginmanager import NxMeshPluginManager
from nxmesh.core.registry import ProviderRegistries
from nxmesh.plugins.deploy_docker import DockerSidecarMode
from nxmesh.plugins.nginx_driver import DriverSettings, ReloadDriver
from nxmesh.plugins.render_nginx import NginxRenderer
from nxmesh.testing.contracts import NginxDriverContract
from nxmesh.testing.factories import one_site_state
from nxmesh.testing.nginx import free_port, readable_root, refuse_signal
from nxmesh.testing.pki import Pki
from nxmesh.tls import serving_context

pytestmark = [pytest.mark.anyio, pytest.mark.nginx]


@pytest.fixture
async def stack(nginx_binary: str, tmp_path: Path, anyio_backend: str) -> AsyncIterator[NginxStack]:
    async with NginxStack(root=tmp_path / "nginx", nginx_binary=nginx_binary) as stack:
        yield stack


def _on_port(state: DesiredState, port: int) -> DesiredState:
    """`state` with every site listening on 127.0.0.1:`port` (tests must not bind :80)."""
    sites = tuple(
        attrs.evolve(site, listeners=(Listener(port=port, address="127.0.0.1"),))
        for site in state.sites
    )
    return attrs.evolve(state, sites=sites)


class TestReloadDriverContract(NginxDriverContract):
    @pytest.fixture
    def driver(self, stack: NginxStack) -> ReloadDriver:
        return stack.driver

    @pytest.fixture
    def bundle_for(self, stack: NginxStack) -> Callable[[DesiredState], Bundle]:
        return lambda state: stack.render(_on_port(state, stack.web_port))

    @pytest.fixture
    def fetch_body(self, stack: NginxStack) -> Callable[[str], Awaitable[str]]:
        async def fetch(host: str) -> str:
            return (await stack.fetch(host=host)).text.strip()

        return fetch

    async def test_nginx_reason_may_be_in_its_output_field(
        self,
        stack: NginxStack,
        bundle_for: Callable[[DesiredState], Bundle],
        fetch_body: Callable[[str], Awaitable[str]],
    ) -> None:
        """A driver saying "nginx -t failed" and leaving nginx's words to
        ``nginx_output`` (the field for them) meets the contract's rejection test."""

        class Terse:
            def __init__(self, real: ReloadDriver) -> None:
                self.real = real

            async def apply(self, update: PendingApply, bundle: Bundle) -> ApplyReport:
                report = await self.real.apply(update, bundle)
                if report.outcome != "failed":
                    return report
                output = report.nginx_output or report.message
                return attrs.evolve(report, message="nginx -t failed", nginx_output=output)

            async def live_digest(self) -> str | None:
                return await self.real.live_digest()

        await self.test_a_bundle_nginx_rejects_leaves_the_old_one_serving(
            Terse(stack.driver),  # type: ignore[arg-type]
            bundle_for,
            fetch_body,
        )


class TestRegistration:
    def test_registered_as_reload(self, plugin_manager: NxMeshPluginManager) -> None:
        """The plugin registers the driver under the name the settings default to."""
        registries = ProviderRegistries.collect(plugin_manager)
        assert registries["nginx_driver"].get("reload") is ReloadDriver


class TestApply:
    async def test_served_content_follows_each_apply(self, stack: NginxStack) -> None:
        """Each applied version is what nginx serves right after the report."""
        for body in ("first", "second", "third"):
            state = stack.state(body)
            report = await stack.driver.apply(stack.update(state), stack.render(state))
            assert report.outcome == "applied", report.message
            assert await stack.body() == body
        assert report.durations["total"] >= report.durations["confirm"] > 0

    async def test_a_new_worker_generation_serves_after_apply(self, stack: NginxStack) -> None:
        """A reload leaves the master in place and replaces every current worker."""
        from nxmesh.agent.process import worker_pids

        first = stack.state("a")
        await stack.driver.apply(stack.update(first), stack.render(first))
        master = await stack.master_pid()
        assert master is not None
        before = {p for p, current in worker_pids(master).items() if current}
        second = stack.state("b")
        await stack.driver.apply(stack.update(second), stack.render(second))
        after = {p for p, current in worker_pids(master).items() if current}
        assert await stack.master_pid() == master
        assert after
        assert not (after & before)

    async def test_live_tree_is_a_symlink_to_a_whole_release(self, stack: NginxStack) -> None:
        """``current`` points at ``releases/<digest>`` holding exactly the bundle."""
        state = stack.state("tree")
        bundle = stack.render(state)
        await stack.driver.apply(stack.update(state), bundle)
        link = stack.layout.conf_dir / "current"
        assert os.readlink(link) == f"releases/{bundle.digest}"
        assert read_tree(link) == dict(bundle.files)
        assert not (stack.layout.conf_dir / "apply.journal").exists()

    async def test_invalid_config_is_rejected_and_old_keeps_serving(
        self, stack: NginxStack
    ) -> None:
        """nginx -t failing reports nginx's own message and changes nothing live."""
        good = stack.state("good")
        await stack.driver.apply(stack.update(good), stack.render(good))
        live = await stack.driver.live_digest()
        bad = attrs.evolve(
            stack.state("bad"),
            upstreams=(
                Upstream(name="app", servers=(UpstreamServer(address="no-such-host.invalid:80"),)),
            ),
        )
        report = await stack.driver.apply(stack.update(bad), stack.render(bad))
        assert report.outcome == "failed"
        assert "nginx -t failed" in report.message
        assert "host not found" in report.nginx_output
        assert await stack.driver.live_digest() == live
        assert await stack.body() == "good"

    async def test_hand_broken_bundle_names_the_file_and_line(self, stack: NginxStack) -> None:
        """A bundle nginx cannot parse is refused with the bundle-relative location."""
        state = stack.state("x")
        files = dict(stack.render(state).files)
        files["conf.d/zz-broken.conf"] = b"server {\n    listen 127.0.0.1:1;\n    bogus on;\n}\n"
        report = await stack.driver.apply(stack.update(state), Bundle(files))
        assert report.outcome == "failed"
        assert 'unknown directive "bogus" in conf.d/zz-broken.conf:3' in report.message
        assert await stack.driver.live_digest() is None

    async def test_reload_refused_after_the_swap_rolls_back(self, stack: NginxStack) -> None:
        """A config that passes -t but cannot bind is rolled back; old content serves."""
        good = stack.state("before")
        await stack.driver.apply(stack.update(good), stack.render(good))
        live = await stack.driver.live_digest()
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            extra = Site(
                name="clash",
                server_names=("clash.test",),
                listeners=(Listener(port=port, address="127.0.0.1"),),
                locations=stack.state("x").sites[0].locations,
            )
            state = attrs.evolve(stack.state("after"), sites=(*stack.state("after").sites, extra))
            report = await stack.driver.apply(stack.update(state), stack.render(state))
        assert report.outcome == "rolled_back", report.message
        assert "Address already in use" in report.message
        assert "bind()" in report.nginx_output
        # nginx logs each of its five bind() attempts; the report says it once.
        binds = [line for line in report.nginx_output.splitlines() if "failed (98" in line]
        assert len(binds) == 1, report.nginx_output
        assert binds[0].endswith("(logged 5 times)")
        assert await stack.driver.live_digest() == live
        assert await stack.body() == "before"
        assert stack.events.kinds()[-2:] == ["reload.failed", "apply.rolled_back"]
        # Once the port is free again the same driver applies normally.
        await _apply(stack, state)
        assert await stack.body() == "after"

    async def test_a_refused_reload_signal_rolls_back_and_says_why(
        self, stack: NginxStack, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """os.kill refused (nginx of another user): the apply is reported rolled back
        with the OS error, ``current`` is the old tree again and no journal is left."""
        good = stack.state("before")
        await stack.driver.apply(stack.update(good), stack.render(good))
        live = await stack.driver.live_digest()
        pid = await stack.master_pid()
        assert live is not None
        assert pid is not None
        refuse_signal(monkeypatch, pid)
        state = stack.state("after")
        report = await stack.driver.apply(stack.update(state), stack.render(state))
        assert report.outcome == "rolled_back", report.message
        assert f"cannot send 'reload' (SIGHUP) to nginx pid {pid}" in report.message
        assert "Operation not permitted" in report.message
        assert f"rolled back to config {live[:12]}" in report.message
        assert await stack.driver.live_digest() == live
        assert not (stack.layout.conf_dir / "apply.journal").exists()
        assert [p.name for p in (stack.layout.conf_dir / "releases").iterdir()] == [live]
        assert await stack.body() == "before"
        assert stack.events.kinds()[-2:] == ["reload.failed", "apply.rolled_back"]
        monkeypatch.undo()  # signals allowed again: the same update applies
        await _apply(stack, state)
        assert await stack.body() == "after"

    async def test_a_cold_start_with_a_missing_binary_reports_it(self, stack: NginxStack) -> None:
        """nginx cannot be started (binary gone): a report naming the binary, not a crash."""
        missing = str(stack.root / "gone" / "nginx")
        stack.mode.nginx_binary = missing
        state = stack.state("cold")
        report = await stack.driver.apply(stack.update(state), stack.render(state))
        assert report.outcome in ("failed", "rolled_back"), report.message
        assert f"cannot start nginx {missing}" in report.message
        assert await stack.driver.live_digest() is None
        assert not (stack.layout.conf_dir / "apply.journal").exists()

    async def test_cold_start_launches_nginx(self, stack: NginxStack) -> None:
        """Applying with no nginx running starts it on the new tree."""
        assert await stack.master_pid() is None
        state = stack.state("cold")
        await _apply(stack, state)
        assert await stack.master_pid() is not None
        assert await stack.body() == "cold"

    async def test_forced_apply_replaces_a_tampered_live_tree(self, stack: NginxStack) -> None:
        """force re-stages a fresh release when the live one was edited in place."""
        state = stack.state("pristine")
        bundle = stack.render(state)
        await stack.driver.apply(stack.update(state), bundle)
        site = stack.layout.conf_dir / "current" / "conf.d" / "site-site0.conf"
        site.write_text(site.read_text().replace("pristine", "tampered"))
        report = await stack.driver.apply(stack.update(state), bundle, force=True)
        assert report.outcome == "applied", report.message
        assert os.readlink(stack.layout.conf_dir / "current") == f"releases/{bundle.digest}.1"
        assert bundle_digest(dict(await stack.driver.live_files() or {})) == bundle.digest
        assert await stack.driver.live_digest() == bundle.digest

    async def test_unforced_apply_of_tampered_live_digest_is_not_a_noop(
        self, stack: NginxStack
    ) -> None:
        """The no-op shortcut checks the tree's content, not only its name."""
        state = stack.state("same")
        bundle = stack.render(state)
        await stack.driver.apply(stack.update(state), bundle)
        (stack.layout.conf_dir / "current" / "conf.d" / "extra.conf").write_text("# drift\n")
        report = await stack.driver.apply(stack.update(state), bundle)
        assert report.outcome == "applied"

    async def test_old_releases_are_pruned(self, nginx_binary: str, tmp_path: Path) -> None:
        """At most keep_releases trees stay on disk, the live one always among them."""
        settings = DriverSettings(error_log_window=0.01, keep_releases=2)
        async with NginxStack(tmp_path, nginx_binary, driver_settings=settings) as stack:
            for i in range(5):
                state = stack.state(f"v{i}")
                await stack.driver.apply(stack.update(state), stack.render(state))
            releases = [p.name for p in (tmp_path / "releases").iterdir()]
            assert len(releases) == 2
            assert await stack.driver.live_digest() in releases

    async def test_a_large_bundle_is_written_whole(self, stack: NginxStack) -> None:
        """A bundle big enough to be written by several threads goes live byte for byte."""
        state = stack.state("many", sites=300)
        bundle = stack.render(state)
        report = await stack.driver.apply(stack.update(state), bundle)
        assert report.outcome == "applied", report.message
        assert read_tree(stack.layout.conf_dir / "current") == dict(bundle.files)
        assert (await stack.fetch(host="site299.test")).text.strip() == "many 299"

    async def test_going_back_to_an_older_version_reuses_its_release(
        self, stack: NginxStack
    ) -> None:
        """Re-applying an earlier bundle flips back to its intact release, no rewrite."""
        first, second = stack.state("one"), stack.state("two")
        first_bundle = stack.render(first)
        await stack.driver.apply(stack.update(first), first_bundle)
        await stack.driver.apply(stack.update(second), stack.render(second))
        report = await stack.driver.apply(stack.update(first), first_bundle)
        assert report.outcome == "applied", report.message
        assert "stage" not in report.durations
        assert os.readlink(stack.layout.conf_dir / "current") == f"releases/{first_bundle.digest}"
        assert await stack.body() == "one"

    async def test_restarting_a_stopped_nginx_on_the_live_tree(self, stack: NginxStack) -> None:
        """With nginx down, applying the live bundle starts nginx on the same release."""
        state = stack.state("again")
        bundle = stack.render(state)
        await stack.driver.apply(stack.update(state), bundle)
        await stack.mode.aclose()
        assert await stack.master_pid() is None
        report = await stack.driver.apply(stack.update(state), bundle)
        assert report.outcome == "applied", report.message
        assert os.readlink(stack.layout.conf_dir / "current") == f"releases/{bundle.digest}"
        assert await stack.body() == "again"

    async def test_workers_dying_after_a_passing_test_are_rolled_back(
        self, stack: NginxStack
    ) -> None:
        """nginx -t accepts a working_directory that is missing; the new workers then die
        at start. The driver notices, restores the old tree and generation: still serving."""
        good = stack.state("steady")
        await stack.driver.apply(stack.update(good), stack.render(good))
        state = stack.state("doomed")
        files = dict(stack.render(state).files)
        files["nginx.conf"] = files["nginx.conf"].replace(
            b"worker_processes", b"working_directory /nonexistent-nxmesh-dir;\nworker_processes", 1
        )
        report = await stack.driver.apply(stack.update(state), Bundle(files))
        assert report.outcome == "rolled_back", report.message
        assert "chdir" in report.message
        import anyio

        await anyio.sleep(0.3)  # past nginx's 100 ms hand-over to the (dead) new generation
        assert await stack.body() == "steady"
        master = await stack.master_pid()
        assert master is not None
        from nxmesh.agent.process import worker_pids

        assert any(worker_pids(master).values())  # a current generation is serving


BOOTSTRAP_CONF = """\
worker_processes 1;
pid logs/nginx.pid;
error_log logs/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path tmp/client_body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;
    server {{
        listen 127.0.0.1:{port} default_server;
        return 200 "bootstrap\\n";
    }}
}}
"""


def test_only_key_files_are_kept_from_the_workers(tmp_path: Path) -> None:
    """Key files are the master's (0600); every other file the workers read (0644), an
    error page that quotes a PEM key header included."""
    from nxmesh.plugins.nginx_driver.releases import ReleaseStore

    key = b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEI\n-----END PRIVATE KEY-----\n"
    bundle = Bundle(
        {
            "nginx.conf": b"events {}\n",
            "certs/web.key": key,
            "certs/acme/web.key": key,
            "error-pages/web/0.html": b"<p>Never paste -----BEGIN PRIVATE KEY----- here</p>",
            "error-pages/web/1.html": b"-----BEGIN PRIVATE KEY----- is never shown",
        }
    )
    _, staging = ReleaseStore(tmp_path).write(bundle, durable=False)
    modes = {path: (staging / path).stat().st_mode & 0o777 for path in bundle.files}
    assert modes == {
        "nginx.conf": 0o644,
        "certs/web.key": 0o600,
        "certs/acme/web.key": 0o600,
        "error-pages/web/0.html": 0o644,
        "error-pages/web/1.html": 0o644,
    }


class TestFirstApplyOverAForeignTree:
    """A sidecar's nginx runs a bootstrap release its entrypoint seeded (``current ->
    releases/bootstrap``, no release of the agent's): a first apply that fails after the
    swap goes back to that tree and reloads nginx onto it, never to "no configuration"."""

    @pytest.fixture
    async def sidecar(self, stack: NginxStack) -> ReloadDriver:
        """nginx started by "its own container" on a bootstrap tree; a docker-sidecar
        driver beside it (signals only, through the pid file)."""
        root = stack.layout.conf_dir
        bootstrap = root / "releases" / "bootstrap"
        bootstrap.mkdir(parents=True)
        (bootstrap / "nginx.conf").write_text(BOOTSTRAP_CONF.format(port=stack.web_port))
        os.symlink("releases/bootstrap", root / "current")
        stack.layout.ensure_runtime_dirs()
        await anyio.run_process(
            [stack.nginx_binary, "-p", f"{root}/", "-c", str(root / "current" / "nginx.conf")]
        )
        mode = DockerSidecarMode(stack.layout)
        driver = ReloadDriver(
            mode,
            stack.layout,
            nginx_binary=stack.nginx_binary,
            settings=stack.driver_settings,
            events=stack.events,
        )
        with anyio.fail_after(10):
            while await mode.nginx_pid() is None:
                await anyio.sleep(0.02)
        assert await stack.body() == "bootstrap"
        return driver

    @staticmethod
    def _doomed(stack: NginxStack) -> tuple[DesiredState, Bundle]:
        """A bundle ``nginx -t`` accepts whose workers die at start (missing chdir)."""
        state = stack.state("doomed")
        files = dict(stack.render(state).files)
        files["nginx.conf"] = files["nginx.conf"].replace(
            b"worker_processes", b"working_directory /nonexistent-nxmesh-dir;\nworker_processes", 1
        )
        return state, Bundle(files)

    async def test_a_failed_first_apply_restores_the_bootstrap_tree(
        self, stack: NginxStack, sidecar: ReloadDriver
    ) -> None:
        """``current`` leads to the bootstrap tree again, nginx was reloaded onto it and
        serves it, the refused release is gone and the report names what serves."""
        root = stack.layout.conf_dir
        state, bundle = self._doomed(stack)
        report = await sidecar.apply(stack.update(state), bundle)
        assert report.outcome == "rolled_back", report.message
        assert "rolled back to releases/bootstrap" in report.message
        assert "no configuration" not in report.message
        assert os.readlink(root / "current") == "releases/bootstrap"
        assert sorted(p.name for p in (root / "releases").iterdir()) == ["bootstrap"]
        assert not (root / "apply.journal").exists()
        assert not list(root.glob(".current.tmp-*"))
        assert await stack.body() == "bootstrap"
        master = await sidecar.mode.nginx_pid()
        assert master is not None
        assert any(worker_pids(master).values())  # a current generation serves it
        # The next (good) first apply replaces the bootstrap tree as usual.
        good = stack.state("first")
        report = await sidecar.apply(stack.update(good), stack.render(good))
        assert report.outcome == "applied", report.message
        assert await stack.body() == "first"

    async def test_recovery_of_a_crashed_first_apply_restores_the_bootstrap_tree(
        self, stack: NginxStack, sidecar: ReloadDriver
    ) -> None:
        """A crash after the swap of a first apply (journal left, nginx on the new tree):
        `recover` points ``current`` at the bootstrap tree again and reloads nginx."""
        store = sidecar.store
        state = stack.state("unconfirmed")
        bundle = stack.render(state)
        name, staging = store.write(bundle)
        store.commit(staging, name)
        store.write_journal(
            {
                "previous": None,
                "next": name,
                "ts": time.time(),
                "previous_target": "releases/bootstrap",
            }
        )
        store.point_to(name)
        await sidecar.mode.signal_nginx("reload")
        with anyio.fail_after(10):
            while await stack.body() != "unconfirmed":
                await anyio.sleep(0.05)
        what = await sidecar.recover()
        assert what is not None
        assert "current is releases/bootstrap (not written by the agent) again" in what
        assert os.readlink(stack.layout.conf_dir / "current") == "releases/bootstrap"
        assert not (stack.layout.conf_dir / "apply.journal").exists()
        assert await stack.body() == "bootstrap"


@pytest.fixture
def www() -> Iterator[Path]:
    """A document root nginx's workers can read, where the model accepts one (`/srv`)."""
    files = {
        "index.html": "home",
        ".env": "SECRET=1",
        ".git/config": "[core]",
        "app/.htpasswd": "admin:x",
        ".well-known/security.txt": "contact",
        "sub/.well-known/x.txt": "nested",
        "a.b/file.txt": "dotted directory",
    }
    with readable_root(files) as root:
        yield root


def _files(
    port: int, *locations: Location, upstreams: tuple[Upstream, ...] = (), **fields: Any
) -> DesiredState:
    """One site, "files", answering localhost on 127.0.0.1:`port`: `locations`, `fields`;
    and `upstreams`."""
    listener = Listener(port=port, address="127.0.0.1")
    site = Site(
        name="files",
        server_names=("localhost",),
        listeners=(listener,),
        locations=locations,
        **fields,
    )
    return DesiredState(sites=(site,), upstreams=upstreams)


def _static_state(
    port: int, root: Path, *, serve_dotfiles: bool = False, path: str = "/", match: str = "prefix"
) -> DesiredState:
    location = Location(path=path, match=match, root=str(root), serve_dotfiles=serve_dotfiles)  # type: ignore[arg-type]
    return _files(port, location)


class TestStaticFiles:
    @pytest.mark.parametrize(
        ("path", "match"), [("/", "prefix"), ("^/", "regex"), ("^/", "regex_ci")]
    )
    async def test_hidden_files_are_not_served(
        self, stack: NginxStack, www: Path, path: str, match: str
    ) -> None:
        """A root location answers 404 for dotfiles and dot-directories at any depth,
        however the URI spells the dot; `/.well-known/` and dots inside names are served."""
        state = _static_state(stack.web_port, www, path=path, match=match)
        await _apply(stack, state)
        hidden_paths = (
            "/.env",
            "/.git/config",
            "/app/.htpasswd",
            "/%2egit/config",
            "/x/../.env",
            "/sub/.well-known/x.txt",  # only the root's /.well-known/ is public
        )
        for hidden in hidden_paths:
            assert (await stack.fetch(hidden)).status == 404, hidden
        served = {
            "/index.html": "home",
            "/.well-known/security.txt": "contact",
            "/a.b/file.txt": "dotted directory",
        }
        for shown, text in served.items():
            response = await stack.fetch(shown)
            assert (response.status, response.text) == (200, text), shown

    async def test_serve_dotfiles_serves_them(self, stack: NginxStack, www: Path) -> None:
        """``serve_dotfiles: true`` turns the rule off for its location."""
        state = _static_state(stack.web_port, www, serve_dotfiles=True)
        await _apply(stack, state)
        response = await stack.fetch("/.env")
        assert (response.status, response.text) == (200, "SECRET=1")

    async def test_fallback_answers_what_no_file_matches(
        self, stack: NginxStack, www: Path
    ) -> None:
        """``fallback``: a path with no file behind it gets the fallback URI (a single-page
        app's routes get its index.html); files are still served, dotfiles still hidden."""
        state = _files(stack.web_port, Location(path="/", root=str(www), fallback="/index.html"))
        await _apply(stack, state)
        for route in ("/dashboard", "/users/42/edit", "/index.html"):
            response = await stack.fetch(route)
            assert (response.status, response.text) == (200, "home"), route
        response = await stack.fetch("/a.b/file.txt")
        assert (response.status, response.text) == (200, "dotted directory")
        assert (await stack.fetch("/.env")).status == 404


class TestMatchingOrder:
    @pytest.mark.parametrize(("match", "status"), [("prefix", 200), ("prefix_priority", 403)])
    async def test_prefix_priority_keeps_regex_locations_out(
        self, stack: NginxStack, www: Path, match: str, status: int
    ) -> None:
        """A regex location wins over a plain prefix (nginx's order): only a
        ``prefix_priority`` location (``^~``) keeps its paths from it."""
        (www / "private").mkdir(mode=0o755)
        (www / "private" / "x.txt").write_text("secret")
        state = _files(
            stack.web_port,
            Location(path=r"\.txt$", match="regex", root=str(www)),
            Location(path="/private/", match=match, return_=Return(code=403, body="no")),  # type: ignore[arg-type]
        )
        await _apply(stack, state)
        assert (await stack.fetch("/private/x.txt")).status == status
        assert (await stack.fetch("/private/other")).status == 403

    async def test_a_regex_with_repetition_counts_matches_as_pcre_reads_it(
        self, stack: NginxStack
    ) -> None:
        """``{3}`` and ``{2,}`` reach nginx inside the quoted regex and count."""
        site = Site(
            name="counts",
            server_names=("localhost",),
            listeners=(Listener(port=stack.web_port, address="127.0.0.1"),),
            locations=(
                Location(path="/", return_=Return(code=200, body="other")),
                Location(path=r"^/img/\d{3}\.png$", match="regex", return_=Return(200, "img")),
                Location(path=r"^/z{2,}$", match="regex", return_=Return(200, "zz")),
            ),
        )
        state = DesiredState(sites=(site,))
        await _apply(stack, state)
        expected = {
            "/img/123.png": "img",
            "/img/12.png": "other",
            "/img/1234.png": "other",
            "/zzz": "zz",
            "/z": "other",
        }
        for path, body in expected.items():
            assert (await stack.fetch(path)).text == body, path


async def _status(port: int, path: str, **headers: str) -> int:
    """The status nginx on 127.0.0.1:`port` answers a GET with `headers` (underscores
    in the names become dashes)."""
    extra = "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in headers.items())
    request = f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra}Connection: close\r\n\r\n"
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(request.encode())
        head = await stream.receive()
    return int(head.split(b" ", 2)[1])


async def _apply(stack: NginxStack, state: DesiredState) -> None:
    """Apply `state` through the stack's driver; it must be applied."""
    report = await stack.driver.apply(stack.update(state), stack.render(state))
    assert report.outcome == "applied", report.message


def _upstream(
    heads: list[bytes], body: bytes = b"ok", status: bytes = b"200 OK"
) -> Callable[[Any], Awaitable[None]]:
    """A one-request HTTP upstream: records each request head in `heads`, answers
    `status` with `body`. A connection nginx drops (a certificate it refused) is let go."""

    async def serve(stream: anyio.abc.ByteStream) -> None:
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
            async with stream:
                head = b""
                while b"\r\n\r\n" not in head:
                    head += await stream.receive()
                heads.append(head)
                answer = b"HTTP/1.1 %s\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body)
                await stream.send(answer)

    return serve


def _app_before(upstream_port: int, name: str, listener: Listener, **fields: Any) -> DesiredState:
    """Site "app" (`name`, `listener`, `fields`) proxying everything to the upstream on
    loopback `upstream_port`, behind a balancer on 127.0.0.1 (``real_ip_from``)."""
    site = Site(
        name="app",
        server_names=(name,),
        listeners=(listener,),
        locations=(Location(path="/", upstream="app"),),
        real_ip_from=("127.0.0.1",),
        **fields,
    )
    upstream = Upstream("app", (UpstreamServer(f"127.0.0.1:{upstream_port}"),))
    return DesiredState(sites=(site,), upstreams=(upstream,))


def _sent_headers(head: bytes) -> dict[str, str]:
    """The header fields of a recorded request head."""
    lines = head.decode().split("\r\n")[1:]
    return dict(line.split(": ", 1) for line in lines if ": " in line)


@pytest.fixture
def srv_root() -> Iterator[Path]:
    """A directory nginx's workers can reach (pytest's tmp dirs are private)."""
    with readable_root() as root:
        yield root


@pytest.fixture
async def readable_stack(
    nginx_binary: str, srv_root: Path, anyio_backend: str
) -> AsyncIterator[NginxStack]:
    """A stack whose tree the workers can read: they open htpasswd files per request,
    as they would under /etc/nginx."""
    async with NginxStack(root=srv_root / "nginx", nginx_binary=nginx_binary) as stack:
        yield stack


@pytest.fixture(scope="module")
def hashes() -> tuple[str, str]:
    """SHA-512 crypt and Apache MD5 hashes of "s3cret", made as the docs say to."""
    made = [
        subprocess.run(
            ["openssl", "passwd", kind, "s3cret"], capture_output=True, text=True, check=True
        ).stdout.strip()
        for kind in ("-6", "-apr1")
    ]
    return made[0], made[1]


class TestClientAddresses:
    def _state(self, stack: NginxStack, www: Path, **site: Any) -> DesiredState:
        admin = site.pop("admin_allow", ())
        return _files(
            stack.web_port,
            Location(path="/", root=str(www)),
            Location(path="/a.b/", root=str(www), allow=admin),
            Location(path="/healthz", return_=Return(code=200, body="ok")),
            **site,
        )

    async def test_allow_admits_only_its_addresses(self, stack: NginxStack, www: Path) -> None:
        """A site's ``allow`` answers 403 to other clients; a location's own list replaces
        the site's there; return locations answer before nginx checks addresses."""
        port = stack.web_port
        await _apply(stack, self._state(stack, www, allow=("10.0.0.0/8",)))
        assert await _status(port, "/index.html") == 403
        assert await _status(port, "/healthz") == 200  # documented: returns answer all
        await _apply(
            stack, self._state(stack, www, allow=("10.0.0.0/8",), admin_allow=("127.0.0.1",))
        )
        assert await _status(port, "/index.html") == 403
        assert await _status(port, "/a.b/file.txt") == 200
        await _apply(stack, self._state(stack, www, allow=("::1", "127.0.0.0/8")))
        assert await _status(port, "/index.html") == 200

    async def test_basic_auth_asks_for_a_listed_user(
        self, readable_stack: NginxStack, www: Path, hashes: tuple[str, str]
    ) -> None:
        """``basic_auth`` answers 401 with its realm, then admits a listed user with the
        right password (hashes from ``openssl passwd``, as the docs suggest); a
        location's own users replace the site's there; return locations answer all."""
        sha512, apr1 = hashes
        site_auth = BasicAuth(
            realm="Team area",
            users=(
                BasicAuthUser(name="alice", password_hash=sha512),
                BasicAuthUser(name="bob", password_hash=apr1),
            ),
        )
        admin_auth = BasicAuth(users=(BasicAuthUser(name="root", password_hash=sha512),))
        state = _files(
            readable_stack.web_port,
            Location(path="/", root=str(www)),
            Location(path="/a.b/", root=str(www), basic_auth=admin_auth),
            Location(path="/healthz", return_=Return(code=200, body="ok")),
            basic_auth=site_auth,
        )
        await _apply(readable_stack, state)
        port = readable_stack.web_port

        def basic(user: str, password: str) -> str:
            return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base, headers={"Host": "localhost"}) as client:
            asked = await client.get("/index.html")
            assert asked.status_code == 401
            assert asked.headers["www-authenticate"] == 'Basic realm="Team area"'
            for user in ("alice", "bob"):
                ok = await client.get(
                    "/index.html", headers={"Authorization": basic(user, "s3cret")}
                )
                assert (ok.status_code, ok.text) == (200, "home"), user
            wrong = await client.get("/index.html", headers={"Authorization": basic("alice", "x")})
            assert wrong.status_code == 401
            admin = "/a.b/file.txt"
            assert (
                await client.get(admin, headers={"Authorization": basic("alice", "s3cret")})
            ).status_code == 401
            assert (
                await client.get(admin, headers={"Authorization": basic("root", "s3cret")})
            ).status_code == 200
            assert (await client.get("/healthz")).status_code == 200

    @pytest.mark.parametrize(
        ("allow", "satisfy", "without_password"),
        [("127.0.0.1", "any", 200), ("127.0.0.1", "all", 401), ("10.0.0.0/8", "any", 401)],
    )
    async def test_satisfy_any_lets_listed_addresses_skip_the_password(
        self,
        readable_stack: NginxStack,
        www: Path,
        hashes: tuple[str, str],
        allow: str,
        satisfy: str,
        without_password: int,
    ) -> None:
        """With allow and basic_auth, ``satisfy: any`` admits a listed address without
        a password and asks the others for one; ``all`` (nginx's default) asks both."""
        auth = BasicAuth(users=(BasicAuthUser(name="alice", password_hash=hashes[0]),))
        state = _files(
            readable_stack.web_port,
            Location(path="/", root=str(www)),
            allow=(allow,),
            basic_auth=auth,
            satisfy=satisfy,
        )
        await _apply(readable_stack, state)
        assert await _status(readable_stack.web_port, "/index.html") == without_password
        login = "Basic " + base64.b64encode(b"alice:s3cret").decode()
        with_password = await _status(readable_stack.web_port, "/index.html", Authorization=login)
        assert with_password == (403 if satisfy == "all" and allow != "127.0.0.1" else 200)

    async def test_a_location_with_its_own_allow_keeps_it_under_satisfy_any(
        self, readable_stack: NginxStack, www: Path, hashes: tuple[str, str]
    ) -> None:
        """The site lets a password in instead of its addresses (``satisfy: any``); a
        location listing other addresses admits those only, password or not."""
        auth = BasicAuth(users=(BasicAuthUser(name="alice", password_hash=hashes[0]),))
        state = _files(
            readable_stack.web_port,
            Location(path="/", root=str(www)),
            Location(path="/a.b/", root=str(www), allow=("10.9.9.9",)),
            allow=("192.0.2.0/24",),
            basic_auth=auth,
            satisfy="any",
        )
        await _apply(readable_stack, state)
        login = "Basic " + base64.b64encode(b"alice:s3cret").decode()
        port = readable_stack.web_port
        assert await _status(port, "/index.html", Authorization=login) == 200
        assert await _status(port, "/a.b/file.txt", Authorization=login) == 403

    @pytest.mark.parametrize("gzip", [True, False])
    async def test_gzip_compresses_text_of_a_kilobyte_and_more(
        self, stack: NginxStack, www: Path, gzip: bool
    ) -> None:
        """``gzip: true``: a 4 KB text file goes compressed to a client that accepts it,
        with Vary; a small one goes as is. Off (the default), nothing is compressed."""
        (www / "big.txt").write_text("nxmesh " * 600)
        state = _files(
            stack.web_port,
            Location(path="/", root=str(www)),
            gzip=gzip,
        )
        await _apply(stack, state)
        base = f"http://127.0.0.1:{stack.web_port}"
        headers = {"Host": "localhost", "Accept-Encoding": "gzip"}
        async with httpx.AsyncClient(base_url=base, headers=headers) as client:
            big = await client.get("/big.txt")
            small = await client.get("/index.html")
        assert big.text == "nxmesh " * 600  # httpx inflates it
        assert big.headers.get("content-encoding") == ("gzip" if gzip else None)
        assert ("accept-encoding" in big.headers.get("vary", "").lower()) is gzip
        assert small.headers.get("content-encoding") is None

    async def test_rate_limit_answers_429_beyond_rate_and_burst(
        self, stack: NginxStack, www: Path
    ) -> None:
        """``rate_limit`` per client address: the burst is served at once, the next
        request gets 429; a location's own limit replaces the site's there."""
        state = _files(
            stack.web_port,
            Location(path="/", root=str(www)),
            Location(path="/a.b/", root=str(www), rate_limit=RateLimit(rate=1, per="minute")),
            rate_limit=RateLimit(rate=1, per="minute", burst=2),
        )
        await _apply(stack, state)
        port = stack.web_port
        # One a minute plus a burst of two: three at once, then refused.
        assert [await _status(port, "/index.html") for _ in range(4)] == [200, 200, 200, 429]
        # Its own zone, no burst: the first passes although the site's is spent.
        assert [await _status(port, "/a.b/file.txt") for _ in range(2)] == [200, 429]

    async def test_rate_limit_counts_an_ipv6_client_by_its_64(
        self, stack: NginxStack, www: Path
    ) -> None:
        """An IPv6 client is counted by its /64 (whoever has IPv6 holds a whole /64, a
        fresh address for every request), IPv4 and IPv4-mapped clients one address at a
        time. The addresses come through ``real_ip_from``, as from a balancer."""
        state = _files(
            stack.web_port,
            Location(path="/", root=str(www)),
            rate_limit=RateLimit(rate=1, per="minute"),
            real_ip_from=("127.0.0.1",),
            real_ip_header="X-Forwarded-For",
        )
        await _apply(stack, state)
        clients = {
            "2001:db8:1:2::1": 200,
            "2001:db8:1:2:ffff:ffff:ffff:ffff": 429,  # the same /64
            "2001:db8:1:3::1": 200,  # the next one
            "192.0.2.1": 200,
            "192.0.2.2": 200,
            "::1": 200,  # ::/64, which IPv4-mapped addresses lie in, and do not share
            "::ffff:192.0.2.3": 200,
            "::ffff:192.0.2.4": 200,
        }
        answers = {}
        for client in clients:
            answers[client] = await _status(stack.web_port, "/index.html", X_Forwarded_For=client)
        assert answers == clients
        assert await _status(stack.web_port, "/index.html", X_Forwarded_For="192.0.2.1") == 429
        again = await _status(stack.web_port, "/index.html", X_Forwarded_For="::ffff:192.0.2.4")
        assert again == 429

    async def test_rate_zones_of_sites_and_locations_never_clash(
        self, stack: NginxStack, www: Path
    ) -> None:
        """Site "a" location 1 and a site named "a_1" each get their own zone (nginx
        refuses a zone declared twice with another rate), and a site named "tls" does
        not take nginx.conf's TLS session cache zone."""

        def site(name: str, port: int, limited: Location) -> Site:
            return Site(
                name=name,
                server_names=(f"{name.replace('_', '-')}.test",),
                listeners=(Listener(port=port, address="127.0.0.1"),),
                locations=(Location(path="/", root=str(www)), limited),
                rate_limit=RateLimit(rate=7),
            )

        limited = Location(path="/x/", root=str(www), rate_limit=RateLimit(rate=3))
        state = DesiredState(
            sites=(
                site("a", stack.web_port, limited),
                site("a_1", stack.web_port, Location(path="/y/", root=str(www))),
                site("tls", stack.web_port, Location(path="/z/", root=str(www))),
            )
        )
        await _apply(stack, state)

    @pytest.mark.parametrize("header", ["X-Forwarded-For", "X-Real-IP"])
    async def test_real_ip_from_believes_only_the_listed_proxies(
        self, stack: NginxStack, www: Path, header: str
    ) -> None:
        """Behind a trusted proxy, ``allow`` judges the client the proxy names; without
        ``real_ip_from`` a client cannot get in by sending the header itself."""
        port = stack.web_port
        office = {header.replace("-", "_"): "192.0.2.7"}
        elsewhere = {header.replace("-", "_"): "198.51.100.1"}
        await _apply(stack, self._state(stack, www, allow=("192.0.2.0/24",)))
        assert await _status(port, "/index.html", **office) == 403  # spoofing refused
        await _apply(
            stack,
            self._state(
                stack,
                www,
                allow=("192.0.2.0/24",),
                real_ip_from=("127.0.0.1",),
                real_ip_header=header,
            ),
        )
        assert await _status(port, "/index.html", **office) == 200
        assert await _status(port, "/index.html", **elsewhere) == 403
        assert await _status(port, "/index.html") == 403  # the proxy itself is not admitted
        if header == "X-Forwarded-For":  # recursive: the last address no proxy added
            chain = {"X_Forwarded_For": "198.51.100.1, 192.0.2.7"}
            assert await _status(port, "/index.html", **chain) == 200
        lines = (stack.root / "logs" / "access.log").read_text().splitlines()
        # The log shows the client, and the proxy that named it.
        assert any(
            line.startswith("192.0.2.7 ") and line.endswith(" peer=127.0.0.1") for line in lines
        ), lines

    async def test_upstreams_get_the_chain_and_the_balancer(self, stack: NginxStack) -> None:
        """Behind a trusted balancer, the upstream sees X-Real-IP = the client and
        X-Forwarded-For = the chain as received plus the balancer's address (not the
        client twice, which $proxy_add_x_forwarded_for gives after realip)."""
        seen: list[bytes] = []
        async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
            port = listener.extra(anyio.abc.SocketAttribute.local_port)
            state = _app_before(
                port, "localhost", Listener(port=stack.web_port, address="127.0.0.1")
            )
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, _upstream(seen))
                await _apply(stack, state)
                status = await _status(stack.web_port, "/", X_Forwarded_For="203.0.113.9")
                tg.cancel_scope.cancel()
        assert status == 200
        headers = _sent_headers(seen[0])
        assert headers["X-Real-IP"] == "203.0.113.9"
        assert headers["X-Forwarded-For"] == "203.0.113.9, 127.0.0.1"

    async def test_behind_a_load_balancer_speaking_proxy_protocol(self, stack: NginxStack) -> None:
        """A listener with ``proxy_protocol`` and ``real_ip_header: proxy_protocol``: the
        client the balancer's PROXY line names is the one ``allow`` judges, the upstream
        gets and the log shows; a connection without the line gets nothing; an unknown
        name on the same socket is refused (its default server reads the line too)."""
        seen: list[bytes] = []
        web = stack.web_port
        async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
            port = listener.extra(anyio.abc.SocketAttribute.local_port)
            state = _app_before(
                port,
                "app.test",
                Listener(port=web, address="127.0.0.1", proxy_protocol=True),
                allow=("203.0.113.0/24",),
                real_ip_header="proxy_protocol",
            )

            async def ask(client: str | None, host: str = "app.test") -> bytes:
                line = f"PROXY TCP4 {client} 127.0.0.1 40000 {web}\r\n" if client else ""
                # A header of the client's own, which the TCP balancer passes through.
                forged = "X-Forwarded-For: 6.6.6.6\r\n"
                request = (
                    f"{line}GET / HTTP/1.1\r\nHost: {host}\r\n{forged}Connection: close\r\n\r\n"
                )
                answer = b""
                with anyio.fail_after(10):
                    async with await anyio.connect_tcp("127.0.0.1", web) as conn:
                        await conn.send(request.encode())
                        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                            while True:
                                answer += await conn.receive()
                return answer

            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, _upstream(seen))
                await _apply(stack, state)
                admitted = await ask("203.0.113.9")
                refused = await ask("198.51.100.1")
                bare = await ask(None)
                unknown = await ask("203.0.113.9", host="other.test")
                tg.cancel_scope.cancel()
        assert admitted.startswith(b"HTTP/1.1 200"), admitted
        assert refused.startswith(b"HTTP/1.1 403"), refused
        assert bare == b""  # nginx: "broken header", the connection closed
        assert unknown == b""  # 444 from the unknown-names server
        assert len(seen) == 1
        sent = _sent_headers(seen[0])
        assert sent["X-Real-IP"] == "203.0.113.9"
        # The hop nginx vouches for is the client the balancer named, last in the chain.
        assert sent["X-Forwarded-For"] == "6.6.6.6, 203.0.113.9"
        log = (stack.root / "logs" / "access.log").read_text()
        assert log.startswith("203.0.113.9 "), log  # the client, and the balancer it came by
        assert log.splitlines()[0].endswith(" peer=127.0.0.1"), log
        errors = (stack.root / "logs" / "error.log").read_text()
        assert "broken header" in errors


class TestProxyPaths:
    @pytest.mark.parametrize("strip", [True, False])
    async def test_strip_prefix_replaces_the_matched_prefix(
        self, stack: NginxStack, strip: bool
    ) -> None:
        """``strip_prefix``: ``/api/users?x=1`` goes upstream as ``/users?x=1`` (an exact
        location's path as ``/``); without it the path goes as received."""
        heads: list[bytes] = []
        async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
            port = listener.extra(anyio.abc.SocketAttribute.local_port)
            state = _files(
                stack.web_port,
                Location(path="/api/", upstream="app", strip_prefix=strip),
                Location(path="/v1", match="exact", upstream="app", strip_prefix=strip),
                upstreams=(Upstream("app", (UpstreamServer(f"127.0.0.1:{port}"),)),),
            )
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, _upstream(heads))
                await _apply(stack, state)
                for path in ("/api/users?x=1", "/api/", "/v1"):
                    assert (await stack.fetch(path)).status == 200, path
                tg.cancel_scope.cancel()
        seen = [head.split(b"\r\n", 1)[0].decode() for head in heads]
        prefixes = [_sent_headers(head).get("X-Forwarded-Prefix") for head in heads]
        if strip:
            assert seen == ["GET /users?x=1 HTTP/1.1", "GET / HTTP/1.1", "GET / HTTP/1.1"]
            assert prefixes == ["/api", "/api", "/v1"]  # for the application's links
        else:
            assert seen == ["GET /api/users?x=1 HTTP/1.1", "GET /api/ HTTP/1.1", "GET /v1 HTTP/1.1"]
            assert prefixes == [None, None, None]

    async def test_a_clients_claims_never_reach_the_upstream(self, stack: NginxStack) -> None:
        """Headers frameworks trust for the scheme (X-Forwarded-Ssl: Rails' ``ssl?``),
        the client's address (Client-IP) or the URL (X-Original-URL, an access-rule
        bypass in some frameworks) are dropped; other headers pass."""
        heads: list[bytes] = []
        claims = {
            "X-Forwarded-Ssl": "on",
            "Front-End-Https": "on",
            "Client-IP": "203.0.113.9",
            "True-Client-IP": "203.0.113.9",
            "X-Original-URL": "/admin",
            "X-Forwarded-Prefix": "/evil",
            "X-Custom": "kept",
        }
        async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
            port = listener.extra(anyio.abc.SocketAttribute.local_port)
            state = _files(
                stack.web_port,
                Location(path="/", upstream="app"),
                upstreams=(Upstream("app", (UpstreamServer(f"127.0.0.1:{port}"),)),),
            )
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, _upstream(heads))
                await _apply(stack, state)
                url = f"http://127.0.0.1:{stack.web_port}/"
                async with httpx.AsyncClient() as client:
                    response = await client.get(url, headers={"Host": "localhost", **claims})
                assert response.status_code == 200
                tg.cancel_scope.cancel()
        sent = _sent_headers(heads[0])
        assert {name: sent.get(name) for name in claims} == {
            **dict.fromkeys(claims),
            "X-Custom": "kept",
        }


def _closed_port() -> int:
    """A loopback port nothing listens on: nginx's connection to it is refused (502)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


NOT_FOUND_PAGE = "<h1>Nothing here</h1>\r\n"
DOWN_PAGE = "<p>Back soon — entretien en cours</p>\n"


class TestErrorPages:
    def _state(self, port: int, www: Path, upstream_port: int, **site: Any) -> DesiredState:
        return _files(
            port,
            Location(path="/", root=str(www)),
            Location(path="/app/", upstream="app"),
            Location(path="/gone", return_=Return(code=410)),
            Location(path="/a.b/", root=str(www), rate_limit=RateLimit(rate=1, per="minute")),
            Location(path="/upload", root=str(www), client_max_body_size="1k"),
            upstreams=(Upstream("app", (UpstreamServer(f"127.0.0.1:{upstream_port}"),)),),
            error_pages=(
                ErrorPage(codes=(404, 410), body=NOT_FOUND_PAGE),
                ErrorPage(codes=(502, 503, 504), body=DOWN_PAGE),
                ErrorPage(codes=(413, 429), body="<p>Slow down</p>"),
            ),
            **site,
        )

    async def test_nginx_errors_get_the_sites_pages(
        self, readable_stack: NginxStack, www: Path
    ) -> None:
        """A missing file, a ``return 410``, an unreachable upstream, a rate limit and
        a body too large answer with the site's pages, as UTF-8 HTML, keeping their
        status codes; files are untouched; the pages' own URIs are not served to
        clients."""
        stack = readable_stack
        await _apply(stack, self._state(stack.web_port, www, _closed_port()))
        base = f"http://127.0.0.1:{stack.web_port}"
        async with httpx.AsyncClient(base_url=base, headers={"Host": "localhost"}) as client:
            home = await client.get("/index.html")
            assert (home.status_code, home.text) == (200, "home")
            for path, status, page in [
                ("/missing.html", 404, NOT_FOUND_PAGE),
                ("/gone", 410, NOT_FOUND_PAGE),
                ("/app/users", 502, DOWN_PAGE),
                # The 502 page's URI asked for directly: not found, so the 404 page.
                ("/.nxmesh-errors/1.html", 404, NOT_FOUND_PAGE),
                ("/a.b/file.txt", 200, "dotted directory"),
                ("/a.b/file.txt", 429, "<p>Slow down</p>"),  # one a minute
            ]:
                response = await client.get(path)
                assert (response.status_code, response.text) == (status, page), path
                if status != 200:
                    assert response.headers["content-type"] == "text/html; charset=utf-8"
            large = await client.post("/upload", content=b"x" * 4096)
            assert (large.status_code, large.text) == (413, "<p>Slow down</p>")
            head = await client.head("/app/users")
            assert (head.status_code, head.content) == (502, b"")

    @pytest.mark.parametrize("intercept", [False, True])
    async def test_upstream_errors_pass_through_unless_intercepted(
        self, readable_stack: NginxStack, www: Path, intercept: bool
    ) -> None:
        """An upstream's own 503 (an API's JSON error) reaches the client as sent; with
        ``intercept_upstream_errors`` the site's page replaces it, status kept."""
        stack = readable_stack
        heads: list[bytes] = []
        body = b'{"error": "maintenance"}'
        async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
            port = listener.extra(anyio.abc.SocketAttribute.local_port)
            state = self._state(stack.web_port, www, port, intercept_upstream_errors=intercept)
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, _upstream(heads, body, b"503 Service Unavailable"))
                await _apply(stack, state)
                response = await stack.fetch("/app/status")
                tg.cancel_scope.cancel()
        assert heads  # the upstream answered
        assert response.status == 503
        assert response.text == (DOWN_PAGE if intercept else body.decode())

    async def test_pages_carry_the_headers_of_the_location_that_failed(
        self, readable_stack: NginxStack, www: Path
    ) -> None:
        """An error page carries the ``always`` headers of the location whose request
        failed (a CSP on /api/), as nginx's own page would, and the site's."""
        stack = readable_stack
        frame = Header(name="X-Frame-Options", value="DENY", always=True)
        csp = Header(name="Content-Security-Policy", value="default-src 'none'", always=True)
        state = _files(
            stack.web_port,
            Location(path="/", root=str(www)),
            Location(path="/api/", upstream="app", headers=(csp,)),
            Location(path="/docs/", root=str(www), headers=(csp,)),
            upstreams=(Upstream("app", (UpstreamServer(f"127.0.0.1:{_closed_port()}"),)),),
            headers=(frame,),
            error_pages=(
                ErrorPage(codes=(404,), body=NOT_FOUND_PAGE),
                ErrorPage(codes=(502,), body=DOWN_PAGE),
            ),
        )
        await _apply(stack, state)
        base = f"http://127.0.0.1:{stack.web_port}"
        async with httpx.AsyncClient(base_url=base, headers={"Host": "localhost"}) as client:
            for path, status, page, own in [
                ("/api/users", 502, DOWN_PAGE, True),
                ("/docs/missing", 404, NOT_FOUND_PAGE, True),
                ("/missing", 404, NOT_FOUND_PAGE, False),
            ]:
                response = await client.get(path)
                assert (response.status_code, response.text) == (status, page), path
                assert response.headers["x-frame-options"] == "DENY", path
                assert response.headers.get("content-security-policy") == (
                    "default-src 'none'" if own else None
                ), path

    async def test_the_sites_rate_limit_counts_no_error_page(
        self, readable_stack: NginxStack, www: Path
    ) -> None:
        """nginx answers ``return``, hidden files and oversized bodies before it counts
        requests; fetching their pages does not count either (the site's limit is on its
        locations, not the server the page location inherits from). Then one request
        a minute is let through, the next gets the 429 page."""
        stack = readable_stack
        state = _files(
            stack.web_port,
            Location(path="/", root=str(www), client_max_body_size="1k"),
            Location(path="/gone", return_=Return(code=410)),
            rate_limit=RateLimit(rate=1, per="minute"),
            error_pages=(
                ErrorPage(codes=(404, 410, 413), body="<p>Not here</p>"),
                ErrorPage(codes=(429,), body="<p>Slow down</p>"),
            ),
        )
        await _apply(stack, state)
        base = f"http://127.0.0.1:{stack.web_port}"
        async with httpx.AsyncClient(base_url=base, headers={"Host": "localhost"}) as client:
            answers = [
                (await client.get("/gone")).status_code,
                (await client.get("/gone")).status_code,
                (await client.get("/.env")).status_code,
                (await client.post("/index.html", content=b"x" * 4096)).status_code,
            ]
            assert answers == [410, 410, 404, 413]
            assert (await client.get("/index.html")).text == "home"
            limited = await client.get("/index.html")
            assert (limited.status_code, limited.text) == (429, "<p>Slow down</p>")

    async def test_refused_clients_get_the_page_and_still_the_password_prompt(
        self, readable_stack: NginxStack, www: Path, hashes: tuple[str, str]
    ) -> None:
        """The page of a 401 keeps ``WWW-Authenticate`` (browsers still ask for the
        password), and a client the site's ``allow`` refuses gets the 403 page."""
        stack = readable_stack
        pages = (ErrorPage(codes=(401,), body="<p>Log in</p>"), ErrorPage(codes=(403,), body="no"))
        auth = BasicAuth(realm="Team", users=(BasicAuthUser(name="a", password_hash=hashes[0]),))
        state = _files(
            stack.web_port,
            Location(path="/", root=str(www)),
            Location(path="/a.b/", root=str(www), allow=("10.0.0.0/8",)),
            basic_auth=auth,
            error_pages=pages,
        )
        await _apply(stack, state)
        base = f"http://127.0.0.1:{stack.web_port}"
        async with httpx.AsyncClient(base_url=base, headers={"Host": "localhost"}) as client:
            asked = await client.get("/index.html")
            assert (asked.status_code, asked.text) == (401, "<p>Log in</p>")
            assert asked.headers["www-authenticate"] == 'Basic realm="Team"'
            login = {"Authorization": "Basic " + base64.b64encode(b"a:s3cret").decode()}
            refused = await client.get("/a.b/file.txt", headers=login)
            assert (refused.status_code, refused.text) == (403, "no")
            assert (await client.get("/index.html", headers=login)).text == "home"


class _CountingUpstream:
    """An HTTP upstream that numbers what it serves: the body of its n-th answer is
    ``<n> <Host>``, so a test tells a kept answer from a fresh one. ``/private`` answers
    with ``Cache-Control: private``, ``/login`` with a ``Set-Cookie``."""

    def __init__(self) -> None:
        self.served = 0
        self.heads: list[bytes] = []

    async def __call__(self, stream: anyio.abc.ByteStream) -> None:
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
            async with stream:
                head = b""
                while b"\r\n\r\n" not in head:
                    head += await stream.receive()
                self.served += 1
                self.heads.append(head)
                path = head.split(b" ", 2)[1]
                host = _sent_headers(head)["Host"]
                body = f"{self.served} {host}".encode()
                extra = {
                    b"/private": b"Cache-Control: private\r\n",
                    b"/login": b"Set-Cookie: session=1\r\n",
                }.get(path, b"")
                await stream.send(
                    b"HTTP/1.1 200 OK\r\n%sContent-Length: %d\r\n\r\n%s" % (extra, len(body), body)
                )


@contextlib.asynccontextmanager
async def _counting_upstream() -> AsyncIterator[tuple[_CountingUpstream, int]]:
    """A `_CountingUpstream` on a loopback port, and the port."""
    upstream = _CountingUpstream()
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, upstream)
        yield upstream, listener.extra(anyio.abc.SocketAttribute.local_port)
        tg.cancel_scope.cancel()


class TestProxyCache:
    def _state(self, web_port: int, upstream_port: int, cache: ProxyCache) -> DesiredState:
        """Two sites on one socket proxying to one upstream, both caching."""
        listener = Listener(port=web_port, address="127.0.0.1")
        sites = tuple(
            Site(
                name=name.split(".")[0],
                server_names=(name,),
                listeners=(listener,),
                locations=(Location(path="/", upstream="app", cache=cache),),
            )
            for name in ("localhost", "other.test")
        )
        backend = UpstreamServer(f"127.0.0.1:{upstream_port}")
        return DesiredState(sites=sites, upstreams=(Upstream("app", (backend,)),))

    async def test_answers_are_kept_per_host_and_uri(self, readable_stack: NginxStack) -> None:
        """A second GET of a URI is answered from the cache, per site: two sites proxying
        one upstream never get each other's answers; other URIs go upstream. (The stack's
        tree is one nginx's workers can enter, as /etc/nginx is: they write the cache.)"""
        stack = readable_stack
        async with _counting_upstream() as (upstream, port):
            await _apply(stack, self._state(stack.web_port, port, ProxyCache(valid=60)))
            bodies = [
                (await stack.fetch(path, host=host)).text
                for path, host in [
                    ("/a", "localhost"),
                    ("/a", "localhost"),
                    ("/a", "other.test"),
                    ("/a", "other.test"),
                    ("/b", "localhost"),
                ]
            ]
        assert bodies == [
            "1 localhost",
            "1 localhost",
            "2 other.test",
            "2 other.test",
            "3 localhost",
        ]
        assert upstream.served == 3

    @pytest.mark.parametrize("with_cookies", [False, True])
    async def test_personal_requests_and_answers_are_not_shared(
        self, readable_stack: NginxStack, with_cookies: bool
    ) -> None:
        """Requests with Authorization always go upstream, and so do those with cookies
        unless ``with_cookies``; their answers are not kept for others. Answers marked
        ``private`` or setting a cookie are never kept."""
        stack = readable_stack
        cache = ProxyCache(valid=60, with_cookies=with_cookies)
        base = "http://127.0.0.1:{}"
        async with _counting_upstream() as (upstream, port):
            await _apply(stack, self._state(stack.web_port, port, cache))
            url = base.format(stack.web_port)
            async with httpx.AsyncClient(base_url=url, headers={"Host": "localhost"}) as client:

                async def get(path: str, **headers: str) -> str:
                    response = await client.get(path, headers=headers)
                    assert response.status_code == 200
                    return response.text

                authorized = [await get("/me", Authorization="Bearer x") for _ in range(2)]
                assert authorized == ["1 localhost", "2 localhost"]
                assert await get("/me") == "3 localhost"  # nothing kept from the above
                cookie = [await get("/page", Cookie="session=abc") for _ in range(2)]
                if with_cookies:
                    assert cookie == ["4 localhost", "4 localhost"]
                else:
                    assert cookie == ["4 localhost", "5 localhost"]
                    assert await get("/page") == "6 localhost"
                served = upstream.served
                for path in ("/private", "/login"):
                    assert [await get(path), await get(path)] == [
                        f"{served + 1} localhost",
                        f"{served + 2} localhost",
                    ], path
                    served += 2

    async def test_what_the_key_ignores_never_reaches_the_upstream(
        self, readable_stack: NginxStack
    ) -> None:
        """A client's forwarding and override headers would make the kept answer one the
        client chose (links to its host, its method): nginx sends its own forwarding
        headers and drops the overrides."""
        stack = readable_stack
        spoofed = {
            "X-Forwarded-Host": "evil.example",
            "X-Forwarded-Port": "8443",
            "Forwarded": "host=evil.example",
            "X-Original-URL": "/admin",
            "X-HTTP-Method-Override": "DELETE",
        }
        async with _counting_upstream() as (upstream, port):
            await _apply(stack, self._state(stack.web_port, port, ProxyCache(valid=60)))
            url = f"http://127.0.0.1:{stack.web_port}/login"
            async with httpx.AsyncClient() as client:
                await client.get(url, headers={"Host": "localhost", **spoofed})
        sent = _sent_headers(upstream.heads[0])
        assert sent["X-Forwarded-Host"] == "localhost"
        assert sent["X-Forwarded-Port"] == str(stack.web_port)
        assert not {"Forwarded", "X-Original-URL", "X-HTTP-Method-Override"} & set(sent)

    async def test_one_name_on_two_sockets_is_two_caches(self, readable_stack: NginxStack) -> None:
        """Two sites may serve one name on different ports (a public and an internal
        one): each location has its own keys, so the public site never gets the internal
        one's answers (for another upstream path, other headers)."""
        stack = readable_stack
        internal_port = free_port()
        async with _counting_upstream() as (upstream, port):
            public = self._state(stack.web_port, port, ProxyCache(valid=60)).sites[0]
            internal = Site(
                name="internal",
                server_names=("localhost",),
                listeners=(Listener(port=internal_port, address="127.0.0.1"),),
                locations=(
                    Location(
                        path="/api/", upstream="app", strip_prefix=True, cache=ProxyCache(valid=60)
                    ),
                ),
            )
            backend = UpstreamServer(f"127.0.0.1:{port}")
            state = DesiredState(sites=(public, internal), upstreams=(Upstream("app", (backend,)),))
            await _apply(stack, state)
            inside = await http_get(
                "127.0.0.1", internal_port, "/api/users", host_header="localhost"
            )
            outside = await stack.fetch("/api/users")
        assert (inside.text, outside.text) == ("1 localhost", "2 localhost")
        paths = [head.split(b" ", 2)[1] for head in upstream.heads]
        assert paths == [b"/users", b"/api/users"]

    async def test_an_edit_never_hands_a_locations_answers_to_another(
        self, readable_stack: NginxStack
    ) -> None:
        """Answers kept for an internal location (its own clients, its own headers
        upstream) are not served once it is removed and ``/`` takes its paths, nor once
        the site's settings change: the key digests the site with that location."""
        stack = readable_stack
        cache = ProxyCache(valid=60)
        role = Header(name="X-Role", value="admin")
        internal = Location(
            path="/internal/",
            upstream="app",
            allow=("127.0.0.1",),
            proxy_headers=(role,),
            cache=cache,
        )
        public = Location(path="/", upstream="app", cache=cache)
        async with _counting_upstream() as (upstream, port):
            base = self._state(stack.web_port, port, cache)
            site = base.sites[0]
            await _apply(
                stack, attrs.evolve(base, sites=(attrs.evolve(site, locations=(internal, public)),))
            )
            assert (await stack.fetch("/internal/x")).text == "1 localhost"
            assert (await stack.fetch("/internal/x")).text == "1 localhost"  # kept
            await _apply(
                stack, attrs.evolve(base, sites=(attrs.evolve(site, locations=(public,)),))
            )
            assert (await stack.fetch("/internal/x")).text == "2 localhost"
            assert (await stack.fetch("/internal/x")).text == "2 localhost"
            gzipped = attrs.evolve(site, locations=(public,), gzip=True)
            await _apply(stack, attrs.evolve(base, sites=(gzipped,)))
            assert (await stack.fetch("/internal/x")).text == "3 localhost"
        assert "X-Role" not in _sent_headers(upstream.heads[1])

    async def test_websocket_upgrades_are_not_answered_from_the_cache(
        self, readable_stack: NginxStack
    ) -> None:
        """A cached page is no handshake: a request to upgrade goes to the upstream."""
        stack = readable_stack
        async with _counting_upstream() as (upstream, port):
            state = self._state(stack.web_port, port, ProxyCache(valid=60))
            site = state.sites[0]
            ws = Location(path="/", upstream="app", websocket=True, cache=ProxyCache(valid=60))
            state = attrs.evolve(state, sites=(attrs.evolve(site, locations=(ws,)),))
            await _apply(stack, state)
            assert (await stack.fetch("/graphql")).text == "1 localhost"
            upgrade = {"Host": "localhost", "Upgrade": "websocket", "Connection": "Upgrade"}
            url = f"http://127.0.0.1:{stack.web_port}/graphql"
            async with httpx.AsyncClient() as client:
                assert (await client.get(url, headers=upgrade)).text == "2 localhost"
            assert (await stack.fetch("/graphql")).text == "1 localhost"
        assert upstream.served == 2

    async def test_a_new_worker_user_gets_a_cache_of_its_own(
        self, readable_stack: NginxStack
    ) -> None:
        """nginx makes the cache's directories 0700 for the workers' user; after the user
        changes, the new workers could neither read nor prune the old ones (500 for
        every URI kept before): each user has its own cache directory."""
        stack = readable_stack
        async with _counting_upstream() as (_, port):
            state = self._state(stack.web_port, port, ProxyCache(valid=60))
            await _apply(stack, state)
            assert (await stack.fetch("/a")).text == "1 localhost"
            as_www = NginxRenderer(settings=attrs.evolve(stack.render_settings, user="www-data"))
            report = await stack.driver.apply(stack.update(state), as_www.render(state))
            assert report.outcome == "applied", report.message
            response = await stack.fetch("/a")
        assert (response.status, response.text) == (200, "2 localhost")
        assert (stack.root / "tmp" / "cache-www-data").is_dir()

    @pytest.mark.parametrize("serve_stale", [True, False])
    async def test_the_last_answer_is_served_while_the_upstream_is_down(
        self, readable_stack: NginxStack, serve_stale: bool
    ) -> None:
        """With ``serve_stale`` (the default) an expired answer is served when the
        upstream cannot be reached; without, the client gets 502. The access log's
        ``cache=`` field says which: MISS, HIT, then STALE."""
        stack = readable_stack
        cache = ProxyCache(valid=1, serve_stale=serve_stale)
        async with _counting_upstream() as (_, port):
            await _apply(stack, self._state(stack.web_port, port, cache))
            assert [(await stack.fetch("/a")).text for _ in range(2)] == ["1 localhost"] * 2
        # nginx counts validity in whole seconds: 1 s from 10.9 lasts until 12.0.
        await anyio.sleep(2.2)  # expired, and the upstream's port is closed
        response = await stack.fetch("/a")
        log = (stack.root / "logs" / "access.log").read_text().splitlines()
        statuses = [line.split(" cache=", 1)[1].split()[0] for line in log if "GET /a " in line]
        if serve_stale:
            assert (response.status, response.text) == (200, "1 localhost")
            assert statuses == ["MISS", "HIT", "STALE"]
        else:
            assert response.status == 502
            assert statuses == ["MISS", "HIT", "EXPIRED"]


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()


class TestStreaming:
    @pytest.mark.parametrize("buffered", [False, True])
    async def test_request_buffering_off_streams_the_body_upstream(
        self, stack: NginxStack, buffered: bool
    ) -> None:
        """``proxy_request_buffering: false``: the upstream gets the first part of an
        upload while the client is still sending it. Buffered (the default), nginx reads
        the whole body before it connects, so the upstream sees it only once complete."""
        first_part = anyio.Event()

        async def upload(stream: anyio.abc.ByteStream) -> None:
            async with stream:
                received = b""
                while b"second" not in received:  # buffered, it comes with a length
                    received += await stream.receive()
                    if b"first" in received:
                        first_part.set()
                await stream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

        async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
            port = listener.extra(anyio.abc.SocketAttribute.local_port)
            location = Location(path="/upload", upstream="app", proxy_request_buffering=buffered)
            state = _files(
                stack.web_port,
                location,
                upstreams=(Upstream("app", (UpstreamServer(f"127.0.0.1:{port}"),)),),
            )
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, upload)
                await _apply(stack, state)
                async with await anyio.connect_tcp("127.0.0.1", stack.web_port) as client:
                    await client.send(
                        b"POST /upload HTTP/1.1\r\nHost: localhost\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n"
                    )
                    # Waiting for the upstream to have the first part proves streaming;
                    # buffered, it cannot have it yet, so the wait is skipped.
                    if not buffered:
                        with anyio.fail_after(10):  # a bound: buffered, it never came
                            await first_part.wait()
                    streamed_early = first_part.is_set()
                    await client.send(b"6\r\nsecond\r\n0\r\n\r\n")
                    answer = b""
                    with anyio.fail_after(10):
                        while b"\r\n\r\nok" not in answer:
                            answer += await client.receive()
                tg.cancel_scope.cancel()
        assert answer.startswith(b"HTTP/1.1 200")
        assert streamed_early is not buffered


class TestTlsUpstreams:
    @pytest.mark.parametrize(
        ("tls", "status"),
        [
            pytest.param({"server_name": "api.internal", "ca": "root"}, 200, id="own-ca"),
            pytest.param({"server_name": "other.internal", "ca": "root"}, 502, id="wrong-name"),
            pytest.param({"server_name": "api.internal"}, 502, id="not-in-trust-store"),
            pytest.param({"verify": False}, 200, id="no-verify"),
            pytest.param(
                {"server_name": "api.internal", "ca": "root", "host": "client"},
                200,
                id="client-host",
            ),
        ],
    )
    async def test_nginx_speaks_tls_to_the_servers_and_checks_them(
        self, stack: NginxStack, tmp_path: Path, pki: Pki, tls: dict[str, Any], status: int
    ) -> None:
        """``tls`` on an upstream: nginx connects over TLS, sends the server name as SNI
        and accepts the chain (leaf + two intermediates) only when it leads to the CA the
        upstream trusts (the host's trust store without one) and carries the name."""
        # Two intermediates, as a public CA's cross-signed chain has: more than nginx's
        # default proxy_ssl_verify_depth accepts.
        second = pki.ca("Second Intermediate", pki.intermediate)
        leaf = pki.leaf("api.internal", issuer=second)
        (tmp_path / "chain.pem").write_text(leaf.pem + second.pem + pki.intermediate.pem)
        (tmp_path / "key.pem").write_text(leaf.key_pem)
        context = serving_context(tmp_path / "chain.pem", tmp_path / "key.pem")
        names: list[str | None] = []
        context.sni_callback = lambda _sock, name, _ctx: names.append(name)  # type: ignore[assignment,misc,unused-ignore]
        heads: list[bytes] = []

        if tls.get("ca") == "root":
            tls["ca"] = pki.root.pem
        async with await anyio.create_tcp_listener(local_host="127.0.0.1") as tcp:
            port = tcp.extra(anyio.abc.SocketAttribute.local_port)
            listener = TLSListener(tcp, context, standard_compatible=False)
            backend = UpstreamServer(f"127.0.0.1:{port}")
            state = _files(
                stack.web_port,
                Location(path="/", upstream="app"),
                upstreams=(Upstream("app", (backend,), tls=UpstreamTLS(**tls)),),
            )
            bundle = stack.render(state)
            assert (bundle.files.get("upstream-ca/app.pem") is not None) is ("ca" in tls)
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, _upstream(heads, b"tls"))
                report = await stack.driver.apply(stack.update(state), bundle)
                assert report.outcome == "applied", report.message
                response = await stack.fetch("/")
                tg.cancel_scope.cancel()
        assert response.status == status
        if status == 200:
            assert response.text == "tls"
            # A name-based HTTPS server picks its site by Host: the name the SNI carries.
            sent = _sent_headers(heads[0])
            named = "server_name" in tls and tls.get("host") != "client"
            assert sent["Host"] == (tls["server_name"] if named else "localhost")
            assert sent["X-Forwarded-Host"] == "localhost"  # always nginx's, never the client's
        assert names  # nginx connected over TLS
        assert set(names) == {tls.get("server_name")}


async def _apply_with_certificate(
    stack: NginxStack, pki: Pki, state: DesiredState, name: str
) -> None:
    """Apply `state`, whose certificate ``c`` is served as a leaf of `pki` for `name`."""
    server = pki.leaf(name)
    files = {"certs/c.crt": server.pem.encode(), "certs/c.key": server.key_pem.encode()}
    report = await stack.driver.apply(
        stack.update(state), stack.renderer.render(state, extra_files=files)
    )
    assert report.outcome == "applied", report.message


def _client_chain(tmp_path: Path, name: str, issuer: Pki) -> tuple[Path, Any]:
    """A client certificate of `issuer` for `name`: its chain file, and the leaf."""
    leaf = issuer.leaf(f"{name}.clients.test")
    path = tmp_path / f"{name}.pem"
    path.write_text(leaf.pem + issuer.intermediate.pem + leaf.key_pem)
    return path, leaf


class TestHttpsRedirect:
    async def test_plain_http_is_sent_to_https_keeping_the_method(
        self, stack: NginxStack, pki: Pki
    ) -> None:
        """A TLS site's plain listener answers 308 with the HTTPS URL (port and query
        kept): a client repeats its POST and body there, where a 301 turns it into a GET."""
        tls_port = free_port()
        site = Site(
            name="a",
            server_names=("localhost",),
            listeners=(
                Listener(port=stack.web_port, address="127.0.0.1"),
                Listener(port=tls_port, address="127.0.0.1", tls=True),
            ),
            tls=TLSConfig(certificate="c"),
            locations=(Location(path="/", return_=Return(code=200, body="secure")),),
        )
        state = DesiredState(sites=(site,), certificates=(CertificateRef("c", ("localhost",)),))
        await _apply_with_certificate(stack, pki, state, "localhost")
        async with httpx.AsyncClient() as client:
            plain = f"http://127.0.0.1:{stack.web_port}/orders?id=7"
            answer = await client.post(plain, content=b"qty=2", headers={"Host": "localhost"})
            assert answer.status_code == 308
            assert answer.headers["Location"] == f"https://localhost:{tls_port}/orders?id=7"

    async def test_behind_a_port_mapping_redirects_name_what_clients_reach(
        self, stack: NginxStack, pki: Pki, www: Path
    ) -> None:
        """nginx on two free ports that a mapping publishes as 80 and 443 (`public_port`):
        the HTTPS redirect names no port, nginx's own directory redirect over TLS is
        relative, and an upstream is told port 443 (X-Forwarded-Port), so none of them
        sends clients to a port only the container has."""

        heads: list[bytes] = []
        async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
            upstream_port = listener.extra(anyio.abc.SocketAttribute.local_port)
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, _upstream(heads))
                await self._mapped(stack, pki, www, upstream_port)
                tg.cancel_scope.cancel()
        assert [_sent_headers(head)["X-Forwarded-Port"] for head in heads] == ["443"]

    async def _mapped(self, stack: NginxStack, pki: Pki, www: Path, upstream_port: int) -> None:
        import ssl

        tls_port = free_port()
        site = Site(
            name="a",
            server_names=("localhost",),
            listeners=(
                Listener(port=stack.web_port, address="127.0.0.1", public_port=80),
                Listener(
                    port=tls_port,
                    address="127.0.0.1",
                    tls=True,
                    public_port=443,
                    default_server=True,
                ),
            ),
            tls=TLSConfig(certificate="c"),
            locations=(
                Location(path="/", root=str(www)),
                Location(path="/app/", upstream="app"),
            ),
        )
        state = DesiredState(
            sites=(site,),
            certificates=(CertificateRef("c", ("localhost",)),),
            upstreams=(Upstream("app", (UpstreamServer(f"127.0.0.1:{upstream_port}"),)),),
        )
        await _apply_with_certificate(stack, pki, state, "localhost")
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        async with httpx.AsyncClient(verify=context) as client:
            plain = f"http://127.0.0.1:{stack.web_port}/orders?id=7"
            answer = await client.get(plain, headers={"Host": "localhost"})
            assert answer.status_code == 308
            assert answer.headers["Location"] == "https://localhost/orders?id=7"
            secure = f"https://127.0.0.1:{tls_port}/a.b"
            answer = await client.get(secure, headers={"Host": "localhost"})
            assert answer.status_code == 301
            assert answer.headers["Location"] == "/a.b/"
            app = await client.get(
                f"https://127.0.0.1:{tls_port}/app/", headers={"Host": "localhost"}
            )
            assert app.status_code == 200


async def test_nginx_t_warnings_reach_the_apply_report(stack: NginxStack) -> None:
    """nginx -t passes with a warning (2,560 server names overflow its default hash
    size): the apply goes through, and its report says what nginx warned of, once."""
    sites = tuple(
        Site(
            name=f"s{s}",
            server_names=tuple(f"host-{s}-{n}.example.test" for n in range(64)),
            listeners=(Listener(port=stack.web_port, address="127.0.0.1"),),
            locations=(Location(path="/", return_=Return(code=200, body="ok")),),
        )
        for s in range(40)
    )
    state = DesiredState(sites=sites)
    report = await stack.driver.apply(stack.update(state), stack.render(state))
    assert report.outcome == "applied", report.message
    assert report.message.count("could not build optimal server_names_hash") == 1
    assert "; nginx -t warned: could not build optimal server_names_hash" in report.message


async def test_long_server_names_are_served(stack: NginxStack) -> None:
    """Names past nginx's default hash bucket (47 characters and more; a wildcard one too)
    are served: nginx.conf gives the bucket size they need, where nginx's default would
    refuse to start. A short name on the same socket still reaches its own site."""
    exact = "grafana.monitoring.prod-eu-west-1.cluster.example.com"  # 53 characters
    wildcard = "*." + "a" * 60 + "." + "b" * 20 + ".example.com"

    def site(name: str, names: tuple[str, ...], body: str) -> Site:
        return Site(
            name=name,
            server_names=names,
            listeners=(Listener(port=stack.web_port, address="127.0.0.1"),),
            locations=(Location(path="/", return_=Return(code=200, body=body)),),
        )

    state = DesiredState(
        sites=(site("long", (exact, wildcard), "long"), site("short", ("localhost",), "short"))
    )
    await _apply(stack, state)
    for host, body in ((exact, "long"), ("x." + wildcard[2:], "long"), ("localhost", "short")):
        response = await stack.fetch("/", host=host)
        assert (response.status, response.text) == (200, body), host


class TestClientCertificates:
    """A TLS site that checks client certificates against a client CA of its own (the
    server's PKI issues none), behind which an upstream records what nginx tells it."""

    async def _get(self, stack: NginxStack, chain: Path | None) -> httpx.Response:
        """GET the site over TLS with a client chain file (None: no certificate), and a
        forged X-Client-Verify nginx must replace."""
        import ssl

        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        if chain is not None:
            context.load_cert_chain(chain)
        url = f"https://127.0.0.1:{stack.web_port}/"
        async with httpx.AsyncClient(verify=context) as client:
            return await client.get(url, headers={"Host": "a.test", "X-Client-Verify": "SUCCESS"})

    async def _apply(
        self,
        stack: NginxStack,
        pki: Pki,
        tls: TLSConfig,
        upstream_port: int,
        cache: ProxyCache | None = None,
    ) -> None:
        listener = Listener(port=stack.web_port, address="127.0.0.1", tls=True, default_server=True)
        site = Site(
            name="a",
            server_names=("a.test",),
            listeners=(listener,),
            tls=tls,
            locations=(Location(path="/", upstream="app", cache=cache),),
        )
        state = DesiredState(
            sites=(site,),
            certificates=(CertificateRef("c", ("a.test",)),),
            upstreams=(Upstream("app", (UpstreamServer(f"127.0.0.1:{upstream_port}"),)),),
        )
        await _apply_with_certificate(stack, pki, state, "a.test")

    async def _statuses(
        self, stack: NginxStack, pki: Pki, tls: TLSConfig, chains: list[Path | None]
    ) -> tuple[list[int], list[dict[str, str]]]:
        """Serve the site with `tls` before a recording upstream, GET it with each chain:
        the statuses, and the headers the upstream got."""
        heads: list[bytes] = []
        async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
            port = listener.extra(anyio.abc.SocketAttribute.local_port)
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, _upstream(heads))
                await self._apply(stack, pki, tls, port)
                statuses = [(await self._get(stack, chain)).status_code for chain in chains]
                tg.cancel_scope.cancel()
        return statuses, [_sent_headers(head) for head in heads]

    @pytest.mark.parametrize("verify", ["required", "optional"])
    async def test_only_the_cas_clients_get_in(
        self, stack: NginxStack, pki: Pki, tmp_path: Path, verify: str
    ) -> None:
        """``client_ca``: a client with a certificate from the site's CA gets through, and
        the upstream learns SUCCESS and its subject; one from another CA is refused (400),
        and one without a certificate too, unless ``client_verify: optional``, where the
        upstream learns NONE."""
        clients = Pki()
        alice, _ = _client_chain(tmp_path, "alice", clients)
        mallory, _ = _client_chain(tmp_path, "mallory", Pki())
        tls = TLSConfig(
            certificate="c",
            redirect_http=False,
            client_ca=clients.root.pem,
            client_verify=verify,  # type: ignore[arg-type]
        )
        statuses, sent = await self._statuses(stack, pki, tls, [alice, mallory, None])
        assert sent[0]["X-Client-Verify"] == "SUCCESS"
        assert sent[0]["X-Client-DN"] == "CN=alice.clients.test"
        if verify == "required":
            assert statuses == [200, 400, 400]
            assert len(sent) == 1
        else:
            assert statuses == [200, 400, 200]
            assert [s["X-Client-Verify"] for s in sent] == ["SUCCESS", "NONE"]

    async def test_cached_answers_are_kept_per_client_certificate(
        self, readable_stack: NginxStack, pki: Pki, tmp_path: Path
    ) -> None:
        """A caching location of a site checking client certificates keeps each
        certificate's answers apart: one partner never gets another's."""
        stack = readable_stack
        clients = Pki()
        alice, _ = _client_chain(tmp_path, "alice", clients)
        carol, _ = _client_chain(tmp_path, "carol", clients)
        tls = TLSConfig(certificate="c", redirect_http=False, client_ca=clients.root.pem)
        async with _counting_upstream() as (upstream, port):
            await self._apply(stack, pki, tls, port, cache=ProxyCache(valid=60))
            bodies = [(await self._get(stack, c)).text for c in (alice, carol, alice, carol)]
        assert bodies == ["1 a.test", "2 a.test", "1 a.test", "2 a.test"]
        assert upstream.served == 2

    async def test_a_revoked_certificate_is_refused(
        self, stack: NginxStack, pki: Pki, tmp_path: Path
    ) -> None:
        """``client_crl``: a certificate its CA revoked is refused (400) while the others
        of that CA still get in. nginx checks every level of a chain once it has a CRL,
        so the root's CRL (of the intermediate) goes with the intermediate's."""
        clients = Pki()
        alice, alice_leaf = _client_chain(tmp_path, "alice", clients)
        bob, _ = _client_chain(tmp_path, "bob", clients)
        crl = clients.crl(clients.root) + clients.crl(clients.intermediate, alice_leaf)
        tls = TLSConfig(
            certificate="c", redirect_http=False, client_ca=clients.root.pem, client_crl=crl
        )
        statuses, sent = await self._statuses(stack, pki, tls, [alice, bob])
        assert statuses == [400, 200]
        assert sent[0]["X-Client-DN"] == "CN=bob.clients.test"


class TestClientCertificatesOnASharedSocket:
    """Three TLS sites on one socket: `a` and `b` check client certificates against CAs
    of their own, `open` checks none; `a` is the socket's default server, or none is
    (the unknown-names server is)."""

    @pytest.mark.parametrize("a_default", [True, False])
    async def test_each_site_lets_in_only_its_own_clients(
        self, stack: NginxStack, pki: Pki, tmp_path: Path, a_default: bool
    ) -> None:
        """A handshake naming no server, or one no site serves, is the default server's:
        with `a` as the default, checked against a's CAs, so b answers it 421 rather than
        take a's client for one of its own; with none, refused. With its name, in any
        case, b checks its own CAs. No session is resumed on the socket (nginx 1.22
        would resume a's for b, with a's check). `open` never passes a client's own
        claim of a certificate to the upstream."""
        import ssl

        ca_a, ca_b = Pki(), Pki()
        alice = _client_chain(tmp_path, "alice", ca_a)[0]
        bob = _client_chain(tmp_path, "bob", ca_b)[0]
        port = stack.web_port

        def site(name: str, ca: Pki | None, default: bool = False) -> Site:
            listener = Listener(port=port, address="127.0.0.1", tls=True, default_server=default)
            tls = TLSConfig(
                certificate="c", redirect_http=False, client_ca=ca.root.pem if ca else None
            )
            return Site(
                name=name,
                server_names=(f"{name}.test",),
                listeners=(listener,),
                tls=tls,
                locations=(Location(path="/", upstream="app"),),
            )

        heads: list[bytes] = []
        server = pki.leaf("a.test", "b.test", "open.test")
        files = {"certs/c.crt": server.pem.encode(), "certs/c.key": server.key_pem.encode()}

        sessions: dict[str, ssl.SSLSession | None] = {}
        contexts: dict[Path, ssl.SSLContext] = {}
        resumed: list[bool] = []

        async def get(host: str, chain: Path, sni: str | None, *, resume: str = "") -> int:
            """GET over a TLS 1.3 handshake naming `sni`; `resume`: offer the session the
            request for that host got (a resumption attempt, CVE-2025-23419)."""

            def fetch() -> int:
                context = contexts.get(chain)
                if context is None:  # one per client: a session resumes in its context
                    context = contexts[chain] = ssl.create_default_context()
                    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
                    context.minimum_version = ssl.TLSVersion.TLSv1_3
                    context.load_cert_chain(chain)
                offered = sessions.get(resume) if resume else None
                with contextlib.ExitStack() as closing:
                    raw = closing.enter_context(socket.create_connection(("127.0.0.1", port), 5))
                    try:
                        tls = closing.enter_context(
                            context.wrap_socket(raw, server_hostname=sni, session=offered)
                        )
                    except ssl.SSLError:  # the unknown-names server refuses the handshake
                        return 0
                    tls.sendall(
                        f"GET / HTTP/1.1\r\nHost: {host}\r\nX-Client-Verify: SUCCESS\r\n"
                        "X-Client-DN: CN=admin\r\nConnection: close\r\n\r\n".encode()
                    )
                    status = int(tls.recv(4096).split(b" ", 2)[1])
                    sessions[host] = tls.session
                    if offered is not None:
                        resumed.append(tls.session_reused)
                    return status

            return await anyio.to_thread.run_sync(fetch)

        async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
            upstream_port = listener.extra(anyio.abc.SocketAttribute.local_port)
            state = DesiredState(
                sites=(site("a", ca_a, default=a_default), site("b", ca_b), site("open", None)),
                certificates=(CertificateRef("c", ("a.test", "b.test", "open.test")),),
                upstreams=(Upstream("app", (UpstreamServer(f"127.0.0.1:{upstream_port}"),)),),
            )
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, _upstream(heads))
                bundle = stack.renderer.render(state, extra_files=files)
                report = await stack.driver.apply(stack.update(state), bundle)
                assert report.outcome == "applied", report.message
                statuses = [
                    await get("a.test", alice, "a.test"),
                    await get("a.test", alice, "a.test", resume="a.test"),  # not resumed
                    await get("b.test", alice, None),  # a's client, no SNI
                    await get("b.test", alice, "zzz.test"),  # a name no site serves
                    await get("b.test", alice, "b.test"),  # b's CAs: not alice's
                    # a's session, resumed naming b, would keep a's check: not resumed
                    await get("b.test", alice, "b.test", resume="a.test"),
                    await get("b.test", bob, "B.TEST"),  # names are compared in any case
                    await get("b.test", bob, "b.test"),
                    await get("open.test", bob, "open.test"),
                ]
                tg.cancel_scope.cancel()
        refused = 421 if a_default else 0  # 0: the handshake itself was refused
        assert statuses == [200, 200, refused, refused, 400, 400, 200, 200, 200]
        assert resumed == [False, False]
        sent = [_sent_headers(head) for head in heads]
        assert [s.get("X-Client-DN") for s in sent] == [
            "CN=alice.clients.test",
            "CN=alice.clients.test",
            "CN=bob.clients.test",
            "CN=bob.clients.test",
            None,  # open: the client's own claim was dropped
        ]
        assert "X-Client-Verify" not in sent[4]


class TestIpv6:
    async def test_address_less_listeners_serve_both_families(self, stack: NginxStack) -> None:
        """With ``listen_ipv6`` a listener naming no address serves 127.0.0.1 and ::1 (nginx's
        ``listen <port>`` alone is IPv4 only); a name no site serves is still refused on
        both."""
        state = DesiredState(
            sites=(
                Site(
                    name="web",
                    server_names=("localhost",),
                    listeners=(Listener(port=stack.web_port),),
                    locations=(Location(path="/", return_=Return(code=200, body="dual")),),
                ),
            )
        )
        renderer = NginxRenderer(settings=attrs.evolve(stack.render_settings, listen_ipv6=True))
        report = await stack.driver.apply(stack.update(state), renderer.render(state))
        assert report.outcome == "applied", report.message
        for host in ("127.0.0.1", "[::1]"):
            url = f"http://{host}:{stack.web_port}/"
            async with httpx.AsyncClient() as client:
                response = await client.get(url, headers={"Host": "localhost"})
                assert (response.status_code, response.text) == (200, "dual"), host
                with pytest.raises(httpx.RemoteProtocolError):  # return 444: no answer
                    await client.get(url, headers={"Host": "unknown.test"})


class TestUnknownHosts:
    async def test_a_name_no_site_serves_is_refused(self, stack: NginxStack) -> None:
        """Without a default_server site, a request for another name (or by IP) gets its
        connection closed (444) instead of the only site's content."""
        state = one_site_state(stack.web_port, "known.test", "known")
        await _apply(stack, state)
        known = await stack.fetch(host="known.test")
        assert known.text == "known"
        assert known.headers["content-type"] == "text/plain"  # a return body is text
        for host in ("other.test", "127.0.0.1"):
            with pytest.raises(OSError, match="no header terminator"):  # closed, no reply
                await stack.fetch(host=host)
        # The access log tells them apart: the name asked for, and no site answering it.
        lines = (stack.root / "logs" / "access.log").read_text().splitlines()
        [known_line] = [line for line in lines if "host=known.test" in line]
        assert '" 200 ' in known_line
        assert "site=known.test host=known.test" in known_line
        [other_line] = [line for line in lines if "host=other.test" in line]
        assert '" 444 ' in other_line
        assert "site= host=other.test" in other_line

    async def test_a_default_server_site_answers_every_name(self, stack: NginxStack) -> None:
        """``default_server: true`` makes the site answer names no site serves."""
        state = one_site_state(stack.web_port, "known.test", "known", default_server=True)
        await _apply(stack, state)
        assert (await stack.fetch(host="other.test")).text == "known"

    async def test_a_catch_all_name_site_still_answers_every_name(self, stack: NginxStack) -> None:
        """A site named ``_`` (nginx's idiom for "any name") is its sockets' default
        server: the unknown-names server does not take its requests."""
        state = one_site_state(stack.web_port, "_", "any")
        await _apply(stack, state)
        assert (await stack.fetch(host="whatever.test")).text == "any"

    async def test_tls_sockets_keep_their_sites_protocols(self, stack: NginxStack) -> None:
        """nginx negotiates TLS with a socket's default server: the unknown-names server
        of a TLS socket carries the sites' protocols, so TLSv1.3-only sites stay so."""
        import ssl

        leaf = Pki().leaf("a.test")
        site = Site(
            name="a",
            server_names=("a.test",),
            listeners=(Listener(port=stack.web_port, address="127.0.0.1", tls=True),),
            tls=TLSConfig(certificate="c", redirect_http=False, protocols=("TLSv1.3",)),
            locations=(Location(path="/", return_=Return(code=200, body="a")),),
        )
        state = DesiredState(sites=(site,), certificates=(CertificateRef("c", ("a.test",)),))
        files = {"certs/c.crt": leaf.pem.encode(), "certs/c.key": leaf.key_pem.encode()}
        bundle = stack.renderer.render(state, extra_files=files)
        report = await stack.driver.apply(stack.update(state), bundle)
        assert report.outcome == "applied", report.message

        def handshake(version: ssl.TLSVersion, name: str) -> str:
            ctx = ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            ctx.minimum_version = ctx.maximum_version = version
            with (
                socket.create_connection(("127.0.0.1", stack.web_port), timeout=5) as raw,
                ctx.wrap_socket(raw, server_hostname=name) as tls,
            ):
                return str(tls.version())

        assert (
            await anyio.to_thread.run_sync(handshake, ssl.TLSVersion.TLSv1_3, "a.test") == "TLSv1.3"
        )
        for name in ("a.test", "other.test"):
            with pytest.raises(ssl.SSLError):
                await anyio.to_thread.run_sync(handshake, ssl.TLSVersion.TLSv1_2, name)


def test_the_watch_tells_a_clients_errors_from_nginxs_own(tmp_path: Path) -> None:
    """What nginx logs about one connection (numbered ``*N``: a refused client
    certificate, a broken PROXY header) does not fail an apply; its own crit lines do."""
    from nxmesh.plugins.nginx_driver.driver import _LogTail

    log = tmp_path / "error.log"
    log.write_text("")
    tail = _LogTail([log])
    client = (
        "2026/12/01 02:16:06 [crit] 4536#4536: *3 SSL_shutdown() failed (SSL: error:0A000123"
        ":SSL routines::application data after close notify) while SSL handshaking, client: "
        "127.0.0.1, server: 127.0.0.1:44201"
    )
    own = '2026/12/01 02:16:06 [crit] 4536#4536: pread() "/etc/nginx/x" failed (5: I/O error)'
    log.write_text(f"{client}\n{own}\n")
    tail.read()
    assert tail.bad() == [own]
