"""``nxmesh render`` and ``nxmesh validate``: bundles on disk, real ``nginx -t``, clear errors."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from nxmesh.agent.layout import render_settings_of
from nxmesh.cli import build_cli
from nxmesh.cli.render_cmd import MANIFEST
from nxmesh.core.loader import load_state_files
from nxmesh.core.pluginmanager import get_plugin_manager
from nxmesh.core.settings import load_settings
from nxmesh.plugins.render_nginx import config_digest, renderer_for
from nxmesh.testing.services import require_binary

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(
    p for p in (REPO / "examples").rglob("*") if p.suffix in (".yaml", ".yml", ".json")
)
QUICKSTART = REPO / "examples" / "quickstart" / "site.yaml"
# Each takes ports other examples use, with a setting every site there must share (PROXY
# protocol on 80 and 443; public ports for 8080 and 8443): they validate alone, not
# merged with the others.
ALONE = {
    REPO / "examples" / "behind-load-balancer.yaml",
    REPO / "examples" / "unprivileged-ports.yaml",
}

Invoke = Callable[..., Result]


@pytest.fixture
def invoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Invoke:
    """Run the nxmesh CLI in an empty directory with no NXMESH_* settings from outside."""
    for name in list(os.environ):
        if name.startswith("NXMESH_"):
            monkeypatch.delenv(name)
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.chdir(workdir)

    def run(*args: str | Path) -> Result:
        argv = [str(a) for a in args]
        cli: click.Group = build_cli(argv)
        return CliRunner().invoke(cli, argv, catch_exceptions=False)

    return run


def broken_template_dir(tmp_path: Path, text: str) -> Path:
    directory = tmp_path / "templates"
    directory.mkdir()
    (directory / "http_extra.conf.j2").write_text(text)
    return directory


def site_file(tmp_path: Path, sites: list[str]) -> Path:
    """A state file with one proxy site per name."""
    lines = [
        "upstreams:",
        "  - name: app",
        "    servers: [{address: '127.0.0.1:8000'}]",
        "sites:",
    ]
    for name in sites:
        lines += [
            f"  - name: {name}",
            f"    server_names: [{name}.example.test]",
            "    locations: [{path: /, upstream: app}]",
        ]
    path = tmp_path / f"state-{'-'.join(sites)}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


class TestRender:
    """``nxmesh render FILE -o DIR`` writes a bundle and prints its digest."""

    def test_writes_the_bundle_and_prints_its_digests(self, invoke: Invoke, tmp_path: Path) -> None:
        """Every bundle file lands in DIR, byte for byte; the digests printed are the
        bundle's, rendered with this host's settings (`agent.listen_ipv6` is `auto`)."""
        out = tmp_path / "out"
        result = invoke("render", QUICKSTART, "-o", out)
        assert result.exit_code == 0, result.output
        pm = get_plugin_manager()
        host = render_settings_of(load_settings(pm, environ={}))
        bundle = renderer_for(pm, render_settings=host).render(load_state_files([QUICKSTART]))
        for rel, data in bundle.files.items():
            assert (out / rel).read_bytes() == data
        assert f"digest: {bundle.digest}\n" in result.stdout
        assert f"config digest: {config_digest(bundle.files)}\n" in result.stdout
        manifest = json.loads((out / MANIFEST).read_text())
        assert manifest["files"] == sorted(bundle.files)
        assert manifest["digest"] == bundle.digest

    def test_json_output(self, invoke: Invoke, tmp_path: Path) -> None:
        """--json reports files and digests machine-readably."""
        result = invoke("render", QUICKSTART, "-o", tmp_path / "out", "--json")
        report = json.loads(result.stdout)
        assert "nginx.conf" in report["files"]
        assert len(report["digest"]) == 64

    def test_refuses_a_non_empty_directory_that_is_no_bundle(
        self, invoke: Invoke, tmp_path: Path
    ) -> None:
        """An unrelated non-empty directory is left alone (exit 2) unless --force."""
        out = tmp_path / "out"
        out.mkdir()
        (out / "precious.txt").write_text("keep me")
        refused = invoke("render", QUICKSTART, "-o", out)
        assert refused.exit_code == 2
        assert "--force" in refused.stderr
        assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
        forced = invoke("render", QUICKSTART, "-o", out, "--force")
        assert forced.exit_code == 0, forced.output
        assert (out / "nginx.conf").is_file()
        assert (out / "precious.txt").read_text() == "keep me"

    def test_rerender_replaces_a_previous_bundle_and_drops_stale_files(
        self, invoke: Invoke, tmp_path: Path
    ) -> None:
        """Rendering into a previous bundle removes a deleted site's file from conf.d."""
        out = tmp_path / "out"
        assert invoke("render", site_file(tmp_path, ["a", "b"]), "-o", out).exit_code == 0
        assert (out / "conf.d/site-b.conf").is_file()
        result = invoke("render", site_file(tmp_path, ["a"]), "-o", out)
        assert result.exit_code == 0, result.output
        assert not (out / "conf.d/site-b.conf").exists()
        assert (out / "conf.d/site-a.conf").is_file()
        assert "conf.d/site-b.conf" in result.stdout

    def test_invalid_state_lists_problems(self, invoke: Invoke, tmp_path: Path) -> None:
        """A state the model rejects writes nothing and exits 1 naming the field."""
        bad = tmp_path / "bad.yaml"
        bad.write_text("sites:\n  - name: x\n    server_names: ['a;b']\n    locations: []\n")
        result = invoke("render", bad, "-o", tmp_path / "out")
        assert result.exit_code == 1
        assert "sites[0].server_names[0]" in result.stderr
        assert not (tmp_path / "out").exists()

    def test_template_error_names_file_and_line(self, invoke: Invoke, tmp_path: Path) -> None:
        """A failing template override exits 1 with the template path and line."""
        templates = broken_template_dir(tmp_path, "    # fine\n    x {{ missing.attr }};\n")
        result = invoke("render", QUICKSTART, "-o", tmp_path / "out", "--template-dir", templates)
        assert result.exit_code == 1
        assert f"{templates / 'http_extra.conf.j2'}, line 2" in result.stderr


class TestValidate:
    """``nxmesh validate`` checks model, rendering and real ``nginx -t``."""

    def test_there_are_examples(self) -> None:
        """The example states exist (the parametrized test below would pass vacuously)."""
        assert {p.name for p in EXAMPLES} >= {"site.yaml", "tls-site.yaml", "multi-site.yaml"}

    @pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: str(p.relative_to(REPO)))
    def test_every_example_passes_real_nginx_t(self, invoke: Invoke, example: Path) -> None:
        """Each file in examples/ validates, including a real `nginx -t` of its bundle."""
        require_binary("nginx")
        result = invoke("validate", example)
        assert result.exit_code == 0, result.output
        assert "nginx -t ok" in result.stdout

    def test_the_models_warnings_are_shown(self, invoke: Invoke, tmp_path: Path) -> None:
        """A warning of the model (here: a site reading PROXY protocol lines that believes
        the X-Forwarded-For a TCP balancer passes through) is printed, as the master
        reports it, and the state is still valid; `--json` lists it too."""
        state = tmp_path / "behind.yaml"
        state.write_text(
            "upstreams: [{name: app, servers: [{address: '127.0.0.1:9000'}]}]\n"
            "sites:\n"
            "  - name: app\n"
            "    server_names: [app.test]\n"
            "    listeners: [{port: 8380, proxy_protocol: true}]\n"
            "    real_ip_from: [10.0.0.0/8]\n"
            "    locations: [{path: /, upstream: app}]\n"
        )
        result = invoke("validate", "--no-nginx", state)
        assert result.exit_code == 0, result.output
        assert "warning: sites[0].real_ip_header: is X-Forwarded-For" in result.stderr
        report = json.loads(invoke("validate", "--no-nginx", "--json", state).stdout)
        assert [p["path"] for p in report["problems"]] == ["sites[0].real_ip_header"]

    def test_nginx_warnings_are_shown_once_each(self, invoke: Invoke, tmp_path: Path) -> None:
        """A bundle nginx accepts with a warning (2,560 server names overflow its default
        hash size) is valid, and the warning is printed once, without nginx's time."""
        require_binary("nginx")
        sites = "".join(
            f"  - {{name: s{s}, server_names: ["
            + ", ".join(f"host-{s}-{n}.example.test" for n in range(64))
            + "], listeners: [{port: 8380}], locations: [{path: /, upstream: app}]}\n"
            for s in range(40)
        )
        state = tmp_path / "many.yaml"
        state.write_text(
            "upstreams: [{name: app, servers: [{address: '127.0.0.1:9000'}]}]\nsites:\n" + sites
        )
        result = invoke("validate", state)
        assert result.exit_code == 0, result.output
        warnings = [line for line in result.stderr.splitlines() if "nginx -t:" in line]
        # The max size is 512, or what an installed plugin's http_extra raised it to.
        [warning] = warnings
        assert re.fullmatch(
            r"warning: nginx -t: could not build optimal server_names_hash, you should "
            r"increase either server_names_hash_max_size: \d+ or "
            r"server_names_hash_bucket_size: 64; ignoring server_names_hash_bucket_size",
            warning,
        ), warning

    def test_an_override_setting_the_bucket_size_wins(self, invoke: Invoke, tmp_path: Path) -> None:
        """The advice before the base template set it: an http_extra.conf.j2 that sets
        server_names_hash_bucket_size keeps working with a long name (nginx refuses the
        directive twice), its size standing."""
        require_binary("nginx")
        templates = tmp_path / "templates"
        templates.mkdir()
        (templates / "http_extra.conf.j2").write_text("    server_names_hash_bucket_size 256;\n")
        state = tmp_path / "long.yaml"
        state.write_text(
            "upstreams: [{name: app, servers: [{address: '127.0.0.1:9000'}]}]\n"
            "sites:\n"
            f"  - {{name: app, server_names: [{'a' * 60}.example.test], "
            "listeners: [{port: 8380}], locations: [{path: /, upstream: app}]}\n"
        )
        result = invoke("validate", state, "--template-dir", templates)
        assert result.exit_code == 0, result.output
        out = tmp_path / "out"
        assert invoke("render", state, "-o", out, "--template-dir", templates).exit_code == 0
        conf = (out / "nginx.conf").read_text()
        assert conf.count("server_names_hash_bucket_size") == 1
        assert "server_names_hash_bucket_size 256;" in conf
        out = tmp_path / "plain"
        assert invoke("render", state, "-o", out).exit_code == 0
        assert "server_names_hash_bucket_size 128;" in (out / "nginx.conf").read_text()

    def test_all_examples_together(self, invoke: Invoke) -> None:
        """Several files merge into one state that also passes nginx -t (JSON report)."""
        require_binary("nginx")
        result = invoke("validate", *(p for p in EXAMPLES if p not in ALONE), "--json")
        report = json.loads(result.stdout)
        assert result.exit_code == 0, report
        assert report["valid"] is True
        assert report["nginx"]["ran"] is True
        assert report["nginx"]["ok"] is True
        assert report["summary"]["sites"] >= 6

    def test_override_breaking_nginx_syntax_reports_nginx_message(
        self, invoke: Invoke, tmp_path: Path
    ) -> None:
        """A template override nginx rejects fails validation with nginx's own words, citing
        the bundle file and line."""
        require_binary("nginx")
        templates = broken_template_dir(tmp_path, "    bogus_directive on;\n")
        result = invoke("validate", QUICKSTART, "--template-dir", templates)
        assert result.exit_code == 1
        assert 'unknown directive "bogus_directive" in nginx.conf:' in result.stderr
        assert "test failed" in result.stderr

    def test_override_from_settings_file(self, invoke: Invoke, tmp_path: Path) -> None:
        """The renderer.template_dir setting is honoured like --template-dir."""
        require_binary("nginx")
        templates = broken_template_dir(tmp_path, "    worker_processes 2;\n")
        config = tmp_path / "nxmesh.toml"
        config.write_text(f'[renderer]\ntemplate_dir = "{templates}"\n')
        result = invoke("--config", config, "validate", QUICKSTART)
        assert result.exit_code == 1
        assert '"worker_processes" directive is not allowed here' in result.stderr

    def test_config_may_follow_the_command(
        self, invoke: Invoke, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """``nxmesh validate --config F`` is ``nxmesh --config F validate`` (as
        ``nxmesh-agent --config F`` and the docs' ``nxmesh agent --config F`` suggest)."""
        from nxmesh.cli import config_first, main

        require_binary("nginx")
        templates = broken_template_dir(tmp_path, "    worker_processes 2;\n")
        config = tmp_path / "nxmesh.toml"
        config.write_text(f'[renderer]\ntemplate_dir = "{templates}"\n')
        with pytest.raises(SystemExit) as exited:
            main(["validate", str(QUICKSTART), "--config", str(config)])
        assert exited.value.code == 1
        assert '"worker_processes" directive is not allowed here' in capsys.readouterr().err
        assert config_first(["agent", "--once", "--config=f"]) == ["--config=f", "agent", "--once"]
        with pytest.raises(SystemExit) as twice:
            main(["--config", str(config), "validate", str(QUICKSTART), "--config", str(config)])
        assert twice.value.code == 2
        assert "--config is given more than once" in capsys.readouterr().err
        assert config_first(["apply", "-m", "x", "--", "--config", "f"]) == [
            "apply", "-m", "x", "--", "--config", "f",
        ]  # fmt: skip

    def test_no_nginx_skips_the_nginx_check(self, invoke: Invoke, tmp_path: Path) -> None:
        """--no-nginx validates model and rendering only: nginx syntax errors go unnoticed."""
        templates = broken_template_dir(tmp_path, "    bogus_directive on;\n")
        result = invoke("validate", QUICKSTART, "--no-nginx", "--template-dir", templates)
        assert result.exit_code == 0, result.output
        assert "nginx -t skipped" in result.stdout

    def test_named_nginx_binary_must_exist(self, invoke: Invoke, tmp_path: Path) -> None:
        """An explicitly named nginx that is missing is an error, not a silent skip."""
        result = invoke("validate", QUICKSTART, "--nginx", tmp_path / "no-such-nginx")
        assert result.exit_code == 2
        assert "no-such-nginx" in result.stderr

    def test_missing_certificates_are_stood_in_for(self, invoke: Invoke, tmp_path: Path) -> None:
        """A TLS site validates before its certificate exists: nginx -t loads a throwaway one,
        and nothing is left in the working directory."""
        require_binary("nginx")
        result = invoke("validate", REPO / "examples" / "tls-site.yaml")
        assert result.exit_code == 0, result.output
        assert list(Path.cwd().iterdir()) == []

    @pytest.mark.parametrize("store", ["/nonexistent/ca-bundle.crt", None])
    def test_tls_upstreams_are_checked_against_the_hosts_trust_store(
        self, invoke: Invoke, tmp_path: Path, store: str | None
    ) -> None:
        """validate renders with this host's ``agent.upstream_ca_file``, as its agent
        would: a store that does not exist fails nginx -t naming it."""
        require_binary("nginx")
        config = tmp_path / "nxmesh.toml"
        config.write_text(f'[agent]\nupstream_ca_file = "{store}"\n' if store else "")
        result = invoke("--config", config, "validate", REPO / "examples" / "app-and-api.yaml")
        if store is None:
            assert result.exit_code == 0, result.output
        else:
            assert result.exit_code == 1, result.output
            assert store in result.output

    def test_model_problems_are_reported_before_rendering(
        self, invoke: Invoke, tmp_path: Path
    ) -> None:
        """Injection attempts never reach the renderer: the model names the field."""
        bad = tmp_path / "bad.yaml"
        bad.write_text(
            "upstreams: [{name: app, servers: [{address: '127.0.0.1:1'}]}]\n"
            "sites:\n"
            "  - name: x\n"
            "    server_names: [x.test]\n"
            "    headers: [{name: X-A, value: 'a\"; return 200 pwned; #'}]\n"
            "    locations: [{path: /, upstream: app}]\n"
        )
        result = invoke("validate", bad, "--json")
        assert result.exit_code == 1
        report = json.loads(result.stdout)
        assert [p["path"] for p in report["problems"]] == ["sites[0].headers[0].value"]

    def test_the_rules_for_new_input_apply_as_on_the_master(
        self, invoke: Invoke, tmp_path: Path
    ) -> None:
        """What the master refuses of a new state (`submission_problems`: a FastCGI
        upstream over TLS, or one a proxy location speaks HTTP to), validate refuses
        too, naming each file's own indices."""
        upstreams = tmp_path / "upstreams.yaml"
        upstreams.write_text(
            "upstreams:\n"
            "  - {name: php, servers: [{address: '127.0.0.1:9000'}], tls: {verify: false}}\n"
            "  - {name: fpm, servers: [{address: '127.0.0.1:9001'}]}\n"
        )
        sites = tmp_path / "sites.yaml"
        sites.write_text(
            "sites:\n"
            "  - name: x\n"
            "    server_names: [x.test]\n"
            "    locations:\n"
            "      - {path: /app/, fastcgi: {upstream: php, root: /srv/www/x}}\n"
            "      - {path: /fpm/, fastcgi: {upstream: fpm, root: /srv/www/x}}\n"
            "      - {path: /api/, upstream: fpm}\n"
        )
        result = invoke("validate", upstreams, sites, "--json")
        assert result.exit_code == 1, result.stdout
        report = json.loads(result.stdout)
        assert report["source"] == str(sites)
        assert [p["path"] for p in report["problems"]] == [
            "sites[0].locations[0].fastcgi.upstream",
            "sites[0].locations[1].fastcgi.upstream",
        ]
