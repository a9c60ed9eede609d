"""RBAC: grants, role bindings scoped to workspaces, custom roles — and the full matrix of
every route (the events WebSocket included) x admin / operator / viewer / custom / anonymous."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from litestar import Litestar
from litestar.routes import HTTPRoute, WebSocketRoute
from litestar.testing import TestClient

from nxmesh.core.errors import ConfigurationError
from nxmesh.core.interfaces import Principal
from nxmesh.core.pluginmanager import get_plugin_manager
from nxmesh.master.app import build_app
from nxmesh.master.rbac import PERMISSIONS, Grant, Rbac, event_permission, parse_grant

from .conftest import CUSTOM_ROLES, Master, make_settings

ROLES = ("admin", "operator", "viewer", "deployer", "anonymous")
ALL = frozenset(ROLES)
AUTHENTICATED = ALL - {"anonymous"}
A, OP, V, D = "admin", "operator", "viewer", "deployer"

W = "/api/v1/workspaces/{workspace:str}"
MATRIX: dict[tuple[str, str], frozenset[str]] = {
    ("GET", "/healthz"): ALL,
    ("GET", "/readyz"): ALL,
    ("GET", "/openapi.json"): ALL,
    ("GET", "/docs"): ALL,
    ("GET", "/docs/openapi.json"): ALL,
    ("GET", "/docs/oauth2-redirect.html"): ALL,
    ("GET", "/metrics"): frozenset({A, OP, V}),
    ("POST", "/api/v1/auth/login"): ALL,
    ("POST", "/api/v1/auth/refresh"): ALL,
    ("POST", "/api/v1/auth/logout"): ALL,
    ("GET", "/api/v1/auth/me"): AUTHENTICATED,
    ("POST", "/api/v1/auth/password"): AUTHENTICATED,
    ("GET", "/api/v1/auth/tokens"): frozenset({A, OP, V}),
    ("POST", "/api/v1/auth/tokens"): frozenset({A, OP, V}),
    ("DELETE", "/api/v1/auth/tokens/{token_id:str}"): frozenset({A, OP, V}),
    ("GET", f"{W}/state"): frozenset({A, OP, V, D}),
    ("PUT", f"{W}/state"): frozenset({A, OP, D}),
    ("GET", f"{W}/sites"): frozenset({A, OP, V, D}),
    ("POST", f"{W}/sites"): frozenset({A, OP, D}),
    ("GET", f"{W}/sites/{{name:str}}"): frozenset({A, OP, V, D}),
    ("PUT", f"{W}/sites/{{name:str}}"): frozenset({A, OP, D}),
    ("DELETE", f"{W}/sites/{{name:str}}"): frozenset({A, OP, D}),
    ("GET", f"{W}/upstreams"): frozenset({A, OP, V, D}),
    ("POST", f"{W}/upstreams"): frozenset({A, OP, D}),
    ("GET", f"{W}/upstreams/{{name:str}}"): frozenset({A, OP, V, D}),
    ("PUT", f"{W}/upstreams/{{name:str}}"): frozenset({A, OP, D}),
    ("DELETE", f"{W}/upstreams/{{name:str}}"): frozenset({A, OP, D}),
    ("GET", f"{W}/streams"): frozenset({A, OP, V, D}),
    ("POST", f"{W}/streams"): frozenset({A, OP, D}),
    ("GET", f"{W}/streams/{{name:str}}"): frozenset({A, OP, V, D}),
    ("PUT", f"{W}/streams/{{name:str}}"): frozenset({A, OP, D}),
    ("DELETE", f"{W}/streams/{{name:str}}"): frozenset({A, OP, D}),
    ("GET", f"{W}/versions"): frozenset({A, OP, V, D}),
    ("GET", f"{W}/versions/{{number:int}}"): frozenset({A, OP, V, D}),
    ("GET", f"{W}/versions/{{number:int}}/diff"): frozenset({A, OP, V, D}),
    ("GET", f"{W}/versions/{{number:int}}/rollout"): frozenset({A, OP, V, D}),
    ("POST", f"{W}/versions/{{number:int}}/rollback"): frozenset({A, OP}),
    ("GET", f"{W}/assignments"): frozenset({A, OP, V}),
    ("GET", f"{W}/assignments/{{name:str}}"): frozenset({A, OP, V}),
    ("PUT", f"{W}/assignments/{{name:str}}"): frozenset({A, OP}),
    ("DELETE", f"{W}/assignments/{{name:str}}"): frozenset({A, OP}),
    ("GET", "/api/v1/agents"): frozenset({A, OP, V, D}),
    ("GET", "/api/v1/agents/{agent_id:str}"): frozenset({A, OP, V, D}),
    ("GET", "/api/v1/agents/{agent_id:str}/status"): frozenset({A, OP, V, D}),
    ("GET", "/api/v1/agents/{agent_id:str}/health"): frozenset({A, OP, V, D}),
    ("GET", "/api/v1/agents/{agent_id:str}/why"): frozenset({A, OP, V, D}),
    ("PUT", "/api/v1/agents/{agent_id:str}/labels"): frozenset({A, OP}),
    ("POST", "/api/v1/agents/{agent_id:str}/revoke"): frozenset({A, OP}),
    ("GET", f"{W}/bootstrap-tokens"): frozenset({A, OP}),
    ("POST", f"{W}/bootstrap-tokens"): frozenset({A, OP}),
    ("DELETE", f"{W}/bootstrap-tokens/{{token_id:str}}"): frozenset({A, OP}),
    ("GET", f"{W}/certificates"): frozenset({A, OP, V}),
    ("POST", f"{W}/certificates"): frozenset({A, OP}),
    ("GET", f"{W}/certificates/{{name:str}}"): frozenset({A, OP, V}),
    ("PUT", f"{W}/certificates/{{name:str}}"): frozenset({A, OP}),
    ("DELETE", f"{W}/certificates/{{name:str}}"): frozenset({A, OP}),
    ("GET", "/api/v1/users"): frozenset({A}),
    ("POST", "/api/v1/users"): frozenset({A}),
    ("GET", "/api/v1/users/{username:str}"): frozenset({A}),
    ("PATCH", "/api/v1/users/{username:str}"): frozenset({A}),
    ("DELETE", "/api/v1/users/{username:str}"): frozenset({A}),
    ("GET", "/api/v1/roles"): frozenset({A, OP, V}),
    ("GET", "/api/v1/audit"): frozenset({A, OP}),
    ("WS", "/api/v1/events"): AUTHENTICATED,
}
"""What each role may reach: written out by hand, so the code is checked against a spec
rather than against itself. Every route of the app must appear here."""

PARAMS = {
    "workspace": "default",
    "name": "nothing-here",
    "number": "1",
    "agent_id": "no-such-agent",
    "token_id": "0" * 16,
    "username": "nobody",
}


def app_routes(app: Litestar) -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for route in app.routes:
        if isinstance(route, WebSocketRoute):
            found.add(("WS", route.path))
        elif isinstance(route, HTTPRoute):
            for handler in route.route_handlers:
                found.update(
                    (m, route.path) for m in handler.http_methods if m not in ("HEAD", "OPTIONS")
                )
    return {r for r in found if not r[1].startswith("/docs/{")}


def concrete(path: str) -> str:
    return re.sub(r"\{(\w+):\w+\}", lambda m: PARAMS[m.group(1)], path)


@pytest.fixture(scope="module")
def matrix_master(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Master]:
    """One master for the whole matrix: the checks only read or fail before writing."""
    pm = get_plugin_manager(autoload=False, environ={})
    state: Path = tmp_path_factory.mktemp("rbac") / "state"
    settings = make_settings(pm, state, **{"auth.roles": CUSTOM_ROLES})
    with TestClient(build_app(pm=pm, settings=settings)) as client:
        yield Master(client)


def headers_for(master: Master, role: str) -> dict[str, str]:
    return {} if role == "anonymous" else master.headers(role, subject=f"{role}-user")


class TestMatrix:
    """Every endpoint x every role: allowed roles get past auth, the others get 401/403."""

    def test_the_matrix_covers_every_route(self, matrix_master: Master) -> None:
        """A new route without an entry here fails this test (deny by default is not enough)."""
        routes = app_routes(matrix_master.client.app)
        assert routes == set(MATRIX), (
            f"missing from MATRIX: {sorted(routes - set(MATRIX))}; "
            f"stale in MATRIX: {sorted(set(MATRIX) - routes)}"
        )

    @pytest.mark.parametrize("role", ROLES)
    @pytest.mark.parametrize(("method", "path"), sorted(k for k in MATRIX if k[0] != "WS"))
    def test_http_route(self, matrix_master: Master, method: str, path: str, role: str) -> None:
        """The role reaches the handler exactly when the matrix says it may."""
        response = matrix_master.client.request(
            method, concrete(path), headers=headers_for(matrix_master, role), json={}
        )
        allowed = role in MATRIX[(method, path)]
        if allowed:
            assert response.status_code not in (401, 403), response.text
        elif role == "anonymous":
            assert response.status_code == 401, response.text
        else:
            assert response.status_code == 403, response.text
            assert response.json()["type"] == "urn:nxmesh:problem:forbidden"

    @pytest.mark.parametrize("role", ROLES)
    def test_events_websocket(self, matrix_master: Master, role: str) -> None:
        """The events WebSocket admits exactly the roles with ``event:read``."""
        from litestar.exceptions import WebSocketDisconnect

        allowed = role in MATRIX[("WS", "/api/v1/events")]
        client = matrix_master.client
        with client.websocket_connect(
            "/api/v1/events", headers=headers_for(matrix_master, role)
        ) as ws:
            if role == "anonymous":  # no header: the first message must authenticate
                ws.send_json({"type": "auth", "token": "not-a-token"})
            if allowed:
                assert ws.receive_json()["type"] == "ready"
            else:
                with pytest.raises(WebSocketDisconnect) as closed:
                    ws.receive_json()
                assert closed.value.code == 4401

    def test_a_role_without_event_read_is_refused_the_websocket(
        self, matrix_master: Master
    ) -> None:
        """An authenticated caller lacking ``event:read`` is closed with 4403."""
        from litestar.exceptions import WebSocketDisconnect

        token = matrix_master.token("no-such-role", subject="x")
        with (
            matrix_master.client.websocket_connect(
                "/api/v1/events", headers={"Authorization": f"Bearer {token}"}
            ) as ws,
            pytest.raises(WebSocketDisconnect) as closed,
        ):
            ws.receive_json()
        assert closed.value.code == 4403


class TestWorkspaceScopes:
    """Role bindings like ``operator@staging`` apply inside that workspace only."""

    def test_scoped_binding(self, matrix_master: Master) -> None:
        """A staging operator writes staging, cannot even read default, nor users."""
        c = matrix_master.client
        h = matrix_master.headers("operator@staging", subject="stan")
        assert c.get("/api/v1/workspaces/staging/state", headers=h).status_code == 200
        assert c.get("/api/v1/workspaces/default/state", headers=h).status_code == 403
        assert c.get("/api/v1/roles", headers=h).status_code == 403  # organization-level
        put = c.put("/api/v1/workspaces/default/state", json={}, headers=h)
        assert put.status_code == 403

    def test_a_user_with_a_bound_role_is_created_through_the_api(
        self, matrix_master: Master
    ) -> None:
        """``POST /users`` takes ``viewer@staging`` (as the docs and CLI promise); the user
        then reads staging only. A malformed binding is a 422 naming the field."""
        c = matrix_master.client
        admin = matrix_master.headers("admin", subject="admin")
        body = {"username": "wendy", "password": "wendy-password-1", "roles": ["viewer@staging"]}
        created = c.post("/api/v1/users", json=body, headers=admin)
        assert created.status_code == 201, created.text
        assert created.json()["roles"] == ["viewer@staging"]
        login = c.post(
            "/api/v1/auth/login", json={"username": "wendy", "password": "wendy-password-1"}
        )
        assert login.status_code == 200, login.text
        h = {"Authorization": f"Bearer {login.json()['access_token']}"}
        assert c.get("/api/v1/workspaces/staging/state", headers=h).status_code == 200
        assert c.get("/api/v1/workspaces/default/state", headers=h).status_code == 403
        moved = c.patch("/api/v1/users/wendy", json={"roles": ["operator@prod"]}, headers=admin)
        assert moved.status_code == 200, moved.text
        for bad in ("viewer@Staging", "viewer@", "@staging", "viewer@a@b"):
            refused = c.patch("/api/v1/users/wendy", json={"roles": [bad]}, headers=admin)
            assert refused.status_code == 422, bad
            assert refused.json()["errors"][0]["path"] == "roles[0]"

    def test_custom_role_pinned_grant(self, matrix_master: Master) -> None:
        """``agent:read@staging`` in a custom role lists only staging agents."""
        from nxmesh.core.model import Agent

        storage = matrix_master.services.storage
        matrix_master.call(storage.upsert_agent, Agent(id="s1", name="s1", workspace="staging"))
        matrix_master.call(storage.upsert_agent, Agent(id="p1", name="p1", workspace="prod"))
        c = matrix_master.client
        h = matrix_master.headers("deployer", subject="dee")
        assert [a["id"] for a in c.get("/api/v1/agents", headers=h).json()] == ["s1"]
        assert c.get("/api/v1/agents/p1", headers=h).status_code == 404
        assert c.get("/api/v1/agents/s1", headers=h).status_code == 200


class TestRbacRules:
    """Grant matching, bindings and custom role validation."""

    def test_patterns(self) -> None:
        """Exact, resource-wildcard, action-wildcard and global patterns."""
        assert Grant("config:read").matches("config:read")
        assert not Grant("config:read").matches("config:write")
        assert Grant("config:*").matches("config:rollback")
        assert Grant("*:read").matches("agent:read")
        assert not Grant("*:read").matches("agent:write")
        assert Grant("*").matches("user:write")

    def test_parse_grant(self) -> None:
        """``perm@workspace`` parses; nonsense is refused with the offending text."""
        assert parse_grant("config:read@prod") == Grant("config:read", "prod")
        for bad in ("config", "Config:Read", "config:read@", "a:b:c", "config:read@Prod!"):
            with pytest.raises(ValueError, match=r"permission|workspace"):
                parse_grant(bad)

    def test_builtin_roles(self) -> None:
        """Viewers read, operators change, only admins manage users."""
        rbac = Rbac()
        viewer = Principal("v", ("viewer",), "jwt")
        operator = Principal("o", ("operator",), "jwt")
        admin = Principal("a", ("admin",), "jwt")
        assert rbac.allowed(viewer, "config:read", "prod")
        assert not rbac.allowed(viewer, "config:write", "prod")
        assert rbac.allowed(operator, "config:rollback", "prod")
        assert not rbac.allowed(operator, "user:write")
        assert all(rbac.allowed(admin, p, "prod") for p in PERMISSIONS)
        assert not rbac.allowed(None, "config:read", "prod")

    def test_organization_permissions_need_organization_wide_grants(self) -> None:
        """A workspace-bound admin is not an organization admin."""
        rbac = Rbac()
        scoped = Principal("a", ("admin@prod",), "jwt")
        assert rbac.allowed(scoped, "config:write", "prod")
        assert not rbac.allowed(scoped, "config:write", "dev")
        assert not rbac.allowed(scoped, "user:write", "prod")

    def test_api_token_needs_role_and_scope(self) -> None:
        """A token principal needs the permission from its roles *and* its scopes."""
        rbac = Rbac()
        token = Principal("a", ("admin",), "api_token", scopes=("config:read",))
        assert rbac.allowed(token, "config:read", "prod")
        assert not rbac.allowed(token, "config:write", "prod")
        no_scopes = Principal("a", ("admin",), "api_token", scopes=())
        assert not rbac.allowed(no_scopes, "config:read", "prod")

    def test_scope_escalation_is_detected(self) -> None:
        """Scopes can only narrow a principal's grants."""
        rbac = Rbac()
        viewer = Principal("v", ("viewer@dev",), "jwt")
        assert rbac.scope_allowed(viewer, Grant("config:read", "dev"))
        assert not rbac.scope_allowed(viewer, Grant("config:read"))
        assert not rbac.scope_allowed(viewer, Grant("*:read", "dev"))
        assert not rbac.scope_allowed(viewer, Grant("config:write", "dev"))

    def test_a_token_hands_on_no_more_than_its_scopes(self) -> None:
        """An API token principal is held to its roles *and* its own scopes."""
        rbac = Rbac()
        token = Principal("a", ("admin",), "api_token", scopes=("config:*@dev", "user:write"))
        assert rbac.scope_allowed(token, Grant("config:read", "dev"))
        assert not rbac.scope_allowed(token, Grant("config:read"))
        assert not rbac.scope_allowed(token, Grant("*"))
        assert rbac.holds_all(token, ["viewer@dev"]) is False  # viewer reads agents too
        admin = Principal("a", ("admin",), "jwt")
        assert rbac.holds_all(admin, ["viewer", "operator@dev"])
        assert not rbac.holds_all(Principal("o", ("operator",), "jwt"), ["admin"])

    def test_custom_roles_are_validated(self) -> None:
        """Redefining a built-in role or writing a bad permission is a configuration error."""
        with pytest.raises(ConfigurationError, match="built-in"):
            Rbac({"admin": ["*"]})
        with pytest.raises(ConfigurationError, match=r"auth\.roles\.ops"):
            Rbac({"ops": ["config-write"]})
        rbac = Rbac({"ops": ["config:*@prod"]})
        assert rbac.check_binding("ops") is None
        assert "unknown role" in (rbac.check_binding("opz") or "")
        assert rbac.check_binding("ops@staging") is None
        # `re.match` with `$` let a final newline through: names are matched whole.
        assert "invalid workspace" in (rbac.check_binding("ops@staging\n") or "")
        with pytest.raises(ConfigurationError, match="invalid role name"):
            Rbac({"ops\n": ["config:read"]})

    def test_event_permissions(self) -> None:
        """Each event kind maps to the permission to read its subject; unknown kinds to ``*``."""
        assert event_permission("version.created") == "config:read"
        assert event_permission("agent.revoked") == "agent:read"
        assert event_permission("audit.recorded") == "audit:read"
        assert event_permission("mystery.thing") == "*"


class TestDocs:
    """``docs/api.md`` stays true to the code."""

    DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"

    def test_endpoint_table_matches_the_routes(self, matrix_master: Master) -> None:
        """Every route is documented with the permission its handler declares, and no more."""
        rows = re.findall(r"^\| `(\w+)` \| `([^`]+)` \| (.+) \|$", self.DOC.read_text(), re.M)
        documented = {(m, p): needs for m, p, needs in rows}
        actual: dict[tuple[str, str], str] = {}
        app = matrix_master.client.app
        for route in app.routes:
            if route.path.startswith("/docs"):
                continue
            handlers = (
                [route.route_handler] if isinstance(route, WebSocketRoute) else route.route_handlers
            )
            for handler in handlers:
                opt = handler.opt
                needs = (
                    "public"
                    if opt.get("public")
                    else "any authenticated caller"
                    if opt.get("authenticated")
                    else f"`{opt.get('permission')}`"
                )
                methods = (
                    ["WS"]
                    if isinstance(route, WebSocketRoute)
                    else [m for m in handler.http_methods if m not in ("HEAD", "OPTIONS")]
                )
                for method in methods:
                    actual[(method, re.sub(r":\w+}", "}", route.path))] = needs
        assert set(documented) == set(actual)
        for key, needs in actual.items():
            assert documented[key].startswith(needs), (key, documented[key], needs)

    def test_permission_table_lists_every_permission(self) -> None:
        """The permissions table has one row per permission the API checks."""
        rows = re.findall(r"^\| `(\w+:\w+)` \| ([^|]+) \|$", self.DOC.read_text(), re.M)
        assert {p: d.strip() for p, d in rows} == dict(PERMISSIONS)
