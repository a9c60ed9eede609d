"""Following the event bus through its outages.

Every master component that reacts to events (the ``nxmesh_on_event`` dispatcher, the
rollout orchestrator) subscribes through `follow_bus`: a bus may end a subscription (a
subscriber fell behind, its database went away), and the master must outlive that and
make up what it missed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import anyio
import anyio.abc
import structlog

if TYPE_CHECKING:
    from nxmesh.core.events import Event
    from nxmesh.core.interfaces import EventBus

__all__ = ["follow_bus"]

_RESUBSCRIBE_MIN: Final = 0.1
_RESUBSCRIBE_MAX: Final = 10.0

log = structlog.get_logger("nxmesh.master")


async def follow_bus(
    bus: EventBus,
    handle: Callable[[Event], None],
    *,
    subscriber: str,
    resubscribed: Callable[[], None] | None = None,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Hand every event on `bus` to `handle`, until cancelled; never ends on a bus outage.

    The first subscription is made before `task_status` is started, and its failure
    propagates (a master that cannot subscribe at start says so). After that, a
    subscription that ends (the bus dropped its listener, or `handle` fell behind) or
    cannot be made (the database is down: ``StorageError``, a driver error) is retried
    with a backoff doubling up to `_RESUBSCRIBE_MAX` seconds. Each outage is logged once
    when it starts and once when it is over, not once per retry. Events published
    meanwhile are missed: `resubscribed` runs after every later successful subscription,
    so the caller can resync from storage. An exception from `handle` is logged and the
    next event handled.
    """
    started = False
    delay = _RESUBSCRIBE_MIN
    outage: str | None = None  # why the last subscription ended, until one works again
    while True:
        try:
            async with bus.subscribe() as events:
                if not started:
                    started = True
                    task_status.started()
                else:
                    if outage is not None:
                        log.info("event subscription restored", subscriber=subscriber)
                        outage = None
                    if resubscribed is not None:
                        resubscribed()
                delay = _RESUBSCRIBE_MIN
                async for event in events:
                    try:
                        handle(event)
                    except Exception:  # one bad event must not cost the subscription
                        log.exception("event handler failed", subscriber=subscriber,
                                      kind=event.kind)  # fmt: skip
            reason = "the bus ended the subscription"
        except Exception as exc:
            if not started:
                raise
            reason = str(exc).strip() or type(exc).__name__
        if outage is None:
            outage = reason
            log.warning("event subscription lost; subscribing again until it works",
                        subscriber=subscriber, reason=reason)  # fmt: skip
        await anyio.sleep(delay)  # never spin on a bus that refuses at once
        delay = min(delay * 2, _RESUBSCRIBE_MAX)
