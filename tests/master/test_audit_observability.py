"""The audit log covers every mutating endpoint; metrics, request ids and logs are right,
and no secret ever reaches a log line."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from nxmesh.core.model import Agent
from nxmesh.core.serialization import unstructure
from nxmesh.testing import make_state

from .certs import chain
from .conftest import Master
from .test_rbac import MATRIX

WS = "/api/v1/workspaces/default"
W = "/api/v1/workspaces/{workspace:str}"

EXPECTED_ACTIONS = {
    ("POST", "/api/v1/auth/login"): "auth.login",
    ("POST", "/api/v1/auth/refresh"): "auth.refresh",
    ("POST", "/api/v1/auth/logout"): "auth.logout",
    ("POST", "/api/v1/auth/password"): "auth.password_change",
    ("POST", "/api/v1/auth/tokens"): "api_token.create",
    ("DELETE", "/api/v1/auth/tokens/{token_id:str}"): "api_token.revoke",
    ("PUT", f"{W}/state"): "state.replace",
    ("POST", f"{W}/upstreams"): "upstream.create",
    ("PUT", f"{W}/upstreams/{{name:str}}"): "upstream.update",
    ("DELETE", f"{W}/upstreams/{{name:str}}"): "upstream.delete",
    ("POST", f"{W}/streams"): "stream.create",
    ("PUT", f"{W}/streams/{{name:str}}"): "stream.update",
    ("DELETE", f"{W}/streams/{{name:str}}"): "stream.delete",
    ("POST", f"{W}/sites"): "site.create",
    ("PUT", f"{W}/sites/{{name:str}}"): "site.update",
    ("DELETE", f"{W}/sites/{{name:str}}"): "site.delete",
    ("POST", f"{W}/versions/{{number:int}}/rollback"): "version.rollback",
    ("PUT", f"{W}/assignments/{{name:str}}"): "assignment.set",
    ("DELETE", f"{W}/assignments/{{name:str}}"): "assignment.delete",
    ("PUT", "/api/v1/agents/{agent_id:str}/labels"): "agent.labels",
    ("POST", "/api/v1/agents/{agent_id:str}/revoke"): "agent.revoke",
    ("POST", f"{W}/bootstrap-tokens"): "bootstrap_token.create",
    ("DELETE", f"{W}/bootstrap-tokens/{{token_id:str}}"): "bootstrap_token.revoke",
    ("POST", f"{W}/certificates"): "certificate.upload",
    ("PUT", f"{W}/certificates/{{name:str}}"): "certificate.replace",
    ("DELETE", f"{W}/certificates/{{name:str}}"): "certificate.delete",
    ("POST", "/api/v1/users"): "user.create",
    ("PATCH", "/api/v1/users/{username:str}"): "user.update",
    ("DELETE", "/api/v1/users/{username:str}"): "user.delete",
}


MUTATING = ("POST", "PUT", "PATCH", "DELETE")


class _Scenario:
    """Calls every mutating endpoint once, successfully, collecting the secrets it saw."""

    def __init__(self, master: Master) -> None:
        self.master = master
        self.secrets: list[str] = []
        self.admin = master.headers("admin", subject="admin")

    def call(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        response = self.master.client.request(
            method, path, json=body, headers=kwargs.pop("headers", self.admin), **kwargs
        )
        assert response.status_code < 300, f"{method} {path}: {response.text}"
        return response.json() if response.content else None

    def run(self) -> None:
        m = self.master
        password = m.admin_password()
        self.secrets.append(password)
        tokens = self.call(
            "POST", "/api/v1/auth/login", {"username": "admin", "password": password}
        )
        renewed = self.call(
            "POST", "/api/v1/auth/refresh", {"refresh_token": tokens["refresh_token"]}
        )
        self.secrets += [tokens["refresh_token"], renewed["refresh_token"], renewed["access_token"]]
        self.call("POST", "/api/v1/auth/logout", {"refresh_token": renewed["refresh_token"]})
        api = self.call("POST", "/api/v1/auth/tokens", {"name": "ci", "scopes": ["config:read"]})
        self.secrets.append(api["token"])
        self.call("DELETE", f"/api/v1/auth/tokens/{api['api_token']['id']}")

        self.call("PUT", f"{WS}/state", unstructure(make_state()))
        upstream = {"name": "api", "servers": [{"address": "127.0.0.1:9000"}]}
        self.call("POST", f"{WS}/upstreams", upstream)
        self.call("PUT", f"{WS}/upstreams/api", {**upstream, "keepalive": 8})
        site = {
            "name": "api",
            "server_names": ["api.test"],
            "locations": [{"path": "/", "upstream": "api"}],
        }
        self.call("POST", f"{WS}/sites", site)
        self.call("PUT", f"{WS}/sites/api", {**site, "server_names": ["api2.test"]})
        stream = {"name": "db", "port": 15432, "upstream": "api"}
        self.call("POST", f"{WS}/streams", stream)
        self.call("PUT", f"{WS}/streams/db", {**stream, "port": 15433})
        self.call("DELETE", f"{WS}/streams/db")
        self.call("DELETE", f"{WS}/sites/api")
        self.call("DELETE", f"{WS}/upstreams/api")
        self.call("POST", f"{WS}/versions/2/rollback")
        self.call("PUT", f"{WS}/assignments/all", {"version": 1})
        self.call("DELETE", f"{WS}/assignments/all")

        m.call(m.services.storage.upsert_agent, Agent(id="a1", name="a1"))
        self.call("PUT", "/api/v1/agents/a1/labels", {"labels": {"env": "prod"}})
        self.call("POST", "/api/v1/agents/a1/revoke")
        boot = self.call("POST", f"{WS}/bootstrap-tokens", {"labels": {"env": "prod"}})
        self.secrets.append(boot["token"])
        self.call("DELETE", f"{WS}/bootstrap-tokens/{boot['bootstrap_token']['id']}")

        _, _intermediate, leaf = chain()
        self.secrets.append(leaf.key_pem.splitlines()[1])
        cert = {"name": "www", "certificate": leaf.cert_pem, "private_key": leaf.key_pem}
        self.call("POST", f"{WS}/certificates", cert)
        self.call("PUT", f"{WS}/certificates/www", cert)
        self.call("DELETE", f"{WS}/certificates/www")

        new_password = "a perfectly long password"
        self.secrets.append(new_password)
        self.call(
            "POST",
            "/api/v1/users",
            {"username": "eve", "password": new_password, "roles": ["viewer"]},
        )
        self.call(
            "PATCH", "/api/v1/users/eve", {"password": new_password + "!", "roles": ["operator"]}
        )
        self.call("DELETE", "/api/v1/users/eve")
        self.call(
            "POST",
            "/api/v1/auth/password",
            {"current_password": password, "new_password": new_password + "?"},
        )


class TestAudit:
    """Who did what, when and from where."""

    def test_every_mutating_endpoint_is_audited(self, master: Master) -> None:
        """Each POST/PUT/PATCH/DELETE route leaves its own entry, with actor and address."""
        mutating = {key for key in MATRIX if key[0] in MUTATING}
        assert set(EXPECTED_ACTIONS) == mutating, "a mutating route has no expected audit action"
        started = time.time()
        _Scenario(master).run()
        entries = master.client.get(
            "/api/v1/audit", params={"limit": 1000}, headers=master.headers("admin")
        ).json()
        actions = {e["action"] for e in entries}
        missing = set(EXPECTED_ACTIONS.values()) - actions
        assert not missing, f"not audited: {sorted(missing)}"
        for entry in entries:
            assert entry["remote_addr"] == "testclient"
            assert entry["ts"] >= started - 1
            assert entry["actor"]
        by_action = {e["action"]: e for e in entries}
        assert by_action["state.replace"]["resource"] == "workspaces/default/state"
        assert by_action["state.replace"]["details"]["version"] == 1
        assert by_action["user.update"]["details"]["login_changed"] is True

    def test_failed_logins_are_audited_without_the_password(self, master: Master) -> None:
        """A wrong password is recorded (user, address, reason), never the password itself."""
        master.client.post(
            "/api/v1/auth/login", json={"username": "admin", "password": "guess-hunter2"}
        )
        [entry] = master.client.get("/api/v1/audit", headers=master.headers("admin")).json()
        assert entry["action"] == "auth.login_failed"
        assert entry["actor"] == "admin"
        assert entry["details"]["reason"] == "bad_password"
        assert "hunter2" not in json.dumps(entry)


class TestNoSecretsInLogs:
    """Passwords, tokens and private keys never appear in any log event."""

    def test_whole_scenario(self, master: Master) -> None:
        """Run every mutating endpoint under capture_logs and search every event for secrets."""
        scenario = _Scenario(master)
        with capture_logs() as events:
            scenario.run()
            master.client.post(
                "/api/v1/auth/login", json={"username": "admin", "password": "wrong-secret-xyz"}
            )
            scenario.secrets.append("wrong-secret-xyz")
        assert events, "nothing was logged: the check would be vacuous"
        text = "\n".join(repr(e) for e in events)
        for secret in scenario.secrets:
            assert secret not in text
        assert any(e.get("event") == "request" for e in events)

    def test_initial_admin_password_is_logged_as_a_path_only(
        self, plugin_manager: Any, tmp_path: Any
    ) -> None:
        """First start logs where the password is, once, never the password."""
        from litestar.testing import TestClient

        from nxmesh.master.app import build_app

        from .conftest import make_settings

        settings = make_settings(plugin_manager, tmp_path / "fresh")
        with capture_logs() as events, TestClient(build_app(pm=plugin_manager, settings=settings)):
            pass
        password = (settings.state_dir / "initial-admin-password").read_text().strip()
        created = [e for e in events if e["event"].startswith("initial admin user created")]
        assert len(created) == 1
        assert created[0]["password_file"].endswith("initial-admin-password")
        assert password not in repr(events)


class TestMetricsAndRequestIds:
    """``/metrics`` parses and measures the API; request ids flow through."""

    def test_metrics_parse_and_measure(self, master: Master) -> None:
        """Latency per route template, auth failures, versions created — all parseable."""
        admin = master.headers("admin", subject="admin")
        master.client.put(f"{WS}/state", json=unstructure(make_state()), headers=admin)
        master.client.get("/api/v1/auth/me")  # anonymous: an auth failure
        response = master.client.get("/metrics", headers=admin)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(response.text)}
        latency = families["nxmesh_master_api_request_duration_seconds"]
        routes = {
            (s.labels["route"], s.labels["method"], s.labels["status"])
            for s in latency.samples
            if s.name.endswith("_count")
        }
        assert ("/api/v1/workspaces/{workspace}/state", "PUT", "200") in routes
        assert ("/api/v1/auth/me", "GET", "401") in routes
        failures = {
            s.labels["reason"]: s.value
            for s in families["nxmesh_master_auth_failures"].samples
            if s.name.endswith("_total")
        }
        assert failures["missing"] == 1
        created = families["nxmesh_master_versions_created"].samples
        assert [s.value for s in created if s.name.endswith("_total")] == [1]
        for name in (
            "nxmesh_master_connected_agents",
            "nxmesh_master_pushes",
            "nxmesh_master_convergence_seconds",
        ):
            assert name in families

    def test_public_metrics_setting(self, plugin_manager: Any, tmp_path: Any) -> None:
        """With ``auth.public_metrics`` Prometheus may scrape without a token."""
        from litestar.testing import TestClient

        from nxmesh.master.app import build_app

        from .conftest import make_settings

        settings = make_settings(plugin_manager, tmp_path, **{"auth.public_metrics": True})
        with TestClient(build_app(pm=plugin_manager, settings=settings)) as client:
            assert client.get("/metrics").status_code == 200

    def test_request_id_is_echoed_or_generated(self, master: Master) -> None:
        """A well-formed X-Request-ID is kept; a malicious one is replaced."""
        kept = master.client.get("/healthz", headers={"X-Request-ID": "req-42"})
        assert kept.headers["x-request-id"] == "req-42"
        replaced = master.client.get("/healthz", headers={"X-Request-ID": "bad id\nInjected: 1"})
        assert replaced.headers["x-request-id"] != "bad id\nInjected: 1"
        assert len(replaced.headers["x-request-id"]) == 32

    @pytest.mark.parametrize(
        ("method", "path", "status"),
        [("GET", "/api/v1/no-such-route", 404), ("PATCH", "/api/v1/agents", 405)],
    )
    def test_a_request_no_route_takes_has_a_request_id_too(
        self, master: Master, method: str, path: str, status: int
    ) -> None:
        """Litestar answers 404 and 405 before any middleware: the problem response
        still carries the request id (header and body) and the request is logged."""
        with capture_logs() as events:
            response = master.client.request(method, path, headers={"X-Request-ID": "lost-1"})
        assert response.status_code == status
        assert response.headers["x-request-id"] == "lost-1"
        assert response.json()["request_id"] == "lost-1"
        [line] = [e for e in events if e["event"] == "request"]
        assert (line["route"], line["status"]) == ("<unmatched>", status)
        assert line["request_id"] == "lost-1"
        generated = master.client.get(path)
        assert generated.json()["request_id"] == generated.headers["x-request-id"]

    def test_request_id_is_bound_to_log_lines(self, master: Master) -> None:
        """Every log event of a request carries its request id."""
        with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as events:
            master.client.put(
                f"{WS}/state",
                json=unstructure(make_state()),
                headers={**master.headers("admin", subject="admin"), "X-Request-ID": "trace-me"},
            )
        mine = [e for e in events if e.get("request_id") == "trace-me"]
        assert {e["event"] for e in mine} >= {"version created", "audit", "request"}
