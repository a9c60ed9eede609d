"""The agent's `AgentLink` to its master, built from settings (what ``nxmesh agent`` runs).

* **Endpoints**: `nxmesh.transports.agent_endpoints` — ``agent.endpoints``, or one per
  name in ``agent.transports`` derived from ``agent.master_url``; the link tries them in
  order on every connection and falls back to the next.
* **TLS**: ``grpcs://`` and ``wss://`` pin ``agent.ca_file`` (the master's
  ``<state_dir>/tls/ca.pem``).
* **Enrollment**: a bootstrap token — ``--token``, ``NXMESH_AGENT__BOOTSTRAP_TOKEN``
  (``agent.bootstrap_token``), or the file ``--bootstrap-token-file`` /
  ``agent.bootstrap_token_file`` — is exchanged once; the agent id and session key it
  yields are stored in ``<state_dir>/agent/credentials.json`` (0600, directory 0700) and
  used on every later start, so the token is never needed again (a used token is
  refused anyway). The master's version-signing key is pinned at enrollment
  (``<state_dir>/agent/master.pub``).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Final

import structlog

from nxmesh import __version__
from nxmesh.agent.fsutil import make_private_dir
from nxmesh.agent.process import nginx_version
from nxmesh.agent_link import AgentLink, Endpoint, FileCredentialStore
from nxmesh.core.errors import ConfigurationError
from nxmesh.core.registry import ProviderRegistries
from nxmesh.core.settings import Settings
from nxmesh.transports import agent_endpoints, build_client, names

__all__ = ["CREDENTIALS_FILE", "credentials_path", "link_from_settings", "read_bootstrap_token"]

log = structlog.get_logger("nxmesh.agent.link")

CREDENTIALS_FILE: Final = "credentials.json"


def credentials_path(settings: Settings) -> Path:
    """Where the agent keeps its id and session keys (beside its cache)."""
    return settings.state_dir / "agent" / CREDENTIALS_FILE


def read_bootstrap_token(
    settings: Settings, *, token: str | None = None, token_file: Path | None = None
) -> str | None:
    """The bootstrap token from, in order: `token` (``--token``), `token_file`
    (``--bootstrap-token-file``), ``agent.bootstrap_token``, ``agent.bootstrap_token_file``.

    :raises ConfigurationError: a token file that cannot be read or is empty.
    """
    if token:
        return token.strip()
    path = token_file or None
    if path is None and settings.agent.bootstrap_token:
        return settings.agent.bootstrap_token.strip()
    path = path or settings.agent.bootstrap_token_file
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigurationError(f"cannot read the bootstrap token file {path}: {exc}") from None
    if not text:
        raise ConfigurationError(f"the bootstrap token file {path} is empty")
    return text


def link_from_settings(
    registry: ProviderRegistries,
    settings: Settings,
    *,
    token: str | None = None,
    name: str,
) -> AgentLink | None:
    """The link ``nxmesh agent`` runs, or None when the agent cannot register at all
    (not enrolled yet and no bootstrap token: it then serves its cache only).

    `name` is what the agent calls itself (``agent.name``, else the host name).
    """
    store = FileCredentialStore(credentials_path(settings))
    enrolled = store.path.exists()
    if not enrolled and not token:
        log.warning(
            "not enrolled and no bootstrap token: serving the cache only; create a token "
            "on the master (nxmesh token create) and pass it with --token"
        )
        return None
    make_private_dir(store.path.parent)
    endpoints = agent_endpoints(registry, settings)
    log.info(
        "master endpoints",
        endpoints=names(endpoints),
        enrolled=enrolled,
    )
    if enrolled and token:
        log.info(
            "already enrolled: the bootstrap token is used only if the master refuses "
            "this agent's credentials (revoked, key expired) to enroll it again"
        )
    return AgentLink(
        [Endpoint(build_client(e.cls, settings, e.url), e.url) for e in endpoints],
        store,
        bootstrap_token=token,
        name=name,
        labels=dict(settings.agent.labels),
        agent_version=__version__,
        nginx_version=partial(nginx_version, settings.agent.nginx_binary),
    )
