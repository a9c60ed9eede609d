"""Small anyio helpers shared by the session code."""

from __future__ import annotations

import anyio

__all__ = ["unwrap_group"]


def unwrap_group(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The exception to re-raise for a task group failure.

    anyio wraps even a single failure in an exception group; the session code reacts to
    the failure itself (a broken stream, a rejection). Returns the first ordinary
    `Exception` leaf. Cancellation leaves beside it are dropped: cancellation is level-
    triggered in anyio and trio, so the still-cancelled scope raises it again at the next
    checkpoint — never later than the caller's next ``await``. Any other
    ``BaseException`` (KeyboardInterrupt, SystemExit) returns the whole group untouched.
    """
    cancelled = anyio.get_cancelled_exc_class()
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    others = [leaf for leaf in leaves if not isinstance(leaf, cancelled)]
    if others and all(isinstance(leaf, Exception) for leaf in others):
        return others[0]
    if not others and leaves:
        return leaves[0]
    return group
