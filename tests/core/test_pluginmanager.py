"""Building the plugin manager: built-ins, entry points, isolation, blocking, tracing."""

from __future__ import annotations

from collections.abc import Callable

import pluggy
import pytest

from nxmesh import hookimpl
from nxmesh.core.errors import PluginLoadError
from nxmesh.core.markers import hookspec
from nxmesh.core.pluginmanager import get_plugin_manager

BUILTINS = {"health_basic", "eventbus_memory"}
DISTRIBUTIONS = {
    "storage_postgres": "nxmesh-storage-postgres",
    "transport_grpc": "nxmesh-transport-grpc",
    "deploy_k8s": "nxmesh-deploy-k8s",
    "auth_oauth2": "nxmesh-auth-oauth2",
}

GOOD_PLUGIN = """
from nxmesh import hookimpl
from nxmesh.core.model import HealthResult

class GoodCheck:
    name = "good"
    async def run(self):
        return [HealthResult(check="good", status="ok")]

@hookimpl
def nxmesh_register_health_checks():
    return [GoodCheck]
"""


class TestComposition:
    def test_builtins_come_from_the_nxmesh_distribution(self) -> None:
        """Built-in plugins are registered through the entry-point group and flagged built-in."""
        pm = get_plugin_manager(environ={})
        for name in BUILTINS:
            info = pm.plugin_info[name]
            assert info.builtin
            assert info.distribution == "nxmesh"

    def test_the_four_separate_distributions_are_discovered(self) -> None:
        """Each plugin distribution under plugins/ is found through its entry point."""
        pm = get_plugin_manager(environ={})
        for name, dist in DISTRIBUTIONS.items():
            info = pm.plugin_info[name]
            assert info.distribution == dist
            assert not info.builtin

    def test_autoload_off_keeps_builtins_only(self) -> None:
        """NXMESH_DISABLE_PLUGIN_AUTOLOAD skips third-party entry points but not built-ins."""
        pm = get_plugin_manager(environ={"NXMESH_DISABLE_PLUGIN_AUTOLOAD": "1"})
        assert set(pm.plugin_info) >= BUILTINS
        assert not set(DISTRIBUTIONS) & set(pm.plugin_info)

    def test_blocked_by_argument_and_environment(self) -> None:
        """Plugins named in `disabled` or NXMESH_DISABLE_PLUGINS are not registered."""
        pm = get_plugin_manager(
            disabled=["health_basic"], environ={"NXMESH_DISABLE_PLUGINS": "deploy_k8s, hello"}
        )
        for name in ("health_basic", "deploy_k8s", "hello"):
            assert pm.get_plugin(name) is None
            assert pm.is_blocked(name)
        assert pm.get_plugin("eventbus_memory") is not None
        assert pm.warnings == []

    def test_a_misspelt_name_to_disable_is_warned_of(self) -> None:
        """A name no installed plugin has disables nothing, and the plugin meant stays
        loaded: the manager says so, with the name it probably meant; `nxmesh plugins`
        shows it."""
        from nxmesh.cli.plugins_cmd import describe_plugins

        pm = get_plugin_manager(environ={"NXMESH_DISABLE_PLUGINS": "helo,nonsense-xyz"})
        assert pm.get_plugin("hello") is not None
        assert pm.warnings == [
            "NXMESH_DISABLE_PLUGINS names 'helo', which is no installed plugin, so it "
            "disables nothing (did you mean 'hello'?)",
            "NXMESH_DISABLE_PLUGINS names 'nonsense-xyz', which is no installed plugin, so "
            "it disables nothing",
        ]
        assert describe_plugins(pm)["warnings"] == pm.warnings

    def test_extra_plugins_are_registered_last(self) -> None:
        """Plugins passed in code are registered after entry points."""

        class Mine:
            @hookimpl
            def nxmesh_template_paths(self) -> list[object]:
                return []

        pm = get_plugin_manager(environ={}, plugins=[("mine", Mine())])
        assert pm.list_name_plugin()[-1][0] == "mine"


class TestIsolation:
    def test_broken_entry_point_is_reported_and_others_load(
        self, install_fake_distribution: Callable[..., None]
    ) -> None:
        """An import error in one plugin becomes an error naming its distribution."""
        install_fake_distribution(
            "nxmesh-broken",
            {"broken": "nxmesh_broken_mod"},
            {"nxmesh_broken_mod": "raise ImportError('kaboom')"},
        )
        install_fake_distribution(
            "nxmesh-good", {"good": "nxmesh_good_mod"}, {"nxmesh_good_mod": GOOD_PLUGIN}
        )
        pm = get_plugin_manager(environ={})
        assert pm.get_plugin("broken") is None
        assert pm.get_plugin("good") is not None
        [error] = [e for e in pm.load_errors if e.distribution == "nxmesh-broken"]
        assert "kaboom" in str(error)
        assert "nxmesh_broken_mod" in str(error)
        assert set(pm.plugin_info) >= BUILTINS

    def test_strict_mode_makes_a_broken_plugin_fatal(
        self, install_fake_distribution: Callable[..., None]
    ) -> None:
        """With strict on, the load error is raised instead of recorded."""
        install_fake_distribution(
            "nxmesh-broken", {"broken": "nxmesh_broken_mod2"}, {"nxmesh_broken_mod2": "1/0"}
        )
        with pytest.raises(PluginLoadError, match="nxmesh-broken"):
            get_plugin_manager(environ={"NXMESH_STRICT_PLUGINS": "1"})

    def test_bad_hook_signature_drops_only_that_plugin(
        self, install_fake_distribution: Callable[..., None]
    ) -> None:
        """A hookimpl with arguments the spec lacks is rejected at registration, by name."""
        install_fake_distribution(
            "nxmesh-badsig",
            {"badsig": "nxmesh_badsig_mod"},
            {
                "nxmesh_badsig_mod": """
                from nxmesh import hookimpl
                @hookimpl
                def nxmesh_register_health_checks(nonexistent_argument):
                    return []
            """
            },
        )
        pm = get_plugin_manager(environ={})
        assert pm.get_plugin("badsig") is None
        assert any(e.distribution == "nxmesh-badsig" for e in pm.load_errors)

    def test_unknown_hook_drops_only_that_plugin(
        self, install_fake_distribution: Callable[..., None]
    ) -> None:
        """A plugin implementing a hook nobody specified is dropped at check_pending, by name."""
        install_fake_distribution(
            "nxmesh-typo",
            {"typo": "nxmesh_typo_mod"},
            {
                "nxmesh_typo_mod": """
                from nxmesh import hookimpl
                @hookimpl
                def nxmesh_register_helth_checks():
                    return []
            """
            },
        )
        pm = get_plugin_manager(environ={})
        assert pm.get_plugin("typo") is None
        [error] = [e for e in pm.load_errors if e.distribution == "nxmesh-typo"]
        assert "nxmesh_register_helth_checks" in str(error)


class NewSpecs:
    @hookspec
    def nxmesh_hello_extra(self, who: str) -> str:  # type: ignore[empty-body]
        """A hook added by a plugin."""


class TestAddHooks:
    def test_plugin_specs_are_added_before_other_plugins_are_checked(self) -> None:
        """nxmesh_addhooks lets one plugin define hooks another implements."""

        class Definer:
            @hookimpl
            def nxmesh_addhooks(self, pluginmanager: pluggy.PluginManager) -> None:
                pluginmanager.add_hookspecs(NewSpecs)

        class Implementer:
            @hookimpl
            def nxmesh_hello_extra(self, who: str) -> str:
                return f"hi {who}"

        pm = get_plugin_manager(
            environ={}, autoload=False, plugins=[("definer", Definer()), ("impl", Implementer())]
        )
        assert pm.hook.nxmesh_hello_extra(who="ops") == ["hi ops"]


class TestTracing:
    def test_trace_switch_logs_hook_calls(self) -> None:
        """NXMESH_TRACE_HOOKS=1 traces every hook call."""
        pm = get_plugin_manager(environ={"NXMESH_TRACE_HOOKS": "1"}, autoload=False)
        seen: list[str] = []
        pm.trace.root.setwriter(seen.append)
        pm.hook.nxmesh_template_paths()
        assert any("nxmesh_template_paths" in line for line in seen)
