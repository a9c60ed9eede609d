"""A rendered nginx configuration: relative file paths → bytes, with a content digest."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import PurePosixPath
from types import MappingProxyType

import attrs

__all__ = ["Bundle", "bundle_digest"]


def bundle_digest(files: Mapping[str, bytes]) -> str:
    """sha256 over sorted (path, length, content) triples; independent of insertion order."""
    h = hashlib.sha256()
    for path in sorted(files):
        data = files[path]
        encoded = path.encode()
        # Lengths make the framing unambiguous: no two different bundles hash alike.
        h.update(len(encoded).to_bytes(4, "big") + encoded)
        h.update(len(data).to_bytes(8, "big") + data)
    return h.hexdigest()


def _check_path(path: str) -> None:
    pure = PurePosixPath(path)
    if not path or pure.is_absolute() or ".." in pure.parts or "\\" in path or "\0" in path:
        raise ValueError(f"bundle file path {path!r} must be relative and stay inside the tree")


def _freeze(files: Mapping[str, bytes]) -> Mapping[str, bytes]:
    for path in files:
        _check_path(path)
    return MappingProxyType({p: bytes(files[p]) for p in sorted(files)})


@attrs.frozen
class Bundle:
    """The files of one rendered configuration, rooted at nginx's prefix/conf dir."""

    files: Mapping[str, bytes] = attrs.field(converter=_freeze)
    digest: str = attrs.field(init=False)

    @digest.default
    def _digest(self) -> str:
        return bundle_digest(self.files)

    def text(self, path: str) -> str:
        return self.files[path].decode()
