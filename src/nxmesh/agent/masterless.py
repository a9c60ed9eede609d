"""Masterless mode: ``nxmesh agent --state FILE`` keeps a desired-state file applied.

For single servers and GitOps: the file (YAML or JSON, the format ``nxmesh validate``
reads) is the master. `StateFileSource` loads it, validates it (model + policy hooks),
and submits it to the agent as a `PendingApply` — the very path a master's update takes
(coalescer → applier → driver), so nothing about applying differs between the modes.

The file is polled every `interval` seconds: a changed mtime, size or inode triggers a
re-read, and only a changed *content digest* triggers an apply (touching the file, or
an editor saving it unchanged, does nothing). Each new content gets the next version
number. A file that stops validating is reported (``state_file.invalid``) and the last
good configuration keeps serving; the watchdog keeps the applied one in place.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.abc
import anyio.to_thread
import pluggy

from nxmesh.agent.events import EventRecorder
from nxmesh.config.versions import state_digest
from nxmesh.core.errors import NxMeshError, Problem, ValidationError
from nxmesh.core.loader import load_state_file
from nxmesh.core.model import PendingApply
from nxmesh.core.policy import enforce_policy

__all__ = ["StateFileSource", "load_update"]

_Stamp = tuple[int, int, int]


def load_update(
    pm: pluggy.PluginManager,
    path: Path,
    version: int,
    warnings: list[Problem] | None = None,
) -> PendingApply:
    """Read, validate and policy-check `path` into an unsigned update numbered `version`;
    its warnings (the model's, then the policy plugins') are added to `warnings`.

    :raises ValidationError: the file is invalid (every problem listed).
    :raises OSError: the file cannot be read.
    """
    state = load_state_file(path)
    found = enforce_policy(pm, state, source=str(path))
    if warnings is not None:
        warnings.extend(found)
    return PendingApply(version=version, digest=state_digest(state), state=state)


class StateFileSource:
    """Watch a desired-state file and submit each new content as an update.

    :param submit: where updates go (the agent's coalescer).
    :param last: version and digest already running from this file (from the cache),
        so a restart with an unchanged file keeps its version number.
    """

    def __init__(
        self,
        pm: pluggy.PluginManager,
        path: Path,
        submit: Callable[[PendingApply], None],
        *,
        interval: float = 1.0,
        last: tuple[int, str] | None = None,
        events: EventRecorder | None = None,
    ) -> None:
        self.pm = pm
        self.path = path
        self._submit = submit
        self.interval = interval
        self.version: int = last[0] if last is not None else 0
        self.digest: str | None = last[1] if last is not None else None
        self.events = events or EventRecorder()
        self._stamp: _Stamp | None = None
        self.last_error: str | None = None

    def _stat(self) -> _Stamp | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    async def poll(self) -> PendingApply | None:
        """Check the file once; submit and return an update when its content changed."""
        stamp = await anyio.to_thread.run_sync(self._stat)
        if stamp is not None and stamp == self._stamp:
            return None
        self._stamp = stamp
        warnings: list[Problem] = []
        try:
            update = await anyio.to_thread.run_sync(
                load_update, self.pm, self.path, self.version + 1, warnings
            )
        except (ValidationError, OSError, NxMeshError) as exc:
            message = str(exc)
            if message != self.last_error:  # report each distinct problem once
                self.events.record("state_file.invalid", path=str(self.path), message=message)
            self.last_error = message
            return None
        self.last_error = None
        if update.digest == self.digest:
            return None
        if warnings:  # what the master would warn of, said once per new content
            self.events.record(
                "state_file.warnings", path=str(self.path), warnings=[str(w) for w in warnings]
            )
        self.version, self.digest = update.version, update.digest
        self.events.record(
            "state_file.changed", path=str(self.path), version=update.version, digest=update.digest
        )
        self._submit(update)
        return update

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Submit the file's content, then poll for changes until cancelled."""
        await self.poll()
        task_status.started()
        while True:
            await anyio.sleep(self.interval)
            await self.poll()
