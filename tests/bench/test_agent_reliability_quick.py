"""The reliability harness runs end to end in quick mode: the idle agent here; the wrk
scenarios (agent/close, agent/keepalive, raw/keepalive and the restart control) run as
the chaos suite's ``wrk_applies`` case (tests/chaos), which checks the control detects
loss.

No figure is asserted against a goal here: that is what the full run is for.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

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
    """bench/agent_reliability.py --quick --skip-traffic: the idle agent, JSON written."""

    def test_quick_idle_run(self, bench: ModuleType, nginx_binary: str, tmp_path: Path) -> None:
        """The idle agent was measured both ways, and the bare-interpreter baseline."""
        out = tmp_path / "rel.json"
        results = bench.main(["--quick", "--skip-traffic", "--idle-seconds", "1",
                              "--nginx", nginx_binary, "--out", str(out)])  # fmt: skip
        assert json.loads(out.read_text()) == results
        assert "traffic" not in results
        for key in ("idle", "idle_agent_only"):
            pss = results[key]["pss_mb"]
            assert 0 < pss["min"] <= pss["median"] <= pss["max"] == results[key]["pss_mb_max"]
            assert results[key]["cpu_seconds"] >= 0
        assert results["idle_agent_only"]["disabled_plugins"]
        assert 0 < results["idle_baseline_python"]["pss_mb"] < results["idle"]["pss_mb_max"]
