"""Basic health checks: is the agent's own nginx master running, with its workers?

The check looks at *this agent's* nginx — the master named by the pid file its
deployment mode reads — never at whatever nginx runs on the host: with several agents on
one host, or a distribution nginx beside the agent's, a dead managed nginx must not look
healthy because another one is up.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import anyio.to_thread

from nxmesh import hookimpl
from nxmesh.agent.layout import NginxLayout
from nxmesh.agent.process import read_pid_file, worker_pids
from nxmesh.core.interfaces import HealthCheck
from nxmesh.core.model import HealthResult

if TYPE_CHECKING:
    from nxmesh.core.settings import Settings

__all__ = ["NginxProcessCheck", "managed_pid_file"]

_MODE_SECTIONS = {
    "k8s-sidecar": "deploy_k8s",
    "docker-sidecar": "deploy_docker",
    "standalone": "deploy_standalone",
}
"""Deployment mode → the settings section whose ``pid_file`` overrides the layout's
(highest `priority` first: the order ``auto`` tries them in)."""


def managed_pid_file(settings: Settings) -> Path:
    """The pid file of the agent's own nginx: the deployment mode's ``pid_file`` setting
    when one is set (with ``auto``, the first mode section that sets one), else the pid
    file the rendered ``nginx.conf`` writes — what the deployment modes read."""
    wanted = settings.agent.deployment_mode
    names = list(_MODE_SECTIONS.values()) if wanted == "auto" else [_MODE_SECTIONS.get(wanted)]
    for name in names:
        pid_file = getattr(settings.plugins.get(name) if name else None, "pid_file", None)
        if isinstance(pid_file, Path):
            return pid_file
    return NginxLayout.from_settings(settings).pid_file


class NginxProcessCheck:
    """``fail`` when the agent's nginx master (by its pid file) does not run, ``warn``
    when it has no current worker process; its worker count otherwise.

    :param pid_file: the pid file of the nginx to watch (`from_settings`: the agent's).
    """

    name: ClassVar[str] = "nginx_process"

    def __init__(self, pid_file: Path) -> None:
        self.pid_file = pid_file

    @classmethod
    def from_settings(cls, settings: Settings) -> NginxProcessCheck:
        return cls(managed_pid_file(settings))

    async def run(self) -> Sequence[HealthResult]:
        master = await read_pid_file(self.pid_file)
        if master is None:
            return [
                HealthResult(
                    check=self.name,
                    status="fail",
                    message=f"no nginx master process (pid file {self.pid_file})",
                    metrics={"masters": 0.0, "workers": 0.0},
                )
            ]
        workers = await anyio.to_thread.run_sync(worker_pids, master)
        current = sum(1 for accepting in workers.values() if accepting)
        return [
            HealthResult(
                check=self.name,
                status="ok" if current else "warn",
                message=f"master {master}, {current} worker(s)"
                + ("" if current else ": no worker process serves"),
                metrics={"masters": 1.0, "workers": float(current)},
            )
        ]


@hookimpl
def nxmesh_register_health_checks() -> Sequence[type[HealthCheck]]:
    return [NginxProcessCheck]
