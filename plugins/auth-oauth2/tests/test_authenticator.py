"""The ``oauth2`` authenticator against a real (local) identity provider over HTTP.

The IdP is a loopback HTTP server publishing an OpenID discovery document and a JWKS,
whose keys sign tokens the way Keycloak, Entra ID or Okta do (RS256 / ES256, ``kid``).
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from litestar.testing import TestClient

from nxmesh.core.errors import ConfigurationError
from nxmesh.core.interfaces import Authenticator, Credentials
from nxmesh.core.pluginmanager import get_plugin_manager
from nxmesh.core.settings import load_settings
from nxmesh.master.app import build_app, open_services
from nxmesh.master.auth.errors import AuthenticationError
from nxmesh.testing.contracts.auth import AuthenticatorContract
from nxmesh_auth_oauth2 import JwksCache, OAuth2Authenticator, OAuth2Settings

AUDIENCE = "nxmesh"
_RSA_KEYS = [rsa.generate_private_key(65537, 2048) for _ in range(3)]  # slow to make: once


class IdP:
    """A minimal OpenID provider: discovery, JWKS, and token minting for tests."""

    def __init__(self) -> None:
        self.keys: dict[str, Any] = {"k1": _RSA_KEYS[0]}
        self.requests: list[str] = []
        self.down = False
        self.jwks_uri: str | None = None  # what discovery names; None: its own /certs
        handler = self._handler()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.issuer = f"http://127.0.0.1:{self.server.server_address[1]}/realms/ops"
        # A short poll interval: shutdown() waits for the loop's next poll.
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                idp.requests.append(self.path)
                if idp.down:
                    self.send_error(503)
                    return
                if self.path.endswith("/.well-known/openid-configuration"):
                    body = {"issuer": idp.issuer, "jwks_uri": idp.jwks_uri or idp.issuer + "/certs"}
                elif self.path.endswith("/certs"):
                    body = {"keys": [idp.jwk(kid) for kid in idp.keys]}
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        return Handler

    def jwk(self, kid: str) -> dict[str, Any]:
        key = self.keys[kid]
        algorithm = jwt.algorithms.RSAAlgorithm if isinstance(key, rsa.RSAPrivateKey) else None
        if algorithm is None:
            data = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
            data["alg"] = "ES256"
        else:
            data = json.loads(algorithm.to_jwk(key.public_key()))
            data["alg"] = "RS256"
        return {**data, "kid": kid, "use": "sig"}

    def token(self, *, kid: str = "k1", alg: str | None = None, **claims: Any) -> str:
        now = int(time.time())
        body = {
            "iss": self.issuer,
            "aud": AUDIENCE,
            "sub": "f3a1c2",
            "preferred_username": "alice",
            "iat": now,
            "exp": now + 300,
            "groups": ["nginx-operators"],
            **claims,
        }
        body = {k: v for k, v in body.items() if v is not None}
        key = self.keys[kid]
        alg = alg or ("RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256")
        return jwt.encode(body, key, algorithm=alg, headers={"kid": kid})

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def idp() -> Iterator[IdP]:
    provider = IdP()
    try:
        yield provider
    finally:
        provider.close()


def bearer(token: str) -> Credentials:
    return Credentials("bearer", {"token": token})


def settings(idp: IdP, **changes: Any) -> OAuth2Settings:
    base: dict[str, Any] = {
        "issuer": idp.issuer,
        "audience": AUDIENCE,
        "role_map": {"nginx-operators": ["operator"], "nginx-admins": ["admin"]},
    }
    return OAuth2Settings(**{**base, **changes})


class TestTokens:
    pytestmark = pytest.mark.anyio

    async def test_a_valid_token_gives_the_mapped_roles(self, idp: IdP) -> None:
        """Signature, issuer, audience and expiry check out: the IdP user with the roles
        its groups map to (unmapped groups grant nothing)."""
        link = OAuth2Authenticator(settings(idp))
        token = idp.token(groups=["nginx-operators", "coffee-club"])
        principal = await link.authenticate(bearer(token))
        assert principal is not None
        assert (principal.subject, principal.roles, principal.authenticator) == (
            "oauth2:alice",
            ("operator",),
            "oauth2",
        )

    async def test_es256_keys_work_too(self, idp: IdP) -> None:
        """An EC P-256 key in the JWKS verifies ES256 tokens."""
        idp.keys["e1"] = ec.generate_private_key(ec.SECP256R1())
        principal = await OAuth2Authenticator(settings(idp)).authenticate(
            bearer(idp.token(kid="e1", groups=["nginx-admins"]))
        )
        assert principal is not None
        assert principal.roles == ("admin",)

    async def test_tokens_of_others_go_to_the_next_link(self, idp: IdP) -> None:
        """Another issuer's JWT, an API token and non-JWTs are not this link's to judge."""
        link = OAuth2Authenticator(settings(idp))
        assert await link.authenticate(bearer(idp.token(iss="https://other.example"))) is None
        assert await link.authenticate(bearer("nxm_abc_def")) is None
        assert await link.authenticate(bearer("not-a-jwt")) is None
        assert await link.authenticate(Credentials("password", {"username": "a"})) is None
        assert idp.requests == []  # nothing fetched for tokens it does not judge

    @pytest.mark.parametrize(
        ("claims", "reason"),
        [
            ({"exp": int(time.time()) - 3600}, "expired"),
            ({"aud": "another-app"}, "oauth2_audience"),
            ({"exp": None}, "invalid"),
            ({"sub": None}, "invalid"),
        ],
    )
    async def test_bad_claims_are_refused(
        self, idp: IdP, claims: dict[str, Any], reason: str
    ) -> None:
        """Expired, for another audience, or missing a required claim: 401 with a reason."""
        with pytest.raises(AuthenticationError) as refused:
            await OAuth2Authenticator(settings(idp)).authenticate(bearer(idp.token(**claims)))
        assert refused.value.reason == reason

    async def test_a_tampered_token_is_refused(self, idp: IdP) -> None:
        """Changing the payload breaks the signature."""
        head, _, sig = idp.token().split(".")
        forged = jwt.utils.base64url_encode(
            json.dumps(
                {"iss": idp.issuer, "aud": AUDIENCE, "sub": "x", "exp": 2**40, "iat": 1}
            ).encode()
        ).decode()
        with pytest.raises(AuthenticationError) as refused:
            await OAuth2Authenticator(settings(idp)).authenticate(bearer(f"{head}.{forged}.{sig}"))
        assert refused.value.reason == "bad_signature"

    async def test_algorithm_confusion_is_refused(self, idp: IdP) -> None:
        """HS256 signed with the IdP's *public* key, and ``none``, never get near a key."""
        public_pem = (
            idp.keys["k1"]
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        now = int(time.time())
        claims = {"iss": idp.issuer, "aud": AUDIENCE, "sub": "x", "iat": now, "exp": now + 60}
        import hashlib
        import hmac

        head = jwt.utils.base64url_encode(
            json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}).encode()
        )
        body = jwt.utils.base64url_encode(json.dumps(claims).encode())
        mac = hmac.new(public_pem, head + b"." + body, hashlib.sha256).digest()
        hs256 = b".".join((head, body, jwt.utils.base64url_encode(mac))).decode()
        none = jwt.encode(claims, None, algorithm="none")
        link = OAuth2Authenticator(settings(idp))
        for token in (hs256, none):
            with pytest.raises(AuthenticationError) as refused:
                await link.authenticate(bearer(token))
            assert refused.value.reason == "oauth2_algorithm"


class TestKeys:
    pytestmark = pytest.mark.anyio

    async def test_keys_are_discovered_once_and_cached(self, idp: IdP) -> None:
        """Discovery, then the JWKS, fetched once for many tokens."""
        link = OAuth2Authenticator(settings(idp))
        for _ in range(5):
            assert await link.authenticate(bearer(idp.token()))
        assert idp.requests == [
            "/realms/ops/.well-known/openid-configuration",
            "/realms/ops/certs",
        ]

    async def test_a_rotated_key_is_fetched_when_first_seen(self, idp: IdP) -> None:
        """The IdP publishes a new key: its first token makes the link refresh the JWKS."""
        link = OAuth2Authenticator(settings(idp, jwks_min_refresh_seconds=0))
        assert await link.authenticate(bearer(idp.token()))
        idp.keys["k2"] = _RSA_KEYS[1]
        assert await link.authenticate(bearer(idp.token(kid="k2")))
        assert link.keys.fetches == 2

    async def test_made_up_key_ids_cannot_hammer_the_idp(self, idp: IdP) -> None:
        """Unknown key ids refresh the JWKS at most once per jwks_min_refresh_seconds."""
        clock = [1000.0]
        cfg = settings(idp, jwks_min_refresh_seconds=30)
        link = OAuth2Authenticator(cfg, keys=JwksCache(cfg, clock=lambda: clock[0]))
        assert await link.authenticate(bearer(idp.token()))
        idp.keys["ghost"] = _RSA_KEYS[2]
        token = idp.token(kid="ghost")
        del idp.keys["ghost"]  # signed with a key the IdP does not publish
        for _ in range(10):
            with pytest.raises(AuthenticationError) as refused:
                await link.authenticate(bearer(token))
            assert refused.value.reason == "oauth2_unknown_key"
        assert link.keys.fetches == 1  # none of the ten refreshed: the last fetch is fresh
        clock[0] += 31
        with pytest.raises(AuthenticationError):
            await link.authenticate(bearer(token))
        assert link.keys.fetches == 2

    async def test_discovery_cannot_send_key_fetches_over_plain_http(self, idp: IdP) -> None:
        """A discovery document naming an http:// jwks_uri off loopback is refused, as
        jwks_url is in the settings: keys fetched so could be swapped on the way."""
        idp.jwks_uri = "http://idp.example.test/certs"
        link = OAuth2Authenticator(settings(idp))
        with pytest.raises(AuthenticationError) as refused:
            await link.authenticate(bearer(idp.token()))
        assert refused.value.reason == "oauth2_idp_unavailable"
        assert "jwks_uri 'http://idp.example.test/certs', which is not https://" in str(
            refused.value
        )
        assert idp.requests == ["/realms/ops/.well-known/openid-configuration"]

    async def test_an_idp_outage_keeps_loaded_keys(self, idp: IdP) -> None:
        """Down before any key was loaded: a 401 naming the IdP. Down later: the keys
        already loaded keep working after they are stale."""
        clock = [1000.0]
        cfg = settings(idp, jwks_cache_seconds=60)
        idp.down = True
        cold = OAuth2Authenticator(cfg, keys=JwksCache(cfg, clock=lambda: clock[0]))
        with pytest.raises(AuthenticationError) as refused:
            await cold.authenticate(bearer(idp.token()))
        assert refused.value.reason == "oauth2_idp_unavailable"
        assert "503" in str(refused.value)

        idp.down = False
        warm = OAuth2Authenticator(cfg, keys=JwksCache(cfg, clock=lambda: clock[0]))
        assert await warm.authenticate(bearer(idp.token()))
        idp.down = True
        clock[0] += 120  # stale: a refresh is tried, fails, the old key serves
        assert await warm.authenticate(bearer(idp.token()))


class TestRoles:
    pytestmark = pytest.mark.anyio

    async def test_without_a_role_map_role_names_are_taken_as_they_are(self, idp: IdP) -> None:
        """Groups that are NxMesh role bindings are used; others are dropped. A
        space-separated string claim (``scope``-style) works too."""
        known = {"viewer", "operator@staging"}
        link = OAuth2Authenticator(
            settings(idp, role_map={}, roles_claim="roles"),
            valid_binding=lambda binding: binding in known,
        )
        token = idp.token(roles="viewer operator@staging superuser")
        principal = await link.authenticate(bearer(token))
        assert principal is not None
        assert principal.roles == ("viewer", "operator@staging")

    async def test_no_groups_no_roles(self, idp: IdP) -> None:
        """A user without the claim is authenticated with no roles (RBAC then refuses)."""
        principal = await OAuth2Authenticator(settings(idp)).authenticate(
            bearer(idp.token(groups=None, preferred_username=None))
        )
        assert principal is not None
        assert (principal.subject, principal.roles) == ("oauth2:f3a1c2", ())


class TestSettings:
    def test_an_issuer_is_required(self) -> None:
        """The error names the key and says what to put there."""
        with pytest.raises(ConfigurationError, match=r"\[plugins\.auth_oauth2\] issuer"):
            OAuth2Authenticator(OAuth2Settings())

    @pytest.mark.parametrize(
        "url", ["http://id.example.com", "ftp://id.example.com", "https://", "id.example.com"]
    )
    def test_an_issuer_must_be_https_off_loopback(self, url: str) -> None:
        """Keys fetched over plain HTTP across a network could be swapped in transit."""
        with pytest.raises(ConfigurationError, match="issuer must be an https:// URL"):
            OAuth2Settings(issuer=url).checked()

    def test_symmetric_algorithms_are_refused(self) -> None:
        """HS256 would turn the IdP's public key into a shared secret."""
        with pytest.raises(ValueError, match="asymmetric algorithms only"):
            OAuth2Settings(issuer="https://id.example.com", allowed_algorithms=("HS256",))


class TestContract(AuthenticatorContract):
    @pytest.fixture
    def authenticator(self, idp: IdP) -> Authenticator:
        return OAuth2Authenticator(settings(idp))

    @pytest.fixture
    def valid_credentials(self, idp: IdP) -> Credentials:
        return Credentials("bearer", {"token": idp.token()})

    @pytest.fixture
    def expected_subject(self) -> str:
        return "oauth2:alice"

    @pytest.fixture
    def wrong_credentials(self, idp: IdP) -> Credentials:
        token = idp.token(groups=["nginx-admins"])
        return Credentials(
            "bearer", {"token": token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]}
        )


# -- in the master ------------------------------------------------------------------------


@pytest.fixture
def master_with_idp(idp: IdP, tmp_path: Path) -> Iterator[TestClient[Any]]:
    pm = get_plugin_manager(environ={})
    state = tmp_path / "state"
    loaded = load_settings(
        pm,
        environ={},
        overrides={
            "state_dir": str(state),
            "auth.chain": ["jwt", "api_token", "oauth2", "password"],
            "auth.argon2_memory_kib": 8,
            "auth.argon2_time_cost": 1,
            "auth.argon2_parallelism": 1,
            "plugins.auth_oauth2.issuer": idp.issuer,
            "plugins.auth_oauth2.audience": AUDIENCE,
            "plugins.auth_oauth2.role_map": {"nginx-viewers": ["viewer"]},
        },
    )
    try:
        with TestClient(build_app(pm=pm, settings=loaded)) as client:
            yield client
    finally:
        shutil.rmtree(state, ignore_errors=True)


STATE = "/api/v1/workspaces/default/state"


def test_the_master_takes_idp_tokens_with_their_roles(
    master_with_idp: TestClient[Any], idp: IdP
) -> None:
    """``oauth2`` in ``auth.chain``: an IdP viewer reads state (200), may not write it
    (403), an IdP user without mapped groups reads nothing (403), a token for another
    audience is a 401 problem naming it, and the audit log names the IdP user."""
    c = master_with_idp
    viewer = {"Authorization": f"Bearer {idp.token(groups=['nginx-viewers'])}"}
    assert c.get(STATE, headers=viewer).status_code == 200
    assert c.put(STATE, json={}, headers=viewer).status_code == 403
    nobody = {"Authorization": f"Bearer {idp.token(groups=[])}"}
    assert c.get(STATE, headers=nobody).status_code == 403
    other = {"Authorization": f"Bearer {idp.token(aud='another-app')}"}
    refused = c.get(STATE, headers=other)
    assert refused.status_code == 401
    assert "audience" in refused.json()["detail"]
    me = c.get("/api/v1/auth/me", headers=viewer).json()
    assert me["subject"] == "oauth2:alice"


@pytest.mark.anyio
async def test_a_role_map_naming_an_unknown_role_stops_the_master(
    anyio_backend: str, idp: IdP, tmp_path: Path
) -> None:
    """A typo in role_map is a configuration error at start, naming the group."""
    pm = get_plugin_manager(environ={})
    loaded = load_settings(
        pm,
        environ={},
        overrides={
            "state_dir": str(tmp_path / "state"),
            "auth.chain": ["jwt", "oauth2"],
            "plugins.auth_oauth2.issuer": idp.issuer,
            "plugins.auth_oauth2.role_map": {"web-team": ["operatr"]},
        },
    )
    with pytest.raises(ConfigurationError, match=r"role_map\.web-team: unknown role 'operatr'"):
        async with open_services(pm, loaded):
            pass
