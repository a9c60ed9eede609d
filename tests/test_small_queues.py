"""`nxmesh.small_queues`: lists in place of libraries' near-empty per-connection deques."""

from __future__ import annotations

import asyncio
import sys
from collections import deque

import pytest

from nxmesh.small_queues import SmallQueue, compact_asyncio_queue, small


class TestSmall:
    def test_plain_deque_becomes_a_small_queue_with_its_items(self) -> None:
        """Items and their order survive, and the deque operations libraries use work."""
        queue = small(deque([1, 2]))
        assert isinstance(queue, SmallQueue)
        queue.append(3)
        queue.appendleft(0)
        assert queue.popleft() == 0
        assert list(queue) == [1, 2, 3]
        assert sys.getsizeof(queue) < sys.getsizeof(deque()) / 4

    def test_bounded_deque_and_other_objects_stay(self) -> None:
        """A deque with `maxlen` drops items a list would keep: it is left alone, and so is
        anything that is not a deque."""
        bounded: deque[int] = deque(maxlen=2)
        assert small(bounded) is bounded
        items = [1]
        assert small(items) is items


class TestCompactAsyncioQueue:
    def test_queue_keeps_working_once_compacted(self) -> None:
        """put/get in order, a getter waiting on an empty queue, a bounded queue's putter
        waiting while it is full, and `join` all behave as before."""

        async def main() -> list[int]:
            queue: asyncio.Queue[int] = asyncio.Queue(maxsize=1)
            assert compact_asyncio_queue(queue)
            assert isinstance(queue._queue, SmallQueue)  # type: ignore[attr-defined]
            got: list[int] = []

            async def consume() -> None:
                for _ in range(3):
                    got.append(await queue.get())
                    queue.task_done()

            consumer = asyncio.create_task(consume())
            await asyncio.sleep(0)  # the consumer waits on the empty queue
            for item in (1, 2, 3):
                await queue.put(item)  # waits while the one slot is taken
            await asyncio.wait_for(queue.join(), 5)
            await consumer
            return got

        assert asyncio.run(main()) == [1, 2, 3]

    @pytest.mark.parametrize("other", [None, [], deque(), object()])
    def test_anything_else_is_left_alone(self, other: object) -> None:
        """Not an `asyncio.Queue` (trio's receive channel, hypercorn on trio): False."""
        assert compact_asyncio_queue(other) is False
