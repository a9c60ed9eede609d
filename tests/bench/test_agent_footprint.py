"""What an agent process imports is what its idle PSS is made of (bench/agent_reliability.py,
bench/convergence_bench.py): guard the cheap wins.

Building the master link of ``nxmesh agent`` used to build *every* provider kind, so a
connected agent imported SQLAlchemy, Alembic, psycopg and the master's authenticators
(76 MB PSS instead of 46 MB). Only the transport kind is needed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CODE = """
import sys
from pathlib import Path
from nxmesh.cli.agent_cmd import _master_link
from nxmesh.cli.context import CliContext
from nxmesh.core.pluginmanager import get_plugin_manager
from nxmesh.core.settings import load_settings

pm = get_plugin_manager()
settings = load_settings(pm, path=None)
link = _master_link(CliContext(pm=pm, config_path=None), settings, "0011223344556677.x", None)
assert link is not None
heavy = ["sqlalchemy", "alembic", "psycopg", "litestar", "acme", "nxmesh.master.auth.links"]
print([m for m in heavy if m in sys.modules])
"""


def test_the_agents_master_link_imports_no_master_side_library(tmp_path: Path) -> None:
    """The link ``nxmesh agent`` builds pulls in transports only, not storage or auth."""
    env = {"NXMESH_STATE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", CODE], capture_output=True, text=True, check=True, env=env,
        cwd=tmp_path,
    ).stdout
    assert out.strip().splitlines()[-1] == "[]"
