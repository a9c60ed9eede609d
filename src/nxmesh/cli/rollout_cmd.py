"""``nxmesh rollout status [--watch]``: how far a version got on each agent it targets.

Without ``--watch`` one snapshot is printed (exit 1 when an agent failed the version).
With ``--watch`` a rich progress bar per agent — pending → sent → applying → applied —
is redrawn until every targeted agent reports the version's digest (exit 0), one fails
or rolls it back (exit 1, with nginx's message), or ``--timeout`` passes (exit 1). The
master is polled (`nxmesh.client.rollout.rollout_snapshot`) every ``--interval``
seconds; polling keeps working through proxies that do not pass WebSockets.

`watch_rollout` is also what ``nxmesh demo`` shows.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from nxmesh.cli.client_support import (
    client_command,
    console,
    json_option,
    open_client,
    print_json,
    profile_option,
    workspace_option,
)

if TYPE_CHECKING:
    from nxmesh.client import Client
    from nxmesh.client.rollout import AgentProgress, RolloutSnapshot

__all__ = ["rollout_group", "watch_rollout"]

EXIT_FAILED = 1
_STYLE = {
    "done": "green",
    "failed": "red",
    "offline": "yellow",
    "pending": "dim",
    "in_progress": "cyan",
}


def _label(agent: AgentProgress) -> Text:
    word = "offline" if agent.state == "offline" else agent.phase
    return Text(word, style=_STYLE.get(agent.state, ""))


def _markup_label(agent: AgentProgress) -> str:
    """`_label` as rich markup, for the progress bar's text column."""
    label = _label(agent)
    return f"[{label.style}]{escape(label.plain)}[/]" if label.style else escape(label.plain)


def watch_rollout(
    client: Client,
    workspace: str,
    version: int | None,
    *,
    out: Console,
    timeout: float,
    interval: float = 0.5,
    min_agents: int = 0,
) -> RolloutSnapshot | None:
    """Redraw per-agent progress until converged, failed or `timeout`; the last snapshot.

    `min_agents`: keep waiting while fewer agents are targeted (a fleet still enrolling).
    None when the workspace has no version.
    """
    from nxmesh.client.rollout import STEPS, rollout_snapshot, summarize

    deadline = time.monotonic() + timeout
    snapshot = rollout_snapshot(client, workspace, version)
    if snapshot is None:
        return None
    tasks: dict[str, TaskID] = {}
    progress = Progress(
        TextColumn("{task.fields[agent]}", style="bold"),
        BarColumn(),
        TextColumn("{task.fields[phase]}"),
        TimeElapsedColumn(),
        console=out,
        # Off a terminal only the final state is printed, once: logs stay readable.
        auto_refresh=out.is_terminal,
    )
    with progress:
        while True:
            for agent in snapshot.agents:
                if agent.agent_id not in tasks:
                    tasks[agent.agent_id] = progress.add_task(
                        "", total=STEPS, agent=escape(agent.agent_id), phase=""
                    )
                progress.update(
                    tasks[agent.agent_id], completed=agent.step, phase=_markup_label(agent)
                )
            enough = len(snapshot.agents) >= min_agents
            if (snapshot.converged and enough) or snapshot.failed:
                break
            if time.monotonic() >= deadline:
                break
            time.sleep(interval)
            snapshot = rollout_snapshot(client, workspace, snapshot.version) or snapshot
    out.print(summarize(snapshot))
    for agent in snapshot.failed:
        out.print(f"  {agent.agent_id}: {agent.detail}", style="red")
    return snapshot


@click.group("rollout")
def rollout_group() -> None:
    """Rollouts of config versions to agents."""


@rollout_group.command("status")
@click.option("--version", "version", type=click.IntRange(min=1), help="Default: the latest.")
@click.option("--watch", is_flag=True, help="Show live progress until converged or failed.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=300.0,
    show_default=True,
    help="With --watch: give up after this many seconds (exit 1).",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=1.0,
    show_default=True,
    help="With --watch: seconds between polls.",
)
@workspace_option
@profile_option
@json_option
@client_command
def rollout_status_command(
    version: int | None,
    watch: bool,
    timeout: float,
    interval: float,
    workspace: str,
    profile: str,
    as_json: bool,
) -> None:
    """Show how far a version got on each agent it targets.

    Exit 0 converged (or, without --watch, still progressing), 1 an agent failed or
    rolled back the version, or --watch timed out.
    """
    from nxmesh.client.rollout import rollout_snapshot, summarize

    with open_client(profile) as client:
        if watch and not as_json:
            snapshot = watch_rollout(
                client, workspace, version, out=console(), timeout=timeout, interval=interval
            )
        else:
            snapshot = rollout_snapshot(client, workspace, version)
            deadline = time.monotonic() + timeout
            while (
                watch
                and snapshot is not None
                and not snapshot.converged
                and not snapshot.failed
                and time.monotonic() < deadline
            ):
                time.sleep(interval)
                snapshot = rollout_snapshot(client, workspace, snapshot.version)
    if snapshot is None:
        if as_json:
            print_json(None)
        else:
            click.echo(f"no versions in workspace {workspace!r}")
        return
    if as_json:
        print_json(snapshot.to_json())
    elif not watch:
        out = console()
        if snapshot.agents:
            table = Table("agent", "phase", "running", "detail")
            table.columns[3].overflow = "fold"
            for agent in snapshot.agents:
                running = "-" if agent.running_version is None else str(agent.running_version)
                table.add_row(agent.agent_id, _label(agent), running, agent.detail)
            out.print(table)
        out.print(summarize(snapshot))
    if snapshot.failed or (watch and not snapshot.converged):
        if watch and not snapshot.converged and not snapshot.failed:
            click.echo(f"timed out after {timeout:.0f} s", err=True)
        sys.exit(EXIT_FAILED)
