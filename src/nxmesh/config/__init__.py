"""Config versions (content-addressed, hash-chained, signed) and diffs between configs."""

from __future__ import annotations

from nxmesh.config.diff import Change, KindDiff, StateDiff, bundle_diff, diff_states
from nxmesh.config.versions import (
    VersionError,
    new_version,
    rollback_version,
    signing_payload,
    state_digest,
    verify_chain,
    verify_version,
    version_hash,
)

__all__ = [
    "Change",
    "KindDiff",
    "StateDiff",
    "VersionError",
    "bundle_diff",
    "diff_states",
    "new_version",
    "rollback_version",
    "signing_payload",
    "state_digest",
    "verify_chain",
    "verify_version",
    "version_hash",
]
