"""What every CLI command receives through ``click.pass_obj``."""

from __future__ import annotations

from pathlib import Path

import attrs
import click

from nxmesh.core.pluginmanager import NxMeshPluginManager


@attrs.define
class CliContext:
    pm: NxMeshPluginManager
    config_path: Path | None


pass_cli = click.make_pass_decorator(CliContext)
