"""What a running ``nxmesh-agent`` holds in memory, for tests that guard its footprint.

An agent's idle PSS is mostly the code of the modules it imported. `agent_with_module_dump`
gives the command that runs the agent daemon plus a thread that, once a file appears,
writes the names of the modules the process holds; `held_modules` waits for that list.
Plugin authors can check that their plugin does not pull a heavy library into agents.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["agent_with_module_dump", "held_modules"]

_WRAPPER = """
import sys, threading, time
from pathlib import Path

ask, out = Path(sys.argv.pop()), Path(sys.argv.pop())

def dump():
    while not ask.exists():
        time.sleep(0.02)
    held = sorted(name for name, module in list(sys.modules.items()) if module is not None)
    out.with_suffix(".tmp").write_text("\\n".join(held))
    out.with_suffix(".tmp").rename(out)

threading.Thread(target=dump, daemon=True).start()
from nxmesh.agent_daemon import main
main(sys.argv[1:])
"""


def agent_with_module_dump(args: list[str], out: Path) -> list[str]:
    """``nxmesh-agent ARGS`` (this interpreter) that writes its modules to `out` once
    `held_modules` asks for them."""
    return [sys.executable, "-c", _WRAPPER, *args, str(out), str(_ask_file(out))]


def held_modules(out: Path, *, alive: Callable[[], bool], timeout: float = 30.0) -> set[str]:
    """Ask the agent started by `agent_with_module_dump` for its modules and wait for them.

    :param alive: whether the agent still runs (a dead one fails at once, not at timeout).
    """
    _ask_file(out).touch()
    deadline = time.monotonic() + timeout
    while not out.exists():
        if not alive():
            raise AssertionError("the agent exited before writing its modules")
        if time.monotonic() > deadline:
            raise AssertionError("the agent never wrote its modules")
        time.sleep(0.05)
    return set(out.read_text().split())


def _ask_file(out: Path) -> Path:
    return out.with_suffix(".ask")
