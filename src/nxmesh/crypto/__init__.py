"""Cryptography for NxMesh: secrets at rest under the master key, and version signatures.

Nothing here is hand-written crypto: AES-256-GCM and Ed25519 come from ``cryptography``.
Exports load on first use (`nxmesh.core.lazy`), so importing `nxmesh.crypto.private_files`
or `nxmesh.crypto.errors` does not import ``cryptography``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nxmesh.core.lazy import lazy_exports

if TYPE_CHECKING:
    from nxmesh.crypto.errors import SecretError
    from nxmesh.crypto.secrets import (
        MASTER_KEY_FILE,
        MasterKeyring,
        SecretBox,
        decode_key,
        encode_key,
        generate_key,
        load_master_key,
    )
    from nxmesh.crypto.signing import (
        SIGNING_KEY_FILE,
        SIGNING_PUBLIC_KEY_FILE,
        SigningError,
        SigningKey,
        VerifyKey,
    )

__all__ = [
    "MASTER_KEY_FILE",
    "SIGNING_KEY_FILE",
    "SIGNING_PUBLIC_KEY_FILE",
    "MasterKeyring",
    "SecretBox",
    "SecretError",
    "SigningError",
    "SigningKey",
    "VerifyKey",
    "decode_key",
    "encode_key",
    "generate_key",
    "load_master_key",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "SecretError": ".errors",
        **dict.fromkeys(
            (
                "MASTER_KEY_FILE",
                "MasterKeyring",
                "SecretBox",
                "decode_key",
                "encode_key",
                "generate_key",
                "load_master_key",
            ),
            ".secrets",
        ),
        **dict.fromkeys(
            (
                "SIGNING_KEY_FILE",
                "SIGNING_PUBLIC_KEY_FILE",
                "SigningError",
                "SigningKey",
                "VerifyKey",
            ),
            ".signing",
        ),
    },
)
