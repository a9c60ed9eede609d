"""Owner-only files for keys and secrets: created 0600 (directories 0700) with an atomic,
never-overwriting link into place, read only when no other user can read them.

Free of ``cryptography`` on purpose: an agent reads its cache key through these without
paying for the crypto library (~3 MB per process).
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

import structlog

from nxmesh.crypto.errors import SecretError

__all__ = ["read_private_file", "write_private_file"]

_log = structlog.get_logger("nxmesh.crypto")


def read_private_file(path: Path, *, what: str) -> bytes:
    """Read a file that must be readable by its owner only; refuse it otherwise.

    The mode is checked on the open descriptor, so the file cannot be swapped between
    the check and the read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise SecretError(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        _check_private(os.fstat(fd), path, what)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _check_private(info: os.stat_result, path: Path, what: str) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise SecretError(f"{what} {path} is not a regular file")
    if info.st_mode & 0o077:
        raise SecretError(
            f"{what} {path} is accessible by other users (mode "
            f"{stat.S_IMODE(info.st_mode):04o}); refusing to use it. "
            f"Fix with: chmod 600 {path}"
        )


def write_private_file(path: Path, data: bytes, *, replace: bool = False) -> bool:
    """Create `path` with mode 0600 holding `data`; missing parent directories get 0700.

    The content is written to a temporary file first and moved into place, so a reader
    never sees a half-written file. Without `replace` the move is a hard link, which
    fails when `path` exists: two processes starting at once cannot overwrite each
    other's key, and False tells the caller to read the existing file instead. With
    `replace` an existing file is atomically replaced (re-encryption after a rotation).
    """
    parent = path.parent
    _make_private_dirs(parent)
    tmp = parent / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)  # the umask could only narrow it; be explicit
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
        _fsync_dir(parent)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _make_private_dirs(directory: Path) -> None:
    missing: list[Path] = []
    current = directory
    while not current.exists():
        missing.append(current)
        current = current.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=0o700)
            d.chmod(0o700)  # mkdir's mode is filtered by the umask
    if not missing:
        mode = stat.S_IMODE(directory.stat().st_mode)
        if mode & 0o077:
            # Not changed behind the operator's back: it may be a shared directory.
            _log.warning(
                "private file directory is accessible by other users",
                directory=str(directory),
                mode=f"{mode:04o}",
                fix=f"chmod 700 {directory}",
            )


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
