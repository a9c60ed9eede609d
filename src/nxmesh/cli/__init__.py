"""The ``nxmesh`` command. Plugins add subcommands through ``nxmesh_cli_commands``."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import click

from nxmesh import __version__
from nxmesh.cli.context import CliContext
from nxmesh.core.errors import NxMeshError
from nxmesh.core.pluginmanager import get_plugin_manager
from nxmesh.core.settings import plugin_manager_options

__all__ = ["build_cli", "main"]

# Built-in commands by name: "module:attribute". Each module is imported when its command
# runs (or a help page lists it), so a long-running ``nxmesh agent`` never holds the
# client commands' libraries (rich tables and progress, yaml...) in memory.
_BUILTIN_COMMANDS = {
    "plugins": "nxmesh.cli.plugins_cmd:plugins_command",
    "validate": "nxmesh.cli.validate_cmd:validate_command",
    "render": "nxmesh.cli.render_cmd:render_command",
    "config": "nxmesh.cli.settings_cmd:config_group",
    "versions": "nxmesh.cli.client_cmds:client_versions_group",
    "agent": "nxmesh.cli.agent_cmd:agent_command",
    "login": "nxmesh.cli.client_cmds:login_command",
    "logout": "nxmesh.cli.client_cmds:logout_command",
    "whoami": "nxmesh.cli.client_cmds:whoami_command",
    "apply": "nxmesh.cli.client_cmds:apply_command",
    "diff": "nxmesh.cli.client_cmds:diff_command",
    "rollback": "nxmesh.cli.client_cmds:rollback_command",
    "rollout": "nxmesh.cli.rollout_cmd:rollout_group",
    "agents": "nxmesh.cli.fleet_cmds:agents_group",
    "token": "nxmesh.cli.fleet_cmds:token_group",
    "user": "nxmesh.cli.fleet_cmds:user_group",
    "demo": "nxmesh.cli.demo_cmd:demo_command",
}


class _LazyGroup(click.Group):
    """A group whose built-in commands are imported on first use.

    Commands added with ``add_command`` (plugins) take precedence over a built-in of the
    same name, as they did when the built-ins were added first and then replaced.
    """

    def __init__(self, *args: object, lazy: dict[str, str], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.lazy = dict(lazy)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.lazy:
            module, _, attribute = self.lazy.pop(cmd_name).partition(":")
            command = getattr(importlib.import_module(module), attribute)
            self.add_command(command() if not isinstance(command, click.Command) else command)
        return self.commands.get(cmd_name)


def _config_option(argv: list[str]) -> Path | None:
    """The ``--config`` value, found before click parses: plugins must load first."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if arg.startswith("--config="):
            return Path(arg.split("=", 1)[1])
    return None


def config_first(argv: list[str]) -> list[str]:
    """`argv` with a ``--config FILE`` given after the command moved before it, where the
    root group takes it: ``nxmesh agent --config F`` means ``nxmesh --config F agent``
    (no command has an option of that name).

    :raises ValueError: ``--config`` given more than once.
    """
    found: list[tuple[int, int]] = []  # (index, how many arguments)
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == "--config":
            found.append((i, 2))
        elif arg.startswith("--config="):
            found.append((i, 1))
    if len(found) > 1:
        raise ValueError("--config is given more than once; give one settings file")
    if not found or found[0][0] + found[0][1] > len(argv):  # none, or no value: click says
        return argv
    ((i, n),) = found
    return [*argv[i : i + n], *argv[:i], *argv[i + n :]]


def build_cli(argv: list[str] | None = None) -> click.Group:
    """The root group with built-in commands plus every plugin's commands."""
    argv = sys.argv[1:] if argv is None else argv
    config = _config_option(argv)
    # Blocked plugins must not even declare settings sections, so the plugin-related
    # settings are read from the file before the manager (and then the settings) exist.
    pm = get_plugin_manager(**plugin_manager_options(path=config))

    @click.group(
        cls=_LazyGroup,
        lazy=_BUILTIN_COMMANDS,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    @click.version_option(__version__, prog_name="nxmesh")
    @click.option(
        "--config",
        type=click.Path(dir_okay=False, path_type=Path),
        default=config,
        help="Settings file (TOML); may also follow the command. Default: $NXMESH_CONFIG, "
        "else ./nxmesh.toml if present.",
    )
    @click.pass_context
    def cli(ctx: click.Context, config: Path | None) -> None:
        """NxMesh: run a fleet of nginx servers from one control plane."""
        ctx.obj = CliContext(pm=pm, config_path=config)

    pm.hook.nxmesh_cli_commands(cli=cli)
    return cli


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    try:
        argv = config_first(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    try:
        cli = build_cli(argv)
    except NxMeshError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    cli.main(args=argv, prog_name="nxmesh")
