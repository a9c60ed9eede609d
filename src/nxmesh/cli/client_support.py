"""What the API-client commands share: options, the client, errors → exit codes, output.

Every client command takes ``--profile NAME`` (which stored login to use) and ``--json``
(machine-readable output on stdout), and runs its body through `client_command`, which
turns `nxmesh.client.ClientError`s into a message on stderr and the exit code the error
carries (see `nxmesh.client.errors`: 1 invalid/failed, 2 usage, 3 auth, 4 not
found/conflict, 5 master unreachable). With ``--json`` the error is a JSON document on
stderr, so stdout only ever holds results.

``nxmesh.client`` (and with it httpx) is imported when a command runs, not when the CLI
starts: ``nxmesh validate`` should not pay for an HTTP stack it does not use.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import re
import sys
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, ParamSpec, TypeVar

import click
from rich.console import Console

if TYPE_CHECKING:
    from nxmesh.client import Client, CredentialStore

__all__ = [
    "ListByDefaultGroup",
    "age",
    "client_command",
    "console",
    "credential_store",
    "err_console",
    "json_option",
    "labels_text",
    "open_client",
    "parse_duration",
    "parse_labels",
    "print_diff",
    "print_json",
    "profile_option",
    "timestamp",
    "workspace_option",
]

P = ParamSpec("P")
R = TypeVar("R")

EXIT_USAGE: Final = 2


def console() -> Console:
    """stdout; wide enough off a terminal that tables are not squeezed into 80 columns.

    Markup is off: names, messages and nginx's output (``[emerg]``) are printed as they
    are; styling goes through ``style=`` and `rich.text.Text`.
    """
    width = None if sys.stdout.isatty() else 160
    return Console(width=width, highlight=False, soft_wrap=True, markup=False)


def err_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True, markup=False)


profile_option = click.option(
    "--profile",
    default="default",
    show_default=True,
    metavar="NAME",
    help="Stored login to use (see nxmesh login).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
workspace_option = click.option(
    "--workspace", "-w", default="default", show_default=True, help="Workspace."
)


class ListByDefaultGroup(click.Group):
    """A group whose bare invocation is its ``list`` subcommand, options included.

    ``nxmesh agents`` is ``nxmesh agents list``, and so is ``nxmesh agents --json -w
    staging``: when no subcommand name comes first, ``list`` is put in front of the
    arguments. The group has no options of its own, so ``-h/--help`` still shows the
    group's help and an unknown word is still "No such command".
    """

    default_command: Final = "list"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("no_args_is_help", False)
        super().__init__(*args, **kwargs)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        bare = not args or (args[0].startswith("-") and args[0] not in ctx.help_option_names)
        # Shell completion parses resiliently: offer the subcommands, not list's options.
        if bare and not ctx.resilient_parsing and self.default_command in self.commands:
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True, default=str))


def client_command(fn: Callable[P, R]) -> Callable[P, R]:
    """Run a command body; a `ClientError` becomes a message and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        from nxmesh.client import ApiError, ClientError
        from nxmesh.core.errors import NxMeshError

        as_json = bool(kwargs.get("as_json"))
        try:
            return fn(*args, **kwargs)
        except ClientError as exc:
            if as_json:
                doc = exc.as_dict() if isinstance(exc, ApiError) else {"detail": str(exc)}
                click.echo(json.dumps({"error": doc}), err=True)
            else:
                _print_error(exc)
            sys.exit(exc.exit_code)
        except NxMeshError as exc:  # settings, local files: usage-level problems
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_USAGE)

    return wrapper


def _print_error(exc: Exception) -> None:
    from nxmesh.client import ApiError

    lines = str(exc).splitlines() or [type(exc).__name__]
    click.echo(f"error: {lines[0]}", err=True)
    for line in lines[1:]:
        click.echo(line, err=True)
    if isinstance(exc, ApiError) and exc.request_id and exc.status >= 500:
        click.echo(f"  (request id {exc.request_id} in the master's log)", err=True)


def credential_store() -> CredentialStore:
    from nxmesh.client import CredentialStore

    return CredentialStore.default()


def open_client(profile: str) -> Client:
    """A client for the stored `profile` (exit 3 with a hint when not logged in)."""
    from nxmesh.client import Client

    return Client.from_store(credential_store(), profile)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS: Final = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: str, option: str = "--ttl") -> float:
    """``3600``, ``90s``, ``15m``, ``1h``, ``7d`` → seconds; `click.BadParameter` naming
    `option` otherwise (parsed in the command body, click does not know which it was)."""
    match = _DURATION.match(value)
    if match is None:
        raise click.BadParameter(
            f"{value!r} is not a duration like 3600, 90s, 15m, 1h or 7d",
            param_hint=f"'{option}'",
        )
    return float(match[1]) * _UNITS[match[2]]


def parse_labels(values: tuple[str, ...], option: str = "--labels") -> dict[str, str]:
    """``k=v`` items (each may hold several, comma-separated) → a mapping;
    `click.BadParameter` naming `option` for an item that is not ``k=v``."""
    labels: dict[str, str] = {}
    for value in values:
        for item in filter(None, (part.strip() for part in value.split(","))):
            key, sep, val = item.partition("=")
            if not sep or not key:
                raise click.BadParameter(f"{item!r} is not key=value", param_hint=f"'{option}'")
            labels[key.strip()] = val.strip()
    return labels


def timestamp(ts: float | None) -> str:
    """A local date and time to the second, or ``-``."""
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def age(ts: float | None, now: float | None = None) -> str:
    """``12s ago``, ``5m ago``, ``3h ago``, ``2d ago`` or ``never``."""
    if not ts:
        return "never"
    seconds = max(0.0, (now or time.time()) - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def print_diff(out: Console, diff: str) -> None:
    """A unified diff, coloured like git's (plain text off a terminal)."""
    for line in diff.splitlines():
        style = None
        if line.startswith(("+++", "---")):
            style = "bold"
        elif line.startswith("+"):
            style = "green"
        elif line.startswith("-"):
            style = "red"
        elif line.startswith("@@"):
            style = "cyan"
        out.print(line, style=style)


def labels_text(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"
