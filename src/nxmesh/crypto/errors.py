"""The error of the secrets layer, in a module of its own so that code handling private
files (the agent's cache key) can raise and catch it without importing ``cryptography``."""

from __future__ import annotations

from nxmesh.core.errors import NxMeshError

__all__ = ["SecretError"]


class SecretError(NxMeshError):
    """A secret could not be encrypted, decrypted or loaded (wrong key, tampering, bad file)."""
