"""The docker sidecar deployment mode: nginx in one container, the agent in another.

The two containers share four things (compose or ``docker run`` flags):

- the **PID namespace** (``pid: "service:nginx"`` / ``--pid=container:nginx``), so the
  agent can signal nginx's master process;
- the **network namespace** (``network_mode: "service:nginx"`` /
  ``--network=container:nginx``): the driver confirms every reload at
  ``http://127.0.0.1:<status_port>/nxmesh/version``, the status server on nginx's
  loopback; from a network namespace of its own the agent never reaches it and every
  apply is rolled back;
- the **config volume** mounted at the agent's ``conf_dir`` in both containers
  (``/etc/nginx`` by default), holding ``current``, ``releases/`` and the runtime files;
- the **pid file** on that volume (``<conf_dir>/logs/nginx.pid``; ``pid_file`` overrides).

nginx's container runs
``nginx -g 'daemon off;' -p /etc/nginx/ -c /etc/nginx/current/nginx.conf``; the agent
never starts nginx, it only signals it: reload → SIGHUP, reopen → SIGUSR1,
quit → SIGQUIT, stop → SIGTERM.

`detect()` answers true inside a container (``/.dockerenv``, or a docker/containerd
cgroup or overlay mount), so with ``deployment_mode = "auto"`` a containerised agent
picks this mode; an agent that runs nginx in its *own* container sets
``deployment_mode = "standalone"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import attrs

from nxmesh import NxMeshError, hookimpl
from nxmesh.agent.layout import NginxLayout
from nxmesh.agent.process import NginxControlError, read_pid_file, send_signal

if TYPE_CHECKING:
    from nxmesh.core.interfaces import DeploymentMode
    from nxmesh.core.settings import Settings, SettingsRegistry

__all__ = ["SECTION", "DockerSettings", "DockerSidecarMode", "in_container"]

SECTION = "deploy_docker"
DOCKERENV = Path("/.dockerenv")
_CONTAINER_MARKERS = ("docker", "containerd", "kubepods", "libpod")


def in_container(
    dockerenv: Path = DOCKERENV,
    cgroup: Path = Path("/proc/self/cgroup"),
    mountinfo: Path = Path("/proc/self/mountinfo"),
) -> bool:
    """True when this process appears to run in a container (cheap file checks only)."""
    if dockerenv.exists():
        return True
    for path in (cgroup, mountinfo):
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        if any(marker in text for marker in _CONTAINER_MARKERS):
            return True
    return False


@attrs.frozen
class DockerSettings:
    """``[plugins.deploy_docker]``: where the shared pid file is."""

    pid_file: Path | None = None


class DockerSidecarMode:
    """Signals the nginx master of another container through the shared pid file."""

    name: ClassVar[str] = "docker-sidecar"
    priority: ClassVar[int] = 50

    def __init__(self, layout: NginxLayout, *, settings: DockerSettings | None = None) -> None:
        self.layout = layout
        self.settings = settings or DockerSettings()
        self.pid_file = self.settings.pid_file or layout.pid_file

    @classmethod
    def from_settings(cls, settings: Settings) -> DockerSidecarMode:
        section = settings.plugins.get(SECTION)
        return cls(
            NginxLayout.from_settings(settings),
            settings=section if isinstance(section, DockerSettings) else None,
        )

    @classmethod
    def detect(cls) -> bool:
        return in_container()

    async def nginx_pid(self) -> int | None:
        return await read_pid_file(self.pid_file)

    async def start_nginx(self) -> None:
        if await self.nginx_pid() is not None:
            return
        raise NxMeshError(
            "in the docker-sidecar mode nginx is started by its own container; the agent "
            f"found no running nginx through {self.pid_file} (is the volume shared and the "
            "PID namespace joined with --pid=container:<nginx>?). If this agent should "
            'start nginx itself, set agent.deployment_mode = "standalone" (auto picks '
            "docker-sidecar inside any container)"
        )

    async def signal_nginx(self, signal_name: str) -> None:
        pid = await self.nginx_pid()
        if pid is None:
            raise NginxControlError(
                f"cannot send {signal_name!r}: no nginx visible through {self.pid_file} "
                "(shared volume and PID namespace?)"
            )
        send_signal(pid, signal_name)


@hookimpl
def nxmesh_add_settings(registry: SettingsRegistry) -> None:
    registry.add_section(SECTION, DockerSettings)


@hookimpl
def nxmesh_register_deployment_modes() -> Sequence[type[DeploymentMode]]:
    return [DockerSidecarMode]
