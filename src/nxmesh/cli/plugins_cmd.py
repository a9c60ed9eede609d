"""``nxmesh plugins``: what is loaded, from where, doing what."""

from __future__ import annotations

import json
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from nxmesh.cli.context import CliContext, pass_cli
from nxmesh.core.errors import NxMeshError
from nxmesh.core.pluginmanager import NxMeshPluginManager
from nxmesh.core.registry import ProviderRegistries


def describe_plugins(pm: NxMeshPluginManager) -> dict[str, Any]:
    """Every registered plugin with its origin, hooks and providers, plus load errors."""
    errors: list[dict[str, str | None]] = [
        {"entry_point": e.entry_point, "distribution": e.distribution, "error": e.reason}
        for e in pm.load_errors
    ]
    try:
        registries: ProviderRegistries | None = ProviderRegistries.collect(pm)
    except NxMeshError as exc:  # e.g. a duplicate provider name: show it, still list plugins
        registries = None
        errors.append({"entry_point": None, "distribution": None, "error": str(exc)})
    plugins = []
    for name, _plugin in sorted(pm.list_name_plugin()):
        if name is None or pm.is_blocked(name):
            continue
        info = pm.plugin_info.get(name)
        providers = registries.of_plugin(name) if registries else []
        plugins.append(
            {
                "name": name,
                "distribution": info.distribution if info else None,
                "version": info.version if info else None,
                "builtin": info.builtin if info else False,
                "hooks": pm.hooks_of(name),
                "providers": [{"kind": p.kind, "name": p.name} for p in providers],
            }
        )
    return {"plugins": plugins, "errors": errors, "warnings": list(pm.warnings)}


@click.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_cli
def plugins_command(ctx: CliContext, as_json: bool) -> None:
    """List loaded plugins: distribution, version, hooks and providers."""
    report = describe_plugins(ctx.pm)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        console = Console()
        table = Table()
        # The plugin's full name: what NXMESH_DISABLE_PLUGINS takes, never cut short.
        width = max((len(p["name"]) for p in report["plugins"]), default=6)
        table.add_column("plugin", no_wrap=True, min_width=width)
        for heading in ("distribution", "built-in", "hooks", "providers"):
            table.add_column(heading)
        for p in report["plugins"]:
            table.add_row(
                p["name"],
                f"{p['distribution']} {p['version']}" if p["distribution"] else "-",
                "yes" if p["builtin"] else "no",
                "\n".join(h.removeprefix("nxmesh_") for h in p["hooks"]),
                "\n".join(f"{x['kind']}:{x['name']}" for x in p["providers"]) or "-",
            )
        console.print(table)
        for err in report["errors"]:
            console.print(f"[red]error:[/red] {err['error']}", highlight=False)
        for warning in report["warnings"]:
            console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)
    if report["errors"]:
        raise SystemExit(1)
