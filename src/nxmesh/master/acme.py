"""ACME issuance and renewal in the running master (``[plugins.certs]`` with ``agree_tos``).

`run_certificate_renewal` is started by the agent plane (`nxmesh.master.agent_plane`)
beside the rollout orchestrator when ``[plugins.certs] agree_tos = true``:

* opens the ACME client (`nxmesh.certs.open_acme_client`: encrypted account key,
  registration); a CA that cannot be reached is retried with backoff, the master keeps
  running;
* HTTP-01: a `ChallengeBoard` the orchestrator's certificate distribution reads, and an
  `Http01Solver` whose publish callback is `RolloutOrchestrator.publish_challenges` —
  the agents serving the domains get their version again with the tokens, and the order
  goes on once they applied; DNS-01: `Dns01Solver` with the ``dns_provider`` plugin;
* runs the `RenewalScheduler` (one leader among masters sharing PostgreSQL) with the
  master's metrics registry; its events (``cert.renewed``...) go on the bus, where the
  orchestrator picks ``cert.renewed`` up and re-sends the version to the agents whose
  sites use the certificate. The scheduler is in ``services.stash[CERT_RENEWAL]`` (its
  ``health()`` gives the ``certs.renewal`` result). ``version.created`` on the bus wakes
  the scheduler, so a new ``tls: acme`` site is ordered at once, not at its next pass.

Known limit: the challenge board lives in the leader's memory, so with several masters
only the agents connected to the leader receive HTTP-01 tokens (use DNS-01 there).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.abc
import structlog

from nxmesh.core.runtime import StashKey

if TYPE_CHECKING:
    from nxmesh.certs.renewal import RenewalScheduler
    from nxmesh.master.app import MasterServices
    from nxmesh.master.orchestration import RolloutOrchestrator

__all__ = ["CERT_RENEWAL", "acme_enabled", "run_certificate_renewal"]

log = structlog.get_logger("nxmesh.master.acme")

CERT_RENEWAL: Final[StashKey[RenewalScheduler]] = StashKey("nxmesh.master.cert_renewal")
_RETRY_MIN: Final = 5.0
_RETRY_MAX: Final = 600.0


def acme_enabled(services: MasterServices) -> bool:
    """ACME runs when ``[plugins.certs] agree_tos`` is true (registration needs it)."""
    from nxmesh.certs.settings import certs_settings

    return certs_settings(services.settings).agree_tos


async def run_certificate_renewal(
    services: MasterServices,
    orchestrator: RolloutOrchestrator,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """ACME client, solver and renewal scheduler until cancelled (module docstring)."""
    from nxmesh.certs.acme_client import AcmeIssuer, open_acme_client
    from nxmesh.certs.distribution import CertificateDistributor
    from nxmesh.certs.errors import AcmeError
    from nxmesh.certs.http01 import ChallengeBoard, Http01Solver
    from nxmesh.certs.renewal import CertificateMetrics, RenewalPolicy, RenewalScheduler
    from nxmesh.certs.settings import certs_settings

    settings = services.settings
    certs = certs_settings(settings)
    solver: Any
    if certs.challenge == "http-01":
        board = ChallengeBoard()
        orchestrator.distributor = CertificateDistributor(services.storage, board=board)
        solver = Http01Solver(board, orchestrator.publish_challenges)
    else:
        from nxmesh.certs.dns01 import Dns01Solver, dns_provider_from_settings

        solver = Dns01Solver(
            dns_provider_from_settings(settings, services.registry),
            propagation_seconds=certs.dns_propagation_seconds,
        )
    task_status.started()
    delay = _RETRY_MIN
    while True:
        try:
            client = await open_acme_client(settings, services.keyring, certs=certs)
            break
        except AcmeError as exc:
            log.error("ACME CA unreachable or refused the account; retrying",  # noqa: TRY400
                      directory=certs.acme_directory, error=str(exc), retry_in=delay)  # fmt: skip
            await anyio.sleep(delay)
            delay = min(delay * 2, _RETRY_MAX)

    async def workspaces() -> set[str]:
        agents = await services.storage.list_agents()
        return {settings.workspace, *(a.workspace for a in agents)}

    try:
        scheduler = RenewalScheduler(
            services.storage,
            AcmeIssuer(client, solver),
            policy=RenewalPolicy.from_settings(certs),
            publish=services.bus.publish,
            metrics=CertificateMetrics(services.metrics.registry),
            workspaces=workspaces,
        )
        services.stash[CERT_RENEWAL] = scheduler
        log.info("certificate renewal running", directory=certs.acme_directory,
                 challenge=certs.challenge)  # fmt: skip
        async with anyio.create_task_group() as tg:
            tg.start_soon(_wake_on_new_versions, services, scheduler)
            await scheduler.run()
    finally:
        with anyio.CancelScope(shield=True):
            await client.aclose()


async def _wake_on_new_versions(services: MasterServices, scheduler: RenewalScheduler) -> None:
    """A new version (from any master) may add a ``tls: acme`` site: order it now rather
    than at the scheduler's next due time (up to ``check_interval`` later)."""
    while True:
        try:
            async with services.bus.subscribe() as events:
                async for event in events:
                    if event.kind == "version.created":
                        scheduler.wake()
        except Exception as exc:  # the bus is down: renewals go on on their own schedule
            log.warning("certificate renewal: event subscription failed", error=str(exc))
        await anyio.sleep(1.0)
