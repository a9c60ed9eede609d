"""Every hook NxMesh calls, in lifecycle order.

Each spec's docstring is its reference documentation (the docs build includes them
verbatim and a meta-test fails when one is missing). Hooks are **sync and cheap**: the
async work lives on the provider objects the ``nxmesh_register_*`` hooks return.

Provider hooks follow hatchling's shape: each returns a list of *classes* carrying a
``name`` class attribute; `nxmesh.core.registry.ProviderRegistry` collects them and
rejects two providers of one kind with the same name.

Implementations take only the arguments they need, so a spec can grow new arguments
without breaking existing plugins.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nxmesh.core.markers import hookspec

if TYPE_CHECKING:
    import click
    import pluggy

    from nxmesh.core.errors import Problem
    from nxmesh.core.events import Event
    from nxmesh.core.interfaces import (
        Authenticator,
        DeploymentMode,
        DnsProvider,
        EventBus,
        HealthCheck,
        NginxDriver,
        Renderer,
        StorageBackend,
        TransportClient,
        TransportServer,
    )
    from nxmesh.core.model import ApplyReport, DesiredState, PendingApply
    from nxmesh.core.runtime import Runtime
    from nxmesh.core.settings import Settings, SettingsRegistry

# ---------------------------------------------------------------------------------------
# Registration: extend NxMesh itself
# ---------------------------------------------------------------------------------------


@hookspec(historic=True)
def nxmesh_addhooks(pluginmanager: pluggy.PluginManager) -> None:
    """Register hook specs a plugin defines for *other* plugins to implement.

    :param pluginmanager: the NxMesh plugin manager; call
        ``pluginmanager.add_hookspecs(module)``.

    Historic: a plugin registered after the call still receives it once, at
    registration. Called once per plugin manager, right after the built-in specs are
    added.

    .. versionadded:: 0.1
    """


@hookspec
def nxmesh_add_settings(registry: SettingsRegistry) -> None:
    """Declare a plugin's own settings section.

    :param registry: call ``registry.add_section("name", SettingsClass)`` with a frozen
        attrs class whose fields all have defaults. The section is read from the
        ``[plugins.name]`` table of ``nxmesh.toml`` and from ``NXMESH_PLUGINS__NAME__FIELD``
        environment variables; unknown keys are an error with a suggestion.

    Collected from every plugin; called once each time settings are loaded, before
    `nxmesh_configure`.

    .. versionadded:: 0.1
    """


@hookspec(historic=True)
def nxmesh_configure(settings: Settings) -> None:
    """React to the final, validated settings.

    :param settings: the loaded settings; a plugin reads its section with
        ``settings.plugin("name")``.

    Historic: plugins registered later receive the call at registration. Called once
    per application start, after all settings sections are validated and before any
    provider is created. Raise `nxmesh.ConfigurationError` to refuse to start.

    .. versionadded:: 0.1
    """


# ---------------------------------------------------------------------------------------
# Providers: classes the application picks by name or URL scheme
# ---------------------------------------------------------------------------------------


@hookspec
def nxmesh_register_storage_backends() -> Sequence[type[StorageBackend]]:
    """Return storage backend classes.

    Each class carries ``name`` and ``schemes`` (e.g. ``("sqlite",)``); the master picks
    the backend whose scheme matches its ``storage_url`` setting.

    Collected from every plugin; called once when the provider registry is built.
    Two backends claiming the same name are an error naming both plugins.

    .. versionadded:: 0.1
    """
    raise NotImplementedError


@hookspec
def nxmesh_register_transports() -> Sequence[type[TransportServer] | type[TransportClient]]:
    """Return transport server and client classes.

    Each class carries ``name`` and ``schemes`` (``("grpc", "grpcs")``, ``("ws", "wss")``);
    masters start every configured server, agents try clients in configured order and
    fall back to the next when one cannot connect.

    Collected from every plugin; called once when the provider registry is built.

    .. versionadded:: 0.1
    """
    raise NotImplementedError


@hookspec
def nxmesh_register_authenticators() -> Sequence[type[Authenticator]]:
    """Return authenticator classes for the master's API.

    The master builds the chain from the ``auth.chain`` setting (names, in order); the
    first authenticator that *recognises* the credentials decides (accepts or rejects),
    the rest are not asked.

    Collected from every plugin; called once when the provider registry is built.

    .. versionadded:: 0.1
    """
    raise NotImplementedError


@hookspec
def nxmesh_register_renderers() -> Sequence[type[Renderer]]:
    """Return renderer classes that turn a `DesiredState` into an nginx file bundle.

    The application uses the renderer named by the ``renderer.name`` setting (default
    ``nginx``).

    Collected from every plugin; called once when the provider registry is built.

    .. versionadded:: 0.1
    """
    raise NotImplementedError


@hookspec
def nxmesh_template_paths() -> Sequence[Path]:
    """Return directories holding template overrides for the renderer.

    A template found in a returned directory replaces the built-in template with the same
    relative name. Later-registered plugins take precedence over earlier ones; the user's
    ``renderer.template_dir`` setting takes precedence over all plugins.

    Collected from every plugin; called once per renderer instance.

    .. versionadded:: 0.1
    """
    raise NotImplementedError


@hookspec
def nxmesh_register_deployment_modes() -> Sequence[type[DeploymentMode]]:
    """Return deployment mode classes (standalone, docker-sidecar, k8s-sidecar...).

    Each class has a ``detect()`` classmethod; the agent uses the mode named by the
    ``agent.deployment_mode`` setting, or with ``auto`` the first whose ``detect()``
    answers true, in order of the ``priority`` class attribute (highest first).

    Collected from every plugin; called once when the provider registry is built.

    .. versionadded:: 0.1
    """
    raise NotImplementedError


@hookspec
def nxmesh_register_nginx_drivers() -> Sequence[type[NginxDriver]]:
    """Return nginx driver classes: the apply pipeline (test, swap, reload, verify, roll back).

    The agent uses the driver named by the ``agent.nginx_driver`` setting (default
    ``reload``).

    Collected from every plugin; called once when the provider registry is built.

    .. versionadded:: 0.1
    """
    raise NotImplementedError


@hookspec
def nxmesh_register_health_checks() -> Sequence[type[HealthCheck]]:
    """Return health check classes; the agent runs every one that is not disabled.

    Each check's ``run()`` returns typed `HealthResult` objects; the agent folds them
    into the `HealthReport` it sends on an interval and on change.

    Collected from every plugin; called once when the provider registry is built.

    .. versionadded:: 0.1
    """
    raise NotImplementedError


@hookspec
def nxmesh_register_event_buses() -> Sequence[type[EventBus]]:
    """Return event bus classes that carry events between master processes.

    Each carries ``name`` and ``schemes``; the master picks the bus matching its
    ``event_bus_url`` (``memory://`` by default).

    Collected from every plugin; called once when the provider registry is built.

    .. versionadded:: 0.1
    """
    raise NotImplementedError


# ---------------------------------------------------------------------------------------
# Certificates: DNS-01 challenge providers for ACME
# ---------------------------------------------------------------------------------------


@hookspec
def nxmesh_register_dns_providers() -> Sequence[type[DnsProvider]]:
    """Return DNS provider classes that publish ACME DNS-01 challenge TXT records.

    Each class carries ``name``; the master's certificate manager uses the provider named
    by the ``[plugins.certs] dns_provider`` setting (built-in: ``command``, which runs a
    configured program such as an nsupdate script) when ``challenge = "dns-01"``.

    Collected from every plugin; called once when the provider registry is built.
    Two providers claiming the same name are an error naming both plugins.

    .. versionadded:: 0.1
    """
    raise NotImplementedError


# ---------------------------------------------------------------------------------------
# Policy: checks on desired state beyond the model's own validators
# ---------------------------------------------------------------------------------------


@hookspec
def nxmesh_validate_state(state: DesiredState) -> Sequence[Problem]:
    """Check a desired state against a policy and return the problems found.

    :param state: the desired state, already accepted by the model's validators.

    Collected from every plugin; the results are concatenated. Any problem with
    severity ``error`` blocks the state from becoming a version; ``warning`` problems are
    shown to the user. Called every time a state is validated (API, CLI, masterless
    agent), so keep it pure and fast.

    .. versionadded:: 0.1
    """
    raise NotImplementedError


# ---------------------------------------------------------------------------------------
# Lifecycle: plugin services running inside the application's task group
# ---------------------------------------------------------------------------------------


@hookspec
def nxmesh_lifespan(runtime: Runtime) -> AbstractAsyncContextManager[None] | None:
    """Return an async context manager the application keeps entered while it runs.

    :param runtime: the running application; ``runtime.task_group`` starts background
        services (``await runtime.task_group.start(service)``), ``runtime.settings`` and
        ``runtime.registry`` give settings and providers.

    Collected from every plugin; contexts are entered in registration order (built-ins
    first, so third-party lifespans can rely on them; ``tryfirst=True`` enters *last*). On
    shutdown (SIGINT/SIGTERM, ``runtime.shutdown()`` or an error) the services in
    ``runtime.task_group`` are cancelled and awaited first, then the contexts exit in
    reverse order, each shielded from cancellation and bounded by the shutdown timeout,
    so cleanup always runs and never races a service still using the resource. Return
    None to take no part.

    .. versionadded:: 0.1
    """
    raise NotImplementedError


# ---------------------------------------------------------------------------------------
# Agent: observers around each apply
# ---------------------------------------------------------------------------------------


@hookspec
def nxmesh_before_apply(update: PendingApply) -> str | None:
    """Inspect an update the agent is about to apply; return a reason string to veto it.

    :param update: the version, digest and desired state about to be applied.

    Collected from every plugin; any non-empty string vetoes the apply, which is then
    reported as ``vetoed`` with that reason and leaves nginx untouched. Called once per
    apply, before anything is written.

    .. versionadded:: 0.1
    """
    raise NotImplementedError


@hookspec
def nxmesh_after_apply(report: ApplyReport) -> None:
    """Observe the outcome of an apply (applied, noop, vetoed, failed or rolled back).

    :param report: the apply report the agent sends to the master.

    Collected from every plugin; called once per apply after the outcome is known. An
    exception raised here is logged and does not change the outcome.

    .. versionadded:: 0.1
    """


# ---------------------------------------------------------------------------------------
# Master: events and extra API routes
# ---------------------------------------------------------------------------------------


@hookspec
def nxmesh_on_event(event: Event) -> None:
    """Observe an event on the master's event bus (versions, rollouts, agents, audit).

    :param event: the event; ``event.kind`` such as ``version.created``.

    Collected from every plugin; called once per event per master process. Keep it
    cheap: start background work through `nxmesh_lifespan` instead of blocking here. An
    exception raised here is logged and does not stop delivery to other plugins.

    .. versionadded:: 0.1
    """


@hookspec
def nxmesh_api_routes() -> Sequence[Any]:
    """Return extra route handlers the master's HTTP API mounts.

    Route handler objects of the master's web framework. They get the same
    authentication and RBAC as built-in routes.

    Collected from every plugin; called once when the master app is built.

    .. versionadded:: 0.1
    """
    raise NotImplementedError


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------


@hookspec
def nxmesh_cli_commands(cli: click.Group) -> None:
    """Add subcommands to the ``nxmesh`` command.

    :param cli: the root click group; call ``cli.add_command(command)``.

    Collected from every plugin; called once when the CLI starts, before arguments are
    parsed.

    .. versionadded:: 0.1
    """
