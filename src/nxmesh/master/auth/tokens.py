"""RS256 access tokens: short-lived JWTs the master signs and verifies itself.

The RSA private key lives in ``<state_dir>/api-jwt.key``, encrypted with the master key
(AES-GCM, bound to its purpose) and mode 0600. Verification pins the algorithm to RS256
*before* anything else is looked at: ``alg: none``, HS256 signed with the public key as
an HMAC secret (the classic confusion attack) and any other algorithm are rejected, as
are tokens of another issuer, audience or key id, expired ones and forged signatures.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import attrs
import jwt
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from nxmesh.crypto.secrets import (
    MasterKeyring,
    SecretError,
    read_private_file,
    write_private_file,
)
from nxmesh.master.auth.errors import AuthenticationError

__all__ = [
    "ALGORITHM",
    "JWT_KEY_AAD",
    "JWT_KEY_FILE",
    "AccessClaims",
    "AccessTokens",
    "IssuedAccess",
]

ALGORITHM: Final = "RS256"
"""The only algorithm access tokens are signed or accepted with."""

JWT_KEY_FILE: Final = "api-jwt.key"
"""Name of the encrypted RSA private key inside the state directory."""

JWT_KEY_AAD: Final = b"nxmesh:api-jwt-key:rs256:v1"
"""Associated data binding the encrypted key to its purpose."""

_RSA_BITS: Final = 2048
_LEEWAY: Final = 5.0  # seconds of clock skew tolerated between master processes
_REQUIRED: Final = ["exp", "iat", "nbf", "iss", "aud", "sub", "jti"]

log = structlog.get_logger("nxmesh.master.auth")


@attrs.frozen
class AccessClaims:
    """What a verified access token says about its bearer."""

    subject: str
    roles: tuple[str, ...]
    authenticator: str
    expires_at: float
    session: str | None = None
    token_id: str = ""


@attrs.frozen
class IssuedAccess:
    """A freshly signed access token; `token` is a secret for its holder."""

    token: str = attrs.field(repr=False)
    expires_at: float
    token_type: str = "Bearer"  # noqa: S105 - the OAuth2 token type name


def _key_id(public: rsa.RSAPublicKey) -> str:
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()[:16]


class AccessTokens:
    """Issues and verifies RS256 access tokens for one issuer and audience."""

    def __init__(
        self,
        key: rsa.RSAPrivateKey,
        *,
        issuer: str,
        audience: str,
        ttl: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = key
        self._public = key.public_key()
        self.key_id = _key_id(self._public)
        self.issuer = issuer
        self.audience = audience
        self.ttl = ttl
        self.clock = clock

    def __repr__(self) -> str:
        return f"AccessTokens(key_id={self.key_id!r}, issuer={self.issuer!r})"

    @classmethod
    def load_or_create(
        cls,
        path: Path,
        keyring: MasterKeyring,
        *,
        issuer: str,
        audience: str,
        ttl: float,
        clock: Callable[[], float] = time.time,
    ) -> AccessTokens:
        """Load the key stored at `path`, or create, encrypt and store a new one.

        :raises SecretError: the file is unreadable, too permissive, or was encrypted with
            another master key.
        """
        kwargs: dict[str, Any] = {
            "issuer": issuer,
            "audience": audience,
            "ttl": ttl,
            "clock": clock,
        }
        if not path.exists():
            key = rsa.generate_private_key(public_exponent=65537, key_size=_RSA_BITS)
            der = key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            if write_private_file(path, keyring.encrypt(der, aad=JWT_KEY_AAD)):
                tokens = cls(key, **kwargs)
                log.info("API token signing key created", path=str(path), key_id=tokens.key_id)
                return tokens
        token = read_private_file(path, what="API token signing key file")
        try:
            der = keyring.decrypt(token, aad=JWT_KEY_AAD)
        except SecretError as exc:
            raise SecretError(f"cannot open API token signing key file {path}: {exc}") from None
        loaded = serialization.load_der_private_key(der, password=None)
        if not isinstance(loaded, rsa.RSAPrivateKey):
            raise SecretError(f"API token signing key file {path} does not hold an RSA key")
        if keyring.needs_rewrap(token):
            write_private_file(path, keyring.encrypt(der, aad=JWT_KEY_AAD), replace=True)
        return cls(loaded, **kwargs)

    def public_key_pem(self) -> str:
        """The verification key as PEM, for services that check tokens themselves."""
        return self._public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode("ascii")

    def issue(
        self,
        subject: str,
        roles: Sequence[str],
        *,
        authenticator: str,
        session: str | None = None,
    ) -> IssuedAccess:
        """Sign an access token for `subject` valid for `ttl` seconds."""
        now = self.clock()
        expires = now + self.ttl
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": subject,
            "iat": int(now),
            "nbf": int(now),
            "exp": int(expires),
            "jti": secrets.token_hex(12),
            "roles": list(roles),
            "amr": authenticator,
        }
        if session is not None:
            claims["sid"] = session
        token = jwt.encode(
            claims, self._key, algorithm=ALGORITHM, headers={"kid": self.key_id, "typ": "at+jwt"}
        )
        return IssuedAccess(token=token, expires_at=float(int(expires)))

    def is_ours(self, token: str) -> bool:
        """Whether `token` claims to come from this issuer (unverified: for routing only)."""
        try:
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            return False
        return claims.get("iss") == self.issuer

    def verify(self, token: str) -> AccessClaims:
        """The claims of a valid token; `AuthenticationError` (with a reason) otherwise."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthenticationError("malformed access token", reason="malformed") from None
        # Pinned before verification: the header is attacker-controlled.
        if header.get("alg") != ALGORITHM:
            raise AuthenticationError(
                f"access token algorithm {header.get('alg')!r} is not accepted; only "
                f"{ALGORITHM} is",
                reason="bad_algorithm",
            )
        if header.get("kid") != self.key_id:
            raise AuthenticationError("access token signed by an unknown key", reason="unknown_key")
        try:
            claims = jwt.decode(
                token,
                self._public,
                algorithms=[ALGORITHM],
                audience=self.audience,
                issuer=self.issuer,
                leeway=_LEEWAY,
                options={"require": _REQUIRED},
            )
        except jwt.ExpiredSignatureError:
            raise AuthenticationError("access token expired", reason="expired") from None
        except jwt.InvalidSignatureError:
            raise AuthenticationError(
                "access token signature is invalid", reason="bad_signature"
            ) from None
        except (jwt.InvalidAudienceError, jwt.InvalidIssuerError):
            raise AuthenticationError(
                "access token was issued for another service", reason="wrong_audience"
            ) from None
        except jwt.PyJWTError:
            raise AuthenticationError("access token is invalid", reason="invalid") from None
        roles = claims.get("roles", [])
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise AuthenticationError("access token roles are malformed", reason="invalid")
        subject, amr, sid = claims.get("sub"), claims.get("amr", "jwt"), claims.get("sid")
        if not isinstance(subject, str) or not subject or not isinstance(amr, str):
            raise AuthenticationError("access token subject is malformed", reason="invalid")
        return AccessClaims(
            subject=subject,
            roles=tuple(roles),
            authenticator=amr,
            expires_at=float(claims["exp"]),
            session=sid if isinstance(sid, str) else None,
            token_id=str(claims["jti"]),
        )
