"""Diffs between configurations: model level (by name, with field paths) and rendered files."""

from __future__ import annotations

import subprocess
from pathlib import Path

import attrs
import pytest

from nxmesh.config.diff import Change, KindDiff, StateDiff, bundle_diff, diff_states
from nxmesh.core.bundle import Bundle
from nxmesh.core.model import (
    CertificateRef,
    DesiredState,
    Location,
    Return,
    Stream,
    UpstreamServer,
)
from nxmesh.testing.factories import make_state


def with_certs(state: DesiredState, *certs: CertificateRef) -> DesiredState:
    return attrs.evolve(state, certificates=certs)


def edit_site(state: DesiredState, index: int, **changes: object) -> DesiredState:
    sites = list(state.sites)
    sites[index] = attrs.evolve(sites[index], **changes)
    return attrs.evolve(state, sites=tuple(sites))


class TestDiffStates:
    def test_equal_states_have_an_empty_diff(self) -> None:
        """Two equal states differ in nothing."""
        diff = diff_states(make_state(3), make_state(3))
        assert diff.is_empty
        assert diff == StateDiff()
        assert diff.summary() == "no changes"

    def test_added_and_removed_by_name(self) -> None:
        """Objects only in the new state are added, only in the old one removed, sorted."""
        old = make_state(3)
        new = attrs.evolve(
            make_state(5),
            sites=make_state(5).sites[1:],
            upstreams=make_state(5).upstreams[1:],
        )
        diff = diff_states(old, new)
        assert diff.sites == KindDiff(added=("site3", "site4"), removed=("site0",))
        assert diff.upstreams == KindDiff(added=("app3", "app4"), removed=("app0",))
        assert diff.certificates.is_empty
        assert not diff.is_empty

    def test_streams_are_a_collection_of_their_own(self) -> None:
        """Streams are matched by name like sites, their changed fields listed; a state
        gaining its first stream is not a change of a top-level field."""
        old = make_state(1)
        first = Stream(name="pg", port=15432, upstream="app0")
        with_one = attrs.evolve(old, streams=(first,))
        diff = diff_states(old, with_one)
        assert diff.streams == KindDiff(added=("pg",))
        assert diff.other == ()
        assert diff.summary() == "streams: 1 added, 0 removed, 0 changed\n  + pg"
        moved = attrs.evolve(with_one, streams=(attrs.evolve(first, port=15433),))
        assert diff_states(with_one, moved).streams == KindDiff(changed=(Change("pg", ("port",)),))

    def test_reordering_is_not_a_change(self) -> None:
        """Objects are matched by name, so reordering a list changes nothing."""
        old = make_state(3)
        new = attrs.evolve(old, sites=old.sites[::-1], upstreams=old.upstreams[::-1])
        assert diff_states(old, new).is_empty

    def test_changed_site_lists_field_paths(self) -> None:
        """A changed site lists the paths of the fields that differ, in YAML spelling."""
        old = make_state(2)
        location = attrs.evolve(old.sites[1].locations[0], upstream="app0", websocket=True)
        new = edit_site(
            old,
            1,
            server_names=("other.example.test",),
            locations=(location,),
            client_max_body_size="10m",
        )
        diff = diff_states(old, new)
        assert diff.sites.changed == (
            Change(
                "site1",
                (
                    "client_max_body_size",
                    "locations[0].upstream",
                    "locations[0].websocket",
                    "server_names[0]",
                ),
            ),
        )
        assert not diff.sites.added
        assert not diff.sites.removed

    def test_list_that_grows_is_reported_whole(self) -> None:
        """A list whose length changed is reported by its own path."""
        old = make_state(1)
        extra = Location(path="/api", upstream="app0")
        new = edit_site(old, 0, locations=(*old.sites[0].locations, extra))
        assert diff_states(old, new).sites.changed == (Change("site0", ("locations",)),)

    def test_yaml_key_spelling_is_used(self) -> None:
        """Fields renamed for YAML (``return_``) appear under their YAML key."""
        old = make_state(1)
        location = Location(path="/", return_=Return(code=204))
        new = edit_site(old, 0, locations=(location,))
        (change,) = diff_states(old, new).sites.changed
        assert "locations[0].return" in change.fields
        assert "locations[0].upstream" in change.fields

    def test_changed_upstream(self) -> None:
        """An upstream with a new server address is changed at that address's path."""
        old = make_state(1)
        upstream = attrs.evolve(
            old.upstreams[0], servers=(UpstreamServer(address="10.0.0.1:80"),), keepalive=8
        )
        new = attrs.evolve(old, upstreams=(upstream,))
        assert diff_states(old, new).upstreams.changed == (
            Change("app0", ("keepalive", "servers[0].address")),
        )

    def test_certificates(self) -> None:
        """Certificates are added, removed and changed by name like everything else."""
        a = CertificateRef(name="a", domains=("a.example.test",))
        b = CertificateRef(name="b", domains=("b.example.test",))
        b2 = CertificateRef(name="b", domains=("b.example.test", "c.example.test"), source="acme")
        c = CertificateRef(name="c", domains=("c.example.test",))
        diff = diff_states(with_certs(make_state(), a, b), with_certs(make_state(), b2, c))
        assert diff.certificates == KindDiff(
            added=("c",), removed=("a",), changed=(Change("b", ("domains", "source")),)
        )

    def test_workspace_change_is_listed(self) -> None:
        """A change outside the collections is listed in `other`."""
        diff = diff_states(make_state(1), make_state(1, workspace="blue"))
        assert diff.other == ("workspace",)
        assert not diff.is_empty
        assert "changed: workspace" in diff.summary()

    def test_between_is_diff_states(self) -> None:
        """`StateDiff.between` is the same comparison as `diff_states`."""
        old, new = make_state(1), make_state(2)
        assert StateDiff.between(old, new) == diff_states(old, new)
        assert StateDiff.between(old, new).sites.added == ("site1",)

    def test_no_old_state_means_everything_is_added(self) -> None:
        """Diffing against nothing (the first version) adds every object."""
        diff = diff_states(None, make_state(2))
        assert diff.sites.added == ("site0", "site1")
        assert diff.upstreams.added == ("app0", "app1")
        assert diff.other == ()

    def test_summary(self) -> None:
        """The summary has one count line per changed collection and one line per object."""
        old = make_state(2)
        new = edit_site(
            attrs.evolve(make_state(3), sites=make_state(3).sites[1:]), 0, access_log=False
        )
        assert diff_states(old, new).summary() == (
            "sites: 1 added, 1 removed, 1 changed\n"
            "  + site2\n"
            "  - site0\n"
            "  ~ site1: access_log\n"
            "upstreams: 1 added, 0 removed, 0 changed\n"
            "  + app2"
        )


class TestBundleDiff:
    def test_identical_bundles_have_no_diff(self) -> None:
        """Equal bundles give an empty string."""
        b = Bundle({"nginx.conf": b"events {}\n"})
        assert bundle_diff(b, Bundle({"nginx.conf": b"events {}\n"})) == ""

    def test_changed_file(self) -> None:
        """A changed file gets a/ and b/ headers and a unified hunk."""
        old = Bundle({"conf.d/x.conf": b"server {\n    listen 80;\n}\n"})
        new = Bundle({"conf.d/x.conf": b"server {\n    listen 8080;\n}\n"})
        assert bundle_diff(old, new) == (
            "--- a/conf.d/x.conf\n"
            "+++ b/conf.d/x.conf\n"
            "@@ -1,3 +1,3 @@\n"
            " server {\n"
            "-    listen 80;\n"
            "+    listen 8080;\n"
            " }\n"
        )

    def test_added_and_removed_files_use_dev_null(self) -> None:
        """An added file comes from /dev/null, a removed one goes to it."""
        old = Bundle({"conf.d/old.conf": b"a\n"})
        new = Bundle({"conf.d/new.conf": b"b\n"})
        assert bundle_diff(old, new) == (
            "--- /dev/null\n"
            "+++ b/conf.d/new.conf\n"
            "@@ -0,0 +1 @@\n"
            "+b\n"
            "--- a/conf.d/old.conf\n"
            "+++ /dev/null\n"
            "@@ -1 +0,0 @@\n"
            "-a\n"
        )

    def test_files_are_in_path_order(self) -> None:
        """Files appear sorted by path whatever order they were built in."""
        old = Bundle({"z.conf": b"1\n", "conf.d/b.conf": b"1\n", "conf.d/a.conf": b"1\n"})
        new = Bundle({"conf.d/a.conf": b"2\n", "z.conf": b"2\n", "conf.d/b.conf": b"2\n"})
        headers = [line for line in bundle_diff(old, new).splitlines() if line.startswith("---")]
        assert headers == ["--- a/conf.d/a.conf", "--- a/conf.d/b.conf", "--- a/z.conf"]

    def test_no_old_bundle_adds_everything(self) -> None:
        """Without an old bundle every file is added from /dev/null."""
        text = bundle_diff(None, Bundle({"nginx.conf": b"x\n", "conf.d/a.conf": b"y\n"}))
        assert text.count("--- /dev/null\n") == 2
        assert "+++ b/nginx.conf\n" in text

    def test_missing_final_newline_is_marked(self) -> None:
        """A last line without newline is marked the way diff and patch expect."""
        text = bundle_diff(Bundle({"f": b"a"}), Bundle({"f": b"b\n"}))
        assert text.endswith("-a\n\\ No newline at end of file\n+b\n")

    def test_binary_files_are_not_dumped(self) -> None:
        """Non-UTF-8 files are reported as differing binaries."""
        text = bundle_diff(Bundle({"x.der": b"\xff\x00"}), Bundle({"x.der": b"\xfe\x00"}))
        assert text == "Binary files a/x.der and b/x.der differ\n"

    def test_private_keys_are_never_shown(self) -> None:
        """A private key file is reported as changed without its content."""
        key = b"-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n"
        text = bundle_diff(None, Bundle({"certs/a.key": key}))
        assert text == "Private key files /dev/null and b/certs/a.key differ (not shown)\n"
        assert "c2VjcmV0" not in text

    @pytest.mark.parametrize(
        ("path", "data"),
        [
            ("certs/web.key", b"-----BEGIN EC PRIVATE KEY-----\nc2VjcmV0\n"),
            ("certs/acme/shop.key", b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nc2VjcmV0\n"),
            ("certs/web.key", b"c2VjcmV0\n"),  # a key file, whatever its content
            ("certs/web.pem", b"-----BEGIN CERTIFICATE-----\nAAAA\n"
             b"-----END CERTIFICATE-----\n-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n"),
            ("elsewhere/k.txt", b"\n-----BEGIN RSA PRIVATE KEY-----\nc2VjcmV0\n"),
        ],
    )  # fmt: skip
    def test_key_files_are_hidden_on_either_side(self, path: str, data: bytes) -> None:
        """Key files under certs/ and any file starting with a PEM key are never shown."""
        for old, new in ((None, Bundle({path: data})), (Bundle({path: data}), Bundle({}))):
            text = bundle_diff(old, new)
            assert text.startswith("Private key files "), text
            assert text.endswith(" differ (not shown)\n")
            assert "c2VjcmV0" not in text

    def test_site_mentioning_a_private_key_is_still_shown(self) -> None:
        """A site whose text contains ``PRIVATE KEY-----`` (a return body) is diffed like
        any other file: the change to its upstream must show in the preview."""
        from nxmesh.plugins.render_nginx import NginxRenderer

        base = make_state(2)
        marked = Location(
            path="/k", match="exact", return_=Return(code=200, body="-----BEGIN PRIVATE KEY-----")
        )
        old_site = edit_site(base, 0, locations=(*base.sites[0].locations, marked))
        location = attrs.evolve(old_site.sites[0].locations[0], upstream="app1")
        new_site = edit_site(old_site, 0, locations=(location, marked))
        renderer = NginxRenderer()
        text = bundle_diff(renderer.render(old_site), renderer.render(new_site))
        assert "not shown" not in text
        assert "+++ b/conf.d/site-site0.conf" in text
        assert "+        proxy_pass http://app1;" in text
        assert "-        proxy_pass http://app0;" in text

    def test_only_newline_splits_lines(self) -> None:
        """Form feeds and Unicode separators stay inside their line, as nginx reads them."""
        old = Bundle({"f": "a\x0cb\u2028c\n".encode()})
        new = Bundle({"f": "a\x0cb\u2028d\n".encode()})
        assert bundle_diff(old, new).split("\n")[-3:] == [
            "-a\x0cb\u2028c",
            "+a\x0cb\u2028d",
            "",
        ]

    @pytest.mark.parametrize("with_old", [True, False])
    def test_patch_applies_the_diff(self, tmp_path: Path, with_old: bool) -> None:
        """GNU patch turns the old tree into the new one using the diff."""
        old = Bundle(
            {
                "nginx.conf": b"events {}\nhttp {\n    include conf.d/*.conf;\n}\n",
                "conf.d/gone.conf": b"server { listen 81; }\n",
                "conf.d/same.conf": b"server { listen 82; }\n",
                "conf.d/edit.conf": b"server {\n    listen 83;\n    server_name a;\n}",
            }
        )
        new = Bundle(
            {
                "nginx.conf": b"events {}\nhttp {\n    include conf.d/*.conf;\n    gzip on;\n}\n",
                "conf.d/same.conf": b"server { listen 82; }\n",
                "conf.d/edit.conf": b"server {\n    listen 84;\n    server_name a;\n}\n",
                "conf.d/new.conf": b"server { listen 85; }\n",
            }
        )
        start = old if with_old else None
        tree = tmp_path / "tree"
        tree.mkdir()
        for path, data in (start.files if start else {}).items():
            (tree / path).parent.mkdir(parents=True, exist_ok=True)
            (tree / path).write_bytes(data)
        diff = bundle_diff(start, new)
        subprocess.run(
            ["patch", "-p1", "--batch", "--silent", "-E"],
            input=diff.encode(),
            cwd=tree,
            check=True,
        )
        found = {str(p.relative_to(tree)): p.read_bytes() for p in tree.rglob("*") if p.is_file()}
        assert found == dict(new.files)
