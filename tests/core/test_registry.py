"""Provider registries: names, duplicates, lookup by name and URL scheme."""

from __future__ import annotations

from typing import ClassVar

import pytest

from nxmesh import hookimpl
from nxmesh.core.errors import DuplicateProviderError, NxMeshError, ProviderNotFoundError
from nxmesh.core.registry import ProviderRegistries, ProviderRegistry, from_settings_or
from nxmesh.core.settings import Settings


class BusA:
    name: ClassVar[str] = "alpha"
    schemes: ClassVar[tuple[str, ...]] = ("alpha", "alphas")


class BusB:
    name: ClassVar[str] = "alpha"
    schemes: ClassVar[tuple[str, ...]] = ("beta",)


class Nameless:
    pass


class TestProviderRegistry:
    def test_duplicate_name_names_both_plugins(self) -> None:
        """A second provider with a taken name is rejected, naming both plugins."""
        registry: ProviderRegistry[object] = ProviderRegistry("event_bus")
        registry.add(BusA, "first-plugin")
        with pytest.raises(DuplicateProviderError) as info:
            registry.add(BusB, "second-plugin")
        assert "first-plugin" in str(info.value)
        assert "second-plugin" in str(info.value)
        assert "'alpha'" in str(info.value)

    def test_provider_without_name_is_rejected(self) -> None:
        """A class lacking a name attribute is an error naming the class and plugin."""
        registry: ProviderRegistry[object] = ProviderRegistry("storage")
        with pytest.raises(NxMeshError, match=r"Nameless.*'p'"):
            registry.add(Nameless, "p")

    def test_lookup_by_scheme_ignores_driver_suffix(self) -> None:
        """postgresql+psycopg:// style URLs match on the base scheme."""
        registry: ProviderRegistry[object] = ProviderRegistry("event_bus")
        registry.add(BusA, "p")
        assert registry.by_scheme("alphas+driver://host/x") is BusA

    def test_unknown_scheme_lists_known_ones_and_redacts_password(self) -> None:
        """An unmatched URL error lists known schemes and never shows the password."""
        registry: ProviderRegistry[object] = ProviderRegistry("storage")
        registry.add(BusA, "p")
        with pytest.raises(ProviderNotFoundError) as info:
            registry.by_scheme("mysql://user:s3cr3t@db/x")
        assert "alpha, alphas" in str(info.value)
        assert "s3cr3t" not in str(info.value)

    def test_unknown_name_suggests_the_closest(self) -> None:
        """A misspelt provider name gets a did-you-mean suggestion."""
        registry: ProviderRegistry[object] = ProviderRegistry("event_bus")
        registry.add(BusA, "p")
        with pytest.raises(ProviderNotFoundError, match="did you mean 'alpha'"):
            registry.get("alhpa")


class TestCollect:
    def test_providers_are_attributed_to_their_plugin(self, make_plugin_manager) -> None:  # type: ignore[no-untyped-def]
        """collect() records which plugin registered each provider."""

        class Plug:
            @hookimpl
            def nxmesh_register_event_buses(self) -> list[type]:
                return [BusA]

        pm = make_plugin_manager(Plug())
        registries = ProviderRegistries.collect(pm)
        assert [e.name for e in registries.of_plugin("test-plugin-0")] == ["alpha"]
        assert registries["event_bus"].get("memory").__module__ == "nxmesh.plugins.eventbus_memory"

    def test_duplicate_across_plugins_fails_collection(self, make_plugin_manager) -> None:  # type: ignore[no-untyped-def]
        """Two plugins registering the same event bus name make collection fail."""

        class Clash:
            name: ClassVar[str] = "memory"
            schemes: ClassVar[tuple[str, ...]] = ("clash",)

        class Plug:
            @hookimpl
            def nxmesh_register_event_buses(self) -> list[type]:
                return [Clash]

        with pytest.raises(DuplicateProviderError, match="eventbus_memory"):
            ProviderRegistries.collect(make_plugin_manager(Plug()))


class TestLazyBuild:
    def test_kinds_are_built_only_when_asked_for(self, make_plugin_manager) -> None:  # type: ignore[no-untyped-def]
        """Indexing one kind calls only that kind's register hook."""
        calls: list[str] = []

        class Plug:
            @hookimpl
            def nxmesh_register_storage_backends(self) -> list[type]:
                calls.append("storage")
                return []

            @hookimpl
            def nxmesh_register_event_buses(self) -> list[type]:
                calls.append("event_bus")
                return [BusA]

        registries = ProviderRegistries(make_plugin_manager(Plug()))
        assert registries["event_bus"].get("alpha") is BusA
        assert calls == ["event_bus"]
        ProviderRegistries.collect(make_plugin_manager(Plug()))
        assert sorted(calls) == ["event_bus", "event_bus", "storage"]


class TestLazyPackages:
    def test_loading_every_plugin_imports_no_heavy_library(self) -> None:
        """Building the plugin manager imports neither SQLAlchemy, psycopg, grpclib nor acme."""
        import subprocess
        import sys

        code = (
            "import sys\n"
            "from nxmesh.core.pluginmanager import get_plugin_manager\n"
            "pm = get_plugin_manager()\n"
            "assert not pm.load_errors, pm.load_errors\n"
            "heavy = ['sqlalchemy', 'psycopg', 'grpclib', 'acme', 'litestar', 'alembic']\n"
            "print([m for m in heavy if m in sys.modules])\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout
        assert out.strip() == "[]"


class TestFromSettingsOr:
    def test_a_class_with_from_settings_is_built_from_the_settings(self) -> None:
        """`from_settings(settings, **kwargs)` is used when the class has it; the default
        is not called."""

        class Configurable:
            def __init__(self, settings: Settings, keyring: object) -> None:
                self.settings, self.keyring = settings, keyring

            @classmethod
            def from_settings(cls, settings: Settings, *, keyring: object) -> Configurable:
                return cls(settings, keyring)

        settings = Settings()

        def default() -> Configurable:
            raise AssertionError("the default must not be used")

        built = from_settings_or(Configurable, settings, default, keyring="k")
        assert (built.settings, built.keyring) == (settings, "k")

    def test_a_class_without_it_gets_the_default(self) -> None:
        class Plain:
            pass

        plain = Plain()
        assert from_settings_or(Plain, Settings(), lambda: plain) is plain
