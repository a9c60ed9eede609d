"""Build the plugin manager: specs → built-ins → third-party entry points → check_pending.

Nothing happens at import time: every application, test and CLI call builds its own
manager with `get_plugin_manager`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import attrs
import pluggy
import structlog

from nxmesh.core import hookspecs
from nxmesh.core.errors import PluginLoadError
from nxmesh.core.hints import closest
from nxmesh.core.markers import PROJECT_NAME

__all__ = [
    "BUILTIN_DISTRIBUTION",
    "ENV_DISABLE_AUTOLOAD",
    "ENV_DISABLE_PLUGINS",
    "ENV_STRICT",
    "ENV_TRACE",
    "NxMeshPluginManager",
    "PluginInfo",
    "get_plugin_manager",
]

BUILTIN_DISTRIBUTION = "nxmesh"
ENV_DISABLE_PLUGINS = "NXMESH_DISABLE_PLUGINS"
ENV_DISABLE_AUTOLOAD = "NXMESH_DISABLE_PLUGIN_AUTOLOAD"
ENV_TRACE = "NXMESH_TRACE_HOOKS"
ENV_STRICT = "NXMESH_STRICT_PLUGINS"

_TRUE = {"1", "true", "yes", "on"}
log = structlog.get_logger("nxmesh.plugins")


@attrs.frozen
class PluginInfo:
    """Where a registered plugin came from."""

    name: str
    distribution: str | None
    version: str | None
    builtin: bool


class NxMeshPluginManager(pluggy.PluginManager):
    """A pluggy manager that remembers where each plugin came from and what failed to load."""

    def __init__(self) -> None:
        super().__init__(PROJECT_NAME)
        self.load_errors: list[PluginLoadError] = []
        self.plugin_info: dict[str, PluginInfo] = {}
        self.warnings: list[str] = []
        """What an operator should know that stopped nothing (`nxmesh plugins` shows it)."""

    def register_plugin(
        self, plugin: object, name: str, info: PluginInfo | None = None
    ) -> str | None:
        registered = self.register(plugin, name=name)
        if registered is not None:
            self.plugin_info[registered] = info or PluginInfo(name, None, None, builtin=False)
        return registered

    def hooks_of(self, name: str) -> list[str]:
        """Names of the hooks the plugin `name` implements."""
        plugin = self.get_plugin(name)
        callers = self.get_hookcallers(plugin) if plugin is not None else None
        return sorted(c.name for c in callers or ())


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in _TRUE


def _split_names(value: str | None) -> list[str]:
    return [n.strip() for n in (value or "").split(",") if n.strip()]


def get_plugin_manager(
    *,
    disabled: Iterable[str] = (),
    autoload: bool | None = None,
    strict: bool | None = None,
    trace: bool | None = None,
    plugins: Iterable[tuple[str, object]] = (),
    environ: Mapping[str, str] | None = None,
) -> NxMeshPluginManager:
    """Build a plugin manager with every enabled plugin registered.

    :param disabled: plugin names to block (added to ``NXMESH_DISABLE_PLUGINS``).
    :param autoload: load third-party entry points; default from
        ``NXMESH_DISABLE_PLUGIN_AUTOLOAD`` (set → off). Built-ins always load.
    :param strict: raise the first `PluginLoadError` instead of recording it; default
        from ``NXMESH_STRICT_PLUGINS``.
    :param trace: log every hook call; default from ``NXMESH_TRACE_HOOKS``.
    :param plugins: extra ``(name, plugin)`` pairs registered after entry points (tests,
        embedding applications).
    :param environ: environment to read instead of `os.environ`.
    """
    env = os.environ if environ is None else environ
    if autoload is None:
        autoload = not _truthy(env.get(ENV_DISABLE_AUTOLOAD))
    if strict is None:
        strict = _truthy(env.get(ENV_STRICT))
    if trace is None:
        trace = _truthy(env.get(ENV_TRACE))

    pm = NxMeshPluginManager()
    pm.add_hookspecs(hookspecs)
    blocked = {*disabled, *_split_names(env.get(ENV_DISABLE_PLUGINS))}
    for name in blocked:
        pm.set_blocked(name)
    if trace:
        pm.trace.root.setwriter(lambda msg: log.debug("hook", trace=msg.rstrip()))
        pm.enable_tracing()

    # Historic: each plugin registered below receives it at registration time.
    pm.hook.nxmesh_addhooks.call_historic(kwargs={"pluginmanager": pm})
    builtin, third_party = _partition(entry_points(group=PROJECT_NAME))
    for ep in builtin:
        _load_entry_point(pm, ep, builtin=True, strict=True)
    if autoload:
        for ep in third_party:
            _load_entry_point(pm, ep, builtin=False, strict=strict)
    for name, plugin in plugins:
        pm.register_plugin(plugin, name)

    _check_pending(pm, strict=strict)
    # A misspelt name blocks nothing, and the plugin meant stays loaded: say so.
    known = {ep.name for ep in (*builtin, *third_party)} | {name for name, _ in plugins}
    for name in sorted(blocked - known):
        hint = closest(name, known)
        warning = (
            f"{ENV_DISABLE_PLUGINS} names {name!r}, which is no installed plugin, so it "
            "disables nothing" + (f" (did you mean {hint!r}?)" if hint else "")
        )
        pm.warnings.append(warning)
        log.warning("unknown plugin to disable", name=name, did_you_mean=hint)
    return pm


def _check_pending(pm: NxMeshPluginManager, *, strict: bool) -> None:
    """`check_pending`, but a third-party plugin implementing unknown hooks only drops itself."""
    while True:
        try:
            pm.check_pending()
        except pluggy.PluginValidationError as exc:
            name = pm.get_name(exc.plugin)
            info = pm.plugin_info.get(name or "")
            if name is None or info is None or info.builtin or strict:
                raise
            pm.unregister(name=name)
            error = PluginLoadError(name, info.distribution or "<unknown>", str(exc))
            pm.load_errors.append(error)
            log.warning("plugin rejected", plugin=name, error=str(exc))
        else:
            return


def _partition(eps: Iterable[EntryPoint]) -> tuple[list[EntryPoint], list[EntryPoint]]:
    builtin: list[EntryPoint] = []
    third_party: list[EntryPoint] = []
    seen: set[str] = set()
    for ep in sorted(eps, key=lambda e: (_dist_name(e) or "", e.name)):
        # The same distribution can be visible twice (e.g. an editable install and a
        # build dir on sys.path); register each entry point name once.
        if ep.name in seen:
            continue
        seen.add(ep.name)
        (builtin if _dist_name(ep) == BUILTIN_DISTRIBUTION else third_party).append(ep)
    return builtin, third_party


def _dist_name(ep: EntryPoint) -> str | None:
    return ep.dist.name if ep.dist is not None else None


def _load_entry_point(
    pm: NxMeshPluginManager, ep: EntryPoint, *, builtin: bool, strict: bool
) -> None:
    if pm.is_blocked(ep.name):
        return
    dist = _dist_name(ep) or "<unknown distribution>"
    info = PluginInfo(
        name=ep.name,
        distribution=dist,
        version=ep.dist.version if ep.dist is not None else None,
        builtin=builtin,
    )
    try:
        plugin: Any = ep.load()
        pm.register_plugin(plugin, ep.name, info)
    except Exception as exc:  # a broken plugin must not stop the others
        error = PluginLoadError(ep.value, dist, f"{type(exc).__name__}: {exc}")
        # Registration may have half-happened (a bad hookimpl fails at register time).
        if pm.get_plugin(ep.name) is not None:
            pm.unregister(name=ep.name)
        if strict:
            raise error from exc
        pm.load_errors.append(error)
        log.warning("plugin failed to load", plugin=ep.name, distribution=dist, error=str(exc))
