"""The watchdog against a real nginx: drift revert/report, restarts with backoff, breaker."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import anyio
import pytest

from nxmesh.agent import watchdog as watchdog_module
from nxmesh.agent.applier import Applier
from nxmesh.agent.harness import NginxStack
from nxmesh.agent.process import pid_alive
from nxmesh.agent.watchdog import BackoffPolicy, Watchdog, file_diff
from nxmesh.plugins.deploy_standalone import StandaloneMode
from nxmesh.testing.nginx import refuse_signal

pytestmark = pytest.mark.anyio

FAST = BackoffPolicy(backoff_initial=0.3, backoff_max=2.0, reset_after=30.0, breaker_threshold=3)


def _live_site(stack: NginxStack) -> Path:
    return stack.layout.conf_dir / "current" / "conf.d" / "site-site0.conf"


async def _kill_nginx(pid: int) -> None:
    """Kill master and workers at once, as the OOM killer or a crash would."""
    os.killpg(os.getpgid(pid), signal.SIGKILL)
    with anyio.fail_after(5):
        while pid_alive(pid):
            await anyio.sleep(0.005)


class TestFileDiff:
    def test_reports_changed_added_and_removed_files(self) -> None:
        """The diff names each differing file with unified hunks, private keys hidden."""
        expected = {
            "a.conf": b"x 1;\n",
            "gone.conf": b"y;\n",
            "k.key": b"-----BEGIN PRIVATE KEY-----\n",
        }
        live = {
            "a.conf": b"x 2;\n",
            "new.conf": b"z;\n",
            "k.key": b"-----BEGIN PRIVATE KEY-----\nX\n",
        }
        diff = file_diff(expected, live)
        assert "--- expected/a.conf\n+++ live/a.conf\n" in diff
        assert "-x 1;\n+x 2;\n" in diff
        assert "+++ live/new.conf" in diff
        assert "--- expected/gone.conf" in diff
        assert "Private key file k.key differs (not shown)" in diff
        assert "BEGIN PRIVATE KEY" not in diff

    def test_a_site_mentioning_a_private_key_is_still_diffed(self) -> None:
        """Only key files are hidden: a site whose ``return`` body says "PRIVATE
        KEY-----" shows its changes (an upstream swap must not hide behind it)."""
        site = b'location / { return 200 "-----BEGIN PRIVATE KEY-----"; }\n'
        expected = {"conf.d/site-a.conf": b"upstream a { server 10.0.0.1:80; }\n" + site}
        live = {"conf.d/site-a.conf": b"upstream a { server 203.0.113.6:80; }\n" + site}
        diff = file_diff(expected, live)
        assert "+upstream a { server 203.0.113.6:80; }" in diff
        assert "not shown" not in diff

    def test_a_file_too_large_is_named_not_line_diffed(self) -> None:
        """Past the size bound a file is reported with its size; small ones still diff."""
        big = b"".join(b"    10.0.%d.%d/32 backend;\n" % (i // 256, i % 256) for i in range(20_000))
        changed = big.replace(b"backend", b"other")
        diff = file_diff(
            {"geo.conf": big, "a.conf": b"x 1;\n"}, {"geo.conf": changed, "a.conf": b"x 2;\n"}
        )
        assert f"File geo.conf differs ({len(big)} bytes, too large to diff)\n" in diff
        assert "backend" not in diff
        assert "-x 1;\n+x 2;\n" in diff


@pytest.mark.nginx
class TestDrift:
    async def test_drift_is_reverted_with_a_file_diff(
        self, stack: NginxStack, applier: Applier
    ) -> None:
        """An edited live file is detected, diffed, and the good tree restored and reloaded."""
        site = _live_site(stack)
        site.write_text(site.read_text().replace("original", "hacked"))
        await stack.mode.signal_nginx("reload")  # someone even reloaded nginx by hand
        watchdog = Watchdog(applier, stack.driver, stack.mode, drift_policy="revert")
        drift = await watchdog.check_drift()
        assert drift is not None
        assert drift.changed == ("conf.d/site-site0.conf",)
        assert "-        return 200 original;" in drift.diff
        assert "+        return 200 hacked;" in drift.diff
        assert stack.events.kinds()[-1] == "drift.reverted"
        assert await stack.body() == "original"
        assert await watchdog.check_drift() is None

    async def test_report_policy_leaves_the_files_alone(
        self, stack: NginxStack, applier: Applier
    ) -> None:
        """With policy report the drift is recorded (with its diff) and nothing is changed."""
        extra = stack.layout.conf_dir / "current" / "conf.d" / "zz-extra.conf"
        extra.write_text("# added by hand\n")
        watchdog = Watchdog(applier, stack.driver, stack.mode, drift_policy="report")
        drift = await watchdog.check_drift()
        assert drift is not None
        assert drift.added == ("conf.d/zz-extra.conf",)
        [event] = stack.events.events("drift")
        assert event.kind == "drift.detected"
        assert "+# added by hand" in event.payload["diff"]
        assert extra.exists()

    async def test_drift_check_waits_while_an_apply_runs(
        self, stack: NginxStack, applier: Applier
    ) -> None:
        """The check holds off while the apply lock is taken: an apply's writes are not drift."""
        _live_site(stack).write_text("# mid-apply\n")
        watchdog = Watchdog(applier, stack.driver, stack.mode, drift_policy="report")
        release = anyio.Event()
        holding = anyio.Event()

        async def apply_in_progress() -> None:
            async with applier.lock:
                holding.set()
                await release.wait()

        async with anyio.create_task_group() as tg:
            tg.start_soon(apply_in_progress)
            await holding.wait()
            with anyio.move_on_after(0.2) as scope:
                await watchdog.check_drift()
            assert scope.cancelled_caught
            assert not stack.events.events("drift")
            release.set()
        assert await watchdog.check_drift() is not None  # and it resumes afterwards

    async def test_the_diff_is_computed_off_the_event_loop(
        self, stack: NginxStack, applier: Applier, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Diffing a large tree must not stall the loop (metrics, health, master link)."""
        threads: list[threading.Thread] = []

        def recording(expected: dict[str, bytes], actual: dict[str, bytes]) -> str:
            threads.append(threading.current_thread())
            return file_diff(expected, actual)

        monkeypatch.setattr(watchdog_module, "file_diff", recording)
        _live_site(stack).write_text("# edited\n")
        watchdog = Watchdog(applier, stack.driver, stack.mode, drift_policy="report")
        drift = await watchdog.check_drift()
        assert drift is not None
        assert "+# edited" in drift.diff
        assert threads
        assert threads[0] is not threading.main_thread()

    async def test_a_revert_whose_reload_is_refused_is_reported(
        self, stack: NginxStack, applier: Applier, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The OS refusing the reload signal fails the revert: reported, never raised."""
        site = _live_site(stack)
        site.write_text(site.read_text().replace("original", "hacked"))
        pid = await stack.master_pid()
        assert pid is not None
        refuse_signal(monkeypatch, pid)
        watchdog = Watchdog(applier, stack.driver, stack.mode, drift_policy="revert")
        assert await watchdog.check_drift() is not None
        [failed] = stack.events.events("drift.revert_failed")
        assert failed.payload["outcome"] == "rolled_back"
        assert "Operation not permitted" in failed.payload["message"]
        assert not (stack.layout.conf_dir / "apply.journal").exists()
        assert await stack.body() == "original"  # nginx never loaded the edit
        monkeypatch.undo()  # allowed again: the next check reverts
        assert await watchdog.check_drift() is not None
        assert stack.events.kinds()[-1] == "drift.reverted"

    async def test_the_drift_loop_runs_on_its_interval(
        self, stack: NginxStack, applier: Applier
    ) -> None:
        """Running, the watchdog finds and reverts drift on its own."""
        _live_site(stack).unlink()
        watchdog = Watchdog(
            applier, stack.driver, stack.mode, drift_interval=0.05, check_interval=0.05
        )
        async with anyio.create_task_group() as tg:
            await tg.start(watchdog.run)
            with anyio.fail_after(10):
                while not stack.events.events("drift.reverted"):
                    await anyio.sleep(0.02)
            tg.cancel_scope.cancel()
        assert _live_site(stack).exists()
        assert await stack.body() == "original"


@pytest.mark.nginx
class TestNginxDeath:
    async def test_dead_nginx_is_restarted_with_growing_backoff(
        self, stack: NginxStack, applier: Applier
    ) -> None:
        """Each restart in a row waits twice as long as the previous one."""
        watchdog = Watchdog(applier, stack.driver, stack.mode, backoff=FAST)
        for attempt in (1, 2):
            pid = await stack.master_pid()
            assert pid is not None
            await _kill_nginx(pid)
            with anyio.fail_after(10):
                while await watchdog.check_nginx() is not True:
                    await anyio.sleep(0.02)
            assert await stack.body() == "original"
            restarted = stack.events.events("nginx.restarted")[-1]
            assert restarted.payload["attempt"] == attempt
        delays = [e.payload["next_delay"] for e in stack.events.events("nginx.restarted")]
        assert delays == [0.3, 0.6]
        # The second restart waited out the first one's delay.
        died = [e.ts for e in stack.events.events("nginx.died")]
        restarted_at = [e.ts for e in stack.events.events("nginx.restarted")]
        assert restarted_at[1] - restarted_at[0] >= 0.3 - 0.01
        assert len(died) == 2

    async def test_breaker_opens_after_repeated_restarts(
        self, stack: NginxStack, applier: Applier
    ) -> None:
        """After breaker_threshold restarts in the window no further restart is tried."""
        policy = BackoffPolicy(
            backoff_initial=0.01, backoff_max=0.01, breaker_threshold=2, breaker_cooldown=60
        )
        watchdog = Watchdog(applier, stack.driver, stack.mode, backoff=policy)
        for _ in range(2):
            pid = await stack.master_pid()
            assert pid is not None
            await _kill_nginx(pid)
            with anyio.fail_after(10):
                while await watchdog.check_nginx() is not True:
                    await anyio.sleep(0.02)
        pid = await stack.master_pid()
        assert pid is not None
        await _kill_nginx(pid)
        await anyio.sleep(0.05)
        for _ in range(5):
            assert await watchdog.check_nginx() is False
            await anyio.sleep(0.02)
        assert watchdog.breaker_open
        assert stack.events.kinds().count("breaker.open") == 1
        assert await stack.master_pid() is None

    async def test_a_missing_nginx_binary_is_reported_and_opens_the_breaker(
        self, stack: NginxStack, applier: Applier, tmp_path: Path
    ) -> None:
        """nginx cannot be restarted (its binary is gone): each attempt is reported, the
        breaker opens, and the watchdog keeps running."""
        policy = BackoffPolicy(
            backoff_initial=0.01, backoff_max=0.01, breaker_threshold=2, breaker_cooldown=60
        )
        missing = tmp_path / "gone" / "nginx"
        mode = StandaloneMode(stack.layout, nginx_binary=str(missing))
        watchdog = Watchdog(applier, stack.driver, mode, check_interval=0.02, backoff=policy)
        pid = await stack.master_pid()
        assert pid is not None
        await _kill_nginx(pid)
        async with anyio.create_task_group() as tg:
            await tg.start(watchdog.run)
            with anyio.fail_after(10):
                while not watchdog.breaker_open:
                    await anyio.sleep(0.02)
            tg.cancel_scope.cancel()
        failures = stack.events.events("nginx.restart_failed")
        assert len(failures) == 2
        assert f"cannot start nginx {missing}" in failures[0].payload["message"]
        assert stack.events.kinds().count("breaker.open") == 1
        assert "nginx.restarted" not in stack.events.kinds()

    async def test_the_liveness_loop_restarts_nginx_by_itself(
        self, stack: NginxStack, applier: Applier
    ) -> None:
        """Running, the watchdog notices a death and brings nginx back serving."""
        watchdog = Watchdog(applier, stack.driver, stack.mode, check_interval=0.05, backoff=FAST)
        async with anyio.create_task_group() as tg:
            await tg.start(watchdog.run)
            pid = await stack.master_pid()
            assert pid is not None
            await _kill_nginx(pid)
            with anyio.fail_after(10):
                while not stack.events.events("nginx.restarted"):
                    await anyio.sleep(0.02)
            tg.cancel_scope.cancel()
        assert await stack.body() == "original"
        assert stack.events.kinds().index("nginx.died") < stack.events.kinds().index(
            "nginx.restarted"
        )
