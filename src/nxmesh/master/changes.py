"""Changing a workspace's desired state: validate everything, sign, store, announce.

Every change — a whole state, one site, one upstream, a rollback — goes through
`ConfigChanges.commit`: the new *complete* state is checked (model rules, cross-object
rules, every ``nxmesh_validate_state`` policy, uploaded certificates it names, and a
preview render), then stored as the next signed `ConfigVersion` in one atomic write,
then announced (``version.created`` on the event bus, `Orchestrator.version_created`).
Nothing is stored unless all of it passed, so no half-applied change exists. A stored
version whose announcement fails (the bus is down) is still committed and still handed
to this process's orchestrator; the other masters' periodic full reconcile finds it.

Edits are read-modify-write on the latest version; when another writer stored a version
in between, the edit is re-applied on top of theirs (optimistic concurrency), unless the
caller pinned `expected_version`, which then fails with 409.

A stored version is verified (digest and signature, with the master's own key) before
anything is built on it — the latest before every commit, the target of a rollback — so
an edit made directly in the database is refused (`VersionError`, a 409) instead of
being signed into a new version.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import anyio
import attrs
import structlog

from nxmesh.certs.validate import check_state_certificates
from nxmesh.config.diff import StateDiff, bundle_diff, diff_states
from nxmesh.config.versions import (
    new_version,
    require_verified,
    rollback_version,
    state_digest,
)
from nxmesh.core.bundle import Bundle
from nxmesh.core.errors import NxMeshError, Problem, ValidationError
from nxmesh.core.events import Event
from nxmesh.core.model import ConfigVersion, DesiredState, check_state
from nxmesh.core.policy import policy_problems
from nxmesh.core.protocol import MAX_BODY
from nxmesh.core.records import VersionConflictError
from nxmesh.core.serialization import canonical_json
from nxmesh.master.problems import Conflict, NotFound
from nxmesh.master.tracing import inject_context, span

if TYPE_CHECKING:
    from nxmesh.master.app import MasterServices

__all__ = ["MAX_STATE_BYTES", "CommitResult", "ConfigChanges", "Preview"]

_ATTEMPTS: Final = 5
MAX_STATE_BYTES: Final = MAX_BODY - 4 * 1024 * 1024
"""The most canonical JSON a committed state may hold: an agent refuses a version whose
frame body is over `MAX_BODY`, and the body also carries the version's metadata and that
agent's certificates (4 MiB left for those). Without the limit such a version would be
stored and pushed, and no agent could read it nor say why."""

log = structlog.get_logger("nxmesh.master.changes")


@attrs.frozen
class CommitResult:
    """The version a change produced (`created` False: the state was already current)."""

    version: ConfigVersion
    created: bool
    warnings: tuple[Problem, ...] = ()


@attrs.frozen
class Preview:
    """What a change would do, without storing anything (``dry_run``)."""

    base: ConfigVersion | None
    state: DesiredState
    diff: StateDiff
    bundle_diff: str
    warnings: tuple[Problem, ...]

    @property
    def changed(self) -> bool:
        return self.base is None or self.base.digest != state_digest(self.state)


class ConfigChanges:
    """Validates, versions and announces desired-state changes of any workspace."""

    def __init__(self, services: MasterServices) -> None:
        self.services = services

    # -- checks ----------------------------------------------------------------------------

    async def check(self, state: DesiredState) -> tuple[list[Problem], Bundle]:
        """Every rule over the complete `state`; returns the warnings and the preview render.

        :raises ValidationError: any error-severity problem, all of them at once.
        """
        s = self.services
        problems = [*check_state(state), *policy_problems(s.pm, state)]
        size = len(canonical_json(state))
        if size > MAX_STATE_BYTES:
            problems.append(
                Problem(
                    "",
                    f"is {size} bytes of canonical JSON, over the {MAX_STATE_BYTES} a version "
                    f"may hold: a version travels to an agent in one frame of at most "
                    f"{MAX_BODY} bytes, with its metadata and the agent's certificates; "
                    "split it into workspaces",
                )
            )
        for i, ref in enumerate(state.certificates):
            if (
                ref.source == "upload"
                and await s.storage.get_certificate(state.workspace, ref.name) is None
            ):
                problems.append(
                    Problem(
                        f"certificates[{i}].name",
                        f"no uploaded certificate named {ref.name!r} in workspace "
                        f"{state.workspace!r}; upload it first (POST .../certificates)",
                    )
                )
        problems += await self._certificate_problems(state)
        errors = [p for p in problems if p.severity == "error"]
        if errors:
            raise ValidationError(errors, source="api")
        return [p for p in problems if p.severity != "error"], await self.render(state)

    async def _certificate_problems(self, state: DesiredState) -> list[Problem]:
        """Sites and TLS streams against the stored certificates they name: names covered,
        not expired."""
        names = {s.tls.certificate for s in state.sites if s.tls and s.tls.certificate}
        names.update(stream.tls.certificate for stream in state.streams if stream.tls)
        stored = {}
        for name in sorted(names):
            cert = await self.services.storage.get_certificate(state.workspace, name)
            if cert is not None:
                stored[name] = cert
        return check_state_certificates(state, stored) if stored else []

    async def render(self, state: DesiredState) -> Bundle:
        """The nginx bundle of `state` (rendering runs in a worker thread)."""
        try:
            return await anyio.to_thread.run_sync(self.services.renderer.render, state)
        except NxMeshError as exc:
            raise ValidationError([Problem("<render>", str(exc))], source="api") from None

    # -- preview -----------------------------------------------------------------------------

    async def preview(self, workspace: str, state: DesiredState) -> Preview:
        """The model diff and rendered diff from the latest version to `state`."""
        base = await self.services.storage.latest_version(workspace)
        warnings, bundle = await self.check(state)
        old_bundle = await self.render(base.state) if base is not None else None
        return Preview(
            base=base,
            state=state,
            diff=diff_states(base.state if base else None, state),
            bundle_diff=bundle_diff(old_bundle, bundle),
            warnings=tuple(warnings),
        )

    # -- commit ------------------------------------------------------------------------------

    async def commit(
        self,
        workspace: str,
        edit: Callable[[DesiredState], DesiredState],
        *,
        author: str,
        message: str,
        expected_version: int | None = None,
    ) -> CommitResult:
        """Apply `edit` to the latest state of `workspace` and store the result.

        `edit` receives the current state (an empty one before the first version) and
        returns the new complete state; it may raise `ValidationError`, `NotFound` or
        `Conflict` to refuse. `expected_version` pins the version the edit is based on
        (0: none yet); a different latest version is a 409 instead of a retry.

        :raises VersionError: the latest version fails verification (edited in storage).
        """
        storage = self.services.storage
        for _ in range(_ATTEMPTS):
            latest = await storage.latest_version(workspace)
            if latest is not None:
                require_verified(
                    latest,
                    self.services.signer.verify_key,
                    refusing="commit a change",
                    what="the latest",
                )
            current = latest.number if latest else 0
            if expected_version is not None and expected_version != current:
                raise Conflict(
                    f"workspace {workspace!r} is at version {current}, not {expected_version}; "
                    "reload and retry"
                )
            base = latest.state if latest else DesiredState(workspace=workspace)
            state = edit(base)
            if state.workspace != workspace:
                state = attrs.evolve(state, workspace=workspace)
            if latest is not None and latest.digest == state_digest(state):
                return CommitResult(latest, created=False)
            warnings, _bundle = await self.check(state)
            try:
                version = await self._store(state, latest, author=author, message=message)
            except VersionConflictError:
                if expected_version is not None:
                    raise Conflict(f"workspace {workspace!r} changed concurrently") from None
                continue  # someone else stored a version: redo the edit on top of it
            await self._announce(version)
            return CommitResult(version, created=True, warnings=tuple(warnings))
        raise Conflict(f"workspace {workspace!r} is changing too fast; retry")

    async def rollback(
        self, workspace: str, number: int, *, author: str, message: str | None = None
    ) -> CommitResult:
        """A new version whose state equals version `number`'s (history is append-only).

        :raises VersionError: version `number` or the latest one fails verification.
        """
        storage = self.services.storage
        target = await storage.get_version(workspace, number)
        if target is None:
            raise NotFound(f"workspace {workspace!r} has no version {number}")
        # Before anything else (the checks render the target's state): a tampered target
        # is refused for what it is. `rollback_version` verifies it and the latest again.
        require_verified(
            target, self.services.signer.verify_key, refusing=f"roll back to version {number}"
        )
        for _ in range(_ATTEMPTS):
            latest = await storage.latest_version(workspace)
            assert latest is not None  # target exists, so some version does
            if latest.digest == target.digest:
                return CommitResult(latest, created=False)
            await self.check(target.state)
            with span("nxmesh.version.create", {"nxmesh.workspace": workspace}):
                version = rollback_version(
                    target,
                    previous=latest,
                    author=author,
                    signer=self.services.signer,
                    message=message,
                )
                try:
                    await storage.add_version(version)
                except VersionConflictError:
                    continue
            await self._announce(version, rollback_of=number)
            return CommitResult(version, created=True)
        raise Conflict(f"workspace {workspace!r} is changing too fast; retry")

    async def _store(
        self, state: DesiredState, latest: ConfigVersion | None, *, author: str, message: str
    ) -> ConfigVersion:
        with span("nxmesh.version.create", {"nxmesh.workspace": state.workspace}):
            version = new_version(
                state, previous=latest, author=author, message=message, signer=self.services.signer
            )
            await self.services.storage.add_version(version)
        return version

    async def _announce(self, version: ConfigVersion, *, rollback_of: int | None = None) -> None:
        s = self.services
        s.metrics.versions_created.inc()
        payload: dict[str, object] = {
            "workspace": version.workspace,
            "number": version.number,
            "digest": version.digest,
            "parent_digest": version.parent_digest,
            "author": version.author,
            "message": version.message,
            "created_at": version.created_at,
        }
        if rollback_of is not None:
            payload["rollback_of"] = rollback_of
        # The push path continues this trace: see nxmesh.master.tracing.extract_context.
        trace = inject_context()
        if trace:
            payload["trace"] = trace
        log.info(
            "version created",
            workspace=version.workspace,
            number=version.number,
            digest=version.digest[:12],
            author=version.author,
        )
        try:
            await s.bus.publish(
                Event("version.created", payload=payload, workspace=version.workspace)
            )
        except Exception as exc:
            # The version is stored: the commit succeeded. Other masters push it on their
            # next full reconcile (at most `reconcile_interval` later); this one at once.
            log.warning(
                "version stored but not announced on the event bus",
                workspace=version.workspace,
                number=version.number,
                error=str(exc).strip() or type(exc).__name__,
            )
        await s.orchestrator.version_created(version)
