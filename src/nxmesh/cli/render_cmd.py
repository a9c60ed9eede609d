"""``nxmesh render FILE... -o DIR``: write the nginx bundle a desired state renders to.

Also home of what ``nxmesh validate`` shares with it: loading and checking state files,
reporting problems, and building the configured renderer.

The output directory gets a manifest, ``.nxmesh-bundle.json`` (digests and file list).
Rendering again into a directory holding one replaces the previous bundle, removing files
it had that the new one has not (a deleted site must not linger in ``conf.d/``). Any
other non-empty directory is refused unless ``--force``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path, PurePosixPath

import attrs
import click

from nxmesh.cli.context import CliContext, pass_cli
from nxmesh.core.bundle import Bundle
from nxmesh.core.errors import ConfigurationError, NxMeshError, Problem, ValidationError
from nxmesh.core.interfaces import Renderer
from nxmesh.core.loader import load_state_files
from nxmesh.core.model import DesiredState
from nxmesh.core.policy import enforce_policy
from nxmesh.core.settings import Settings, load_settings
from nxmesh.plugins.render_nginx import config_digest, renderer_for

__all__ = [
    "EXIT_INVALID",
    "EXIT_USAGE",
    "MANIFEST",
    "CannotRunError",
    "InvalidInputError",
    "build_renderer",
    "load_checked_state",
    "problem_dicts",
    "render_command",
    "render_state",
    "report_problems",
    "write_bundle_dir",
]

EXIT_INVALID = 1
"""Exit status when the input (state, templates, nginx -t) is wrong."""
EXIT_USAGE = 2
"""Exit status when the command could not do its work (settings, output directory)."""

MANIFEST = ".nxmesh-bundle.json"
"""File marking a directory as an nxmesh bundle: digests and the files written."""

_PRIVATE = (".key", ".pem")


class CannotRunError(click.ClickException):
    """The command could not do its work (settings, output directory, missing binary)."""

    exit_code = EXIT_USAGE


class InvalidInputError(click.ClickException):
    """The input is wrong: a template fails, nginx -t rejects the bundle."""

    exit_code = EXIT_INVALID


# ---------------------------------------------------------------------------------------
# Shared with `nxmesh validate`
# ---------------------------------------------------------------------------------------


def problem_dicts(problems: list[Problem]) -> list[dict[str, str]]:
    """Problems as JSON-ready dicts."""
    return [{"path": p.path, "message": p.message, "severity": p.severity} for p in problems]


def report_problems(problems: list[Problem], source: str | None, *, as_json: bool) -> None:
    """Print every problem (stderr, or one JSON object on stdout)."""
    if as_json:
        payload = {"valid": False, "source": source, "problems": problem_dicts(problems)}
        click.echo(json.dumps(payload))
        return
    prefix = f"{source}: " if source else ""
    noun = "problem" if len(problems) == 1 else "problems"
    click.echo(f"invalid: {len(problems)} {noun}", err=True)
    for problem in problems:
        click.echo(f"  {prefix}{problem}", err=True)


def load_checked_state(
    ctx: CliContext, files: tuple[Path, ...], *, as_json: bool
) -> tuple[DesiredState, list[Problem]]:
    """Load, model-check and policy-check `files`; exit 1 listing problems when invalid.

    Returns the state and the warnings: the model's (`check_state`), then the policy
    plugins', as the master reports them.
    """
    try:
        state = load_state_files(list(files))
        warnings = enforce_policy(ctx.pm, state)
    except ValidationError as exc:
        report_problems(exc.problems, exc.source, as_json=as_json)
        raise SystemExit(EXIT_INVALID) from None
    except OSError as exc:
        raise CannotRunError(f"cannot read {exc.filename}: {exc.strerror}") from None
    return state, warnings


def build_renderer(ctx: CliContext, template_dir: Path | None = None) -> Renderer:
    """The configured renderer, with this host's knobs as an agent here would have them
    (``agent.listen_address``, ``agent.upstream_ca_file``...); `template_dir` overrides
    the ``renderer.template_dir`` setting."""
    from nxmesh.agent.layout import render_settings_of

    try:
        settings: Settings = load_settings(ctx.pm, path=ctx.config_path)
        section = settings.renderer
        if template_dir is not None:
            section = attrs.evolve(section, template_dir=template_dir)
        return renderer_for(ctx.pm, section, render_settings=render_settings_of(settings))
    except ConfigurationError as exc:
        raise CannotRunError(str(exc)) from None
    except NxMeshError as exc:  # e.g. a template override that does not compile
        raise InvalidInputError(str(exc)) from None


def render_state(renderer: Renderer, state: DesiredState) -> Bundle:
    """Render, turning renderer errors (bad template override...) into exit status 1."""
    try:
        return renderer.render(state)
    except NxMeshError as exc:
        raise InvalidInputError(str(exc)) from None


# ---------------------------------------------------------------------------------------
# Writing a bundle directory
# ---------------------------------------------------------------------------------------


def _previous_files(output: Path) -> list[str] | None:
    """Files listed by the manifest in `output`, or None when it holds no bundle."""
    try:
        manifest = json.loads((output / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    listed = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(listed, list):
        return None
    # The manifest is only trusted to name files inside the directory.
    return [
        f
        for f in listed
        if isinstance(f, str)
        and not PurePosixPath(f).is_absolute()
        and ".." not in PurePosixPath(f).parts
    ]


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bundle_dir(bundle: Bundle, output: Path, *, force: bool = False) -> list[str]:
    """Write `bundle` into `output` with its manifest; returns stale files removed.

    :raises click.ClickException: `output` is a non-empty directory without a manifest
        and `force` is false, or is not a directory.
    """
    if output.exists() and not output.is_dir():
        raise CannotRunError(f"{output} exists and is not a directory")
    previous = _previous_files(output) if output.is_dir() else None
    if previous is None and output.is_dir() and any(output.iterdir()) and not force:
        raise CannotRunError(
            f"{output} is not empty and holds no previous nxmesh bundle ({MANIFEST}); "
            "choose an empty directory or pass --force"
        )
    output.mkdir(parents=True, exist_ok=True)
    for rel, data in bundle.files.items():
        _write_atomic(output / rel, data, 0o600 if rel.endswith(_PRIVATE) else 0o644)
    removed = sorted(set(previous or ()) - set(bundle.files))
    for rel in removed:
        (output / rel).unlink(missing_ok=True)
    manifest = {
        "generator": "nxmesh",
        "digest": bundle.digest,
        "config_digest": config_digest(bundle.files),
        "files": sorted(bundle.files),
    }
    _write_atomic(output / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode(), 0o644)
    return removed


# ---------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------


@click.command("render")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to write the bundle into (nginx.conf at its top).",
)
@click.option(
    "--force", is_flag=True, help="Write into a non-empty directory that holds no bundle."
)
@click.option(
    "--template-dir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="Template overrides (default: the renderer.template_dir setting).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_cli
def render_command(
    ctx: CliContext,
    files: tuple[Path, ...],
    output: Path,
    force: bool,
    template_dir: Path | None,
    as_json: bool,
) -> None:
    """Render desired-state FILES into an nginx configuration tree in DIR; print its digest.

    The digest covers every file; the config digest (served by the status server at
    /nxmesh/version) covers all but conf.d/status.conf.
    """
    state, warnings = load_checked_state(ctx, files, as_json=as_json)
    bundle = render_state(build_renderer(ctx, template_dir), state)
    removed = write_bundle_dir(bundle, output, force=force)
    digest_of_config = config_digest(bundle.files)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "output": str(output),
                    "files": sorted(bundle.files),
                    "removed": removed,
                    "digest": bundle.digest,
                    "config_digest": digest_of_config,
                    "problems": problem_dicts(warnings),
                }
            )
        )
        return
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"rendered {len(bundle.files)} files to {output}")
    if removed:
        click.echo(f"removed {len(removed)} stale files: {', '.join(removed)}")
    click.echo(f"digest: {bundle.digest}")
    click.echo(f"config digest: {digest_of_config}")
