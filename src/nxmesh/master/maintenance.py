"""One-off maintenance jobs on a master's state, without serving it.

``nxmesh master rewrap-secrets`` and ``nxmesh master prune`` open the master's services
(the same settings, storage and keys as ``nxmesh master``), do one job and exit: a
master-key rotation finished before any master starts on the new key alone, a retention
pass on demand (after lowering a limit, before a backup). Both are safe beside running
masters: rewrapping compares and swaps each secret, and a pass takes the retention
leader lock (another master pruning makes it report that instead).
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs
import pluggy

from nxmesh.core.errors import ConfigurationError
from nxmesh.core.settings import Settings
from nxmesh.crypto.signing import SIGNING_KEY_FILE
from nxmesh.master.app import open_services, rewrap_all
from nxmesh.master.retention import RetentionJob

__all__ = ["Rewrapped", "prune_once", "rewrap_once"]


@attrs.frozen
class Rewrapped:
    """What `rewrap_once` did: secrets moved to `key_id` from `previous` key ids."""

    moved: int
    key_id: str
    previous: tuple[str, ...]


def _require_a_master(settings: Settings) -> None:
    """Refuse a state dir no master has started in: opening the services there would
    create a new master (keys, an admin), and a mistyped ``--state-dir`` would go
    unnoticed."""
    if not (settings.state_dir / SIGNING_KEY_FILE).exists():
        raise ConfigurationError(
            f"no master has run with state_dir {settings.state_dir} (it holds no "
            f"{SIGNING_KEY_FILE}); check --state-dir or the settings file"
        )


async def rewrap_once(pm: pluggy.PluginManager, settings: Settings) -> Rewrapped:
    """Re-encrypt every stored secret and ACME account key still under a previous master
    key (`nxmesh.master.app.rewrap_all`; the signing and API token key files are
    re-encrypted as they load). Raises what fails: the keys stay as they were."""
    _require_a_master(settings)
    async with open_services(pm, settings, rewrap=False) as services:
        moved = await rewrap_all(services)
        keyring = services.keyring
        return Rewrapped(moved, keyring.key_id, tuple(keyring.key_ids[1:]))


async def prune_once(pm: pluggy.PluginManager, settings: Settings) -> Mapping[str, int] | None:
    """One retention pass (`nxmesh.master.retention`): rows deleted per table, or None
    when another master holds the retention lock. Raises what fails."""
    _require_a_master(settings)
    async with open_services(pm, settings) as services:
        job = RetentionJob(services.storage, services.auth.store, settings)
        return await job.run_once()
