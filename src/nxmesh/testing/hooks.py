"""Register a plugin on a plugin manager for the duration of one test."""

from __future__ import annotations

import itertools

import attrs
import pluggy

_counter = itertools.count()


@attrs.define
class PluginRegistrar:
    """Registers plugins and unregisters all of them at teardown (the fixture calls `undo`)."""

    pm: pluggy.PluginManager
    _names: list[str] = attrs.field(factory=list)

    def __call__(self, plugin: object, name: str | None = None) -> str:
        registered = self.pm.register(plugin, name=name or f"test-plugin-{next(_counter)}")
        if registered is None:
            raise RuntimeError(f"plugin {name!r} is blocked on this plugin manager")
        self._names.append(registered)
        return registered

    def undo(self) -> None:
        while self._names:
            name = self._names.pop()
            if self.pm.get_plugin(name) is not None:
                self.pm.unregister(name=name)
