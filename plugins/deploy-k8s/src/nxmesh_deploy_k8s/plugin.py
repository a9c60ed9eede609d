"""Entry point module of ``nxmesh-deploy-k8s``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from nxmesh import hookimpl
from nxmesh_deploy_k8s.mode import SECTION, K8sSettings, K8sSidecarMode

if TYPE_CHECKING:
    from nxmesh.core.interfaces import DeploymentMode
    from nxmesh.core.settings import SettingsRegistry

__all__ = ["SECTION"]


@hookimpl
def nxmesh_add_settings(registry: SettingsRegistry) -> None:
    registry.add_section(SECTION, K8sSettings)


@hookimpl
def nxmesh_register_deployment_modes() -> Sequence[type[DeploymentMode]]:
    return [K8sSidecarMode]
