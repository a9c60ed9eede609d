"""Basic health checks: is an nginx master process running on this host?"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import anyio.to_thread
import psutil

from nxmesh import hookimpl
from nxmesh.core.interfaces import HealthCheck
from nxmesh.core.model import HealthResult


def _nginx_masters() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        # nginx rewrites its argv to "nginx: master process ..."; psutil may split it.
        title = " ".join(proc.info.get("cmdline") or [])
        if proc.info.get("name") == "nginx" and title.startswith("nginx: master process"):
            found.append(proc)
    return found


class NginxProcessCheck:
    """Reports ``fail`` when no nginx master process runs, with the count of workers otherwise."""

    name: ClassVar[str] = "nginx_process"

    async def run(self) -> Sequence[HealthResult]:
        masters = await anyio.to_thread.run_sync(_nginx_masters)
        if not masters:
            return [HealthResult(check=self.name, status="fail", message="no nginx master process")]
        workers = sum(len(m.children()) for m in masters)
        return [
            HealthResult(
                check=self.name,
                status="ok",
                message=f"{len(masters)} master(s), {workers} worker(s)",
                metrics={"masters": float(len(masters)), "workers": float(workers)},
            )
        ]


@hookimpl
def nxmesh_register_health_checks() -> Sequence[type[HealthCheck]]:
    return [NginxProcessCheck]
