"""Differences between two configurations, at two levels.

* `diff_states`: the model level — which sites, upstreams, certificates and streams were
  added, removed or changed (matched by name), and for a changed one which fields, as paths in
  the YAML spelling (``locations[0].upstream``).
* `bundle_diff`: the rendered level — a unified diff of the nginx files, one file after
  the other in path order, like ``git diff``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import attrs

from nxmesh.core.bundle import Bundle, is_private_key_file
from nxmesh.core.model import DesiredState
from nxmesh.core.serialization import unstructure
from nxmesh.core.validation import join_path

__all__ = ["Change", "KindDiff", "StateDiff", "bundle_diff", "diff_states"]

_KINDS = ("sites", "upstreams", "certificates", "streams")


@attrs.frozen
class Change:
    """One object present on both sides with different content."""

    name: str
    fields: tuple[str, ...]
    """Paths of the fields that differ, relative to the object, sorted."""


@attrs.frozen
class KindDiff:
    """What changed in one collection of the state (sites, upstreams, certificates or
    streams)."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[Change, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not (self.added or self.removed or self.changed)


@attrs.frozen
class StateDiff:
    """The model-level difference between an old and a new desired state."""

    sites: KindDiff = attrs.field(factory=KindDiff)
    upstreams: KindDiff = attrs.field(factory=KindDiff)
    certificates: KindDiff = attrs.field(factory=KindDiff)
    other: tuple[str, ...] = ()
    """Changed top-level fields outside the collections (``workspace``)."""
    streams: KindDiff = attrs.field(factory=KindDiff)

    @classmethod
    def between(cls, old: DesiredState | None, new: DesiredState) -> StateDiff:
        """Same as `diff_states`."""
        return diff_states(old, new)

    @property
    def is_empty(self) -> bool:
        """True when both states are equal."""
        return not self.other and all(kind.is_empty for _, kind in self.kinds())

    def kinds(self) -> Iterator[tuple[str, KindDiff]]:
        """``(collection name, its diff)`` for sites, upstreams, certificates and streams."""
        for name in _KINDS:
            yield name, getattr(self, name)

    def summary(self) -> str:
        """Human-readable text: one line per collection, one per object that changed."""
        if self.is_empty:
            return "no changes"
        lines: list[str] = []
        for name, kind in self.kinds():
            if kind.is_empty:
                continue
            lines.append(
                f"{name}: {len(kind.added)} added, {len(kind.removed)} removed, "
                f"{len(kind.changed)} changed"
            )
            lines += [f"  + {n}" for n in kind.added]
            lines += [f"  - {n}" for n in kind.removed]
            lines += [f"  ~ {c.name}: {', '.join(c.fields)}" for c in kind.changed]
        lines += [f"changed: {field}" for field in self.other]
        return "\n".join(lines)


def diff_states(old: DesiredState | None, new: DesiredState) -> StateDiff:
    """Compare two states; `old` is ``None`` for the first version (everything is added)."""
    before = unstructure(old) if old is not None else {}
    after = unstructure(new)
    kinds = {name: _diff_kind(before.get(name, []), after.get(name, [])) for name in _KINDS}
    other = sorted(
        key
        for key in set(before) | set(after)
        if key not in _KINDS and old is not None and before.get(key) != after.get(key)
    )
    return StateDiff(**kinds, other=tuple(other))


def _diff_kind(old: Sequence[Mapping[str, Any]], new: Sequence[Mapping[str, Any]]) -> KindDiff:
    before = {item["name"]: item for item in old}
    after = {item["name"]: item for item in new}
    changed = tuple(
        Change(name, tuple(sorted(_changed_paths(before[name], after[name], ""))))
        for name in sorted(before.keys() & after.keys())
        if before[name] != after[name]
    )
    return KindDiff(
        added=tuple(sorted(after.keys() - before.keys())),
        removed=tuple(sorted(before.keys() - after.keys())),
        changed=changed,
    )


def _changed_paths(old: Any, new: Any, path: str) -> Iterator[str]:
    """Paths of the leaves that differ; a list whose length changed is reported whole."""
    if old == new:
        return
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for key in sorted(set(old) | set(new)):
            yield from _changed_paths(old.get(key), new.get(key), join_path(path, key))
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            yield from _changed_paths(a, b, join_path(path, f"[{i}]"))
    else:
        yield path or "<root>"


# ---------------------------------------------------------------------------------------
# Rendered files
# ---------------------------------------------------------------------------------------


def bundle_diff(old: Bundle | None, new: Bundle) -> str:
    """A unified diff from `old` to `new` (``None``: an empty tree), files in path order.

    Headers are ``--- a/<path>`` / ``+++ b/<path>``; an added or removed file is compared
    with ``/dev/null``. Files that are not UTF-8 text are reported as differing, and so
    are private key files, whose content must not end up in a terminal or a log: a
    ``.key`` file or a file holding a PEM private key under ``certs/``, or any file that
    starts with a PEM private key. Other files are shown even when their text mentions
    ``PRIVATE KEY-----`` (a site's ``return`` body, a header value).
    """
    before: Mapping[str, bytes] = old.files if old is not None else {}
    after = new.files
    out: list[str] = []
    for path in sorted(set(before) | set(after)):
        a, b = before.get(path), after.get(path)
        if a == b:
            continue
        from_name = f"a/{path}" if a is not None else "/dev/null"
        to_name = f"b/{path}" if b is not None else "/dev/null"
        if is_private_key_file(path, a) or is_private_key_file(path, b):
            out.append(f"Private key files {from_name} and {to_name} differ (not shown)\n")
            continue
        a_lines, b_lines = _lines(a), _lines(b)
        if a_lines is None or b_lines is None:
            out.append(f"Binary files {from_name} and {to_name} differ\n")
            continue
        for line in difflib.unified_diff(a_lines, b_lines, from_name, to_name):
            out.append(line)
            if not line.endswith("\n"):
                out.append("\n\\ No newline at end of file\n")
    return "".join(out)


def _lines(data: bytes | None) -> list[str] | None:
    if data is None:
        return []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    # Not str.splitlines: it also breaks on \x0b, \x1c, U+2028..., which nginx does not.
    parts = text.split("\n")
    return [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
