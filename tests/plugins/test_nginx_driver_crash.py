"""``kill -9`` of the applying process at every pipeline stage leaves a consistent tree.

Each case runs the apply in a child process that stops at a checkpoint
(``NXMESH_TEST_PAUSE_AT``), kills it with SIGKILL there, and then checks what a crash
must never break: ``current`` points at one *whole* release, either the old or the new
one; and after the next start's `recover` nginx serves exactly what ``current`` holds,
and the driver applies normally again.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from nxmesh.agent.fsutil import read_tree
from nxmesh.agent.harness import NginxStack
from nxmesh.core.bundle import bundle_digest
from nxmesh.plugins.nginx_driver import ENV_PAUSE_AT, ENV_PAUSE_FILE, STAGES, ReleaseStore

pytestmark = pytest.mark.nginx

SCRIPT = Path(__file__).with_name("crash_apply.py")
APPLY_STAGES = [s for s in STAGES if s != "rolled-back"]


@pytest.fixture
def stack(nginx_binary: str, tmp_path: Path) -> Iterator[NginxStack]:
    """An nginx (daemonized, so it outlives each event loop) serving "old"."""
    stack = NginxStack(root=tmp_path / "nginx", nginx_binary=nginx_binary, supervise=False)

    async def first() -> None:
        state = stack.state("old")
        report = await stack.driver.apply(stack.update(state), stack.render(state))
        assert report.outcome == "applied", report.message

    anyio.run(first)
    try:
        yield stack
    finally:
        anyio.run(stack.aclose)


def _crash_at(stack: NginxStack, stage: str, backend: str, *extra: str) -> None:
    """Run an apply of "new" in a child process and SIGKILL it at `stage`."""
    marker = stack.root / f"paused-{stage}"
    env = {**os.environ, ENV_PAUSE_AT: stage, ENV_PAUSE_FILE: str(marker)}
    args = [
        sys.executable,
        str(SCRIPT),
        str(stack.root),
        stack.nginx_binary,
        str(stack.web_port),
        str(stack.status_port),
        "new",
        backend,
        *extra,
    ]
    child = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not marker.exists():
            if child.poll() is not None or time.monotonic() > deadline:
                output = child.stdout.read().decode() if child.stdout else ""
                pytest.fail(f"apply did not pause at {stage!r}: {output}")
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout:
            child.stdout.close()


def _whole_release(stack: NginxStack) -> str:
    """The live release's digest, after checking its files hash to exactly that digest."""
    store = ReleaseStore(stack.root)
    name = store.current_name()
    assert name is not None, "current does not point at a release"
    digest = store.digest_of(name)
    assert bundle_digest(read_tree(stack.root / "current")) == digest, "torn live tree"
    return digest


def _digests(stack: NginxStack) -> dict[str, str]:
    return {body: stack.render(stack.state(body)).digest for body in ("old", "new")}


async def _restart_and_check(stack: NginxStack) -> str:
    """What a restarted agent does first; returns the body nginx then serves."""
    await stack.driver.recover()
    served = await stack.body()
    live = _whole_release(stack)
    assert live == _digests(stack)[served], "nginx serves something else than current"
    assert not (stack.root / "apply.journal").exists()
    assert not list((stack.root / "releases").glob(".staging-*"))
    assert not list(stack.root.glob(".current.tmp-*"))
    state = stack.state("after")
    report = await stack.driver.apply(stack.update(state), stack.render(state))
    assert report.outcome == "applied", report.message
    assert await stack.body() == "after"
    return served


class TestKillNineDuringApply:
    @pytest.mark.parametrize("stage", APPLY_STAGES)
    def test_tree_is_whole_and_consistent_after_restart(
        self, stack: NginxStack, stage: str
    ) -> None:
        """Killed at any stage: current is the whole old or new tree; recovery agrees."""
        backend = "trio" if APPLY_STAGES.index(stage) % 2 else "asyncio"
        _crash_at(stack, stage, backend)
        assert _whole_release(stack) in _digests(stack).values()
        if stage in ("staged", "tested", "swap-prepared"):
            assert _whole_release(stack) == _digests(stack)["old"]
        served = anyio.run(_restart_and_check, stack)
        # An unconfirmed swap is undone at restart: the old tree serves until the
        # update is applied again (the master resends it, the state file is re-read).
        assert served == "old"

    def test_killed_mid_rollback_recovers_to_the_old_tree(self, stack: NginxStack) -> None:
        """Killed after flipping back but before reloading: the old tree stays live."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            _crash_at(stack, "rolled-back", "asyncio", str(taken.getsockname()[1]))
        assert _whole_release(stack) == _digests(stack)["old"]
        assert anyio.run(_restart_and_check, stack) == "old"
