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
from nxmesh.crypto.private_files import read_private_file, write_private_file

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

    The owner-only rules of `nxmesh.crypto.private_files`: creation never replaces a
    concurrent creator's file, and a file other users may read raises `SecretError`.
    """
    if not path.exists():
        write_private_file(path, os.urandom(size))  # False: another process was first
    return read_private_file(path, what="agent cache key")


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
