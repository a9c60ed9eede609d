"""``nxmesh config show``: the effective settings, secrets redacted."""

from __future__ import annotations

import json

import click

from nxmesh.cli.context import CliContext, pass_cli
from nxmesh.core.errors import ConfigurationError
from nxmesh.core.settings import load_settings, settings_as_dict


@click.group("config")
def config_group() -> None:
    """Inspect settings."""


@config_group.command("show")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_cli
def show_command(ctx: CliContext, as_json: bool) -> None:
    """Print the effective settings (file + NXMESH_* environment), secrets redacted."""
    try:
        settings = load_settings(ctx.pm, path=ctx.config_path)
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from None
    data = settings_as_dict(settings, redact=True)
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
        return
    for key, value in _flatten(data):
        click.echo(f"{key} = {json.dumps(value, default=str)}")


def _flatten(data: dict[str, object], prefix: str = "") -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = []
    for key in sorted(data):
        value = data[key]
        if isinstance(value, dict):
            rows.extend(_flatten(value, f"{prefix}{key}."))
        else:
            rows.append((f"{prefix}{key}", value))
    return rows
