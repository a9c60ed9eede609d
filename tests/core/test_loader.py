"""Loading desired state files: YAML and JSON, strict parsing, merging several files."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import yaml

from nxmesh.core import loader
from nxmesh.core.errors import ValidationError
from nxmesh.core.loader import load_state_file, load_state_files
from nxmesh.core.model import Return, TLSConfig

SITE_YAML = """\
workspace: prod
upstreams:
  - name: app
    servers:
      - address: 10.0.0.5:8080
      - address: app-2.internal:8080
        backup: true
sites:
  - name: web
    server_names: [Example.com, www.example.com]
    listeners:
      - {port: 443, tls: true, http2: true}
      - {port: 80}
    tls: acme
    headers:
      - {name: Strict-Transport-Security, value: max-age=31536000, always: true}
    locations:
      - path: /
        upstream: app
        websocket: true
      - path: /healthz
        match: exact
        return: {code: 200, body: ok}
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load_problems(*paths: Path) -> tuple[str | None, dict[str, str]]:
    with pytest.raises(ValidationError) as info:
        load_state_files(paths)
    return info.value.source, {p.path: p.message for p in info.value.problems}


class TestLoadOneFile:
    def test_realistic_yaml(self, tmp_path: Path) -> None:
        """A realistic YAML file loads into the expected state."""
        state = load_state_file(write(tmp_path, "site.yaml", SITE_YAML))
        assert state.workspace == "prod"
        site = state.sites[0]
        assert site.server_names == ("example.com", "www.example.com")
        assert site.tls == TLSConfig(acme=True)
        assert site.locations[1].return_ == Return(200, "ok")
        assert state.upstreams[0].servers[1].backup

    def test_json_file(self, tmp_path: Path) -> None:
        """A .json file is read as JSON and gives the same state as its YAML twin."""
        data = yaml.safe_load(SITE_YAML)
        path = write(tmp_path, "site.json", json.dumps(data))
        assert load_state_file(path) == load_state_file(write(tmp_path, "s.yaml", SITE_YAML))

    def test_empty_file_is_empty_state(self, tmp_path: Path) -> None:
        """An empty file is an empty state in the default workspace."""
        state = load_state_file(write(tmp_path, "empty.yaml", ""))
        assert (state.sites, state.workspace) == ((), "default")

    def test_source_is_the_file(self, tmp_path: Path) -> None:
        """Problems carry the file path as source and the field as path."""
        path = write(tmp_path, "bad.yaml", "sites: [{name: web, server_names: [a.com]}]\n")
        source, problems = load_problems(path)
        assert source == str(path)
        assert problems == {"sites[0].locations": "is required"}

    def test_unknown_key_did_you_mean(self, tmp_path: Path) -> None:
        """A misspelt key is reported with a suggestion."""
        path = write(tmp_path, "s.yaml", "upstream:\n  - name: app\n")
        _, problems = load_problems(path)
        assert problems == {"upstream": "unknown field 'upstream'; did you mean 'upstreams'?"}

    def test_all_problems_at_once(self, tmp_path: Path) -> None:
        """Several bad fields are reported together."""
        text = SITE_YAML.replace("Example.com", "exa;mple.com").replace("port: 80}", "port: 0}")
        _, problems = load_problems(write(tmp_path, "s.yaml", text))
        assert set(problems) == {"sites[0].server_names[0]", "sites[0].listeners[1].port"}

    def test_missing_file_is_os_error(self, tmp_path: Path) -> None:
        """A file that does not exist raises the OSError, not a validation error."""
        with pytest.raises(FileNotFoundError):
            load_state_file(tmp_path / "nope.yaml")


class TestYamlStrictness:
    def test_duplicate_key(self, tmp_path: Path) -> None:
        """A repeated mapping key is an error naming the field and both lines."""
        text = """\
        sites:
          - name: web
            server_names: [a.com]
            name: other
        """
        _, problems = load_problems(write(tmp_path, "s.yaml", text))
        assert problems == {
            "sites[0].name": "duplicate key 'name' at line 4, column 5 (first at line 2, column 5)"
        }

    def test_merge_key_override_is_not_a_duplicate(self, tmp_path: Path) -> None:
        """A '<<' merge followed by an override is allowed."""
        text = """\
        sites:
          - name: web
            server_names: [a.com]
            listeners:
              - &plain {port: 8080}
              - {<<: *plain, port: 8081}
            locations: [{path: /, return: {code: 204}}]
        """
        state = load_state_file(write(tmp_path, "s.yaml", text))
        assert [lst.port for lst in state.sites[0].listeners] == [8080, 8081]

    def test_syntax_error_has_line_and_column(self, tmp_path: Path) -> None:
        """A YAML syntax error reports its line and column."""
        path = write(tmp_path, "s.yaml", "sites:\n  - name: web\n   bad: [\n")
        _, problems = load_problems(path)
        [(where, message)] = problems.items()
        assert where == ""
        assert message.startswith("YAML syntax error at line ")
        assert "column" in message

    def test_python_tags_are_refused(self, tmp_path: Path) -> None:
        """Python object tags are not constructed (safe loading)."""
        path = write(tmp_path, "s.yaml", 'workspace: !!python/object/apply:os.system ["id"]\n')
        _, problems = load_problems(path)
        assert "python/object/apply" in problems[""]

    def test_alias_bomb_is_refused(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Aliases that expand beyond the node budget are refused before construction."""
        monkeypatch.setattr(loader, "MAX_YAML_NODES", 10_000)
        lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
        lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
        _, problems = load_problems(write(tmp_path, "bomb.yaml", "\n".join(lines) + "\n"))
        assert "expands to more than 10000 nodes" in problems[""]

    def test_deep_nesting_is_refused(self, tmp_path: Path) -> None:
        """Absurdly deep nesting is a problem, not a crash."""
        path = write(tmp_path, "deep.yaml", "sites: " + "[" * 5000 + "]" * 5000 + "\n")
        _, problems = load_problems(path)
        assert problems

    def test_not_utf8(self, tmp_path: Path) -> None:
        """A file that is not UTF-8 is reported as such."""
        path = tmp_path / "s.yaml"
        path.write_bytes(b"workspace: \xff\xfe\n")
        _, problems = load_problems(path)
        assert "not UTF-8" in problems[""]

    def test_file_size_is_capped(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Files beyond the size cap are refused without parsing."""
        monkeypatch.setattr(loader, "MAX_FILE_BYTES", 100)
        _, problems = load_problems(write(tmp_path, "s.yaml", SITE_YAML))
        assert "larger than 100 bytes" in problems[""]

    def test_yaml_booleans_are_not_strings(self, tmp_path: Path) -> None:
        """YAML 1.1 'on' becomes a boolean, which is reported where a string belongs,
        with the fix (quotes); so is a number (``1.10`` would be 1.1)."""
        path = write(tmp_path, "s.yaml", "workspace: on\n")
        _, problems = load_problems(path)
        assert problems == {
            "workspace": "must be a string, got a boolean (True); write it as a quoted "
            "string (YAML reads unquoted yes, no, on, off, true and false as booleans)"
        }
        _, problems = load_problems(write(tmp_path, "n.yaml", "workspace: 1.10\n"))
        assert problems == {
            "workspace": "must be a string, got a number (1.1); put the value in quotes to "
            "keep it as written"
        }


class TestJsonStrictness:
    def test_duplicate_key(self, tmp_path: Path) -> None:
        """A repeated JSON object key is an error at its path."""
        path = write(tmp_path, "s.json", '{"sites": [{"name": "a", "name": "b"}]}')
        _, problems = load_problems(path)
        assert problems == {"sites[0].name": "duplicate key 'name'"}

    def test_syntax_error(self, tmp_path: Path) -> None:
        """A JSON syntax error reports line and column."""
        path = write(tmp_path, "s.json", '{\n  "sites": [,]\n}')
        _, problems = load_problems(path)
        assert problems[""].startswith("JSON syntax error at line 2, column 13")


UPSTREAMS = """\
upstreams:
  - name: app
    servers: [{address: "app:80"}]
"""

SITES = """\
sites:
  - name: web
    server_names: [example.com]
    locations: [{path: /, upstream: app}]
"""


class TestMerge:
    def test_cross_file_references(self, tmp_path: Path) -> None:
        """A site may use an upstream defined in another file."""
        state = load_state_files(
            [write(tmp_path, "up.yaml", UPSTREAMS), write(tmp_path, "sites.yaml", SITES)]
        )
        assert [s.name for s in state.sites] == ["web"]
        assert [u.name for u in state.upstreams] == ["app"]

    def test_dangling_reference_points_at_its_file(self, tmp_path: Path) -> None:
        """Without the upstream file the reference is reported in the sites file."""
        up = write(tmp_path, "up.yaml", UPSTREAMS.replace("name: app", "name: other"))
        sites = write(tmp_path, "sites.yaml", SITES)
        source, problems = load_problems(up, sites)
        assert source == str(sites)
        assert set(problems) == {"sites[0].locations[0].upstream"}

    def test_duplicate_across_files(self, tmp_path: Path) -> None:
        """A name defined in two files is reported in the later file, naming the first."""
        first = write(tmp_path, "a.yaml", UPSTREAMS)
        second = write(
            tmp_path, "b.yaml", "upstreams:\n  - {name: x, servers: [{address: 'x:1'}]}\n"
        )
        third = write(tmp_path, "c.yaml", UPSTREAMS)
        source, problems = load_problems(first, second, third)
        assert source == str(third)
        assert problems == {
            "upstreams[0].name": f"upstream name 'app' is already used by upstreams[0] in {first}"
        }

    def test_the_same_file_twice_is_said_so(self, tmp_path: Path) -> None:
        """``-f ups.yaml -f ups.yaml`` (or ``sub/../ups.yaml``): not "'app' is already used by
        upstreams[0]" about the file's own upstream, but what happened."""
        ups = write(tmp_path, "ups.yaml", UPSTREAMS)
        source, problems = load_problems(ups, ups)
        assert source == str(ups)
        assert problems == {"": "is the same file, given twice"}
        (tmp_path / "sub").mkdir()
        again = tmp_path / "sub" / ".." / "ups.yaml"
        _, problems = load_problems(ups, again)
        assert problems == {"": f"is the same file as {ups}, given twice"}

    def test_workspace_conflict(self, tmp_path: Path) -> None:
        """Files naming different workspaces cannot be merged."""
        a = write(tmp_path, "a.yaml", "workspace: prod\n")
        b = write(tmp_path, "b.yaml", "workspace: dev\n")
        source, problems = load_problems(a, b)
        assert source == str(b)
        assert problems == {"workspace": f"is 'dev' but {a} says 'prod'"}

    def test_workspace_from_any_file(self, tmp_path: Path) -> None:
        """A workspace named by one file applies to the merged state."""
        a = write(tmp_path, "a.yaml", UPSTREAMS)
        b = write(tmp_path, "b.yaml", "workspace: prod\n")
        assert load_state_files([a, b]).workspace == "prod"

    def test_problems_in_several_files(self, tmp_path: Path) -> None:
        """Problems in several files are all reported, each path prefixed with its file."""
        a = write(tmp_path, "a.yaml", "workspace: 1\n")
        b = write(tmp_path, "b.yaml", "sites: 2\n")
        source, problems = load_problems(a, b)
        assert source is None
        assert set(problems) == {f"{a}: workspace", f"{b}: sites"}

    def test_no_files_is_empty_state(self) -> None:
        """Merging nothing gives the empty state."""
        assert load_state_files([]).sites == ()


# Field problems (a bad header value, a bad port) and cross-object problems (an unknown
# upstream, a duplicate site name, a TLS and a plain site on one port) in one file.
MIXED = """\
upstreams:
  - name: app
    servers: [{address: "app:80"}]
certificates:
  - {name: main, domains: [a.example.com]}
sites:
  - name: web
    server_names: [a.example.com]
    listeners: [{port: 443, tls: true}]
    tls: {certificate: main}
    locations:
      - path: /
        upstream: app
        headers: [{name: X-A, value: "a;b"}]
      - {path: /api, upstream: api}
  - name: web
    server_names: [b.example.com]
    listeners: [{port: 443}, {port: 70000}]
    locations: [{path: /, upstream: app}]
"""


class TestAllProblemsInOnePass:
    def test_field_and_cross_object_problems_together(self, tmp_path: Path) -> None:
        """One load reports the field problems and the cross-object ones, each at its path."""
        path = write(tmp_path, "mixed.yaml", MIXED)
        source, problems = load_problems(path)
        assert source == str(path)
        assert set(problems) == {
            "sites[0].locations[0].headers[0].value",
            "sites[1].listeners[1].port",
            "sites[0].locations[1].upstream",
            "sites[1].name",
            "sites[1].listeners[0].tls",
        }
        assert problems["sites[0].locations[1].upstream"] == (
            "refers to unknown upstream 'api' (did you mean 'app'?)"
        )
        assert problems["sites[1].name"] == "site name 'web' is already used by sites[0]"

    def test_field_problems_come_first(self, tmp_path: Path) -> None:
        """Field problems are listed before cross-object ones, each once."""
        with pytest.raises(ValidationError) as info:
            load_state_file(write(tmp_path, "mixed.yaml", MIXED))
        paths = [p.path for p in info.value.problems]
        assert len(paths) == len(set(paths)) == 5
        assert paths[:2] == ["sites[0].locations[0].headers[0].value", "sites[1].listeners[1].port"]

    def test_reference_to_an_invalid_upstream_is_not_unknown(self, tmp_path: Path) -> None:
        """An upstream that failed its own checks still exists for the sites naming it."""
        text = SITES + "upstreams:\n  - {name: app, servers: [{address: 'app'}]}\n"
        _, problems = load_problems(write(tmp_path, "s.yaml", text))
        assert set(problems) == {"upstreams[0].servers[0].address"}

    def test_unreadable_upstream_name_silences_references(self, tmp_path: Path) -> None:
        """When an upstream's name is broken, no reference is called unknown because of it."""
        text = SITES + "upstreams:\n  - {name: App, servers: [{address: 'app:80'}]}\n"
        _, problems = load_problems(write(tmp_path, "s.yaml", text))
        assert set(problems) == {"upstreams[0].name"}

    def test_invalid_objects_are_left_out(self, tmp_path: Path) -> None:
        """A location that failed is not cross-checked; the site's other parts still are."""
        text = """\
        sites:
          - name: a
            server_names: [a.example.com]
            locations:
              - {path: /, upstream: nope, proxy_read_timeout: 0}
              - {path: /x, root: /srv/x}
              - {path: /x, root: /srv/y}
        """
        _, problems = load_problems(write(tmp_path, "s.yaml", text))
        assert problems == {
            "sites[0].locations[0].proxy_read_timeout": "must be from 1 to 86400, got 0",
            "sites[0].locations[2].path": "prefix location '/x' repeats locations[1]",
        }

    def test_repeated_listener_is_reported_once(self, tmp_path: Path) -> None:
        """A listener repeating another of its site is one problem, not also a TLS clash."""
        text = """\
        sites:
          - name: a
            server_names: [a.example.com]
            listeners: [{port: 443, tls: true}, {port: 443}]
            tls: acme
            locations: [{path: /, root: /srv}]
        """
        _, problems = load_problems(write(tmp_path, "s.yaml", text))
        assert set(problems) == {"sites[0].listeners[1].port"}

    def test_indices_skip_invalid_items(self, tmp_path: Path) -> None:
        """Cross-object problems keep the file's indices when earlier items were invalid."""
        text = """\
        upstreams:
          - {name: bad, servers: []}
          - {name: app, servers: [{address: 'a:1'}]}
          - {name: app, servers: [{address: 'b:1'}]}
        """
        _, problems = load_problems(write(tmp_path, "s.yaml", text))
        assert problems == {
            "upstreams[0].servers": "needs at least one server",
            "upstreams[2].name": "upstream name 'app' is already used by upstreams[1]",
        }

    def test_across_files(self, tmp_path: Path) -> None:
        """Field problems in one file do not hide a duplicate with another file."""
        first = write(tmp_path, "a.yaml", UPSTREAMS + "  - {name: x, servers: [{address: x}]}\n")
        second = write(tmp_path, "b.yaml", SITES + UPSTREAMS)
        source, problems = load_problems(first, second)
        assert source is None
        assert set(problems) == {
            f"{first}: upstreams[1].servers[0].address",
            f"{second}: upstreams[0].name",
        }
        assert problems[f"{second}: upstreams[0].name"] == (
            f"upstream name 'app' is already used by upstreams[0] in {first}"
        )

    def test_reference_to_another_file_resolves(self, tmp_path: Path) -> None:
        """A file with field problems still sees the upstreams other files define."""
        text = SITES.replace(
            "locations: [{path: /, upstream: app}]",
            ("locations: [{path: /, upstream: app}, {path: /x, upstream: app, root: /srv}]"),
        )
        sites = write(tmp_path, "sites.yaml", text)
        source, problems = load_problems(sites, write(tmp_path, "up.yaml", UPSTREAMS))
        assert source == str(sites)
        assert set(problems) == {"sites[0].locations[1]"}

    def test_unreadable_file_silences_references(self, tmp_path: Path) -> None:
        """A file that does not parse may define anything: references are not judged."""
        broken = write(tmp_path, "up.yaml", "upstreams: [\n")
        sites = write(tmp_path, "sites.yaml", SITES)
        source, problems = load_problems(broken, sites)
        assert source == str(broken)
        assert len(problems) == 1
