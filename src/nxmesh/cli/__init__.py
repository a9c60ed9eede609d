"""The ``nxmesh`` command. Plugins add subcommands through ``nxmesh_cli_commands``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from nxmesh import __version__
from nxmesh.cli.agent_cmd import agent_command
from nxmesh.cli.client_cmds import register_client_commands
from nxmesh.cli.context import CliContext
from nxmesh.cli.plugins_cmd import plugins_command
from nxmesh.cli.render_cmd import render_command
from nxmesh.cli.settings_cmd import config_group
from nxmesh.cli.validate_cmd import validate_command
from nxmesh.cli.versions_cmd import versions_group
from nxmesh.core.errors import NxMeshError
from nxmesh.core.pluginmanager import get_plugin_manager
from nxmesh.core.settings import plugin_manager_options

__all__ = ["build_cli", "main"]


def _config_option(argv: list[str]) -> Path | None:
    """The ``--config`` value, found before click parses: plugins must load first."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if arg.startswith("--config="):
            return Path(arg.split("=", 1)[1])
    return None


def build_cli(argv: list[str] | None = None) -> click.Group:
    """The root group with built-in commands plus every plugin's commands."""
    argv = sys.argv[1:] if argv is None else argv
    config = _config_option(argv)
    # Blocked plugins must not even declare settings sections, so the plugin-related
    # settings are read from the file before the manager (and then the settings) exist.
    pm = get_plugin_manager(**plugin_manager_options(path=config))

    @click.group(context_settings={"help_option_names": ["-h", "--help"]})
    @click.version_option(__version__, prog_name="nxmesh")
    @click.option(
        "--config",
        type=click.Path(dir_okay=False, path_type=Path),
        default=config,
        help="Settings file (TOML). Default: $NXMESH_CONFIG, else ./nxmesh.toml if present.",
    )
    @click.pass_context
    def cli(ctx: click.Context, config: Path | None) -> None:
        """NxMesh: run a fleet of nginx servers from one control plane."""
        ctx.obj = CliContext(pm=pm, config_path=config)

    cli.add_command(plugins_command)
    cli.add_command(validate_command)
    cli.add_command(render_command)
    cli.add_command(config_group)
    cli.add_command(versions_group)
    cli.add_command(agent_command)
    register_client_commands(cli)
    pm.hook.nxmesh_cli_commands(cli=cli)
    return cli


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    try:
        cli = build_cli(argv)
    except NxMeshError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    cli.main(args=argv, prog_name="nxmesh")
