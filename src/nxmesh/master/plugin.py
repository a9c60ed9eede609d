"""The master's own plugin: its token authenticators and the ``nxmesh master`` command.

Registered like every built-in through the ``nxmesh`` entry point group (``master``), so
``nxmesh plugins`` lists it and ``NXMESH_DISABLE_PLUGINS=master`` removes it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import click

from nxmesh import hookimpl
from nxmesh.core.errors import NxMeshError

if TYPE_CHECKING:
    from nxmesh.cli.context import CliContext
    from nxmesh.core.interfaces import Authenticator

T = TypeVar("T")


@hookimpl
def nxmesh_register_authenticators() -> Sequence[type[Authenticator]]:
    # Imported here: building the plugin manager (every CLI start) stays cheap.
    from nxmesh.master.auth.links import ApiTokenAuthenticator, JwtAuthenticator

    return [JwtAuthenticator, ApiTokenAuthenticator]


@click.group("master", invoke_without_command=True)
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
@click.pass_context
def master_command(
    click_ctx: click.Context,
    host: str | None,
    port: int | None,
    state_dir: Path | None,
    backend: str,
) -> None:
    """Run the master: the REST API (and the agent transports when installed).

    With a subcommand, do one maintenance job on the master's state instead and exit.
    """
    overrides = {"master.api_host": host, "master.api_port": port, "state_dir": state_dir}
    click_ctx.meta[_MAINTENANCE] = (overrides, backend)
    if click_ctx.invoked_subcommand is not None:
        return
    from nxmesh.master.server import main  # imported late: the CLI starts faster

    ctx: CliContext = click_ctx.obj
    try:
        main(ctx.pm, config_path=ctx.config_path, overrides=overrides, backend=backend)
    except NxMeshError as exc:
        raise click.ClickException(str(exc)) from None


_MAINTENANCE = "nxmesh.master.maintenance"


def _run_job(click_ctx: click.Context, job: Callable[..., Awaitable[T]]) -> T:
    """Run `job(pm, settings)` with the settings ``nxmesh master`` would use."""
    import anyio

    from nxmesh.core.logging import configure_logging
    from nxmesh.core.settings import load_settings

    ctx: CliContext = click_ctx.obj
    overrides, backend = click_ctx.meta[_MAINTENANCE]
    try:
        settings = load_settings(ctx.pm, path=ctx.config_path, overrides=overrides)
        configure_logging(settings.log_level, settings.log_format)
        return anyio.run(job, ctx.pm, settings, backend=backend)
    except NxMeshError as exc:
        raise click.ClickException(str(exc)) from None


@master_command.command("rewrap-secrets")
@click.pass_context
def rewrap_secrets_command(click_ctx: click.Context) -> None:
    """Re-encrypt every secret still under a previous master key, then exit.

    Configure the new key with the old ones as previous keys (previous_master_keys or
    previous_master_key_files), run this, then remove the previous keys. Masters do the
    same at every start; this finishes a rotation before any of them restarts, and
    fails (exit 1) instead of logging when a secret does not decrypt.
    """
    from nxmesh.master.maintenance import rewrap_once

    done = _run_job(click_ctx, rewrap_once)
    if not done.previous:
        click.echo(
            f"nothing to do: no previous master key is configured (current key {done.key_id}; "
            "set previous_master_keys or previous_master_key_files to rotate)"
        )
        return
    click.echo(
        f"{done.moved} secret(s) re-encrypted under master key {done.key_id} "
        f"(from {', '.join(done.previous)}); once every master runs with this key, "
        "remove the previous keys from the settings"
    )


@master_command.command("prune")
@click.pass_context
def prune_command(click_ctx: click.Context) -> None:
    """Run one retention pass now (what the master does every retention_interval), then
    exit; exit 1 when another master is running one."""
    from nxmesh.master.maintenance import prune_once

    counts = _run_job(click_ctx, prune_once)
    if counts is None:
        raise click.ClickException("another master is running a retention pass; try later")
    for table, rows in sorted(counts.items()):
        click.echo(f"{table}: {rows} row(s) deleted")
    click.echo(f"{sum(counts.values())} row(s) deleted in all")


@hookimpl
def nxmesh_cli_commands(cli: click.Group) -> None:
    cli.add_command(master_command)
