"""The agent runs as a sidecar container in nginx's pod.

The pod sets ``shareProcessNamespace: true`` so the agent can signal nginx's master
process, and both containers mount the config volume (at the agent's ``conf_dir``, where
the rendered ``pid logs/nginx.pid`` lands too). Containers of a pod share its network
namespace, so the status server the driver confirms reloads through
(``127.0.0.1:<status_port>``) is reachable from the agent. nginx's own container starts
nginx; the agent never does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import attrs

from nxmesh import ConfigurationError, NxMeshError
from nxmesh.agent.layout import NginxLayout
from nxmesh.agent.process import read_pid_file, send_signal, signal_number

if TYPE_CHECKING:
    from nxmesh.core.settings import Settings

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
SECTION = "deploy_k8s"
_DEFAULT_CONF_DIR = Path("/etc/nginx")


@attrs.frozen
class K8sSettings:
    """``[plugins.deploy_k8s]``: paths shared between the nginx container and the agent.

    `pid_file` defaults to the pid file the rendered ``nginx.conf`` writes
    (``<agent.conf_dir>/logs/nginx.pid``); set it only when nginx's container is told to
    write it elsewhere. `conf_dir`, when set, must be ``agent.conf_dir``: it states where
    the pod mounts the config volume, and the agent writes its releases there.
    """

    pid_file: Path | None = None
    conf_dir: Path | None = None


class K8sSidecarMode:
    """Signals the nginx master found through the pid file on the shared volume."""

    name: ClassVar[str] = "k8s-sidecar"
    priority: ClassVar[int] = 100

    def __init__(
        self, settings: K8sSettings | None = None, *, layout: NginxLayout | None = None
    ) -> None:
        self.settings = settings or K8sSettings()
        if layout is None:
            layout = NginxLayout.for_prefix(self.settings.conf_dir or _DEFAULT_CONF_DIR)
        self.layout = layout
        self.pid_file = self.settings.pid_file or layout.pid_file

    @classmethod
    def from_settings(cls, settings: Settings) -> K8sSidecarMode:
        """The mode the agent builds: ``[plugins.deploy_k8s]`` and the agent's layout."""
        section = settings.plugins.get(SECTION)
        k8s = section if isinstance(section, K8sSettings) else K8sSettings()
        layout = NginxLayout.from_settings(settings)
        if k8s.conf_dir is not None and k8s.conf_dir != layout.conf_dir:
            raise ConfigurationError(
                f"plugins.deploy_k8s.conf_dir is {k8s.conf_dir} but agent.conf_dir is "
                f"{layout.conf_dir}: the agent writes releases to agent.conf_dir, so the "
                "config volume must be mounted there (drop conf_dir or make them equal)"
            )
        return cls(k8s, layout=layout)

    @classmethod
    def detect(cls) -> bool:
        return "KUBERNETES_SERVICE_HOST" in os.environ and SERVICE_ACCOUNT_DIR.is_dir()

    async def nginx_pid(self) -> int | None:
        return await read_pid_file(self.pid_file)

    async def start_nginx(self) -> None:
        if await self.nginx_pid() is not None:
            return  # the protocol's "a no-op when it runs"
        raise NxMeshError(
            "in the k8s-sidecar mode nginx is started by its own container; "
            "the agent only signals it (is shareProcessNamespace: true set on the pod?)"
        )

    async def signal_nginx(self, signal_name: str) -> None:
        signal_number(signal_name)  # an unknown name is refused before the pid is read
        pid = await self.nginx_pid()
        if pid is None:
            raise NxMeshError(
                f"no running nginx found through pid file {self.pid_file}; "
                "is the volume shared with the agent and shareProcessNamespace set?"
            )
        send_signal(pid, signal_name)  # a refused signal is an NginxControlError
