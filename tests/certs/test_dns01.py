"""The command DNS provider (argv, environment, timeout, stderr) and the DNS-01 solver."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import anyio
import pytest

from nxmesh.certs.acme_client import PendingChallenge
from nxmesh.certs.dns01 import Dns01Solver, dns_provider_from_settings
from nxmesh.certs.errors import DnsProviderError
from nxmesh.core.errors import ConfigurationError
from nxmesh.core.interfaces import DnsProvider
from nxmesh.core.pluginmanager import NxMeshPluginManager
from nxmesh.core.registry import ProviderRegistries
from nxmesh.core.settings import load_settings
from nxmesh.plugins.dns_command import CommandDnsProvider

pytestmark = pytest.mark.anyio

RECORD = "_acme-challenge.example.test."

RECORDER = """\
import json, os, sys
with open(os.environ["OUT"], "a") as out:
    out.write(json.dumps({"argv": sys.argv[1:], "env": dict(os.environ)}) + "\\n")
"""


def script(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "hook.py"
    path.write_text(body)
    return [sys.executable, str(path)]


def challenge(domain: str, value: str) -> PendingChallenge:
    return PendingChallenge(
        domain=domain,
        type="dns-01",
        token="t" * 43,
        key_authorization="t" * 43 + "." + "k" * 43,
        record_name=f"_acme-challenge.{domain.removeprefix('*.')}.",
        txt_value=value,
    )


class TestCommandProvider:
    """The program gets the action as argument and the record in its environment."""

    async def test_add_and_remove_pass_the_record(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """argv ends with add/remove; NXMESH_DNS_* describe the record; nothing else leaks."""
        monkeypatch.setenv("NXMESH_MASTER_KEY", "must-not-leak")
        out = tmp_path / "calls.jsonl"
        provider = CommandDnsProvider(
            script(tmp_path, RECORDER), env={"OUT": str(out), "ZONE": "example.test"}
        )
        await provider.add_txt(RECORD, "value-1")
        await provider.remove_txt(RECORD, "value-1")
        calls = [json.loads(line) for line in out.read_text().splitlines()]
        assert [c["argv"] for c in calls] == [["add"], ["remove"]]
        env = calls[0]["env"]
        assert env["NXMESH_DNS_ACTION"] == "add"
        assert env["NXMESH_DNS_RECORD_NAME"] == RECORD
        assert env["NXMESH_DNS_RECORD_VALUE"] == "value-1"
        assert env["NXMESH_DNS_DOMAIN"] == "example.test"
        assert env["ZONE"] == "example.test"
        assert "NXMESH_MASTER_KEY" not in env
        assert isinstance(provider, DnsProvider)

    async def test_failure_carries_exit_status_and_stderr(self, tmp_path: Path) -> None:
        """A non-zero exit is an error with the program's own words."""
        failing = "import sys\nsys.stderr.write('NOTAUTH: zone refused\\n')\nsys.exit(3)\n"
        provider = CommandDnsProvider(script(tmp_path, failing))
        with pytest.raises(DnsProviderError) as exc:
            await provider.add_txt(RECORD, "v")
        assert exc.value.returncode == 3
        assert "NOTAUTH: zone refused" in exc.value.stderr
        assert "exit status 3" in str(exc.value)
        assert "NOTAUTH" in str(exc.value)

    async def test_hanging_program_is_killed_at_the_timeout(self, tmp_path: Path) -> None:
        """A program that does not finish is killed; the error says so."""
        hanging = "import sys, time\nprint('waiting', file=sys.stderr, flush=True)\ntime.sleep(9)\n"
        provider = CommandDnsProvider(script(tmp_path, hanging), timeout=0.5)
        # Killed, not waited for: the program sleeps 9 s, the deadline fails the test first.
        with (
            anyio.fail_after(5),
            pytest.raises(DnsProviderError, match=r"did not finish within 0\.5 s") as exc,
        ):
            await provider.add_txt(RECORD, "v")
        assert exc.value.returncode is None
        assert "waiting" in exc.value.stderr

    async def test_missing_program_is_an_error(self, tmp_path: Path) -> None:
        """A command that cannot start is reported, naming it."""
        provider = CommandDnsProvider([str(tmp_path / "no-such-hook")])
        with pytest.raises(DnsProviderError, match="cannot run"):
            await provider.add_txt(RECORD, "v")

    def test_empty_command_is_a_configuration_error(self) -> None:
        """Without dns_command the provider refuses to exist, naming the setting."""
        with pytest.raises(ConfigurationError, match="dns_command"):
            CommandDnsProvider([])


class TestRegistration:
    """The provider is found through ``nxmesh_register_dns_providers`` and settings."""

    def test_command_provider_is_registered(self, plugin_manager: NxMeshPluginManager) -> None:
        """nxmesh_register_dns_providers of the built-in plugin registers 'command'."""
        registries = ProviderRegistries.collect(plugin_manager)
        assert registries["dns_provider"].get("command") is CommandDnsProvider
        impls = plugin_manager.hook.nxmesh_register_dns_providers.get_hookimpls()
        assert "dns_command" in {impl.plugin_name for impl in impls}

    def test_built_from_the_certs_section(
        self, plugin_manager: NxMeshPluginManager, tmp_path: Path
    ) -> None:
        """dns_command, its environment and timeout come from [plugins.certs]."""
        settings = load_settings(
            plugin_manager,
            environ={
                "NXMESH_PLUGINS__CERTS__CHALLENGE": "dns-01",
                "NXMESH_PLUGINS__CERTS__DNS_COMMAND": "/usr/local/bin/nsupdate-hook,--zone,x",
                "NXMESH_PLUGINS__CERTS__DNS_COMMAND_ENV": "KEYFILE=/etc/tsig.key",
                "NXMESH_PLUGINS__CERTS__DNS_COMMAND_TIMEOUT": "15",
            },
            overrides={"state_dir": tmp_path},
        )
        provider = dns_provider_from_settings(settings, ProviderRegistries.collect(plugin_manager))
        assert isinstance(provider, CommandDnsProvider)
        assert provider.command == ("/usr/local/bin/nsupdate-hook", "--zone", "x")
        assert provider.env == {"KEYFILE": "/etc/tsig.key"}
        assert provider.timeout == 15

    def test_unknown_provider_names_the_setting(
        self, plugin_manager: NxMeshPluginManager, tmp_path: Path
    ) -> None:
        """A dns_provider no plugin registers is a configuration error with the choices."""
        settings = load_settings(
            plugin_manager,
            environ={"NXMESH_PLUGINS__CERTS__DNS_PROVIDER": "route53"},
            overrides={"state_dir": tmp_path},
        )
        with pytest.raises(ConfigurationError, match=r"dns_provider.*'route53'.*command"):
            dns_provider_from_settings(settings, ProviderRegistries.collect(plugin_manager))


class FlakyProvider:
    """Records calls; fails adding the record named in `fail_on`."""

    name: ClassVar[str] = "flaky"

    def __init__(self, fail_on: str = "") -> None:
        self.fail_on = fail_on
        self.records: dict[str, set[str]] = {}
        self.calls: list[tuple[str, str, str]] = []

    async def add_txt(self, record_name: str, value: str) -> None:
        self.calls.append(("add", record_name, value))
        if record_name == self.fail_on:
            raise DnsProviderError("zone is read-only")
        self.records.setdefault(record_name, set()).add(value)

    async def remove_txt(self, record_name: str, value: str) -> None:
        self.calls.append(("remove", record_name, value))
        self.records.get(record_name, set()).discard(value)


class TestSolver:
    """The DNS-01 solver publishes every record and always takes them back."""

    async def test_two_values_on_one_name_coexist(self) -> None:
        """A name and its wildcard publish two TXT values on the same record."""
        provider = FlakyProvider()
        solver = Dns01Solver(provider)
        pending: Sequence[PendingChallenge] = [
            challenge("example.test", "a"),
            challenge("*.example.test", "b"),
        ]
        await solver.present(pending)
        assert provider.records == {RECORD: {"a", "b"}}
        await solver.cleanup(pending)
        assert provider.records == {RECORD: set()}

    async def test_failed_publish_removes_what_was_added(self) -> None:
        """When the second record fails, the first is removed and the error propagates."""
        provider = FlakyProvider(fail_on="_acme-challenge.b.example.test.")
        solver = Dns01Solver(provider)
        with pytest.raises(DnsProviderError, match="read-only"):
            await solver.present(
                [challenge("a.example.test", "1"), challenge("b.example.test", "2")]
            )
        assert provider.calls[-1] == ("remove", "_acme-challenge.a.example.test.", "1")
        assert provider.records["_acme-challenge.a.example.test."] == set()
