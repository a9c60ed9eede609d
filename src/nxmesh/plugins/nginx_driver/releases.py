"""The on-disk layout of the live configuration and the atomic flip between trees.

::

    <conf_dir>/
      current -> releases/<digest>       the tree nginx runs (-c <conf_dir>/current/nginx.conf)
      releases/<digest>/nginx.conf ...   one complete tree per applied bundle
      releases/<digest>.<n>/             a fresh copy when <digest> itself was tampered with
      releases/.staging-<random>/        a tree being written (removed at the next start)
      .current.tmp-<random>              the new link, before it replaces ``current``
      apply.journal                      present only while a swap is in flight

A tree is written under a staging name, made durable, read back and compared with its
digest, and only then renamed to its release name. The switch is a single ``rename(2)``
of a prepared symlink over ``current``: there is no instant at which ``current`` points
to a partial tree, so a crash leaves nginx's next (re)load reading the old tree or the
new one, never a mix. nginx resolves ``current/`` on every reload, so the flip takes
effect at the next graceful reload.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from nxmesh.agent.fsutil import atomic_write, fsync_dir, read_tree, special_entries
from nxmesh.core.bundle import Bundle, bundle_digest, is_certificate_key

__all__ = ["JOURNAL", "ReleaseStore", "sync_filesystem"]

JOURNAL = "apply.journal"
_WRITERS = 2
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_RELEASE = re.compile(r"^[0-9a-f]{16,128}(\.[0-9]+)?$")


def _load_syncfs() -> Callable[[int], int] | None:
    try:
        # The process's own symbols, libc's among them: no `ctypes.util.find_library`,
        # which runs ldconfig (70 ms at every start).
        libc = ctypes.CDLL(None, use_errno=True)
        fn: Callable[[int], int] = libc.syncfs
    except (OSError, AttributeError):
        return None
    return fn


_syncfs = _load_syncfs()


def sync_filesystem(root: Path, files: list[Path]) -> None:
    """Make `files` durable: one ``syncfs(2)`` where Linux has it, else fsync each.

    One syncfs costs about what a handful of fsyncs do, while a 1,000-site bundle has
    1,000 files; that is the difference between ~0.3 s and ~0.7 s here.
    """
    if _syncfs is not None:
        fd = os.open(root, os.O_RDONLY)
        try:
            if _syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for directory in {p.parent for p in files}:
        fsync_dir(directory)


class ReleaseStore:
    """Release trees under `root` and the ``current`` link nginx reads through."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.releases = root / "releases"
        self.current_link = root / "current"
        self.journal = root / JOURNAL

    # -- inspecting ---------------------------------------------------------------------

    def current_name(self) -> str | None:
        """The release ``current`` points to, or None before the first apply — and when
        ``current`` points anywhere but ``releases/<name>`` as the agent writes it (see
        `current_target`): a link re-pointed by hand is not a release."""
        target = self.current_target()
        if target is None:
            return None
        parts = Path(target).parts
        if len(parts) == 2 and parts[0] == "releases" and _RELEASE.match(parts[1]):
            return parts[1]
        return None

    def current_target(self) -> str | None:
        """Where the ``current`` link points, as written; None when there is no link."""
        try:
            return os.readlink(self.current_link)
        except OSError:  # missing, or not a link
            return None if not self.current_link.exists() else str(self.current_link)

    @staticmethod
    def digest_of(name: str) -> str:
        """The bundle digest a release name stands for (``<digest>`` or ``<digest>.<n>``)."""
        return name.split(".", 1)[0]

    def path_of(self, name: str) -> Path:
        return self.releases / name

    def conf_file(self) -> Path:
        """What nginx is started with: ``-c <root>/current/nginx.conf``."""
        return self.current_link / "nginx.conf"

    def files_of(self, name: str) -> dict[str, bytes]:
        return read_tree(self.path_of(name))

    def intact(self, name: str) -> bool:
        """True when release `name` holds exactly the files its digest names.

        A symlink or special file in it (nginx follows links) is tampering, and so is
        the release directory itself being a link: the agent writes neither.
        """
        path = self.path_of(name)
        if path.is_symlink() or not path.is_dir():
            return False
        files = read_tree(path)
        return not special_entries(files) and bundle_digest(files) == self.digest_of(name)

    # -- writing ------------------------------------------------------------------------

    def write(self, bundle: Bundle, *, durable: bool = True) -> tuple[str, Path]:
        """Write `bundle` into a new staging directory; return ``(release name, path)``.

        The name is ``<digest>``, or ``<digest>.<n>`` when a release of that digest
        exists but no longer matches it (tampered); `check_tree` it, test it, then
        `commit` it. Files are written by a few threads: creating a file is mostly
        kernel time, and two writers halve it for a 1,000-site bundle. (Rewriting an
        older tree in place would be slower still on ext4: a truncate-and-rewrite
        triggers writeback on close.)
        """
        self.releases.mkdir(parents=True, exist_ok=True)
        staging = self.releases / f".staging-{os.urandom(6).hex()}"
        staging.mkdir(mode=0o755)
        dirs = {staging} | {(staging / rel).parent for rel in bundle.files}
        for directory in sorted(dirs):
            directory.mkdir(parents=True, exist_ok=True)
        items = list(bundle.files.items())
        workers = min(_WRITERS, max(1, len(items) // 64))
        if workers == 1:
            _write_files(staging, items)
        else:
            with ThreadPoolExecutor(workers, thread_name_prefix="nxmesh-stage") as pool:
                list(pool.map(_write_files, [staging] * workers, _chunks(items, workers)))
        if durable:
            sync_filesystem(self.releases, [staging / rel for rel in bundle.files])
            for directory in dirs:
                fsync_dir(directory)
        return self._free_name(bundle.digest), staging

    @staticmethod
    def check_tree(path: Path, digest: str) -> None:
        """Read a written tree back and compare it with `digest`; `OSError` when it differs.

        A full disk or a concurrent writer shows up here, not after nginx loaded it.
        """
        files = read_tree(path)
        if special := special_entries(files):
            rel, what = next(iter(special.items()))
            raise OSError(f"the staged tree holds {rel}, {what} the bundle does not contain")
        on_disk = bundle_digest(files)
        if on_disk != digest:
            raise OSError(f"the staged tree reads back as {on_disk[:12]}..., not {digest[:12]}...")

    def _free_name(self, digest: str) -> str:
        if not self.path_of(digest).exists():
            return digest
        n = 1
        while self.path_of(f"{digest}.{n}").exists():
            n += 1
        return f"{digest}.{n}"

    def commit(self, staging: Path, name: str) -> None:
        """Rename a tested staging tree to its release name (durably)."""
        os.rename(staging, self.path_of(name))
        fsync_dir(self.releases)

    def find_intact(self, digest: str) -> str | None:
        """An existing, untampered release of `digest`, if any."""
        if not self.releases.is_dir():
            return None
        for path in sorted(self.releases.iterdir()):
            name = path.name
            if _RELEASE.match(name) and self.digest_of(name) == digest and self.intact(name):
                return name
        return None

    # -- switching ----------------------------------------------------------------------

    def prepare_link(self, name: str) -> Path:
        """Create the symlink that will replace ``current``; returns its path."""
        # Relative: the tree can be moved whole.
        return self._prepare_target(str(Path("releases") / name))

    def _prepare_target(self, target: str) -> Path:
        # The temporary name is the one `cleanup_stale` removes after a crash.
        tmp = self.root / f".current.tmp-{os.urandom(6).hex()}"
        os.symlink(target, tmp)
        return tmp

    def point_to_target(self, target: str) -> None:
        """Make ``current`` point at `target` exactly as it was written (prepare + atomic
        flip): the way back to a tree the agent did not write."""
        self.flip(self._prepare_target(target))

    def flip(self, prepared: Path) -> None:
        """Atomically make `prepared` the new ``current`` (rename over it) and persist it."""
        os.replace(prepared, self.current_link)
        fsync_dir(self.root)

    def point_to(self, name: str | None) -> None:
        """Make ``current`` point at `name` (prepare + flip); None removes the link."""
        if name is None:
            with contextlib.suppress(FileNotFoundError):
                self.current_link.unlink()
            fsync_dir(self.root)
            return
        self.flip(self.prepare_link(name))

    # -- the journal of an in-flight swap -------------------------------------------------

    def write_journal(self, data: Mapping[str, Any]) -> None:
        """Record the swap about to happen. Not fsynced on its own: the flip's directory
        fsync, right after, makes both the journal and the new link durable at once."""
        atomic_write(self.journal, json.dumps(dict(data)).encode(), mode=0o600, sync=False)

    def read_journal(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.journal.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # torn or garbage: still proof that a swap was in flight
        return data if isinstance(data, dict) else {}

    def clear_journal(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.journal.unlink()
            fsync_dir(self.root)

    # -- housekeeping -------------------------------------------------------------------

    def cleanup_stale(self) -> list[str]:
        """Remove leftovers of an interrupted apply: staging trees and unused temp links."""
        removed: list[str] = []
        if self.root.is_dir():
            for path in self.root.glob(".current.tmp-*"):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(path.name)
        if self.releases.is_dir():
            for path in self.releases.glob(".staging-*"):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
        return removed

    def prune(self, keep: int, protect: set[str]) -> list[str]:
        """Delete all but the `keep` newest releases, never one in `protect`."""
        if not self.releases.is_dir():
            return []
        names = [p.name for p in self.releases.iterdir() if _RELEASE.match(p.name)]
        names.sort(key=lambda n: self.path_of(n).stat().st_mtime, reverse=True)
        removed = []
        for name in names[keep:]:
            if name in protect:
                continue
            shutil.rmtree(self.path_of(name), ignore_errors=True)
            removed.append(name)
        return removed


def _chunks(items: list[tuple[str, bytes]], n: int) -> list[list[tuple[str, bytes]]]:
    return [items[i::n] for i in range(n)]


def _write_files(root: Path, items: list[tuple[str, bytes]]) -> None:
    for rel, data in items:
        # Private keys are for nginx's master (root) only; workers read the rest (an error
        # page that quotes a PEM key header included).
        mode = 0o600 if is_certificate_key(rel, data) else 0o644
        fd = os.open(root / rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
