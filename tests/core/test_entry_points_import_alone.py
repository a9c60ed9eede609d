"""Every module registered in the ``nxmesh`` entry-point group imports first, alone.

Entry points load in whatever order the installed distributions list them, and a user may
import any plugin module first (``from nxmesh.plugins.nginx_driver import ReloadDriver``).
An import cycle that the usual order hides (the reload driver once needed ``nxmesh.agent``
to have been imported before it) shows up only in a fresh interpreter.
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import pytest

MODULES = sorted({ep.value.partition(":")[0] for ep in entry_points(group="nxmesh")})


def test_the_group_is_populated() -> None:
    assert "nxmesh.plugins.nginx_driver" in MODULES


@pytest.mark.parametrize("module", MODULES)
def test_imports_first_in_a_fresh_interpreter(module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", f"import {module}"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
