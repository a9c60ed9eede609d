"""``nxmesh agent [--token T | --bootstrap-token-file F] [--state FILE] [--once]``.

Without ``--state`` the agent serves its verified cache (island mode) and connects to its
master (``agent.master_url``, ``agent.transports``; see ``docs/agent.md``): the first
time with a bootstrap token (``--token``, ``--bootstrap-token-file``,
``NXMESH_AGENT__BOOTSTRAP_TOKEN``), afterwards with the credentials that enrollment
stored in its state directory. While the master is unreachable it keeps serving its
cache and retries with backoff. With ``--state FILE`` it is masterless: the file is the
desired state, re-applied whenever its content changes. ``--once`` applies once and
exits (status 0 when nginx serves the configuration, 1 otherwise); nginx keeps running.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import click

from nxmesh.agent.app import AgentRefusedError, run_agent
from nxmesh.cli.context import CliContext, pass_cli
from nxmesh.core.errors import NxMeshError, ValidationError
from nxmesh.core.logging import configure_logging
from nxmesh.core.settings import Settings, load_settings

if TYPE_CHECKING:
    from nxmesh.agent_link import AgentLink

__all__ = ["agent_command"]


def _master_link(
    ctx: CliContext, settings: Settings, token: str | None, token_file: Path | None
) -> AgentLink | None:
    from nxmesh.agent.app import default_agent_id
    from nxmesh.agent.master_link import link_from_settings, read_bootstrap_token
    from nxmesh.core.registry import ProviderRegistries

    bootstrap = read_bootstrap_token(settings, token=token, token_file=token_file)
    return link_from_settings(
        # Lazy: only the transport kind is built, so the agent never imports the
        # master-side providers (storage, event buses, authenticators: ~35 MB PSS).
        ProviderRegistries(ctx.pm),
        settings,
        token=bootstrap,
        name=settings.agent.name or default_agent_id(),
    )


EXIT_FAILED = 1
EXIT_USAGE = 2
# sysexits' EX_NOPERM: the master refused this agent and it has nothing to serve. The
# systemd unit does not restart on it (RestartPreventExitStatus): asking again with the
# same token is refused again.
EXIT_REFUSED = 77


@click.command("agent")
@click.option(
    "--state",
    "state_file",
    type=click.Path(dir_okay=False, path_type=Path, exists=True),
    help="Masterless: keep this desired-state file (YAML/JSON) applied.",
)
@click.option("--once", is_flag=True, help="Apply once and exit (nginx keeps running).")
@click.option("--json", "as_json", is_flag=True, help="With --once: print the report as JSON.")
@click.option(
    "--token",
    default=None,
    help="Bootstrap token to enroll with (once; better: NXMESH_AGENT__BOOTSTRAP_TOKEN or "
    "--bootstrap-token-file, which stay out of the process list).",
)
@click.option(
    "--bootstrap-token-file",
    "token_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="File holding the bootstrap token (agent.bootstrap_token_file).",
)
@pass_cli
def agent_command(
    ctx: CliContext,
    state_file: Path | None,
    once: bool,
    as_json: bool,
    token: str | None,
    token_file: Path | None,
) -> None:
    """Run the NxMesh agent: apply configurations to the nginx beside it."""
    try:
        settings = load_settings(ctx.pm, path=ctx.config_path)
    except NxMeshError as exc:
        raise click.ClickException(str(exc)) from None
    configure_logging(settings.log_level, settings.log_format)
    link = None
    if state_file is None and not once:
        try:
            link = _master_link(ctx, settings, token, token_file)
        except NxMeshError as exc:
            click.echo(f"error: {exc}", err=True)
            raise SystemExit(EXIT_USAGE) from None
    try:
        report = anyio.run(
            lambda: run_agent(ctx.pm, settings, state_file=state_file, once=once, link=link)
        )
    except ValidationError as exc:
        click.echo(f"invalid state: {exc}", err=True)
        raise SystemExit(EXIT_FAILED) from None
    except AgentRefusedError as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(EXIT_REFUSED) from None
    except NxMeshError as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(EXIT_USAGE) from None
    if not once:
        return
    if report is None:
        click.echo("nothing to apply: no state file and no verified cache entry", err=True)
        raise SystemExit(EXIT_FAILED)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "version": report.version,
                    "digest": report.digest,
                    "outcome": report.outcome,
                    "message": report.message,
                    "durations": dict(report.durations),
                }
            )
        )
    else:
        click.echo(f"{report.outcome}: version {report.version} — {report.message}")
    if report.outcome not in ("applied", "noop"):
        if report.nginx_output and not as_json:
            click.echo(report.nginx_output, err=True)
        raise SystemExit(EXIT_FAILED)
