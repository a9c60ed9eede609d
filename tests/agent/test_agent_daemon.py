"""`nxmesh-agent` (`nxmesh.agent_daemon`): ``nxmesh agent`` without rich in memory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nxmesh.agent_daemon import agent_argv


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], ["agent"]),
        (["--once", "--state", "s.yaml"], ["agent", "--once", "--state", "s.yaml"]),
        (["--config", "a.toml", "--once"], ["--config", "a.toml", "agent", "--once"]),
        (["--once", "--config=a.toml"], ["--config=a.toml", "agent", "--once"]),
        (["--version"], ["--version"]),
        (["--help"], ["agent", "--help"]),
    ],
)
def test_options_go_to_the_root_command_or_to_agent(argv: list[str], expected: list[str]) -> None:
    assert agent_argv(argv) == expected


def test_config_without_a_file_is_a_usage_error() -> None:
    with pytest.raises(ValueError, match="--config"):
        agent_argv(["--once", "--config"])
    done = _run("from nxmesh.agent_daemon import main; main(['--config'])")
    assert done.returncode == 2
    assert "'--config' requires an argument" in done.stderr


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )


def test_the_executable_is_nxmesh_agent_and_loads_no_rich() -> None:
    code = (
        "import sys\n"
        "from nxmesh.agent_daemon import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0, exc.code\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('rich', 'pygments')"
        " and sys.modules[m] is not None))\n"
    )
    done = _run(code)
    assert done.returncode == 0, done.stderr
    assert "Run the NxMesh agent" in done.stdout
    assert done.stdout.startswith("nxmesh-agent [--config FILE] [OPTIONS]")  # not only `agent`
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_tracebacks_are_still_logged_without_rich(fmt: str) -> None:
    """structlog falls back to plain tracebacks; secret keys and URL passwords in the
    exception's text are still redacted."""
    code = (
        "import sys\n"
        "from nxmesh.agent_daemon import keep_rich_out\n"
        "keep_rich_out()\n"
        "import structlog\n"
        "from nxmesh.core.logging import configure_logging\n"
        f"configure_logging('info', {fmt!r}, stream=sys.stdout)\n"
        "try:\n"
        "    raise ValueError('boom postgresql://nx:hunter2@db/nx password=hunter2')\n"
        "except ValueError:\n"
        "    structlog.get_logger('t').exception('failed', token='hunter2')\n"
        "assert sys.modules['rich'] is None\n"
    )
    done = _run(code)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "ValueError" in out
    assert "boom" in out
    assert "hunter2" not in out
    if fmt == "json":
        record = json.loads(out.strip().splitlines()[-1])
        assert record["event"] == "failed"
