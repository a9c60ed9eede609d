"""Crash-safe file primitives: atomic writes, directory fsync, reading a tree back.

"Atomic" here means what POSIX rename gives: a reader (or a process restarted after a
``kill -9`` or a power cut) sees the old file or the new one, never a torn one. That
needs the data fsynced *before* the rename and the directory fsynced *after* it.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from nxmesh.core.bundle import bundle_digest

__all__ = [
    "atomic_write",
    "fsync_dir",
    "make_private_dir",
    "private_random_file",
    "read_tree",
    "tree_digest",
]

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


def fsync_dir(directory: Path) -> None:
    """Flush a directory's entries (a rename or create in it) to disk."""
    fd = os.open(directory, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_private_dir(directory: Path) -> None:
    """Create `directory` (and parents) with mode 0700 and tighten it if it exists wider."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if stat.S_IMODE(directory.stat().st_mode) != 0o700:
        directory.chmod(0o700)


def atomic_write(
    path: Path, data: bytes, *, mode: int = 0o600, sync_dir: bool = True, sync: bool = True
) -> None:
    """Replace `path` with `data`: temp file in the same directory, fsync, rename.

    `sync_dir` False leaves the directory fsync to the caller, which writes many files
    and syncs their directories once; `sync` False skips both fsyncs (the rename is
    still atomic against a process crash; durability is left to a later fsync).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # the umask may only have narrowed it
            f.write(data)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if sync and sync_dir:
        fsync_dir(path.parent)


def private_random_file(path: Path, size: int) -> bytes:
    """The content of `path`, first created holding `size` random bytes (mode 0600).

    Creation links a complete temp file into place, so a concurrent creator's key is
    never replaced and no reader sees a partial one. The mode is checked on the open
    descriptor: a file other users may read (or not a regular file) raises
    `PermissionError`. Same rules as ``nxmesh.crypto.secrets.read_private_file`` /
    ``write_private_file``, without importing ``cryptography`` (~3 MB in every agent).
    """
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o600)
                f.write(os.urandom(size))
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
                fsync_dir(path.parent)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    fd = os.open(path, os.O_RDONLY | _O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise PermissionError(f"{path} is not a regular file")
        if info.st_mode & 0o077:
            raise PermissionError(
                f"{path} is accessible by other users (mode {stat.S_IMODE(info.st_mode):04o}); "
                f"refusing to use it. Fix with: chmod 600 {path}"
            )
        return f.read()


def read_tree(root: Path) -> dict[str, bytes]:
    """Every regular file under `root`, by POSIX path relative to it.

    Symlinks inside the tree are not followed (a tree we wrote has none; one that
    appeared is drift and shows up as a missing file).
    """
    files: dict[str, bytes] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        for name in sorted(filenames):
            full = base / name
            if full.is_symlink() or not full.is_file():
                continue
            files[full.relative_to(root).as_posix()] = full.read_bytes()
    return files


def tree_digest(root: Path) -> str:
    """The bundle digest of the files under `root` (see `nxmesh.core.bundle.bundle_digest`)."""
    return bundle_digest(read_tree(root))
