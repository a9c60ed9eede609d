"""The agent app end to end: island boot from the cache, masterless files, a master link."""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.lowlevel
import pytest

from nxmesh.agent.app import AgentApp, AgentRefusedError, choose_mode, run_agent
from nxmesh.agent.link import AgentHello, AgentSession, MasterLink
from nxmesh.core.events import Event
from nxmesh.core.model import ApplyReport, HealthReport, PendingApply
from nxmesh.core.registry import ProviderRegistries
from nxmesh.plugins.deploy_standalone import StandaloneMode

if TYPE_CHECKING:
    from tests.agent.conftest import AgentEnv

pytestmark = [pytest.mark.anyio, pytest.mark.nginx]


async def _serve_state_file_once(env: AgentEnv, body: str) -> None:
    """Run a masterless agent until it serves `body`, then stop it (nginx stops too)."""
    env.write_state(body)
    async with anyio.create_task_group() as tg:
        app: AgentApp = await tg.start(env.build(state_file=env.state_file).run)
        await env.wait_body(body)
        await app.coalescer.wait_idle()  # stopping mid-apply would roll it back
        tg.cancel_scope.cancel()


class TestIslandMode:
    async def test_cold_start_from_the_cache_launches_nginx(self, agent_env: AgentEnv) -> None:
        """With nginx down and no master, the verified cache brings the site back."""
        await _serve_state_file_once(agent_env, "cached")
        assert await agent_env.nginx_pid() is None
        async with anyio.create_task_group() as tg:
            app: AgentApp = await tg.start(agent_env.build().run)
            assert app.island
            assert app.boot_report is not None
            assert app.boot_report.outcome == "applied"
            assert await agent_env.nginx_pid() is not None
            assert await agent_env.body() == "cached"
            assert "agent.booted" in app.events.kinds()
            tg.cancel_scope.cancel()

    async def test_restart_beside_a_running_nginx_is_a_noop(self, agent_env: AgentEnv) -> None:
        """An agent restarted while nginx serves its cache (attach mode) changes nothing."""
        agent_env.overrides["plugins.deploy_standalone.supervise"] = False
        await _serve_state_file_once(agent_env, "steady")
        pid = await agent_env.nginx_pid()
        assert pid is not None  # a daemonized nginx outlives the agent
        async with anyio.create_task_group() as tg:
            app: AgentApp = await tg.start(agent_env.build().run)
            assert app.boot_report is not None
            assert app.boot_report.outcome == "noop"
            assert await agent_env.nginx_pid() == pid
            tg.cancel_scope.cancel()

    async def test_a_second_agent_on_the_same_tree_is_refused(self, agent_env: AgentEnv) -> None:
        """Two agents must never drive one config root: the second fails to start."""
        from nxmesh.core.errors import NxMeshError

        agent_env.write_state("first")
        async with anyio.create_task_group() as tg:
            await tg.start(agent_env.build(state_file=agent_env.state_file).run)
            with pytest.raises(NxMeshError, match="another agent"):
                await agent_env.build().run()
            tg.cancel_scope.cancel()

    async def test_tampered_cache_is_never_booted(self, agent_env: AgentEnv) -> None:
        """An edited cache entry is refused: nginx is not started from it."""
        await _serve_state_file_once(agent_env, "genuine")
        entry = agent_env.state_dir / "agent" / "last_good.json"
        document = json.loads(entry.read_text())
        site = document["entry"]["state"]["sites"][0]
        site["locations"][0]["return"]["body"] = "forged"
        entry.write_text(json.dumps(document))
        async with anyio.create_task_group() as tg:
            app: AgentApp = await tg.start(agent_env.build().run)
            assert app.boot_report is None
            assert await agent_env.nginx_pid() is None
            [refused] = app.events.events("cache.refused")
            assert "bad seal" in refused.payload["reason"]
            tg.cancel_scope.cancel()

    async def test_unreachable_master_leaves_the_agent_serving(self, agent_env: AgentEnv) -> None:
        """A link that cannot connect is retried with backoff; the cache keeps serving."""
        await _serve_state_file_once(agent_env, "offline")
        link = _Link(error=ConnectionRefusedError("master is down"))
        async with anyio.create_task_group() as tg:
            app: AgentApp = await tg.start(agent_env.build(link=link).run)
            with anyio.fail_after(5):
                while len(app.events.events("master.unreachable")) < 2:
                    await anyio.sleep(0.02)
            assert app.island
            assert await agent_env.body() == "offline"
            tg.cancel_scope.cancel()


class _Link:
    """A stand-in transport: pushes the given updates once connected, records reports;
    with `error`, every session attempt raises it instead."""

    def __init__(
        self, updates: list[PendingApply] | None = None, *, error: Exception | None = None
    ) -> None:
        self.updates = updates or []
        self.error = error
        self.hellos: list[AgentHello] = []
        self.reports: list[ApplyReport] = []
        self.health: list[HealthReport] = []
        self.events: list[Event] = []

    async def run(self, session: AgentSession, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        if self.error is not None:
            raise self.error
        self.hellos.append(session.hello())
        task_status.started()
        for update in self.updates:
            session.submit(update)
        await anyio.sleep_forever()

    async def report_apply(self, report: ApplyReport) -> None:
        self.reports.append(report)

    async def report_health(self, report: HealthReport) -> None:
        self.health.append(report)

    async def report_event(self, event: Event) -> None:
        self.events.append(event)


class TestMasterLink:
    def test_stand_in_matches_the_protocol(self) -> None:
        """The test's link has the shape a transport must provide."""
        assert isinstance(_Link(), MasterLink)

    async def test_updates_from_the_master_are_applied_and_reported(
        self, agent_env: AgentEnv
    ) -> None:
        """A pushed update goes through the same pipeline and its report goes back up."""
        from nxmesh.config.versions import state_digest

        state = agent_env.state("from-master")
        update = PendingApply(version=7, digest=state_digest(state), state=state)
        link = _Link([update])
        async with anyio.create_task_group() as tg:
            app: AgentApp = await tg.start(agent_env.build(link=link).run)
            await agent_env.wait_body("from-master")
            with anyio.fail_after(5):
                while not link.reports:
                    await anyio.sleep(0.02)
            assert not app.island
            assert link.hellos[0].running_version is None
            assert (link.reports[0].version, link.reports[0].outcome) == (7, "applied")
            assert app.running() == (7, update.digest)
            assert "master.connected" in app.events.kinds()
            tg.cancel_scope.cancel()

    async def test_update_with_a_wrong_digest_is_refused(self, agent_env: AgentEnv) -> None:
        """The agent re-hashes the state: a mismatching digest is reported, not applied."""
        state = agent_env.state("forged")
        update = PendingApply(version=3, digest="0" * 64, state=state)
        link = _Link([update])
        async with anyio.create_task_group() as tg:
            await tg.start(agent_env.build(link=link).run)
            with anyio.fail_after(5):
                while not link.reports:
                    await anyio.sleep(0.02)
            assert link.reports[0].outcome == "failed"
            assert "digest mismatch" in link.reports[0].message
            assert await agent_env.nginx_pid() is None
            tg.cancel_scope.cancel()


class TestMasterless:
    async def test_file_changes_are_reapplied(self, agent_env: AgentEnv) -> None:
        """Editing the state file changes what nginx serves; each content is a new version."""
        agent_env.write_state("v1")
        async with anyio.create_task_group() as tg:
            app: AgentApp = await tg.start(agent_env.build(state_file=agent_env.state_file).run)
            await agent_env.wait_body("v1")
            agent_env.write_state("v2")
            await agent_env.wait_body("v2")
            with anyio.fail_after(5):
                while app.running()[0] != 2:
                    await anyio.sleep(0.02)
            tg.cancel_scope.cancel()

    async def test_unchanged_content_is_not_reapplied(self, agent_env: AgentEnv) -> None:
        """Rewriting the file with the same content triggers no apply."""
        agent_env.write_state("same")
        async with anyio.create_task_group() as tg:
            app: AgentApp = await tg.start(agent_env.build(state_file=agent_env.state_file).run)
            await agent_env.wait_body("same")
            await app.coalescer.wait_idle()
            applies = app.coalescer.applied
            agent_env.write_state("same")
            await anyio.sleep(0.3)
            assert app.coalescer.applied == applies
            assert app.running()[0] == 1
            tg.cancel_scope.cancel()

    async def test_an_invalid_file_keeps_the_last_good_serving(self, agent_env: AgentEnv) -> None:
        """A file that stops validating is reported; the applied config stays."""
        agent_env.write_state("good")
        async with anyio.create_task_group() as tg:
            app: AgentApp = await tg.start(agent_env.build(state_file=agent_env.state_file).run)
            await agent_env.wait_body("good")
            agent_env.state_file.write_text("sites:\n  - name: 'bad;name'\n")
            with anyio.fail_after(5):
                while not app.events.events("state_file.invalid"):
                    await anyio.sleep(0.02)
            assert "sites[0].name" in app.events.events("state_file.invalid")[0].payload["message"]
            assert await agent_env.body() == "good"
            tg.cancel_scope.cancel()

    async def test_a_files_warnings_are_reported_and_it_applies(self, agent_env: AgentEnv) -> None:
        """What the master would warn of (here: a listener reading PROXY protocol lines
        behind a site that believes X-Forwarded-For) is recorded, once per content,
        and the file still applies."""
        import json

        agent_env.write_state("warned")
        state = json.loads(agent_env.state_file.read_text())
        site = state["sites"][0]
        site["real_ip_from"] = ["10.0.0.0/8"]
        site["listeners"][0]["proxy_protocol"] = True
        agent_env.state_file.write_text(json.dumps(state))
        async with anyio.create_task_group() as tg:
            app: AgentApp = await tg.start(agent_env.build(state_file=agent_env.state_file).run)
            with anyio.fail_after(10):
                while not app.events.events("state_file.warnings"):
                    await anyio.sleep(0.02)
            [event] = app.events.events("state_file.warnings")
            assert any("real_ip_header" in w for w in event.payload["warnings"])
            tg.cancel_scope.cancel()

    async def test_restart_keeps_the_version_of_an_unchanged_file(
        self, agent_env: AgentEnv
    ) -> None:
        """Version numbers survive a restart through the cache."""
        await _serve_state_file_once(agent_env, "kept")
        async with anyio.create_task_group() as tg:
            app: AgentApp = await tg.start(agent_env.build(state_file=agent_env.state_file).run)
            await agent_env.wait_body("kept")
            assert app.running()[0] == 1
            tg.cancel_scope.cancel()


class TestRunAgent:
    async def test_once_applies_and_leaves_nginx_running(self, agent_env: AgentEnv) -> None:
        """run_agent(once=True) returns the report; the (daemonized) nginx keeps serving."""
        agent_env.write_state("once")
        report = await run_agent(
            agent_env.pm,
            agent_env.settings(),
            state_file=agent_env.state_file,
            once=True,
            handle_signals=False,
            render_settings=agent_env.render_settings,
        )
        assert report is not None
        assert report.outcome == "applied", report.message
        assert await agent_env.body() == "once"

    async def test_once_is_refused_while_an_agent_drives_the_tree(
        self, agent_env: AgentEnv
    ) -> None:
        """``--once`` takes the agent lock too: its recovery would undo a running agent's
        in-flight swap, so it refuses to start beside one and changes nothing."""
        from nxmesh.core.errors import NxMeshError

        agent_env.write_state("daemon")
        async with anyio.create_task_group() as tg:
            app: AgentApp = await tg.start(agent_env.build(state_file=agent_env.state_file).run)
            await agent_env.wait_body("daemon")
            await app.coalescer.wait_idle()
            staging = agent_env.conf_dir / "releases" / ".staging-inflight"
            staging.mkdir()  # what an apply in flight has on disk for a moment
            with pytest.raises(NxMeshError, match=rf"another agent \(pid {os.getpid()}\)"):
                await run_agent(
                    agent_env.pm,
                    agent_env.settings(),
                    state_file=agent_env.state_file,
                    once=True,
                    handle_signals=False,
                    render_settings=agent_env.render_settings,
                )
            assert staging.exists()  # no recovery ran: it would have swept it away
            assert await agent_env.body() == "daemon"
            staging.rmdir()
            tg.cancel_scope.cancel()

    def test_auto_mode_prefers_a_detected_sidecar(self, agent_env: AgentEnv) -> None:
        """With 'auto' the highest-priority mode whose detect() is true is chosen."""
        settings = agent_env.settings(**{"agent.deployment_mode": "auto"})
        registry = ProviderRegistries.collect(agent_env.pm)
        mode = choose_mode(registry, settings)
        expected = max(
            (c for c in registry["deployment_mode"].classes() if c.detect()),
            key=lambda c: c.priority,
        )
        assert type(mode) is expected
        named = choose_mode(registry, agent_env.settings())
        assert isinstance(named, StandaloneMode)


def _cli_env(agent_env: AgentEnv) -> dict[str, Any]:
    return {
        **os.environ,
        "NXMESH_STATE_DIR": str(agent_env.state_dir),
        "NXMESH_AGENT__CONF_DIR": str(agent_env.conf_dir),
        "NXMESH_AGENT__NGINX_BINARY": agent_env.nginx_binary,
        "NXMESH_AGENT__DEPLOYMENT_MODE": "standalone",
        "NXMESH_PLUGINS__NGINX_DRIVER__ERROR_LOG_WINDOW": "0.05",
        "NXMESH_PLUGINS__NGINX_DRIVER__STATUS_PORT": str(agent_env.status_port),
        "NXMESH_LOG_LEVEL": "warning",
        "NXMESH_AGENT__METRICS_PORT": "0",
    }


class TestCli:
    @pytest.fixture
    def anyio_backend(self) -> str:
        return "asyncio"  # the CLI runs in its own process; one backend is enough

    async def test_nxmesh_agent_state_once(self, agent_env: AgentEnv) -> None:
        """``nxmesh agent --state FILE --once`` applies the file and exits 0."""
        agent_env.write_state("cli")
        env = _cli_env(agent_env)
        result = await anyio.run_process(
            [
                sys.executable,
                "-c",
                "from nxmesh.cli import main; main()",
                "agent",
                "--state",
                str(agent_env.state_file),
                "--once",
                "--json",
            ],
            env=env,
            check=False,
        )
        assert result.returncode == 0, result.stderr.decode()
        report = json.loads(result.stdout.decode().strip().splitlines()[-1])
        assert report["outcome"] == "applied"
        assert await agent_env.body() == "cli"

    async def test_running_agent_stops_cleanly_on_sigterm(self, agent_env: AgentEnv) -> None:
        """``nxmesh agent --state FILE`` serves until SIGTERM, then exits 0 and stops nginx."""
        import signal

        agent_env.write_state("daemon")
        async with await anyio.open_process(
            [
                sys.executable,
                "-c",
                "from nxmesh.cli import main; main()",
                "agent",
                "--state",
                str(agent_env.state_file),
            ],
            env=_cli_env(agent_env),
        ) as agent:
            await agent_env.wait_body("daemon", within=30)
            nginx = await agent_env.nginx_pid()
            assert nginx is not None
            agent.send_signal(signal.SIGTERM)
            with anyio.fail_after(20):
                assert await agent.wait() == 0
        assert await agent_env.nginx_pid() is None


class _Rejected(Exception):
    """What a transport raises when the master refuses this agent for good."""

    final = True


class TestLinkFailures:
    async def test_final_rejection_stops_retrying_but_keeps_serving(
        self, agent_env: AgentEnv
    ) -> None:
        """A revoked agent keeps its cached site up and stops knocking on the master."""
        await _serve_state_file_once(agent_env, "revoked")

        async with anyio.create_task_group() as tg:
            revoked = _Link(error=_Rejected("agent revoked"))
            app: AgentApp = await tg.start(agent_env.build(link=revoked).run)
            with anyio.fail_after(5):
                while not app.events.events("master.rejected"):
                    await anyio.sleep(0.02)
            await anyio.sleep(0.5)  # longer than the retry backoff in these tests
            assert len(app.events.events("master.rejected")) == 1
            assert await agent_env.body() == "revoked"
            tg.cancel_scope.cancel()

    async def test_refused_before_serving_anything_the_agent_stops(
        self, agent_env: AgentEnv
    ) -> None:
        """Refused for good with nothing applied yet (a wrong bootstrap token): no cache to
        keep serving, so `run` ends with `AgentRefusedError` saying why and what to do."""
        refused = _Link(error=_Rejected("unknown bootstrap token or wrong secret"))
        app = agent_env.build(link=refused)
        error: BaseException | None = None
        with anyio.fail_after(10):
            try:
                await app.run()
            except* AgentRefusedError as group:
                error = group
                while isinstance(error, BaseExceptionGroup):  # nested task groups
                    [error] = error.exceptions
        assert isinstance(error, AgentRefusedError)
        assert "unknown bootstrap token or wrong secret" in str(error)
        assert "nxmesh token create" in str(error)
        assert len(app.events.events("master.rejected")) == 1

    async def test_an_nxmesh_error_is_logged_without_a_traceback_and_retried(
        self, agent_env: AgentEnv
    ) -> None:
        """An unsafe credentials file (an `NxMeshError` whose message says how to fix it)
        is logged as that message on each try, not a traceback, and the link keeps
        retrying: the operator may fix it while the agent runs."""
        from structlog.testing import capture_logs

        from nxmesh.crypto.secrets import SecretError

        await _serve_state_file_once(agent_env, "unsafe")

        unsafe = _Link(error=SecretError("credentials file is readable by others; chmod 600 it"))

        with capture_logs() as logs:
            async with anyio.create_task_group() as tg:
                app: AgentApp = await tg.start(agent_env.build(link=unsafe).run)
                with anyio.fail_after(10):  # a bound: retries come after the short backoff
                    while len(app.events.events("master.error")) < 2:
                        await anyio.lowlevel.checkpoint()
                tg.cancel_scope.cancel()
        failed = [e for e in logs if e["event"] == "master link failed"]
        assert len(failed) >= 2
        assert all(e["log_level"] == "error" and "exc_info" not in e for e in failed)
        assert "chmod 600" in failed[0]["reason"]


class TestSignatures:
    def _trust(self, env: AgentEnv) -> Any:
        from nxmesh.crypto.signing import SigningKey

        key = SigningKey.generate()
        directory = env.state_dir / "agent"
        directory.mkdir(parents=True, mode=0o700)
        (directory / "master.pub").write_text(key.public_key_pem())
        return key

    async def test_known_master_key_requires_signed_updates(self, agent_env: AgentEnv) -> None:
        """With master.pub in the cache dir unsigned pushes are refused, signed ones apply."""
        from nxmesh.agent.verify import sign_update
        from nxmesh.config.versions import state_digest

        key = self._trust(agent_env)
        forged_state, real_state = agent_env.state("unsigned"), agent_env.state("signed")
        unsigned = PendingApply(version=1, digest=state_digest(forged_state), state=forged_state)
        signed = sign_update(
            PendingApply(version=2, digest=state_digest(real_state), state=real_state), key
        )
        link = _Link([unsigned])
        async with anyio.create_task_group() as tg:
            app: AgentApp = await tg.start(agent_env.build(link=link).run)
            with anyio.fail_after(5):
                while not link.reports:
                    await anyio.sleep(0.02)
            assert link.reports[0].outcome == "failed"
            assert "not signed" in link.reports[0].message
            app.submit(signed)
            await agent_env.wait_body("signed")
            tg.cancel_scope.cancel()

    async def test_state_files_need_no_master_signature(self, agent_env: AgentEnv) -> None:
        """The operator's own state file applies even when the master's key is known."""
        self._trust(agent_env)
        agent_env.write_state("local")
        async with anyio.create_task_group() as tg:
            await tg.start(agent_env.build(state_file=agent_env.state_file).run)
            await agent_env.wait_body("local")
            tg.cancel_scope.cancel()


class TestMasterKeyPinning:
    def test_enrollment_pins_and_a_different_key_later_is_refused(
        self, agent_env: AgentEnv
    ) -> None:
        """The key of the enrolling master is pinned (master.pub, signatures required); a
        resumed session offering another key changes nothing."""
        from nxmesh.crypto.signing import SigningKey

        app = agent_env.build()
        first, other = SigningKey.generate(), SigningKey.generate()
        assert app.applier.verify_key is None
        app.pin_master_key(first.verify_key, True)
        pem = (agent_env.state_dir / "agent" / "master.pub").read_text()
        assert pem == first.public_key_pem()
        assert app.applier.verify_key == first.verify_key
        assert app.applier.require_signature
        app.pin_master_key(other.verify_key, False)
        assert app.applier.verify_key == first.verify_key
        assert (agent_env.state_dir / "agent" / "master.pub").read_text() == pem
        assert "master.key_mismatch" in app.events.kinds()
        app.pin_master_key(other.verify_key, True)  # enrolled again: the new master is trusted
        assert app.applier.verify_key == other.verify_key


class TestCertificatesFromTheMaster:
    async def test_pushed_certificate_is_served_with_an_encrypted_key(
        self, agent_env: AgentEnv
    ) -> None:
        """A certificate pushed with an update: nginx serves it over TLS, while the key on
        disk (release tree, cache) is only ever encrypted under the vault's passphrase."""
        import ssl

        import attrs
        from tests.master.certs import issue

        from nxmesh.config.versions import state_digest
        from nxmesh.core.model import (
            CertificateRef,
            Listener,
            Location,
            Return,
            Site,
            TlsCertificate,
            TLSConfig,
        )

        leaf = issue("localhost", dns=("localhost",))
        state = attrs.evolve(
            agent_env.state("plain"),
            certificates=(CertificateRef(name="web", domains=("localhost",)),),
            sites=(
                Site(
                    name="secure",
                    server_names=("localhost",),
                    listeners=(Listener(port=agent_env.web_port, address="127.0.0.1", tls=True),),
                    tls=TLSConfig(certificate="web"),
                    locations=(Location(path="/", return_=Return(code=200, body="over tls")),),
                ),
            ),
        )
        cert = TlsCertificate(name="web", stem="certs/web", fullchain_pem=leaf.cert_pem,
                              key_pem=leaf.key_pem)  # fmt: skip
        update = PendingApply(
            version=1, digest=state_digest(state), state=state, certificates=(cert,)
        )
        link = _Link([update])
        async with anyio.create_task_group() as tg:
            await tg.start(agent_env.build(link=link).run)
            with anyio.fail_after(10):
                while not link.reports:
                    await anyio.sleep(0.02)
            assert link.reports[0].outcome == "applied", link.reports[0]
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            stream = await anyio.connect_tcp(
                "127.0.0.1",
                agent_env.web_port,
                ssl_context=ctx,
                tls_hostname="localhost",  # the site's name: others are refused (444)
                tls_standard_compatible=False,
            )
            async with stream:
                served = stream.extra(anyio.streams.tls.TLSAttribute.peer_certificate_binary)
            from cryptography import x509
            from cryptography.hazmat.primitives import serialization

            assert served == leaf.cert.public_bytes(serialization.Encoding.DER)
            assert x509.load_der_x509_certificate(served).subject == leaf.cert.subject
            for name in ("other.test", None):  # another SNI name, or none: refused
                with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
                    await anyio.connect_tcp(
                        "127.0.0.1", agent_env.web_port, ssl_context=ctx, tls_hostname=name
                    )
            tg.cancel_scope.cancel()
        plaintext = leaf.key_pem.split("\n")[1].encode()
        for path in [*agent_env.conf_dir.rglob("*.key"), *agent_env.state_dir.rglob("*")]:
            if path.is_file():
                assert plaintext not in path.read_bytes(), path
        keys = list(agent_env.conf_dir.rglob("web.key"))
        assert keys
        assert b"ENCRYPTED PRIVATE KEY" in keys[0].read_bytes()
        password = agent_env.state_dir / "agent" / "vault" / "ssl_password"
        assert password.stat().st_mode & 0o777 == 0o600

    async def test_retired_keys_are_pruned_from_the_vault(self, agent_env: AgentEnv) -> None:
        """After a confirmed apply the vault keeps only the keys the releases on disk
        hold: a replaced certificate's key goes once no kept release uses it."""
        import attrs
        from tests.master.certs import issue

        from nxmesh.config.versions import state_digest
        from nxmesh.core.model import (
            CertificateRef,
            Listener,
            Location,
            Return,
            Site,
            TlsCertificate,
            TLSConfig,
        )

        def update(version: int, body: str, key_pem: str, cert_pem: str) -> PendingApply:
            site = Site(
                name="secure",
                server_names=("localhost",),
                listeners=(Listener(port=agent_env.web_port, address="127.0.0.1", tls=True),),
                tls=TLSConfig(certificate="web"),
                locations=(Location(path="/", return_=Return(code=200, body=body)),),
            )
            state = attrs.evolve(
                agent_env.state(body),
                certificates=(CertificateRef(name="web", domains=("localhost",)),),
                sites=(site,),
            )
            cert = TlsCertificate(name="web", stem="certs/web", fullchain_pem=cert_pem,
                                  key_pem=key_pem)  # fmt: skip
            return PendingApply(
                version=version, digest=state_digest(state), state=state, certificates=(cert,)
            )

        old, new = issue("localhost", dns=("localhost",)), issue("localhost", dns=("localhost",))
        settings = agent_env.settings(**{"plugins.nginx_driver.keep_releases": 2})
        app = agent_env.build(settings=settings)
        keys = agent_env.state_dir / "agent" / "vault" / "keys"
        live_key = agent_env.conf_dir / "current" / "certs" / "web.key"
        try:
            report = await app.applier.apply(update(1, "v1", old.key_pem, old.cert_pem))
            assert report.outcome == "applied", report.message
            [old_key] = keys.iterdir()
            for version in (2, 3):  # the new certificate; v1's release is pruned at v3
                report = await app.applier.apply(
                    update(version, f"v{version}", new.key_pem, new.cert_pem)
                )
                assert report.outcome == "applied", report.message
                if version == 2:  # v1 is still the rollback target: its key stays
                    assert old_key.exists()
        finally:
            await app.aclose()
        assert not old_key.exists()
        [kept] = keys.iterdir()
        assert kept.read_bytes() == live_key.read_bytes()
