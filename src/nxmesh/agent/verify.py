"""Checking an update before anything is rendered: content digest and master signature.

There is one signature scheme, end to end: the master signs each `ConfigVersion` once,
when it is stored (`nxmesh.config.versions.signing_payload`: workspace, number, digest,
parent link, author, message, time and key id), and that very signature travels to
every agent. A `PendingApply` from a master carries the version's metadata, so the agent
rebuilds the same payload and checks the Ed25519 signature against the master's key it
pinned at enrollment, and recomputes the content digest from the state it received.
Together they bind exactly this content to this version number of this workspace.

`pending_from_version` builds the update a master sends; `sign_update` signs an update
the same way a master signs a version (tools and tests); `verify_update` is the check.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import TYPE_CHECKING

import attrs

from nxmesh.config.versions import signing_payload, state_digest
from nxmesh.core.errors import ValidationError
from nxmesh.core.model import ConfigVersion, PendingApply

if TYPE_CHECKING:
    from nxmesh.crypto.signing import SigningKey, VerifyKey

__all__ = [
    "pending_from_version",
    "sign_update",
    "update_signing_payload",
    "verify_update",
    "version_of",
]


def version_of(update: PendingApply) -> ConfigVersion:
    """The `ConfigVersion` an update from the master stands for (its signed metadata)."""
    return ConfigVersion(
        workspace=update.state.workspace,
        number=update.version,
        digest=update.digest,
        parent_digest=update.parent_digest,
        author=update.author,
        message=update.message,
        created_at=update.created_at,
        state=update.state,
        signature=update.signature,
        key_id=update.key_id,
    )


def pending_from_version(
    version: ConfigVersion, *, trace: Mapping[str, str] | None = None
) -> PendingApply:
    """The update that carries `version` (and its signature) to an agent."""
    return PendingApply(
        version=version.number,
        digest=version.digest,
        state=version.state,
        signature=version.signature,
        key_id=version.key_id,
        parent_digest=version.parent_digest,
        author=version.author,
        message=version.message,
        created_at=version.created_at,
        trace=trace or {},
    )


def update_signing_payload(update: PendingApply) -> bytes:
    """The canonical bytes the master signed: the version's `signing_payload`."""
    return signing_payload(version_of(update))


def sign_update(update: PendingApply, signer: SigningKey) -> PendingApply:
    """`update` with ``key_id`` and ``signature`` set by `signer`, exactly as the master
    signs a version (`nxmesh.config.versions.new_version`)."""
    unsigned = attrs.evolve(update, key_id=signer.key_id, signature="")
    return attrs.evolve(unsigned, signature=signer.sign(update_signing_payload(unsigned)))


def verify_update(
    update: PendingApply, verify_key: VerifyKey | None, *, require_signature: bool = False
) -> str | None:
    """What is wrong with `update`, or None when it may be applied.

    The digest must match the state. With a `verify_key` a signature, when present, must
    be valid and by that key; `require_signature` refuses unsigned updates (an agent
    that knows its master's key accepts nothing unsigned from the network).
    """
    actual = state_digest(update.state)
    if not hmac.compare_digest(actual, update.digest):
        return (
            f"digest mismatch: the state hashes to {actual[:12]}..., "
            f"the update says {update.digest[:12]}..."
        )
    if not update.signature:
        if require_signature:
            return "update is not signed and this agent requires signed updates"
        return None
    if verify_key is None:
        return None if not require_signature else "no master key to check the signature with"
    if update.key_id and not hmac.compare_digest(update.key_id, verify_key.key_id):
        return f"signed by key {update.key_id}, but the master's key is {verify_key.key_id}"
    try:
        payload = update_signing_payload(update)
    except (ValidationError, ValueError, TypeError) as exc:
        return f"update metadata is invalid: {exc}"
    if not verify_key.verify(payload, update.signature):
        return (
            "signature does not match the version (altered in transit, metadata missing, "
            "or another key signed it)"
        )
    return None
