"""Small builders of valid domain objects for tests."""

from __future__ import annotations

import hashlib
import time

from nxmesh.core.model import (
    ConfigVersion,
    DesiredState,
    Listener,
    Location,
    Return,
    Site,
    Upstream,
    UpstreamServer,
)


def make_state(sites: int = 1, *, workspace: str = "default", port: int = 8080) -> DesiredState:
    """A desired state with `sites` proxy sites, each with its own upstream."""
    return DesiredState(
        workspace=workspace,
        upstreams=tuple(
            Upstream(name=f"app{i}", servers=(UpstreamServer(address=f"127.0.0.1:{port + i}"),))
            for i in range(sites)
        ),
        sites=tuple(
            Site(
                name=f"site{i}",
                server_names=(f"site{i}.example.test",),
                locations=(Location(path="/", upstream=f"app{i}"),),
            )
            for i in range(sites)
        ),
    )


def multi_site_state(port: int, body: str, *, sites: int = 1) -> DesiredState:
    """`sites` sites on one port; site *i* answers ``<body> <i>`` for ``site<i>.test``."""
    return DesiredState(
        sites=tuple(
            Site(
                name=f"site{i}",
                server_names=("localhost",) if i == 0 else (f"site{i}.test",),
                listeners=(Listener(port=port, address="127.0.0.1", default_server=i == 0),),
                locations=(
                    Location(
                        path="/",
                        return_=Return(code=200, body=body if i == 0 else f"{body} {i}"),
                    ),
                ),
            )
            for i in range(sites)
        )
    )


def one_site_state(
    port: int, server_name: str, body: str, *, default_server: bool = False
) -> DesiredState:
    """One site answering ``200 <body>`` for `server_name` on 127.0.0.1:`port`."""
    site = Site(
        name="one",
        server_names=(server_name,),
        listeners=(Listener(port=port, address="127.0.0.1", default_server=default_server),),
        locations=(Location(path="/", return_=Return(code=200, body=body)),),
    )
    return DesiredState(sites=(site,))


def make_version(
    number: int,
    *,
    workspace: str = "default",
    state: DesiredState | None = None,
    parent_digest: str | None = None,
    message: str = "",
) -> ConfigVersion:
    """An unsigned version; the digest is a stand-in derived from number and workspace."""
    digest = hashlib.sha256(f"{workspace}:{number}".encode()).hexdigest()
    return ConfigVersion(
        workspace=workspace,
        number=number,
        digest=digest,
        parent_digest=parent_digest,
        author="tester",
        message=message or f"version {number}",
        created_at=time.time(),
        state=state or make_state(workspace=workspace),
    )
