"""Reading a pid file and stopping processes nginx-style: the helpers the orphaned-worker
cleanup and the demo's leftover-nginx cleanup share."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from nxmesh.agent.process import pid_alive, pid_in_file, quit_then_kill

_READY = "print(1, flush=True); import time; time.sleep(60)"
# Exits cleanly on SIGQUIT, as nginx does (gracefully).
_QUITS = "import signal, sys; signal.signal(signal.SIGQUIT, lambda *_: sys.exit(0)); " + _READY
# Ignores SIGQUIT: only SIGKILL stops it.
_STUBBORN = "import signal; signal.signal(signal.SIGQUIT, signal.SIG_IGN); " + _READY


def _start(code: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    proc.stdout.readline()  # its handler is installed
    return proc


class TestPidInFile:
    @pytest.mark.parametrize("text", ["", "garbage", "0", "-5", "12 13"])
    def test_no_positive_pid_is_none(self, tmp_path: Path, text: str) -> None:
        path = tmp_path / "nginx.pid"
        path.write_text(text)
        assert pid_in_file(path) is None

    def test_missing_file_is_none(self, tmp_path: Path) -> None:
        assert pid_in_file(tmp_path / "absent.pid") is None

    def test_the_pid_written_running_or_not(self, tmp_path: Path) -> None:
        path = tmp_path / "nginx.pid"
        path.write_text(" 4194000\n")  # nginx writes "<pid>\n"
        assert pid_in_file(path) == 4194000


class TestQuitThenKill:
    def test_sigquit_first_then_sigkill_for_what_is_left(self) -> None:
        with _start(_QUITS) as quits, _start(_STUBBORN) as stubborn:
            try:
                procs = [psutil.Process(quits.pid), psutil.Process(stubborn.pid)]
                quit_then_kill(procs, timeout=0.5)
                assert quits.wait(5) == 0  # stopped by SIGQUIT, its graceful exit
                assert stubborn.wait(5) == -9  # SIGQUIT ignored: killed
            finally:
                quits.kill()
                stubborn.kill()

    def test_a_process_gone_already_is_skipped(self) -> None:
        with _start(_QUITS) as gone:
            handle = psutil.Process(gone.pid)
            gone.kill()
            gone.wait()
        assert not pid_alive(gone.pid)
        quit_then_kill([handle], timeout=0.1)  # no error
