"""The built-in ``certs`` plugin: the ``[plugins.certs]`` settings section and a policy check.

Registered through the ``nxmesh`` entry point ``certs``. The policy check
(``nxmesh_validate_state``) catches ACME mistakes before they become a version:

- error: an ACME site whose name is also a certificate name of the state (its ACME
  certificate is stored under the site's name, so the two would overwrite each other);
- error: an ACME site or ACME certificate with no real host name (only ``_``);
- warning: wildcard names, which only DNS-01 can validate;
- warning: an ACME site without any plain-HTTP server (no plain listener and
  ``redirect_http: false``), where HTTP-01 cannot be answered.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from nxmesh import hookimpl
from nxmesh.certs.settings import SECTION, CertsSettings
from nxmesh.core.errors import Problem
from nxmesh.core.model import stream_http01_sites

if TYPE_CHECKING:
    from nxmesh.core.model import DesiredState
    from nxmesh.core.settings import SettingsRegistry

__all__ = ["acme_problems", "nxmesh_add_settings", "nxmesh_validate_state"]

_WILDCARD = (
    "wildcard names can only be validated with DNS-01 ([plugins.certs] challenge = 'dns-01')"
)


def acme_problems(state: DesiredState) -> list[Problem]:
    """The ACME-related problems of `state` (see the module docstring)."""
    found: list[Problem] = []
    cert_index = {ref.name: i for i, ref in enumerate(state.certificates)}
    for i, site in enumerate(state.sites):
        if site.tls is None or not site.tls.acme:
            continue
        if site.name in cert_index:
            found.append(
                Problem(
                    f"sites[{i}].name",
                    f"site {site.name!r} gets its certificate by ACME, stored under the site's "
                    f"name, which certificates[{cert_index[site.name]}] also uses; rename one",
                )
            )
        names = [n for n in site.server_names if n != "_"]
        if not names:
            found.append(
                Problem(f"sites[{i}].server_names", "needs a host name for an ACME certificate")
            )
        for n, name in enumerate(site.server_names):
            if name.startswith("*."):
                found.append(Problem(f"sites[{i}].server_names[{n}]", _WILDCARD, "warning"))
        plain = any(not listener.tls for listener in site.listeners)
        if not plain and not site.tls.redirect_http:
            found.append(
                Problem(
                    f"sites[{i}].tls.redirect_http",
                    "is off and the site has no plain-HTTP listener, so HTTP-01 validation "
                    "cannot reach it; add a port 80 listener, keep redirect_http or use DNS-01",
                    "warning",
                )
            )
    for i, ref in enumerate(state.certificates):
        if ref.source != "acme":
            continue
        for n, domain in enumerate(ref.domains):
            if domain.startswith("*."):
                found.append(Problem(f"certificates[{i}].domains[{n}]", _WILDCARD, "warning"))
    found += _stream_http01_problems(state)
    return found


def _stream_http01_problems(state: DesiredState) -> list[Problem]:
    """A TCP stream ending TLS with an ACME certificate: HTTP-01 asks for each domain
    over plain HTTP, which a stream does not speak; the sites serving it there answer
    (`stream_http01_sites`). Warned, not refused: DNS-01 needs no site."""
    refs = {ref.name: ref for ref in state.certificates if ref.source == "acme"}
    served = {name for i in stream_http01_sites(state) for name in state.sites[i].server_names}
    found: list[Problem] = []
    for i, stream in enumerate(state.streams):
        ref = refs.get(stream.tls.certificate) if stream.tls is not None else None
        if ref is None:
            continue
        missing = [d for d in ref.domains if d not in served and not d.startswith("*.")]
        if missing:
            found.append(
                Problem(
                    f"streams[{i}].tls.certificate",
                    f"certificate {ref.name!r} comes from ACME and no site serves "
                    f"{', '.join(missing)} over plain HTTP: HTTP-01 validation cannot reach "
                    "a stream; add a site answering those names on port 80, or ignore this "
                    "with DNS-01 ([plugins.certs] challenge = 'dns-01')",
                    "warning",
                )
            )
    return found


@hookimpl
def nxmesh_add_settings(registry: SettingsRegistry) -> None:
    registry.add_section(SECTION, CertsSettings)


@hookimpl
def nxmesh_validate_state(state: DesiredState) -> Sequence[Problem]:
    return acme_problems(state)
