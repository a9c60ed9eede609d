"""``nxmesh-agent``: the agent daemon's executable — ``nxmesh agent`` for deployments.

It takes the same options as ``nxmesh [--config FILE] agent ...`` and runs the same code;
what differs is what the process holds. structlog imports rich (pretty console
tracebacks) whenever it is installed, and it always is: the CLI's tables and Litestar
depend on it. NxMesh never renders logs with rich (`nxmesh.core.logging` formats
tracebacks as plain text so secrets can be redacted), and a daemon draws no tables, so
this entry point makes rich unavailable before anything imports structlog: about 3 MB
less per agent (an agent connected over gRPC: 42.7 → 39.5 MB PSS on the benchmark
machine). Logs are byte-for-byte the same.

This module imports nothing of NxMesh at import time: importing ``nxmesh.cli`` first
would import structlog, and with it rich.
"""

from __future__ import annotations

import sys

__all__ = ["agent_argv", "keep_rich_out", "main"]


def agent_argv(argv: list[str]) -> list[str]:
    """``[--config FILE] OPTIONS`` → ``[--config FILE] agent OPTIONS`` for the ``nxmesh`` CLI.

    ``--config`` (and ``--version``) belong to the root command; everything else goes to
    ``agent``.

    :raises ValueError: ``--config`` without a value.
    """
    root: list[str] = []
    rest: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--config":
            value = next(args, None)
            if value is None:
                raise ValueError("option '--config' requires an argument")
            root += [arg, value]
        elif arg.startswith("--config=") or arg == "--version":
            root.append(arg)
        else:
            rest.append(arg)
    if "--version" in root:
        return root
    return [*root, "agent", *rest]


def keep_rich_out() -> None:
    """Make ``import rich`` fail in this process unless it already happened.

    `None` in `sys.modules` is Python's documented way to make an import raise
    ModuleNotFoundError; structlog catches it and formats tracebacks as plain text, which
    NxMesh's log setup asks for anyway. A process that already holds rich keeps it.
    """
    # typeshed types sys.modules without the None the import system documents.
    sys.modules.setdefault("rich", None)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``nxmesh-agent``)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = agent_argv(argv)
    except ValueError as exc:
        print(f"Usage: nxmesh-agent [--config FILE] [OPTIONS]\nError: {exc}", file=sys.stderr)
        sys.exit(2)
    if "agent" in args and ("--help" in args or "-h" in args):
        # click's help below is the `nxmesh agent` command's: say how it maps here.
        print(
            "nxmesh-agent [--config FILE] [OPTIONS]: `nxmesh [--config FILE] agent [OPTIONS]`"
            "\n  --config FILE  the settings file (TOML)\n"
        )
    keep_rich_out()
    from nxmesh.cli import main as cli_main

    cli_main(args)
