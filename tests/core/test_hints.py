"""`nxmesh.core.hints.closest`: the did-you-mean of every error message."""

from __future__ import annotations

import subprocess
import sys

from nxmesh.core.hints import closest


def test_closest_finds_a_near_name_or_nothing() -> None:
    assert closest("upstram", ["upstream", "site"]) == "upstream"
    assert closest("zzz", ["upstream", "site"]) is None
    assert closest("x", []) is None
    assert closest("sit", {"site": 1, "agent": 2}) == "site"  # a mapping's keys


def test_difflib_is_loaded_by_the_first_hint_only() -> None:
    code = (
        "import sys\n"
        "import nxmesh.core.model, nxmesh.core.settings, nxmesh.core.serialization\n"
        "import nxmesh.core.registry, nxmesh.config\n"
        "assert 'difflib' not in sys.modules, 'difflib at import'\n"
        "from nxmesh.core.hints import closest\n"
        "closest('a', ['b'])\n"
        "assert 'difflib' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
