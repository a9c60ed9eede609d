"""Authentication: access tokens (alg pinning, expiry, forgery), refresh rotation and reuse
detection, API token scopes, password lockout, and the authenticator contract."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import attrs
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from litestar.testing import TestClient
from prometheus_client.parser import text_string_to_metric_families

from nxmesh.core.interfaces import Authenticator, Credentials
from nxmesh.core.pluginmanager import get_plugin_manager
from nxmesh.core.records import User
from nxmesh.master.app import build_app
from nxmesh.master.auth import (
    ApiTokenAuthenticator,
    AuthenticationError,
    JwtAuthenticator,
    LockedOutError,
    Passwords,
)
from nxmesh.master.auth.tokens import JWT_KEY_FILE, AccessTokens
from nxmesh.plugins.auth_password import ANY_USER, Lockout, PasswordAuthenticator
from nxmesh.testing.contracts.auth import AuthenticatorContract

from .conftest import FAST_HASHING, Master, make_settings

STATE = "/api/v1/workspaces/default/state"
ME = "/api/v1/auth/me"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unsigned(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"


def claims_for(master: Master, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    tokens = master.services.auth.tokens
    base = {
        "iss": tokens.issuer,
        "aud": tokens.audience,
        "sub": "mallory",
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "jti": "x1",
        "roles": ["admin"],
    }
    base.update(changes)
    return base


def same_key_tokens(master: Master, **kwargs: Any) -> AccessTokens:
    """Another AccessTokens instance holding the master's own signing key."""
    services = master.services
    defaults: dict[str, Any] = {
        "issuer": services.auth.tokens.issuer,
        "audience": services.auth.tokens.audience,
        "ttl": 600.0,
    }
    return AccessTokens.load_or_create(
        services.state_dir / JWT_KEY_FILE, services.keyring, **{**defaults, **kwargs}
    )


def failures(master: Master) -> dict[str, float]:
    text = master.client.get("/metrics", headers=master.headers("admin")).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "nxmesh_master_auth_failures":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    out[sample.labels["reason"]] = sample.value
    return out


def status(master: Master, token: str) -> int:
    header = f"Bearer {token}".encode()  # bytes: junk tokens may not be ASCII
    return master.client.get(ME, headers={"Authorization": header}).status_code


def _login(master: Master, username: str, password: str) -> dict[str, Any]:
    response = master.client.post(
        "/api/v1/auth/login", json={"username": username, "password": password}
    )
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


class TestAccessTokens:
    """Access tokens are RS256 only, from this issuer, for this audience, and unexpired."""

    def test_a_valid_token_authenticates(self, master: Master) -> None:
        """The control case: a token the master issued is accepted."""
        assert status(master, master.token("viewer")) == 200

    def test_expired_token_is_rejected(self, master: Master) -> None:
        """A token past its exp (beyond the small leeway) is a 401."""
        old = same_key_tokens(master, clock=lambda: time.time() - 3600).issue(
            "admin", ["admin"], authenticator="password"
        )
        assert status(master, old.token) == 401
        assert failures(master).get("expired") == 1

    def test_forged_signature_is_rejected(self, master: Master) -> None:
        """A token signed by another RSA key, even with the right kid, is a 401."""
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        kid = master.services.auth.tokens.key_id
        forged = jwt.encode(claims_for(master), other, algorithm="RS256", headers={"kid": kid})
        assert status(master, forged) == 401
        assert failures(master).get("bad_signature") == 1

    def test_tampered_claims_are_rejected(self, master: Master) -> None:
        """Swapping a viewer token's payload for an admin one breaks the signature."""
        header, _, signature = master.token("viewer").split(".")
        payload = b64(json.dumps(claims_for(master, sub="tester")).encode())
        assert status(master, f"{header}.{payload}.{signature}") == 401

    def test_alg_none_is_rejected(self, master: Master) -> None:
        """An unsigned token (``alg: none``) is refused before any verification."""
        kid = master.services.auth.tokens.key_id
        token = unsigned({"alg": "none", "typ": "JWT", "kid": kid}, claims_for(master)) + "."
        assert status(master, token) == 401
        assert failures(master).get("bad_algorithm") == 1

    def test_hs256_signed_with_the_public_key_is_rejected(self, master: Master) -> None:
        """The RS256→HS256 confusion attack (public key as HMAC secret) fails."""
        tokens = master.services.auth.tokens
        head = unsigned({"alg": "HS256", "typ": "JWT", "kid": tokens.key_id}, claims_for(master))
        secret = tokens.public_key_pem().encode()
        signature = b64(hmac.new(secret, head.encode(), hashlib.sha256).digest())
        assert status(master, f"{head}.{signature}") == 401
        assert failures(master).get("bad_algorithm") == 1
        with pytest.raises(AuthenticationError) as caught:
            tokens.verify(f"{head}.{signature}")
        assert caught.value.reason == "bad_algorithm"

    def test_wrong_audience_is_rejected(self, master: Master) -> None:
        """Our key and issuer but another audience: the token was meant for someone else."""
        token = same_key_tokens(master, audience="another-api").issue(
            "admin", ["admin"], authenticator="password"
        )
        assert status(master, token.token) == 401
        assert failures(master).get("wrong_audience") == 1

    def test_wrong_issuer_is_rejected(self, master: Master) -> None:
        """A token from another issuer is not ours: no link accepts it."""
        token = same_key_tokens(master, issuer="someone-else").issue(
            "admin", ["admin"], authenticator="password"
        )
        assert status(master, token.token) == 401
        assert failures(master).get("unrecognised") == 1

    def test_missing_claims_and_garbage_are_rejected(self, master: Master) -> None:
        """Tokens without exp, or not JWTs at all, are 401s rather than errors."""
        tokens = master.services.auth.tokens
        no_exp = claims_for(master)
        del no_exp["exp"]
        signed = jwt.encode(
            no_exp, same_key_tokens(master)._key, algorithm="RS256", headers={"kid": tokens.key_id}
        )
        assert status(master, signed) == 401
        for junk in ("a.b.c", "nxm_zz_zz", "x" * 5000, "Ünïcode"):
            assert status(master, junk) == 401

    def test_only_bearer_credentials_in_the_header_count(self, master: Master) -> None:
        """Basic auth, an empty header and a token in the query string are not accepted."""
        c = master.client
        assert c.get(ME, headers={"Authorization": "Basic YWRtaW46YWRtaW4="}).status_code == 401
        assert c.get(ME, headers={"Authorization": "Bearer "}).status_code == 401
        response = c.get(ME, params={"access_token": master.token("admin")})
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Bearer")


class TestLoginAndRefresh:
    """Password login, refresh rotation, reuse detection and logout."""

    def _login(self, master: Master, username: str, password: str) -> dict[str, Any]:
        response = master.client.post(
            "/api/v1/auth/login", json={"username": username, "password": password}
        )
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    def _refresh(self, master: Master, token: str) -> Any:
        return master.client.post("/api/v1/auth/refresh", json={"refresh_token": token})

    def test_initial_admin_can_log_in(self, master: Master) -> None:
        """The generated admin password from the state directory works, with a 15 min token."""
        body = self._login(master, "admin", master.admin_password())
        assert body["token_type"] == "Bearer"
        assert 890 <= body["expires_in"] <= 900
        assert body["roles"] == ["admin"]
        assert body["refresh_token"].startswith("nxr_")
        assert status(master, body["access_token"]) == 200

    def test_refresh_rotates_and_reuse_revokes_the_session(self, master: Master) -> None:
        """Each refresh token works once; replaying a spent one kills the whole session."""
        master.add_user("ann", "correct horse battery", "viewer")
        first = self._login(master, "ann", "correct horse battery")
        second = self._refresh(master, first["refresh_token"])
        assert second.status_code == 200
        rotated = second.json()
        assert rotated["refresh_token"] != first["refresh_token"]
        assert status(master, rotated["access_token"]) == 200

        replay = self._refresh(master, first["refresh_token"])
        assert replay.status_code == 401
        assert "already used" in replay.json()["detail"]
        # The legitimate holder's newer token died with the session.
        assert self._refresh(master, rotated["refresh_token"]).status_code == 401
        assert failures(master).get("refresh_reused") == 1

    def test_refresh_reads_current_roles_and_refuses_disabled_users(self, master: Master) -> None:
        """A demotion applies at the next refresh; a disabled user cannot refresh at all."""
        master.add_user("bob", "correct horse battery", "operator")
        tokens = self._login(master, "bob", "correct horse battery")
        master.add_user("bob", "correct horse battery", "viewer")
        renewed = self._refresh(master, tokens["refresh_token"]).json()
        assert renewed["roles"] == ["viewer"]
        master.add_user("bob", "correct horse battery", "viewer", disabled=True)
        assert self._refresh(master, renewed["refresh_token"]).status_code == 401

    def test_logout_revokes_the_refresh_token(self, master: Master) -> None:
        """After logout the session's refresh token no longer works."""
        tokens = self._login(master, "admin", master.admin_password())
        response = master.client.post(
            "/api/v1/auth/logout", json={"refresh_token": tokens["refresh_token"]}
        )
        assert response.status_code == 204
        assert self._refresh(master, tokens["refresh_token"]).status_code == 401

    @pytest.mark.parametrize("change", ["delete", "demote", "disable", "password", "logout"])
    def test_ending_a_session_ends_its_access_tokens_at_once(
        self, master: Master, change: str
    ) -> None:
        """An access token is only as good as its session: deleting, demoting or disabling
        its user, a new password or a logout stop it now, not when it expires (its
        roles were those of the last refresh)."""
        master.add_user("eve", "correct horse battery", "admin")
        tokens = self._login(master, "eve", "correct horse battery")
        eve = {"Authorization": f"Bearer {tokens['access_token']}"}
        c, admin = master.client, master.headers("admin", subject="admin")
        assert c.get("/api/v1/users", headers=eve).status_code == 200
        if change == "delete":
            done = c.delete("/api/v1/users/eve", headers=admin)
        elif change == "demote":
            done = c.patch("/api/v1/users/eve", json={"roles": ["viewer"]}, headers=admin)
        elif change == "disable":
            done = c.patch("/api/v1/users/eve", json={"disabled": True}, headers=admin)
        elif change == "password":
            new = {"password": "another long passphrase"}
            done = c.patch("/api/v1/users/eve", json=new, headers=admin)
        else:
            done = c.post("/api/v1/auth/logout", json={"refresh_token": tokens["refresh_token"]})
        assert done.status_code in (200, 204), done.text
        refused = c.get("/api/v1/users", headers=eve)
        assert refused.status_code == 401
        assert "login session of this access token has ended" in refused.json()["detail"]
        assert failures(master).get("session_ended") == 1

    def test_other_sessions_and_tokens_without_one_are_untouched(self, master: Master) -> None:
        """Ending one user's sessions leaves another user's access tokens working."""
        master.add_user("ann", "correct horse battery", "viewer")
        master.add_user("bob", "correct horse battery", "viewer")
        ann = self._login(master, "ann", "correct horse battery")
        bob = self._login(master, "bob", "correct horse battery")
        admin = master.headers("admin", subject="admin")
        assert master.client.delete("/api/v1/users/ann", headers=admin).status_code == 204
        assert status(master, ann["access_token"]) == 401
        assert status(master, bob["access_token"]) == 200

    def test_another_masters_ending_is_seen_within_the_recheck_interval(
        self, master: Master
    ) -> None:
        """A session ended through another master (storage changed underneath) stops this
        master's access tokens once `SESSION_RECHECK` has passed; storage is asked at
        most that often per session, and an ended session is never asked about again."""
        import attrs

        from nxmesh.master.auth.service import SESSION_RECHECK

        class Store:
            active, asked = True, 0

            async def session_active(self, family: str) -> bool:
                self.asked += 1
                return self.active

        store, now = Store(), [1000.0]
        auth = attrs.evolve(master.services.auth, store=store, clock=lambda: now[0])
        assert anyio.run(auth.session_active, "s1") is True
        assert anyio.run(auth.session_active, "s1") is True
        assert store.asked == 1
        store.active = False  # another master ended it
        now[0] += SESSION_RECHECK - 0.1
        assert anyio.run(auth.session_active, "s1") is True  # trusted a little longer
        now[0] += 0.2
        assert anyio.run(auth.session_active, "s1") is False
        now[0] += 3600
        assert anyio.run(auth.session_active, "s1") is False
        assert store.asked == 2

    def test_expired_and_malformed_refresh_tokens_fail(self, master: Master) -> None:
        """A refresh token past its lifetime, or not one at all, is a 401."""
        tokens = self._login(master, "admin", master.admin_password())
        auth = master.services.auth
        auth.clock = lambda: time.time() + auth.settings.refresh_token_ttl + 1
        assert self._refresh(master, tokens["refresh_token"]).status_code == 401
        auth.clock = time.time
        for junk in ("nxr_", "nxr_abc_def", "nxm_" + "0" * 16 + "_" + "0" * 48, "x"):
            assert self._refresh(master, junk).status_code == 401

    def test_refresh_secrets_are_stored_hashed(self, master: Master) -> None:
        """The database holds no refresh secret, only its hash."""
        tokens = self._login(master, "admin", master.admin_password())
        secret = tokens["refresh_token"].rsplit("_", 1)[1]
        raw = (master.services.state_dir / "master.db").read_bytes()
        wal = master.services.state_dir / "master.db-wal"
        raw += wal.read_bytes() if wal.exists() else b""
        assert secret.encode() not in raw
        assert hashlib.sha256(secret.encode()).hexdigest().encode() in raw

    def test_wrong_password_and_unknown_user_look_the_same(self, master: Master) -> None:
        """Both are 401 with the same detail: usernames cannot be probed."""
        c = master.client
        wrong = c.post("/api/v1/auth/login", json={"username": "admin", "password": "nope-nope"})
        ghost = c.post("/api/v1/auth/login", json={"username": "ghost", "password": "nope-nope"})
        assert wrong.status_code == ghost.status_code == 401
        assert wrong.json()["detail"] == ghost.json()["detail"]

    def test_changing_ones_password_ends_every_session(self, master: Master) -> None:
        """The current password is required; afterwards old refresh tokens are dead."""
        master.add_user("ann", "correct horse battery", "viewer")
        tokens = self._login(master, "ann", "correct horse battery")
        headers = {"Authorization": f"Bearer {tokens['access_token']}"}
        url = "/api/v1/auth/password"
        c = master.client
        wrong = c.post(
            url, json={"current_password": "nope", "new_password": "x" * 20}, headers=headers
        )
        assert wrong.status_code == 401
        short = c.post(
            url,
            json={"current_password": "correct horse battery", "new_password": "short"},
            headers=headers,
        )
        assert short.status_code == 422
        assert short.json()["errors"][0]["path"] == "new_password"
        ok = c.post(
            url,
            json={
                "current_password": "correct horse battery",
                "new_password": "a new long passphrase",
            },
            headers=headers,
        )
        assert ok.status_code == 204, ok.text
        assert self._refresh(master, tokens["refresh_token"]).status_code == 401
        assert self._login(master, "ann", "a new long passphrase")["subject"] == "ann"

    def test_repeated_failures_lock_the_login_out(self, master: Master) -> None:
        """After the threshold even the right password gets 429 with Retry-After."""
        c = master.client
        for _ in range(master.services.settings.auth.lockout_threshold):
            r = c.post("/api/v1/auth/login", json={"username": "admin", "password": "bad-guess"})
            assert r.status_code == 401
        r = c.post(
            "/api/v1/auth/login", json={"username": "admin", "password": master.admin_password()}
        )
        assert r.status_code == 429
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["type"] == "urn:nxmesh:problem:locked-out"


class TestApiTokens:
    """``nxm_`` API tokens carry scopes no wider than their owner's roles."""

    def _create(self, master: Master, headers: dict[str, str], **body: Any) -> Any:
        return master.client.post("/api/v1/auth/tokens", json=body, headers=headers)

    def test_scopes_narrow_what_the_token_may_do(self, master: Master) -> None:
        """An admin's read-only token can read state but not write it."""
        admin = master.headers("admin", subject="admin")
        created = self._create(master, admin, name="ci", scopes=["config:read"])
        assert created.status_code == 201, created.text
        token = created.json()["token"]
        assert token.startswith("nxm_")
        bearer = {"Authorization": f"Bearer {token}"}
        assert master.client.get(STATE, headers=bearer).status_code == 200
        assert master.client.put(STATE, json={}, headers=bearer).status_code == 403
        assert master.client.get("/api/v1/users", headers=bearer).status_code == 403

    def test_a_token_made_by_a_token_does_not_outlive_it(self, master: Master) -> None:
        """A short-lived token that may create tokens cannot mint a longer-lived or
        permanent one (422 at ``expires_in``); within its life it can. A session is not
        bound so: automation tokens are made from a login."""
        admin = master.headers("admin", subject="admin")
        scopes = ["config:read", "api_token:write"]
        parent = self._create(master, admin, name="short", scopes=scopes, expires_in=600)
        assert parent.status_code == 201, parent.text
        bearer = {"Authorization": f"Bearer {parent.json()['token']}"}
        for lifetime in (None, 3600):
            body: dict[str, Any] = {"name": "child", "scopes": ["config:read"]}
            if lifetime is not None:
                body["expires_in"] = lifetime
            refused = self._create(master, bearer, **body)
            assert refused.status_code == 422, refused.text
            [error] = refused.json()["errors"]
            assert error["path"] == "expires_in"
            assert "cannot outlive it" in error["message"]
        child = self._create(master, bearer, name="child", scopes=["config:read"], expires_in=300)
        assert child.status_code == 201, child.text
        forever = self._create(master, admin, name="ci", scopes=["config:read"])
        assert forever.status_code == 201, forever.text

    def test_workspace_scoped_token(self, master: Master) -> None:
        """``config:read@staging`` reads staging and nothing else."""
        admin = master.headers("admin", subject="admin")
        token = self._create(master, admin, name="stg", scopes=["config:read@staging"]).json()
        bearer = {"Authorization": f"Bearer {token['token']}"}
        c = master.client
        assert c.get("/api/v1/workspaces/staging/state", headers=bearer).status_code == 200
        assert c.get(STATE, headers=bearer).status_code == 403

    def test_scopes_cannot_exceed_the_owners_roles(self, master: Master) -> None:
        """A viewer asking for config:write (or *) gets 422 naming the scope."""
        master.add_user("vera", "correct horse battery", "viewer")
        viewer = master.headers("viewer", subject="vera")
        response = self._create(
            master, viewer, name="x", scopes=["config:read", "config:write", "*"]
        )
        assert response.status_code == 422
        paths = [e["path"] for e in response.json()["errors"]]
        assert paths == ["scopes[1]", "scopes[2]"]
        bad = self._create(master, viewer, name="x", scopes=["not a permission"])
        assert bad.json()["errors"][0]["path"] == "scopes[0]"

    def test_revoked_expired_and_orphaned_tokens_stop_working(self, master: Master) -> None:
        """Revocation, expiry and a disabled owner each turn the token into a 401."""
        master.add_user("opal", "correct horse battery", "operator")
        operator = master.headers("operator", subject="opal")
        c = master.client

        def bearer(body: dict[str, Any]) -> dict[str, str]:
            return {"Authorization": f"Bearer {body['token']}"}

        revoked = self._create(master, operator, name="a", scopes=["config:read"]).json()
        assert c.get(STATE, headers=bearer(revoked)).status_code == 200
        token_id = revoked["api_token"]["id"]
        assert c.delete(f"/api/v1/auth/tokens/{token_id}", headers=operator).status_code == 204
        assert c.get(STATE, headers=bearer(revoked)).status_code == 401

        expiring = self._create(
            master, operator, name="b", scopes=["config:read"], expires_in=60
        ).json()
        auth = master.services.auth
        auth.clock = lambda: time.time() + 120
        assert c.get(STATE, headers=bearer(expiring)).status_code == 401
        auth.clock = time.time

        live = self._create(master, operator, name="c", scopes=["config:read"]).json()
        master.add_user("opal", "correct horse battery", "operator", disabled=True)
        assert c.get(STATE, headers=bearer(live)).status_code == 401

    def test_listing_never_shows_secrets(self, master: Master) -> None:
        """The list has ids, names and scopes; no token and no hash."""
        admin = master.headers("admin", subject="admin")
        created = self._create(master, admin, name="ci", scopes=["config:read"]).json()
        listed = master.client.get("/api/v1/auth/tokens", headers=admin).json()
        assert [t["name"] for t in listed] == ["ci"]
        text = json.dumps(listed)
        assert created["token"] not in text
        assert "secret" not in text

    def test_others_tokens_cannot_be_revoked_without_user_write(self, master: Master) -> None:
        """An operator cannot revoke the admin's token; the admin can revoke anyone's."""
        admin = master.headers("admin", subject="admin")
        token_id = self._create(master, admin, name="ci", scopes=["config:read"]).json()[
            "api_token"
        ]["id"]
        operator = master.headers("operator", subject="opal")
        assert (
            master.client.delete(f"/api/v1/auth/tokens/{token_id}", headers=operator).status_code
            == 403
        )


class TestNoEscalation:
    """Nobody hands on more than they hold: not a narrow API token minting wider tokens
    or users, not a user manager taking over a more privileged account."""

    USERS = "/api/v1/users"

    def _token(self, master: Master, scopes: list[str]) -> dict[str, str]:
        admin = master.headers("admin", subject="admin")
        created = master.client.post(
            "/api/v1/auth/tokens", json={"name": "t", "scopes": scopes}, headers=admin
        )
        assert created.status_code == 201, created.text
        return {"Authorization": f"Bearer {created.json()['token']}"}

    def test_a_narrow_token_mints_no_wider_token(self, master: Master) -> None:
        """An admin's ``config:read@staging`` + ``api_token:write`` token can mint a
        token within its own scopes, and only that (422 naming the scope)."""
        narrow = self._token(master, ["config:read@staging", "api_token:write"])
        mint = master.client.post(
            "/api/v1/auth/tokens",
            json={"name": "wider", "scopes": ["config:read@staging", "*", "config:read"]},
            headers=narrow,
        )
        assert mint.status_code == 422, mint.text
        assert [e["path"] for e in mint.json()["errors"]] == ["scopes[1]", "scopes[2]"]
        ok = master.client.post(
            "/api/v1/auth/tokens",
            json={"name": "same", "scopes": ["config:read@staging"]},
            headers=narrow,
        )
        assert ok.status_code == 201, ok.text

    def test_a_user_write_token_creates_no_admin(self, master: Master) -> None:
        """``user:write`` alone lets a token manage users, not make admins."""
        token = self._token(master, ["user:write"])
        body = {"username": "evil", "password": "correct horse battery", "roles": ["admin"]}
        created = master.client.post(self.USERS, json=body, headers=token)
        assert created.status_code == 422, created.text
        assert created.json()["errors"][0]["path"] == "roles[0]"
        assert master.call(master.services.storage.get_user, "evil") is None

    def test_a_user_manager_cannot_take_over_a_wider_account(self, master: Master) -> None:
        """``helpdesk`` (user:read + user:write) may not set an admin's password, disable
        or delete it (403, nothing changed), but may manage a user holding no more."""
        before = master.add_user("root2", "correct horse battery", "admin")
        master.add_user("desk2", "correct horse battery", "helpdesk")
        desk = master.headers("helpdesk", subject="desk")
        c = master.client
        for response in (
            c.patch(f"{self.USERS}/root2", json={"password": "mine now, thanks!"}, headers=desk),
            c.patch(f"{self.USERS}/root2", json={"disabled": True}, headers=desk),
            c.delete(f"{self.USERS}/root2", headers=desk),
        ):
            assert response.status_code == 403, response.text
            assert "root2" in response.json()["detail"]
        assert master.call(master.services.storage.get_user, "root2") == before
        changed = c.patch(f"{self.USERS}/desk2", json={"disabled": True}, headers=desk)
        assert changed.status_code == 200, changed.text

    def test_a_user_manager_cannot_revoke_a_wider_accounts_api_token(self, master: Master) -> None:
        """Revoking someone else's API token is managing that user: ``helpdesk`` (with
        ``viewer``, which manages one's own tokens) may not revoke an admin's (403, the
        token keeps working), but may its peer's."""
        master.add_user("root3", "correct horse battery", "admin")
        master.add_user("desk3", "correct horse battery", "helpdesk", "viewer")
        c = master.client
        tokens = "/api/v1/auth/tokens"
        root = master.headers("admin", subject="root3")
        root_token = c.post(tokens, json={"name": "ops", "scopes": ["config:read"]}, headers=root)
        desk = master.headers("helpdesk", "viewer", subject="desk")
        refused = c.delete(f"{tokens}/{root_token.json()['api_token']['id']}", headers=desk)
        assert refused.status_code == 403, refused.text
        assert "root3" in refused.json()["detail"]
        bearer = {"Authorization": f"Bearer {root_token.json()['token']}"}
        assert c.get(STATE, headers=bearer).status_code == 200
        peer = master.headers("helpdesk", "viewer", subject="desk3")
        peer_token = c.post(tokens, json={"name": "x", "scopes": ["user:read"]}, headers=peer)
        revoked = c.delete(f"{tokens}/{peer_token.json()['api_token']['id']}", headers=desk)
        assert revoked.status_code == 204, revoked.text

    def test_a_new_password_revokes_the_api_tokens_made_with_the_old(self, master: Master) -> None:
        """A stolen access token could mint an API token that outlives it: changing the
        password (oneself, or by an admin) revokes the user's API tokens too."""
        master.add_user("cara", "correct horse battery", "operator")
        c = master.client
        tokens = _login(master, "cara", "correct horse battery")
        session = {"Authorization": f"Bearer {tokens['access_token']}"}
        minted = c.post(
            "/api/v1/auth/tokens", json={"name": "backdoor", "scopes": ["config:read"]},
            headers=session,
        ).json()  # fmt: skip
        bearer = {"Authorization": f"Bearer {minted['token']}"}
        assert c.get(STATE, headers=bearer).status_code == 200
        changed = c.post(
            "/api/v1/auth/password",
            json={"current_password": "correct horse battery", "new_password": "a whole new one"},
            headers=session,
        )
        assert changed.status_code == 204, changed.text
        assert c.get(STATE, headers=bearer).status_code == 401
        again = _login(master, "cara", "a whole new one")
        session = {"Authorization": f"Bearer {again['access_token']}"}
        minted = c.post(
            "/api/v1/auth/tokens", json={"name": "ci", "scopes": ["config:read"]}, headers=session
        ).json()
        bearer = {"Authorization": f"Bearer {minted['token']}"}
        admin = master.headers("admin", subject="admin")
        reset = c.patch(
            f"{self.USERS}/cara", json={"password": "reset by the admin"}, headers=admin
        )
        assert reset.status_code == 200, reset.text
        assert c.get(STATE, headers=bearer).status_code == 401

    def test_a_password_change_racing_an_admin_does_not_undo_the_admins_change(
        self, master: Master, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """While the new password is hashed, an admin disables the user, demotes it and
        resets its password: the change ends as a 409 and the admin's change stands;
        nothing is written back from before."""
        master.add_user("dan", "correct horse battery", "operator")
        tokens = _login(master, "dan", "correct horse battery")
        passwords = master.services.auth.passwords
        hash_in_thread = passwords.hash_in_thread

        async def hash_while_an_admin_acts(password: str) -> str:
            new_hash = await hash_in_thread(password)
            storage = master.services.storage
            user = await storage.get_user("dan")
            assert user is not None
            reset = passwords.hash("the admin's reset")
            await storage.put_user(
                attrs.evolve(user, disabled=True, roles=("viewer",), password_hash=reset)
            )
            return new_hash

        monkeypatch.setattr(passwords, "hash_in_thread", hash_while_an_admin_acts)
        answer = master.client.post(
            "/api/v1/auth/password",
            json={"current_password": "correct horse battery", "new_password": "a whole new one"},
            headers={"Authorization": f"Bearer {tokens['access_token']}"},
        )
        monkeypatch.undo()
        assert answer.status_code == 409, answer.text
        assert "changed while the new password was being set" in answer.json()["detail"]
        dan = master.call(master.services.storage.get_user, "dan")
        assert dan is not None
        assert (dan.disabled, dan.roles) == (True, ("viewer",))
        assert passwords.verify(dan.password_hash, "the admin's reset")

    def test_deleting_a_user_revokes_its_tokens_for_good(self, master: Master) -> None:
        """A token does not come back with a new user of the same name."""
        master.add_user("bob", "correct horse battery", "operator")
        bob = master.headers("operator", subject="bob")
        created = master.client.post(
            "/api/v1/auth/tokens", json={"name": "ci", "scopes": ["config:read"]}, headers=bob
        ).json()
        bearer = {"Authorization": f"Bearer {created['token']}"}
        c = master.client
        assert c.get(STATE, headers=bearer).status_code == 200
        admin = master.headers("admin", subject="admin")
        assert c.delete(f"{self.USERS}/bob", headers=admin).status_code == 204
        again = {"username": "bob", "password": "correct horse battery", "roles": ["operator"]}
        assert c.post(self.USERS, json=again, headers=admin).status_code == 201
        assert c.get(STATE, headers=bearer).status_code == 401
        record = master.call(master.services.auth.store.get_api_token, created["api_token"]["id"])
        assert record is not None
        assert record.revoked

    def test_a_new_user_does_not_inherit_tokens_left_behind(self, master: Master) -> None:
        """Tokens of a user deleted before deletions revoked them die with the new user."""
        master.add_user("carl", "correct horse battery", "operator")
        carl = master.headers("operator", subject="carl")
        created = master.client.post(
            "/api/v1/auth/tokens", json={"name": "ci", "scopes": ["config:read"]}, headers=carl
        ).json()
        master.call(master.services.storage.delete_user, "carl")  # the old way: tokens stay
        admin = master.headers("admin", subject="admin")
        again = {"username": "carl", "password": "correct horse battery", "roles": ["operator"]}
        assert master.client.post(self.USERS, json=again, headers=admin).status_code == 201
        bearer = {"Authorization": f"Bearer {created['token']}"}
        assert master.client.get(STATE, headers=bearer).status_code == 401

    def test_a_password_of_the_wrong_type_is_not_echoed(self, master: Master) -> None:
        """The 422 for a numeric password names the field and the type, not the value."""
        master.add_user("dora", "correct horse battery", "viewer")
        admin = master.headers("admin", subject="admin")
        response = master.client.patch(
            f"{self.USERS}/dora", json={"password": 12345678901234}, headers=admin
        )
        assert response.status_code == 422
        assert "12345678901234" not in response.text
        error = response.json()["errors"][0]
        assert error["path"] == "password"
        assert "an integer" in error["message"]


@pytest.fixture(scope="module")
def shared_master(
    template_state: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Master]:
    """One master for the contract tests, which only construct links from it."""
    pm = get_plugin_manager(autoload=False, environ={})
    state = tmp_path_factory.mktemp("contract") / "state"
    shutil.copytree(template_state, state)
    with TestClient(build_app(pm=pm, settings=make_settings(pm, state))) as client:
        yield Master(client)


class _Users:
    """The slice of StorageBackend the password authenticator uses."""

    def __init__(self, *users: User) -> None:
        self.users = {u.username: u for u in users}

    async def get_user(self, username: str) -> User | None:
        return self.users.get(username)

    async def put_user(self, user: User) -> None:
        self.users[user.username] = user


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def passwords() -> Passwords:
    from nxmesh.core.settings import AuthSettings

    return Passwords(
        AuthSettings(
            argon2_time_cost=FAST_HASHING["auth.argon2_time_cost"],
            argon2_memory_kib=FAST_HASHING["auth.argon2_memory_kib"],
            argon2_parallelism=FAST_HASHING["auth.argon2_parallelism"],
        )
    )


def password(username: str, secret: str, addr: str = "192.0.2.1") -> Credentials:
    return Credentials("password", {"username": username, "password": secret}, remote_addr=addr)


class TestPasswordAuthenticator:
    """argon2id verification with lockout and backoff per user and address."""

    pytestmark = pytest.mark.anyio

    def _auth(self, passwords: Passwords, clock: Callable[[], float]) -> PasswordAuthenticator:
        users = _Users(
            User(username="ann", password_hash=passwords.hash("s3cret-pass"), roles=("viewer",))
        )
        return PasswordAuthenticator(users, passwords, clock=clock)  # type: ignore[arg-type]

    async def test_right_password_gives_the_users_roles(self, passwords: Passwords) -> None:
        """A correct password yields a principal with the stored roles."""
        principal = await self._auth(passwords, _Clock()).authenticate(
            password("ann", "s3cret-pass")
        )
        assert principal is not None
        assert (principal.subject, principal.roles) == ("ann", ("viewer",))

    async def test_unknown_user_costs_a_dummy_verification(
        self, passwords: Passwords, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A missing user runs argon2 against a dummy hash and fails like a wrong password."""
        calls: list[int] = []
        original = passwords.dummy_verify
        monkeypatch.setattr(passwords, "dummy_verify", lambda: (calls.append(1), original())[1])
        auth = self._auth(passwords, _Clock())
        with pytest.raises(AuthenticationError) as ghost:
            await auth.authenticate(password("ghost", "whatever"))
        with pytest.raises(AuthenticationError) as wrong:
            await auth.authenticate(password("ann", "whatever"))
        assert calls == [1]
        assert str(ghost.value) == str(wrong.value)

    async def test_lockout_backs_off_exponentially_per_user_and_address(
        self, passwords: Passwords
    ) -> None:
        """Failures lock one (user, address) pair with doubling delays; others are unaffected."""
        clock = _Clock()
        auth = self._auth(passwords, clock)
        for _ in range(5):
            with pytest.raises(AuthenticationError):
                await auth.authenticate(password("ann", "wrong"))
        with pytest.raises(LockedOutError) as locked:
            await auth.authenticate(password("ann", "s3cret-pass"))
        assert locked.value.retry_after == 1
        assert await auth.authenticate(password("ann", "s3cret-pass", addr="198.51.100.7"))
        clock.now += 1.5
        with pytest.raises(AuthenticationError):
            await auth.authenticate(password("ann", "wrong"))
        with pytest.raises(LockedOutError) as longer:
            await auth.authenticate(password("ann", "s3cret-pass"))
        assert longer.value.retry_after == 2
        clock.now += 2.5
        assert await auth.authenticate(password("ann", "s3cret-pass"))
        assert auth.lockout.failures(("ann", "192.0.2.1")) == 0

    async def test_old_hashes_are_upgraded_on_login(self, passwords: Passwords) -> None:
        """A hash made with other argon2 costs is replaced after a successful login."""
        from nxmesh.core.settings import AuthSettings

        old = Passwords(
            AuthSettings(argon2_time_cost=2, argon2_memory_kib=16, argon2_parallelism=1)
        )
        users = _Users(User(username="ann", password_hash=old.hash("s3cret-pass")))
        auth = PasswordAuthenticator(users, passwords)  # type: ignore[arg-type]
        assert await auth.authenticate(password("ann", "s3cret-pass"))
        assert not passwords.needs_rehash(users.users["ann"].password_hash)
        assert users.users["ann"].password_hash != old.hash("s3cret-pass")

    async def test_an_old_cost_hash_costs_todays_time(self, passwords: Passwords) -> None:
        """A hash made with older (cheaper) argon2 costs is checked beside a dummy at
        today's costs, as an unknown user's login is, so the time of the answer does not
        tell that the user exists; a hash at today's costs needs no dummy."""
        from nxmesh.core.settings import AuthSettings

        old = Passwords(
            AuthSettings(argon2_time_cost=2, argon2_memory_kib=16, argon2_parallelism=1)
        )
        users = _Users(
            User(username="ann", password_hash=old.hash("s3cret-pass")),
            User(username="bea", password_hash=passwords.hash("s3cret-pass")),
        )
        dummies: list[str] = []
        dummy_verify_in_thread = passwords.dummy_verify_in_thread

        async def counted() -> None:
            dummies.append("dummy")
            await dummy_verify_in_thread()

        passwords.dummy_verify_in_thread = counted  # type: ignore[method-assign]
        auth = PasswordAuthenticator(users, passwords)  # type: ignore[arg-type]
        with pytest.raises(AuthenticationError):
            await auth.authenticate(password("ann", "wrong-pass!"))
        assert len(dummies) == 1
        assert await auth.authenticate(password("ann", "s3cret-pass"))  # upgraded too
        assert len(dummies) == 2
        assert await auth.authenticate(password("bea", "s3cret-pass"))
        assert await auth.authenticate(password("ann", "s3cret-pass"))  # today's costs now
        assert len(dummies) == 2
        with pytest.raises(AuthenticationError):
            await auth.authenticate(password("nobody", "s3cret-pass"))
        assert len(dummies) == 3

    async def test_a_login_racing_a_disable_is_refused_and_undoes_nothing(
        self, passwords: Passwords
    ) -> None:
        """The user is disabled while its password is checked: the login is refused (its
        sessions were just ended), and the hash upgrade of an old-cost hash does not write
        the record back enabled."""
        from nxmesh.core.settings import AuthSettings

        old = Passwords(
            AuthSettings(argon2_time_cost=2, argon2_memory_kib=16, argon2_parallelism=1)
        )
        users = _Users(User(username="ann", password_hash=old.hash("s3cret-pass")))
        verify_in_thread = passwords.verify_in_thread

        async def verify_while_an_admin_disables(password_hash: str, text: str) -> bool:
            ok = await verify_in_thread(password_hash, text)
            users.users["ann"] = attrs.evolve(users.users["ann"], disabled=True)
            return ok

        passwords.verify_in_thread = verify_while_an_admin_disables  # type: ignore[method-assign]
        auth = PasswordAuthenticator(users, passwords)  # type: ignore[arg-type]
        with pytest.raises(AuthenticationError):
            await auth.authenticate(password("ann", "s3cret-pass"))
        assert users.users["ann"].disabled

    async def test_spraying_usernames_locks_the_address(self, passwords: Passwords) -> None:
        """Fresh usernames from one address trip ``lockout_address_threshold``: the
        address is locked for every user, other addresses are not, and nothing is
        verified while locked."""
        from nxmesh.core.settings import AuthSettings

        users = _Users(
            User(username="ann", password_hash=passwords.hash("s3cret-pass"), roles=("viewer",))
        )
        clock = _Clock()
        auth = PasswordAuthenticator(
            users,  # type: ignore[arg-type]
            passwords,
            AuthSettings(lockout_threshold=5, lockout_address_threshold=8),
            clock=clock,
        )
        for i in range(8):
            with pytest.raises(AuthenticationError):
                await auth.authenticate(password(f"guess{i}", "wrong"))
        with pytest.raises(LockedOutError):
            await auth.authenticate(password("ann", "s3cret-pass"))
        assert await auth.authenticate(password("ann", "s3cret-pass", addr="198.51.100.7"))
        clock.now += 1.5  # the first delay passed: a success clears the address too
        assert await auth.authenticate(password("ann", "s3cret-pass"))
        assert auth.address_lockout.failures((ANY_USER, "192.0.2.1")) == 0

    async def test_argon2_runs_at_most_concurrency_at_once(self) -> None:
        """Twelve logins at once hash two at a time with ``argon2_concurrency = 2``: the
        rest wait instead of each holding argon2's memory."""
        import threading

        from nxmesh.core.settings import AuthSettings

        settings = AuthSettings(
            argon2_time_cost=1, argon2_memory_kib=8, argon2_parallelism=1, argon2_concurrency=2
        )
        passwords = Passwords(settings)
        running, most, lock = 0, 0, threading.Lock()
        verify = passwords.verify

        def counted(password_hash: str, secret: str) -> bool:
            nonlocal running, most
            with lock:
                running += 1
                most = max(most, running)
            try:
                threading.Event().wait(0.02)  # overlap, if the cap let them
                return verify(password_hash, secret)
            finally:
                with lock:
                    running -= 1

        passwords.verify = counted  # type: ignore[method-assign]
        stored = passwords.hash("s3cret-pass")
        async with anyio.create_task_group() as tg:
            for _ in range(12):
                tg.start_soon(passwords.verify_in_thread, stored, "s3cret-pass")
        assert most == 2

    def test_lockout_memory_is_bounded(self) -> None:
        """A spray of distinct usernames cannot grow the lockout table without bound."""
        lockout = Lockout(threshold=3, base_delay=1, max_delay=10, max_entries=100)
        for i in range(1000):
            lockout.begin((f"user{i}", "192.0.2.1"))
        assert len(lockout._state) == 100


def _tampered(token: str) -> str:
    """`token` with its last signature character changed (the rest still decodes)."""
    return token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]


class TestPasswordAuthenticatorContract(AuthenticatorContract):
    """The built-in password authenticator honours the authenticator contract."""

    @pytest.fixture
    def authenticator(self, passwords: Passwords) -> Authenticator:
        ann = User(username="ann", password_hash=passwords.hash("s3cret-pass"), roles=("viewer",))
        return PasswordAuthenticator(_Users(ann), passwords)  # type: ignore[arg-type]

    @pytest.fixture
    def valid_credentials(self) -> Credentials:
        return password("ann", "s3cret-pass")

    @pytest.fixture
    def expected_subject(self) -> str:
        return "ann"

    @pytest.fixture
    def wrong_credentials(self) -> Credentials:
        return password("ann", "not-the-s3cret-pass")


class TestJwtAuthenticatorContract(AuthenticatorContract):
    """The access-token link honours the authenticator contract."""

    @pytest.fixture
    def authenticator(self, shared_master: Master) -> Authenticator:
        return JwtAuthenticator(shared_master.services.auth)

    @pytest.fixture
    def valid_credentials(self, shared_master: Master) -> Credentials:
        return Credentials("bearer", {"token": shared_master.token("viewer", subject="carol")})

    @pytest.fixture
    def expected_subject(self) -> str:
        return "carol"

    @pytest.fixture
    def wrong_credentials(self, shared_master: Master) -> Credentials:
        forged = _tampered(shared_master.token("admin", subject="carol"))
        return Credentials("bearer", {"token": forged})


class TestApiTokenAuthenticatorContract(AuthenticatorContract):
    """The API-token link honours the authenticator contract."""

    @pytest.fixture
    def authenticator(self, shared_master: Master) -> Authenticator:
        return ApiTokenAuthenticator(shared_master.services.auth)

    @pytest.fixture
    def api_token(self, shared_master: Master) -> str:
        created = shared_master.client.post(
            "/api/v1/auth/tokens",
            json={"name": "contract", "scopes": ["config:read"]},
            headers=shared_master.headers("admin", subject="admin"),
        )
        assert created.status_code == 201, created.text
        token: str = created.json()["token"]
        return token

    @pytest.fixture
    def valid_credentials(self, api_token: str) -> Credentials:
        return Credentials("bearer", {"token": api_token})

    @pytest.fixture
    def expected_subject(self) -> str:
        return "admin"

    @pytest.fixture
    def wrong_credentials(self, api_token: str) -> Credentials:
        return Credentials("bearer", {"token": _tampered(api_token)})
