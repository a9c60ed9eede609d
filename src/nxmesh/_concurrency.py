"""Small anyio helpers shared by the session code."""

from __future__ import annotations

__all__ = ["unwrap_group"]


def unwrap_group(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The exception to re-raise for a task group failure.

    anyio wraps even a single failure in an exception group; the session code reacts to
    the failure itself (a broken stream, a rejection). Returns the first leaf when every
    leaf is an ordinary `Exception`, else the group itself (cancellation, KeyboardInterrupt
    and friends must propagate untouched).
    """
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    if leaves and all(isinstance(leaf, Exception) for leaf in leaves):
        return leaves[0]
    return group
