"""Crash-safe file primitives: atomic writes, directory fsync, reading a tree back.

"Atomic" here means what POSIX rename gives: a reader (or a process restarted after a
``kill -9`` or a power cut) sees the old file or the new one, never a torn one. That
needs the data fsynced *before* the rename and the directory fsynced *after* it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Mapping
from pathlib import Path

from nxmesh.core.bundle import bundle_digest
from nxmesh.crypto.private_files import read_private_file, write_private_file

__all__ = [
    "atomic_write",
    "describe_special",
    "fsync_dir",
    "make_private_dir",
    "private_random_file",
    "read_tree",
    "special_entries",
    "stand_in",
    "tree_digest",
]

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)

# Prefix of the stand-ins `read_tree` records for what is not a regular file. NUL-framed:
# no config, certificate or key starts so, so a tree holding one is never taken for a
# bundle's tree.
_SPECIAL = b"\0nxmesh:not-a-regular-file\0"
_KINDS = {
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
}
# O_NONBLOCK: a file swapped for a fifo after it was listed must not block the reader.
_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | _O_CLOEXEC


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
    """Every entry under `root`, by POSIX path relative to it: a regular file's content,
    for anything else a stand-in that `describe_special` names.

    Symlinks (to files or directories) are recorded with their target, not followed;
    fifos, sockets, devices and unreadable directories are recorded as what they are.
    The agent never writes any of these into a tree, but nginx follows a link an
    ``include`` glob matches, so one that appeared must count as drift. `root` itself
    may be a link (``current``); a missing `root` reads as an empty tree.
    """
    files: dict[str, bytes] = {}
    pending = [("", root)]
    while pending:
        prefix, directory = pending.pop()
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except OSError as exc:
            if not prefix:
                return {}
            files[prefix[:-1]] = stand_in(f"an unreadable directory ({exc.strerror})")
            continue
        for entry in entries:
            rel = prefix + entry.name
            if entry.is_dir(follow_symlinks=False):
                pending.append((rel + "/", Path(entry.path)))
            elif entry.is_file(follow_symlinks=False):
                files[rel] = _read_file(Path(entry.path))
            else:
                files[rel] = stand_in(_what(Path(entry.path), entry.stat(follow_symlinks=False)))
    return dict(sorted(files.items()))


def describe_special(data: bytes) -> str | None:
    """What a `read_tree` stand-in stands for ("a symlink (-> /x)"); None for file content."""
    if not data.startswith(_SPECIAL):
        return None
    return data[len(_SPECIAL) :].decode(errors="replace")


def special_entries(files: Mapping[str, bytes]) -> dict[str, str]:
    """The entries of a `read_tree` result that are not regular files, with what they are."""
    return {rel: what for rel, data in files.items() if (what := describe_special(data))}


def stand_in(what: str) -> bytes:
    """The `read_tree` value for an entry that is not a regular file: `what` it is."""
    return _SPECIAL + what.encode(errors="surrogateescape")


def _what(path: Path, st: os.stat_result) -> str:
    if stat.S_ISLNK(st.st_mode):
        try:
            return f"a symlink (-> {os.readlink(path)})"
        except OSError:
            return "a symlink"
    return f"a special file ({_KINDS.get(stat.S_IFMT(st.st_mode), 'unknown type')})"


def _read_file(path: Path) -> bytes:
    """`path`'s content; its stand-in when it was replaced since it was listed."""
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError as exc:
        if exc.errno != errno.ELOOP:  # ELOOP: it is a symlink now (O_NOFOLLOW)
            raise
        return stand_in(_what(path, os.lstat(path)))
    with open(fd, "rb") as f:
        st = os.fstat(fd)
        return f.read() if stat.S_ISREG(st.st_mode) else stand_in(_what(path, st))


def tree_digest(root: Path) -> str:
    """The bundle digest of the files under `root` (see `nxmesh.core.bundle.bundle_digest`)."""
    return bundle_digest(read_tree(root))
