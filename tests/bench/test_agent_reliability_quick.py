"""The reliability harness (wrk during applies, idle agent) runs end to end in quick mode.

No figure is asserted against a goal here: that is what the full run is for. The test
checks the harness measures what it claims to: traffic was served in every scenario,
and the restart control run is one the harness would notice.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

from nxmesh.testing.services import require_binary

BENCH = Path(__file__).resolve().parents[2] / "bench" / "agent_reliability.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("agent_reliability", BENCH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TestWrkParsing:
    """wrk's summary is read into counts, errors summed."""

    def test_errors_and_non_2xx_are_counted(self, bench: ModuleType) -> None:
        """Socket errors and non-2xx responses both count as errors."""
        output = (
            "  1234 requests in 2.00s, 180.00KB read\n"
            "  Socket errors: connect 1, read 2, write 3, timeout 4\n"
            "  Non-2xx or 3xx responses: 5\n"
        )
        counts = bench.parse_wrk(output)
        assert counts == {
            "requests": 1234,
            "connect": 1,
            "read": 2,
            "write": 3,
            "timeout": 4,
            "non_2xx": 5,
            "errors": 15,
        }

    def test_clean_run_has_no_errors(self, bench: ModuleType) -> None:
        """wrk prints no error lines when there were none: zero, not a parse failure."""
        assert bench.parse_wrk("  99 requests in 1.00s, 9KB read\n")["errors"] == 0


@pytest.mark.nginx
class TestAgentReliabilityQuick:
    """bench/agent_reliability.py --quick: every scenario ran, JSON written."""

    def test_quick_run(self, bench: ModuleType, nginx_binary: str, tmp_path: Path) -> None:
        """Traffic flowed in each scenario and the idle agent was measured both ways."""
        wrk = require_binary("wrk")
        out = tmp_path / "rel.json"
        results = bench.main(
            [
                "--quick",
                "--applies",
                "2",
                "--idle-seconds",
                "1",
                "--nginx",
                nginx_binary,
                "--wrk",
                wrk,
                "--out",
                str(out),
            ]
        )
        assert json.loads(out.read_text()) == results
        traffic = results["traffic"]
        for name in ("agent/close", "agent/keepalive", "raw/keepalive", "restart/close"):
            assert traffic[name]["requests"] > 0, name
        assert set(traffic["goals"]) == {
            "zero_errors_with_connection_close",
            "keepalive_read_errors_at_most_raw",
            "control_detects_loss",
        }
        for key in ("idle", "idle_agent_only"):
            assert results[key]["pss_mb_max"] > 0
            assert results[key]["cpu_seconds"] >= 0
        assert results["idle_agent_only"]["disabled_plugins"]
