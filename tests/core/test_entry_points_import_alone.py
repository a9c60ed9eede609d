"""Every module registered in the ``nxmesh`` entry-point group imports first, alone; so
does every module of the master, which applications extending it import directly.

Entry points load in whatever order the installed distributions list them, and a user may
import any plugin module first (``from nxmesh.plugins.nginx_driver import ReloadDriver``).
An import cycle that the usual order hides (the reload driver once needed ``nxmesh.agent``
to have been imported before it) shows up only in a fresh interpreter.

A fresh interpreter per module spent most of its second importing the same third-party
libraries (Litestar, SQLAlchemy...). One interpreter imports those once, with warnings as
errors, then forks a child per module that imports it: each child starts with no NxMesh
module loaded, which is what the check needs.
"""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

MODULES = sorted({ep.value.partition(":")[0] for ep in entry_points(group="nxmesh")})


def _master_modules() -> list[str]:
    import nxmesh.master

    found = pkgutil.walk_packages(nxmesh.master.__path__, "nxmesh.master.")
    # The migrations' revision files are loaded by alembic, by path, never imported.
    return sorted(m.name for m in found if ".migrations." not in m.name)


MASTER_MODULES = _master_modules()
ALL_MODULES = sorted({*MODULES, *MASTER_MODULES})

# Prints the top-level third-party packages that importing every module loads.
_LIBRARIES = r"""
import importlib, json, sys
for module in json.loads(sys.argv[1]):
    importlib.import_module(module)
tops = {name.partition(".")[0] for name in sys.modules}
print(json.dumps(sorted(
    top for top in tops
    if not top.startswith(("nxmesh", "_")) and top not in sys.stdlib_module_names
)))
"""

# Imports the libraries once, then each module in a forked child; prints
# {module: traceback, or "" when it imported}.
_FORK_PER_MODULE = r"""
import importlib, json, os, sys, traceback, warnings
warnings.simplefilter("error")
for library in json.loads(sys.argv[2]):
    try:
        importlib.import_module(library)
    except ImportError:  # a name only a running module registers (cython_runtime)
        pass
assert not any(name.startswith("nxmesh") for name in sys.modules), "NxMesh loaded early"
results = {}
for module in json.loads(sys.argv[1]):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            importlib.import_module(module)
            message = ""
        except BaseException:
            message = traceback.format_exc()
        with os.fdopen(write, "w") as out:
            out.write(message)
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        message = pipe.read()
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if status != 0:  # a crash writes nothing: "" must not read as imported
        message += f"the child importing it exited with {status} (negative: killed by signal)"
    results[module] = message
print(json.dumps(results))
"""


def _run(script: str, *args: str, path: str | None = None) -> object:
    env = {**os.environ, "PYTHONPATH": path} if path else None
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", script, *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def imported_alone() -> dict[str, str]:
    """Each module's traceback when imported first in a fresh process ("" when it imports)."""
    modules = json.dumps(ALL_MODULES)
    libraries = _run(_LIBRARIES, modules)
    results = _run(_FORK_PER_MODULE, modules, json.dumps(libraries))
    assert isinstance(results, dict)
    return results


def test_the_group_is_populated() -> None:
    assert "nxmesh.plugins.nginx_driver" in MODULES
    assert {"nxmesh.master.changes", "nxmesh.master.problems"} <= set(MASTER_MODULES)


@pytest.mark.parametrize("module", ALL_MODULES)
def test_imports_first_in_a_fresh_interpreter(module: str, imported_alone: dict[str, str]) -> None:
    assert imported_alone[module] == ""


def test_a_failing_import_a_warning_or_a_crash_is_reported(tmp_path: Path) -> None:
    """The harness itself: a child's import error, a warning at import (the children run
    with warnings as errors, as ``python -W error`` did) and a child killed while
    importing (it writes nothing) are each reported, never read as imported."""
    (tmp_path / "nxmesh_test_killed.py").write_text(
        "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n"
    )
    modules = ["json.tool", "nxmesh_no_such_module", "imp", "nxmesh_test_killed"]
    results = _run(_FORK_PER_MODULE, json.dumps(modules), "[]", path=str(tmp_path))
    assert isinstance(results, dict)
    assert results["json.tool"] == ""
    assert "ModuleNotFoundError" in results["nxmesh_no_such_module"]
    assert "DeprecationWarning" in results["imp"]  # imp warns it is deprecated
    assert "exited with -9" in results["nxmesh_test_killed"]
