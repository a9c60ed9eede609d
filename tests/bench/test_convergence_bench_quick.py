"""The fleet-convergence benchmark runs end to end in quick mode (2 nginx, one round).

A real master, two real agents with their nginx, and the Ansible playbook on two nginx
of its own. No timing is asserted; the figures come from the full run
(``bench/results/convergence.json``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from nxmesh.testing.services import missing_service

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import convergence_bench  # noqa: E402


@pytest.mark.nginx
def test_quick_run(nginx_binary: str, tmp_path: Path) -> None:
    """Both sides converged and were timed the same way; the master and agents measured."""
    if convergence_bench.ansible_playbook() is None:
        missing_service("ansible-playbook (pip install -e '.[bench]')")
    out = tmp_path / "convergence.json"
    report = convergence_bench.main(["--quick", "--nginx", nginx_binary, "--out", str(out)])
    assert report["instances"] == 2
    [nxmesh] = report["nxmesh"]["rounds"]
    [ansible] = report["baseline_ansible"]["rounds"]
    assert 0 < nxmesh["first_s"] <= nxmesh["serving_s"]
    # No order between serving and the playbook's exit: its handler sends nginx the HUP
    # and may exit before the new workers serve.
    assert 0 < ansible["first_s"] <= ansible["serving_s"]
    assert ansible["exit_s"] > 0
    assert report["speedup_ansible_over_nxmesh"] > 0
    assert report["goal"]["met"] is None  # the goal is about ten instances
    assert report["master_view_converged"] is True
    assert report["master_pss_mb_no_agents"] > 0
    assert len(report["agent_pss_mb"]) == 2
    assert report["ansible"].startswith("ansible-playbook")
