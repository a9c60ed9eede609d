"""The master's own plugin: its token authenticators and the ``nxmesh master`` command.

Registered like every built-in through the ``nxmesh`` entry point group (``master``), so
``nxmesh plugins`` lists it and ``NXMESH_DISABLE_PLUGINS=master`` removes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

from nxmesh import hookimpl
from nxmesh.core.errors import NxMeshError

if TYPE_CHECKING:
    from nxmesh.cli.context import CliContext
    from nxmesh.core.interfaces import Authenticator


@hookimpl
def nxmesh_register_authenticators() -> Sequence[type[Authenticator]]:
    # Imported here: building the plugin manager (every CLI start) stays cheap.
    from nxmesh.master.auth.links import ApiTokenAuthenticator, JwtAuthenticator

    return [JwtAuthenticator, ApiTokenAuthenticator]


@click.command("master")
@click.option("--host", default=None, help="Address the API listens on (master.api_host).")
@click.option("--port", type=int, default=None, help="API port (master.api_port).")
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where keys and the embedded database live (state_dir).",
)
@click.option(
    "--backend",
    type=click.Choice(["asyncio", "trio"]),
    default="asyncio",
    show_default=True,
    help="Event loop to run on.",
)
@click.pass_obj
def master_command(
    ctx: CliContext, host: str | None, port: int | None, state_dir: Path | None, backend: str
) -> None:
    """Run the master: the REST API (and the agent transports when installed)."""
    from nxmesh.master.server import main  # imported late: the CLI starts faster

    overrides = {"master.api_host": host, "master.api_port": port, "state_dir": state_dir}
    try:
        main(ctx.pm, config_path=ctx.config_path, overrides=overrides, backend=backend)
    except NxMeshError as exc:
        raise click.ClickException(str(exc)) from None


@hookimpl
def nxmesh_cli_commands(cli: click.Group) -> None:
    cli.add_command(master_command)
