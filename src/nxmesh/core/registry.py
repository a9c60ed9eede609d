"""Provider registries: the classes plugins register, keyed by name, duplicates rejected."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast
from urllib.parse import urlsplit

import attrs
import pluggy

from nxmesh.core.errors import DuplicateProviderError, NxMeshError, ProviderNotFoundError
from nxmesh.core.hints import closest

if TYPE_CHECKING:
    from nxmesh.core.settings import Settings

__all__ = [
    "PROVIDER_HOOKS",
    "ProviderRegistries",
    "ProviderRegistry",
    "RegisteredProvider",
    "from_settings_or",
]

T = TypeVar("T")

PROVIDER_HOOKS: dict[str, str] = {
    "storage": "nxmesh_register_storage_backends",
    "transport": "nxmesh_register_transports",
    "authenticator": "nxmesh_register_authenticators",
    "renderer": "nxmesh_register_renderers",
    "deployment_mode": "nxmesh_register_deployment_modes",
    "nginx_driver": "nxmesh_register_nginx_drivers",
    "health_check": "nxmesh_register_health_checks",
    "event_bus": "nxmesh_register_event_buses",
    "dns_provider": "nxmesh_register_dns_providers",
}
"""Provider kind → the hook that registers it."""


def from_settings_or(
    cls: type[Any], settings: Settings, default: Callable[[], T], **kwargs: Any
) -> T:
    """A provider built with ``cls.from_settings(settings, **kwargs)`` when the class has
    that classmethod (so it reads its plugin's settings section: pool sizes, timeouts),
    else with `default`. Every place that builds a provider goes through here: one built
    by hand once left the PostgreSQL event bus without its section."""
    factory = getattr(cls, "from_settings", None)
    return cast("T", factory(settings, **kwargs)) if callable(factory) else default()


@attrs.frozen
class RegisteredProvider:
    """One provider class and the plugin that registered it."""

    kind: str
    name: str
    cls: type[Any]
    plugin: str


@attrs.define
class ProviderRegistry(Generic[T]):
    """The providers of one kind, by name."""

    kind: str
    _entries: dict[str, RegisteredProvider] = attrs.field(factory=dict)

    def add(self, cls: type[T], plugin: str) -> None:
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise NxMeshError(
                f"{self.kind} provider {cls.__qualname__} from plugin {plugin!r} "
                "has no 'name' class attribute"
            )
        if name in self._entries:
            raise DuplicateProviderError(self.kind, name, self._entries[name].plugin, plugin)
        self._entries[name] = RegisteredProvider(self.kind, name, cls, plugin)

    def get(self, name: str) -> type[T]:
        try:
            cls: type[T] = self._entries[name].cls
        except KeyError:
            raise ProviderNotFoundError(self._unknown(name)) from None
        return cls

    def by_scheme(self, url: str) -> type[T]:
        """The provider whose ``schemes`` contain the scheme of `url`."""
        scheme = urlsplit(url).scheme.split("+", 1)[0]
        for entry in self._entries.values():
            if scheme in getattr(entry.cls, "schemes", ()):
                found: type[T] = entry.cls
                return found
        known = sorted({s for e in self._entries.values() for s in getattr(e.cls, "schemes", ())})
        raise ProviderNotFoundError(
            f"no {self.kind} provider handles URL scheme {scheme!r} (from {_redact(url)!r}); "
            f"known schemes: {', '.join(known) or 'none'}"
        )

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[RegisteredProvider]:
        return [self._entries[n] for n in self.names()]

    def classes(self) -> list[type[T]]:
        return [e.cls for e in self.entries()]

    def __iter__(self) -> Iterator[RegisteredProvider]:
        return iter(self.entries())

    def __len__(self) -> int:
        return len(self._entries)

    def _unknown(self, name: str) -> str:
        hint = closest(name, self._entries)
        did_you_mean = f"; did you mean {hint!r}?" if hint else ""
        return (
            f"no {self.kind} provider named {name!r}{did_you_mean} "
            f"(known: {', '.join(self.names()) or 'none'})"
        )


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@")
    return url


@attrs.define
class ProviderRegistries:
    """All provider registries of a plugin manager, each built on first use.

    Building a kind calls its ``nxmesh_register_*`` hook, which imports the provider
    classes: an agent that never asks for storage never imports SQLAlchemy.
    """

    pm: pluggy.PluginManager
    _built: dict[str, ProviderRegistry[Any]] = attrs.field(factory=dict, alias="_built")

    @classmethod
    def collect(cls, pm: pluggy.PluginManager) -> ProviderRegistries:
        """Every kind built now, so a duplicate name anywhere fails here."""
        registries = cls(pm)
        for kind in registries.kinds():
            registries[kind]
        return registries

    def kinds(self) -> list[str]:
        """Every provider kind, including ones added to `PROVIDER_HOOKS` by plugins."""
        return [kind for kind, hook in PROVIDER_HOOKS.items() if hasattr(self.pm.hook, hook)]

    def __getitem__(self, kind: str) -> ProviderRegistry[Any]:
        registry = self._built.get(kind)
        if registry is None:
            registry = self._build(kind)
            self._built[kind] = registry
        return registry

    def _build(self, kind: str) -> ProviderRegistry[Any]:
        registry: ProviderRegistry[Any] = ProviderRegistry(kind)
        caller = getattr(self.pm.hook, PROVIDER_HOOKS[kind])
        # One call per implementation so each class is attributed to its plugin;
        # register hooks take no arguments, so no wrapper semantics are lost.
        for impl in reversed(caller.get_hookimpls()):
            for provider in impl.function() or ():
                registry.add(provider, impl.plugin_name)
        return registry

    @property
    def by_kind(self) -> dict[str, ProviderRegistry[Any]]:
        return {kind: self[kind] for kind in self.kinds()}

    def of_plugin(self, plugin: str) -> list[RegisteredProvider]:
        return [e for reg in self.by_kind.values() for e in reg if e.plugin == plugin]
