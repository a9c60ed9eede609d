"""The events WebSocket: authentication (header or first message), RBAC filtering of each
event, client-side subscriptions, and closing when the token expires."""

from __future__ import annotations

import time
from typing import Any

import pytest
from litestar.exceptions import WebSocketDisconnect

from nxmesh.core.serialization import unstructure
from nxmesh.master import events_ws
from nxmesh.testing import make_state

from .conftest import Master
from .test_auth import same_key_tokens

EVENTS = "/api/v1/events"
TIMEOUT = 5.0


def put_state(master: Master, workspace: str, sites: int = 1) -> None:
    response = master.client.put(
        f"/api/v1/workspaces/{workspace}/state",
        json=unstructure(make_state(sites, workspace=workspace)),
        headers=master.headers("admin", subject="admin"),
    )
    assert response.status_code == 200, response.text


def next_event(ws: Any, kind: str | None = None) -> dict[str, Any]:
    """The next event message (of `kind`, skipping others)."""
    while True:
        message: dict[str, Any] = ws.receive_json(timeout=TIMEOUT)
        assert message["type"] == "event"
        if kind is None or message["kind"] == kind:
            return message


def events_until_closed(ws: Any) -> tuple[list[dict[str, Any]], int]:
    """The payloads delivered until the server closed the stream, and its close code."""
    delivered: list[dict[str, Any]] = []
    while True:
        try:
            delivered.append(next_event(ws)["payload"])
        except WebSocketDisconnect as closed:
            return delivered, closed.code


class TestEventStream:
    """Events reach authenticated callers, filtered by what each may read."""

    def test_header_authentication_and_version_events(self, master: Master) -> None:
        """With an Authorization header the stream is ready at once and carries versions."""
        headers = master.headers("viewer", subject="vic")
        with master.client.websocket_connect(EVENTS, headers=headers) as ws:
            assert ws.receive_json(timeout=TIMEOUT) == {"type": "ready", "subject": "vic"}
            put_state(master, "default")
            event = next_event(ws, "version.created")
            assert event["workspace"] == "default"
            assert event["payload"]["number"] == 1
            assert event["payload"]["author"] == "admin"

    def test_first_message_authentication(self, master: Master) -> None:
        """Browsers send the token as the first message instead of a header."""
        with master.client.websocket_connect(EVENTS) as ws:
            ws.send_json({"type": "auth", "token": master.token("viewer", subject="web")})
            assert ws.receive_json(timeout=TIMEOUT)["subject"] == "web"

    def test_api_tokens_work_too(self, master: Master) -> None:
        """An ``nxm_`` token with event:read opens the stream."""
        admin = master.headers("admin", subject="admin")
        created = master.client.post(
            "/api/v1/auth/tokens",
            json={"name": "ui", "scopes": ["event:read", "config:read"]},
            headers=admin,
        ).json()
        bearer = {"Authorization": f"Bearer {created['token']}"}
        with master.client.websocket_connect(EVENTS, headers=bearer) as ws:
            assert ws.receive_json(timeout=TIMEOUT)["type"] == "ready"

    @pytest.mark.parametrize("how", ["revoke the token", "delete its owner"])
    def test_a_stream_ends_with_its_api_token(self, master: Master, how: str) -> None:
        """The REST API refuses a revoked token or one whose owner is gone at once; so does
        the stream: the audited change makes it check again and close with 4401 before
        delivering anything more (here: the audit event of the change itself)."""
        master.add_user("bob", "correct horse battery", "operator")
        bob = master.headers("operator", subject="bob")
        created = master.client.post(
            "/api/v1/auth/tokens",
            json={"name": "ui", "scopes": ["event:read", "config:read", "audit:read"]},
            headers=bob,
        ).json()
        bearer = {"Authorization": f"Bearer {created['token']}"}
        admin = master.headers("admin", subject="admin")
        with master.client.websocket_connect(EVENTS, headers=bearer) as ws:
            assert ws.receive_json(timeout=TIMEOUT)["type"] == "ready"
            put_state(master, "default")
            assert next_event(ws, "version.created")["payload"]["number"] == 1
            if how == "revoke the token":
                url = f"/api/v1/auth/tokens/{created['api_token']['id']}"
                assert master.client.delete(url, headers=bob).status_code == 204
            else:
                assert master.client.delete("/api/v1/users/bob", headers=admin).status_code == 204
            put_state(master, "default", sites=2)
            delivered, code = events_until_closed(ws)
        assert code == 4401
        actions = [p.get("action") for p in delivered]
        assert not any(a and a.startswith(("api_token.", "user.")) for a in actions)
        assert 2 not in [p.get("number") for p in delivered]

    @pytest.mark.parametrize("change", ["delete", "demote"])
    def test_a_login_sessions_stream_ends_with_its_session(
        self, master: Master, change: str
    ) -> None:
        """A stream opened with a password login's access token ends (4401) when the
        user is deleted or demoted: the change ends the session, and the stream's
        re-check finds the token's session gone, as the REST API does."""
        master.add_user("eve", "correct horse battery", "admin")
        login = master.client.post(
            "/api/v1/auth/login", json={"username": "eve", "password": "correct horse battery"}
        ).json()
        bearer = {"Authorization": f"Bearer {login['access_token']}"}
        admin = master.headers("admin", subject="admin")
        with master.client.websocket_connect(EVENTS, headers=bearer) as ws:
            assert ws.receive_json(timeout=TIMEOUT)["type"] == "ready"
            if change == "delete":
                done = master.client.delete("/api/v1/users/eve", headers=admin)
            else:
                body = {"roles": ["viewer"]}
                done = master.client.patch("/api/v1/users/eve", json=body, headers=admin)
            assert done.status_code in (200, 204), done.text
            put_state(master, "default")
            delivered, code = events_until_closed(ws)
        assert code == 4401
        assert 1 not in [p.get("number") for p in delivered]

    def test_the_stream_checks_its_token_again_in_time(
        self, master: Master, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without an audited change, the token is checked again once `RECHECK_INTERVAL`
        passed: a token revoked behind the audit log's back ends the stream too."""
        monkeypatch.setattr(events_ws, "RECHECK_INTERVAL", 0.0)
        admin = master.headers("admin", subject="admin")
        created = master.client.post(
            "/api/v1/auth/tokens", json={"name": "ui", "scopes": ["*"]}, headers=admin
        ).json()
        bearer = {"Authorization": f"Bearer {created['token']}"}
        with master.client.websocket_connect(EVENTS, headers=bearer) as ws:
            assert ws.receive_json(timeout=TIMEOUT)["type"] == "ready"
            store = master.services.auth.store
            assert master.call(store.revoke_api_token, created["api_token"]["id"])
            put_state(master, "default")
            with pytest.raises(WebSocketDisconnect) as closed:
                next_event(ws)
        assert closed.value.code == 4401

    def test_no_credentials_closes_with_4401(
        self, master: Master, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without a header or an auth message the socket closes (a token in the URL is ignored)."""
        monkeypatch.setattr(events_ws, "AUTH_TIMEOUT", 0.2)
        url = f"{EVENTS}?access_token={master.token('admin')}"
        with (
            master.client.websocket_connect(url) as ws,
            pytest.raises(WebSocketDisconnect) as closed,
        ):
            ws.receive_json(timeout=TIMEOUT)
        assert closed.value.code == 4401

    def test_events_outside_the_callers_workspaces_are_not_delivered(self, master: Master) -> None:
        """A staging viewer sees staging's version, not default's published just before it."""
        headers = master.headers("viewer@staging", subject="stan")
        with master.client.websocket_connect(EVENTS, headers=headers) as ws:
            ws.receive_json(timeout=TIMEOUT)
            put_state(master, "default")
            put_state(master, "staging")
            event = ws.receive_json(timeout=TIMEOUT)
            assert (event["kind"], event["workspace"]) == ("version.created", "staging")

    def test_audit_events_need_audit_read(self, master: Master) -> None:
        """Operators receive audit entries; viewers do not."""
        with (
            master.client.websocket_connect(
                EVENTS, headers=master.headers("viewer", subject="vic")
            ) as viewer,
            master.client.websocket_connect(
                EVENTS, headers=master.headers("operator", subject="otto")
            ) as operator,
        ):
            viewer.receive_json(timeout=TIMEOUT)
            operator.receive_json(timeout=TIMEOUT)
            put_state(master, "default")
            audit = next_event(operator, "audit.recorded")
            assert audit["payload"]["action"] == "state.replace"
            assert audit["payload"]["actor"] == "admin"
            kinds = [viewer.receive_json(timeout=TIMEOUT)["kind"]]
            put_state(master, "default", sites=2)
            kinds.append(viewer.receive_json(timeout=TIMEOUT)["kind"])
            assert kinds == ["version.created", "version.created"]

    def test_subscription_narrows_the_stream(self, master: Master) -> None:
        """``subscribe`` with kinds keeps only matching events."""
        with master.client.websocket_connect(
            EVENTS, headers=master.headers("admin", subject="admin")
        ) as ws:
            ws.receive_json(timeout=TIMEOUT)
            ws.send_json({"type": "subscribe", "kinds": ["audit.*"]})
            put_state(master, "default")
            assert ws.receive_json(timeout=TIMEOUT)["kind"] == "audit.recorded"

    @pytest.mark.parametrize(
        "message", ['{"type": "subscribe", "kinds": "version.*"}', "not json", '["subscribe"]']
    )
    def test_malformed_client_message_closes_with_4400(self, master: Master, message: str) -> None:
        """Anything but a well-formed subscribe message after authentication is refused."""
        with master.client.websocket_connect(
            EVENTS, headers=master.headers("admin", subject="admin")
        ) as ws:
            ws.receive_json(timeout=TIMEOUT)
            ws.send_text(message)
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_json(timeout=TIMEOUT)
        assert closed.value.code == 4400

    def test_malformed_first_message_closes_with_4401(self, master: Master) -> None:
        """A first message that is not JSON authenticates nobody."""
        with master.client.websocket_connect(EVENTS) as ws:
            ws.send_text("Bearer abc")
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_json(timeout=TIMEOUT)
        assert closed.value.code == 4401

    def test_stream_closes_when_the_token_expires(self, master: Master) -> None:
        """A one-second token gets a 4401 close about a second in."""
        short = same_key_tokens(master, ttl=1.0, clock=lambda: time.time() - 0.5)
        token = short.issue("admin", ["admin"], authenticator="password").token
        with master.client.websocket_connect(
            EVENTS, headers={"Authorization": f"Bearer {token}"}
        ) as ws:
            assert ws.receive_json(timeout=TIMEOUT)["type"] == "ready"
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_json(timeout=TIMEOUT)
        assert closed.value.code == 4401  # within receive_json's TIMEOUT: it did not time out
