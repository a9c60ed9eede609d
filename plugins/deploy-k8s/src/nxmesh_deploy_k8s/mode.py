"""The agent runs as a sidecar container in nginx's pod.

The pod sets ``shareProcessNamespace: true`` so the agent can signal nginx's master
process, and both containers mount the config volume and the pid file's directory.
nginx's own container starts nginx; the agent never does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import anyio
import attrs

from nxmesh import NxMeshError
from nxmesh.agent.process import send_signal, signal_number

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


@attrs.frozen
class K8sSettings:
    """Paths shared between the nginx container and the agent sidecar."""

    pid_file: Path = Path("/var/run/nginx/nginx.pid")
    conf_dir: Path = Path("/etc/nginx")


class K8sSidecarMode:
    """Signals the nginx master found through the pid file on the shared volume."""

    name: ClassVar[str] = "k8s-sidecar"
    priority: ClassVar[int] = 100

    def __init__(self, settings: K8sSettings | None = None) -> None:
        self.settings = settings or K8sSettings()

    @classmethod
    def detect(cls) -> bool:
        return "KUBERNETES_SERVICE_HOST" in os.environ and SERVICE_ACCOUNT_DIR.is_dir()

    async def nginx_pid(self) -> int | None:
        try:
            text = await anyio.Path(self.settings.pid_file).read_text()
            pid = int(text.strip())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # exists, owned by another user: still nginx's pid
        return pid

    async def start_nginx(self) -> None:
        raise NxMeshError(
            "in the k8s-sidecar mode nginx is started by its own container; "
            "the agent only signals it (is shareProcessNamespace: true set on the pod?)"
        )

    async def signal_nginx(self, signal_name: str) -> None:
        signal_number(signal_name)  # an unknown name is refused before the pid is read
        pid = await self.nginx_pid()
        if pid is None:
            raise NxMeshError(
                f"no running nginx found through pid file {self.settings.pid_file}; "
                "is the volume shared with the agent and shareProcessNamespace set?"
            )
        send_signal(pid, signal_name)  # a refused signal is an NginxControlError
