"""Config versions (content-addressed, hash-chained, signed) and diffs between configs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nxmesh.core.lazy import lazy_exports

# Agents verify versions (`versions`) but never diff them: each module loads on first use.
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        **dict.fromkeys(("Change", "KindDiff", "StateDiff", "bundle_diff", "diff_states"), ".diff"),
        **dict.fromkeys(
            (
                "VersionError",
                "new_version",
                "rollback_version",
                "signing_payload",
                "state_digest",
                "verify_chain",
                "verify_version",
                "version_hash",
            ),
            ".versions",
        ),
    },
)

if TYPE_CHECKING:
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
