"""Checking an update before anything is rendered: content digest and master signature.

A `PendingApply` carries the desired state, its content digest (sha256 of the state's
canonical JSON, `nxmesh.config.versions.state_digest`) and, from a master, an Ed25519
signature over `update_signing_payload`: the workspace, version number, digest and key
id. Signing the digest rather than the state keeps the payload tiny, and the digest is
recomputed from the state here, so together they bind exactly this content to this
version number. Masters sign with `sign_update`; agents check with `verify_update`.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

import attrs

from nxmesh.config.versions import state_digest
from nxmesh.core.model import PendingApply
from nxmesh.core.serialization import canonical_json

if TYPE_CHECKING:
    from nxmesh.crypto.signing import SigningKey, VerifyKey

__all__ = ["UPDATE_PAYLOAD_TYPE", "sign_update", "update_signing_payload", "verify_update"]

UPDATE_PAYLOAD_TYPE = "nxmesh.pending-apply/1"
"""Domain separation: an update signature cannot pass for a signature of anything else."""


def update_signing_payload(update: PendingApply) -> bytes:
    """The canonical bytes a master signs for an update."""
    return canonical_json(
        {
            "type": UPDATE_PAYLOAD_TYPE,
            "workspace": update.state.workspace,
            "version": update.version,
            "digest": update.digest,
            "key_id": update.key_id,
        }
    )


def sign_update(update: PendingApply, signer: SigningKey) -> PendingApply:
    """`update` with ``key_id`` and ``signature`` set by `signer`."""
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
    if not verify_key.verify(update_signing_payload(update), update.signature):
        return "signature does not match the update (altered in transit or another key signed it)"
    return None
