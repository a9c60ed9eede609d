"""Config versions: content-addressed, hash-chained, signed; verification and rollback.

Three hashes hold a workspace's history together:

* ``digest`` — the *content address*: sha256 of the canonical JSON of the desired state.
  Two versions with the same content have the same digest (a rollback repeats one).
* `version_hash` — sha256 of `signing_payload`, i.e. of every metadata field including
  ``digest`` and ``parent_digest``. It identifies one *version*, not its content.
* ``parent_digest`` — the previous version's `version_hash` (``None`` for version 1).

Chaining on `version_hash` rather than on the previous content digest is deliberate:
after a rollback two versions share a content digest, so a link to "the version whose
content is X" would not say *which* one; a link to the version hash is unique, and
covers the previous version's number, author, message, time and its own parent link,
so altering any past version breaks every later link. The Ed25519 signature over
`signing_payload` makes a rewritten-and-rehashed history detectable too, unless the
signing key itself was stolen.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs

from nxmesh.core.errors import NxMeshError, Problem
from nxmesh.core.model import ConfigVersion, DesiredState
from nxmesh.core.serialization import canonical_json
from nxmesh.core.serialization import state_digest as _content_digest

if TYPE_CHECKING:
    from nxmesh.crypto.signing import SigningKey, VerifyKey

__all__ = [
    "PAYLOAD_TYPE",
    "VersionError",
    "new_version",
    "require_verified",
    "rollback_version",
    "signing_payload",
    "state_digest",
    "verify_chain",
    "verify_version",
    "version_hash",
]

PAYLOAD_TYPE = "nxmesh.config-version/1"
"""Domain separation tag in every signing payload: a version signature cannot be replayed
as a signature of some other kind of object."""


class VersionError(NxMeshError):
    """A version cannot be created from these inputs (wrong workspace, tampered target...)."""


def state_digest(state: DesiredState) -> str:
    """The content address of `state`: hex sha256 of its canonical JSON."""
    return _content_digest(state)


def signing_payload(version: ConfigVersion) -> bytes:
    """The canonical bytes the master signs: every field of `version` except the state
    (covered through ``digest``) and the signature itself."""
    return canonical_json(
        {
            "type": PAYLOAD_TYPE,
            "workspace": version.workspace,
            "number": version.number,
            "digest": version.digest,
            "parent_digest": version.parent_digest,
            "author": version.author,
            "message": version.message,
            "created_at": version.created_at,
            "key_id": version.key_id,
        }
    )


def version_hash(version: ConfigVersion) -> str:
    """Hex sha256 of `signing_payload`: the identity the next version's parent link holds."""
    return hashlib.sha256(signing_payload(version)).hexdigest()


def new_version(
    state: DesiredState,
    *,
    previous: ConfigVersion | None,
    author: str,
    message: str,
    signer: SigningKey,
    now: float | None = None,
) -> ConfigVersion:
    """The signed version that follows `previous` (``None``: the first of its workspace).

    :raises VersionError: `previous` belongs to another workspace than `state`.
    """
    if previous is not None and previous.workspace != state.workspace:
        raise VersionError(
            f"cannot chain a version of workspace {state.workspace!r} after version "
            f"{previous.number} of workspace {previous.workspace!r}"
        )
    unsigned = ConfigVersion(
        workspace=state.workspace,
        number=1 if previous is None else previous.number + 1,
        digest=state_digest(state),
        parent_digest=None if previous is None else version_hash(previous),
        author=author,
        message=message,
        created_at=time.time() if now is None else now,
        state=state,
        key_id=signer.key_id,
    )
    return attrs.evolve(unsigned, signature=signer.sign(signing_payload(unsigned)))


def rollback_version(
    target: ConfigVersion,
    *,
    previous: ConfigVersion,
    author: str,
    signer: SigningKey,
    message: str | None = None,
    now: float | None = None,
    verify_key: VerifyKey | None = None,
) -> ConfigVersion:
    """A new version, after `previous`, whose state equals `target`'s.

    History is never rewritten: rolling back appends. The new version has `target`'s
    content digest, a new number and a parent link to `previous`.

    Both `target` and `previous` must pass `verify_version` with `verify_key` (default:
    `signer`'s own public key): someone able to write the database can edit an old
    version's state and recompute its digest, and signing a rollback to it would turn
    that edit into a validly signed version.

    :raises VersionError: `target` is from another workspace, is newer than `previous`,
        or `target` or `previous` fails verification (it was tampered with).
    """
    if target.workspace != previous.workspace:
        raise VersionError(
            f"cannot roll workspace {previous.workspace!r} back to a version of "
            f"workspace {target.workspace!r}"
        )
    if target.number > previous.number:
        raise VersionError(
            f"cannot roll back to version {target.number}: the latest is {previous.number}"
        )
    key = signer.verify_key if verify_key is None else verify_key
    require_verified(target, key, refusing=f"roll back to version {target.number}")
    if previous.number != target.number:
        require_verified(
            previous, key, refusing=f"roll back to version {target.number}", what="the latest"
        )
    return new_version(
        target.state,
        previous=previous,
        author=author,
        message=f"rollback to version {target.number}" if message is None else message,
        signer=signer,
        now=now,
    )


def verify_version(version: ConfigVersion, verify_key: VerifyKey) -> list[Problem]:
    """What is wrong with one version on its own: its content digest and its signature."""
    where = f"version {version.number}"
    found: list[Problem] = []
    actual = state_digest(version.state)
    if not hmac.compare_digest(version.digest, actual):
        found.append(
            Problem(
                where,
                f"state was edited: it hashes to {actual[:12]}..., "
                f"the recorded digest is {version.digest[:12]}...",
            )
        )
    if version.key_id and not hmac.compare_digest(version.key_id, verify_key.key_id):
        found.append(
            Problem(
                where,
                f"signed by key {version.key_id}, but the master's key is {verify_key.key_id}",
            )
        )
    if not version.signature:
        found.append(Problem(where, "is not signed"))
    elif not verify_key.verify(signing_payload(version), version.signature):
        found.append(
            Problem(
                where,
                "signature does not match: its metadata (number, author, message, time, "
                "digest or parent link) was edited, or another key signed it",
            )
        )
    return found


def require_verified(
    version: ConfigVersion, verify_key: VerifyKey, *, refusing: str, what: str = "the stored"
) -> None:
    """Refuse to build on `version` unless it passes `verify_version` with `verify_key`.

    What the master runs on every stored version it reuses (the latest before a commit,
    the target of a rollback): its state and metadata are about to be signed again, so an
    edit made in the database must not get through.

    :param refusing: what is refused, for the message (``roll back to version 3``).
    :param what: how the message names `version` (``the stored``, ``the latest``).
    :raises VersionError: naming the version and every problem found.
    """
    problems = verify_version(version, verify_key)
    if problems:
        details = "; ".join(p.message for p in problems)
        raise VersionError(
            f"refusing to {refusing}: {what} version {version.number} of workspace "
            f"{version.workspace!r} fails verification ({details}); it was altered after "
            "it was stored: run `nxmesh versions verify`"
        )


def verify_chain(versions: Sequence[ConfigVersion], verify_key: VerifyKey) -> list[Problem]:
    """Every problem in the complete history of one workspace, in version order.

    `versions` may come in any order (storage lists newest first). Detected: an edited
    state (digest mismatch), edited metadata (bad signature), a broken parent link,
    missing, duplicated or mixed-workspace versions. Each `Problem` has the path
    ``version N`` and says what is wrong. An empty list means the chain is intact.
    """
    found: list[Problem] = []
    if not versions:
        return found
    ordered = sorted(versions, key=lambda v: v.number)
    workspace = ordered[-1].workspace
    for version in ordered:
        if version.workspace != workspace:
            found.append(
                Problem(
                    f"version {version.number}",
                    f"belongs to workspace {version.workspace!r}, not {workspace!r}",
                )
            )
    previous: ConfigVersion | None = None
    for version in ordered:
        where = f"version {version.number}"
        found += verify_version(version, verify_key)
        if previous is not None and version.number == previous.number:
            found.append(Problem(where, "number is used by more than one version"))
            continue
        expected = 1 if previous is None else previous.number + 1
        if version.number != expected:
            missing = _span(expected, version.number - 1)
            found.append(Problem(where, f"{missing} missing before it"))
        elif previous is None:
            if version.parent_digest is not None:
                found.append(Problem(where, "is the first version but has a parent link"))
        elif version.parent_digest is None or not hmac.compare_digest(
            version.parent_digest, version_hash(previous)
        ):
            found.append(
                Problem(
                    where,
                    f"parent link broken: it does not match version {previous.number} "
                    f"(version {previous.number} was altered, replaced, or this link was "
                    "edited)",
                )
            )
        previous = version
    return found


def _span(first: int, last: int) -> str:
    return f"version {first} is" if first == last else f"versions {first}..{last} are"
