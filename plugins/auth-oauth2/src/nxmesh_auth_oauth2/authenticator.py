"""The ``oauth2`` link of the master's authentication chain: bearer JWTs from an IdP."""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import anyio
import httpx
import jwt
import structlog

from nxmesh.core.errors import ConfigurationError
from nxmesh.core.interfaces import Credentials, Principal
from nxmesh.master.auth.errors import AuthenticationError
from nxmesh.master.auth.service import API_TOKEN_PREFIX
from nxmesh_auth_oauth2.settings import OAuth2Settings, secure_url

if TYPE_CHECKING:
    from nxmesh.master.app import MasterServices

__all__ = ["JwksCache", "OAuth2Authenticator"]

log = structlog.get_logger("nxmesh.auth.oauth2")

SECTION = "auth_oauth2"
_MAX_DOCUMENT = 1 << 20  # a discovery document or JWKS is a few KB


class IdentityProviderError(AuthenticationError):
    """The IdP's discovery document or keys could not be fetched or read."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="oauth2_idp_unavailable")


class JwksCache:
    """The IdP's signing keys by key id, fetched on first use and kept `jwks_cache_seconds`.

    A token naming an unknown ``kid`` refreshes the keys (the IdP rotated), at most once
    per `jwks_min_refresh_seconds`: tokens with made-up key ids cannot make the master
    hammer the IdP.
    """

    def __init__(
        self,
        settings: OAuth2Settings,
        *,
        clock: Callable[[], float] = time.monotonic,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self._transport = transport
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None
        self._jwks_url = settings.jwks_url
        self._lock = anyio.Lock()
        self._next_try = float("-inf")
        self.fetches = 0

    async def key(self, kid: str | None) -> jwt.PyJWK:
        """The key `kid` names (the only key when the token names none).

        When the IdP cannot be reached, keys already loaded keep being used: a short IdP
        outage must not log everybody out.

        :raises AuthenticationError: no such key, even after a refresh.
        :raises IdentityProviderError: no keys yet, and the IdP could not be reached or
            answered nonsense.
        """
        found = self._find(kid)
        if found is None or self._stale():
            async with self._lock:
                if self._may_refresh(found is None):
                    try:
                        await self._refresh()
                    except IdentityProviderError as exc:
                        self._next_try = self.clock() + self.settings.jwks_min_refresh_seconds
                        if not self._keys:
                            raise
                        log.warning("identity provider keys not refreshed", error=str(exc))
            found = self._find(kid)
        if found is None:
            raise AuthenticationError(
                f"token signed with key {kid!r}, which the identity provider does not publish",
                reason="oauth2_unknown_key",
            )
        return found

    def _stale(self) -> bool:
        return (
            self._fetched_at is None
            or self.clock() - self._fetched_at > self.settings.jwks_cache_seconds
        )

    def _may_refresh(self, missing: bool) -> bool:
        now = self.clock()
        if now < self._next_try:
            return False  # the last attempt failed just now
        if self._fetched_at is None or self._stale():
            return True
        # An unknown key id: the IdP may have rotated, but not every few milliseconds.
        return missing and now - self._fetched_at >= self.settings.jwks_min_refresh_seconds

    def _find(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None:
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)

    async def _refresh(self) -> None:
        async with self._client() as client:
            if not self._jwks_url:
                discovery = await self._get_json(
                    client, self.settings.issuer.rstrip("/") + "/.well-known/openid-configuration"
                )
                url = discovery.get("jwks_uri")
                if not isinstance(url, str) or not url:
                    raise IdentityProviderError("the IdP's discovery document has no jwks_uri")
                # The rule the settings hold jwks_url to: keys fetched over plain HTTP
                # could be swapped on the way, and every token they sign be forged.
                if not secure_url(url):
                    raise IdentityProviderError(
                        f"the IdP's discovery document names jwks_uri {url!r}, which is not "
                        "https:// (http:// only on loopback); its keys are not fetched"
                    )
                self._jwks_url = url
            jwks = await self._get_json(client, self._jwks_url)
        keys: dict[str, jwt.PyJWK] = {}
        for index, entry in enumerate(jwks.get("keys") or ()):
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            try:
                key = jwt.PyJWK(entry)
            except jwt.PyJWTError as exc:  # an algorithm or key type we cannot use
                log.info("skipping an IdP key", kid=entry.get("kid"), reason=str(exc))
                continue
            keys[str(entry.get("kid", f"#{index}"))] = key
        self._keys = keys
        self._fetched_at = self.clock()
        self.fetches += 1
        log.info("identity provider keys loaded", url=self._jwks_url, keys=sorted(keys))

    def _client(self) -> httpx.AsyncClient:
        verify: ssl.SSLContext | bool = True
        if self.settings.ca_file is not None:
            verify = ssl.create_default_context(cafile=str(self.settings.ca_file))
        return httpx.AsyncClient(
            timeout=self.settings.timeout,
            verify=verify,
            follow_redirects=False,
            transport=self._transport,
        )

    async def _get_json(self, client: httpx.AsyncClient, url: str) -> dict[str, Any]:
        try:
            response = await client.get(url, headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            message = f"cannot reach the identity provider at {url}: {exc}"
            raise IdentityProviderError(message) from None
        if response.status_code != 200:
            raise IdentityProviderError(
                f"the identity provider answered {response.status_code} for {url}"
            )
        if len(response.content) > _MAX_DOCUMENT:
            raise IdentityProviderError(f"{url} is larger than {_MAX_DOCUMENT} bytes")
        try:
            data = response.json()
        except ValueError:
            raise IdentityProviderError(f"{url} is not JSON") from None
        if not isinstance(data, dict):
            raise IdentityProviderError(f"{url} is not a JSON object")
        return data


class OAuth2Authenticator:
    """Accepts JWTs issued by the configured IdP (``[plugins.auth_oauth2]``)."""

    name: ClassVar[str] = "oauth2"

    def __init__(
        self,
        settings: OAuth2Settings,
        *,
        valid_binding: Callable[[str], bool] | None = None,
        keys: JwksCache | None = None,
    ) -> None:
        self.settings = settings.checked()
        self.valid_binding = valid_binding or (lambda binding: True)
        self.keys = keys or JwksCache(self.settings)

    @classmethod
    def from_services(cls, services: MasterServices) -> OAuth2Authenticator:
        """The link for ``auth.chain``; a `role_map` naming unknown roles stops the start.

        :raises ConfigurationError: missing or unsafe settings, or a bad `role_map` entry.
        """
        section = services.settings.plugins.get(SECTION)
        settings = section if isinstance(section, OAuth2Settings) else OAuth2Settings()
        rbac = services.rbac
        for group, bindings in settings.role_map.items():
            for binding in bindings:
                reason = rbac.check_binding(binding)
                if reason is not None:
                    raise ConfigurationError(f"[plugins.auth_oauth2] role_map.{group}: {reason}")
        return cls(settings, valid_binding=lambda b: rbac.check_binding(b) is None)

    async def authenticate(self, credentials: Credentials) -> Principal | None:
        token = credentials.values.get("token") if credentials.scheme == "bearer" else None
        if not isinstance(token, str) or token.startswith(f"{API_TOKEN_PREFIX}_"):
            return None
        if token.count(".") != 2 or not self._is_from_our_issuer(token):
            return None  # not a JWT of this IdP: the next link may know it
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthenticationError("malformed token", reason="malformed") from None
        # Pinned before the key is used: the header is the attacker's.
        algorithm = header.get("alg")
        if algorithm not in self.settings.allowed_algorithms:
            raise AuthenticationError(
                f"token algorithm {algorithm!r} is not allowed "
                f"(allowed_algorithms: {', '.join(self.settings.allowed_algorithms)})",
                reason="oauth2_algorithm",
            )
        kid = header.get("kid")
        key = await self.keys.key(kid if isinstance(kid, str) else None)
        claims = self._verify(token, key, algorithm)
        return Principal(
            subject=self._subject(claims), roles=self._roles(claims), authenticator=self.name
        )

    def _is_from_our_issuer(self, token: str) -> bool:
        try:
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            return False
        return isinstance(claims, dict) and claims.get("iss") == self.settings.issuer

    def _verify(self, token: str, key: jwt.PyJWK, algorithm: str) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[algorithm],
                audience=self.settings.audience,
                issuer=self.settings.issuer,
                leeway=self.settings.leeway,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthenticationError("token expired", reason="expired") from None
        except jwt.InvalidAudienceError:
            raise AuthenticationError(
                f"token is not for audience {self.settings.audience!r}",
                reason="oauth2_audience",
            ) from None
        except jwt.InvalidSignatureError:
            raise AuthenticationError(
                "token signature is invalid", reason="bad_signature"
            ) from None
        except jwt.PyJWTError as exc:
            raise AuthenticationError(f"token refused: {exc}", reason="invalid") from None
        return claims

    def _subject(self, claims: Mapping[str, Any]) -> str:
        name = claims.get(self.settings.subject_claim)
        subject = name if isinstance(name, str) and name else str(claims["sub"])
        return f"oauth2:{subject}"[:200]

    def _roles(self, claims: Mapping[str, Any]) -> tuple[str, ...]:
        raw = claims.get(self.settings.roles_claim, ())
        values = raw.split() if isinstance(raw, str) else raw
        if not isinstance(values, list | tuple):
            return ()
        role_map = self.settings.role_map
        bindings: list[str] = []
        for value in values:
            if not isinstance(value, str):
                continue
            mapped = role_map.get(value, ()) if role_map else (value,)
            bindings += [b for b in mapped if self.valid_binding(b)]
        return tuple(dict.fromkeys(bindings))
