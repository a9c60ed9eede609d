"""The seam between the agent and its master: `MasterLink`, implemented by a transport.

The agent works completely without one (masterless and island modes); a transport
plugin provides a `MasterLink` and the agent app runs it beside everything else:

- `MasterLink.run` connects, registers with what the agent runs (`AgentSession.hello`:
  version + digest, so the master resends only on mismatch), calls
  ``task_status.started()`` once the master accepted it, and then delivers every
  update with `AgentSession.submit` until cancelled, reconnecting on its own. Raising
  ``OSError`` before ``started`` means "master unreachable": the agent stays in island
  mode on its cache and calls `run` again later with backoff.
- The ``report_*`` methods carry the agent's outputs upstream; they are called from
  the agent's own tasks and must not block for long (buffer, or drop when offline).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import attrs

if TYPE_CHECKING:
    from anyio.abc import TaskStatus

    from nxmesh.core.events import Event
    from nxmesh.core.model import ApplyReport, HealthReport, PendingApply

__all__ = ["AgentHello", "AgentSession", "MasterLink"]


@attrs.frozen
class AgentHello:
    """What the agent tells its master when it (re)connects."""

    agent_id: str
    labels: Mapping[str, str]
    deployment_mode: str
    running_version: int | None
    running_digest: str | None


@attrs.define(eq=False)
class AgentSession:
    """The agent as a `MasterLink` sees it."""

    agent_id: str
    labels: Mapping[str, str]
    deployment_mode: str
    _submit: Callable[[PendingApply], None]
    _running: Callable[[], tuple[int | None, str | None]]

    def submit(self, update: PendingApply) -> None:
        """Hand an update from the master to the agent (coalesced, never blocks)."""
        self._submit(update)

    def hello(self) -> AgentHello:
        """Identity plus the version and digest running right now."""
        version, digest = self._running()
        return AgentHello(
            agent_id=self.agent_id,
            labels=self.labels,
            deployment_mode=self.deployment_mode,
            running_version=version,
            running_digest=digest,
        )


@runtime_checkable
class MasterLink(Protocol):
    """A connection to the master, provided by a transport plugin."""

    async def run(self, session: AgentSession, *, task_status: TaskStatus[None]) -> None:
        """Connect, register, ``task_status.started()``, deliver updates until cancelled."""
        ...

    async def report_apply(self, report: ApplyReport) -> None: ...
    async def report_health(self, report: HealthReport) -> None: ...
    async def report_event(self, event: Event) -> None: ...
