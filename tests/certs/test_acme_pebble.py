"""ACME end to end against a real Pebble: HTTP-01 through a real nginx, DNS-01 through
pebble-challtestsrv, renewal, revocation and the failure paths."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import anyio.abc
import anyio.streams.tls
import anyio.to_thread
import attrs
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from nxmesh.agent.harness import NginxStack
from nxmesh.certs.acme_client import (
    AccountKeyFile,
    AcmeClient,
    AcmeIssuer,
    IssuedCertificate,
    PendingChallenge,
    open_acme_client,
)
from nxmesh.certs.distribution import AgentKeyVault, CertificateDistributor
from nxmesh.certs.dns01 import Dns01Solver
from nxmesh.certs.errors import (
    AcmeAccountError,
    AcmeChallengeError,
    AcmeConnectionError,
    AcmeError,
    AcmeOrderError,
)
from nxmesh.certs.http01 import ChallengeBoard, Http01Solver, wait_until_served
from nxmesh.certs.renewal import CertificateMetrics, RenewalScheduler
from nxmesh.certs.settings import CertsSettings
from nxmesh.core.events import Event
from nxmesh.core.model import DesiredState, Listener, Location, Return, Site, TLSConfig
from nxmesh.core.settings import load_settings
from nxmesh.crypto.secrets import MasterKeyring, SecretError, generate_key
from nxmesh.plugins.dns_command import CommandDnsProvider
from nxmesh.plugins.render_nginx import NginxRenderer
from nxmesh.plugins.storage_sqlite import SqliteStorage
from nxmesh.testing.factories import make_version
from nxmesh.testing.nginx import free_port
from nxmesh.testing.pebble import BLOCKED_DOMAIN, PebbleServer
from nxmesh.testing.services import require_module

pytestmark = [pytest.mark.anyio, pytest.mark.pebble, pytest.mark.nginx]

SHOP = "shop.example.test"


@pytest.fixture
def anyio_backend() -> str:
    # One backend for the Pebble suite keeps it fast; the client's anyio code is covered
    # on trio by TestTrio below.
    return "asyncio"


def certs_settings(pebble: PebbleServer, **overrides: object) -> CertsSettings:
    values: dict[str, object] = {
        "acme_directory": pebble.directory_url,
        "ca_bundle": pebble.ca_bundle,
        "agree_tos": True,
        "contact_email": "admin@example.test",
        "poll_interval": 0.1,
        "order_timeout": 30.0,
        "network_timeout": 10.0,
        "dns_propagation_seconds": 0.0,
    }
    values.update(overrides)
    return CertsSettings(**values)  # type: ignore[arg-type]


def acme_client(pebble: PebbleServer, key_file: AccountKeyFile, **overrides: object) -> AcmeClient:
    return AcmeClient.from_settings(certs_settings(pebble, **overrides), key_file.load_or_create())


@pytest.fixture
def keyring() -> MasterKeyring:
    return MasterKeyring(generate_key())


@pytest.fixture
def key_file(tmp_path: Path, keyring: MasterKeyring, pebble: PebbleServer) -> AccountKeyFile:
    return AccountKeyFile(tmp_path / "acme" / "account.key", keyring, pebble.directory_url)


@pytest.fixture
async def client(pebble: PebbleServer, key_file: AccountKeyFile) -> AsyncIterator[AcmeClient]:
    acme = acme_client(pebble, key_file)
    try:
        yield acme
    finally:
        await acme.aclose()


def _plain_get(port: int, host: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.decode()


# ---------------------------------------------------------------------------------------
# One agent, wired by hand: distribution → vault → renderer → reload driver → real nginx
# ---------------------------------------------------------------------------------------


@attrs.define
class Fleet:
    """The master's distribution and one agent (key vault + real nginx) on loopback."""

    stack: NginxStack
    storage: SqliteStorage
    board: ChallengeBoard
    vault: AgentKeyVault
    state: DesiredState
    tls_port: int
    rollouts: int = 0

    @property
    def distributor(self) -> CertificateDistributor:
        return CertificateDistributor(self.storage, board=self.board)

    async def rollout(self) -> None:
        """Build this agent's material, render with encrypted keys and apply for real."""
        material = await self.distributor.material_for_state(self.state)
        files = await anyio.to_thread.run_sync(self.vault.extra_files, material)
        bundle = self.stack.renderer.render(self.state, extra_files=files)
        report = await self.stack.driver.apply(self.stack.update(self.state), bundle)
        assert report.outcome in ("applied", "noop"), report.message + report.nginx_output
        self.rollouts += 1

    async def publish(self, domains: frozenset[str]) -> None:
        await self.rollout()

    def https_get(self, root_pem: str, host: str = SHOP) -> tuple[x509.Certificate, str]:
        """GET / over TLS, verifying the chain against `root_pem` and the host name."""
        context = ssl.create_default_context(cadata=root_pem)
        with (
            socket.create_connection(("127.0.0.1", self.tls_port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
        return x509.load_der_x509_certificate(der), data.decode()


def acme_site(tls_port: int, http_port: int, *names: str) -> Site:
    return Site(
        name="shop",
        server_names=names or (SHOP,),
        listeners=(
            Listener(port=http_port, address="127.0.0.1"),
            Listener(port=tls_port, address="127.0.0.1", tls=True),
        ),
        tls=TLSConfig(acme=True),
        locations=(Location(path="/", return_=Return(code=200, body="shop over tls")),),
    )


@pytest.fixture
async def fleet(
    nginx_binary: str, tmp_path: Path, pebble: PebbleServer, keyring: MasterKeyring
) -> AsyncIterator[Fleet]:
    storage = SqliteStorage("sqlite://", keyring=keyring)
    await storage.open()
    vault = AgentKeyVault(tmp_path / "agent-keys")
    tls_port = free_port()
    async with NginxStack(root=tmp_path / "nginx", nginx_binary=nginx_binary) as stack:
        render = attrs.evolve(stack.render_settings, ssl_password_file=str(vault.password_file))
        if os.geteuid() == 0:
            # Workers would run as nobody, who cannot traverse pytest's 0700 tmp dirs to
            # read token files; a real conf_dir (/etc/nginx) is world-traversable.
            render = attrs.evolve(render, user="root")
        stack.renderer = NginxRenderer(settings=render)
        state = DesiredState(sites=(acme_site(tls_port, pebble.http_port),))
        fleet = Fleet(stack, storage, ChallengeBoard(), vault, state, tls_port)
        try:
            yield fleet
        finally:
            await storage.aclose()


# ---------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------


class TestAccount:
    """Registration, and the account key encrypted at rest."""

    async def test_registration_is_idempotent_for_one_key(
        self, pebble: PebbleServer, key_file: AccountKeyFile
    ) -> None:
        """Two clients with the same stored key end up with the same account URL."""
        first, second = acme_client(pebble, key_file), acme_client(pebble, key_file)
        try:
            one = await first.register()
            two = await second.register()
        finally:
            await first.aclose()
            await second.aclose()
        assert one.uri == two.uri
        assert one.contact == ("mailto:admin@example.test",)

    async def test_account_key_file_is_private_and_encrypted(
        self, key_file: AccountKeyFile, client: AcmeClient
    ) -> None:
        """The key file is 0600, holds no PEM, and does not open under another master key."""
        await client.register()
        mode = stat.S_IMODE(key_file.path.stat().st_mode)
        assert mode == 0o600
        raw = key_file.path.read_bytes()
        assert b"PRIVATE KEY" not in raw
        assert raw[0] == 1  # a keyring token, not key material
        other = AccountKeyFile(key_file.path, MasterKeyring(generate_key()), key_file.directory_url)
        with pytest.raises(SecretError):
            other.load_or_create()

    async def test_open_acme_client_reads_the_settings_section(
        self, pebble: PebbleServer, tmp_path: Path, keyring: MasterKeyring
    ) -> None:
        """The master's entry point builds a registered client from [plugins.certs]."""
        from nxmesh.core.pluginmanager import get_plugin_manager

        env = {
            "NXMESH_PLUGINS__CERTS__ACME_DIRECTORY": pebble.directory_url,
            "NXMESH_PLUGINS__CERTS__CA_BUNDLE": str(pebble.ca_bundle),
            "NXMESH_PLUGINS__CERTS__AGREE_TOS": "true",
        }
        pm = get_plugin_manager(autoload=True, environ={})
        settings = load_settings(pm, environ=env, overrides={"state_dir": tmp_path})
        client = await open_acme_client(settings, keyring)
        try:
            assert client.account_uri is not None
        finally:
            await client.aclose()
        assert list((tmp_path / "acme").glob("account-*.key"))

    async def test_terms_must_be_agreed(
        self, pebble: PebbleServer, key_file: AccountKeyFile
    ) -> None:
        """Without agree_tos no account is registered, and the setting is named."""
        client = acme_client(pebble, key_file, agree_tos=False)
        with pytest.raises(AcmeAccountError, match="agree_tos"):
            await client.register()

    async def test_untrusted_server_certificate_is_a_connection_error(
        self, pebble: PebbleServer, key_file: AccountKeyFile
    ) -> None:
        """Without the CA bundle, TLS verification fails and the hint names ca_bundle."""
        client = acme_client(pebble, key_file, ca_bundle=None)
        with pytest.raises(AcmeConnectionError, match="ca_bundle"):
            await client.register()


class TestHttp01ThroughNginx:
    """HTTP-01 answered by a real nginx from a rendered bundle; HTTPS served afterwards."""

    async def test_issue_serve_renew_revoke(
        self, fleet: Fleet, client: AcmeClient, pebble: PebbleServer
    ) -> None:
        """A certificate is issued through nginx, served and verified, renewed, revoked."""
        # Before issuance the site runs on a placeholder, so nginx can answer HTTP-01.
        await fleet.rollout()
        events: list[Event] = []

        async def publish(event: Event) -> None:
            events.append(event)

        served: list[PendingChallenge] = []

        async def publish_and_check(domains: frozenset[str]) -> None:
            await fleet.publish(domains)
            pending = [
                PendingChallenge(domain=d, type="http-01", token=t, key_authorization=a)
                for d in domains
                for t, a in fleet.board.for_domains([d]).items()
            ]
            if pending:  # present(): every token is served before the CA is asked
                await wait_until_served(pending, "127.0.0.1", pebble.http_port, timeout=10)
                served.extend(pending)

        solver = Http01Solver(fleet.board, publish_and_check)
        await fleet.storage.add_version(make_version(1, state=fleet.state))
        metrics = CertificateMetrics()
        scheduler = RenewalScheduler(
            fleet.storage, AcmeIssuer(client, solver), publish=publish, metrics=metrics
        )

        outcomes = await scheduler.run_once()
        assert [(o.name, o.result) for o in outcomes] == [("shop", "issued")], outcomes
        assert served
        assert all(s.domain == SHOP for s in served)
        assert len(fleet.board) == 0  # cleaned up after validation
        stored = await fleet.storage.get_certificate("default", "shop")
        assert stored is not None
        assert stored.source == "acme"

        # Roll the issued certificate out; HTTPS verifies against Pebble's root.
        await fleet.rollout()
        root = pebble.root_pem()
        cert, response = await anyio.to_thread.run_sync(fleet.https_get, root)
        assert response.endswith("shop over tls")
        assert cert.public_bytes(serialization.Encoding.PEM).decode() == stored.cert_pem
        # On the agent's disk the key is encrypted; the passphrase file is 0600.
        live = fleet.stack.layout.conf_dir / "current"
        live_key = (live / "certs" / "acme" / "shop.key").read_bytes()
        assert live_key.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
        assert stat.S_IMODE(fleet.vault.password_file.stat().st_mode) == 0o600
        assert [e.kind for e in events] == ["cert.renewed"]
        assert events[0].payload["initial"] is True

        # Renewal: move the clock into the renewal window; a new certificate replaces it.
        first_serial = cert.serial_number
        scheduler.clock = lambda: stored.not_after - 10 * 86400
        outcomes = await scheduler.run_once()
        assert [(o.name, o.result) for o in outcomes] == [("shop", "renewed")]
        renewed = await fleet.storage.get_certificate("default", "shop")
        assert renewed is not None
        assert renewed.cert_pem != stored.cert_pem
        await fleet.rollout()
        cert2, _ = await anyio.to_thread.run_sync(fleet.https_get, root)
        assert cert2.serial_number != first_serial
        assert metrics.renewals.labels(result="success")._value.get() == 2

        # Revocation, seen by Pebble; revoking twice is a clear error.
        await client.revoke(renewed.cert_pem + renewed.chain_pem)
        status = await anyio.to_thread.run_sync(pebble.cert_status, cert2.serial_number)
        assert status["Status"] == "Revoked"
        with pytest.raises(AcmeError, match="alreadyRevoked"):
            await client.revoke(renewed.cert_pem)

    async def test_a_streams_certificate_is_issued_through_a_site_serving_its_name(
        self, fleet: Fleet, client: AcmeClient, pebble: PebbleServer
    ) -> None:
        """An ACME certificate only a TCP stream ends TLS with: a plain site serving its
        domain answers HTTP-01 (its own pages stay its own), and once issued the stream
        serves it, verified up to Pebble's root by name."""
        from nxmesh.core.model import CertificateRef, Stream, StreamTLS, Upstream, UpstreamServer

        async with await anyio.create_tcp_listener(local_host="127.0.0.1") as backend:

            async def echo(stream: anyio.abc.SocketStream) -> None:
                async with stream:
                    await stream.send(b"echo:" + await stream.receive())

            port = free_port()
            site = Site(
                name="web",
                server_names=(SHOP,),
                listeners=(Listener(port=pebble.http_port, address="127.0.0.1"),),
                locations=(Location(path="/", return_=Return(code=200, body="site pages")),),
            )
            backend_port = backend.extra(anyio.abc.SocketAttribute.local_port)
            fleet.state = DesiredState(
                sites=(site,),
                upstreams=(Upstream("broker", (UpstreamServer(f"127.0.0.1:{backend_port}"),)),),
                certificates=(CertificateRef("mqtt", (SHOP,), source="acme"),),
                streams=(
                    Stream(name="mqtts", port=port, address="127.0.0.1", upstream="broker",
                           tls=StreamTLS(certificate="mqtt")),
                ),
            )  # fmt: skip
            await fleet.rollout()  # the stream starts on a placeholder

            async def publish(domains: frozenset[str]) -> None:
                await fleet.rollout()
                pending = [
                    PendingChallenge(domain=d, type="http-01", token=t, key_authorization=a)
                    for d in domains
                    for t, a in fleet.board.for_domains([d]).items()
                ]
                await wait_until_served(pending, "127.0.0.1", pebble.http_port, timeout=10)

            await fleet.storage.add_version(make_version(1, state=fleet.state))
            scheduler = RenewalScheduler(
                fleet.storage, AcmeIssuer(client, Http01Solver(fleet.board, publish))
            )
            outcomes = await scheduler.run_once()
            assert [(o.name, o.result) for o in outcomes] == [("mqtt", "issued")], outcomes
            stored = await fleet.storage.get_certificate("default", "mqtt")
            assert stored is not None
            await fleet.rollout()
            context = ssl.create_default_context(cadata=pebble.root_pem())
            async with anyio.create_task_group() as tg:
                tg.start_soon(backend.serve, echo)
                with anyio.fail_after(10):
                    async with await anyio.connect_tcp(
                        "127.0.0.1", port, tls=True, ssl_context=context, tls_hostname=SHOP,
                        tls_standard_compatible=False,
                    ) as tls:  # fmt: skip
                        await tls.send(b"CONNECT")
                        assert await tls.receive() == b"echo:CONNECT"
                        der = tls.extra(anyio.streams.tls.TLSAttribute.peer_certificate_binary)
                tg.cancel_scope.cancel()
            served = x509.load_der_x509_certificate(der)
            assert served.public_bytes(serialization.Encoding.PEM).decode() == stored.cert_pem
            answer = await anyio.to_thread.run_sync(_plain_get, pebble.http_port, SHOP)
            assert answer.endswith("site pages")

    async def test_challenge_nginx_does_not_serve_is_a_clear_error(
        self, fleet: Fleet, client: AcmeClient
    ) -> None:
        """When the token never reaches nginx, the error names the domain and the CA's reason."""
        await fleet.rollout()
        board = ChallengeBoard()
        cleaned: list[int] = []

        async def publish_nothing(domains: frozenset[str]) -> None:
            cleaned.append(len(board))

        with pytest.raises(AcmeChallengeError) as exc:
            await client.issue([SHOP], Http01Solver(board, publish_nothing))
        (failure,) = exc.value.failures
        assert failure.domain == SHOP
        assert failure.challenge == "http-01"
        assert failure.acme_type.endswith(":unauthorized") or "404" in failure.detail
        assert SHOP in str(exc.value)
        assert cleaned == [1, 0]  # published, then withdrawn despite the failure

    async def test_order_for_a_refused_name_fails_clearly(self, client: AcmeClient) -> None:
        """A name the CA will not issue for is an order error carrying its problem type."""
        board = ChallengeBoard()

        async def publish(domains: frozenset[str]) -> None:
            raise AssertionError("no challenge may be published for a refused order")

        with pytest.raises(AcmeOrderError) as exc:
            await client.issue([BLOCKED_DOMAIN], Http01Solver(board, publish))
        assert exc.value.code == "rejectedIdentifier"
        assert BLOCKED_DOMAIN in str(exc.value)

    async def test_wildcards_need_dns_01(self, client: AcmeClient) -> None:
        """HTTP-01 cannot validate a wildcard: refused before any order is made."""

        async def publish(domains: frozenset[str]) -> None:
            raise AssertionError("unreachable")

        with pytest.raises(AcmeOrderError, match="DNS-01"):
            await client.issue(["*.example.test"], Http01Solver(ChallengeBoard(), publish))


DNS_SCRIPT = """\
import json, os, sys, urllib.request
action = sys.argv[1]
body = {"host": os.environ["NXMESH_DNS_RECORD_NAME"]}
if action == "add":
    body["value"] = os.environ["NXMESH_DNS_RECORD_VALUE"]
url = os.environ["CHALLTESTSRV"] + ("/set-txt" if action == "add" else "/clear-txt")
req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
urllib.request.urlopen(req, timeout=5).read()
with open(os.environ["LOG"], "a") as log:
    log.write(f"{action} {body['host']}\\n")
"""


class TestDns01:
    """DNS-01 through the command provider, with challtestsrv as the CA's DNS."""

    async def test_wildcard_certificate_via_command_provider(
        self, client: AcmeClient, pebble: PebbleServer, tmp_path: Path
    ) -> None:
        """The script publishes both TXT values of one name; Pebble issues the wildcard."""
        script = tmp_path / "dns.py"
        script.write_text(textwrap.dedent(DNS_SCRIPT))
        log = tmp_path / "dns.log"
        provider = CommandDnsProvider(
            [sys.executable, str(script)],
            timeout=20,
            env={"CHALLTESTSRV": pebble.challtestsrv_url, "LOG": str(log)},
        )
        issued = await client.issue(
            ["dns.example.test", "*.dns.example.test"], Dns01Solver(provider)
        )
        assert isinstance(issued, IssuedCertificate)
        assert issued.domains == ("dns.example.test", "*.dns.example.test")
        leaf = x509.load_pem_x509_certificate(issued.cert_pem.encode())
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sorted(san.get_values_for_type(x509.DNSName)) == sorted(issued.domains)
        lines = log.read_text().splitlines()
        assert lines.count("add _acme-challenge.dns.example.test.") == 2
        assert "remove _acme-challenge.dns.example.test." in lines
        assert issued.key_pem.startswith("-----BEGIN PRIVATE KEY-----")
        assert "PRIVATE" not in repr(issued)


class TestTrio:
    """The client's anyio code runs on trio too."""

    @pytest.fixture
    def anyio_backend(self) -> str:
        require_module("trio")
        return "trio"

    async def test_dns_01_issuance_on_trio(
        self, client: AcmeClient, pebble: PebbleServer, tmp_path: Path
    ) -> None:
        """A whole DNS-01 issuance completes on the trio backend."""
        script = tmp_path / "dns.py"
        script.write_text(textwrap.dedent(DNS_SCRIPT))
        provider = CommandDnsProvider(
            [sys.executable, str(script)],
            env={"CHALLTESTSRV": pebble.challtestsrv_url, "LOG": os.devnull},
        )
        issued = await client.issue(["trio.example.test"], Dns01Solver(provider))
        assert issued.domains == ("trio.example.test",)
