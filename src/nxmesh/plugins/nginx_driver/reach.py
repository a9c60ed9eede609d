"""Whether nginx's workers can reach the files they open per request.

A master started as root runs its workers as another user (``user``, else ``nobody``).
They open the bundle's password files and error pages, the proxy cache and the
temporary files of large request bodies and answers per request; under a directory they
cannot enter, each of those requests answers 500 while ``nginx -t`` and the reload
succeed. The driver checks after each apply, with the live workers' own credentials,
and says so in the apply's report (`locked_out_warning`).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

__all__ = ["Credentials", "closed_directory", "credentials_of", "locked_out_warning"]

Credentials = tuple[int, frozenset[int]]
"""A process's effective user id and every group it is in."""


def credentials_of(pid: int) -> Credentials | None:
    """Process `pid`'s effective uid and every group it is in, read at once from
    ``/proc/<pid>/status`` (Linux); None when it is gone or cannot be read."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    try:
        uid = int(fields["Uid"].split()[1])  # real, effective, saved, filesystem
        groups = {int(fields["Gid"].split()[1]), *map(int, fields.get("Groups", "").split())}
    except (KeyError, IndexError, ValueError):
        return None
    return uid, frozenset(groups)


def closed_directory(path: Path, who: Credentials) -> Path | None:
    """The first directory on the way to `path` (itself included) that `who` may not
    enter (no search permission for it as owner, group member or other), or None: along
    the path as written, then along where its links lead (the directories above a link's
    target are traversed too). Root enters anything; ACLs are not read."""
    if who[0] == 0:
        return None
    real = Path(os.path.realpath(path))
    for walked in (path, real) if real != path else (path,):
        if (closed := _closed_on(walked, who)) is not None:
            return closed
    return None


def _closed_on(path: Path, who: Credentials) -> Path | None:
    uid, groups = who
    for part in (*reversed(path.parents), path):
        try:
            st = os.stat(part)
        except OSError:
            return None  # not there (yet): nothing to say about it
        if st.st_uid == uid:
            allowed = st.st_mode & stat.S_IXUSR
        elif st.st_gid in groups:
            allowed = st.st_mode & stat.S_IXGRP
        else:
            allowed = st.st_mode & stat.S_IXOTH
        if not allowed:
            return part
    return None


def locked_out_warning(worker_pids: Iterable[int], directories: Iterable[Path]) -> str | None:
    """Why the workers (the first of `worker_pids` still running) cannot reach one of
    `directories`, in words for the apply's report; None when they can, or when no worker
    could be asked."""
    who = next((c for c in map(credentials_of, worker_pids) if c is not None), None)
    if who is None:
        return None
    for directory in directories:
        closed = closed_directory(directory, who)
        if closed is None:
            continue
        try:
            mode = f"mode {stat.S_IMODE(os.stat(closed).st_mode):04o}"
        except OSError:  # pragma: no cover - gone since the check
            mode = "gone"
        return (
            f"nginx's workers (uid {who[0]}) cannot enter {closed} ({mode}), on the way to "
            f"{directory}: their password files, error pages, cached answers and large "
            "request bodies there answer 500; let them in (chmod o+x, or a group they are "
            "in) or move the agent's conf_dir"
        )
    return None
