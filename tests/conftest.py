"""Shared fixtures of the core test suite."""

from __future__ import annotations

import importlib
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture
def install_fake_distribution(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., None]:
    """Install a real (tiny) distribution with ``nxmesh`` entry points onto sys.path.

    ``install_fake_distribution("nxmesh-broken", {"broken": "mod_name"}, {"mod_name": code})``
    writes the modules and a ``.dist-info`` so `importlib.metadata` discovers it exactly
    like a pip-installed plugin.
    """
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))

    def install(dist: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
        info = site / f"{dist.replace('-', '_')}-0.1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\n")
        lines = "\n".join(f"{name} = {target}" for name, target in entry_points.items())
        (info / "entry_points.txt").write_text(f"[nxmesh]\n{lines}\n")
        for module, code in modules.items():
            (site / f"{module}.py").write_text(textwrap.dedent(code))
        importlib.invalidate_caches()

    return install
