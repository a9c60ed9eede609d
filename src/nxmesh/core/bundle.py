"""A rendered nginx configuration: relative file paths → bytes, with a content digest."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import PurePosixPath
from types import MappingProxyType

import attrs

__all__ = ["Bundle", "bundle_digest", "is_certificate_key", "is_private_key_file"]


_CERTS_DIR = "certs/"
"""Where the renderer puts certificate material (``render_nginx.CERTS_DIR``): a site's
key is ``certs/<certificate>.key`` or ``certs/acme/<site>.key``."""
_PRIVATE_KEY_MARK = b"PRIVATE KEY-----"
_PEM_PRIVATE_KEY = re.compile(rb"\A\s*-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")
"""A PEM private key at the start of a file (PKCS#8, RSA, EC, encrypted, OpenSSH...)."""


def is_certificate_key(path: str, data: bytes) -> bool:
    """Whether bundle file `path` is a site's private key, which only nginx's master may
    read: a file of ``certs/`` named ``.key`` or holding a PEM key. Nowhere else (an
    error page may quote a PEM header, and nginx's workers must read it)."""
    return path.startswith(_CERTS_DIR) and (path.endswith(".key") or _PRIVATE_KEY_MARK in data)


def is_private_key_file(path: str, data: bytes | None) -> bool:
    """Whether bundle file `path` holding `data` (``None``: absent) is a private key, which
    diffs (previews, drift reports) name but never show. Only key files: a site whose
    ``return`` body mentions "PRIVATE KEY" is still shown."""
    if data is None:
        return False
    return is_certificate_key(path, data) or _PEM_PRIVATE_KEY.match(data) is not None


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
