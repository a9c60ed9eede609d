"""``nxmesh demo``: master + agent + real nginx + a backend on loopback, end to end.

See `nxmesh.demo` for what it does. Exit 0 when the page was served through nginx and the
change rolled out, 1 when the demo failed (the message says why; logs are kept), 130 on
Ctrl-C before it finished. ``--json`` prints a summary document on stdout and the
narration on stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console

from nxmesh.cli.client_support import print_json

__all__ = ["demo_command"]

EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


@click.command("demo")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".nxmesh-demo"),
    show_default=True,
    help="Where the demo keeps its state and logs.",
)
@click.option("--web-port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port nginx serves the site on, on 127.0.0.1 (0: any free port).")  # fmt: skip
@click.option("--api-port", type=click.IntRange(0, 65535), default=8470, show_default=True,
              help="Port of the master API on 127.0.0.1 (0: any free port).")  # fmt: skip
@click.option("--backend-port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port of the demo's backend app on 127.0.0.1 (0: any free port).")  # fmt: skip
@click.option(
    "--site",
    "site_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Desired state to start from. Default: examples/quickstart/site.yaml.",
)
@click.option("--nginx", "nginx_binary", default="nginx", show_default=True, metavar="PATH",
              help="The nginx binary.")  # fmt: skip
@click.option("--keep-running", is_flag=True, help="Keep everything up until Ctrl-C.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=60.0,
    show_default=True,
    help="Seconds each wait (master, enrollment, rollout) may take.",
)
@click.option("--json", "as_json", is_flag=True, help="Summary as JSON on stdout.")
def demo_command(
    directory: Path,
    web_port: int,
    api_port: int,
    backend_port: int,
    site_file: Path | None,
    nginx_binary: str,
    keep_running: bool,
    timeout: float,
    as_json: bool,
) -> None:
    """Run the whole thing locally: a master on embedded SQLite, an agent supervising a
    real nginx, a backend app; apply the quickstart site, fetch it through nginx, roll
    out a change and watch it go live. Everything stops and is cleaned up at the end
    (with --keep-running: at Ctrl-C)."""
    from nxmesh.core.errors import NxMeshError
    from nxmesh.demo import DemoOptions, run_demo

    options = DemoOptions(
        directory=directory,
        web_port=web_port,
        api_port=api_port,
        backend_port=backend_port,
        site_file=site_file,
        nginx_binary=nginx_binary,
        keep_running=keep_running,
        timeout=timeout,
    )
    # Narration goes to stderr with --json, so stdout holds the document only.
    out = Console(stderr=as_json, highlight=False, soft_wrap=True, markup=False)
    try:
        result = run_demo(options, out)
    except NxMeshError as exc:  # DemoError, or the master refusing the site (ClientError)
        click.echo(f"\ndemo failed: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    except KeyboardInterrupt:
        click.echo("\ninterrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    if as_json:
        print_json(result.to_json())
    else:
        out.print("\ndemo done: the page was served through nginx and the change rolled out")
