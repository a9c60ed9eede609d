"""The chaos suite runs end to end in quick mode, and its pass/fail logic works.

``python -m chaos.run --quick`` (one shared fleet, small sizes, about half a minute) runs in
a subprocess; the tests read what it wrote. No duration is asserted: a case's time
bound is reported, not tested. What is asserted: every case produced well-formed
results and every criterion held (a regression the suite exists to catch), and the
verdict logic itself — a blind control run, a lost request, an overrun bound, an
exception — turns into a failure.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from nxmesh.testing.services import missing_service, require_binary

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from chaos.cases import CASES, CaseResult, judge_wrk  # noqa: E402
from chaos.run import RESULTS_DIR, parse_args, render_markdown  # noqa: E402

WRK_OK: dict[str, Any] = {
    "applies": 3,
    "agent/close": {"requests": 900, "errors": 0, "read": 0},
    "agent/keepalive": {"requests": 900, "errors": 48, "read": 48},
    "raw/keepalive": {"requests": 900, "errors": 45, "read": 45},
    "restart/close": {"requests": 300, "errors": 7, "read": 2},
}


class TestVerdictLogic:
    """The criteria fail when they should (no suite run needed)."""

    def test_clean_numbers_pass(self) -> None:
        result = CaseResult("wrk_applies", "t", bound_s=10)
        judge_wrk(result, WRK_OK)
        assert result.passed, result.checks

    def test_a_blind_control_run_fails(self) -> None:
        """A restart control that shows no errors means the harness cannot see loss."""
        blind = {**WRK_OK, "restart/close": {"requests": 300, "errors": 0, "read": 0}}
        result = CaseResult("wrk_applies", "t", bound_s=10)
        judge_wrk(result, blind)
        assert not result.passed
        assert [c.what for c in result.checks if not c.ok] == [
            "control: restarting nginx instead of reloading loses requests (the harness sees loss)"
        ]

    def test_one_failed_request_with_connection_close_fails(self) -> None:
        lossy = {**WRK_OK, "agent/close": {"requests": 900, "errors": 1, "read": 1}}
        result = CaseResult("wrk_applies", "t", bound_s=10)
        judge_wrk(result, lossy)
        assert not result.passed

    def test_more_keepalive_errors_than_nginx_own_reload_fails(self) -> None:
        worse = {**WRK_OK, "agent/keepalive": {"requests": 900, "errors": 300, "read": 300}}
        result = CaseResult("wrk_applies", "t", bound_s=10)
        judge_wrk(result, worse)
        assert not result.passed

    def test_quick_mode_reports_the_keepalive_comparison_without_judging_it(self) -> None:
        """Three reloads are too few to compare: quick runs report the numbers only."""
        worse = {**WRK_OK, "agent/keepalive": {"requests": 900, "errors": 300, "read": 300}}
        result = CaseResult("wrk_applies", "t", bound_s=10)
        judge_wrk(result, worse, judge_keepalive=False)
        assert result.passed, result.checks
        assert "agent 100.0/reload" in result.details["keepalive_reported_not_judged"]
        assert all("keep-alive" not in c.what for c in result.checks)

    def test_overrun_error_or_no_checks_fail(self) -> None:
        ok = CaseResult("x", "t", bound_s=10)
        ok.check("holds", True)
        assert ok.passed
        slow = CaseResult("x", "t", bound_s=10, seconds=11)
        slow.check("holds", True)
        assert not slow.passed
        broken = CaseResult("x", "t", bound_s=10, error="RuntimeError: boom")
        broken.check("holds", True)
        assert not broken.passed
        assert not CaseResult("x", "t", bound_s=10).passed


class TestArguments:
    """The options chaos.run shares with bench.run (`bench.common.parse_suite_args`)."""

    def test_names_and_out_dir(self) -> None:
        args = parse_args(["--only", "burst,clock_skew", "--postgres", "shared"])
        assert (args.names, args.out_dir, args.postgres) == (
            ["burst", "clock_skew"],
            RESULTS_DIR,
            "shared",
        )
        assert parse_args([]).names == list(CASES)

    def test_quick_runs_write_to_a_temporary_directory(self) -> None:
        out = parse_args(["--quick"]).out_dir
        try:
            assert out.is_dir()
            assert out.name.startswith("nxmesh-chaos-quick-")
        finally:
            out.rmdir()

    def test_unknown_case_is_a_usage_error(self, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit) as info:
            parse_args(["--only", "nope"])
        assert info.value.code == 2
        assert "unknown case(s) nope; known: wrk_applies" in capsys.readouterr().err


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    require_binary("nginx")
    require_binary("wrk")
    if not Path("/usr/lib/postgresql").is_dir() or shutil.which("pg_isready") is None:
        missing_service("PostgreSQL server binaries (initdb, pg_ctl)")
    out = tmp_path_factory.mktemp("chaos")
    proc = subprocess.run(
        [sys.executable, "-m", "chaos.run", "--quick", "--out-dir", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    summary["_stdout"] = proc.stdout[-6000:] + proc.stderr[-3000:]
    summary["_exit"] = proc.returncode
    summary["_dir"] = str(out)
    return summary


@pytest.mark.nginx
@pytest.mark.postgres
class TestQuickSuite:
    def test_every_case_ran_and_wrote_its_json(self, suite: dict[str, Any]) -> None:
        assert list(suite["cases"]) == list(CASES)
        for name in CASES:
            data = json.loads((Path(suite["_dir"]) / f"{name}.json").read_text())
            assert data == suite["cases"][name]
            assert data["checks"], name
            for check in data["checks"]:
                assert set(check) == {"what", "ok", "detail"}
            assert data["bound_s"] > 0
            assert data["quick"] is True

    def test_every_criterion_held(self, suite: dict[str, Any]) -> None:
        """Nothing lost in any case (what the suite is for), and it cleaned up."""
        failed = {
            name: [c["what"] for c in case["checks"] if not c["ok"]] or case["error"]
            for name, case in suite["cases"].items()
            if case["error"] or not all(c["ok"] for c in case["checks"])
        }
        assert not failed, f"{failed}\n{suite['_stdout']}"
        assert suite["restore"]["leftover_processes"] == []

    def test_the_restart_control_detects_loss(self, suite: dict[str, Any]) -> None:
        """The wrk harness can see lost requests: restarting nginx shows errors."""
        details = suite["cases"]["wrk_applies"]["details"]
        assert details["restart/close"]["errors"] > 0
        assert details["agent/close"]["requests"] > 0

    def test_summary_markdown(self, suite: dict[str, Any]) -> None:
        text = (Path(suite["_dir"]) / "SUMMARY.md").read_text()
        assert text == render_markdown({k: v for k, v in suite.items()
                                        if not k.startswith("_")})  # fmt: skip
        for name in CASES:
            assert f"## {name}:" in text
