"""``nxmesh apply``, ``diff``, ``versions`` and ``rollback`` against a real master."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from nxmesh.cli import build_cli

from .conftest import Cli

SITE = """\
upstreams:
  - name: app
    servers:
      - address: 127.0.0.1:8000
sites:
  - name: web
    server_names: [example.test]
    listeners:
      - port: 8080
    headers:
      - name: X-Version
        value: "{version}"
    locations:
      - path: /
        upstream: app
"""


@pytest.fixture
def site(tmp_path: Path) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(SITE.format(version="one"))
    return path


@pytest.fixture
def logged_in(cli: Cli) -> Cli:
    assert cli.login().exit_code == 0
    return cli


def _versions(cli: Cli, workspace: str) -> list[dict[str, object]]:
    result = cli("versions", "list", "-w", workspace, "--json")
    assert result.exit_code == 0, result.output
    versions: list[dict[str, object]] = json.loads(result.stdout)
    return versions


class TestApply:
    """``nxmesh apply -f FILE``: diff first, then a new version."""

    def test_dry_run_shows_rendered_diff_and_stores_nothing(
        self, logged_in: Cli, site: Path, workspace: str
    ) -> None:
        """--dry-run prints the model summary and nginx diff; no version appears."""
        result = logged_in("apply", "-f", str(site), "-w", workspace, "--dry-run")
        assert result.exit_code == 0, result.output
        assert "+ web" in result.stdout
        assert "+++ b/conf.d/site-web.conf" in result.stdout
        assert "+    add_header X-Version one;" in result.stdout
        assert "dry run: nothing stored" in result.stdout
        assert _versions(logged_in, workspace) == []

    def test_apply_creates_version_then_noop(
        self, logged_in: Cli, site: Path, workspace: str
    ) -> None:
        """The first apply makes version 1; applying the same file again changes nothing."""
        result = logged_in("apply", "-f", str(site), "-w", workspace, "-m", "first")
        assert result.exit_code == 0, result.output
        assert "applied: version 1 " in result.stdout
        assert f"follow it with: nxmesh rollout status --watch -w {workspace}\n" in (result.stdout)
        again = logged_in("apply", "-f", str(site), "-w", workspace)
        assert again.exit_code == 0, again.output
        assert "no changes: version 1" in again.stdout
        versions = _versions(logged_in, workspace)
        assert [(v["number"], v["message"]) for v in versions] == [(1, "first")]

    def test_diff_is_against_what_is_live(self, logged_in: Cli, site: Path, workspace: str) -> None:
        """A change shows only the changed nginx lines against the latest version."""
        logged_in("apply", "-f", str(site), "-w", workspace)
        site.write_text(SITE.format(version="two"))
        result = logged_in("apply", "-f", str(site), "-w", workspace)
        assert result.exit_code == 0, result.output
        assert "changes against version 1" in result.stdout
        assert "-    add_header X-Version one;" in result.stdout
        assert "+    add_header X-Version two;" in result.stdout
        assert "+++ b/conf.d/site-web.conf" in result.stdout
        assert "applied: version 2" in result.stdout

    def test_json_output_shape(self, logged_in: Cli, site: Path, workspace: str) -> None:
        """--json prints one document: the version created and the diffs."""
        dry = logged_in("apply", "-f", str(site), "-w", workspace, "--dry-run", "--json")
        assert dry.exit_code == 0, dry.output
        doc = json.loads(dry.stdout)
        assert doc["dry_run"] is True
        assert doc["would_change"] is True
        assert doc["base_version"] is None
        assert "site-web.conf" in doc["bundle_diff"]
        real = logged_in("apply", "-f", str(site), "-w", workspace, "--json")
        doc = json.loads(real.stdout)
        assert doc["created"] is True
        assert doc["version"]["number"] == 1
        assert len(doc["version"]["digest"]) == 64

    def test_invalid_file_exits_1_naming_fields(
        self, logged_in: Cli, site: Path, workspace: str
    ) -> None:
        """Every invalid field is listed with its path, and nothing is sent."""
        site.write_text(
            SITE.format(version="one").replace("example.test", "evil.test;")
            .replace("port: 8080", "port: 99999")
        )  # fmt: skip
        result = logged_in("apply", "-f", str(site), "-w", workspace)
        assert result.exit_code == 1
        assert "sites[0].server_names[0]" in result.stderr
        assert "sites[0].listeners[0].port" in result.stderr
        assert "invalid: 2 problems" in result.stderr
        assert str(site) in result.stderr
        assert _versions(logged_in, workspace) == []
        # --json: the same problems as the JSON error document a 422 from the master is.
        as_json = logged_in("apply", "-f", str(site), "-w", workspace, "--json")
        assert as_json.exit_code == 1
        assert as_json.stdout == ""
        error = json.loads(as_json.stderr)["error"]
        assert error["status"] == 422
        paths = [e["path"] for e in error["errors"]]
        assert paths == ["sites[0].server_names[0]", "sites[0].listeners[0].port"]

    def test_master_side_refusal_exits_1_naming_fields(
        self, logged_in: Cli, site: Path, workspace: str
    ) -> None:
        """What only the master can check (a certificate it does not have) names the field."""
        text = (
            SITE.format(version="one").replace(
                "      - port: 8080\n", "      - port: 8443\n        tls: true\n"
            )
            + "    tls:\n      certificate: missing-cert\n"
        )
        site.write_text(text)
        result = logged_in("apply", "-f", str(site), "-w", workspace)
        assert result.exit_code == 1, result.output
        assert "sites[0].tls.certificate" in result.stderr
        assert "missing-cert" in result.stderr

    def test_yaml_syntax_error_exits_1(self, logged_in: Cli, tmp_path: Path) -> None:
        """A broken YAML file names the line."""
        bad = tmp_path / "bad.yaml"
        bad.write_text("sites: [\n")
        result = logged_in("apply", "-f", str(bad))
        assert result.exit_code == 1
        assert "line" in result.stderr

    def test_outdated_base_is_a_conflict(
        self, logged_in: Cli, site: Path, workspace: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A version stored between the diff and the write is a conflict (exit 4)."""
        from nxmesh.client import Client

        logged_in("apply", "-f", str(site), "-w", workspace)
        original = Client.dry_run

        def racing_dry_run(self: Client, ws: str, state: dict[str, object]) -> object:
            preview = original(self, ws, state)
            # Someone else changes the workspace right after our diff.
            other = json.loads(json.dumps(state))
            other["sites"][0]["headers"][0]["value"] = "theirs"
            self.put_state(ws, other)
            return preview

        monkeypatch.setattr(Client, "dry_run", racing_dry_run)
        site.write_text(SITE.format(version="mine"))
        result = logged_in("apply", "-f", str(site), "-w", workspace)
        assert result.exit_code == 4, result.output
        assert [v["number"] for v in _versions(logged_in, workspace)] == [2, 1]


class TestVersions:
    """``nxmesh versions``, ``diff`` and ``rollback``."""

    @pytest.fixture
    def history(self, logged_in: Cli, site: Path, workspace: str) -> Cli:
        """Versions 1 (one) and 2 (two) in the test's workspace."""
        assert logged_in("apply", "-f", str(site), "-w", workspace, "-m", "v1").exit_code == 0
        site.write_text(SITE.format(version="two"))
        assert logged_in("apply", "-f", str(site), "-w", workspace, "-m", "v2").exit_code == 0
        return logged_in

    def test_list_table_and_bare_group(self, history: Cli, workspace: str) -> None:
        """The table shows newest first; ``nxmesh versions`` alone lists too."""
        result = history("versions", "list", "-w", workspace)
        assert result.exit_code == 0, result.output
        assert result.stdout.index("2 (latest)") < result.stdout.index(" v1 ")
        build_cli([])  # building the CLI again must not make the bare group list twice
        bare = history("versions")
        assert bare.exit_code == 0, bare.output
        # No test of this module writes to 'default': the bare group listed that workspace.
        assert bare.stdout.count("no versions in workspace 'default'") == 1

    def test_bare_group_takes_list_options(self, history: Cli, workspace: str) -> None:
        """``nxmesh versions --json`` (and --limit, -w) is ``nxmesh versions list ...``."""
        bare = history("versions", "-w", workspace, "--json")
        assert bare.exit_code == 0, bare.output
        assert json.loads(bare.stdout) == _versions(history, workspace)
        limited = json.loads(history("versions", "--limit", "1", "-w", workspace, "--json").stdout)
        assert [v["number"] for v in limited] == [2]

    def test_group_help_and_unknown_command(self, cli_command: click.Group) -> None:
        """``--help`` is still the group's; an unknown word is still no such command."""
        runner = CliRunner()
        for group in ("versions", "agents", "user"):
            shown = runner.invoke(cli_command, [group, "--help"])
            assert shown.exit_code == 0, shown.output
            assert "Commands:" in shown.stdout
            assert "list" in shown.stdout
            unknown = runner.invoke(cli_command, [group, "nope"])
            assert unknown.exit_code == 2
            assert "No such command 'nope'" in unknown.stderr

    def test_verify_still_works(self, history: Cli) -> None:
        """The existing ``versions verify`` subcommand is still there."""
        result = history("versions", "verify", "--help")
        assert result.exit_code == 0
        assert "edited, dropped, duplicated or reordered" in result.stdout

    def test_show(self, history: Cli, workspace: str) -> None:
        """One version with its metadata and its state as YAML."""
        result = history("versions", "show", "1", "-w", workspace)
        assert result.exit_code == 0, result.output
        assert "message  v1" in result.stdout
        assert "value: one" in result.stdout
        doc = json.loads(history("versions", "show", "2", "-w", workspace, "--json").stdout)
        assert doc["state"]["sites"][0]["headers"][0]["value"] == "two"
        assert doc["signature"]

    def test_show_missing_exits_4(self, history: Cli, workspace: str) -> None:
        """A version that does not exist is exit 4 with the master's message."""
        result = history("versions", "show", "99", "-w", workspace)
        assert result.exit_code == 4
        assert "has no version 99" in result.stderr

    def test_diff_forms(self, history: Cli, workspace: str) -> None:
        """No argument: latest vs previous; A: what A changed; A B: from A to B."""
        latest = history("diff", "-w", workspace)
        assert latest.exit_code == 0, latest.output
        assert "version 1 → version 2" in latest.stdout
        assert "+    add_header X-Version two;" in latest.stdout
        first = history("diff", "1", "-w", workspace)
        assert "nothing → version 1" in first.stdout
        backwards = json.loads(history("diff", "2", "1", "-w", workspace, "--json").stdout)
        assert (backwards["from_version"], backwards["to_version"]) == (2, 1)
        assert "+    add_header X-Version one;" in backwards["bundle_diff"]

    def test_rollback(self, history: Cli, workspace: str) -> None:
        """Rolling back appends version 3 with version 1's state; again is a no-op."""
        result = history("rollback", "1", "-w", workspace)
        assert result.exit_code == 0, result.output
        assert "rolled back: version 3" in result.stdout
        doc = json.loads(history("versions", "show", "3", "-w", workspace, "--json").stdout)
        assert doc["state"]["sites"][0]["headers"][0]["value"] == "one"
        again = history("rollback", "1", "-w", workspace)
        assert again.exit_code == 0
        assert "nothing to do" in again.stdout

    def test_rollback_missing_exits_4(self, history: Cli, workspace: str) -> None:
        """Rolling back to a version that does not exist is exit 4."""
        assert history("rollback", "42", "-w", workspace).exit_code == 4


def test_the_follow_up_hint_keeps_the_profile() -> None:
    """The printed `rollout status` command asks the master this command asked: with a
    non-default profile, that profile."""
    from nxmesh.cli.client_cmds import _watch_command

    assert _watch_command("prod", "default") == "nxmesh rollout status --watch -w prod"
    assert _watch_command("prod", "eu west") == (
        "nxmesh rollout status --watch -w prod --profile 'eu west'"
    )
