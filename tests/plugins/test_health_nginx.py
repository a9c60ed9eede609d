"""The nginx and host health checks: stub_status, HTTP probes, system, certificate expiry."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from nxmesh.agent.harness import NginxStack
from nxmesh.core.model import (
    CertificateRef,
    DesiredState,
    Listener,
    Location,
    Return,
    Site,
    TLSConfig,
)
from nxmesh.core.pluginmanager import NxMeshPluginManager
from nxmesh.core.registry import ProviderRegistries
from nxmesh.core.settings import load_settings
from nxmesh.plugins.health_nginx import (
    CertExpiryCheck,
    HealthSettings,
    HttpProbeCheck,
    StubStatusCheck,
    SystemCheck,
    parse_stub_status,
)
from nxmesh.testing.contracts import HealthCheckContract
from nxmesh.testing.factories import one_site_state
from nxmesh.testing.nginx import free_port
from nxmesh.testing.pki import Issued, Pki


def _certificate(days: float) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "health.test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture
async def served(
    nginx_binary: str, tmp_path: Path, anyio_backend: str
) -> AsyncIterator[NginxStack]:
    async with NginxStack(root=tmp_path / "nginx", nginx_binary=nginx_binary) as stack:
        state = stack.state("healthy")
        report = await stack.driver.apply(stack.update(state), stack.render(state))
        assert report.outcome == "applied", report.message
        yield stack


class TestStubStatusContract(HealthCheckContract):
    @pytest.fixture
    def health_check(self, served: NginxStack) -> StubStatusCheck:
        return StubStatusCheck(port=served.status_port)

    @pytest.fixture
    def failing_health_check(self) -> StubStatusCheck:
        return StubStatusCheck(port=free_port())


class TestHttpProbeContract(HealthCheckContract):
    @pytest.fixture
    def health_check(self, served: NginxStack) -> HttpProbeCheck:
        return HttpProbeCheck([f"http://127.0.0.1:{served.web_port}/"])

    @pytest.fixture
    def failing_health_check(self) -> HttpProbeCheck:
        return HttpProbeCheck([f"http://127.0.0.1:{free_port()}/"], timeout=0.5)


class TestSystemContract(HealthCheckContract):
    @pytest.fixture
    def health_check(self) -> SystemCheck:
        # Limits no host reaches: a busy CI machine must not make this test flaky.
        roomy = HealthSettings(
            memory_warn_percent=101, disk_warn_percent=101, load_warn_per_cpu=1e9
        )
        return SystemCheck(settings=roomy)

    @pytest.fixture
    def failing_health_check(self) -> SystemCheck:
        return SystemCheck(settings=HealthSettings(memory_warn_percent=0))


class TestCertExpiryContract(HealthCheckContract):
    @pytest.fixture
    def health_check(self, tmp_path: Path) -> CertExpiryCheck:
        (tmp_path / "good").mkdir()
        (tmp_path / "good" / "site.crt").write_bytes(_certificate(days=90))
        return CertExpiryCheck(tmp_path / "good")

    @pytest.fixture
    def failing_health_check(self, tmp_path: Path) -> CertExpiryCheck:
        (tmp_path / "expiring").mkdir()
        (tmp_path / "expiring" / "site.crt").write_bytes(_certificate(days=1))
        return CertExpiryCheck(tmp_path / "expiring")


class TestRegistration:
    def test_every_check_is_registered(self, plugin_manager: NxMeshPluginManager) -> None:
        """The plugin registers its four checks next to the basic process check."""
        checks = ProviderRegistries.collect(plugin_manager)["health_check"].names()
        assert {"stub_status", "http_probe", "system", "cert_expiry", "nginx_process"} <= set(
            checks
        )

    def test_checks_read_their_settings_section(self, plugin_manager: NxMeshPluginManager) -> None:
        """Probes come from [plugins.health_nginx] (here via the environment)."""
        settings = load_settings(
            plugin_manager,
            environ={"NXMESH_PLUGINS__HEALTH_NGINX__PROBES": "http://127.0.0.1:1/a,http://x:2/"},
        )
        assert HttpProbeCheck.from_settings(settings).probes == (
            "http://127.0.0.1:1/a",
            "http://x:2/",
        )

    def test_a_probe_must_be_an_http_url(self) -> None:
        """A probe that is not an http:// or https:// URL is refused when settings load."""
        with pytest.raises(ValueError, match="http:// or https:// URLs"):
            HealthSettings(probes=("ftp://example.test/",))


class TestStubStatusParsing:
    def test_parses_the_seven_numbers(self) -> None:
        """The stub_status page yields active, accepts, handled, requests and the states."""
        page = (
            "Active connections: 3 \nserver accepts handled requests\n 10 9 42 \n"
            "Reading: 0 Writing: 1 Waiting: 2 \n"
        )
        assert parse_stub_status(page) == {
            "active": 3,
            "accepts": 10,
            "handled": 9,
            "requests": 42,
            "reading": 0,
            "writing": 1,
            "waiting": 2,
        }

    def test_rejects_other_pages(self) -> None:
        """Any other body is an error, not zeros."""
        with pytest.raises(ValueError, match="stub_status"):
            parse_stub_status("<html>hello</html>")


@pytest.mark.anyio
@pytest.mark.nginx
class TestAgainstRealNginx:
    async def test_stub_status_counts_requests(self, served: NginxStack) -> None:
        """After a few requests the counters show them, with nothing dropped."""
        for _ in range(3):
            await served.fetch()
        [result] = await StubStatusCheck(port=served.status_port).run()
        assert result.status == "ok"
        assert result.metrics["requests"] >= 3
        assert result.metrics["accepts"] == result.metrics["handled"]
        assert set(result.metrics) == {
            "active",
            "accepts",
            "handled",
            "requests",
            "reading",
            "writing",
            "waiting",
        }

    async def test_stub_status_fails_when_nginx_is_down(self) -> None:
        """No status server answering is a failure naming the address."""
        port = free_port()
        [result] = await StubStatusCheck(port=port).run()
        assert result.status == "fail"
        assert f"127.0.0.1:{port}" in result.message

    async def test_probes_report_each_endpoint(self, served: NginxStack) -> None:
        """A served URL is ok with its status code; a closed port fails."""
        good = f"http://127.0.0.1:{served.web_port}/"
        bad = f"http://127.0.0.1:{free_port()}/"
        ok, failed = await HttpProbeCheck([good, bad], timeout=1).run()
        assert (ok.check, ok.status, ok.metrics["status_code"]) == ("http_probe.0", "ok", 200)
        assert ok.metrics["latency_ms"] > 0
        assert (failed.check, failed.status) == ("http_probe.1", "fail")

    async def test_a_probe_names_the_site_it_asks_for(self, served: NginxStack) -> None:
        """By IP a probe reaches only a socket's default server; followed by a site's name
        it asks nginx for that site."""
        state = one_site_state(served.web_port, "known.test", "ok")
        report = await served.driver.apply(served.update(state), served.render(state))
        assert report.outcome == "applied", report.message
        url = f"http://127.0.0.1:{served.web_port}/"
        named, by_ip = await HttpProbeCheck([f"{url} known.test", url], timeout=1).run()
        assert (named.status, named.metrics["status_code"]) == ("ok", 200)
        assert by_ip.status == "fail"  # no site is the default: nginx closes (444)

    @pytest.mark.parametrize("probe", ["ftp://x/", "http://127.0.0.1/ bad;name", "x y"])
    def test_bad_probes_are_refused_naming_the_setting(self, probe: str) -> None:
        """A probe is an http:// or https:// URL, optionally followed by a Host name."""
        with pytest.raises(ValueError, match="probes"):
            HealthSettings(probes=(probe,))

    async def test_probes_behind_a_load_balancer_send_the_proxy_line(
        self, served: NginxStack, tmp_path: Path
    ) -> None:
        """A listener expecting PROXY protocol lines closes a probe without one; with
        ``proxy_protocol`` last the probe opens with the line, over HTTP and before the
        TLS handshake over HTTPS, and the site answers."""
        pki = Pki()
        ca_file = tmp_path / "ca.pem"
        ca_file.write_text(pki.root.pem)
        plain_port, tls_port = free_port(), free_port()
        site = Site(
            name="store",
            server_names=("store.test",),
            listeners=(
                Listener(port=plain_port, address="127.0.0.1", proxy_protocol=True),
                Listener(port=tls_port, address="127.0.0.1", tls=True, proxy_protocol=True),
            ),
            tls=TLSConfig(certificate="c", redirect_http=False),
            real_ip_from=("127.0.0.1",),
            real_ip_header="proxy_protocol",
            locations=(Location(path="/", return_=Return(code=200, body="ok")),),
        )
        state = DesiredState(sites=(site,), certificates=(CertificateRef("c", ("store.test",)),))
        leaf = pki.leaf("store.test")
        files = {"certs/c.crt": pki.chain(leaf).encode(), "certs/c.key": leaf.key_pem.encode()}
        report = await served.driver.apply(
            served.update(state), served.renderer.render(state, extra_files=files)
        )
        assert report.outcome == "applied", report.message
        plain = f"http://127.0.0.1:{plain_port}/ store.test"
        secure = f"https://127.0.0.1:{tls_port}/ store.test"
        without, with_line, tls_with_line = await HttpProbeCheck(
            [plain, f"{plain} proxy_protocol", f"{secure} proxy_protocol"],
            timeout=2,
            ca_file=str(ca_file),
        ).run()
        assert without.status == "fail"  # nginx: "broken header", the connection closed
        assert (with_line.status, with_line.metrics["status_code"]) == ("ok", 200)
        assert (tls_with_line.status, tls_with_line.metrics["status_code"]) == ("ok", 200)

    def test_a_ca_file_must_be_readable(self, tmp_path: Path) -> None:
        with pytest.raises(
            ValueError, match=r"probe_ca_file: .* is not a file this agent can read"
        ):
            HealthSettings(probe_ca_file=str(tmp_path / "missing.pem"))

    async def test_https_probes_check_the_sites_certificate(
        self, served: NginxStack, tmp_path: Path
    ) -> None:
        """An HTTPS probe asks for the site by name (SNI) and checks its certificate as a
        browser would: trusted through `probe_ca_file`, not by the host's store; an
        expired one fails, saying so; a name no site serves fails the handshake;
        `probe_verify_tls = false` checks nothing."""
        pki = Pki()
        ca_file = tmp_path / "ca.pem"
        ca_file.write_text(pki.root.pem)
        port = free_port()

        async def serve(leaf: Issued) -> None:
            site = Site(
                name="secure",
                server_names=("secure.test",),
                listeners=(Listener(port=port, address="127.0.0.1", tls=True),),
                tls=TLSConfig(certificate="c", redirect_http=False),
                locations=(Location(path="/", return_=Return(code=200, body="ok")),),
            )
            state = DesiredState(
                sites=(site,), certificates=(CertificateRef("c", ("secure.test",)),)
            )
            files = {"certs/c.crt": pki.chain(leaf).encode(), "certs/c.key": leaf.key_pem.encode()}
            bundle = served.renderer.render(state, extra_files=files)
            report = await served.driver.apply(served.update(state), bundle)
            assert report.outcome == "applied", report.message

        url = f"https://127.0.0.1:{port}/"
        await serve(pki.leaf("secure.test"))
        trusted, unknown_name = await HttpProbeCheck(
            [f"{url} secure.test", f"{url} other.test"], timeout=2, ca_file=str(ca_file)
        ).run()
        assert (trusted.status, trusted.metrics["status_code"]) == ("ok", 200)
        assert unknown_name.status == "fail"
        [untrusted] = await HttpProbeCheck([f"{url} secure.test"], timeout=2).run()
        assert untrusted.status == "fail"
        assert "certificate verify failed" in untrusted.message
        await serve(pki.leaf("secure.test", days=-1, not_before_days=-10))
        [expired] = await HttpProbeCheck(
            [f"{url} secure.test"], timeout=2, ca_file=str(ca_file)
        ).run()
        assert expired.status == "fail"
        assert "certificate has expired" in expired.message
        [unchecked] = await HttpProbeCheck(
            [f"{url} secure.test"], timeout=2, verify_tls=False
        ).run()
        assert (unchecked.status, unchecked.metrics["status_code"]) == ("ok", 200)

    async def test_system_reports_host_and_worker_memory(self, served: NginxStack) -> None:
        """CPU, memory, disk, load and nginx worker RSS are all measured."""
        check = SystemCheck(disk_path=served.root, pid_file=served.layout.pid_file)
        [result] = await check.run()
        for key in ("cpu_percent", "memory_percent", "disk_percent", "load1", "load15"):
            assert key in result.metrics
        assert result.metrics["nginx_workers"] == 1
        assert result.metrics["nginx_worker_rss_bytes"] > 1024 * 1024

    async def test_system_warns_past_thresholds(self, tmp_path: Path) -> None:
        """A memory threshold of 0% is always exceeded: the result warns and says so."""
        check = SystemCheck(disk_path=tmp_path, settings=HealthSettings(memory_warn_percent=0))
        [result] = await check.run()
        assert result.status == "warn"
        assert "memory" in result.message


@pytest.mark.anyio
class TestCertificateExpiry:
    async def test_status_follows_days_left(self, tmp_path: Path) -> None:
        """Far from expiry is ok, within the warning window warns, nearly expired fails."""
        certs = tmp_path / "certs"
        certs.mkdir()
        (certs / "fresh.crt").write_bytes(_certificate(90))
        (certs / "soon.crt").write_bytes(_certificate(7))
        (certs / "late.pem").write_bytes(_certificate(1))
        results = {r.check: r for r in await CertExpiryCheck(tmp_path).run()}
        assert results["cert_expiry.certs_fresh.crt"].status == "ok"
        assert results["cert_expiry.certs_soon.crt"].status == "warn"
        assert results["cert_expiry.certs_late.pem"].status == "fail"
        assert 6 < results["cert_expiry.certs_soon.crt"].metrics["days_left"] < 7.01

    async def test_unreadable_certificate_fails(self, tmp_path: Path) -> None:
        """A certificate file that does not parse is a failure, not silence."""
        (tmp_path / "broken.crt").write_text("not a certificate")
        [result] = await CertExpiryCheck(tmp_path).run()
        assert result.status == "fail"
        assert "broken.crt" in result.message

    async def test_key_files_are_skipped(self, tmp_path: Path) -> None:
        """A private key in a .pem is not a certificate and is not reported."""
        key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        (tmp_path / "site.pem").write_bytes(key)
        [result] = await CertExpiryCheck(tmp_path).run()
        assert (result.check, result.status) == ("cert_expiry", "ok")
