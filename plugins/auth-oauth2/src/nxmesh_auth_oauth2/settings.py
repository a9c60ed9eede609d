"""The ``[plugins.auth_oauth2]`` settings section."""

from __future__ import annotations

import ipaddress
import math
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs

from nxmesh.core.errors import ConfigurationError

__all__ = ["OAuth2Settings"]

# Asymmetric only: an HMAC algorithm would make the IdP's *public* key a shared secret
# (the classic RS256 → HS256 confusion).
_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


def _freeze_role_map(value: Mapping[str, Sequence[str]]) -> Mapping[str, tuple[str, ...]]:
    return types.MappingProxyType({str(k): tuple(v) for k, v in dict(value).items()})


def _algorithms(_: Any, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    unknown = [a for a in value if a not in _ALGORITHMS]
    if unknown or not value:
        raise ValueError(
            f"{attribute.name}: {unknown or 'empty'} — use asymmetric algorithms only: "
            f"{', '.join(sorted(_ALGORITHMS))}"
        )


def _positive(_: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{attribute.name} must be a positive number of seconds")


def _not_negative(_: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{attribute.name} must be zero or a positive number of seconds")


def secure_url(url: str) -> bool:
    """https://, or http:// to a loopback host (a local IdP: nothing crosses a network)."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return True
    return parts.scheme == "http" and bool(parts.hostname) and _loopback(parts.hostname or "")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@attrs.frozen
class OAuth2Settings:
    """Which identity provider (IdP) to trust and how its claims map to NxMesh roles.

    The master accepts the IdP's access or ID tokens (JWTs) as bearer tokens when
    ``oauth2`` is in ``auth.chain``: signed by a key in the IdP's JWKS (`jwks_url`, or
    the ``jwks_uri`` of ``<issuer>/.well-known/openid-configuration``), ``iss`` equal
    to `issuer`, ``aud`` containing `audience`, not expired (`leeway` seconds of clock
    skew allowed).

    Roles: the values of the `roles_claim` claim (a list or a space-separated string)
    are looked up in `role_map` (IdP group → NxMesh role bindings such as ``operator``
    or ``operator@staging``); without a `role_map`, values that are NxMesh role bindings
    are used as they are. `subject_claim` names the user in the audit log (``sub`` when
    missing).
    """

    issuer: str = ""
    audience: str = "nxmesh"
    client_id: str = ""
    client_secret: str = attrs.field(default="", repr=False)
    roles_claim: str = "groups"
    role_map: Mapping[str, tuple[str, ...]] = attrs.field(
        factory=dict, converter=_freeze_role_map, hash=False
    )
    subject_claim: str = "preferred_username"
    allowed_algorithms: tuple[str, ...] = attrs.field(
        default=("RS256", "ES256"), validator=_algorithms
    )
    jwks_url: str = ""
    ca_file: Path | None = None
    leeway: float = attrs.field(default=30.0, validator=_not_negative)
    timeout: float = attrs.field(default=5.0, validator=_positive)
    jwks_cache_seconds: float = attrs.field(default=300.0, validator=_positive)
    jwks_min_refresh_seconds: float = attrs.field(default=30.0, validator=_not_negative)

    def checked(self) -> OAuth2Settings:
        """Self, once the settings an authenticator needs are there and sane.

        :raises ConfigurationError: naming the ``[plugins.auth_oauth2]`` key.
        """
        if not self.issuer:
            raise ConfigurationError(
                "[plugins.auth_oauth2] issuer is required when 'oauth2' is in auth.chain "
                "(the IdP's issuer URL, e.g. https://id.example.com/realms/ops)"
            )
        for key in ("issuer", "jwks_url"):
            url = getattr(self, key)
            if not url:
                continue
            if secure_url(url):
                continue
            raise ConfigurationError(
                f"[plugins.auth_oauth2] {key} must be an https:// URL (http:// only on "
                f"loopback): got {url!r}"
            )
        if not self.audience:
            raise ConfigurationError(
                "[plugins.auth_oauth2] audience must not be empty: tokens minted for other "
                "applications of the same IdP would be accepted"
            )
        return self
