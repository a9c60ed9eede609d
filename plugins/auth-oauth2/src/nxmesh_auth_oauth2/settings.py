"""The ``[plugins.auth_oauth2]`` settings section."""

from __future__ import annotations

import attrs


@attrs.frozen
class OAuth2Settings:
    """Which identity provider to trust and how its claims map to NxMesh roles."""

    issuer: str = ""
    audience: str = "nxmesh"
    client_id: str = ""
    client_secret: str = attrs.field(default="", repr=False)
    roles_claim: str = "groups"
    allowed_algorithms: tuple[str, ...] = ("RS256", "ES256")
