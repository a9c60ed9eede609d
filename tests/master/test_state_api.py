"""Desired state, sites, upstreams, versions, diffs and rollback through the REST API."""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
from typing import Any

import pytest

from nxmesh.config.versions import verify_chain, verify_version
from nxmesh.core.serialization import unstructure
from nxmesh.testing import make_state

from .conftest import Master

WS = "/api/v1/workspaces/default"


def site(name: str, upstream: str, host: str) -> dict[str, Any]:
    return {
        "name": name,
        "server_names": [host],
        "locations": [{"path": "/", "upstream": upstream}],
    }


def upstream(name: str, port: int) -> dict[str, Any]:
    return {"name": name, "servers": [{"address": f"127.0.0.1:{port}"}]}


def versions(master: Master, admin: dict[str, str]) -> list[dict[str, Any]]:
    response = master.client.get(f"{WS}/versions", headers=admin)
    assert response.status_code == 200
    result: list[dict[str, Any]] = response.json()
    return result


class TestDesiredState:
    """PUT/GET of a workspace's whole desired state."""

    def test_put_creates_a_signed_version_and_get_returns_it(
        self, master: Master, admin: dict[str, str]
    ) -> None:
        """A valid state becomes version 1, signed by the master's key, and reads back equal."""
        state = unstructure(make_state(2))
        response = master.client.put(f"{WS}/state", json=state, headers=admin)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["created"] is True
        assert body["version"]["number"] == 1
        assert body["version"]["author"] == "admin"
        got = master.client.get(f"{WS}/state", headers=admin).json()
        assert got == state
        stored = master.call(master.services.storage.list_versions, "default")
        assert verify_chain(stored, master.services.signer.verify_key) == []

    def test_a_state_too_large_for_one_frame_is_refused(
        self, master: Master, admin: dict[str, str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A state no agent could read (its version's frame over the protocol's limit)
        is a 422 saying so, not a version pushed to agents that drop it."""
        import nxmesh.master.changes as changes

        state = unstructure(make_state(2))
        monkeypatch.setattr(changes, "MAX_STATE_BYTES", 200)
        response = master.client.put(f"{WS}/state", json=state, headers=admin)
        assert response.status_code == 422
        [error] = response.json()["errors"]
        assert error["path"] == "<root>"
        assert "over the 200 a version may hold" in error["message"]
        assert versions(master, admin) == []
        monkeypatch.setattr(changes, "MAX_STATE_BYTES", 1_000_000)
        assert master.client.put(f"{WS}/state", json=state, headers=admin).status_code == 200

    def test_putting_the_same_state_again_creates_no_version(
        self, master: Master, admin: dict[str, str]
    ) -> None:
        """An unchanged state answers with the current version and created=false."""
        state = unstructure(make_state())
        master.client.put(f"{WS}/state", json=state, headers=admin)
        again = master.client.put(f"{WS}/state", json=state, headers=admin).json()
        assert again["created"] is False
        assert again["version"]["number"] == 1
        assert len(versions(master, admin)) == 1

    def test_invalid_state_is_problem_json_naming_every_field(
        self, master: Master, admin: dict[str, str]
    ) -> None:
        """Model errors come back as RFC 9457 422s with one {path, message} per field."""
        state = unstructure(make_state())
        state["sites"][0]["server_names"] = ["evil.example;"]
        state["sites"][0]["listeners"] = [{"port": "80"}]
        state["sites"][0]["snippet"] = "return 200;"
        response = master.client.put(f"{WS}/state", json=state, headers=admin)
        assert response.status_code == 422
        assert response.headers["content-type"].startswith("application/problem+json")
        problem = response.json()
        assert problem["type"] == "urn:nxmesh:problem:validation"
        assert problem["status"] == 422
        assert problem["request_id"] == response.headers["x-request-id"]
        paths = {e["path"] for e in problem["errors"]}
        assert paths == {
            "sites[0].server_names[0]",
            "sites[0].listeners[0].port",
            "sites[0].snippet",
        }
        assert versions(master, admin) == []

    @pytest.mark.parametrize(
        ("message", "says"),
        [
            ("fix \x1b[2Jtypo", "control character U+001B"),
            ("rollback of \u202eexe.txt", "U+202E, a bidirectional control character"),
        ],
    )
    def test_a_message_with_control_characters_is_refused(
        self, master: Master, admin: dict[str, str], message: str, says: str
    ) -> None:
        """A commit message that would rewrite a terminal (escapes, bidirectional
        overrides) is a 422 naming ``query.message``; nothing is committed."""
        state = unstructure(make_state())
        response = master.client.put(
            f"{WS}/state", json=state, params={"message": message}, headers=admin
        )
        assert response.status_code == 422, response.text
        [error] = response.json()["errors"]
        assert error["path"] == "query.message"
        assert says in error["message"]
        assert versions(master, admin) == []
        ok = master.client.put(
            f"{WS}/state", json=state, params={"message": "fix typo"}, headers=admin
        )
        assert ok.json()["version"]["message"] == "fix typo"

    def test_cross_object_errors_name_the_field(
        self, master: Master, admin: dict[str, str]
    ) -> None:
        """A location proxying to an undefined upstream is reported at its path."""
        state = {"sites": [site("web", "missing", "web.example.test")]}
        response = master.client.put(f"{WS}/state", json=state, headers=admin)
        assert response.status_code == 422
        [error] = response.json()["errors"]
        assert error["path"] == "sites[0].locations[0].upstream"
        assert "missing" in error["message"]

    @pytest.mark.parametrize(
        ("method", "path", "param"),
        [
            ("GET", "/api/v1/workspaces/default%0A/state", "workspace"),
            ("POST", "/api/v1/workspaces/evil%0A/bootstrap-tokens", "workspace"),
            ("GET", f"{WS}/sites/shop%0A", "name"),
            ("GET", "/api/v1/agents/agent-1%0A", "agent_id"),
            ("DELETE", "/api/v1/auth/tokens/0123456789abcdef%0A", "token_id"),
        ],
    )
    def test_a_path_parameter_with_a_trailing_newline_is_refused_by_name(
        self, master: Master, admin: dict[str, str], method: str, path: str, param: str
    ) -> None:
        """`$` in a pattern matched before a final newline: such ids got past the path
        checks and failed later as a 500. They are refused, naming the parameter."""
        response = master.client.request(method, path, headers=admin)
        assert response.status_code == 422, response.text
        [error] = [e for e in response.json()["errors"] if e["path"] == f"path.{param}"]
        assert error["message"].startswith("is not a")  # in words, not the regex
        assert "regex" not in error["message"]

    def test_malformed_json_is_a_400_problem(self, master: Master, admin: dict[str, str]) -> None:
        """A body that is not JSON is refused before anything else looks at it."""
        response = master.client.put(
            f"{WS}/state",
            content=b"{not json",
            headers={**admin, "content-type": "application/json"},
        )
        assert response.status_code == 400
        assert response.json()["type"] == "urn:nxmesh:problem:bad-request"

    def test_body_workspace_must_match_the_url(self, master: Master, admin: dict[str, str]) -> None:
        """A state naming another workspace than the URL is refused at field ``workspace``."""
        state = unstructure(make_state(workspace="other"))
        response = master.client.put(f"{WS}/state", json=state, headers=admin)
        assert response.status_code == 422
        assert [e["path"] for e in response.json()["errors"]] == ["workspace"]

    def test_dry_run_shows_model_and_rendered_diff_without_storing(
        self, master: Master, admin: dict[str, str]
    ) -> None:
        """``dry_run=true`` returns both diffs and leaves the version history untouched."""
        master.client.put(f"{WS}/state", json=unstructure(make_state(1)), headers=admin)
        response = master.client.put(
            f"{WS}/state",
            params={"dry_run": "true"},
            json=unstructure(make_state(2)),
            headers=admin,
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["base_version"] == 1
        assert body["would_change"] is True
        assert body["changes"]["sites"]["added"] == ["site1"]
        assert body["changes"]["upstreams"]["added"] == ["app1"]
        assert "+++ b/conf.d/site-site1.conf" in body["bundle_diff"]
        assert "+    server_name site1.example.test;" in body["bundle_diff"]
        assert len(versions(master, admin)) == 1

    def test_dry_run_of_an_empty_first_state_says_it_would_store_one(
        self, master: Master, admin: dict[str, str]
    ) -> None:
        """An empty workspace: storing an empty state still makes version 1, and the
        summary says so rather than "no changes" beside ``would_change: true``."""
        response = master.client.put(
            f"{WS}/state", params={"dry_run": "true"}, json={"sites": []}, headers=admin
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["base_version"], body["would_change"]) == (None, True)
        assert body["summary"] == "first version: an empty state"

    def test_expected_version_detects_a_lost_update(
        self, master: Master, admin: dict[str, str]
    ) -> None:
        """A write based on an outdated version gets 409 instead of overwriting."""
        master.client.put(f"{WS}/state", json=unstructure(make_state(1)), headers=admin)
        response = master.client.put(
            f"{WS}/state",
            params={"expected_version": 0},
            json=unstructure(make_state(2)),
            headers=admin,
        )
        assert response.status_code == 409
        assert "version 1" in response.json()["detail"]


class TestSitesAndUpstreams:
    """CRUD on sites and upstreams: each change validates the whole state and versions it."""

    def test_create_read_update_delete(self, master: Master, admin: dict[str, str]) -> None:
        """Each successful write is one new version; reads see the latest state."""
        c = master.client
        assert (
            c.post(f"{WS}/upstreams", json=upstream("app", 9001), headers=admin).status_code == 201
        )
        created = c.post(f"{WS}/sites", json=site("web", "app", "web.test"), headers=admin)
        assert created.status_code == 201, created.text
        assert created.json()["version"]["number"] == 2
        assert c.get(f"{WS}/sites/web", headers=admin).json()["server_names"] == ["web.test"]

        changed = c.put(f"{WS}/sites/web", json=site("web", "app", "www.test"), headers=admin)
        assert changed.status_code == 200
        assert changed.json()["version"]["number"] == 3
        assert [s["server_names"] for s in c.get(f"{WS}/sites", headers=admin).json()] == [
            ["www.test"]
        ]
        assert c.delete(f"{WS}/sites/web", headers=admin).json()["version"]["number"] == 4
        assert c.get(f"{WS}/sites/web", headers=admin).status_code == 404
        assert c.get(f"{WS}/sites", headers=admin).json() == []
        assert [v["number"] for v in versions(master, admin)] == [4, 3, 2, 1]

    def test_duplicate_site_is_409(self, master: Master, admin: dict[str, str]) -> None:
        """POSTing a site whose name exists is a conflict; nothing is stored."""
        c = master.client
        c.post(f"{WS}/upstreams", json=upstream("app", 9001), headers=admin)
        c.post(f"{WS}/sites", json=site("web", "app", "a.test"), headers=admin)
        again = c.post(f"{WS}/sites", json=site("web", "app", "b.test"), headers=admin)
        assert again.status_code == 409
        assert again.json()["type"] == "urn:nxmesh:problem:conflict"
        assert len(versions(master, admin)) == 2

    def test_change_breaking_another_object_is_refused_whole(
        self, master: Master, admin: dict[str, str]
    ) -> None:
        """Deleting an upstream a site still uses is a 409 naming the site and its
        locations (not the state check's complaint about a site the caller did not
        touch), and changes nothing."""
        c = master.client
        c.post(f"{WS}/upstreams", json=upstream("app", 9001), headers=admin)
        c.post(f"{WS}/sites", json=site("web", "app", "a.test"), headers=admin)
        response = c.delete(f"{WS}/upstreams/app", headers=admin)
        assert response.status_code == 409
        assert response.json()["detail"] == (
            "upstream 'app' is in use by site 'web' (locations '/'); point them at another "
            "upstream, or remove them, first"
        )
        assert c.delete(f"{WS}/upstreams/nope", headers=admin).status_code == 404
        assert c.get(f"{WS}/upstreams/app", headers=admin).status_code == 200
        assert len(versions(master, admin)) == 2

    def test_an_upstream_a_fastcgi_location_uses_is_kept(
        self, master: Master, admin: dict[str, str]
    ) -> None:
        """A FastCGI location's upstream is in use too: 409 naming the location."""
        c = master.client
        c.post(f"{WS}/upstreams", json=upstream("php", 9000), headers=admin)
        php = {
            "name": "blog",
            "server_names": ["blog.test"],
            "listeners": [{"port": 80}],
            "locations": [
                {"path": "/", "root": "/srv/www/blog"},
                {
                    "path": r"\.php$",
                    "match": "regex",
                    "fastcgi": {"upstream": "php", "root": "/srv/www/blog"},
                },
            ],
        }
        assert c.post(f"{WS}/sites", json=php, headers=admin).status_code == 201
        response = c.delete(f"{WS}/upstreams/php", headers=admin)
        assert response.status_code == 409
        assert "in use by site 'blog' (locations '\\\\.php$')" in response.json()["detail"]

    def test_streams_one_at_a_time(self, master: Master, admin: dict[str, str]) -> None:
        """Streams have their own resource: create, read, a bad field as a 422 naming it,
        an upstream a stream uses refused for deletion (409 naming the stream), delete."""
        c = master.client
        c.post(f"{WS}/upstreams", json=upstream("db", 5432), headers=admin)
        pg = {"name": "pg", "port": 15432, "upstream": "db"}
        created = c.post(f"{WS}/streams", json=pg, headers=admin)
        assert created.status_code == 201, created.text
        assert c.get(f"{WS}/streams/pg", headers=admin).json()["port"] == 15432
        assert c.get(f"{WS}/state", headers=admin).json()["streams"][0]["name"] == "pg"
        bad = c.put(
            f"{WS}/streams/dns", json={**pg, "name": "dns", "protocol": "sctp"}, headers=admin
        )
        assert bad.status_code == 422
        assert [e["path"] for e in bad.json()["errors"]] == ["protocol"]
        refused = c.delete(f"{WS}/upstreams/db", headers=admin)
        assert refused.status_code == 409
        assert "in use by stream 'pg'" in refused.json()["detail"]
        # An upstream only a route of a stream names is in use too.
        c.post(f"{WS}/upstreams", json=upstream("mail", 9993), headers=admin)
        routed = {
            "name": "tls-in",
            "port": 10443,
            "upstream": "db",
            "sni_routes": [{"server_names": ["mail.test"], "upstream": "mail"}],
        }
        assert c.post(f"{WS}/streams", json=routed, headers=admin).status_code == 201
        refused = c.delete(f"{WS}/upstreams/mail", headers=admin)
        assert refused.status_code == 409
        assert "in use by stream 'tls-in'" in refused.json()["detail"]
        assert c.delete(f"{WS}/streams/tls-in", headers=admin).status_code == 200
        assert c.delete(f"{WS}/streams/pg", headers=admin).status_code == 200
        assert c.get(f"{WS}/streams", headers=admin).json() == []
        assert c.delete(f"{WS}/upstreams/db", headers=admin).status_code == 200

    def test_put_name_must_match_url(self, master: Master, admin: dict[str, str]) -> None:
        """PUT /sites/a with a body named b is a 422 at ``name``."""
        response = master.client.put(
            f"{WS}/upstreams/one", json=upstream("two", 9001), headers=admin
        )
        assert response.status_code == 422
        assert response.json()["errors"][0]["path"] == "name"

    def test_put_without_a_name_takes_the_urls(self, master: Master, admin: dict[str, str]) -> None:
        """PUT /upstreams/api2 with a body that names nothing creates upstream api2."""
        body = upstream("ignored", 9001)
        del body["name"]
        response = master.client.put(f"{WS}/upstreams/api2", json=body, headers=admin)
        assert response.status_code == 200, response.text
        got = master.client.get(f"{WS}/upstreams/api2", headers=admin)
        assert got.json()["name"] == "api2"

    def test_unknown_site_is_404(self, master: Master, admin: dict[str, str]) -> None:
        """Deleting or reading a site that does not exist says so."""
        assert master.client.delete(f"{WS}/sites/nope", headers=admin).status_code == 404
        assert master.client.get(f"{WS}/sites/nope", headers=admin).status_code == 404

    def test_a_path_no_route_has_says_so(self, master: Master, admin: dict[str, str]) -> None:
        """A mistyped path gets a problem that names it (not an empty detail), and a
        method a route lacks names the method."""
        missing = master.client.get("/api/v1/workspaces/default/sitez", headers=admin)
        assert missing.status_code == 404
        assert missing.json()["detail"] == (
            "no route matches '/api/v1/workspaces/default/sitez'; see /docs for the API's paths"
        )
        wrong = master.client.patch(f"{WS}/state", json={}, headers=admin)
        assert wrong.status_code == 405
        assert (
            wrong.json()["detail"] == "PATCH is not allowed on '/api/v1/workspaces/default/state'"
        )


class TestVersions:
    """Listing, showing, diffing and rolling back versions."""

    def _three_versions(self, master: Master, admin: dict[str, str]) -> None:
        for n in (1, 2, 3):
            state = unstructure(make_state(n))
            assert master.client.put(f"{WS}/state", json=state, headers=admin).status_code == 200

    def test_list_pages_newest_first(self, master: Master, admin: dict[str, str]) -> None:
        """``before`` and ``limit`` page backwards through history."""
        self._three_versions(master, admin)
        c = master.client
        assert [v["number"] for v in versions(master, admin)] == [3, 2, 1]
        page = c.get(f"{WS}/versions", params={"before": 3, "limit": 1}, headers=admin).json()
        assert [v["number"] for v in page] == [2]
        assert "state" not in page[0]

    def test_show_includes_state_and_signature(self, master: Master, admin: dict[str, str]) -> None:
        """A single version carries its full state and Ed25519 signature."""
        self._three_versions(master, admin)
        body = master.client.get(f"{WS}/versions/2", headers=admin).json()
        assert body["number"] == 2
        assert len(body["state"]["sites"]) == 2
        assert body["signature"]
        assert body["key_id"] == master.services.signer.key_id
        assert master.client.get(f"{WS}/versions/99", headers=admin).status_code == 404

    def test_diff_between_two_versions(self, master: Master, admin: dict[str, str]) -> None:
        """The diff names added objects and shows the rendered nginx changes."""
        self._three_versions(master, admin)
        body = master.client.get(
            f"{WS}/versions/3/diff", params={"against": 1}, headers=admin
        ).json()
        assert (body["from_version"], body["to_version"]) == (1, 3)
        assert body["changes"]["sites"]["added"] == ["site1", "site2"]
        assert "+++ b/conf.d/site-site2.conf" in body["bundle_diff"]
        first = master.client.get(f"{WS}/versions/1/diff", headers=admin).json()
        assert first["from_version"] is None
        assert first["changes"]["sites"]["added"] == ["site0"]

    def test_rollback_appends_a_version_with_the_old_state(
        self, master: Master, admin: dict[str, str]
    ) -> None:
        """Rolling back to 1 creates version 4 with version 1's digest; history stays intact."""
        self._three_versions(master, admin)
        c = master.client
        response = c.post(f"{WS}/versions/1/rollback", headers=admin)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["created"] is True
        assert body["version"]["number"] == 4
        v1 = c.get(f"{WS}/versions/1", headers=admin).json()
        assert body["version"]["digest"] == v1["digest"]
        assert body["version"]["message"] == "rollback to version 1"
        assert c.get(f"{WS}/state", headers=admin).json() == v1["state"]
        stored = master.call(master.services.storage.list_versions, "default")
        assert verify_chain(stored, master.services.signer.verify_key) == []
        again = c.post(f"{WS}/versions/1/rollback", headers=admin).json()
        assert again["created"] is False

    def test_rollback_to_unknown_version_is_404(
        self, master: Master, admin: dict[str, str]
    ) -> None:
        """There is nothing to roll back to."""
        assert master.client.post(f"{WS}/versions/7/rollback", headers=admin).status_code == 404

    def test_out_of_range_numbers_are_422_not_500(
        self, master: Master, admin: dict[str, str]
    ) -> None:
        """A version number beyond 64 bits is refused as input, naming the parameter."""
        response = master.client.get(f"{WS}/versions/{2**70}", headers=admin)
        assert response.status_code in (404, 422)
        assert response.status_code != 500


def tamper(master: Master, number: int, *, state: tuple[str, str] | None = None) -> None:
    """Edit version `number` in the master's SQLite database, as someone with write access
    to it could: `state` replaces text in its stored state and recomputes its digest (no
    key needed); without it, the version's message is changed."""
    db = master.services.state_dir / "master.db"
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        if state is None:
            conn.execute(
                "UPDATE config_versions SET message = 'innocent' WHERE number = ?", (number,)
            )
            return
        (body,) = conn.execute(
            "SELECT s.body FROM config_versions v JOIN config_states s "
            "ON v.state_sha256 = s.sha256 WHERE v.number = ?",
            (number,),
        ).fetchone()
        edited = body.replace(*state)
        assert edited != body
        sha = hashlib.sha256(edited.encode()).hexdigest()
        conn.execute("INSERT INTO config_states (sha256, body) VALUES (?, ?)", (sha, edited))
        conn.execute(
            "UPDATE config_versions SET state_sha256 = ?, digest = ? WHERE number = ?",
            (sha, sha, number),
        )


EVIL = ("127.0.0.1:8080", "203.0.113.66:8080")


class TestTamperedHistory:
    """A version edited in the database is never signed again: rollback and commit refuse."""

    def _three_versions(self, master: Master, admin: dict[str, str]) -> None:
        for n in (1, 2, 3):
            state = unstructure(make_state(n))
            assert master.client.put(f"{WS}/state", json=state, headers=admin).status_code == 200

    def test_rollback_to_a_re_digested_version_is_refused(
        self, master: Master, admin: dict[str, str]
    ) -> None:
        """Version 1's state edited with a matching digest: 409 naming it, nothing stored."""
        self._three_versions(master, admin)
        tamper(master, 1, state=EVIL)
        target = master.call(master.services.storage.get_version, "default", 1)
        assert target is not None
        problems = verify_version(target, master.services.signer.verify_key)
        assert [p.message.split(":")[0] for p in problems] == ["signature does not match"]

        response = master.client.post(f"{WS}/versions/1/rollback", headers=admin)
        assert response.status_code == 409, response.text
        body = response.json()
        assert body["type"] == "urn:nxmesh:problem:conflict"
        assert body["detail"].startswith(
            "refusing to roll back to version 1: the stored version 1 of workspace 'default' "
            "fails verification (signature does not match"
        )
        assert "run `nxmesh versions verify`" in body["detail"]
        assert [v["number"] for v in versions(master, admin)] == [3, 2, 1]
        current = master.client.get(f"{WS}/state", headers=admin).json()
        assert "203.0.113.66:8080" not in str(current)

    @pytest.mark.parametrize("edit", ["state", "message"])
    def test_changes_on_a_tampered_latest_are_refused(
        self, master: Master, admin: dict[str, str], edit: str
    ) -> None:
        """Every write builds on the latest version: when it fails verification, a whole
        state, a site edit and a rollback are all refused and nothing is stored."""
        self._three_versions(master, admin)
        tamper(master, 3, state=EVIL if edit == "state" else None)
        c = master.client
        refused = [
            c.put(f"{WS}/state", json=unstructure(make_state(1)), headers=admin),
            c.post(f"{WS}/upstreams", json=upstream("app", 9001), headers=admin),
            c.post(f"{WS}/versions/1/rollback", headers=admin),
        ]
        for response in refused:
            assert response.status_code == 409, response.text
            detail = response.json()["detail"]
            assert "the latest version 3 of workspace 'default' fails verification" in detail
        assert refused[0].json()["detail"].startswith("refusing to commit a change: ")
        assert [v["number"] for v in versions(master, admin)] == [3, 2, 1]

    def test_intact_history_is_still_changed_and_rolled_back(
        self, master: Master, admin: dict[str, str]
    ) -> None:
        """The checks pass on versions the master signed: commit and rollback work as ever."""
        self._three_versions(master, admin)
        c = master.client
        assert c.post(f"{WS}/versions/2/rollback", headers=admin).json()["version"]["number"] == 4
        changed = c.put(f"{WS}/state", json=unstructure(make_state(5)), headers=admin)
        assert changed.json()["version"]["number"] == 5
        stored = master.call(master.services.storage.list_versions, "default")
        assert verify_chain(stored, master.services.signer.verify_key) == []
