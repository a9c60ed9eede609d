"""Fleet administration through the API: ``nxmesh agents``, ``nxmesh token``, ``nxmesh user``.

* ``agents [list|show ID|revoke ID]`` — enrolled agents, their rollout status per
  version, and revocation (keys deleted, stream closed at once).
* ``token create|list|revoke`` — single-use bootstrap tokens an agent enrolls with
  (``nxmesh agent --bootstrap-token-file FILE``); ``token create-api`` mints an ``nxm_`` API token
  for automation. A new token's secret is printed once, alone on stdout, so
  ``TOKEN=$(nxmesh token create)`` works; the explanation goes to stderr.
* ``user [list|add|passwd|delete]`` — local users. Passwords come from a hidden prompt
  (asked twice) or, with ``--password-stdin``, from stdin; they are never echoed.

A bare ``nxmesh agents`` or ``nxmesh user`` lists (``nxmesh agents --json`` is ``nxmesh
agents list --json``).
"""

from __future__ import annotations

import sys

import click
from rich.table import Table

from nxmesh.cli.client_support import (
    ListByDefaultGroup,
    age,
    client_command,
    console,
    json_option,
    labels_text,
    open_client,
    parse_duration,
    parse_labels,
    print_json,
    profile_option,
    timestamp,
    workspace_option,
)

__all__ = ["agents_group", "token_group", "user_group"]


def _confirm(question: str, yes: bool) -> None:
    """Go on when `yes` or the user agrees; off a terminal without `yes`, refuse (exit 1)."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise click.UsageError(f"{question} — pass --yes to confirm without a terminal")
    click.confirm(question, abort=True, err=True)


# ---------------------------------------------------------------------------------------
# agents
# ---------------------------------------------------------------------------------------


@click.group("agents", cls=ListByDefaultGroup)
def agents_group() -> None:
    """Enrolled agents: list, show, revoke (bare: list, with list's options)."""


@agents_group.command("list")
@click.option("--workspace", "-w", help="Only agents of this workspace.")
@profile_option
@json_option
@client_command
def agents_list_command(workspace: str | None, profile: str, as_json: bool) -> None:
    """List agents: status, running version, labels, last seen."""
    with open_client(profile) as client:
        agents = client.list_agents(workspace)
    if as_json:
        print_json([a.raw for a in agents])
        return
    if not agents:
        click.echo("no agents enrolled; enroll one with: nxmesh token create")
        return
    table = Table("id", "workspace", "status", "version", "labels", "mode", "last seen")
    for a in agents:
        version = "-" if a.running_version is None else str(a.running_version)
        table.add_row(
            a.id,
            a.workspace,
            a.status,
            version,
            labels_text(a.labels),
            a.deployment_mode or "-",
            age(a.last_seen),
        )
    console().print(table)


@agents_group.command("show")
@click.argument("agent_id")
@profile_option
@json_option
@client_command
def agents_show_command(agent_id: str, profile: str, as_json: bool) -> None:
    """Show one agent and its rollout status per version."""
    with open_client(profile) as client:
        agent = client.get_agent(agent_id)
        statuses = client.agent_statuses(agent_id)
    if as_json:
        print_json({**agent.raw, "rollouts": [s.raw for s in statuses]})
        return
    out = console()
    out.print(f"agent {agent.id} ({agent.name})")
    rows = [
        ("workspace", agent.workspace),
        ("status", agent.status),
        ("labels", labels_text(agent.labels)),
        ("mode", agent.deployment_mode or "-"),
        ("nginx", agent.nginx_version or "-"),
        ("running", f"version {agent.running_version}" if agent.running_version else "-"),
        # The version's state digest (`versions` lists it); the agents' apply messages
        # name the rendered config's digest instead ("serving config ...").
        ("state", agent.running_digest or "-"),
        ("last seen", f"{timestamp(agent.last_seen)} ({age(agent.last_seen)})"),
    ]
    for key, value in rows:
        out.print(f"  {key:<10} {value}")
    if statuses:
        table = Table("version", "phase", "when", "message")
        table.columns[3].overflow = "fold"
        for s in sorted(statuses, key=lambda s: -s.version):
            table.add_row(str(s.version), s.phase, timestamp(s.ts), s.message)
        out.print(table)


@agents_group.command("revoke")
@click.argument("agent_id")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@profile_option
@json_option
@client_command
def agents_revoke_command(agent_id: str, yes: bool, profile: str, as_json: bool) -> None:
    """Revoke an agent: its keys are deleted and its stream closes at once."""
    _confirm(f"revoke agent {agent_id}? It must enroll again with a new token", yes)
    with open_client(profile) as client:
        agent = client.revoke_agent(agent_id)
    if as_json:
        print_json(agent.raw)
        return
    click.echo(f"revoked agent {agent.id}")


# ---------------------------------------------------------------------------------------
# token
# ---------------------------------------------------------------------------------------


@click.group("token")
def token_group() -> None:
    """Bootstrap tokens (agent enrollment) and API tokens (automation)."""


@token_group.command("create")
@click.option(
    "--labels",
    "--label",
    "-l",
    "labels",
    multiple=True,
    metavar="K=V[,K=V]",
    help="Labels bound to the agent that enrolls with it (repeatable).",
)
@click.option("--ttl", default="1h", show_default=True, help="Lifetime: 3600, 90s, 15m, 1h, 7d.")
@workspace_option
@profile_option
@json_option
@client_command
def token_create_command(
    labels: tuple[str, ...], ttl: str, workspace: str, profile: str, as_json: bool
) -> None:
    """Create a single-use bootstrap token for enrolling one agent.

    The token (``<id>.<secret>``) is printed alone on stdout — its only copy.
    """
    bound = parse_labels(labels)
    seconds = parse_duration(ttl)
    with open_client(profile) as client:
        created = client.create_bootstrap_token(workspace, labels=bound, ttl=seconds)
    if as_json:
        print_json(created.raw)
        return
    click.echo(created.token)
    info = created.bootstrap_token
    click.echo(
        f"bootstrap token {info.get('id')} for workspace {workspace}, single use, expires "
        f"{timestamp(info.get('expires_at'))}; labels: {labels_text(bound)}",
        err=True,
    )
    click.echo(
        "enroll an agent with it: nxmesh agent --bootstrap-token-file FILE "
        "(or NXMESH_AGENT__BOOTSTRAP_TOKEN)",
        err=True,
    )


@token_group.command("list")
@workspace_option
@profile_option
@json_option
@client_command
def token_list_command(workspace: str, profile: str, as_json: bool) -> None:
    """List bootstrap tokens (never their secrets)."""
    with open_client(profile) as client:
        tokens = client.list_bootstrap_tokens(workspace)
    if as_json:
        print_json([t.raw for t in tokens])
        return
    if not tokens:
        click.echo(f"no bootstrap tokens in workspace {workspace!r}")
        return
    table = Table("id", "labels", "created", "expires", "state")
    for t in tokens:
        state = (
            "revoked" if t.revoked else "used" if t.used_at else "usable" if t.usable else "expired"
        )
        table.add_row(
            t.id, labels_text(t.labels), timestamp(t.created_at), timestamp(t.expires_at), state
        )
    console().print(table)


@token_group.command("revoke")
@click.argument("token_id")
@workspace_option
@profile_option
@client_command
def token_revoke_command(token_id: str, workspace: str, profile: str) -> None:
    """Revoke a bootstrap token so no agent can enroll with it."""
    with open_client(profile) as client:
        client.revoke_bootstrap_token(workspace, token_id)
    click.echo(f"revoked bootstrap token {token_id}")


@token_group.command("create-api")
@click.argument("name")
@click.option(
    "--scope",
    "-s",
    "scopes",
    multiple=True,
    required=True,
    help="Permission the token carries, e.g. config:read or config:write@staging.",
)
@click.option("--ttl", default=None, help="Lifetime (3600, 15m, 30d); default: no expiry.")
@profile_option
@json_option
@client_command
def token_create_api_command(
    name: str, scopes: tuple[str, ...], ttl: str | None, profile: str, as_json: bool
) -> None:
    """Create an nxm_ API token for automation (printed once, alone on stdout)."""
    seconds = parse_duration(ttl) if ttl else None
    with open_client(profile) as client:
        created = client.create_api_token(name, list(scopes), expires_in=seconds)
    if as_json:
        print_json(created.raw)
        return
    click.echo(created.token)
    click.echo(
        f"API token {created.api_token.get('id')} ({name}), scopes: {', '.join(scopes)}; "
        "use it with: nxmesh login --api-token-stdin",
        err=True,
    )


# ---------------------------------------------------------------------------------------
# user
# ---------------------------------------------------------------------------------------


def _new_password(from_stdin: bool) -> str:
    from nxmesh.cli.client_cmds import _read_secret

    return _read_secret("New password", from_stdin=from_stdin, confirm=not from_stdin)


@click.group("user", cls=ListByDefaultGroup)
def user_group() -> None:
    """Users of the master: list, add, passwd, delete (bare: list, with list's options)."""


@user_group.command("list")
@profile_option
@json_option
@client_command
def user_list_command(profile: str, as_json: bool) -> None:
    """List users and their roles."""
    with open_client(profile) as client:
        users = client.list_users()
    if as_json:
        print_json([u.raw for u in users])
        return
    table = Table("user", "roles", "state")
    for u in users:
        table.add_row(u.username, ", ".join(u.roles), "disabled" if u.disabled else "enabled")
    console().print(table)


@user_group.command("add")
@click.argument("username")
@click.option(
    "--role",
    "-r",
    "roles",
    multiple=True,
    help="Role binding: admin, operator, viewer, a custom role; role@workspace for one "
    "workspace. Repeatable. Default: viewer.",
)
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin's first line.")
@profile_option
@json_option
@client_command
def user_add_command(
    username: str, roles: tuple[str, ...], password_stdin: bool, profile: str, as_json: bool
) -> None:
    """Create a user (passwords: at least 12 characters)."""
    with open_client(profile) as client:
        password = _new_password(password_stdin)
        user = client.create_user(username, password, list(roles) or ["viewer"])
    if as_json:
        print_json(user.raw)
        return
    click.echo(f"created user {user.username} (roles: {', '.join(user.roles)})")


@user_group.command("passwd")
@click.argument("username", required=False)
@click.option(
    "--password-stdin",
    is_flag=True,
    help="Read from stdin: the new password; for your own, the current one first, then the new.",
)
@profile_option
@client_command
def user_passwd_command(username: str | None, password_stdin: bool, profile: str) -> None:
    """Change a password: your own (asks the current one; logs you out everywhere), or
    with USERNAME another user's (needs user:write; ends that user's sessions)."""
    from nxmesh.cli.client_cmds import _read_secret
    from nxmesh.cli.client_support import credential_store

    with open_client(profile) as client:
        me = client.me()
        if username is None or username == me.subject:
            current = _read_secret("Current password", from_stdin=password_stdin)
            new = _new_password(password_stdin)
            client.change_password(current, new)
            credential_store().remove(profile)
            click.echo(f"password of {me.subject} changed; every session ended: nxmesh login")
            return
        new = _new_password(password_stdin)
        client.update_user(username, password=new)
    click.echo(f"password of {username} changed; that user's sessions ended")


@user_group.command("delete")
@click.argument("username")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@profile_option
@client_command
def user_delete_command(username: str, yes: bool, profile: str) -> None:
    """Delete a user (its sessions and API tokens stop working)."""
    _confirm(f"delete user {username}?", yes)
    with open_client(profile) as client:
        client.delete_user(username)
    click.echo(f"deleted user {username}")
