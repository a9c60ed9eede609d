"""Cryptography for NxMesh: secrets at rest under the master key, and version signatures.

Nothing here is hand-written crypto: AES-256-GCM and Ed25519 come from ``cryptography``.
"""

from __future__ import annotations

from nxmesh.crypto.secrets import (
    MASTER_KEY_FILE,
    MasterKeyring,
    SecretBox,
    SecretError,
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
