"""The contract suites in `nxmesh.testing.contracts` fail providers that are broken.

A contract a third-party plugin reuses is only worth something if it can fail. Each
test here runs one contract, in a separate pytest session (``pytester``), against a
provider broken in one typical way, and checks that the contract's own test for that
behaviour fails.
"""

from __future__ import annotations

import textwrap

import pytest

pytest_plugins = ["pytester"]


def run_contract(pytester: pytest.Pytester, source: str, *args: str) -> pytest.RunResult:
    pytester.makepyfile(test_broken=textwrap.dedent(source))
    # A subprocess: the inner session must not share this one's imported test modules.
    return pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider", *args)


def failed_tests(result: pytest.RunResult) -> set[str]:
    """Names of the failed tests (without class, parameters and file)."""
    names = set()
    for line in result.outlines:
        if line.startswith("FAILED "):
            node = line.split()[1]
            names.add(node.split("::")[-1].split("[")[0])
    return names


def test_renderer_contract_catches_a_renderer_nginx_refuses(
    pytester: pytest.Pytester, nginx_binary: str
) -> None:
    """A renderer emitting an unknown directive, dropping extra files, leaving out a
    state's plain streams and serving its TLS streams in clear (as renderers older than
    them would) fails. (One renderer broken four ways: each inner session costs seconds
    of a fresh interpreter.)"""
    result = run_contract(
        pytester,
        """
        import attrs
        import pytest
        from nxmesh.core.bundle import Bundle
        from nxmesh.plugins.render_nginx import NginxRenderer
        from nxmesh.testing.contracts import RendererContract

        class Sloppy(NginxRenderer):
            def render(self, state, *, extra_files={}):
                tls_only = tuple(s for s in state.streams if s.tls)
                files = dict(super().render(attrs.evolve(state, streams=tls_only)).files)
                if "streams.conf" in files:  # TLS in comments only: served in clear
                    files["streams.conf"] = (
                        files["streams.conf"]
                        .replace(b" ssl;", b";")
                        .replace(b"    ssl_certificate", b"    # ssl_certificate")
                    )
                files["nginx.conf"] += b"\\nnot_a_directive on;\\n"
                return Bundle(files)

        class TestSloppy(RendererContract):
            @pytest.fixture
            def renderer(self):
                return Sloppy()
        """,
    )
    assert {
        "test_nginx_accepts_the_rendering",
        "test_extra_files_are_carried_verbatim",
        "test_extra_file_outside_the_bundle_is_refused",
        "test_streams_are_rendered_or_refused",
        "test_tls_streams_use_their_certificate_or_are_refused",
    } <= failed_tests(result), result.stdout.str()


def test_health_contract_catches_a_check_that_is_always_ok(pytester: pytest.Pytester) -> None:
    """A check answering ``ok`` whatever its target does fails."""
    result = run_contract(
        pytester,
        """
        import pytest
        from nxmesh.core.model import HealthResult
        from nxmesh.testing.contracts import HealthCheckContract

        class Cheerful:
            name = "cheerful"
            async def run(self):
                return [HealthResult(check=self.name, status="ok", message="fine")]

        class TestCheerful(HealthCheckContract):
            @pytest.fixture
            def health_check(self):
                return Cheerful()

            @pytest.fixture
            def failing_health_check(self):
                return Cheerful()
        """,
    )
    assert failed_tests(result) == {"test_a_failing_target_is_reported_with_a_reason"}


def test_auth_contract_catches_a_link_that_waves_wrong_credentials_on(
    pytester: pytest.Pytester,
) -> None:
    """A link returning None for a wrong password of its own kind (so the next link of
    the chain would try it) fails, and so does one echoing the password."""
    result = run_contract(
        pytester,
        """
        import pytest
        from nxmesh.core.errors import NxMeshError
        from nxmesh.core.interfaces import Credentials, Principal
        from nxmesh.testing.contracts import AuthenticatorContract

        class Lax:
            name = "lax"
            async def authenticate(self, credentials):
                if credentials.scheme != "password":
                    return None
                if credentials.values["password"] == "right-password":
                    return Principal(subject="ann", roles=("viewer",), authenticator=self.name)
                return None

        class Chatty(Lax):
            name = "chatty"
            async def authenticate(self, credentials):
                given = credentials.values.get("password")
                if credentials.scheme == "password" and given != "right-password":
                    raise NxMeshError(f"bad password {given}")
                return await super().authenticate(credentials)

        class Base(AuthenticatorContract):
            @pytest.fixture
            def valid_credentials(self):
                return Credentials("password", {"username": "ann", "password": "right-password"})

            @pytest.fixture
            def expected_subject(self):
                return "ann"

            @pytest.fixture
            def wrong_credentials(self):
                return Credentials("password", {"username": "ann", "password": "wrong-password"})

        class TestLax(Base):
            @pytest.fixture
            def authenticator(self):
                return Lax()

        class TestChatty(Base):
            @pytest.fixture
            def authenticator(self):
                return Chatty()
        """,
    )
    failed = {line.split()[1].split("[")[0] for line in result.outlines if "FAILED" in line[:7]}
    assert failed == {
        "test_broken.py::TestLax::test_wrong_credentials_of_its_kind_are_an_error",
        "test_broken.py::TestLax::test_the_refusal_does_not_repeat_the_secret",
        "test_broken.py::TestChatty::test_the_refusal_does_not_repeat_the_secret",
    }, result.stdout.str()


def test_driver_contract_catches_a_driver_that_never_reloads(
    pytester: pytest.Pytester, nginx_binary: str
) -> None:
    """A driver that writes and reports but never makes nginx load the tree fails."""
    result = run_contract(
        pytester,
        f"""
        import pytest
        from nxmesh.agent.harness import NginxStack
        from nxmesh.testing.contracts import NginxDriverContract

        @pytest.fixture
        async def stack(tmp_path, anyio_backend):
            async with NginxStack(root=tmp_path / "n", nginx_binary={nginx_binary!r}) as s:
                # nginx runs, on its first configuration, before the driver is used.
                first = s.state("before")
                await s.driver.apply(s.update(first), s.render(first))
                yield s

        class Forgetful:
            name = "forgetful"
            def __init__(self, real):
                self.real, self.live = real, None
            async def apply(self, update, bundle, *, force=False):
                from nxmesh.core.model import ApplyReport
                self.live = bundle
                return ApplyReport(
                    agent_id="contract", version=update.version, digest=update.digest,
                    outcome="applied",
                )
            async def live_digest(self):
                return self.live.digest if self.live else None
            async def live_files(self):
                return self.live.files if self.live else None
            async def recover(self):
                return None

        class TestForgetful(NginxDriverContract):
            @pytest.fixture
            def driver(self, stack):
                return Forgetful(stack.driver)

            @pytest.fixture
            def bundle_for(self, stack):
                import attrs
                from nxmesh.core.model import Listener
                def render(state):
                    here = (Listener(port=stack.web_port, address="127.0.0.1"),)
                    sites = tuple(attrs.evolve(s, listeners=here) for s in state.sites)
                    return stack.render(attrs.evolve(state, sites=sites))
                return render

            @pytest.fixture
            def fetch_body(self, stack):
                async def fetch(host):
                    return (await stack.fetch(host=host)).text.strip()
                return fetch
        """,
        "-k",
        "asyncio",
    )
    failed = failed_tests(result)
    assert {
        "test_nginx_serves_each_applied_bundle",
        "test_a_bundle_nginx_rejects_leaves_the_old_one_serving",
        "test_recover_after_a_clean_apply_changes_nothing",
    } <= failed, result.stdout.str()
    # What the driver does report right must pass: the failures above are the contract
    # noticing nginx never loaded the tree, not the broken driver crashing.
    assert not failed & {
        "test_nothing_is_live_before_the_first_apply",
        "test_applied_bundle_becomes_live",
    }, result.stdout.str()


def test_deployment_contract_catches_a_mode_that_signals_nothing(
    pytester: pytest.Pytester, nginx_binary: str
) -> None:
    """A mode that reports some other process as nginx's master and drops signals fails."""
    result = run_contract(
        pytester,
        """
        import os
        import pytest
        from nxmesh.core.errors import NxMeshError
        from nxmesh.testing.contracts import DeploymentModeContract

        class Deaf:
            name = "deaf"
            priority = 1
            def __init__(self, pid):
                self.pid = pid
            @classmethod
            def detect(cls):
                return False
            async def nginx_pid(self):
                return self.pid
            async def start_nginx(self):
                pass
            async def signal_nginx(self, signal):
                if signal == "bogus":
                    raise NxMeshError("unknown signal bogus")

        class TestDeaf(DeploymentModeContract):
            @pytest.fixture
            def mode(self):
                return Deaf(None)

            @pytest.fixture
            def live_mode(self):
                return Deaf(os.getpid())
        """,
        "-k",
        "asyncio and not reload",
    )
    assert failed_tests(result) == {
        "test_signalling_an_absent_nginx_is_a_clear_error",
        "test_pid_of_a_running_nginx_is_its_master",
    }, result.stdout.str()
