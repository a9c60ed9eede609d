"""``nxmesh versions verify``: check a workspace's stored history for tampering.

The command reads every version of a workspace from the storage backend chosen by URL
scheme, newest first page by page, and runs `nxmesh.config.versions.verify_chain` with
the master's public key. Only the public key is needed: verifying never requires the
master key, so an auditor can run it on a copy of the database.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import attrs
import click

from nxmesh.cli.context import CliContext, pass_cli
from nxmesh.config.versions import verify_chain
from nxmesh.core.errors import NxMeshError, Problem, ValidationError
from nxmesh.core.logging import redact_text
from nxmesh.core.registry import ProviderRegistries, from_settings_or
from nxmesh.core.settings import Settings, load_settings
from nxmesh.crypto.signing import SIGNING_PUBLIC_KEY_FILE, VerifyKey

if TYPE_CHECKING:
    from nxmesh.core.interfaces import StorageBackend
    from nxmesh.core.model import ConfigVersion

__all__ = ["EXIT_BROKEN", "EXIT_ERROR", "PAGE_SIZE", "versions_group"]

EXIT_BROKEN = 1
"""Exit status when the chain has problems (tampering or loss)."""

EXIT_ERROR = 2
"""Exit status when verification could not run (no key, storage unreachable...)."""

PAGE_SIZE = 500
"""Versions fetched per storage call."""


class _CannotVerify(click.ClickException):
    exit_code = EXIT_ERROR


@click.group("versions")
def versions_group() -> None:
    """Inspect the config version history."""


@versions_group.command("verify")
@click.option(
    "--storage",
    "storage_url",
    metavar="URL",
    help="Storage URL (sqlite:///..., postgresql://...). Default: the configured storage.",
)
@click.option("-w", "--workspace", help="Workspace to verify. Default: the configured workspace.")
@click.option(
    "--public-key",
    type=click.Path(dir_okay=False, path_type=Path),
    help=f"The master's Ed25519 public key (PEM). Default: <state_dir>/{SIGNING_PUBLIC_KEY_FILE}.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_cli
def verify_command(
    ctx: CliContext,
    storage_url: str | None,
    workspace: str | None,
    public_key: Path | None,
    as_json: bool,
) -> None:
    """Check that no stored version was edited, dropped, duplicated or reordered.

    Exit 0 when the chain is intact, 1 listing every problem otherwise, 2 when the check
    could not run.
    """
    settings: Settings | None = None
    if storage_url is None or workspace is None or public_key is None:
        # Settings are read only when a flag is missing, so a broken config file does not
        # stop an auditor who passes everything explicitly.
        try:
            settings = load_settings(ctx.pm, path=ctx.config_path)
        except NxMeshError as exc:
            raise _CannotVerify(str(exc)) from None
    if storage_url is None:
        assert settings is not None
        storage_url = settings.effective_storage_url()
    if workspace is None:
        assert settings is not None
        workspace = settings.workspace
    if public_key is None:
        assert settings is not None
        public_key = settings.state_dir / SIGNING_PUBLIC_KEY_FILE

    verify_key = _load_verify_key(public_key)
    try:
        backend_cls = ProviderRegistries.collect(ctx.pm)["storage"].by_scheme(storage_url)
    except NxMeshError as exc:
        raise _CannotVerify(str(exc)) from None
    # With the settings read, the backend gets its plugin's section too (pool, timeouts).
    backend = (
        from_settings_or(
            backend_cls,
            attrs.evolve(settings, storage_url=storage_url),
            lambda: backend_cls(storage_url),
        )
        if settings is not None
        else backend_cls(storage_url)
    )
    # Opening a file-backed store creates and migrates it: verifying a mistyped path
    # would then report an empty, "intact" history instead of the mistake.
    path = getattr(backend, "path", None)
    if isinstance(path, Path) and not path.exists():
        raise _CannotVerify(f"no database at {path}; check --storage")
    try:
        versions = anyio.run(_fetch_all, backend, workspace)
    except ValidationError as exc:
        # A row the model refuses to load was edited by hand (or by an attacker).
        _report(
            workspace,
            0,
            [Problem("storage", f"a stored version is invalid: {exc}")],
            as_json=as_json,
        )
        raise SystemExit(EXIT_BROKEN) from None
    except Exception as exc:  # any backend failure is reported, not traced
        where = redact_text(storage_url)
        raise _CannotVerify(f"cannot read versions from {where}: {exc}") from None

    problems = verify_chain(versions, verify_key)
    _report(workspace, len(versions), problems, as_json=as_json, key_id=verify_key.key_id)
    if problems:
        raise SystemExit(EXIT_BROKEN)


def _load_verify_key(path: Path) -> VerifyKey:
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        raise _CannotVerify(
            f"public key {path} not found; pass --public-key FILE (the master writes "
            f"{SIGNING_PUBLIC_KEY_FILE} into its state directory on first start)"
        ) from None
    except OSError as exc:
        raise _CannotVerify(f"cannot read public key {path}: {exc.strerror}") from None
    try:
        return VerifyKey.from_pem(pem)
    except NxMeshError as exc:
        raise _CannotVerify(f"{path}: {exc}") from None


async def _fetch_all(backend: StorageBackend, workspace: str) -> list[ConfigVersion]:
    """Every version of `workspace`, paging backwards with ``before=``."""
    await backend.open()
    try:
        found: list[ConfigVersion] = []
        before: int | None = None
        while True:
            page = await backend.list_versions(workspace, limit=PAGE_SIZE, before=before)
            found.extend(page)
            if len(page) < PAGE_SIZE:
                return found
            lowest = min(v.number for v in page)
            if before is not None and lowest >= before:
                return found  # a backend ignoring `before` must not loop forever
            before = lowest
    finally:
        with anyio.move_on_after(10, shield=True):
            await backend.aclose()


def _report(
    workspace: str,
    count: int,
    problems: Sequence[Problem],
    *,
    as_json: bool,
    key_id: str | None = None,
) -> None:
    if as_json:
        click.echo(
            json.dumps(
                {
                    "workspace": workspace,
                    "versions": count,
                    "key_id": key_id,
                    "intact": not problems,
                    "problems": [{"path": p.path, "message": p.message} for p in problems],
                }
            )
        )
        return
    if problems:
        noun = "problem" if len(problems) == 1 else "problems"
        click.echo(f"chain broken: {len(problems)} {noun} in workspace {workspace!r}", err=True)
        for problem in problems:
            click.echo(f"  {problem}", err=True)
    elif count == 0:
        click.echo(f"no versions in workspace {workspace!r} (is that the workspace meant?)")
    else:
        noun = "version" if count == 1 else "versions"
        click.echo(f"intact: {count} {noun} in workspace {workspace!r}, signed by key {key_id}")
