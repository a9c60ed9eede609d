"""``nxmesh validate FILE...``: check desired-state files without touching anything."""

from __future__ import annotations

import json
from pathlib import Path

import click

from nxmesh.cli.context import CliContext, pass_cli
from nxmesh.core.errors import Problem, ValidationError
from nxmesh.core.loader import load_state_files
from nxmesh.core.policy import enforce_policy

EXIT_INVALID = 1


@click.command("validate")
@click.argument(
    "files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path)
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_cli
def validate_command(ctx: CliContext, files: tuple[Path, ...], as_json: bool) -> None:
    """Validate desired-state FILES (YAML or JSON); exit 1 listing every problem."""
    warnings: list[Problem] = []
    try:
        state = load_state_files(list(files))
        warnings = enforce_policy(ctx.pm, state)
    except ValidationError as exc:
        _report(exc.problems, exc.source, as_json=as_json, ok=False)
        raise SystemExit(EXIT_INVALID) from None
    summary = {
        "sites": len(state.sites),
        "upstreams": len(state.upstreams),
        "certificates": len(state.certificates),
    }
    if as_json:
        click.echo(json.dumps({"valid": True, "summary": summary, "problems": _dicts(warnings)}))
        return
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    names = ", ".join(str(f) for f in files)
    click.echo(
        f"valid: {names} ({summary['sites']} sites, {summary['upstreams']} upstreams, "
        f"{summary['certificates']} certificates)"
    )


def _dicts(problems: list[Problem]) -> list[dict[str, str]]:
    return [{"path": p.path, "message": p.message, "severity": p.severity} for p in problems]


def _report(problems: list[Problem], source: str | None, *, as_json: bool, ok: bool) -> None:
    if as_json:
        click.echo(json.dumps({"valid": ok, "source": source, "problems": _dicts(problems)}))
        return
    prefix = f"{source}: " if source else ""
    noun = "problem" if len(problems) == 1 else "problems"
    click.echo(f"invalid: {len(problems)} {noun}", err=True)
    for problem in problems:
        click.echo(f"  {prefix}{problem}", err=True)
