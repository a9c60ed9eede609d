"""The CLI as a client of the master's API: log in, apply desired state, inspect versions.

``nxmesh login`` stores a session (see `nxmesh.client.credentials`); ``nxmesh apply -f
FILE`` validates the file locally, shows the model diff and the rendered nginx diff
against the latest version (``PUT .../state?dry_run=true``), then stores it as the next
version — based on the version the diff was computed against, so a change someone made
meanwhile is a conflict (exit 4), not silently overwritten. ``nxmesh diff``, ``nxmesh
versions list|show`` and ``nxmesh rollback`` read and rewind the history.

The root group (`nxmesh.cli`) loads these, ``rollout``, ``agents``, ``token`` and ``user``
by name when they run; `client_versions_group` adds ``list``/``show`` to ``versions``.
A bare group (``nxmesh versions``, ``nxmesh agents``, ``nxmesh user``) runs ``list``
with the options given (`ListByDefaultGroup`).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import click
import yaml
from rich.table import Table

from nxmesh.cli.client_support import (
    ListByDefaultGroup,
    client_command,
    console,
    credential_store,
    json_option,
    open_client,
    print_diff,
    print_json,
    profile_option,
    timestamp,
    workspace_option,
)

__all__ = [
    "apply_command",
    "client_versions_group",
    "diff_command",
    "login_command",
    "logout_command",
    "rollback_command",
    "versions_list_command",
    "versions_show_command",
    "whoami_command",
]


def _read_secret(prompt: str, *, from_stdin: bool, confirm: bool = False) -> str:
    """A secret from one line of stdin, or a hidden prompt; never echoed, never empty."""
    if from_stdin:
        value = sys.stdin.readline().rstrip("\r\n")
    else:
        value = str(click.prompt(prompt, hide_input=True, confirmation_prompt=confirm, err=True))
    if not value:
        raise click.UsageError(f"{prompt.lower()} must not be empty")
    return value


# ---------------------------------------------------------------------------------------
# Login
# ---------------------------------------------------------------------------------------


@click.command("login")
@click.option(
    "--url", help="The master's API URL. Default: the profile's, else http://127.0.0.1:8470."
)
@click.option(
    "--username",
    "-u",
    help="User name. Default: the profile's previous one; without --password-stdin it is "
    "asked for.",
)
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin's first line.")
@click.option(
    "--api-token-stdin",
    is_flag=True,
    help="Store an nxm_ API token read from stdin instead of logging in with a password.",
)
@click.option(
    "--ca-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="CA certificate (PEM) to verify an https:// master with, instead of the system's.",
)
@profile_option
@json_option
@client_command
def login_command(
    url: str | None,
    username: str | None,
    password_stdin: bool,
    api_token_stdin: bool,
    ca_file: Path | None,
    profile: str,
    as_json: bool,
) -> None:
    """Log in to a master and store the session (refreshed automatically).

    The password is read from a hidden prompt, or with --password-stdin from stdin, and
    is never stored: only the access and refresh tokens are, in
    ~/.config/nxmesh/credentials.json (mode 0600). Reading stdin, nothing is prompted
    for: the user name is --username, else the one the profile logged in with before.
    """
    from nxmesh.client import DEFAULT_URL, Client, Profile, normalize_url

    if password_stdin and api_token_stdin:
        raise click.UsageError("--password-stdin and --api-token-stdin exclude each other")
    store = credential_store()
    previous = store.get(profile)
    base = normalize_url(url or (previous.url if previous else DEFAULT_URL))
    ca = str(ca_file.resolve()) if ca_file else (previous.ca_file if previous else None)
    if api_token_stdin:
        token = _read_secret("API token", from_stdin=True)
        if not token.startswith("nxm_"):
            raise click.UsageError("an API token starts with nxm_")
        with Client(Profile(url=base, api_token=token, ca_file=ca)) as client:
            me = client.me()
            saved = Profile(url=base, username=me.subject, api_token=token, ca_file=ca)
    else:
        saved_name = previous.username if previous and previous.username else None
        if username is None and password_stdin:
            # stdin holds the password: a prompt would read it as the user name.
            if saved_name is None:
                raise click.UsageError(
                    "--password-stdin needs the user name: pass --username NAME "
                    f"(profile {profile!r} has no previous login to take it from)"
                )
            username = saved_name
        elif username is None:
            username = click.prompt("Username", default=saved_name or "admin", err=True)
        password = _read_secret("Password", from_stdin=password_stdin)
        with Client(Profile(url=base, ca_file=ca)) as client:
            client.login(username, password)
            me = client.me()
            # What the client holds now: with a short access-token TTL `me` has already
            # rotated the session, and the pair `login` returned is spent.
            saved = client.profile
    store.put(profile, saved)
    if as_json:
        print_json({"profile": profile, "url": base, "subject": me.subject, "roles": me.roles})
        return
    roles = ", ".join(me.roles) or "none"
    where = "" if profile == "default" else f" (profile {profile})"
    click.echo(f"logged in to {base} as {me.subject} (roles: {roles}){where}")


@click.command("logout")
@profile_option
@client_command
def logout_command(profile: str) -> None:
    """End the stored session on the master and forget it locally."""
    from nxmesh.client import ClientError, NotLoggedInError

    store = credential_store()
    try:
        client = open_client(profile)
    except NotLoggedInError:  # not a bad profile name or credentials file: those exit 2
        click.echo("not logged in")
        return
    with client:
        try:
            client.logout()
        except ClientError as exc:  # forget it locally all the same
            click.echo(f"warning: the master did not end the session: {exc}", err=True)
    store.remove(profile)
    click.echo(f"logged out of {client.url}")


@click.command("whoami")
@profile_option
@json_option
@client_command
def whoami_command(profile: str, as_json: bool) -> None:
    """Who the stored login is, and what its roles allow."""
    with open_client(profile) as client:
        me = client.me()
        if as_json:
            print_json({**me.raw, "url": client.url})
            return
        click.echo(f"{me.subject} at {client.url} (roles: {', '.join(me.roles) or 'none'})")
        click.echo(f"grants: {', '.join(me.grants) or 'none'}")
        if me.scopes:  # an API token: narrower than its owner's grants
            click.echo(f"token scopes: {', '.join(me.scopes)} (only what both allow)")


# ---------------------------------------------------------------------------------------
# Apply and diff
# ---------------------------------------------------------------------------------------


def load_for_apply(files: tuple[Path, ...], *, as_json: bool = False) -> tuple[str, dict[str, Any]]:
    """Read and check desired-state files locally: (workspace, JSON body). Exits 1 listing
    every problem (file, field, why) when they are invalid — with `as_json`, raises them
    as the `InvalidError` a 422 from the master is (see docs/cli.md)."""
    from nxmesh.core.errors import ValidationError
    from nxmesh.core.loader import load_state_files
    from nxmesh.core.serialization import unstructure

    try:
        state = load_state_files(files)
    except ValidationError as exc:
        if as_json:  # `client_command` prints it as it prints the master's 422
            from nxmesh.client import FieldError, InvalidError

            where = f"{exc.source}: " if exc.source else ""
            raise InvalidError(
                422,
                f"{where}{len(exc.problems)} field(s) invalid (checked locally)",
                title="Validation failed",
                errors=tuple(FieldError(p.path, p.message) for p in exc.problems),
            ) from None
        noun = "problem" if len(exc.problems) == 1 else "problems"
        click.echo(f"invalid: {len(exc.problems)} {noun}", err=True)
        prefix = f"{exc.source}: " if exc.source else ""
        for problem in exc.problems:
            click.echo(f"  {prefix}{problem}", err=True)
        sys.exit(1)
    except OSError as exc:
        raise click.FileError(str(exc.filename or files[0]), exc.strerror) from None
    body: dict[str, Any] = unstructure(state)
    return state.workspace, body


def _print_invalid(exc: Exception, files: tuple[Path, ...]) -> None:
    """A 422 from the master, each field prefixed with the file it came from."""
    from nxmesh.client import ApiError

    assert isinstance(exc, ApiError)
    names = ", ".join(map(str, files))
    noun = "problem" if len(exc.errors) == 1 else "problems"
    head = exc.detail or exc.title
    click.echo(f"invalid: the master refused {names}: {head}", err=True)
    if exc.errors:
        click.echo(f"  {len(exc.errors)} {noun}:", err=True)
    for error in exc.errors:
        click.echo(f"  {names}: {error}", err=True)


def _watch_command(workspace: str, profile: str) -> str:
    """The command that follows a rollout, with the profile this one used (the default
    profile's master may be another)."""
    where = "" if profile == "default" else f" --profile {shlex.quote(profile)}"
    return f"nxmesh rollout status --watch -w {workspace}{where}"


@click.command("apply")
@click.option(
    "-f",
    "--file",
    "files",
    multiple=True,
    required=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Desired-state file (YAML or JSON); several are merged.",
)
@click.option("--dry-run", is_flag=True, help="Show what would change; store nothing.")
@click.option("--message", "-m", help="Message recorded with the new version.")
@click.option("--workspace", "-w", help="Workspace (default: the file's, else 'default').")
@profile_option
@json_option
@client_command
def apply_command(
    files: tuple[Path, ...],
    dry_run: bool,
    message: str | None,
    workspace: str | None,
    profile: str,
    as_json: bool,
) -> None:
    """Apply desired state: show the rendered nginx diff against the live version, then
    store the state as the next version (pushed to the agents it targets).

    Exit 0 applied (or nothing to change), 1 invalid (every problem with its field),
    3 not logged in or not allowed, 4 the latest version changed meanwhile, 5 master
    unreachable.
    """
    from nxmesh.client import InvalidError

    file_ws, body = load_for_apply(files, as_json=as_json)
    ws = workspace or file_ws
    body["workspace"] = ws
    out = console()
    with open_client(profile) as client:
        try:
            preview = client.dry_run(ws, body)
        except InvalidError as exc:
            if as_json:
                raise
            _print_invalid(exc, files)
            sys.exit(exc.exit_code)
        if not as_json:
            base = preview.base_version
            against = f"version {base}" if base else "nothing (first version)"
            out.print(f"workspace {ws}: changes against {against}")
            for line in preview.summary.splitlines():
                out.print(f"  {line}")
            if preview.bundle_diff:
                print_diff(out, preview.bundle_diff)
            for warning in preview.warnings:
                click.echo(f"warning: {warning.get('path')}: {warning.get('message')}", err=True)
        if dry_run:
            if as_json:
                print_json({"dry_run": True, **preview.raw})
            else:
                out.print("dry run: nothing stored")
            return
        if not preview.would_change:
            if as_json:
                print_json({"dry_run": False, "created": False, **preview.raw})
            else:
                out.print(f"no changes: version {preview.base_version} is already this state")
            return
        result = client.put_state(
            ws, body, message=message, expected_version=preview.base_version or 0
        )
    if as_json:
        print_json(
            {
                "dry_run": False,
                **result.raw,
                "summary": preview.summary,
                "bundle_diff": preview.bundle_diff,
            }
        )
        return
    if result.created:
        out.print(
            f"applied: version {result.number} ({result.digest[:12]}) in workspace {ws}; "
            f"follow it with: {_watch_command(ws, profile)}"
        )
    else:
        out.print(f"no changes: version {result.number} is already this state")


@click.command("diff")
@click.argument("from_version", metavar="[A]", type=click.IntRange(min=0), required=False)
@click.argument("to_version", metavar="[B]", type=click.IntRange(min=1), required=False)
@workspace_option
@profile_option
@json_option
@client_command
def diff_command(
    from_version: int | None,
    to_version: int | None,
    workspace: str,
    profile: str,
    as_json: bool,
) -> None:
    """Show what changed between versions: the model diff and the rendered nginx diff.

    No argument: the latest version against the one before. One (A): what version A
    changed. Two (A B): from version A to version B (A = 0 means from nothing).
    """
    with open_client(profile) as client:
        against: int | None = None
        if to_version is not None:
            number, against = to_version, from_version
        elif from_version is not None:
            number = from_version
        else:
            latest = client.latest_version(workspace)
            if latest is None:
                click.echo(f"no versions in workspace {workspace!r}", err=True)
                sys.exit(4)
            number = latest.number
        if number == 0:
            raise click.BadParameter("version 0 is 'nothing'; compare it with: nxmesh diff 0 B")
        diff = client.diff(workspace, number, against=against)
    if as_json:
        print_json(diff.raw)
        return
    out = console()
    origin = f"version {diff.from_version}" if diff.from_version else "nothing"
    out.print(f"workspace {workspace}: {origin} → version {diff.to_version}")
    for line in diff.summary.splitlines():
        out.print(f"  {line}")
    if diff.bundle_diff:
        print_diff(out, diff.bundle_diff)


# ---------------------------------------------------------------------------------------
# Versions and rollback
# ---------------------------------------------------------------------------------------


@click.command("list")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@workspace_option
@profile_option
@json_option
@client_command
def versions_list_command(limit: int, workspace: str, profile: str, as_json: bool) -> None:
    """List config versions, newest first."""
    with open_client(profile) as client:
        versions = client.list_versions(workspace, limit=limit)
    if as_json:
        print_json([v.raw for v in versions])
        return
    if not versions:
        click.echo(f"no versions in workspace {workspace!r}")
        return
    table = Table("version", "created", "author", "digest", "message", title=None)
    table.columns[4].overflow = "fold"
    for i, v in enumerate(versions):
        number = f"{v.number} (latest)" if i == 0 else str(v.number)
        table.add_row(number, timestamp(v.created_at), v.author, v.digest[:12], v.message)
    console().print(table)


@click.command("show")
@click.argument("number", type=click.IntRange(min=1))
@workspace_option
@profile_option
@json_option
@client_command
def versions_show_command(number: int, workspace: str, profile: str, as_json: bool) -> None:
    """Show one version: who made it, when, its digest, signature and desired state."""
    with open_client(profile) as client:
        version = client.get_version(workspace, number)
    if as_json:
        print_json(version.raw)
        return
    out = console()
    out.print(f"version {version.number} of workspace {version.workspace}")
    out.print(f"  created  {timestamp(version.created_at)} by {version.author}")
    out.print(f"  message  {version.message}")
    out.print(f"  digest   {version.digest}")
    out.print(f"  parent   {version.parent_digest or '-'}")
    out.print(f"  key id   {version.key_id or '-'}")
    out.print("state:")
    text = yaml.safe_dump(version.state or {}, sort_keys=False, default_flow_style=False)
    for line in text.splitlines():
        out.print(f"  {line}")


@click.command("rollback")
@click.argument("number", type=click.IntRange(min=1))
@click.option("--message", "-m", help="Message recorded with the new version.")
@workspace_option
@profile_option
@json_option
@client_command
def rollback_command(
    number: int, message: str | None, workspace: str, profile: str, as_json: bool
) -> None:
    """Roll back to version NUMBER: a new version with its state (history is kept)."""
    with open_client(profile) as client:
        result = client.rollback(workspace, number, message=message)
    if as_json:
        print_json(result.raw)
        return
    if result.created:
        click.echo(
            f"rolled back: version {result.number} ({result.digest[:12]}) has the state of "
            f"version {number}; follow it with: {_watch_command(workspace, profile)}"
        )
    else:
        click.echo(f"nothing to do: the latest version {result.number} has that state already")


# ---------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------


def client_versions_group() -> click.Group:
    """The ``versions`` group: ``verify`` plus ``list`` and ``show`` (``nxmesh versions``
    alone lists, taking list's options: ``nxmesh versions --json``).

    A new group each call, leaving `nxmesh.cli.versions_cmd.versions_group` as it is:
    `build_cli` may run many times in one process (tests).
    """
    from nxmesh.cli.versions_cmd import versions_group

    return ListByDefaultGroup(
        versions_group.name,
        commands=[
            *versions_group.commands.values(),
            versions_list_command,
            versions_show_command,
        ],
        help="The config version history: list, show, verify (bare: list, with list's options).",
    )
