"""Kubernetes sidecar deployment mode for the NxMesh agent."""

from nxmesh_deploy_k8s.mode import K8sSettings, K8sSidecarMode

__all__ = ["K8sSettings", "K8sSidecarMode"]
