"""Did-you-mean hints for error messages.

difflib is imported on the first hint: only error paths need it, and a long-running agent
would otherwise hold it (~0.2 MB) for nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["closest"]


def closest(name: str, candidates: Iterable[str], *, cutoff: float = 0.6) -> str | None:
    """The candidate most like `name` (difflib's ratio ≥ `cutoff`), or None."""
    import difflib

    found = difflib.get_close_matches(name, list(candidates), n=1, cutoff=cutoff)
    return found[0] if found else None
