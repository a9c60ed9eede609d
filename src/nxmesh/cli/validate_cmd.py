"""``nxmesh validate FILE...``: check desired-state files without touching anything.

Three layers, each reported in its own words: the model and policy checks (every problem
with its file and field), rendering through the configured renderer and templates, and —
when nginx is installed and ``--no-nginx`` is not given — ``nginx -t`` on the rendered
bundle staged in a throwaway scratch prefix, never on a live tree. Certificates the
state references but that do not exist yet are stood in for by a self-signed pair
created in the scratch directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from nxmesh.cli.context import CliContext, pass_cli
from nxmesh.cli.render_cmd import (
    EXIT_INVALID,
    CannotRunError,
    build_renderer,
    load_checked_state,
    problem_dicts,
    render_state,
)
from nxmesh.core.errors import ConfigurationError
from nxmesh.core.settings import load_settings
from nxmesh.nginx_check import (
    DEFAULT_TIMEOUT,
    NginxNotFoundError,
    check_bundle,
    find_nginx,
    nginx_warnings,
)

__all__ = ["EXIT_INVALID", "validate_command"]


def _nginx_binary(ctx: CliContext, given: str | None) -> str:
    if given is not None:
        return given
    try:
        return load_settings(ctx.pm, path=ctx.config_path).agent.nginx_binary
    except ConfigurationError:
        return "nginx"  # build_renderer has already reported unusable settings


@click.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--no-nginx", is_flag=True, help="Skip nginx -t: check the model and rendering only.")
@click.option(
    "--nginx",
    "nginx_binary",
    metavar="PATH",
    help="nginx binary for nginx -t (default: the agent.nginx_binary setting; when that "
    "is not installed, nginx -t is skipped with a note).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_TIMEOUT,
    show_default=True,
    help="Seconds nginx -t may take.",
)
@click.option(
    "--template-dir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="Template overrides (default: the renderer.template_dir setting).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_cli
def validate_command(
    ctx: CliContext,
    files: tuple[Path, ...],
    no_nginx: bool,
    nginx_binary: str | None,
    timeout: float,
    template_dir: Path | None,
    as_json: bool,
) -> None:
    """Validate desired-state FILES (YAML or JSON), render them and run nginx -t.

    Exit 1 listing every problem, or with nginx's own message when nginx -t fails.
    """
    state, warnings = load_checked_state(ctx, files, as_json=as_json)
    bundle = render_state(build_renderer(ctx, template_dir), state)
    summary = {
        "sites": len(state.sites),
        "upstreams": len(state.upstreams),
        "certificates": len(state.certificates),
        "streams": len(state.streams),
    }

    nginx: dict[str, Any] = {"ran": False, "ok": None, "output": "", "skipped": None}
    if no_nginx:
        nginx["skipped"] = "--no-nginx"
    else:
        try:
            binary = find_nginx(_nginx_binary(ctx, nginx_binary))
        except NginxNotFoundError as exc:
            if nginx_binary is not None:  # asked for by name: missing is an error
                raise CannotRunError(str(exc)) from None
            nginx["skipped"] = str(exc)
        else:
            result = check_bundle(
                bundle, binary=binary, timeout=timeout, placeholder_certificates=True
            )
            nginx.update(ran=True, ok=result.ok, output=result.message)

    valid = nginx["ok"] is not False
    if as_json:
        click.echo(
            json.dumps(
                {
                    "valid": valid,
                    "summary": summary,
                    "digest": bundle.digest,
                    "nginx": nginx,
                    "problems": problem_dicts(warnings),
                }
            )
        )
    else:
        for warning in warnings:
            click.echo(f"warning: {warning}", err=True)
        names = ", ".join(str(f) for f in files)
        if not valid:
            click.echo(f"invalid: nginx -t rejected the bundle rendered from {names}:", err=True)
            for line in nginx["output"].splitlines():
                click.echo(f"  {line}", err=True)
        else:
            if nginx["skipped"] is not None and not no_nginx:
                click.echo(f"note: nginx -t skipped: {nginx['skipped']}", err=True)
            # nginx's own warnings (an oversized hash, a directive it ignores) pass -t
            # but say something an operator should read; once each, without the time.
            for text in nginx_warnings(nginx["output"]):
                click.echo(f"warning: nginx -t: {text}", err=True)
            checked = "nginx -t ok" if nginx["ran"] else "nginx -t skipped"
            click.echo(
                f"valid: {names} ({summary['sites']} sites, {summary['upstreams']} upstreams, "
                f"{summary['certificates']} certificates, {summary['streams']} streams; "
                f"{checked})"
            )
    if not valid:
        raise SystemExit(EXIT_INVALID)
