"""Every module registered in the ``nxmesh`` entry-point group imports first, alone; so
does every module of the master, which applications extending it import directly.

Entry points load in whatever order the installed distributions list them, and a user may
import any plugin module first (``from nxmesh.plugins.nginx_driver import ReloadDriver``).
An import cycle that the usual order hides (the reload driver once needed ``nxmesh.agent``
to have been imported before it) shows up only in a fresh interpreter.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

MODULES = sorted({ep.value.partition(":")[0] for ep in entry_points(group="nxmesh")})


def _master_modules() -> list[str]:
    import nxmesh.master

    found = pkgutil.walk_packages(nxmesh.master.__path__, "nxmesh.master.")
    # The migrations' revision files are loaded by alembic, by path, never imported.
    return sorted(m.name for m in found if ".migrations." not in m.name)


MASTER_MODULES = _master_modules()


def test_the_group_is_populated() -> None:
    assert "nxmesh.plugins.nginx_driver" in MODULES
    assert {"nxmesh.master.changes", "nxmesh.master.problems"} <= set(MASTER_MODULES)


@pytest.mark.parametrize("module", sorted({*MODULES, *MASTER_MODULES}))
def test_imports_first_in_a_fresh_interpreter(module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", f"import {module}"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
