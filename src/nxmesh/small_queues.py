"""Small lists in place of the near-empty deques libraries keep per connection.

An empty or one-item `collections.deque` costs 760 bytes (it allocates a 64-slot block),
a list about 70. Servers keep a few dozen per connection (asyncio queues and events,
h2 settings, hpack tables), and a master holds thousands of connections that sit idle.
The transports swap them for `SmallQueue` once a connection is set up; the libraries'
own code keeps working because it only appends, pops at either end, removes, clears,
indexes and iterates, and these queues stay tiny, so `popleft` being O(n) does not
matter.

Everything here reaches into other libraries' internals by attribute name. If a release
renames one, nothing breaks: the swap is skipped and the saving lost (the transports'
tests notice).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

__all__ = ["SmallQueue", "compact_asyncio_queue", "small"]


class SmallQueue(list[Any]):
    """A `list` standing in for a `deque` that holds at most a few items."""

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)

    def appendleft(self, item: Any) -> None:
        self.insert(0, item)


def small(queue: Any) -> Any:
    """`queue` as a `SmallQueue` when it is a plain deque (bounded deques stay as they are:
    a list would not drop items at `maxlen`); anything else unchanged."""
    if type(queue) is deque and queue.maxlen is None:
        return SmallQueue(queue)
    return queue


def compact_asyncio_queue(queue: object) -> bool:
    """Swap the four deques of an `asyncio.Queue` (items, waiting getters and putters, the
    `join` event's waiters). False, changing nothing, when `queue` is not one or its
    internals moved."""
    if not isinstance(queue, asyncio.Queue):
        return False
    q: Any = queue
    try:
        q._queue = small(q._queue)
        q._getters = small(q._getters)
        q._putters = small(q._putters)
        q._finished._waiters = small(q._finished._waiters)
    except AttributeError:  # pragma: no cover - a Python release moved them
        return False
    return True
