"""`sync_filesystem`: one syncfs(2) where Linux has it (found without ldconfig)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nxmesh.plugins.nginx_driver import releases


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="syncfs is Linux's")
def test_syncfs_is_found_in_the_process_own_symbols() -> None:
    assert releases._syncfs is not None


def test_sync_filesystem_makes_files_durable_without_error(tmp_path: Path) -> None:
    files = [tmp_path / f"f{i}" for i in range(3)]
    for f in files:
        f.write_text("x")
    releases.sync_filesystem(tmp_path, files)  # syncfs, or fsync of each on fallback


def test_importing_the_release_store_runs_no_ldconfig() -> None:
    """`ctypes.util.find_library` runs ldconfig at import; the store does without it."""
    code = "import sys, nxmesh.plugins.nginx_driver.releases; print('ctypes.util' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
