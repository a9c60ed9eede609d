"""Kubernetes sidecar deployment mode for the NxMesh agent."""

from nxmesh_deploy_k8s.mode import K8sSidecarMode, K8sSettings

__all__ = ["K8sSettings", "K8sSidecarMode"]
