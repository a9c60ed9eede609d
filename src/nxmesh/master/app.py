"""The master app: services composed from plugins and settings, and the Litestar API on top.

`open_services` builds everything a master process needs, from the settings:

* the master key (``master_key`` setting, ``NXMESH_MASTER_KEY`` or ``<state_dir>/master.key``)
  and the Ed25519 key that signs versions (``<state_dir>/signing.key``);
* the storage backend picked by the scheme of ``storage_url`` (SQLite in ``state_dir`` by
  default) and the event bus picked by ``event_bus_url`` (``memory://``);
* the renderer (``[renderer]``), the authenticator chain (``auth.chain``), RBAC with the
  custom roles of ``[auth.roles]``, the audit log and the metrics;
* on first start (no users at all): an ``admin`` user whose random password is written to
  ``<state_dir>/initial-admin-password`` (mode 0600) — the log names the file, never the
  password.

`MasterServices` is the one object other components hang off: the API reads it, the
agent transports and the orchestrator receive it. `build_app` returns the Litestar
application; `nxmesh.master.server` serves it with hypercorn on asyncio or trio.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol, runtime_checkable

import anyio
import anyio.abc
import pluggy
import structlog
from litestar import Litestar, Router
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme

from nxmesh import __version__
from nxmesh.core.errors import ConfigurationError, ProviderNotFoundError
from nxmesh.core.events import Event
from nxmesh.core.interfaces import Authenticator, EventBus, Renderer, StorageBackend
from nxmesh.core.logging import shown_url
from nxmesh.core.model import Agent, ConfigVersion, HealthReport
from nxmesh.core.observers import api_routes, dispatch_event
from nxmesh.core.records import User
from nxmesh.core.registry import ProviderRegistries, from_settings_or
from nxmesh.core.runtime import Stash
from nxmesh.core.settings import Settings
from nxmesh.crypto.secrets import (
    MASTER_KEY_FILE,
    MasterKeyring,
    load_master_key,
    load_previous_master_keys,
    write_private_file,
)
from nxmesh.crypto.signing import SIGNING_KEY_FILE, SigningKey
from nxmesh.enrollment import Enrollment
from nxmesh.master.audit import Auditor
from nxmesh.master.auth.passwords import Passwords, generate_password
from nxmesh.master.auth.service import AuthService
from nxmesh.master.auth.store import AuthStore, MemoryAuthStore, SqlAuthStore
from nxmesh.master.auth.tokens import JWT_KEY_FILE, AccessTokens
from nxmesh.master.bus_follow import follow_bus
from nxmesh.master.metrics import MasterMetrics
from nxmesh.master.rbac import Rbac

if TYPE_CHECKING:
    from nxmesh.master.changes import ConfigChanges

__all__ = [
    "INITIAL_ADMIN_FILE",
    "INITIAL_ADMIN_USER",
    "AgentHealthCache",
    "MasterServices",
    "NoopOrchestrator",
    "Orchestrator",
    "build_app",
    "build_chain",
    "follow_bus",
    "open_services",
    "rewrap_all",
    "rewrap_secrets",
    "shown_url",
]

INITIAL_ADMIN_USER: Final = "admin"
INITIAL_ADMIN_FILE: Final = "initial-admin-password"
_CLOSE_TIMEOUT: Final = 10.0

log = structlog.get_logger("nxmesh.master")


# ---------------------------------------------------------------------------------------
# Extension points other components fill in
# ---------------------------------------------------------------------------------------


@runtime_checkable
class Orchestrator(Protocol):
    """What the API tells the rollout machinery (pushing versions to agents).

    The API calls it *after* the change is stored and announced on the event bus; the
    default does nothing, so the API works without any transport. Implementations must
    not raise for agents being offline: that is the normal case.
    """

    async def version_created(self, version: ConfigVersion) -> None:
        """A new version of `version.workspace` was stored (also rollbacks)."""
        ...

    async def assignments_changed(self, workspace: str) -> None:
        """An assignment of `workspace` was created, changed or deleted."""
        ...

    async def agent_changed(self, agent: Agent) -> None:
        """An agent's labels changed, so its desired version may have changed."""
        ...

    async def agent_revoked(self, agent_id: str) -> None:
        """An agent's credentials were revoked: close its stream now."""
        ...


class NoopOrchestrator:
    """The default `Orchestrator`: stores nothing, pushes nothing."""

    async def version_created(self, version: ConfigVersion) -> None:
        return None

    async def assignments_changed(self, workspace: str) -> None:
        return None

    async def agent_changed(self, agent: Agent) -> None:
        return None

    async def agent_revoked(self, agent_id: str) -> None:
        return None


class AgentHealthCache:
    """The latest `HealthReport` of each agent, as received by this master process.

    Health is reported often and is only interesting while fresh, so it is kept in
    memory rather than in storage; transports call `update`, the API reads `get`.
    """

    def __init__(self) -> None:
        self._reports: dict[str, HealthReport] = {}

    def update(self, report: HealthReport) -> None:
        self._reports[report.agent_id] = report

    def get(self, agent_id: str) -> HealthReport | None:
        return self._reports.get(agent_id)

    def forget(self, agent_id: str) -> None:
        self._reports.pop(agent_id, None)


# ---------------------------------------------------------------------------------------
# Services
# ---------------------------------------------------------------------------------------


class MasterServices:
    """Everything a running master process shares between its components.

    A plain class rather than an attrs one: Litestar's signature model would otherwise
    introspect (and try to validate) it for every request that depends on it.
    """

    def __init__(
        self,
        *,
        pm: pluggy.PluginManager,
        settings: Settings,
        registry: ProviderRegistries,
        storage: StorageBackend,
        bus: EventBus,
        keyring: MasterKeyring,
        signer: SigningKey,
        renderer: Renderer,
        auth: AuthService,
        rbac: Rbac,
        audit: Auditor,
        metrics: MasterMetrics,
        enrollment: Enrollment,
        orchestrator: Orchestrator | None = None,
        health: AgentHealthCache | None = None,
    ) -> None:
        self.pm = pm
        self.settings = settings
        self.registry = registry
        self.storage = storage
        self.bus = bus
        self.keyring = keyring
        self.signer = signer
        self.renderer = renderer
        self.auth = auth
        self.rbac = rbac
        self.audit = audit
        self.metrics = metrics
        self.enrollment = enrollment
        self.orchestrator: Orchestrator = orchestrator or NoopOrchestrator()
        self.health = health or AgentHealthCache()
        self.stash = Stash()
        """Typed state for components added later (transports, orchestrator, plugins)."""

    def __repr__(self) -> str:
        return f"MasterServices(storage={self.storage!r}, state_dir={str(self.state_dir)!r})"

    @property
    def state_dir(self) -> Path:
        return self.settings.state_dir

    @property
    def changes(self) -> ConfigChanges:
        """The one way to change desired state (validate, sign, store, announce)."""
        from nxmesh.master.changes import ConfigChanges

        return ConfigChanges(self)

    async def publish(self, kind: str, payload: Mapping[str, Any], *, workspace: str) -> None:
        """Put an event on the bus (every master process, the events WebSocket)."""
        await self.bus.publish(Event(kind, payload=dict(payload), workspace=workspace))

    async def run_event_dispatch(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Deliver every event on the bus to the ``nxmesh_on_event`` hooks, until cancelled.

        A bus may end a subscription (one that fell behind, or its database went away);
        the dispatcher then subscribes again until that works (`follow_bus`). Events
        missed meanwhile are lost to the hooks, which the log says.
        """
        await follow_bus(
            self.bus,
            lambda event: dispatch_event(self.pm, event),
            subscriber="event hooks",
            task_status=task_status,
        )


def build_chain(services: MasterServices) -> list[Authenticator]:
    """The authenticators named by ``auth.chain``, in order.

    Each class is built with ``cls.from_services(services)`` when it has that
    classmethod, else ``cls()``.

    :raises ConfigurationError: a name no loaded plugin registers.
    """
    registry = services.registry["authenticator"]
    chain: list[Authenticator] = []
    for name in services.settings.auth.chain:
        try:
            cls = registry.get(name)
        except ProviderNotFoundError as exc:
            raise ConfigurationError(f"auth.chain: {exc}") from None
        factory = getattr(cls, "from_services", None)
        chain.append(factory(services) if callable(factory) else cls())
    return chain


def _renderer(pm: pluggy.PluginManager, settings: Settings) -> Renderer:
    try:
        from nxmesh.plugins.render_nginx import renderer_for
    except ImportError:  # pragma: no cover - the built-in renderer is part of the wheel
        cls = ProviderRegistries.collect(pm)["renderer"].get(settings.renderer.name)
        renderer: Renderer = cls(template_paths=[])
        return renderer
    return renderer_for(pm, settings)


def _auth_store(storage: StorageBackend) -> AuthStore:
    from nxmesh.sql.backend import SqlStorage

    # An in-memory SQLite database is one shared connection: keep tokens beside it.
    if isinstance(storage, SqlStorage) and storage.engine.url.database not in (
        None,
        "",
        ":memory:",
    ):
        return SqlAuthStore(storage.engine)
    return MemoryAuthStore()


@contextlib.asynccontextmanager
async def open_services(
    pm: pluggy.PluginManager,
    settings: Settings,
    *,
    orchestrator: Orchestrator | None = None,
    clock: Callable[[], float] = time.time,
    rewrap: bool = True,
) -> AsyncIterator[MasterServices]:
    """Compose and open the master's services; close them (shielded) on exit.

    With previous master keys configured, stored secrets still under one are re-encrypted
    before the services are handed out (`rewrap_secrets`), unless `rewrap` is false
    (``nxmesh master rewrap-secrets`` does it itself, to report and fail loudly).

    :raises ConfigurationError: an unknown storage or bus scheme, authenticator or role.
    :raises SecretError: an unreadable or unsafe key file.
    """
    state_dir = settings.state_dir
    registry = ProviderRegistries.collect(pm)

    def load_keys() -> tuple[MasterKeyring, SigningKey]:
        key = load_master_key(setting=settings.master_key, key_file=state_dir / MASTER_KEY_FILE)
        previous = load_previous_master_keys(
            settings.previous_master_keys, settings.previous_master_key_files
        )
        keyring = MasterKeyring(key, previous=previous)
        # Re-encrypts the file under the current key when a previous one still locks it.
        return keyring, SigningKey.load_or_create(state_dir / SIGNING_KEY_FILE, keyring)

    keyring, signer = await anyio.to_thread.run_sync(load_keys)
    rbac = Rbac(settings.auth.roles)
    try:
        storage_cls = registry["storage"].by_scheme(settings.effective_storage_url())
        bus_cls = registry["event_bus"].by_scheme(settings.event_bus_url)
    except ProviderNotFoundError as exc:
        raise ConfigurationError(str(exc)) from None
    storage: StorageBackend = from_settings_or(
        storage_cls,
        settings,
        lambda: storage_cls(settings.effective_storage_url(), keyring=keyring),
        keyring=keyring,
    )
    bus: EventBus = from_settings_or(bus_cls, settings, lambda: bus_cls(settings.event_bus_url))
    async with contextlib.AsyncExitStack() as stack:
        await storage.open()
        stack.push_async_callback(_shielded, storage.aclose)
        await bus.open()
        stack.push_async_callback(_shielded, bus.aclose)
        auth_store = _auth_store(storage)
        await auth_store.open()
        stack.push_async_callback(_shielded, auth_store.aclose)

        tokens = await anyio.to_thread.run_sync(
            lambda: AccessTokens.load_or_create(
                state_dir / JWT_KEY_FILE,
                keyring,
                issuer=settings.auth.issuer,
                audience=settings.auth.audience,
                ttl=settings.auth.access_token_ttl,
                clock=clock,
            )
        )
        metrics = MasterMetrics()
        auth = AuthService(
            settings=settings.auth,
            tokens=tokens,
            store=auth_store,
            passwords=Passwords(settings.auth),
            rbac=rbac,
            storage=storage,
            on_failure=metrics.auth_failed,
            clock=clock,
        )
        services = MasterServices(
            pm=pm,
            settings=settings,
            registry=registry,
            storage=storage,
            bus=bus,
            keyring=keyring,
            signer=signer,
            renderer=_renderer(pm, settings),
            auth=auth,
            rbac=rbac,
            audit=Auditor(storage, bus),
            metrics=metrics,
            enrollment=Enrollment(storage, clock=clock),
            orchestrator=orchestrator,
        )
        auth.chain = build_chain(services)
        await ensure_initial_admin(services)
        if rewrap and len(keyring.key_ids) > 1:
            await rewrap_secrets(services)
        log.info(
            "master services ready",
            storage=repr(storage),
            event_bus=shown_url(settings.event_bus_url),
            signing_key_id=signer.key_id,
            auth_chain=list(settings.auth.chain),
        )
        yield services


async def rewrap_secrets(services: MasterServices) -> int:
    """Re-encrypt what is still under a previous master key with the current one
    (`rewrap_all`). Runs at every start with previous keys configured (the signing and
    API token keys are re-encrypted as they load); returns how many secrets moved.

    A failure is logged, not raised: the master still works (the previous keys still
    read what is left), and the next start tries again.
    """
    keyring = services.keyring
    try:
        moved = await rewrap_all(services)
    except Exception as exc:  # e.g. a token under a key that is not in the ring
        log.error("stored secrets not re-encrypted under the current master key; "  # noqa: TRY400
                  "keep the previous master keys configured",
                  master_key_id=keyring.key_id, error=str(exc))  # fmt: skip
        return 0
    log.warning(
        "secrets re-encrypted under the current master key; once every master has started "
        "with it, remove previous_master_keys / previous_master_key_files",
        master_key_id=keyring.key_id,
        previous_key_ids=list(keyring.key_ids[1:]),
        rewrapped=moved,
    )
    return moved


async def rewrap_all(services: MasterServices) -> int:
    """Re-encrypt the stored secrets (`StorageBackend.rewrap_secrets`) and the ACME
    account keys still under a previous master key; returns how many moved. Raises what
    fails (`rewrap_secrets` is the forgiving form the master runs at start)."""
    moved = await services.storage.rewrap_secrets()
    moved += await anyio.to_thread.run_sync(
        _rewrap_acme_account_keys, services.settings, services.keyring
    )
    return moved


def _rewrap_acme_account_keys(settings: Settings, keyring: MasterKeyring) -> int:
    from nxmesh.certs.acme_client import rewrap_account_keys
    from nxmesh.certs.settings import certs_settings

    return rewrap_account_keys(settings, certs_settings(settings), keyring)


async def _shielded(close: Callable[[], Any]) -> None:
    with anyio.move_on_after(_CLOSE_TIMEOUT, shield=True):
        await close()


async def ensure_initial_admin(services: MasterServices) -> bool:
    """Create the first admin when no user exists; True when it did.

    The password goes to ``<state_dir>/initial-admin-password`` (0600) and nowhere else:
    the log line names the file.
    """
    if await services.storage.list_users():
        return False
    password = generate_password()
    password_hash = await services.auth.passwords.hash_in_thread(password)
    path = services.state_dir / INITIAL_ADMIN_FILE
    await anyio.to_thread.run_sync(
        lambda: write_private_file(path, f"{password}\n".encode(), replace=True)
    )
    await services.storage.put_user(
        User(username=INITIAL_ADMIN_USER, password_hash=password_hash, roles=("admin",))
    )
    log.warning(
        "initial admin user created; its password is in the file, change it after logging in",
        username=INITIAL_ADMIN_USER,
        password_file=str(path),
    )
    return True


# ---------------------------------------------------------------------------------------
# The Litestar application
# ---------------------------------------------------------------------------------------


def build_app(
    services: MasterServices | None = None,
    *,
    pm: pluggy.PluginManager | None = None,
    settings: Settings | None = None,
    extra_routes: Sequence[Any] = (),
) -> Litestar:
    """The master's HTTP API as a Litestar ASGI application.

    Give `services` when the caller owns them (``nxmesh master`` does, to share them
    with the transports); otherwise give `pm` and `settings` and the application opens
    its own services in its lifespan (tests, embedding). Routes plugins return from
    ``nxmesh_api_routes`` are mounted too and get the same authentication and RBAC.
    """
    from nxmesh.master.api import ROUTES, api_router, openapi_json
    from nxmesh.master.api.context import authorize, provide_caller, provide_services
    from nxmesh.master.api.dto import ConverterPlugin, ModelSchemaPlugin
    from nxmesh.master.api.middleware import request_context
    from nxmesh.master.events_ws import events_websocket
    from nxmesh.master.problems import exception_handlers

    if services is None and (pm is None or settings is None):
        raise TypeError("build_app needs services, or pm and settings to open them")
    plugin_pm = services.pm if services is not None else pm
    assert plugin_pm is not None
    state = State({"services": services})
    lifespan: list[Callable[[Litestar], contextlib.AbstractAsyncContextManager[None]]] = []
    if services is None:
        assert pm is not None
        assert settings is not None
        lifespan.append(_owned_services(pm, settings))

    openapi = OpenAPIConfig(
        title="NxMesh master API",
        version=__version__,
        description="Manage fleets of nginx servers. Errors are RFC 9457 problem+json.",
        path="/docs",
        render_plugins=[SwaggerRenderPlugin(path="/")],
        openapi_router=Router(
            path="/docs", route_handlers=[], opt={"public": True}, include_in_schema=False
        ),
        components=Components(
            security_schemes={
                "bearer": SecurityScheme(
                    type="http",
                    scheme="bearer",
                    bearer_format="JWT or nxm_ API token",
                    description="An access token from /api/v1/auth/login, or an API token.",
                )
            }
        ),
    )
    return Litestar(
        route_handlers=[
            *ROUTES,
            api_router(),
            openapi_json,
            events_websocket,
            *extra_routes,
            *api_routes(plugin_pm),
        ],
        guards=[authorize],
        dependencies={
            "services": Provide(provide_services, sync_to_thread=False),
            "caller": Provide(provide_caller),
        },
        plugins=[ConverterPlugin(), ModelSchemaPlugin()],
        exception_handlers=exception_handlers(),
        middleware=[request_context],
        openapi_config=openapi,
        state=state,
        lifespan=lifespan,
        logging_config=None,
        request_max_body_size=8 * 1024 * 1024,
    )


def _owned_services(
    pm: pluggy.PluginManager, settings: Settings
) -> Callable[[Litestar], contextlib.AbstractAsyncContextManager[None]]:
    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with open_services(pm, settings) as services:
            app.state.services = services
            async with anyio.create_task_group() as tg:
                await tg.start(services.run_event_dispatch)
                try:
                    yield
                finally:
                    tg.cancel_scope.cancel()

    return lifespan
