"""`sync_filesystem`: one syncfs(2) where Linux has it (found without ldconfig)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nxmesh.plugins.nginx_driver import releases


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="syncfs is Linux's")
def test_syncfs_is_found_in_the_process_own_symbols() -> None:
    assert releases._syncfs is not None


def test_sync_filesystem_syncs_the_tree_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With syncfs, one call on a descriptor of `root` (not one fsync per file)."""
    real = releases._syncfs
    if real is None:
        pytest.skip("no syncfs on this platform")  # the fallback is tested below
    files = [tmp_path / f"f{i}" for i in range(3)]
    for f in files:
        f.write_text("x")
    synced: list[str] = []

    def spy(fd: int) -> int:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(releases, "_syncfs", spy)
    releases.sync_filesystem(tmp_path, files)
    assert synced == [str(tmp_path)]


def test_sync_filesystem_falls_back_to_fsync_of_each_file_and_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without syncfs (or when it fails) every file and its directory are fsynced."""
    (tmp_path / "d").mkdir()
    files = [tmp_path / "a", tmp_path / "d" / "b"]
    for f in files:
        f.write_text("x")
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(releases, "_syncfs", None)
    monkeypatch.setattr(os, "fsync", spy)
    releases.sync_filesystem(tmp_path, files)
    assert sorted(synced) == sorted([*map(str, files), str(tmp_path), str(tmp_path / "d")])


def test_importing_the_release_store_runs_no_ldconfig() -> None:
    """`ctypes.util.find_library` runs ldconfig at import; the store does without it."""
    code = "import sys, nxmesh.plugins.nginx_driver.releases; print('ctypes.util' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
